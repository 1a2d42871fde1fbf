"""Models in half precision and in float64: every read-out tool runs, reports in float32 at least
(float64 for a float64 model), and agrees with the same model in a reference precision within that
precision's rounding."""

import pytest
import torch
from helpers import make_hf_model
from test_sae import random_sae

import tl_reward
from tl_reward import load_reward_model

TOOLS = {
    "patch z per head": lambda m, c, r: tl_reward.activation_patch(
        m, c, r, hook="z", per="head", progress=False).effects,
    "patch resid_pre per layer x position": lambda m, c, r: tl_reward.activation_patch(
        m, c, r, hook="resid_pre", per="layer_pos", progress=False).effects,
    "patch grids (components)": lambda m, c, r: torch.stack(
        [g.effects for g in tl_reward.activation_patch_grids(m, c, r, progress=False)]),
    "patch mean ablation": lambda m, c, r: tl_reward.activation_patch(
        m, c, r, hook="mlp_out", per="layer", mode="mean", reference=c, progress=False).effects,
    "path patching": lambda m, c, r: tl_reward.path_patch(
        m, c, r, senders="heads", receiver="reward", progress=False).effects,
    "attribution patching": lambda m, c, r: tl_reward.attribution_patch(
        m, c, r, hooks=("z",), progress=False).as_patch_result("z", "head").effects,
    "pair attribution per neuron": lambda m, c, r: tl_reward.pair_reward_attribution(
        m, c, r, level="neuron", progress=False).values,
    "attribution per head source": lambda m, c, r: tl_reward.direct_reward_attribution(
        m, c, level="head_source", progress=False).values,
    "reward lens": lambda m, c, r: tl_reward.reward_lens(m, c, progress=False).rewards,
    "reward lens, recomputed norm": lambda m, c, r: tl_reward.reward_lens(
        m, c, norm="recomputed", progress=False).rewards,
    # an SAE in the model's dtype (the same random weights in every precision)
    "SAE attribution, direct": lambda m, c, r: tl_reward.sae_reward_attribution(
        m, random_sae("blocks.1.hook_resid_post", d_in=m.cfg.d_model).to(m.W_E.device, m.cfg.dtype), c,
        method="direct", progress=False).values,
    "SAE attribution, gradient": lambda m, c, r: tl_reward.sae_reward_attribution(
        m, random_sae("blocks.0.hook_resid_post", d_in=m.cfg.d_model).to(m.W_E.device, m.cfg.dtype), c,
        method="gradient", progress=False).values,
}


# (precision, reference, tolerance relative to the largest reference value); also run on an
# accelerator by benchmarks/device_check.py
PRECISIONS = [
    (torch.bfloat16, torch.float64, 0.1),  # 8-bit mantissa
    (torch.float16, torch.float64, 0.02),
    (torch.float64, torch.float32, 1e-4),
]


def precision_inputs(device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Three clean/corrupt pairs of 9 tokens sharing a 4-token prompt (the source run starts
    after it)."""
    g = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(3, 97, (3, 9), generator=g) for _ in range(2))
    corrupt[:, :4] = clean[:, :4]
    return clean.to(device), corrupt.to(device)


def precision_errors(model, ref_model, clean, corrupt) -> dict[str, float]:
    """Each tool's max |error| against the reference model, relative to the reference's largest
    value; asserts each output's dtype (float32 at least)."""
    out = {}
    for name, tool in TOOLS.items():
        got, want = tool(model, clean, corrupt), tool(ref_model, clean, corrupt)
        assert got.dtype == torch.promote_types(model.cfg.dtype, torch.float32), name
        err = float((got.double() - want.double()).abs().nan_to_num().max())
        scale = float(want.double().abs().nan_to_num().max())
        out[name] = err / scale if scale > 0 else err
    return out


@pytest.mark.parametrize("dtype,reference,tol", PRECISIONS)
def test_every_tool_in_each_precision(dtype, reference, tol):
    hf = make_hf_model("llama", gqa=True)
    model, ref_model = load_reward_model(hf, dtype=dtype), load_reward_model(hf, dtype=reference)
    for name, rel in precision_errors(model, ref_model, *precision_inputs()).items():
        assert rel <= tol, f"{name}: {rel:.2e} of the largest value"
