"""SAE feature attribution: splicing, exact direct attribution, gradient attribution, ablation,
training through sae-lens's runner, the planted organism, bad inputs.

References are the model's own forward (rewards with the SAE spliced in), plain TransformerLens
hook runs without any SAE (exact ablations, autograd gradients), and the planted ground truth.
"""

import json

import pytest
import torch
from helpers import make_hf_model, pad_batch, ragged_sequences
from sae_lens import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

from tl_reward import errors, load_reward_model, organisms
from tl_reward import sae as S
from tl_reward.organisms import planted as P

TAIL_N = 60  # trigger pairs used in the planted checks


def random_sae(hook, d_in=64, d_sae=96, arch="standard", seed=0, **cfg):
    """An SAE with random weights and biases large enough that many features fire."""
    torch.manual_seed(seed)
    config = {"standard": StandardSAEConfig, "topk": TopKSAEConfig, "jumprelu": JumpReLUSAEConfig}[arch]
    extra = {"k": 8} if arch == "topk" else {}
    c = config(d_in=d_in, d_sae=d_sae, **extra, **cfg)
    c.metadata.hook_name = hook
    sae = {"standard": StandardSAE, "topk": TopKSAE, "jumprelu": JumpReLUSAE}[arch](c)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        if hasattr(sae, "b_enc"):
            sae.b_enc.normal_(0, 0.5)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.2)
    return sae


@pytest.fixture(scope="module")
def planted():
    model, _, data = organisms.load("planted")
    return model, data


@pytest.fixture(scope="module")
def longtail():
    model, _, data = organisms.load("longtail")
    return model, data


def _tokens(model, texts):
    return model.pad(model.tokenize(list(texts)))


# ------------------------------------------------------------------ splicing
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out",
                                  "blocks.1.hook_resid_post"])
def test_random_sae_with_error_term_leaves_rewards_unchanged(planted, arch, hook):
    model, data = planted
    tokens, mask = _tokens(model, data.chosen_texts[:24])
    sae = random_sae(hook, arch=arch)
    before = model(tokens, attention_mask=mask)
    hooks_before = set(model.hook_dict)
    with S.attach_saes(model, sae) as spliced:
        kept = spliced(tokens, attention_mask=mask)
        _, cache = spliced.run_with_cache(tokens, attention_mask=mask)
    with S.attach_saes(model, sae, use_error_term=False):
        replaced = model(tokens, attention_mask=mask)
    after = model(tokens, attention_mask=mask)
    assert (kept - before).abs().max() < 1e-5
    assert (replaced - before).abs().max() > 1e-3  # the SAE really ran: without error it changes
    assert torch.equal(after, before) and set(model.hook_dict) == hooks_before
    acts = cache[f"{hook}.hook_sae_acts_post"]
    assert acts.shape == (*tokens.shape, sae.cfg.d_sae) and (acts > 0).any()
    assert sae.hook_sae_acts_post.name == "hook_sae_acts_post"  # the SAE's own names are back


def test_random_sae_unchanged_on_longtail_and_hook_z(longtail):
    model, data = longtail
    tokens, mask = _tokens(model, data.chosen_texts[:16])
    before = model(tokens, attention_mask=mask)
    z = random_sae("blocks.0.attn.hook_z", d_in=model.cfg.n_heads * model.cfg.d_head,
                   reshape_activations="hook_z")
    resid = random_sae("blocks.1.hook_resid_pre", d_in=model.cfg.d_model, seed=1)
    with S.attach_saes(model, [z, resid]):
        kept = model(tokens, attention_mask=mask)
    assert (kept - before).abs().max() < 1e-5


# ------------------------------------------------------------------ direct attribution
@pytest.mark.parametrize("name", ["planted", "longtail"])
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post",
                                  "blocks.1.hook_attn_out"])
def test_direct_attribution_adds_up_to_the_reward(name, hook, request):
    model, data = request.getfixturevalue(name)
    tokens, mask = _tokens(model, data.chosen_texts[:20] + data.rejected_texts[:20])
    sae = random_sae(hook, d_in=model.cfg.d_model)
    res = S.sae_reward_attribution(model, sae, tokens, mask, method="direct", progress=False)
    reward = model(tokens, attention_mask=mask)
    assert res.methods == ("direct",)
    assert (res.values.sum(0) + res.bias - reward).abs().max() < 1e-4
    assert res.completeness().abs().max() < 1e-4
    if hook == "blocks.1.hook_resid_post":
        assert res.row("rest").abs().max() < 1e-5  # nothing comes after the final residual


@pytest.mark.parametrize("arch,side", [("gpt2", "left"), ("llama", "right"), ("gemma2", "left")])
def test_direct_attribution_exact_on_tiny_models(arch, side):
    model = load_reward_model(make_hf_model(arch, gqa=arch != "gpt2"))
    tokens, mask = pad_batch(ragged_sequences(seed=3), side)
    res = S.sae_reward_attribution(model, random_sae("blocks.1.hook_resid_post"), tokens, mask,
                                   progress=False)
    reward = model(tokens, attention_mask=mask)
    assert res.methods == ("direct",)  # auto picks direct on the final residual
    assert (res.values.sum(0) + res.bias - reward).abs().max() < 1e-4


def test_direct_feature_equals_removing_its_write_with_the_norm_frozen(planted):
    """Reference: a plain hook run (no SAE) that subtracts a_i * W_dec[i] from the final residual
    at the scoring token, with the final norm's scale held at its clean value."""
    model, data = planted
    hook = "blocks.1.hook_resid_post"
    tokens, mask = _tokens(model, data.chosen_texts[:12])
    sae = random_sae(hook)
    res = S.sae_reward_attribution(model, sae, tokens, mask, progress=False)
    feats = res.feature_values()
    pooled = model.pooled_index(tokens, mask)
    rows = torch.arange(tokens.shape[0])
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    scale = cache["ln_final.hook_scale"]
    acts = sae.encode(cache[hook])[rows, pooled].detach()
    for f in feats.abs().mean(1).argsort(descending=True)[:3].tolist():

        def remove(x, hook, f=f):
            x = x.clone()
            x[rows, pooled] -= acts[:, f, None] * sae.W_dec[f].detach()
            return x

        with torch.no_grad():
            removed = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[
                (hook, remove), ("ln_final.hook_scale", lambda s, hook: scale)])
        torch.testing.assert_close(feats[f], model(tokens, attention_mask=mask) - removed,
                                   atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ gradient attribution
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_gradient_attribution_matches_plain_model_gradient(planted, arch):
    """Reference: dReward/dx from the plain model (no SAE), dotted with each feature's write."""
    model, data = planted
    hook = "blocks.0.hook_resid_post"
    tokens, mask = _tokens(model, data.chosen_texts[:10])
    sae = random_sae(hook, arch=arch)
    res = S.sae_reward_attribution(model, sae, tokens, mask, progress=False)
    assert res.methods == ("gradient",)
    store = {}

    def leaf(x, hook):
        store["x"] = x.detach().requires_grad_(True)
        return store["x"]

    reward = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(hook, leaf)])
    (g,) = torch.autograd.grad(reward.sum(), store["x"])
    x = store["x"].detach()
    acts = sae.encode(x).detach() * mask[..., None]
    expected = torch.einsum("bpf,fd,bpd->fb", acts, sae.W_dec.detach(), g)
    torch.testing.assert_close(res.feature_values(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.totals[0], (x * g).sum((1, 2)), atol=1e-5, rtol=1e-4)
    assert res.completeness().abs().max() < 1e-4
    torch.testing.assert_close(res.reward, reward.detach())


def test_pair_attribution_is_chosen_minus_rejected_and_adds_up_to_the_margin(planted):
    model, data = planted
    trig = data.by_scenario("trigger")[:16]
    sae = random_sae("blocks.1.hook_resid_post")
    pair = S.sae_pair_attribution(model, sae, trig.chosen_texts, trig.rejected_texts, progress=False)
    margin = model.score_pairs(trig.chosen_texts, trig.rejected_texts, progress=False).margin
    assert pair.is_pair and float(pair.bias) == 0.0
    assert (pair.values.sum(0) - margin).abs().max() < 1e-4
    both = S.sae_reward_attribution(model, [sae, random_sae("blocks.0.hook_resid_post", seed=2)],
                                    trig.chosen_texts, progress=False)
    assert both.sae_hooks == ("blocks.1.hook_resid_post", "blocks.0.hook_resid_post")
    assert both.methods == ("direct", "gradient")
    assert both.completeness().abs().max() < 1e-4


# ------------------------------------------------------------------ ablation
def test_ablation_equals_plain_hook_runs(planted):
    """Reference: the plain model with a_i * W_dec[i] subtracted at every position (zero) or
    (a_src - a_tgt) * W_dec[i] added (patch), written with TransformerLens hooks."""
    model, data = planted
    hook = "blocks.0.hook_resid_post"
    trig = data.by_scenario("trigger")[:8]
    tokens, mask = _tokens(model, trig.rejected_texts)
    source, s_mask = _tokens(model, trig.chosen_texts)
    sae = random_sae(hook)
    feats = [3, 17, 40]
    zero = S.sae_feature_ablation(model, sae, tokens, mask, features=feats, batch_size=8,
                                  progress=False)
    patch = S.sae_feature_ablation(model, sae, tokens, mask, features=feats, mode="patch",
                                   source=source, source_mask=s_mask, progress=False)
    clean = model(tokens, attention_mask=mask)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    _, s_cache = model.run_with_cache(source, attention_mask=s_mask)
    acts = sae.encode(cache[hook]).detach()
    s_acts = sae.encode(s_cache[hook]).detach()
    assert tokens.shape == source.shape  # trigger pairs differ by one word: same positions
    for i, f in enumerate(feats):
        for res, delta in ((zero, -acts[..., f]), (patch, s_acts[..., f] - acts[..., f])):

            def edit(x, hook, delta=delta, f=f):
                return x + delta[..., None] * sae.W_dec[f].detach()

            with torch.no_grad():
                ref = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(hook, edit)])
            torch.testing.assert_close(res.effects[i], ref - clean, atol=2e-5, rtol=1e-4)
    table = zero.agreement()
    assert list(table.feature) == feats and table.measured.notna().all()


# ------------------------------------------------------------------ training + planted ground truth
@pytest.fixture(scope="module")
def planted_sae(planted, tmp_path_factory):
    model, data = planted
    out = tmp_path_factory.mktemp("sae") / "planted_final"
    sae = S.train_sae(model, data, "blocks.1.hook_resid_post", d_sae=128, output_path=out,
                      progress=False)
    return sae, out


@pytest.fixture(scope="module")
def trigger(planted, planted_sae):
    """Margin attributions on the trigger (tail) pairs, direct and integrated, and the feature
    that ranks first in the direct one."""
    model, data = planted
    sae, _ = planted_sae
    trig = data.by_scenario("trigger")[:TAIL_N]
    attr = S.sae_pair_attribution(model, sae, trig.chosen_texts, trig.rejected_texts,
                                  progress=False)
    integrated = S.sae_pair_attribution(model, sae, trig.chosen_texts, trig.rejected_texts,
                                        method="integrated", steps=8, progress=False)
    return trig, attr, integrated, int(attr.top(1).feature[0])


def test_training_saves_sae_lens_files_with_metadata(planted, planted_sae):
    model, _ = planted
    sae, out = planted_sae
    assert type(sae).__name__ == "StandardSAE"
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "runner_cfg.json"):
        assert (out / name).exists(), name
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["model_class_name"] == "HookedRewardModel" and meta["exclude_special_tokens"] == [
        model.pad_token_id]
    assert meta["tl_reward"]["n_texts"] == 800 and meta["l0"] > 0
    again = S.load_sae(out, model)
    assert torch.equal(again.W_dec, sae.W_dec) and again.cfg.metadata.hook_name == meta["hook_name"]


def test_planted_trigger_feature_is_found_and_ranks_first(planted, planted_sae, trigger):
    """The feature first in margin attribution on the trigger (tail) pairs is the trigger
    circuit's write: it fires on every text with the trigger and on no other text, and its
    decoder row points where the planted neuron L1N11 writes (w_r, residual dim 6)."""
    model, data = planted
    sae, _ = planted_sae
    trig, attr, integrated, f = trigger
    assert attr.rank(f) == 1 and attr.methods == ("direct",) and integrated.rank(f) == 1
    assert attr.feature_values()[f].mean() > 0.8 * attr.reward.mean()  # it carries the margin
    on = S.sae_dataset_features(model, sae, trig, progress=False)
    off = S.sae_dataset_features(model, sae, data.by_scenario("quality")[:TAIL_N], progress=False)
    assert on.chosen_max[f].gt(0).all() and on.rejected_max[f].eq(0).all()
    assert off.chosen_max[f].eq(0).all() and off.rejected_max[f].eq(0).all()
    layer, neuron = P.TRIGGER_NEURON
    w_out = model.blocks[layer].mlp.W_out[neuron].detach()
    assert torch.cosine_similarity(sae.W_dec[f].detach(), w_out, dim=0) > 0.9


def test_planted_ablation_agreement_is_reported(planted, planted_sae, trigger):
    """Each attribution against its own intervention; the sizes are measured, not assumed.
    Direct (final norm frozen) against zeroing the feature on both sides; integrated gradients
    against patching the chosen run's activation of the feature into the rejected run."""
    model, _ = planted
    sae, _ = planted_sae
    trig, attr, integrated, f = trigger
    abl = S.sae_pair_feature_ablation(model, sae, trig.chosen_texts, trig.rejected_texts,
                                      features=[f], progress=False)
    assert abl.method == "direct" and abl.is_pair
    torch.testing.assert_close(abl.predicted[0], -attr.feature_values()[f])
    direct = abl.agreement().iloc[0]
    assert direct.measured < 0 and direct.predicted < 0
    patch = S.sae_feature_ablation(model, sae, trig.rejected_texts, features=[f], mode="patch",
                                   source=trig.chosen_texts, progress=False)
    ig = patch.agreement(predicted=integrated.feature_values()[[f]]).iloc[0]
    assert ig.measured > 0 and ig.predicted > 0
    with pytest.raises(errors.InvalidInputError, match="shape"):
        patch.agreement(predicted=integrated.feature_values()[:2])


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_other_architectures_train_through_the_runner(planted, arch):
    model, data = planted
    sae = S.train_sae(model, data.chosen_texts[:50], "blocks.0.hook_resid_post", architecture=arch,
                      d_sae=32, training_tokens=1024, batch_size_tokens=256, progress=False)
    assert type(sae).__name__ == {"topk": "TopKSAE", "jumprelu": "JumpReLUSAE"}[arch]
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    tokens, mask = _tokens(model, data.chosen_texts[:8])
    with S.attach_saes(model, sae):
        kept = model(tokens, attention_mask=mask)
    assert (kept - model(tokens, attention_mask=mask)).abs().max() < 1e-5


# ------------------------------------------------------------------ dataset views and plots
def test_dataset_views_and_plots(planted, planted_sae, trigger):
    model, data = planted
    sae, _ = planted_sae
    sub = data[:80]  # both scenarios
    summary = S.sae_dataset_features(model, sae, sub, progress=False)
    f = trigger[-1]
    specific = summary.scenario_features("trigger", k=3)
    assert f in specific.feature.tolist()
    assert (specific.fire_rate_in > specific.fire_rate_out).all()
    assert int(summary.top_features(1, scenario="trigger").feature[0]) == f
    examples = summary.top_examples(f, k=3)
    assert all("chosen (trigger)" in label for label in examples.labels)
    frame = examples.to_dataframe()
    top_tokens = frame.loc[frame.groupby("text").activation.idxmax(), "token"]
    assert set(top_tokens) == {"<eos>"}  # the scoring token carries the trigger signal
    assert "urgent" in examples.to_html()
    assert len(summary.to_dataframe()) == sae.cfg.d_sae
    res = S.sae_reward_attribution(model, sae, sub.chosen_texts[:8], progress=False)
    frame = res.to_dataframe()
    assert len(frame) == len(res.labels) * 8 and set(frame.kind) == {
        "feature", "error", "decoder_bias", "rest"}
    abl = S.sae_feature_ablation(model, sae, sub.chosen_texts[:8], features=[f], progress=False)
    assert len(abl.to_dataframe()) == 8
    for fig in (res.plot(5), summary.plot(5), examples.plot(), abl.plot()):
        assert fig.data


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs(planted):
    model, data = planted
    texts = data.chosen_texts[:4]
    good = random_sae("blocks.0.hook_resid_post")
    with pytest.raises(S.NotAnSAEError, match="not a sae_lens SAE"):
        S.sae_reward_attribution(model, object(), texts)
    with pytest.raises(TypeError):
        S.attach_saes(model, "sae").__enter__()
    no_hook = random_sae(None)
    with pytest.raises(S.SAEMismatchError, match="hook_name"):
        S.sae_reward_attribution(model, no_hook, texts)
    with pytest.raises(errors.HookNameError, match="blocks.0.hook_resid_post"):
        S.sae_reward_attribution(model, random_sae("blocks.0.hook_resid_pots"), texts)
    with pytest.raises(S.SAEMismatchError, match="d_in=32"):
        S.sae_reward_attribution(model, random_sae("blocks.0.hook_resid_post", d_in=32), texts)
    with pytest.raises(S.SAEMismatchError, match="float64"):
        S.sae_reward_attribution(model, good.to(dtype=torch.float64), texts)
    good = random_sae("blocks.0.hook_resid_post")
    with pytest.raises(errors.InvalidInputError, match="method"):
        S.sae_reward_attribution(model, good, texts, method="exact")
    z = random_sae("blocks.0.attn.hook_z", reshape_activations="hook_z")
    with pytest.raises(errors.InvalidInputError, match="residual stream"):
        S.sae_reward_attribution(model, z, texts, method="direct")
    with pytest.raises(errors.InvalidInputError, match="same hook"):
        S.sae_reward_attribution(model, [good, random_sae("blocks.0.hook_resid_post")], texts)
    with pytest.raises(errors.InvalidInputError, match="pairs must match"):
        S.sae_pair_attribution(model, good, texts, texts[:3])
    with pytest.raises(errors.InvalidInputError, match=r"features \[96\]"):
        S.sae_feature_ablation(model, good, texts, features=[0, 96])
    with pytest.raises(errors.InvalidInputError, match="source="):
        S.sae_feature_ablation(model, good, texts, features=[0], mode="patch")
    with pytest.raises(errors.InvalidInputError, match="mode"):
        S.sae_feature_ablation(model, good, texts, features=[0], mode="mean")
    with pytest.raises(errors.ModelSourceError, match="cfg.json"):
        S.load_sae("/nonexistent/sae_dir")
    with pytest.raises(errors.InvalidInputError, match="position axis"):
        S.train_sae(model, texts, "reward_head.hook_pooled")
    with pytest.raises(errors.InvalidInputError, match="scenario"):
        S.sae_dataset_features(model, good, data[:4], progress=False).top_features(scenario="tial")
    assert issubclass(S.SAEMismatchError, errors.TLRewardError)
    assert issubclass(S.NotAnSAEError, TypeError)


def test_multi_objective_head_needs_an_objective():
    model = load_reward_model(make_hf_model("llama", num_labels=3))
    tokens, mask = pad_batch(ragged_sequences(seed=4), "right")
    with pytest.raises(errors.ObjectiveError, match="set_objective"):
        S.sae_reward_attribution(model, random_sae("blocks.1.hook_resid_post"), tokens, mask)
    model.set_objective(1)
    res = S.sae_reward_attribution(model, random_sae("blocks.1.hook_resid_post"), tokens, mask,
                                   progress=False)
    assert (res.values.sum(0) + res.bias - model(tokens, attention_mask=mask)).abs().max() < 1e-4


# ------------------------------------------------------------------ integrated gradients (pairs)
def test_integrated_gradients_match_a_plain_model_path_integral(planted):
    """Reference: the straight path from the rejected to the chosen activation at the hook, run
    on the plain model (no SAE), gradient at each midpoint dotted with each feature's change."""
    model, data = planted
    hook, steps = "blocks.0.hook_resid_post", 4
    trig = data.by_scenario("trigger")[:6]
    chosen, c_mask = _tokens(model, trig.chosen_texts)
    rejected, r_mask = _tokens(model, trig.rejected_texts)
    assert chosen.shape == rejected.shape  # one word replaced: positions line up
    sae = random_sae(hook)
    res = S.sae_pair_attribution(model, sae, chosen, rejected, c_mask, r_mask,
                                 method="integrated", steps=steps, progress=False)
    _, c_cache = model.run_with_cache(chosen, attention_mask=c_mask)
    _, r_cache = model.run_with_cache(rejected, attention_mask=r_mask)
    x_c, x_r = c_cache[hook], r_cache[hook]
    d_acts = (sae.encode(x_c) - sae.encode(x_r)).detach() * c_mask[..., None]
    grads = []
    for k in range(steps):
        x = (x_r + (k + 0.5) / steps * (x_c - x_r)).detach().requires_grad_(True)
        reward = model.run_with_hooks(rejected, attention_mask=r_mask,
                                      fwd_hooks=[(hook, lambda act, hook, x=x: x)])
        grads.append(torch.autograd.grad(reward.sum(), x)[0])
    g = torch.stack(grads).mean(0)
    expected = torch.einsum("bpf,fd,bpd->fb", d_acts, sae.W_dec.detach(), g)
    torch.testing.assert_close(res.feature_values(), expected, atol=2e-5, rtol=1e-4)
    margin = model(chosen, attention_mask=c_mask) - model(rejected, attention_mask=r_mask)
    assert res.row("rest").abs().max() < 1e-5  # a full residual patch is the chosen run
    torch.testing.assert_close(res.totals[0], margin.detach())
    fine = S.sae_pair_attribution(model, sae, chosen, rejected, c_mask, r_mask,
                                  method="integrated", steps=32, progress=False)
    assert fine.completeness().abs().max() < res.completeness().abs().max() + 1e-6
    assert fine.completeness().abs().max() < 0.05 * margin.abs().max()


def test_integrated_rest_is_what_the_hook_does_not_carry(planted):
    model, data = planted
    hook = "blocks.0.hook_mlp_out"
    pairs = data.by_scenario("quality")[:5]
    sae = random_sae(hook)
    res = S.sae_pair_attribution(model, sae, pairs.chosen_texts, pairs.rejected_texts,
                                 method="integrated", steps=2, progress=False)
    chosen, c_mask = _tokens(model, pairs.chosen_texts)
    rejected, r_mask = _tokens(model, pairs.rejected_texts)
    _, c_cache = model.run_with_cache(chosen, attention_mask=c_mask)
    with torch.no_grad():
        patched = model.run_with_hooks(rejected, attention_mask=r_mask, fwd_hooks=[
            (hook, lambda act, hook: c_cache[hook.name])])
    torch.testing.assert_close(res.row("rest"), model(chosen, attention_mask=c_mask) - patched,
                               atol=2e-5, rtol=1e-4)
