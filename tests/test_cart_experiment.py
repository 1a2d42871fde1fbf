"""The CART experiment at a reduced setting: every method trains, evaluation and best-of-n are
checked against direct computations."""

import math

import pytest
import torch


@pytest.fixture(scope="module")
def small():
    from tl_reward.cart.experiment import ExperimentSettings, train_methods
    from tl_reward.data import LongTailTask
    from tl_reward.training import TrainConfig

    settings = ExperimentSettings(
        n_train=400, n_eval=120, task=LongTailTask(alpha=0.9, n_tail=2, n_filler=30),
        hidden_size=32, pretrain=TrainConfig(steps=20, batch_size=32, lr=5e-3, warmup_steps=2,
                                             progress=False),
        finetune=TrainConfig(steps=4, batch_size=32, lr=1e-3, warmup_steps=1, progress=False),
        discovery_top_k=4, n_head_texts=100, n_variants=3, term_batch=8,
    )
    return settings, train_methods(0.9, 0, settings)


def test_every_method_trains_from_the_same_base(small):
    from tl_reward.cart.experiment import METHODS

    settings, trained = small
    assert set(trained.runs) == set(METHODS) and trained.circuits
    base = dict(trained.base.named_parameters())
    for method, run in trained.runs.items():
        changed = any(not torch.equal(p, base[n]) for n, p in run.model.named_parameters())
        assert changed, f"{method} did not train"
        assert run.seconds > 0
        assert (run.extra_seconds >= trained.discovery_seconds) == method.startswith("cart")


def test_evaluation_rows_match_direct_margins(small):
    from tl_reward.cart.experiment import ENSEMBLES, METHODS, eval_set, evaluate
    from tl_reward.training import pair_margins

    settings, trained = small
    rows = {r["method"]: r for r in evaluate(trained, settings)}
    assert set(rows) == set(METHODS) | set(ENSEMBLES)
    ev = eval_set(trained.task, settings, 0)
    tail = torch.tensor(ev.is_tail)
    m = pair_margins(trained.runs["erm"].model, ev, progress=False)
    assert rows["erm"]["tail_acc"] == pytest.approx(float((m[tail] > 0).float().mean()))
    assert rows["erm"]["head_acc"] == pytest.approx(float((m[~tail] > 0).float().mean()))
    p = torch.sigmoid(m[tail].double())
    assert rows["erm"]["tail_brier"] == pytest.approx(float(((1 - p) ** 2).mean()))
    for r in rows.values():
        assert 0 <= r["tail_acc"] <= 1 and 0 <= r["tail_ece"] <= 1


def test_ensemble_weights_fit_on_train_tail(small):
    from tl_reward.cart.experiment import METHODS, ensemble_margins, eval_set
    from tl_reward.training import pair_margins

    settings, trained = small
    ev = eval_set(trained.task, settings, 0)
    ens = ensemble_margins(trained, ev)
    w = ens["weights"]
    assert float(w.min()) >= 0 and float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    members = torch.stack([pair_margins(trained.runs[m].model, ev, progress=False) for m in METHODS])
    torch.testing.assert_close(ens["uniform_ensemble"], members.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ens["cart_ensemble"], w @ members, atol=1e-5, rtol=1e-5)


def test_best_of_n_estimator_by_hand(small):
    from tl_reward.cart.experiment import _best_of_n_weights, best_of_n

    w = _best_of_n_weights(5, (1, 2, 5))
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64))
    assert w[0].tolist() == pytest.approx([0.2] * 5)  # n = 1: every sample equally likely
    assert w[2].tolist() == pytest.approx([0, 0, 0, 0, 1])  # n = N: the top-ranked sample
    assert w[1].tolist() == pytest.approx([0, 1 / 10, 2 / 10, 3 / 10, 4 / 10])  # C(i-1,1)/C(5,2)

    settings, trained = small
    task, model = trained.task, trained.runs["erm"].model
    prompt = "query " + " ".join(task.filler_words[:5])
    res = best_of_n(model, task, [prompt], n_samples=16, ns=(1, 16), seed=3)
    texts = [prompt + " " + r for r in task.sample_responses(16, seed=3 * 100_003)]
    gold = task.gold_rewards(texts).double()
    proxy = model.score(texts, progress=False)
    assert float(res.gold["head"][0]) == pytest.approx(float(gold.mean()))
    assert float(res.gold["head"][1]) == pytest.approx(float(gold[proxy.argmax()]))
    with pytest.raises(ValueError, match="n_samples"):
        best_of_n(model, task, [prompt], n_samples=8, ns=(16,))


def test_mean_ci_matches_scipy():
    from scipy import stats

    from tl_reward.cart.experiment import mean_ci

    x = [0.1, 0.4, 0.35, 0.2, 0.3]
    m, lo, hi = mean_ci(x)
    want = stats.t.interval(0.95, 4, loc=sum(x) / 5, scale=stats.sem(x))
    assert (lo, hi) == pytest.approx(want) and m == pytest.approx(0.27)
    assert math.isnan(mean_ci([1.0])[1])
