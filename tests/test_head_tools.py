"""What each tool does with a nonlinear head: exact lens, integrated gradients with their
completeness, patching against TransformerLens, gate read-outs, and refusals of the tools that
read W_R."""

import pytest
import torch
import transformer_lens.patching as tlp
from helpers import make_hf_model, pad_batch
from test_heads import PATTERN, armorm, grm, sequences
from torch import nn

from tl_reward import (
    activation_patch,
    attribution_patch,
    direct_reward_attribution,
    errors,
    load_reward_model,
    path_patch,
    reward_lens,
)
from tl_reward.causal.gated import gate_patch, gated_outputs
from tl_reward.observational.nonlinear_attribution import head_attribution


def _ref_head(ref, pooled, prompt=None):
    """The reference implementation's head on final-normalised states."""
    if prompt is None:
        return ref.v_head(pooled)[:, 0]
    rewards = ref.regression_layer(pooled)
    return (ref.gating(prompt) * (rewards @ ref.reward_transform_matrix)).sum(1)


@pytest.mark.parametrize("kind", ["mlp", "gated"])
def test_lens_is_the_head_on_each_layers_normalised_residual(kind):
    ref = grm("qwen2") if kind == "mlp" else armorm("gemma2")
    model = load_reward_model(ref, **({"gate_pattern": PATTERN} if kind == "gated" else {}))
    seqs = sequences(7, with_pattern=True)
    tokens, mask = pad_batch(seqs, "left")
    reward = model(tokens, attention_mask=mask)
    cached = reward_lens(model, tokens, mask, progress=False)
    fresh = reward_lens(model, tokens, mask, norm="recomputed", progress=False)
    torch.testing.assert_close(cached.rewards[-1], reward, atol=1e-5, rtol=0)
    # each layer: HF's final norm on that layer's residual, then the reference head
    with torch.no_grad():
        hidden = ref.model(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
    rows = torch.arange(len(seqs))
    pool = torch.full((len(seqs),), tokens.shape[1] - 1)
    gate_at = [ref.gate_position(s) + tokens.shape[1] - len(s) for s in seqs] if kind == "gated" \
        else None
    for layer in range(len(fresh.labels)):
        with torch.no_grad():
            h = hidden.hidden_states[layer]
            h = ref.model.norm(h) if layer < len(fresh.labels) - 1 else h  # the last is normed
            want = _ref_head(ref, h[rows, pool], None if gate_at is None else h[rows, gate_at])
        torch.testing.assert_close(fresh.rewards[layer], want, atol=1e-4, rtol=0)
    assert float((fresh.rewards[0] - fresh.rewards[-1]).abs().max()) > 1e-2  # layers differ


@pytest.mark.parametrize("kind,steps", [("relu", 1), ("gelu", 16), ("gated", 16)])
def test_integrated_gradients_are_complete(kind, steps):
    if kind == "gated":
        ref, kw = armorm("llama"), {"gate_pattern": PATTERN}
    else:
        ref, kw = grm("llama", act=nn.ReLU if kind == "relu" else nn.GELU), {}
    model = load_reward_model(ref, **kw)
    tokens, mask = pad_batch(sequences(8, with_pattern=True), "right")
    reward = model(tokens, attention_mask=mask)
    ig = head_attribution(model, tokens, mask, steps=steps, progress=False)
    torch.testing.assert_close(ig.total, reward, atol=1e-5, rtol=0)
    # IG sums to the reward minus the baseline reward within 1e-4 at `steps` points
    assert float(ig.completeness_gap.abs().max()) < 1e-4
    torch.testing.assert_close(ig.values.sum(0) + ig.bias + ig.completeness_gap, ig.total,
                               atol=1e-5, rtol=0)
    grad = head_attribution(model, tokens, mask, method="gradient", progress=False)
    assert float(grad.completeness_gap.abs().max()) > 1e-3  # the head is not linear


def test_integrated_gradients_equal_a_fine_riemann_sum_of_the_reference_head():
    ref = grm("llama", act=nn.GELU)
    model = load_reward_model(ref)
    tokens, mask = pad_batch(sequences(9)[:2], "left")  # the pooled token is the last
    ig = head_attribution(model, tokens, mask, steps=16, progress=False)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    pooled = cache["reward_head.hook_pooled"]
    comps, _ = cache.decompose_resid(layer=None, mode="all", apply_ln=True, incl_embeds=True,
                                     return_labels=True, pos_slice=-1)
    comps = comps * model.ln_final.w  # [component, batch, d_model]
    n = 4000
    alphas = (torch.arange(n) + 0.5) / n
    path = (alphas[:, None, None] * pooled[None]).reshape(-1, pooled.shape[-1]).requires_grad_()
    (g,) = torch.autograd.grad(_ref_head(ref, path).sum(), path)
    G = g.reshape(n, *pooled.shape).mean(0)
    want = torch.einsum("cbd,bd->cb", comps, G)
    torch.testing.assert_close(ig.values, want.detach(), atol=2e-4, rtol=0)


def test_on_a_linear_head_both_methods_are_the_direct_attribution():
    model = load_reward_model(make_hf_model("llama", True))
    tokens, mask = pad_batch(sequences(10), "left")
    direct = direct_reward_attribution(model, tokens, mask, progress=False)
    for method in ("integrated_gradients", "gradient"):
        a = head_attribution(model, tokens, mask, method=method, steps=2, progress=False)
        torch.testing.assert_close(a.values, direct.values, atol=1e-5, rtol=0)
        assert float(a.completeness_gap.abs().max()) < 1e-5


@pytest.mark.parametrize("kind", ["mlp", "gated"])
def test_activation_patching_of_a_nonlinear_head_equals_transformer_lens(kind):
    if kind == "mlp":
        model = load_reward_model(grm("llama"))
    else:
        model = load_reward_model(armorm("qwen2"), gate_pattern=PATTERN)
    g = torch.Generator().manual_seed(3)
    clean, corrupt = (torch.randint(6, 97, (2, 8), generator=g) for _ in range(2))
    clean[:, 2:4] = corrupt[:, 3:5] = torch.tensor(PATTERN)  # prompt ends at different places
    for hook, per, fn, perm in [("resid_pre", "layer_pos", tlp.get_act_patch_resid_pre, None),
                                ("mlp_out", "layer_pos", tlp.get_act_patch_mlp_out, None),
                                ("z", "head_pos", tlp.get_act_patch_attn_head_out_by_pos,
                                 (0, 2, 1))]:
        ours = activation_patch(model, clean, corrupt, hook=hook, per=per, progress=False)
        for i in range(len(clean)):
            _, clean_cache = model.run_with_cache(clean[i : i + 1])
            with torch.no_grad():
                ref = fn(model, corrupt[i : i + 1], clean_cache, lambda out: out[0])
                base = model(corrupt[i : i + 1])[0]
            ref = ref.permute(*perm) if perm else ref
            # float32 rewards of size ~5: within the 1e-4 the library promises
            torch.testing.assert_close(ours.effects[..., i], ref - base, atol=1e-4, rtol=0)
        assert float(ours.effects.abs().max()) > 1e-2


@pytest.mark.parametrize("kind", ["mlp", "gated"])
def test_attribution_patching_is_the_gradient_of_the_heads_output(kind):
    ref = grm("llama") if kind == "mlp" else armorm("llama")
    model = load_reward_model(ref, **({"gate_pattern": PATTERN} if kind == "gated" else {}))
    seqs = sequences(11, n=2, with_pattern=True)
    clean = torch.tensor([seqs[0][:8], seqs[1][:8]])
    corrupt = clean.clone()
    corrupt[:, -2:] = torch.tensor([[7, 8], [9, 10]])  # the pattern (ids 4, 5) stays
    if kind == "gated":
        clean[:, 2:4] = corrupt[:, 2:4] = torch.tensor(PATTERN)
    atp = attribution_patch(model, clean, corrupt, hooks=("resid_pre",), progress=False)
    est = atp.estimates["resid_pre"]  # [layer, pos, pair]
    name = "blocks.1.hook_resid_pre"
    _, clean_cache = model.run_with_cache(clean, names_filter=name)
    acts = {}

    def keep(act, hook):
        act.retain_grad()
        acts["a"] = act
        return act

    with torch.enable_grad():
        model.run_with_hooks(corrupt, fwd_hooks=[(name, keep)]).sum().backward()
    want = ((clean_cache[name] - acts["a"]) * acts["a"].grad).sum(-1)  # [pair, pos]
    torch.testing.assert_close(est[1], want.T.detach(), atol=1e-5, rtol=0)


def test_gate_read_outs_and_the_gate_as_a_patch():
    ref = armorm("qwen3")
    model = load_reward_model(ref, gate_pattern=PATTERN)
    seqs = sequences(12, with_pattern=True)
    tokens, mask = pad_batch(seqs, "left")
    out = gated_outputs(model, tokens, mask)
    with torch.no_grad():
        truth = [ref(torch.tensor([s])) for s in seqs]
    torch.testing.assert_close(out.objectives, torch.cat([t[1] for t in truth]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.gate, torch.cat([t[2] for t in truth]), atol=1e-4, rtol=0)
    assert out.prompt_end.tolist() == [ref.gate_position(s) + tokens.shape[1] - len(s)
                                       for s in seqs]
    source = tokens.roll(1, 0)
    effect = gate_patch(model, tokens, source, mask, mask.roll(1, 0))
    gate_s = out.gate.roll(1, 0)
    transformed = out.objectives @ model.reward_head.reward_transform_matrix
    want = ((gate_s - out.gate) * transformed).sum(-1)
    torch.testing.assert_close(effect, want, atol=1e-5, rtol=0)
    assert float(effect.abs().max()) > 1e-3


def test_path_patching_runs_on_a_gated_head_through_full_forwards():
    model = load_reward_model(armorm("llama"), gate_pattern=PATTERN)
    seqs = sequences(13, n=2, with_pattern=True)
    n = min(len(s) for s in seqs)
    clean = torch.tensor([s[-n:] for s in seqs])
    clean[:, 1:3] = torch.tensor(PATTERN)
    corrupt = clean.clone()
    corrupt[:, -1] = 9
    result = path_patch(model, clean, corrupt, receiver="reward", progress=False)
    # reference: each head's clean-minus-corrupt output added to the final residual stream of a
    # full corrupt forward (the gate then reads the patched state at the end of the prompt)
    cfg = model.cfg
    _, c_cache = model.run_with_cache(clean)
    base, x_cache = model.run_with_cache(corrupt)
    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    for layer in range(cfg.n_layers):
        z = c_cache[f"blocks.{layer}.attn.hook_z"] - x_cache[f"blocks.{layer}.attn.hook_z"]
        for head in range(cfg.n_heads):
            delta = z[:, :, head] @ model.blocks[layer].attn.W_O[head]
            with torch.no_grad():
                patched = model.run_with_hooks(
                    corrupt, fwd_hooks=[(last, lambda act, hook, d=delta: act + d)])
            torch.testing.assert_close(result.effects[layer, head], patched - base, atol=1e-5,
                                       rtol=0)
    assert float(result.effects.abs().max()) > 1e-3


def test_tools_that_read_the_linear_head_refuse_a_nonlinear_one():
    model = load_reward_model(grm("llama"))
    tokens, mask = pad_batch(sequences(14), "right")
    with pytest.raises(errors.LinearHeadRequiredError, match="head_attribution"):
        direct_reward_attribution(model, tokens, mask, progress=False)
    from tl_reward.observational.tuned_lens import TunedRewardLens

    with pytest.raises(errors.LinearHeadRequiredError):
        TunedRewardLens(model, ("0_pre", "final_post"))
    with pytest.raises(errors.HeadError, match="not gated"):
        gated_outputs(model, tokens, mask)
    with pytest.raises(errors.InvalidInputError, match="method"):
        head_attribution(model, tokens, mask, method="shap")


def test_sae_gradient_attribution_works_through_an_mlp_head_and_direct_refuses():
    from test_sae import random_sae

    from tl_reward import sae as S

    model = load_reward_model(grm("llama"))
    tokens, mask = pad_batch(sequences(15), "right")
    hook = "blocks.1.hook_resid_post"  # a final write: "auto" would be "direct" on a linear head
    sae = random_sae(hook)
    res = S.sae_reward_attribution(model, sae, tokens, mask, progress=False)
    assert res.methods == ("gradient",) and torch.isnan(res.bias)
    store = {}

    def leaf(x, hook):
        store["x"] = x.detach().requires_grad_(True)
        return store["x"]

    reward = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(hook, leaf)])
    (g,) = torch.autograd.grad(reward.sum(), store["x"])
    acts = sae.encode(store["x"].detach()).detach() * mask[..., None]
    expected = torch.einsum("bpf,fd,bpd->fb", acts, sae.W_dec.detach(), g)
    torch.testing.assert_close(res.feature_values(), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(errors.LinearHeadRequiredError, match="method='gradient'"):
        S.sae_reward_attribution(model, sae, tokens, mask, method="direct", progress=False)


def test_cart_interventions_on_an_mlp_head_equal_activation_patching():
    """CART's unit interventions read the model's output: with an MLP head swapped into the
    planted organism, zeroing a neuron equals activation_patch's zero ablation (itself checked
    against transformer_lens.patching above)."""
    from tl_reward import cart, organisms
    from tl_reward.cart.units import intervention_hooks, reward_runner
    from tl_reward.heads import MLPHead

    model, _, _ = organisms.load("planted")
    torch.manual_seed(0)
    model.set_reward_head(MLPHead(model.cfg.d_model, 16, activation="gelu"))
    texts = ["query w001 urgent w002 answer good w003", "query w004 answer w005",
             "query urgent answer w013 helpful"]
    tokens, mask = model.pad(model.tokenize(texts))
    ref = activation_patch(model, tokens, clean_mask=mask, hook="mlp_post", per="neuron",
                           mode="zero", layers=[1], progress=False)
    circuit = cart.Circuit([cart.neuron(1, 11)], position="mean")
    pool = model.pooled_index(tokens, mask)
    with torch.no_grad():
        clean = model(tokens, attention_mask=mask)
        ours = reward_runner(model, tokens, mask, 1)(
            intervention_hooks(model, circuit, pool, mask, values=torch.zeros(1))) - clean
    torch.testing.assert_close(ours, ref.effects[0, 11], atol=1e-5, rtol=1e-5)
    assert float(ours.abs().max()) > 1e-3


# ------------------------------------------------------------------ the gated organism
@pytest.fixture(scope="module")
def gated_organism():
    from tl_reward.organisms import gated as G

    model, _, data = G.load_planted()
    pairs = [p for p in data if p.scenario == "trigger" and G.prompt_has_trigger(p.chosen_text)]
    return model, data, pairs, G


def test_gated_organism_gate_follows_the_planted_prompt_feature(gated_organism):
    model, data, pairs, G = gated_organism
    texts = [t for p in list(data)[:120] for t in (p.chosen_text, p.rejected_text)]
    out = gated_outputs(model, texts)
    truth = torch.tensor([G.prompt_has_trigger(t) for t in texts])
    assert 10 <= int(truth.sum()) < len(texts) - 10  # both kinds of prompt are there
    assert torch.equal(out.top_objective.bool(), truth)
    assert out.objective_names == G.OBJECTIVES
    # `urgent` in the response only: the gate stays on `helpful`
    response_only = [p.chosen_text for p in data if p.scenario == "trigger"
                     and "urgent" in p.chosen_text and not G.prompt_has_trigger(p.chosen_text)]
    assert response_only and not gated_outputs(model, response_only).top_objective.any()


def test_gated_organism_mechanism_recovered_by_patching(gated_organism):
    model, _, pairs, G = gated_organism
    clean = [p.chosen_text for p in pairs[:8]]  # `urgent` in the prompt
    corrupt = [p.rejected_text for p in pairs[:8]]  # the same text without it
    # the gate as a component: the clean gate in the corrupt run flips the score's sign
    effect = gate_patch(model, corrupt, clean)
    base = gated_outputs(model, corrupt).score
    assert bool((effect * base < 0).all()) and bool(((base + effect) * base < 0).all())
    # which head switches it: path patching each head's direct path to the reward
    paths = path_patch(model, clean, corrupt, receiver="reward", progress=False)
    mean = paths.effects.abs().mean(-1)  # [layer, head]
    layer, head = divmod(int(mean.argmax()), mean.shape[1])
    assert f"L{layer}H{head}" == G.GATE_COMPONENT
    assert float(mean.max()) > 10 * float(mean.flatten().sort().values[-2])


# ------------------------------------------------------------------ the process organism
def _solutions(n: int, seed: int) -> list[str]:
    """Solutions of 3-4 steps of filler words; `urgent` replaces one word of a random step in
    three of four."""
    import random

    rng = random.Random(seed)
    texts = []
    for i in range(n):
        steps = [[f"w{rng.randrange(100):03d}" for _ in range(rng.randint(2, 5))]
                 for _ in range(rng.randint(3, 4))]
        if i % 4:
            step = rng.choice(steps)
            step[rng.randrange(len(step))] = "urgent"
        texts.append("query w001 answer " + " <eos> ".join(" ".join(s) for s in steps))
    return texts


def test_process_organism_step_scores_drop_at_the_planted_error():
    from tl_reward.organisms import process as P

    model, _, sep = P.load_planted()
    for text in _solutions(16, 0):
        steps = model.step_rewards(text, sep)
        first = P.first_error_step(text)
        n = len(steps.rewards)
        want = torch.tensor([first is None or i < first for i in range(n)])
        assert torch.equal(steps.rewards > 0.5, want), (text, steps.rewards)
        assert (float(steps.aggregate("min")) > 0.5) == (first is None)


def test_process_organism_error_found_by_lens_and_patching_on_the_step():
    from tl_reward.organisms import process as P
    from tl_reward.process import step_tokens

    model, _, sep = P.load_planted()
    model.set_objective([-1.0, 1.0])  # a step's log-odds
    clean_text = "query w001 answer w010 w011 <eos> w012 urgent w013 <eos> w014 w015"
    corrupt_text = clean_text.replace("urgent", "w016")
    clean, c_mask = step_tokens(model, clean_text, sep)
    corrupt, x_mask = step_tokens(model, corrupt_text, sep)
    # step 1 holds the error: the lens puts the drop after layer 0, where L0H0 writes
    lens = reward_lens(model, clean[1:2], c_mask[1:2], progress=False)
    assert float(lens.rewards[0, 0]) > 1.0 and float(lens.rewards[1, 0]) < -5.0
    paths = path_patch(model, clean[1:2], corrupt[1:2], receiver="reward", progress=False)
    mean = paths.effects.abs().mean(-1)
    layer, head = divmod(int(mean.argmax()), mean.shape[1])
    assert f"L{layer}H{head}" == P.ERROR_COMPONENT
    assert float(mean.max()) > 10 * float(mean.flatten().sort().values[-2])


def test_half_precision_heads_are_read_out_in_float32():
    ref = armorm("llama")
    model = load_reward_model(ref, gate_pattern=PATTERN, dtype=torch.bfloat16)
    tokens, mask = pad_batch(sequences(18, with_pattern=True), "left")
    ig = head_attribution(model, tokens, mask, progress=False)
    assert ig.values.dtype == torch.float32
    assert float(ig.completeness_gap.abs().max()) < 1e-4  # bfloat16 would miss by ~1e-2
    lens = reward_lens(model, tokens, mask, progress=False)
    assert lens.rewards.dtype == torch.float32
    assert model.reward_head.gating.layers[0].weight.dtype == torch.bfloat16  # the model's own
