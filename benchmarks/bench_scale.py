"""The scale check: an 8B-class reward model in bfloat16 on one GPU, every tool at long inputs.

    .venv/bin/python benchmarks/bench_scale.py              # Llama-3.1-8B shapes; needs a GPU
    .venv/bin/python benchmarks/bench_scale.py --tiny       # tiny shapes on the CPU, seconds

Builds a random LlamaForSequenceClassification with Llama-3.1-8B shapes directly on the device in
bfloat16 (``torch.device`` context: no download, no host copy of the weights), converts it with
``load_reward_model`` (the HF tensors are reused, no second copy), and measures:

- load: the conversion's time and the device memory it adds;
- forward of 16 x 2,048 tokens, tl_reward vs HF on the same weights (time ratio);
- reward lens and head-level direct attribution of one 2,048-token sequence;
- the 32-layer x 256-position ``resid_pre`` patching grid of one pair (goal: at most 2 min);
- AtP over every head (``z``) and neuron (``mlp_post``) at 256 tokens (goal: at most 1 s);
- the 32 x 32 head grid (``z`` per head) of one pair;
- bfloat16 against float32 (the same weights upcast): rewards and the head grid's effects.

``--tiny`` runs the same code on a 2-layer model with a few hundred tokens on the CPU: the test
suite runs it so the script never rots. Results go into benchmarks/RESULTS.md unless
``--no-write`` (the tiny run never writes).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import tl_reward as tr

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
               max_position_embeddings=131072, rms_norm_eps=1e-5,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                 max_position_embeddings=512),
}
# (forward batch, long length, patching length); the tiny run keeps the ratios of the real one
SIZES = {"8b": (16, 2048, 256), "tiny": (2, 128, 32)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def _mem(device: str) -> float:
    return torch.cuda.memory_allocated() / 1e9 if device.startswith("cuda") else float("nan")


def build_hf(shape: str, device: str, dtype: torch.dtype):
    """A random reward model built on ``device`` in ``dtype``: no host copy of its weights."""
    import transformers as T

    config = T.LlamaConfig(**SHAPES[shape], num_labels=1, pad_token_id=0, eos_token_id=0,
                           bos_token_id=1, tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = T.LlamaForSequenceClassification(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # norms away from 1, so folding and precision bugs show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
    return model.eval()


def run(shape: str, device: str) -> dict:
    batch, long, short = SIZES[shape]
    gen = torch.Generator().manual_seed(1)
    vocab = SHAPES[shape]["vocab_size"]

    def tokens(b: int, n: int) -> torch.Tensor:
        return torch.randint(2, vocab, (b, n), generator=gen).to(device)

    out: dict = {"shape": shape, "device": device}
    if device.startswith("cuda"):
        out["device_name"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
    hf, build_s = _timed(device, lambda: build_hf(shape, device, torch.bfloat16))
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    out.update(build_s=build_s, weights_gb=weights / 1e9, params_b=weights / 2 / 1e9)
    before = _mem(device)
    model, load_s = _timed(device, lambda: tr.load_reward_model(hf, n_ctx=long))
    out.update(load_s=load_s, load_added_gb=_mem(device) - before)

    x = tokens(batch, long)
    with torch.no_grad():
        r_tl, t_tl = _timed(device, lambda: model(x), repeats=3)
        r_hf, t_hf = _timed(device, lambda: hf(x).logits[:, 0], repeats=3)
    out.update(forward_tl_s=t_tl, forward_hf_s=t_hf, forward_ratio=t_tl / t_hf,
               forward_reward_gap=float((r_tl.float() - r_hf.float()).abs().max()),
               reward_scale=float(r_hf.float().abs().mean()))

    one = tokens(1, long)
    lens, out["lens_s"] = _timed(device, lambda: tr.reward_lens(model, one, progress=False))
    attr, out["head_attribution_s"] = _timed(
        device, lambda: tr.direct_reward_attribution(model, one, level="head", progress=False))
    out["attribution_completeness"] = float((attr.values.sum(0) + attr.bias - attr.total).abs().max())
    out["lens_last_vs_reward"] = float((lens.rewards[-1] - attr.total).abs().max())

    clean, corrupt = tokens(1, short), tokens(1, short)
    grid, out["resid_grid_s"] = _timed(device, lambda: tr.activation_patch(
        model, clean, corrupt, hook="resid_pre", per="layer_pos", progress=False))
    out["resid_grid_shape"] = list(grid.effects.shape)
    atp, out["atp_s"] = _timed(device, lambda: tr.attribution_patch(
        model, clean, corrupt, hooks=("z", "mlp_post"), progress=False))
    n_atp = sum(int(v[..., 0].numel()) for v in atp.estimates.values())
    out["atp_cells"] = n_atp
    heads, out["head_grid_s"] = _timed(device, lambda: tr.activation_patch(
        model, clean, corrupt, hook="z", per="head", progress=False))
    out["head_grid_shape"] = list(heads.effects.shape)

    # bfloat16 against float32 on the same weights (the float32 copy is made from the bf16 one)
    del hf
    with torch.no_grad():
        r16 = model(x[:2]).float()
    effects16 = heads.effects.float()
    model = model.to(torch.float32)
    model.cfg.dtype = torch.float32
    with torch.no_grad():
        r32 = model(x[:2])
    effects32 = tr.activation_patch(model, clean, corrupt, hook="z", per="head",
                                    progress=False).effects
    out["bf16_reward_gap"] = float((r16 - r32).abs().max())
    out["bf16_reward_scale"] = float(r32.abs().mean())
    out["bf16_effect_gap"] = float((effects16 - effects32).abs().max())
    out["effect_scale"] = float(effects32.abs().max())
    flat16, flat32 = effects16.flatten(), effects32.flatten()
    out["bf16_effect_corr"] = float(torch.corrcoef(torch.stack([flat16, flat32]))[0, 1])
    if device.startswith("cuda"):
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def table(r: dict) -> str:
    batch, long, short = SIZES[r["shape"]]
    return "\n".join([
        "| what | measured |",
        "|---|---|",
        f"| build on the device ({r['params_b']:.2f}B params, {r['weights_gb']:.2f} GB bf16) "
        f"| {r['build_s']:.2f} s |",
        f"| load_reward_model (device memory added) | {r['load_s']:.2f} s "
        f"({r['load_added_gb']:.2f} GB) |",
        f"| forward {batch} x {long}: tl_reward / HF | {r['forward_tl_s']:.2f} s / "
        f"{r['forward_hf_s']:.2f} s = {r['forward_ratio']:.2f}x (rewards differ by "
        f"{r['forward_reward_gap']:.3g}, mean abs reward {r['reward_scale']:.3g}) |",
        f"| reward lens, 1 x {long} | {r['lens_s']:.2f} s |",
        f"| head attribution, 1 x {long} (completeness error) | {r['head_attribution_s']:.2f} s "
        f"({r['attribution_completeness']:.2g}) |",
        f"| resid_pre patching grid {r['resid_grid_shape']} at {short} tokens | "
        f"{r['resid_grid_s']:.2f} s |",
        f"| AtP, every head and neuron ({r['atp_cells']} cells) at {short} tokens | "
        f"{r['atp_s']:.2f} s |",
        f"| head grid {r['head_grid_shape']} at {short} tokens | {r['head_grid_s']:.2f} s |",
        f"| bf16 vs float32 rewards: max gap / mean abs | {r['bf16_reward_gap']:.3g} / "
        f"{r['bf16_reward_scale']:.3g} |",
        f"| bf16 vs float32 head effects: max gap / max abs, correlation | "
        f"{r['bf16_effect_gap']:.3g} / {r['effect_scale']:.3g}, {r['bf16_effect_corr']:.4f} |",
        *([f"| peak device memory | {r['peak_gb']:.2f} GB |"] if "peak_gb" in r else []),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    shape = "tiny" if args.tiny else "8b"
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_scale.py needs a GPU for the 8B shapes; run it with --tiny on the CPU")
    result = run(shape, device)
    print(json.dumps(result, indent=1))
    print(table(result))
    if not args.tiny and not args.no_write:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import write_section

        write_section("bench-scale", "\n".join([
            "## The scale check: Llama-3.1-8B shapes in bfloat16 on one GPU (issue 19)", "",
            f"`.venv/bin/python benchmarks/bench_scale.py` on {result.get('device_name', device)}"
            f" (torch {torch.__version__}).", "", table(result)]))


if __name__ == "__main__":
    main()
