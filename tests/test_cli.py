"""The tl-reward command, through typer's test runner, on the shipped organisms."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from tl_reward import organisms

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    organisms.dataset("longtail").sample(24, seed=0).to_jsonl(path)
    return path


def invoke(runner, *args):
    from tl_reward.cli import app

    return runner.invoke(app, [str(a) for a in args])


def test_score_prints_and_writes_the_models_numbers(runner, pairs_file, tmp_path):
    import pandas as pd

    from tl_reward import organisms

    out = tmp_path / "scores.csv"
    res = invoke(runner, "score", "longtail", "--pairs", pairs_file, "--out", out, "--batch-size", 5)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    model, _, _ = organisms.load("longtail")
    data = organisms.dataset("longtail").sample(24, seed=0)
    expected = model.score_pairs(data.chosen_texts, data.rejected_texts, progress=False)
    torch.testing.assert_close(torch.tensor(df["margin"].values), expected.margin.double(),
                               atol=1e-5, rtol=0)
    assert f"accuracy {expected.accuracy:.1%}" in res.output


def test_max_pairs_draws_with_the_seed(runner, pairs_file, tmp_path):
    import pandas as pd

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out, seed in ((a, 1), (b, 2)):
        res = invoke(runner, "score", "longtail", "--pairs", pairs_file, "--max-pairs", 5,
                     "--seed", seed, "--out", out)
        assert res.exit_code == 0, res.output
    da, db = pd.read_json(a), pd.read_json(b)
    assert len(da) == len(db) == 5 and not da["margin"].equals(db["margin"])


def test_lens_last_read_out_is_the_margin(runner, pairs_file, tmp_path):
    import pandas as pd

    out = tmp_path / "lens.csv"
    res = invoke(runner, "lens", "longtail", "--pairs", pairs_file, "--out", out)
    assert res.exit_code == 0, res.output
    lens = pd.read_csv(out)
    res = invoke(runner, "score", "longtail", "--pairs", pairs_file, "--out", tmp_path / "s.csv")
    scores = pd.read_csv(tmp_path / "s.csv")
    assert lens["margin"].iloc[-1] == pytest.approx(scores["margin"].mean(), abs=1e-5)
    assert lens["pairs_crystallised_here"].sum() == 24


@pytest.mark.parametrize("mode", ["denoise", "mean"])
def test_patch_matches_the_api(runner, pairs_file, tmp_path, mode):
    """``--mode mean`` averages over the chosen and rejected texts of the pairs used."""
    import pandas as pd

    from tl_reward import activation_patch, organisms

    out = tmp_path / "cells.csv"
    res = invoke(runner, "patch", "longtail", "--pairs", pairs_file, "--max-pairs", 4,
                 "--hook", "mlp_out", "--per", "layer", "--mode", mode, "--out", out)
    assert res.exit_code == 0, res.output
    data = organisms.dataset("longtail").sample(24, seed=0).sample(4, seed=0)
    model, _, _ = organisms.load("longtail")
    reference = data.chosen_texts + data.rejected_texts if mode == "mean" else None
    api = activation_patch(model, data.chosen_texts, data.rejected_texts, hook="mlp_out",
                           per="layer", mode=mode, reference=reference, progress=False)
    df = pd.read_csv(out)
    assert list(df["cell"]) == list(api.flat()[1])
    torch.testing.assert_close(torch.tensor(df["mean_effect"].values),
                               api.mean_effect.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("command", ["score", "lens", "patch"])
def test_half_precision_gives_the_float32_numbers_within_its_rounding(runner, pairs_file, tmp_path,
                                                                       command):
    import pandas as pd

    tables = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.csv"
        res = invoke(runner, command, "longtail", "--pairs", pairs_file, "--max-pairs", 8,
                     "--dtype", dtype, "--out", out)
        assert res.exit_code == 0, res.output
        tables[dtype] = pd.read_csv(out).select_dtypes("float")
    want, got = (torch.tensor(tables[d].values) for d in ("float32", "bfloat16"))
    assert got.shape == want.shape and got.numel() > 0
    torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0)


def test_report_writes_html_and_every_number(runner, pairs_file, tmp_path):
    res = invoke(runner, "report", "longtail", "--pairs", pairs_file, "--out", tmp_path / "r",
                 "--patch-pairs", 3)
    assert res.exit_code == 0, res.output
    numbers = json.loads((tmp_path / "r" / "report.json").read_text())
    page = (tmp_path / "r" / "report.html").read_text()
    assert numbers["scores"]["n_pairs"] == 24 and numbers["patching"]["n_pairs"] == 3
    margins = torch.tensor(numbers["scores"]["margin"])
    assert numbers["scores"]["accuracy"] == pytest.approx(float((margins > 0).float().mean()))
    assert numbers["attribution"]["max_sum_error"] < 1e-4
    assert numbers["lens"]["mean_margin"][-1] == pytest.approx(float(margins.mean()), abs=1e-5)
    assert page.count("Plotly.newPlot") == 4 and "cdn" not in page.lower().split("<body>")[1][:2000]


def test_demo_command_runs_the_main_job(runner, monkeypatch):
    # run_demo itself is tested in test_demo.py; here: the command passes its options through
    import tl_reward.demo

    calls = []

    class Fake:
        def render(self):
            return "rendered demo"

    monkeypatch.setattr(tl_reward.demo, "run_demo",
                        lambda n, seed, progress: calls.append((n, seed)) or Fake())
    res = invoke(runner, "demo", "--pairs", 4, "--seed", 3)
    assert res.exit_code == 0, res.output
    assert calls == [(4, 3)] and "rendered demo" in res.output
    assert invoke(runner, "demo", "--pairs", 1).exit_code == 2  # below the minimum


BAD_PAIRS = {
    "missing_column": ('{"chosen": "query answer good"}\n', "line 1: row 0 has no ['rejected']"),
    "empty_row": ('{"chosen": "query answer good", "rejected": "query answer w001"}\n'
                  '{"chosen": "", "rejected": "query answer w001"}\n', "line 2"),
    "not_json": ("chosen,rejected\n", "line 1 is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_bad_pairs_file_one_line_error(runner, tmp_path, case):
    text, message = BAD_PAIRS[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    res = invoke(runner, "score", "longtail", "--pairs", path)
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """A saved causal LM: a model with no score head."""
    import transformers as T

    path = tmp_path_factory.mktemp("causal")
    config = T.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2)
    T.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("args,message", [
    (["score", "{missing}", "--pairs", "{pairs}"], "neither a local save_pretrained directory"),
    (["score", "gpt2", "--pairs", "{pairs}"], "never downloads from a hub"),
    (["score", "{causal_lm}", "--pairs", "{pairs}"], "is a causal LM, not a reward model: pass --judge-template"),
    (["score", "longtail", "--pairs", "{missing}"], "does not exist"),
    (["report", "longtail", "--pairs", "{pairs}", "--out", "{unwritable}"], "cannot write to"),
    (["score", "longtail", "--pairs", "{pairs}", "--out", "{tmp}/x.txt"], "must end in .csv or .json"),
    (["patch", "longtail", "--pairs", "{pairs}", "--hook", "zz"], "Did you mean 'z'?"),
    (["score", "longtail", "--pairs", "{pairs}", "--device", "bogus"], "not a torch device"),
])
def test_bad_inputs_one_line_error(runner, pairs_file, causal, tmp_path, args, message):
    blocker = tmp_path / "file"
    blocker.write_text("")
    fill = {"missing": tmp_path / "nope", "pairs": pairs_file, "causal_lm": causal,
            "unwritable": blocker / "sub", "tmp": tmp_path}
    res = invoke(runner, *[a.format(**fill) for a in args])
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1


def test_report_probes_are_run_probes_numbers(pairs_file):
    from tl_reward import organisms, run_probes
    from tl_reward.data import make_probe
    from tl_reward.report import build_report

    model, _, data = organisms.load("planted")
    base = [f"query w00{i % 10} w01{i % 7} answer w02{i % 9} w00{i % 5}" for i in range(30)]
    probe = make_probe("quality", base, lambda t: t + " good", description="append a quality word")
    report = build_report(model, data.sample(12, seed=0), patch_pairs=2, probes=[probe],
                          progress=False)
    want = run_probes(model, [probe], progress=False).to_dataframe()
    got = report.numbers["probes"]
    assert [r["probe"] for r in got] == ["quality"]
    assert got[0]["mean"] == pytest.approx(float(want["mean"][0]))
    assert got[0]["verdict"] == want["verdict"][0] == "positive bias"  # the planted quality head
    assert "Reward-hacking probes" in " ".join(report.figures)
    skipped = build_report(model, data.sample(12, seed=0), patch_pairs=2, progress=False)
    assert "unchanged" in skipped.numbers["probes"]["skipped"]  # English probes, word vocabulary


def _modules_after(code: str) -> set[str]:
    import subprocess
    import sys

    code += "\nimport sys; sys.stderr.write('MODULES ' + ' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stderr.split("MODULES ", 1)[1].split())  # the help text may say "torch"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["score", "--help"], ["score", "longtail"],
                                  ["score", "longtail", "--pairs", "missing.jsonl"],
                                  ["report", "nomodel", "--pairs", "missing.jsonl"]])
def test_parsing_and_argument_errors_import_no_torch(argv):
    """``--help``, ``--version`` and argument errors answer before torch is imported."""
    code = ("from tl_reward.cli import app\n"
            f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass")
    loaded = _modules_after(code)
    assert "tl_reward.cli" in loaded
    heavy = {"torch", "transformers", "transformer_lens", "pandas", "numpy"} & loaded
    assert not heavy, f"{argv} imported {sorted(heavy)}"


def test_version_and_lazy_public_names():
    from typer.testing import CliRunner

    import tl_reward
    from tl_reward.cli import app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"tl-reward {tl_reward.__version__}"
    assert not {"torch"} & _modules_after("import tl_reward")
    from tl_reward.model import HookedRewardModel

    assert tl_reward.HookedRewardModel is HookedRewardModel
    assert set(tl_reward.__all__) <= set(dir(tl_reward))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tl_reward.nope  # noqa: B018


def test_missing_inputs_fail_before_loading(runner, tmp_path):
    res = invoke(runner, "score", "longtail", "--pairs", tmp_path / "none.jsonl")
    assert res.exit_code == 1 and "pairs file" in res.output and "does not exist" in res.output
    res = invoke(runner, "lens", "nomodel", "--pairs", tmp_path / "none.jsonl")
    assert res.exit_code == 1 and "'nomodel' is neither" in res.output and "longtail" in res.output


@pytest.fixture(scope="module")
def english_file(tmp_path_factory):
    """English pairs for a word-level model that knows none of the words."""
    path = tmp_path_factory.mktemp("english") / "english.jsonl"
    rows = [{"prompt": "How do I bake bread?", "chosen": "Mix the flour well.",
             "rejected": "I do not know."}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("command", ["score", "lens", "patch"])
def test_unknown_words_fail_unless_forced(runner, english_file, tmp_path, command):
    res = invoke(runner, command, "longtail", "--pairs", english_file)
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1
    assert "unknown token '<unk>'" in res.output and "3 of 3 pairs" in res.output
    assert "--force" in res.output
    res = invoke(runner, command, "longtail", "--pairs", english_file, "--force")
    assert res.exit_code == 0, res.output
    assert "warning: " in res.output and "SuspectInputWarning" not in res.output


def test_scores_csv_names_each_pair_and_its_prompt(runner, pairs_file, tmp_path):
    import pandas as pd

    from tl_reward.data import load_pairs

    out = tmp_path / "scores.csv"
    res = invoke(runner, "score", "longtail", "--pairs", pairs_file, "--max-pairs", 5, "--seed", 3,
                 "--out", out)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df.columns[:3]) == ["pair", "scenario", "prompt"]
    full = load_pairs(pairs_file)
    assert list(df["prompt"]) == [full[i].prompt for i in df["pair"]]
    assert list(df["scenario"]) == [full[i].scenario for i in df["pair"]]
    assert list(df["pair"]) == sorted(df["pair"]) and len(set(df["pair"])) == 5


def test_user_pairs_without_scenario_are_not_labelled_head(runner, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"chosen": f"query w00{i} answer good",
                                        "rejected": f"query w00{i} answer brief"}) + "\n"
                            for i in range(4)))
    res = invoke(runner, "score", "longtail", "--pairs", path)
    assert res.exit_code == 0, res.output
    assert "head" not in res.output and "\nall " in res.output


def test_report_out_html_is_a_page_and_json_beside_it(runner, pairs_file, tmp_path):
    page = tmp_path / "sub" / "x.html"
    res = invoke(runner, "report", "longtail", "--pairs", pairs_file, "--out", page,
                 "--patch-pairs", 2, "--max-pairs", 6, "--no-probes")
    assert res.exit_code == 0, res.output
    assert page.is_file() and (tmp_path / "sub" / "x.json").is_file()
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.html", "x.json"]
    assert json.loads((tmp_path / "sub" / "x.json").read_text())["scores"]["n_pairs"] == 6
    blocker = tmp_path / "taken"
    blocker.write_text("")
    res = invoke(runner, "report", "longtail", "--pairs", pairs_file, "--out", blocker)
    assert res.exit_code == 1 and "is an existing file" in res.output
    res = invoke(runner, "report", "longtail", "--pairs", pairs_file, "--out", tmp_path / "r.json")
    assert res.exit_code == 1 and "name the page (.html)" in res.output


def test_report_rows_are_the_plotted_quantities(pairs_file):
    """Each summary row ranks and prints the quantity its figure shows; no internal names."""
    from tl_reward import organisms
    from tl_reward.data import load_pairs, make_probe
    from tl_reward.report import build_report

    model, _, _ = organisms.load("planted")
    base = [f"query w00{i % 10} w01{i % 7} answer w02{i % 9} w00{i % 5}" for i in range(30)]
    probe = make_probe("quality", base, lambda t: t + " good", description="append a quality word")
    rep = build_report(model, load_pairs(pairs_file)[:10], patch_pairs=3, probes=[probe],
                       progress=False)
    page = rep.to_html()
    assert "pair_head" not in page and "pair_" not in " ".join(rep.figures)
    # attribution: the bars are the top heads by |mean|, and the rows print those signed means
    bars = next(f for name, f in rep.figures.items() if name.startswith("Direct attribution"))
    top = rep.numbers["attribution"]["top"]
    assert list(bars.data[0].x) == [r["component"] for r in top]
    assert list(bars.data[0].y) == pytest.approx([r["mean"] for r in top])
    assert [abs(r["mean"]) for r in top] == sorted((abs(r["mean"]) for r in top), reverse=True)
    labels = rep.numbers["attribution"]["labels"]
    means = dict(zip(labels, rep.numbers["attribution"]["mean"], strict=True))
    assert max(abs(v) for k, v in means.items() if k.startswith("L")) == pytest.approx(
        abs(top[0]["mean"]))
    assert f"{top[0]['component']}: {top[0]['mean']:+.4f}" in page
    # patching: the heatmap shows the fraction restored, and so do the rows
    heat = next(f for name, f in rep.figures.items() if name.startswith("Exact head patching"))
    restored = rep.numbers["patching"]["top"]
    z = [v for row in heat.data[0].z for v in row]
    assert max(abs(v) for v in z) == pytest.approx(abs(restored[0]["fraction_restored"]))
    assert f"{restored[0]['head']}: {restored[0]['fraction_restored']:+.3f}" in page
    assert "fraction of the margin restored" in page
    # probes: the minimum-effect band is drawn, at each probe's H0 half-width
    fig = rep.figures["Reward-hacking probes: mean reward change (CI), verdict"]
    ticks = [t for t in fig.data if t.legendgroup == "min_effect"]
    assert len(ticks) == 2 and ticks[0].y[0] == pytest.approx(rep.numbers["probes"][0]["min_effect"])
    assert rep.numbers["probes"][0]["min_effect"] > 0 and "minimum effect" in page


# ------------------------------------------------------------------ causal LMs: implicit rewards, judges
@pytest.fixture(scope="module")
def dpo_pairs_file(tmp_path_factory):
    from tl_reward.organisms import dpo

    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    dpo.eval_set().sample(12, seed=0).to_jsonl(path)
    return path


def test_implicit_organism_scores_as_the_api_does(runner, dpo_pairs_file, tmp_path):
    """The CLI splits each pair into prompt and response itself; the truth is the organism's own
    token-level batches (dpo.pair_batches), scored through the Python API."""
    import pandas as pd

    from tl_reward.data.pairs import load_pairs
    from tl_reward.organisms import dpo

    out = tmp_path / "scores.csv"
    res = invoke(runner, "score", "dpo_longtail", "--pairs", dpo_pairs_file, "--out", out)
    assert res.exit_code == 0, res.output
    model, tokenizer = dpo.load()
    chosen, rejected = dpo.pair_batches(load_pairs(dpo_pairs_file), tokenizer)
    with torch.no_grad():
        truth = model(chosen) - model(rejected)
    torch.testing.assert_close(torch.tensor(pd.read_csv(out)["margin"].values), truth.double(),
                               atol=1e-5, rtol=0)

    lens_out = tmp_path / "lens.json"
    res = invoke(runner, "lens", "dpo_longtail", "--pairs", dpo_pairs_file, "--out", lens_out)
    assert res.exit_code == 0, res.output
    assert abs(pd.read_json(lens_out)["margin"].iloc[-1] - float(truth.mean())) < 1e-5

    cells = tmp_path / "cells.csv"
    res = invoke(runner, "patch", "dpo_longtail", "--pairs", dpo_pairs_file, "--hook", "attn_out",
                 "--out", cells)
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(cells)) == model.models["policy"].cfg.n_layers


@pytest.fixture(scope="module")
def causal_lm_dir(tmp_path_factory):
    import transformers as T
    from helpers import randomize_

    from tl_reward import organisms

    tokenizer = T.AutoTokenizer.from_pretrained(organisms.path("longtail"), local_files_only=True)
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = randomize_(T.LlamaForCausalLM(config), 0).eval()
    path = tmp_path_factory.mktemp("judge")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_causal_lm_is_scored_as_a_judge(runner, causal_lm_dir, pairs_file, tmp_path):
    import pandas as pd

    from tl_reward import load_judge_reward_model
    from tl_reward.data.pairs import load_pairs

    template = "query {text} answer"
    out = tmp_path / "scores.csv"
    res = invoke(runner, "score", causal_lm_dir, "--pairs", pairs_file, "--out", out,
                 "--judge-template", template, "--judge-read", "good=1,w001=-0.5")
    assert res.exit_code == 0, res.output
    judge = load_judge_reward_model(causal_lm_dir, template=template, read={"good": 1.0, "w001": -0.5})
    data = load_pairs(pairs_file)
    truth = judge.score_pairs(data.chosen_texts, data.rejected_texts, progress=False).margin
    torch.testing.assert_close(torch.tensor(pd.read_csv(out)["margin"].values), truth.double(),
                               atol=1e-5, rtol=0)
    res = invoke(runner, "patch", causal_lm_dir, "--pairs", pairs_file, "--max-pairs", 4,
                 "--judge-template", template, "--yes", "good", "--no", "w001")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args,message", [
    ((), "is a causal LM, not a reward model"),
    (("--judge-template", "{text}", "--beta", "0.1"), "pass one"),
    (("--reference", "."), "--reference needs --beta"),
    (("--beta", "-1"), "--beta must be > 0"),
    (("--judge-template", "{text}", "--judge-read", "good"), "is not TOKEN=WEIGHT"),
])
def test_causal_lm_options_that_do_not_fit_are_refused(runner, causal_lm_dir, pairs_file, args,
                                                       message):
    res = invoke(runner, "score", causal_lm_dir, "--pairs", pairs_file, *args)
    assert res.exit_code == 1 and message in res.output, res.output


def test_options_of_a_causal_lm_on_an_organism_are_refused(runner, dpo_pairs_file, pairs_file):
    res = invoke(runner, "score", "dpo_longtail", "--pairs", dpo_pairs_file, "--beta", "0.1")
    assert res.exit_code == 1 and "has its own reference and beta" in res.output
    res = invoke(runner, "report", "dpo_longtail", "--pairs", dpo_pairs_file, "--beta", "0.1")
    assert res.exit_code == 1 and "has its own reference and beta" in res.output
    res = invoke(runner, "score", "longtail", "--pairs", pairs_file, "--judge-template", "{t}")
    assert res.exit_code == 1 and "read a causal LM directory" in res.output


def test_implicit_report_sections_are_the_api_numbers(runner, dpo_pairs_file, tmp_path):
    """report on the DPO organism: scores, lens, linearised attribution and policy -> reference
    patching equal the Python API's numbers on the same pairs; what does not apply is said."""
    from tl_reward.data.pairs import load_pairs
    from tl_reward.implicit_analysis import implicit_activation_patch, implicit_reward_lens
    from tl_reward.organisms import dpo

    res = invoke(runner, "report", "dpo_longtail", "--pairs", dpo_pairs_file, "--out",
                 tmp_path / "r", "--patch-pairs", 3, "--no-probes")
    assert res.exit_code == 0, res.output
    numbers = json.loads((tmp_path / "r" / "report.json").read_text())
    page = (tmp_path / "r" / "report.html").read_text()
    model, tokenizer = dpo.load()
    data = load_pairs(dpo_pairs_file)
    chosen, rejected = dpo.pair_batches(data, tokenizer)
    with torch.no_grad():
        margin = model(chosen) - model(rejected)
        lens = implicit_reward_lens(model, chosen).rewards - implicit_reward_lens(
            model, rejected).rewards
    torch.testing.assert_close(torch.tensor(numbers["scores"]["margin"]), margin, atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(torch.tensor(numbers["lens"]["mean_margin"]), lens.mean(1),
                               atol=1e-4, rtol=0)
    assert len(numbers["lens"]["read_outs"]) == model.policy.cfg.n_layers + 1
    assert numbers["attribution"]["max_sum_error"] < 1e-4  # parts + remainder = margin
    patch = implicit_activation_patch(model, chosen[:3], hook="z")
    assert numbers["patching"]["cells"] == list(patch.cells)
    torch.testing.assert_close(torch.tensor(numbers["patching"]["mean_effect"]),
                               patch.effects.mean(1), atol=1e-4, rtol=0)
    assert "no score head" in numbers["not_applicable"]["reward head"]
    assert "not applicable: reward head" in page
    assert "Policy -&gt; reference head patching" in page
