"""Path patching against the three-step algorithm written with plain TransformerLens hooks."""

import pytest
import torch
from helpers import make_hf_model

from tl_reward import activation_patch, errors, load_reward_model, path_patch


def _pairs(n=3, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n, length), generator=g), torch.randint(3, 97, (n, length), generator=g)


@pytest.mark.parametrize("arch,gqa", [("llama", True), ("gpt2", False)])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_head_to_head_equals_three_step_path_patching(arch, gqa, which):
    model = load_reward_model(make_hf_model(arch, gqa))
    clean, corrupt = _pairs()
    sender, receiver = (0, 1), (1, 1)
    res = path_patch(model, clean, corrupt, receiver=f"L{receiver[0]}H{receiver[1]}.{which}",
                     progress=False)
    _, cc = model.run_with_cache(clean)
    _, rc = model.run_with_cache(corrupt)

    def set_sender(z, hook):
        z = z.clone()
        z[:, :, sender[1]] = cc[hook.name][:, :, sender[1]]
        return z

    def freeze_mlp(out, hook):
        return rc[hook.name]

    # step 2: corrupt run, sender clean, everything else on the path frozen; record receiver input
    name = f"blocks.{receiver[0]}.attn.hook_{which}"
    with torch.no_grad():
        store = {}

        def grab(act, hook):
            store["act"] = act.detach().clone()

        model.run_with_hooks(corrupt, fwd_hooks=[
            (f"blocks.{sender[0]}.attn.hook_z", set_sender),
            (f"blocks.{sender[0]}.hook_mlp_out", freeze_mlp),
            (name, grab),
        ])

        # step 3: corrupt run with only the receiver head's q/k/v replaced
        def set_receiver(act, hook):
            act = act.clone()
            act[:, :, receiver[1]] = store["act"][:, :, receiver[1]]
            return act

        expected = model.run_with_hooks(corrupt, fwd_hooks=[(name, set_receiver)])
    torch.testing.assert_close(res.effects[sender[0], sender[1]], expected - res.corrupt_reward,
                               atol=1e-5, rtol=0)
    assert torch.isnan(res.effects[1]).all()  # senders in the receiver's layer or later


def test_last_mlp_to_reward_equals_activation_patching():
    model = load_reward_model(make_hf_model("qwen2", gqa=True))
    clean, corrupt = _pairs(seed=1)
    path = path_patch(model, clean, corrupt, senders="mlps", receiver="reward", progress=False)
    act = activation_patch(model, clean, corrupt, hook="mlp_out", per="layer", progress=False)
    last = model.cfg.n_layers - 1
    torch.testing.assert_close(path.effects[last], act.effects[last], atol=1e-5, rtol=0)
    assert path.flat()[1] == ("0_mlp_out", "1_mlp_out")


def test_heads_to_reward_on_a_post_norm_model():
    model = load_reward_model(make_hf_model("gemma2", gqa=True))
    clean, corrupt = _pairs(seed=2)
    res = path_patch(model, clean, corrupt, receiver="reward", progress=False)
    assert res.effects.shape == (model.cfg.n_layers, model.cfg.n_heads, 3)
    assert torch.isfinite(res.effects).all()
    same = path_patch(model, clean, clean, receiver="reward", progress=False)
    assert same.effects.abs().max() < 1e-5


def test_mlp_receiver_reads_same_layer_heads():
    model = load_reward_model(make_hf_model("llama"))
    clean, corrupt = _pairs(seed=3)
    res = path_patch(model, clean, corrupt, receiver="L1.mlp", progress=False)
    assert torch.isfinite(res.effects[1]).all()  # layer-1 heads feed layer-1 MLP
    _, cc = model.run_with_cache(clean)
    _, rc = model.run_with_cache(corrupt)
    h = 2
    with torch.no_grad():
        delta = torch.einsum("bpd,dm->bpm", cc["blocks.1.attn.hook_z"][:, :, h] - rc["blocks.1.attn.hook_z"][:, :, h],
                             model.blocks[1].attn.W_O[h])
        mlp_out = model.blocks[1].mlp(model.blocks[1].ln2(rc["blocks.1.hook_resid_mid"] + delta))

        def swap(out, hook):
            return mlp_out

        expected = model.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.hook_mlp_out", swap)])
    torch.testing.assert_close(res.effects[1, h], expected - res.corrupt_reward, atol=1e-5, rtol=0)


@pytest.mark.parametrize("receiver", ["L9H0.q", "L0H0.x", "logits", "L5.mlp"])
def test_bad_receivers(receiver):
    model = load_reward_model(make_hf_model("llama"))
    clean, corrupt = _pairs(n=2, length=4)
    with pytest.raises(errors.InvalidInputError):
        path_patch(model, clean, corrupt, receiver=receiver, progress=False)


def test_no_sender_before_receiver():
    model = load_reward_model(make_hf_model("llama"))
    clean, corrupt = _pairs(n=2, length=4)
    with pytest.raises(errors.InvalidInputError, match="no heads come before"):
        path_patch(model, clean, corrupt, receiver="L0H0.q", progress=False)
