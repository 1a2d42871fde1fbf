"""Agreement of attribution and patching: statistics equal scipy's, labels matched, errors clear."""

import numpy as np
import pytest
import torch
from helpers import make_hf_model, pad_batch, ragged_sequences, randomize_
from scipy import stats

from tl_reward import (
    AttributionResult,
    PatchResult,
    activation_patch,
    agreement_report,
    attribution_patch,
    compare_attribution_and_patching,
    errors,
    load_reward_model,
    pair_reward_attribution,
)
from tl_reward.causal.patching import PatchStats


def _attribution(values, labels):
    values = torch.as_tensor(values, dtype=torch.float32)
    return AttributionResult(values=values, labels=tuple(labels), bias=torch.tensor(0.0),
                             total=values.sum(0), level="pair_head")


def _patch(values, n_layers, n_heads):
    """A z-per-head PatchResult from ``values [layer * head, pair]`` (labels L{l}H{h})."""
    effects = torch.as_tensor(values, dtype=torch.float32).reshape(n_layers, n_heads, -1)
    n_pairs = effects.shape[-1]
    return PatchResult(
        effects=effects, normalized=effects, clean_reward=torch.zeros(n_pairs),
        corrupt_reward=torch.zeros(n_pairs), axes=("layer", "head"),
        axis_labels=(tuple(map(str, range(n_layers))), tuple(map(str, range(n_heads)))),
        hook="z", per="head", mode="denoise", stats=PatchStats(0, 0, 0.0, 0.0),
    )


HEADS = [f"L{l}H{h}" for l in range(2) for h in range(3)]


def test_statistics_equal_scipy_on_a_hand_made_case():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 9)).astype(np.float32)  # the report reads float32 tensors
    p = a + rng.normal(size=(6, 9)).astype(np.float32)
    # attribution has extra components and another order; patching is per layer x head
    order = [4, 0, 5, 2, 1, 3]
    attr = _attribution(np.vstack([rng.normal(size=(2, 9)), a[order]]),
                        ["embed", "L0.attn_bias"] + [HEADS[i] for i in order])
    report = agreement_report(attr, _patch(p, 2, 3), n_resamples=2000, seed=3)
    expected = np.array([stats.spearmanr(a[:, i], p[:, i]).statistic for i in range(9)])
    np.testing.assert_allclose(report.rho.numpy(), expected, rtol=1e-6)
    assert report.mean == pytest.approx(expected.mean())
    boot = stats.bootstrap((expected,), np.mean, n_resamples=2000, method="BCa",
                           rng=np.random.default_rng(3))
    assert report.ci_low == pytest.approx(boot.confidence_interval.low)
    assert report.ci_high == pytest.approx(boot.confidence_interval.high)
    test = stats.wilcoxon(expected)
    assert report.p_value == pytest.approx(test.pvalue)
    assert report.wilcoxon_statistic == pytest.approx(test.statistic)
    assert report.n_pairs == 9 and report.n_excluded == 0
    assert set(report.components) == set(HEADS)
    assert report.components == tuple(HEADS[i] for i in order)  # attribution's order


def test_monotone_transform_gives_rho_one():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 7))
    report = agreement_report(_attribution(a, HEADS), _patch(np.exp(a) ** 3 - 2.0, 2, 3))
    np.testing.assert_allclose(report.rho.numpy(), 1.0, atol=1e-6)
    assert report.mean == pytest.approx(1.0)
    assert report.ci_low == pytest.approx(1.0) and report.ci_high == pytest.approx(1.0)
    assert report.p_value == pytest.approx(stats.wilcoxon(np.ones(7)).pvalue)
    df = report.to_dataframe()
    assert list(df.columns) == ["pair", "rho", "n_components", "used"] and len(df) == 7
    assert report.plot().data
    assert "n = 7 pairs" in report.summary()


def test_nan_cells_dropped_and_undefined_pairs_excluded_and_counted():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 7))
    p = a + 0.3 * rng.normal(size=(6, 7))
    p[0, 1] = p[4, 1] = np.nan  # pair 1 lacks two cells
    p[:, 2] = 0.5  # pair 2: constant patching effects, rho undefined
    report = agreement_report(_attribution(a, HEADS), _patch(p, 2, 3))
    keep = np.isfinite(p[:, 1])
    assert report.rho[1].item() == pytest.approx(stats.spearmanr(a[keep, 1], p[keep, 1]).statistic)
    assert report.n_components.tolist() == [6, 4, 6, 6, 6, 6, 6]
    assert np.isnan(report.rho[2].item()) and report.n_excluded == 1 and report.n_pairs == 6
    assert not report.to_dataframe()["used"][2]


def test_errors_on_too_few_pairs_components_and_mismatched_pairs():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4))
    with pytest.raises(errors.InvalidInputError, match="min_pairs=5"):
        agreement_report(_attribution(a, HEADS), _patch(a, 2, 3))
    a = rng.normal(size=(6, 8))
    with pytest.raises(errors.InvalidInputError, match="8 pairs but patching has 7"):
        agreement_report(_attribution(a, HEADS), _patch(a[:, :7], 2, 3))
    labels = ["embed", "L0H0", "L0H1", "0_mlp_out", "1_mlp_out", "L9H9"]
    with pytest.raises(errors.InvalidInputError, match="share 2 component labels"):
        agreement_report(_attribution(a, labels), _patch(a, 2, 3))
    with pytest.raises(errors.InvalidInputError, match="min_components"):
        agreement_report(_attribution(a, HEADS), _patch(a, 2, 3), min_components=2)
    with pytest.raises(errors.InvalidInputError, match="bootstrap_method"):
        agreement_report(_attribution(a, HEADS), _patch(a, 2, 3), bootstrap_method="bca")


def test_per_position_patching_gets_a_hint():
    model = load_reward_model(make_hf_model("gpt2"))
    chosen, rejected = torch.randint(3, 97, (5, 4)), torch.randint(3, 97, (5, 4))
    attr = pair_reward_attribution(model, chosen, rejected, level="head", progress=False)
    patch = attribution_patch(model, chosen, rejected, hooks=("z",), progress=False)
    with pytest.raises(errors.InvalidInputError, match="@pos"):
        agreement_report(attr, patch.as_patch_result("z", "head_pos"))


@pytest.mark.parametrize("level", ["head", "component", "neuron"])
def test_compare_runs_both_sides_on_matching_grids(level):
    """On a near-linear model attribution margins and denoising effects agree positively."""
    model = load_reward_model(randomize_(make_hf_model("llama", gqa=True), std=0.05))
    chosen, c_mask = pad_batch(ragged_sequences(seed=1, n=8), "left")
    rejected, r_mask = pad_batch(ragged_sequences(seed=2, n=8), "right")
    report = compare_attribution_and_patching(model, chosen, rejected, c_mask, r_mask,
                                              level=level, progress=False)
    attr = pair_reward_attribution(model, chosen, rejected, c_mask, r_mask, level=level,
                                   progress=False)
    grids = {"head": [("z", "head")], "component": [("attn_out", "layer"), ("mlp_out", "layer")],
             "neuron": [("mlp_post", "neuron")]}[level]
    patches = [activation_patch(model, chosen, rejected, hook=h, per=per, clean_mask=c_mask,
                                corrupt_mask=r_mask, progress=False) for h, per in grids]
    by_hand = agreement_report(attr, patches)
    torch.testing.assert_close(report.rho, by_hand.rho)
    assert report.n_pairs == 8
    n_layers = model.cfg.n_layers
    assert len(report.components) == {"head": n_layers * model.cfg.n_heads,
                                      "component": 2 * n_layers,
                                      "neuron": n_layers * model.cfg.d_mlp}[level]
    assert report.mean > 0
    if level == "neuron":
        assert report.mean > 0.5 and report.p_value < 0.05
    fast = compare_attribution_and_patching(model, chosen, rejected, c_mask, r_mask, level=level,
                                            estimator="atp", progress=False)
    assert fast.patching.startswith("atp_denoise")
    assert abs(fast.mean - report.mean) < 0.2
