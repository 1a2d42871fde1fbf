"""Reward lens and direct reward attribution: exact additivity, agreement with TransformerLens."""

import pytest
import torch
from helpers import ARCHS, GQA_ARCHS, make_hf_model, pad_batch, ragged_sequences

from tl_reward import (
    TunedRewardLens,
    direct_reward_attribution,
    errors,
    load_reward_model,
    pair_reward_attribution,
    pair_reward_lens,
    reward_lens,
)
from tl_reward.observational.lens import LensResult, PairLensResult

TOL = 1e-4
CASES = [(a, g) for a in ARCHS for g in ([False, True] if a in GQA_ARCHS else [False])]
LEVELS = ["component", "head", "neuron", "head_source"]


@pytest.mark.parametrize("arch,gqa", CASES)
@pytest.mark.parametrize("fold_ln", [False, True])
def test_attribution_and_lens_add_up_to_the_reward(arch, gqa, fold_ln):
    model = load_reward_model(make_hf_model(arch, gqa), fold_ln=fold_ln)
    seqs = ragged_sequences(seed=7)
    for side in ("left", "right"):
        tokens, mask = pad_batch(seqs, side)
        with torch.no_grad():
            reward = model(tokens, attention_mask=mask)
        for level in LEVELS:
            res = direct_reward_attribution(model, tokens, mask, level=level, progress=False)
            torch.testing.assert_close(res.values.sum(0) + res.bias, reward, atol=TOL, rtol=0)
            torch.testing.assert_close(res.total, reward)
        for norm in ("cached", "recomputed"):
            lens = reward_lens(model, tokens, mask, norm=norm, progress=False)
            assert lens.rewards.shape == (model.cfg.n_layers + 1, len(seqs))
            torch.testing.assert_close(lens.rewards[-1], reward, atol=TOL, rtol=0)


def _full_cache_reference(model, tokens, mask):
    """TransformerLens's own stacks on the full (ungathered) cache, read at the pooled token."""
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    idx = model.pooled_index(tokens, mask)
    rows = torch.arange(len(idx))
    direction = model.reward_direction
    heads = cache.stack_head_results(layer=-1, apply_ln=True)  # [head, batch, pos, d_model]
    heads = heads[:, rows, idx] @ direction
    neurons = cache.stack_neuron_results(layer=-1, apply_ln=True, project_output_onto=direction)
    neurons = neurons[:, rows, idx]
    return heads, neurons


@pytest.mark.parametrize("arch,gqa", [("llama", True), ("gpt2", False), ("qwen2", True)])
def test_heads_and_neurons_match_transformer_lens_stacks(arch, gqa):
    model = load_reward_model(make_hf_model(arch, gqa), fold_ln=True)
    tokens, mask = pad_batch(ragged_sequences(seed=8), "right")
    ref_heads, ref_neurons = _full_cache_reference(model, tokens, mask)
    heads = direct_reward_attribution(model, tokens, mask, level="head", progress=False)
    head_rows = [i for i, lab in enumerate(heads.labels) if "." not in lab and "H" in lab]
    torch.testing.assert_close(heads.values[head_rows], ref_heads, atol=1e-5, rtol=0)
    neurons = direct_reward_attribution(model, tokens, mask, level="neuron", progress=False)
    rows = [i for i, lab in enumerate(neurons.labels) if "N" in lab and lab.startswith("L")]
    torch.testing.assert_close(neurons.values[rows], ref_neurons, atol=1e-5, rtol=0)


def test_head_sources_sum_to_heads_and_padding_gets_nothing():
    model = load_reward_model(make_hf_model("mistral", gqa=True))
    tokens, mask = pad_batch(ragged_sequences(seed=9), "left")
    heads = direct_reward_attribution(model, tokens, mask, level="head", progress=False)
    src = direct_reward_attribution(model, tokens, mask, level="head_source", progress=False)
    n_pos = tokens.shape[1]
    for i, lab in enumerate(heads.labels):
        if lab.startswith("L") and "." not in lab:
            rows = [j for j, s in enumerate(src.labels) if s.startswith(lab + ".src")]
            assert len(rows) == n_pos
            torch.testing.assert_close(src.values[rows].sum(0), heads.values[i], atol=1e-5, rtol=0)
            per_pos = src.values[rows]  # [src_pos, batch]
            assert per_pos[mask.T == 0].abs().max() == 0


def test_pair_attribution_and_margin_lens():
    model = load_reward_model(make_hf_model("gemma2", gqa=True))
    chosen, c_mask = pad_batch(ragged_sequences(seed=10), "right")
    rejected, r_mask = pad_batch(ragged_sequences(seed=11), "left")
    with torch.no_grad():
        margin = model(chosen, attention_mask=c_mask) - model(rejected, attention_mask=r_mask)
    res = pair_reward_attribution(model, chosen, rejected, c_mask, r_mask, level="head", progress=False)
    torch.testing.assert_close(res.values.sum(0), margin, atol=TOL, rtol=0)
    assert float(res.bias) == 0.0
    lens = pair_reward_lens(model, chosen, rejected, c_mask, r_mask, progress=False)
    torch.testing.assert_close(lens.margins[-1], margin, atol=TOL, rtol=0)
    assert lens.crystallisation_layer(0.5).shape == (len(margin),)


def test_crystallisation_layer_on_known_curves():
    labels = ("0_pre", "1_pre", "2_pre", "final_post")
    zeros = torch.zeros(4, 3)
    margins = torch.tensor([[0.0, 0.0, -1.0], [0.95, 0.5, -1.0], [0.2, 0.95, -0.2], [1.0, 1.0, -1.0]])
    pair = PairLensResult(
        chosen=LensResult(margins, labels, "cached", ("reward",)),
        rejected=LensResult(zeros, labels, "cached", ("reward",)),
    )
    # pair 0 reaches 0.9 at layer 1 but falls back: it crystallises at the last point
    assert pair.crystallisation_layer(0.9).tolist() == [3, 2, 3]
    assert pair.crystallisation_layer(0.15).tolist() == [1, 1, 0]


def test_multi_objective_lens_has_an_objective_axis_and_attribution_needs_one():
    model = load_reward_model(make_hf_model("llama", num_labels=3))
    tokens, mask = pad_batch(ragged_sequences(seed=12), "right")
    lens = reward_lens(model, tokens, mask, progress=False)
    with torch.no_grad():
        reward = model(tokens, attention_mask=mask)
    assert lens.rewards.shape == (model.cfg.n_layers + 1, len(tokens), 3)
    torch.testing.assert_close(lens.rewards[-1], reward, atol=TOL, rtol=0)
    assert set(lens.to_dataframe()["objective"]) == set(model.label_names)
    with pytest.raises(errors.ObjectiveError, match="set_objective"):
        direct_reward_attribution(model, tokens, mask)
    model.set_objective([1.0, 0.0, -1.0])
    res = direct_reward_attribution(model, tokens, mask, progress=False)
    torch.testing.assert_close(res.values.sum(0) + res.bias, reward[:, 0] - reward[:, 2], atol=TOL, rtol=0)


def test_bad_hook_level_and_norm_names():
    model = load_reward_model(make_hf_model("llama"))
    tokens = torch.tensor([[5, 6, 7]])
    with pytest.raises(errors.HookNameError, match="resid_post"):
        reward_lens(model, tokens, hook="resid_pots")
    with pytest.raises(errors.InvalidInputError, match="neuron"):
        direct_reward_attribution(model, tokens, level="neurons")
    with pytest.raises(errors.InvalidInputError, match="cached"):
        reward_lens(model, tokens, norm="cache")


def test_results_tables_and_plots():
    model = load_reward_model(make_hf_model("gpt2"))
    tokens, mask = pad_batch(ragged_sequences(seed=13), "right")
    res = direct_reward_attribution(model, tokens, mask, level="head", progress=False)
    assert res.head_matrix().shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert len(res.to_dataframe()) == len(res.labels) * len(tokens)
    assert res.plot().data[0].type == "heatmap"
    comp = direct_reward_attribution(model, tokens, mask, progress=False)
    assert comp.plot(k=3).data[0].type == "bar"
    assert list(comp.top(3).columns) == ["component", "mean", "mean_abs"]
    lens = reward_lens(model, tokens, mask, progress=False)
    assert len(lens.plot().data) == len(tokens)


def test_batched_attribution_equals_one_batch():
    model = load_reward_model(make_hf_model("qwen3", gqa=True))
    tokens, mask = pad_batch(ragged_sequences(seed=14, n=7), "right")
    one = direct_reward_attribution(model, tokens, mask, level="neuron", progress=False)
    many = direct_reward_attribution(model, tokens, mask, level="neuron", batch_size=3, progress=False)
    torch.testing.assert_close(one.values, many.values, atol=1e-6, rtol=0)


def test_tuned_lens_starts_at_the_plain_lens_and_fits_better():
    model = load_reward_model(make_hf_model("llama", gqa=True))
    tokens = torch.randint(3, 97, (120, 10), generator=torch.Generator().manual_seed(0))
    untrained = TunedRewardLens.fit(model, tokens, steps=0, progress=False)
    plain = reward_lens(model, tokens[:8], norm="recomputed", progress=False)
    torch.testing.assert_close(untrained.lens(model, tokens[:8], progress=False).rewards, plain.rewards)
    tuned = TunedRewardLens.fit(model, tokens, steps=200, progress=False)
    report = tuned.fit_report
    assert (report.train_r2[:-1] > untrained.fit_report.train_r2[:-1]).all()
    assert report.n_heldout == 30 and torch.allclose(report.heldout_r2[-1], torch.tensor(1.0))
    with pytest.raises(errors.InvalidInputError, match="too few"):
        TunedRewardLens.fit(model, tokens[:3], progress=False)


# ---------------------------------------------------------------------------- planted organism
@pytest.fixture(scope="module")
def planted():
    from tl_reward import organisms

    return organisms.load("planted")


def _planted(circuit: str, kind: str):
    """The planted component of ``circuit`` of this ``kind``, from the documented ground truth."""
    from tl_reward import organisms

    (comp,) = [c for c in organisms.planted_components() if c.circuit == circuit and c.kind == kind]
    return comp


def _units(labels, kind: str) -> list[int]:
    """Rows of single heads (``"L1H2"``) or single neurons (``"L0N7"``), no layer aggregates."""
    letter = "H" if kind == "head" else "N"
    return [i for i, lab in enumerate(labels)
            if lab.startswith("L") and "." not in lab and letter in lab]


@pytest.mark.parametrize("circuit,kind,level", [("trigger", "neuron", "neuron"),
                                                ("quality", "head", "head")])
def test_planted_component_ranks_first_in_direct_attribution(planted, circuit, kind, level):
    """The part that writes along w_r comes first, pair by pair, and carries the margin."""
    model, _, data = planted
    comp = _planted(circuit, kind)
    pairs = data.by_scenario(circuit)
    res = pair_reward_attribution(model, pairs.chosen_texts, pairs.rejected_texts, level=level,
                                  progress=False)
    assert res.top(1)["component"][0] == comp.label
    row = res.labels.index(comp.label)
    # first among every row (layer aggregates included) in every single pair
    assert bool((res.values.abs().argmax(0) == row).all())
    # it carries (at least) most of each pair's margin, with the margin's sign
    assert bool((res.values[row] / res.total > 0.9).all())
    # every other head / neuron is small next to it
    others = [i for i in _units(res.labels, kind) if i != row]
    assert len(others) == (model.cfg.n_layers * (model.cfg.n_heads if kind == "head"
                                                 else model.cfg.d_mlp) - 1)
    assert float((res.values[others].abs().amax(0) / res.values[row].abs()).max()) < 0.1


def test_planted_trigger_head_has_no_direct_effect(planted):
    """L0H0 writes 'trigger seen' into a dimension w_r does not read: direct attribution must
    give it (almost) nothing, although ablating it removes the trigger reward (see patching)."""
    model, _, data = planted
    head, neuron = _planted("trigger", "head"), _planted("trigger", "neuron")
    pairs = data.by_scenario("trigger")
    res = pair_reward_attribution(model, pairs.chosen_texts, pairs.rejected_texts, level="head",
                                  progress=False)
    direct = res.values[res.labels.index(head.label)].abs()
    assert float((direct / res.total.abs()).max()) < 0.01
    # the trigger reward arrives through the planted neuron's layer MLP instead
    mlp = res.values[res.labels.index(f"{neuron.layer}_mlp_out")]
    assert bool((mlp / res.total > 0.9).all())


def test_planted_quality_head_reads_the_quality_words(planted):
    """head_source splits L1H2 by source position: its contribution comes from quality words."""
    from tl_reward.data.synthetic import QUALITY_WORDS

    model, tokenizer, data = planted
    comp = _planted("quality", "head")
    texts = data.by_scenario("quality").chosen_texts[:32]
    tokens, mask = model.pad(model.tokenize(texts))
    res = direct_reward_attribution(model, tokens, mask, level="head_source", progress=False)
    rows = [i for i, lab in enumerate(res.labels) if lab.startswith(f"{comp.label}.src")]
    assert len(rows) == tokens.shape[1]
    per_src = res.values[rows]  # [src, batch]
    quality_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(QUALITY_WORDS)))
    is_quality = torch.isin(tokens, quality_ids).T & mask.T.bool()  # [src, batch]
    assert bool(is_quality.any(0).all())  # every chosen text holds a quality word
    # the largest source of every text is a quality word, and they carry ~all of the head
    assert bool(is_quality.gather(0, per_src.argmax(0)[None]).all())
    share = (per_src * is_quality).sum(0) / per_src.sum(0)
    torch.testing.assert_close(share, torch.ones_like(share), atol=0.05, rtol=0)


@pytest.mark.parametrize("circuit", ["trigger", "quality"])
def test_planted_margin_appears_in_the_layer_of_the_writer(planted, circuit):
    """The reward lens must show each circuit's margin appear in the layer of the component that
    writes along w_r (L1N11 / L1H2), not before: the earlier read-outs are ~0."""
    from tl_reward import organisms

    model, _, data = planted
    writer = max(c.layer for c in organisms.planted_components() if c.circuit == circuit)
    pairs = data.by_scenario(circuit)
    lens = pair_reward_lens(model, pairs.chosen_texts, pairs.rejected_texts, progress=False)
    m = lens.margins  # [read-out, pair]; read-out i is the residual before layer i
    final = m[-1]
    assert bool((final > 0).all())  # (a fourth quality word adds little: margins go down to ~0.05)
    assert float((m[: writer + 1].abs() / final).max()) < 0.1
    assert lens.crystallisation_layer(0.9).tolist() == [writer + 1] * len(pairs)
