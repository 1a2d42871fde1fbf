"""head_attribution at head, neuron and head x source level: the same integrated gradient dotted
with a finer split of the head's input, so completeness holds at every level and a layer's heads
(neurons) plus its bias row are that layer's component value; the per-head values against
TransformerLens's own per-head results."""

import pytest
import torch
from helpers import pad_batch
from test_heads import PATTERN, armorm, grm, sequences

from tl_reward import direct_reward_attribution, errors, load_reward_model
from tl_reward.observational.nonlinear_attribution import gate_attribution, head_attribution


def _by_layer(result, layer: int, prefix: str, bias: str):
    rows = [i for i, lab in enumerate(result.labels)
            if lab.startswith(f"L{layer}{prefix}") and lab[len(f"L{layer}{prefix}"):].split(".")[0]
            .isdigit()]
    return result.values[rows].sum(0), result.values[result.labels.index(f"L{layer}.{bias}")]


@pytest.mark.parametrize("kind", ["mlp", "gated"])
def test_every_level_is_complete_and_sums_to_the_component_level(kind):
    ref = grm("qwen2") if kind == "mlp" else armorm("llama")
    model = load_reward_model(ref, **({"gate_pattern": PATTERN} if kind == "gated" else {}))
    tokens, mask = pad_batch(sequences(31, with_pattern=True), "left")
    comp = head_attribution(model, tokens, mask, progress=False)
    for level, prefix, bias, total in (("head", "H", "attn_bias", "attn_out"),
                                       ("neuron", "N", "mlp_bias", "mlp_out")):
        res = head_attribution(model, tokens, mask, level=level, progress=False)
        assert float(res.completeness_gap.abs().max()) < 1e-4
        torch.testing.assert_close(res.total, comp.total)
        for layer in range(model.cfg.n_layers):
            parts, rest = _by_layer(res, layer, prefix, bias)
            want = comp.values[comp.labels.index(f"{layer}_{total}")]
            torch.testing.assert_close(parts + rest, want, atol=1e-5, rtol=1e-5)
            # Llama / Qwen2: no o_proj or MLP output bias, so the parts alone are the layer
            torch.testing.assert_close(rest, torch.zeros_like(rest), atol=1e-5, rtol=0)
            assert float(parts.abs().max()) > 1e-3


def test_head_level_values_equal_transformer_lens_per_head_results_through_the_gradient():
    """gradient x input at head level == (TransformerLens's per-head result, through the final
    norm at its cached scale) . (the gradient of the reference head at the pooled state)."""
    ref = grm("llama")
    model = load_reward_model(ref)
    tokens, mask = pad_batch(sequences(32), "right")
    res = head_attribution(model, tokens, mask, method="gradient", level="head", progress=False)
    pool = model.pooled_index(tokens, mask)
    rows = torch.arange(len(tokens))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
        heads, labels = cache.stack_head_results(layer=-1, return_labels=True)  # [hd, b, p, d]
        heads = heads[:, rows, pool]
        scale = cache["ln_final.hook_scale"][rows, pool]  # [batch, 1]
        h = model.ln_final(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])[rows, pool]
    h = h.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(ref.v_head(h).sum(), h)
    want = torch.einsum("cbd,bd->cb", heads * model.ln_final.w / scale, grad)
    got = torch.stack([res.values[res.labels.index(lab)] for lab in labels])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert float(want.detach().abs().max()) > 1e-2


def test_on_a_linear_head_the_head_level_is_the_direct_attribution():
    from tl_reward import organisms

    model, _, data = organisms.load("planted")
    texts = [p.chosen_text for p in list(data)[:6]]
    ig = head_attribution(model, texts, level="head", progress=False)
    direct = direct_reward_attribution(model, texts, level="head", progress=False)
    assert ig.labels == direct.labels
    torch.testing.assert_close(ig.values, direct.values, atol=1e-4, rtol=1e-4)


def test_gate_attribution_is_complete_and_checked():
    ref = armorm("gemma2")
    model = load_reward_model(ref, gate_pattern=PATTERN)
    tokens, mask = pad_batch(sequences(33, with_pattern=True), "left")
    for k in range(3):
        res = gate_attribution(model, tokens, mask, objective=k, level="head", progress=False)
        with torch.no_grad():
            gate = model.run_with_cache(tokens, attention_mask=mask)[1]["reward_head.hook_gate"]
        torch.testing.assert_close(res.total, gate[:, k], atol=1e-5, rtol=0)
        assert float(res.completeness_gap.abs().max()) < 1e-4
    with pytest.raises(errors.ObjectiveError, match="not one of"):
        gate_attribution(model, tokens, mask, objective="nope", progress=False)
    with pytest.raises(errors.HeadError, match="not gated"):
        gate_attribution(load_reward_model(grm("llama")), tokens, mask, objective=0,
                         progress=False)


@pytest.mark.parametrize("kind", ["grm", "armorm"])
def test_pytorch_bin_checkpoint_directories_of_nonlinear_heads_load(kind, tmp_path):
    """A directory as older checkpoints are: ``pytorch_model.bin`` (a pickled state dict, as
    ``torch.save`` writes it; transformers 5's ``save_pretrained`` writes safetensors only): the
    head's tensors are read with ``torch.load(weights_only=True)`` and give the reference's
    rewards."""
    import json

    if kind == "grm":
        ref, arch, kw = grm("llama"), "GRewardModel", {}
    else:
        ref, arch, kw = armorm("llama"), "LlamaForRewardModelWithGating", {"gate_pattern": PATTERN}
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    assert (tmp_path / "pytorch_model.bin").exists()
    assert not (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = [arch]
    if kind == "armorm":
        config["gating_temperature"] = ref.gating.temperature
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_reward_model(tmp_path, **kw)
    assert model.head_kind == ("mlp" if kind == "grm" else "gated")
    seqs = sequences(34, with_pattern=True)
    tokens, mask = pad_batch(seqs, "left")
    with torch.no_grad():
        if kind == "armorm":
            truth = torch.cat([ref(torch.tensor([s]))[0] for s in seqs])
        else:
            truth = torch.cat([ref(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                               for s in seqs])
        torch.testing.assert_close(model(tokens, attention_mask=mask), truth, atol=1e-4, rtol=0)
