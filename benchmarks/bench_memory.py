"""Peak host memory of every tool on one long sequence, against its floor.

    .venv/bin/python benchmarks/bench_memory.py                      # small Llama shapes
    .venv/bin/python benchmarks/bench_memory.py --shape 1b           # Llama-3.2-1B shapes
    .venv/bin/python benchmarks/bench_memory.py --tiny --no-write    # seconds

A random Llama reward model is built in ``--dtype`` and converted (its tensors are the weights,
resident); then for each (tool, length), in one process, freed heap memory is returned
(``malloc_trim``), the peak RSS is reset (``/proc/self/clear_refs``), the tool runs on one sequence (one pair for the pair tools) of 512,
1,024 or 2,048 tokens, and the peak RSS over the RSS before the model was built is reported
against the floor: the weights plus the activations the tool must read (its pooled rows for the
read-out tools; both runs' activations at every position, and their gradients, for AtP; the
patched hook's activations of both runs and the target's residual stream for patching).
The forward's own working set (attention scores of one layer, ``n_heads x pos^2``) is not in the
floor: it is what the ratio shows above 1.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from _host_memory import peak, reset_peak, rss

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=64, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256),
}
TOOLS = ("score", "lens", "lens_recomputed", "tuned_lens", "attribution_component",
         "attribution_head", "attribution_neuron", "attribution_head_source", "atp",
         "patch_layer", "patch_head", "patch_position", "sae_attribution")
D_SAE = 4096




def floor_activations(tool: str, cfg, n: int, patched_layers: int | None = None) -> int:
    """Bytes of the activations ``tool`` must read for one sequence (pair) of ``n`` tokens
    (patching: of ``patched_layers`` layers, all by default)."""
    L, d, H, dh, dm = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    P = L if patched_layers is None else patched_layers
    kv = cfg.n_key_value_heads or H
    item = torch.tensor([], dtype=cfg.dtype).element_size()
    pooled = (2 * L + 2) * d * 4
    return {
        "score": 0,
        "lens": pooled, "lens_recomputed": pooled,
        "tuned_lens": pooled + L * (d * d + d) * 4,  # the translators
        "attribution_component": pooled,
        "attribution_head": pooled + L * H * dh * 4,
        "attribution_neuron": pooled + L * dm * 4,
        "attribution_head_source": pooled + L * (H * n + n * kv * dh) * 4,
        # z, mlp_post and resid_pre of both runs at every position, and the target's gradients
        "atp": 3 * L * n * (H * dh + dm + d) * item,
        # the patched hook of both runs and the target's residual stream at every position
        "patch_layer": 3 * P * n * d * item,
        "patch_head": (2 * P * n * H * dh + P * n * d) * item,
        "patch_position": 3 * P * n * d * item,
        "sae_attribution": 2 * d * D_SAE * 4 + pooled,
    }[tool]


def build(shape: str, dtype: torch.dtype):
    import transformers as T

    import tl_reward as tr

    config = T.LlamaConfig(**SHAPES[shape], num_labels=1, pad_token_id=0, eos_token_id=0,
                           bos_token_id=1, max_position_embeddings=4096,
                           tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        hf = T.LlamaForSequenceClassification(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return tr.load_reward_model(hf, n_ctx=2048)  # the HF tensors are the weights: no copy


def _trim() -> None:
    """Return freed heap memory to the system, so one tool's peak starts from the model alone."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(model, tool: str, n: int, base: int, patch_last_layer: bool = False) -> dict:
    """Peak RSS over ``base`` (the RSS before the model was built) while ``tool`` runs once
    (the patching tools on the last layer only with ``patch_last_layer``)."""
    import tl_reward as tr

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab
    a = torch.randint(2, vocab, (1, n), generator=gen)
    b = torch.randint(2, vocab, (1, n), generator=gen)
    _trim()
    reset_peak()
    start = time.perf_counter()
    if tool == "score":
        with torch.no_grad():
            model(a)
    elif tool in ("lens", "lens_recomputed"):
        tr.reward_lens(model, a, norm="cached" if tool == "lens" else "recomputed", progress=False)
    elif tool == "tuned_lens":
        labels = tr.reward_lens(model, a, progress=False).labels
        tr.TunedRewardLens(model, labels).lens(model, a, progress=False)
    elif tool.startswith("attribution_"):
        tr.direct_reward_attribution(model, a, level=tool[len("attribution_"):], progress=False)
    elif tool == "atp":
        tr.attribution_patch(model, a, b, hooks=("z", "mlp_post", "resid_pre"), progress=False)
    elif tool == "patch_layer":
        tr.activation_patch(model, a, b, hook="attn_out", per="layer", progress=False,
                            layers=[model.cfg.n_layers - 1] if patch_last_layer else None)
    elif tool == "patch_head":
        tr.activation_patch(model, a, b, hook="z", per="head", progress=False,
                            layers=[model.cfg.n_layers - 1] if patch_last_layer else None)
    elif tool == "patch_position":  # every position of the first (last) layer's residual stream
        tr.activation_patch(model, a, b, hook="resid_pre", per="layer_pos", progress=False,
                            layers=[model.cfg.n_layers - 1 if patch_last_layer else 0])
    elif tool == "sae_attribution":
        from sae_lens import StandardSAE, StandardSAEConfig

        from tl_reward.sae import sae_reward_attribution

        cfg = StandardSAEConfig(d_in=model.cfg.d_model, d_sae=D_SAE)
        cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        sae = StandardSAE(cfg).to(dtype=model.cfg.dtype)
        sae_reward_attribution(model, sae, a, method="direct", progress=False)
    else:
        raise KeyError(tool)
    seconds = time.perf_counter() - start
    patched = (1 if tool == "patch_position" or (patch_last_layer and tool in ("patch_layer", "patch_head"))
               else None)
    floor = weights + floor_activations(tool, model.cfg, n, patched)
    peak_bytes = peak() - base
    return {"tool": tool, "n": n, "weights": weights, "floor": floor, "peak": peak_bytes,
            "ratio": peak_bytes / floor, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="--shape tiny, short inputs")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="tl_reward.set_memory_budget for the run (default: the library's)")
    parser.add_argument("--patch-last-layer", action="store_true",
                        help="patch_layer / patch_head / patch_position on the last layer only "
                             "(their floor too)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.lengths = "tiny", "64,128"
    lengths = [int(x) for x in args.lengths.split(",")]
    import sae_lens  # noqa: F401  (libraries imported before the baseline)
    import transformers  # noqa: F401

    import tl_reward
    import tl_reward.sae  # noqa: F401

    if args.budget_gib is not None:
        tl_reward.set_memory_budget(args.budget_gib)
    base = rss()
    model = build(args.shape, getattr(torch, args.dtype))
    results = []
    for tool in args.tools.split(","):
        for n in lengths:
            results.append(measure(model, tool, n, base, args.patch_last_layer))
            r = results[-1]
            print(f"{tool:26s} {n:5d}  peak {r['peak'] / 1e9:.3f} GB  floor "
                  f"{r['floor'] / 1e9:.3f} GB  ratio {r['ratio']:.2f}  {r['seconds']:.1f} s",
                  flush=True)
    weights = results[0]["weights"]
    header = "| tool | " + " | ".join(f"{n} tokens: peak GB / floor GB = ratio" for n in lengths)
    rows = []
    for tool in args.tools.split(","):
        cells = [r for r in results if r["tool"] == tool]
        rows.append(f"| {tool} | " + " | ".join(
            f"{r['peak'] / 1e9:.2f} / {r['floor'] / 1e9:.2f} = {r['ratio']:.2f}x" for r in cells)
            + " |")
    sys.path.insert(0, str(Path(__file__).parent))
    from _results import machine, write_section

    body = "\n".join([
        f"## Peak host memory of every tool at long inputs (issue 19), {args.shape} shapes",
        "",
        f"`.venv/bin/python benchmarks/bench_memory.py {' '.join(sys.argv[1:])}` ({machine()}).",
        "",
        f"Random Llama reward model, `{args.shape}` shapes ({SHAPES[args.shape]}), {args.dtype}, "
        f"{weights / 1e9:.3f} GB of weights; one sequence (one pair for AtP and patching). Peak = peak RSS over the RSS before the model was built; floor = the "
        "weights plus the activations the tool must read (see the script); one process, the peak "
        "reset before each tool (memory a tool's predecessors left in the heap counts against "
        "it, so the peaks are upper bounds). The forward's own "
        "working set (one layer's attention scores) is what lifts the ratio above 1. "
        + (f"Memory budget: {args.budget_gib} GiB (`tl_reward.set_memory_budget`)."
           if args.budget_gib is not None else "Memory budget: the default (half the "
           "available memory), which the batched tools may fill."),
        "",
        header + " |",
        "|---|" + "---|" * len(lengths),
        *rows,
    ])
    print(body)
    if not args.no_write:
        shape = "" if args.shape == "small" else f"-{args.shape}"
        write_section("bench-memory" + shape, body)


if __name__ == "__main__":
    main()
