"""The trained head organisms (shipped weights): a gated ArmoRM-layout model whose gate switches
objective on ``urgent`` in the prompt, and a PRM whose step score drops at the ``error`` token.
The planted mechanism is recovered from the trained weights by read-outs, lens, attribution and
patching; organism.json's accuracies are what the shipped weights measure."""

import json

import pytest
import torch

from tl_reward import activation_patch, head_attribution, path_patch, reward_lens
from tl_reward.causal.gated import gated_outputs


# ------------------------------------------------------------------ gated
@pytest.fixture(scope="module")
def gated():
    from tl_reward.organisms import gated as G

    model, _, pairs = G.load()
    return model, pairs, G


def _minimal_pairs(G, model, n: int = 8):
    """Texts with `urgent` in the prompt, and the same texts with a filler in its place, whose
    scores differ by more than 0.5 (so that normalised effects are well defined)."""
    texts = [t for t in G.sample_texts(80, 5) if G.prompt_has_trigger(t)]
    corrupt = [t.replace("urgent", "w001", 1) for t in texts]
    gap = gated_outputs(model, texts).score - gated_outputs(model, corrupt).score
    keep = (gap.abs() > 0.5).nonzero().flatten()[:n].tolist()
    assert len(keep) == n
    return [texts[i] for i in keep], [corrupt[i] for i in keep]


def test_trained_gated_organism_is_an_armorm_checkpoint_with_its_measured_accuracies(gated):
    model, pairs, G = gated
    config = json.loads((G.DIRECTORY / "config.json").read_text())
    assert config["architectures"] == ["LlamaForRewardModelWithGating"]
    assert model.head_kind == "gated" and model.reward_head.objective_names == G.OBJECTIVES
    assert (G.DIRECTORY / "model.safetensors").stat().st_size < 1_000_000
    measured, stored = G.evaluate(model), G.info()["accuracy"]
    assert measured["gate_accuracy"] == stored["gate_accuracy"] == 1.0
    assert measured["pair_accuracy"] == stored["pair_accuracy"] == 1.0
    assert measured["objective_mae"] == pytest.approx(stored["objective_mae"], abs=1e-5)


def test_trained_gated_organism_gate_follows_the_planted_prompt_feature(gated):
    model, _, G = gated
    texts = G.sample_texts(400, 11)
    out = gated_outputs(model, texts)
    truth = torch.tensor([G.prompt_has_trigger(t) for t in texts])
    assert 100 < int(truth.sum()) < 300
    assert torch.equal(out.top_objective.bool(), truth)
    # `urgent` after the response mark: the gate, which reads `answer`, does not move
    plain = [t for t in texts if not G.prompt_has_trigger(t)][:20]
    moved = [t.replace("answer w", "answer urgent w", 1) for t in plain]
    torch.testing.assert_close(gated_outputs(model, moved).gate,
                               gated_outputs(model, plain).gate, atol=1e-6, rtol=0)


def test_trained_gated_organism_switch_found_by_patching_lens_and_ablation(gated):
    model, pairs, G = gated
    clean, corrupt = _minimal_pairs(G, model)
    urgent = model.to_single_token("urgent")
    tokens = model.to_tokens(clean)
    at = (tokens == urgent).int().argmax(1)
    gate_at = model.prompt_end_index(tokens, None)
    # residual patching (clean into corrupt): at layer 0 the urgent token carries all of it,
    # at layer 1 the end of the prompt, where the gate reads
    res = activation_patch(model, clean, corrupt, hook="resid_pre", progress=False)
    rows = torch.arange(len(clean))
    norm = res.normalized  # [layer, pos, pair]
    torch.testing.assert_close(norm[0, at, rows], torch.ones(len(clean)), atol=1e-3, rtol=0)
    others = norm[0].clone()
    others[at, rows] = 0
    assert float(others.abs().max()) < 1e-3
    assert torch.equal(norm[1, :-1].abs().argmax(0), gate_at)  # before the scoring token
    # the gate as a component: the clean gate in the corrupt run moves the score the same way
    from tl_reward.causal.gated import gate_patch

    gap = gated_outputs(model, clean).score - gated_outputs(model, corrupt).score
    assert bool((gate_patch(model, corrupt, clean) * gap > 0).all())
    # the lens: only the embeddings (layer 0) cannot tell the prompts apart; after layer 0 the
    # lens ranks every held-out pair as the model does
    chosen = reward_lens(model, [p[0] for p in pairs[:100]], progress=False).rewards
    rejected = reward_lens(model, [p[1] for p in pairs[:100]], progress=False).rewards
    acc = ((chosen - rejected) > 0).float().mean(-1)
    assert float(acc[0]) < 0.85 and bool((acc[1:] == 1).all())
    # path patching names one head; zero-ablating it turns the gate back to `helpful`
    paths = path_patch(model, clean, corrupt, receiver="reward", progress=False)
    mean = paths.effects.abs().mean(-1)
    layer, head = divmod(int(mean.argmax()), mean.shape[1])
    assert layer == 0 and float(mean.max()) > 5 * float(mean.flatten().sort().values[-2])

    def ablate(z, hook, h=head):
        z[:, :, h] = 0.0
        return z

    with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)]):
        assert not gated_outputs(model, clean).top_objective.any()


# ------------------------------------------------------------------ process
@pytest.fixture(scope="module")
def process():
    from tl_reward.organisms import process as P

    model, _, sep = P.load()
    return model, sep, P


def _first_error(P, text):
    return P.first_error_step(text, P.ERROR, P.STEP_SEPARATOR)


def test_trained_process_organism_is_a_prm_checkpoint_with_its_measured_accuracies(process):
    model, sep, P = process
    config = json.loads((P.DIRECTORY / "config.json").read_text())
    assert config["architectures"] == ["LlamaForProcessRewardModel"]
    assert model.head_kind == "mlp" and model.label_names == P.LABELS
    assert model.reward_head.summary[0].out_features == model.cfg.d_model  # Linear(h, h)
    assert (P.DIRECTORY / "model.safetensors").stat().st_size < 1_000_000
    stored = P.info()["accuracy"]
    assert P.evaluate(model) == stored and stored["solution_accuracy"] == 1.0
    # the batched evaluation reads what step_rewards reads
    text = P.sample_solutions(2, P.EVAL_SEED)[1]
    tokens, mask = model.pad(model.tokenize([text, text + " w001 w002"]))
    with torch.no_grad():
        per_pos = model(tokens, attention_mask=mask, return_type="per_position").softmax(-1)
    torch.testing.assert_close(per_pos[0, tokens[0] == sep, 1],
                               model.step_rewards(text, sep).rewards, atol=1e-6, rtol=0)


def test_trained_process_organism_step_scores_drop_at_the_planted_error(process):
    model, sep, P = process
    for text in P.sample_solutions(12, 3):
        steps = model.step_rewards(text, sep)
        first = _first_error(P, text)
        want = torch.tensor([first is None or i < first for i in range(len(steps.rewards))])
        assert torch.equal(steps.rewards > 0.5, want), (text, steps.rewards)
        assert (float(steps.aggregate("min")) > 0.5) == (first is None)


def test_trained_process_organism_error_found_by_lens_attribution_and_patching(process):
    from tl_reward.process import step_tokens

    model, sep, P = process
    texts = [t for t in P.sample_solutions(40, 9) if _first_error(P, t) is not None][:8]
    error = model.to_single_token(P.ERROR)
    cut_e, cut_c = [], []
    for text in texts:  # the step holding the error, and the same step without it
        k = _first_error(P, text)
        for cuts, t in ((cut_e, text), (cut_c, text.replace(P.ERROR, "w001"))):
            tokens, mask = step_tokens(model, t, sep)
            cuts.append(tokens[k, : int(mask[k].sum())].tolist())
    e_tok, e_mask = model.pad(cut_e)
    c_tok, c_mask = model.pad(cut_c)
    model.set_objective([-1.0, 1.0])  # the step's log-odds
    try:
        with torch.no_grad():
            e_rew = model(e_tok, attention_mask=e_mask)
            c_rew = model(c_tok, attention_mask=c_mask)
        assert bool((e_rew < 0).all()) and bool((c_rew > 0).all())
        # lens: the drop appears once layer 0 has run (its attention can move the token)
        lens = reward_lens(model, e_tok, e_mask, progress=False)
        assert bool((lens.rewards[0] > -1).all()) and bool((lens.rewards[1] < -5).all())
        # attribution (integrated gradients): layer 0's attention holds most of the drop
        a = head_attribution(model, e_tok, e_mask, progress=False)
        b = head_attribution(model, c_tok, c_mask, progress=False)
        assert float(torch.cat([a.completeness_gap, b.completeness_gap]).abs().max()) < 1e-4
        diff = (a.values - b.values).mean(-1)
        assert a.labels[int(diff.argmin())] == "0_attn_out"
        assert float(diff.min()) < 0.5 * float((e_rew - c_rew).mean())
        # patching the residual at layer 0: the error token's position carries all of it
        res = activation_patch(model, e_tok, c_tok, clean_mask=e_mask, corrupt_mask=c_mask,
                               hook="resid_pre", layers=[0], progress=False)
        n_pos = e_tok.shape[1]
        at = torch.tensor([(torch.tensor(c) == error).nonzero().item() - len(c) + n_pos
                           for c in cut_e])  # align_end: positions counted from the end
        rows = torch.arange(len(texts))
        torch.testing.assert_close(res.normalized[0, at, rows], torch.ones(len(texts)),
                                   atol=1e-3, rtol=0)
    finally:
        model.set_objective(None)


# ------------------------------------------------------------------ rebuilding
@pytest.mark.slow
@pytest.mark.parametrize("name", ["gated", "process"])
def test_rebuilding_a_head_organism_reproduces_the_shipped_weights(name, tmp_path):
    """Training is seeded: one CPU thread (the builder's default) gives the shipped tensors bit
    for bit (another thread count changes float summation order)."""
    import importlib

    from safetensors.torch import load_file

    module = importlib.import_module(f"tl_reward.organisms.{name}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        meta = module.build(tmp_path / name)
    finally:
        torch.set_num_threads(threads)
    new = load_file(str(tmp_path / name / "model.safetensors"))
    old = load_file(str(module.DIRECTORY / "model.safetensors"))
    assert new.keys() == old.keys()
    for key in old:
        assert torch.equal(new[key], old[key]), key
    assert meta["accuracy"] == module.info()["accuracy"]


def test_trained_gated_organism_gate_attributed_to_the_urgent_token_and_its_head(gated):
    """Which input switched `cautious` on: the gate weight's integrated gradients put it on the
    head path patching names, and that head's share on the `urgent` token it attends to."""
    from tl_reward.observational.nonlinear_attribution import gate_attribution

    model, _, G = gated
    clean, _ = _minimal_pairs(G, model)
    heads = gate_attribution(model, clean, objective="cautious", level="head", progress=False)
    assert float(heads.completeness_gap.abs().max()) < 1e-4
    assert bool((heads.total > 0.99).all())
    mean = heads.values.mean(-1)
    top = heads.labels[int(mean.abs().argmax())]
    assert top == "L0H0" and float(mean.max()) > 5 * float(mean.abs().sort().values[-2])
    src = gate_attribution(model, clean, objective="cautious", level="head_source",
                           progress=False)
    mine = [i for i, lab in enumerate(src.labels) if lab.startswith(f"{top}.src")]
    at = (model.to_tokens(clean) == model.to_single_token("urgent")).int().argmax(1)
    assert torch.equal(src.values[mine].argmax(0), at)
