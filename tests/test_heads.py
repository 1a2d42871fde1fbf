"""Nonlinear reward heads (MLP, gated, custom) against reference implementations of the
published code on the HF trunk, and what each tool does with them."""

import pytest
import torch
from head_references import ArmoRMReference, GRMReference, randomized
from helpers import VOCAB, make_config, pad_batch
from torch import nn

from tl_reward import errors, load_reward_model
from tl_reward.heads import HEAD_KINDS, GatedHead, MLPHead

TOL = 1e-4
ARCHS = ["llama", "qwen2", "qwen3", "gemma2"]
PATTERN = [4, 5]  # the "end of prompt" tokens of the tiny gated models


def sequences(seed: int, n: int = 5, with_pattern: bool = False) -> list[list[int]]:
    """Ragged sequences of ids 6.. (no pad id, no pattern token unless inserted)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n):
        length = int(torch.randint(5, 13, (1,), generator=gen))
        seq = torch.randint(6, VOCAB, (length,), generator=gen).tolist()
        if with_pattern:
            cut = int(torch.randint(1, length - 2, (1,), generator=gen))
            seq = seq[:cut] + PATTERN + seq[cut:]
        seqs.append(seq)
    return seqs


def grm(arch: str, seed: int = 0, **kw) -> GRMReference:
    return randomized(GRMReference(make_config(arch), **kw), seed)


def armorm(arch: str, seed: int = 0, **kw) -> ArmoRMReference:
    return randomized(ArmoRMReference(make_config(arch), PATTERN, **kw), seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_head_matches_the_grm_reference(arch):
    ref = grm(arch, n_layers=1 if arch != "qwen3" else 2)
    model = load_reward_model(ref)
    assert model.head_kind == "mlp"
    seqs = sequences(1)
    for side in ("left", "right"):
        tokens, mask = pad_batch(seqs, side)
        with torch.no_grad():
            truth = ref(tokens, mask)
            alone = torch.cat([ref(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                               for s in seqs])
            ours = model(tokens, attention_mask=mask)
        torch.testing.assert_close(truth, alone, atol=TOL, rtol=0)  # the reference agrees with itself
        torch.testing.assert_close(ours, truth, atol=TOL, rtol=0, msg=side)
    assert float(truth.std()) > 0.05  # rewards vary: the comparison means something


@pytest.mark.parametrize("arch", ARCHS)
def test_gated_head_matches_the_armorm_reference(arch):
    ref = armorm(arch)
    model = load_reward_model(ref, gate_pattern=PATTERN)
    assert model.head_kind == "gated"
    seqs = sequences(2, with_pattern=True)
    with torch.no_grad():
        outs = [ref(torch.tensor([s])) for s in seqs]
    score, objectives, gate = (torch.cat(x) for x in zip(*outs, strict=True))
    for side in ("left", "right"):
        tokens, mask = pad_batch(seqs, side)
        with torch.no_grad():
            ours, cache = model.run_with_cache(tokens, attention_mask=mask)
        torch.testing.assert_close(ours, score, atol=TOL, rtol=0, msg=side)
        torch.testing.assert_close(cache["reward_head.hook_objectives"], objectives, atol=TOL,
                                   rtol=0, msg=side)
        torch.testing.assert_close(cache["reward_head.hook_gate"], gate, atol=TOL, rtol=0, msg=side)
    assert float(gate.std(0).max()) > 0.01  # the gate depends on the prompt


def test_user_head_and_hooks():
    ref = grm("llama")
    seqs = sequences(3)
    tokens, mask = pad_batch(seqs, "right")
    head = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 2))
    model = load_reward_model(ref.model, head=head)  # the trunk alone and a plain module
    assert model.head_kind == "custom" and model.n_rewards == 2
    with torch.no_grad():
        hidden = ref.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        truth = head(hidden[torch.arange(len(seqs)), mask.sum(-1) - 1])
        ours, cache = model.run_with_cache(tokens, attention_mask=mask)
    torch.testing.assert_close(ours, truth, atol=TOL, rtol=0)
    torch.testing.assert_close(cache["reward_head.hook_reward"], truth, atol=TOL, rtol=0)
    # every intermediate of an MLP head is a hook point
    mlp = load_reward_model(ref)
    _, cache = mlp.run_with_cache(tokens, attention_mask=mask)
    assert cache["reward_head.hook_hidden"].shape == (len(seqs), 24)
    assert cache["reward_head.hook_pooled"].shape == (len(seqs), 64)
    assert set(HEAD_KINDS) == {"linear", "mlp", "gated", "custom"}


def test_per_position_and_fast_pooling_agree_with_the_full_forward():
    ref = grm("qwen2")
    model = load_reward_model(ref)
    tokens, mask = pad_batch(sequences(4), "left")
    with torch.no_grad():
        fast = model(tokens, attention_mask=mask)
        model.fast_pooling = False
        full = model(tokens, attention_mask=mask)
        per_pos = model(tokens, attention_mask=mask, return_type="per_position")
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_pos[:, -1], full, atol=1e-5, rtol=0)


def test_head_refusals():
    ref = grm("llama")
    with pytest.raises(errors.UnsupportedConfigError, match="fold_ln=False"):
        load_reward_model(ref, fold_ln=True)
    model = load_reward_model(ref)
    with pytest.raises(errors.UnsupportedConfigError, match="fold_ln=False"):
        model.process_weights_(fold_ln=True)  # after loading, too
    with pytest.raises(errors.LinearHeadRequiredError, match="reward_lens"):
        _ = model.W_R
    with pytest.raises(errors.LinearHeadRequiredError):
        _ = model.reward_direction
    with pytest.raises(errors.HeadError, match="gate_pattern"):
        load_reward_model(armorm("llama"))
    with pytest.raises(errors.HeadError, match=r"\[batch, n_rewards\]"):
        load_reward_model(ref.model, head=_BadHead())
    gated = load_reward_model(armorm("llama"), gate_pattern=PATTERN)
    tokens, mask = pad_batch(sequences(5), "right")  # no pattern in these
    with pytest.raises(errors.InvalidInputError, match="gate pattern"):
        gated(tokens, attention_mask=mask)


class _BadHead(nn.Module):
    def forward(self, x):
        return x[:, :, None]


def test_published_layouts_round_trip():
    ref = grm("llama", n_layers=2)
    head = MLPHead.from_state_dict({f"v_head.{k}": v for k, v in ref.v_head.state_dict().items()},
                                   prefix="v_head.summary.")
    x = torch.randn(3, 64)
    torch.testing.assert_close(head.compute(x, None), ref.v_head(x), atol=1e-6, rtol=0)
    arm = armorm("llama")
    gated = GatedHead.from_state_dict(arm.state_dict(), PATTERN, temperature=0.7)
    y = torch.randn(3, 64)
    score = (arm.gating(y) * (arm.regression_layer(x) @ arm.reward_transform_matrix)).sum(1)
    torch.testing.assert_close(gated.compute(x, None, y)[:, 0], score, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_step_rewards_match_the_process_reward_reference(arch):
    from head_references import PRMReference

    sep = 4
    ref = randomized(PRMReference(make_config(arch), sep), 0)
    with torch.no_grad():  # logits of order 1: probabilities away from 0 and 1
        for p in ref.score.parameters():
            p.mul_(0.1)
    model = load_reward_model(ref)
    assert model.head_kind == "mlp" and model.n_rewards == 2
    seq = sequences(16, n=1)[0]
    steps = seq[:3] + [sep] + seq[3:6] + [sep] + seq[6:] + [sep]
    with torch.no_grad():
        truth = ref(torch.tensor([steps]))
    out = model.step_rewards(torch.tensor(steps), sep)
    assert out.positions.tolist() == [i for i, t in enumerate(steps) if t == sep]
    torch.testing.assert_close(out.rewards, truth, atol=TOL, rtol=0)
    assert float(truth.max() - truth.min()) > 1e-3
    torch.testing.assert_close(out.aggregate("min"), truth.min())
    torch.testing.assert_close(out.aggregate("last"), truth[-1])
    torch.testing.assert_close(out.aggregate("product"), truth.prod())
    torch.testing.assert_close(out.aggregate("mean"), truth.mean())
    with pytest.raises(errors.InvalidInputError, match="no step separator"):
        model.step_rewards(torch.tensor(seq), sep)
    with pytest.raises(errors.InvalidInputError, match="aggregate"):
        out.aggregate("max")


def test_step_views_give_each_steps_reward_to_every_tool():
    from head_references import PRMReference

    from tl_reward import reward_lens
    from tl_reward.observational.nonlinear_attribution import head_attribution
    from tl_reward.process import step_tokens

    sep = 4
    ref = randomized(PRMReference(make_config("qwen2"), sep), 1)
    with torch.no_grad():
        for p in ref.score.parameters():
            p.mul_(0.1)
    model = load_reward_model(ref)
    seq = sequences(17, n=1)[0]
    steps = seq[:4] + [sep] + seq[4:7] + [sep] + seq[7:] + [sep]
    with torch.no_grad():
        truth = ref(torch.tensor([steps]))
    tokens, mask = step_tokens(model, torch.tensor(steps), sep)
    assert tokens.shape[0] == 3 and model.pooled_index(tokens, mask).tolist() == [4, 8, len(steps) - 1]
    model.set_objective([-1.0, 1.0])  # the step's log-odds
    log_odds = model(tokens, attention_mask=mask)
    torch.testing.assert_close(torch.sigmoid(log_odds), truth, atol=TOL, rtol=0)
    lens = reward_lens(model, tokens, mask, progress=False)
    torch.testing.assert_close(lens.rewards[-1], log_odds, atol=1e-5, rtol=0)
    ig = head_attribution(model, tokens, mask, progress=False)
    assert float(ig.completeness_gap.abs().max()) < 1e-4
    with pytest.raises(errors.InvalidInputError, match="pad"):
        step_tokens(model, torch.tensor(steps), 1)  # the pad id of the tiny configs


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_sequential_score_head_matches_the_inf_orm_reference(arch):
    from head_references import INFORMReference

    ref = randomized(INFORMReference(make_config(arch)), 2)
    with torch.no_grad():
        for p in ref.score.parameters():
            p.mul_(0.3)
    model = load_reward_model(ref)
    assert model.head_kind == "mlp" and model.n_rewards == 1
    seqs = sequences(19)
    tokens, mask = pad_batch(seqs, "right")
    with torch.no_grad():
        truth = ref(tokens)  # the reference's own batched pooling (right padding)
    torch.testing.assert_close(model(tokens, attention_mask=mask), truth, atol=TOL, rtol=0)
    left, left_mask = pad_batch(seqs, "left")
    torch.testing.assert_close(model(left, attention_mask=left_mask), truth, atol=TOL, rtol=0)
    assert float(truth.std()) > 0.05


@pytest.mark.parametrize("kind", ["grm", "armorm", "inf_orm"])
def test_checkpoint_directories_of_custom_code_heads_load_without_their_code(kind, tmp_path):
    """Directories as the published checkpoints are: config.json with auto_map (custom code,
    never run here), the trunk's tensors under model.*, the head's under its own names."""
    import json

    from head_references import INFORMReference

    if kind == "grm":
        ref, arch, kw = grm("llama"), "GRewardModel", {}
    elif kind == "armorm":
        ref, arch, kw = armorm("llama"), "LlamaForRewardModelWithGating", {"gate_pattern": PATTERN}
    else:
        ref, arch, kw = randomized(INFORMReference(make_config("llama")), 3), \
            "INFORMForSequenceClassification", {}
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = [arch]
    config["auto_map"] = {"AutoModelForSequenceClassification": f"modeling_custom.{arch}"}
    if kind == "armorm":
        config["gating_temperature"] = ref.gating.temperature
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_reward_model(tmp_path, **kw)
    seqs = sequences(20, with_pattern=True)
    tokens, mask = pad_batch(seqs, "left")
    with torch.no_grad():
        if kind == "armorm":
            truth = torch.cat([ref(torch.tensor([s]))[0] for s in seqs])
        elif kind == "grm":
            truth = torch.cat([ref(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                               for s in seqs])
        else:
            truth = torch.cat([ref(torch.tensor([s])) for s in seqs])
        ours = model(tokens, attention_mask=mask)
    torch.testing.assert_close(ours, truth, atol=TOL, rtol=0)
    if kind == "armorm":
        with pytest.raises(errors.HeadError, match="gate_pattern"):
            load_reward_model(tmp_path)
