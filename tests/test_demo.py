"""The README's main job runs and its numbers are the ones the tools compute."""

import pytest


@pytest.fixture(scope="module")
def report():
    from tl_reward.demo import run_demo

    return run_demo(8, seed=0)


def test_demo_shows_the_tail_gap(report):
    acc = report.accuracy.set_index("scenario")
    assert acc.loc["head", "accuracy"] >= 0.95
    tail = acc[acc["tail"]]
    assert len(tail) == 3 and (acc.loc["head", "accuracy"] - tail["accuracy"] >= 0.15).all()
    assert acc["pairs"].sum() == 2000


def test_demo_attribution_adds_up_and_tables_are_filled(report):
    assert report.attribution_error < 1e-4
    assert report.n_pairs == 8
    assert list(report.lens["read-out"])[-1] == "final_post"
    assert len(report.attribution) == 5 and len(report.patching) == 5
    # the lens's last read-out on tail pairs is the mean tail margin of the drawn pairs: negative
    assert report.lens["tail pairs"].iloc[-1] < 0 < report.lens["head pairs"].iloc[-1]
    text = report.render()
    assert "Pairwise accuracy" in text and "L0H" in text
    assert text.splitlines()[0].startswith("tl_reward demo: the `longtail` organism")  # the title


def test_demo_cli_rejects_bad_pairs(capsys):
    from tl_reward.demo import main

    with pytest.raises(SystemExit) as err:
        main(["--pairs", "0"])
    assert err.value.code == 2
    assert "--pairs must be at least 2, got 0" in capsys.readouterr().err
