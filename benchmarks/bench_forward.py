"""Forward cost of HookedRewardModel against the HF reward model with the same weights.

Llama-style reward model of ~25M parameters, batch 16 x 128 tokens, float32, CPU (or the GPU
given with --device). Timings are interleaved and the median of --repeats runs is reported.

    python benchmarks/bench_forward.py            # writes its section of benchmarks/RESULTS.md
"""

import argparse
import os
import statistics
import time
import warnings

import torch
import transformers as T
from _results import machine, write_section
from transformer_lens import HookedTransformer

from tl_reward import load_reward_model

# --scale: (hidden, MLP, layers, heads, key-value heads, vocabulary)
SCALES = {"small": (512, 1536, 6, 8, 8, 8192),  # 24.6M parameters: the CPU benchmarks
          "large": (2048, 5632, 16, 16, 4, 32000)}  # 0.8B, grouped-query attention: GPU only


def build(device: str, scale: str = "small") -> T.PreTrainedModel:
    hidden, mlp, layers, heads, kv_heads, vocab = SCALES[scale]
    config = T.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        pad_token_id=0, num_labels=1,
    )
    torch.manual_seed(0)
    return T.LlamaForSequenceClassification(config).to(device).eval()


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", default="small", choices=SCALES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    hf = build(args.device, args.scale)
    n_params = sum(p.numel() for p in hf.parameters())
    model = load_reward_model(hf)
    # A plain HookedTransformer with the same trunk and head: the cost TransformerLens itself has.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plain = HookedTransformer(model.cfg)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.eval()

    def full():  # what a hook on the last block (or a cache) gets: the whole last block
        model.fast_pooling = False
        try:
            return model(tokens, attention_mask=mask)
        finally:
            model.fast_pooling = True

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 8192, (args.batch, args.pos), generator=gen).to(args.device)
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        truth = hf(tokens, attention_mask=mask).logits[:, 0]
        ours = model(tokens, attention_mask=mask)
        err = float((truth - ours).abs().max())
        err_full = float((truth - full()).abs().max())
        runs = {
            "HF (sdpa attention)": lambda: hf(tokens, attention_mask=mask),
            "HookedRewardModel": lambda: model(tokens, attention_mask=mask),
            "HookedRewardModel, every position (`fast_pooling=False`)": lambda: full(),
            "plain HookedTransformer": lambda: plain(tokens, attention_mask=mask),
        }
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn, args.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["HF (sdpa attention)"]
    rows = "\n".join(
        f"| {k} | {med[k] * 1e3:.1f} | {med[k] / base:.2f}x |" for k in runs
    )
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    where = machine() + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "")
    shape = "" if (args.batch, args.pos) == (16, 128) else f" --batch {args.batch} --pos {args.pos}"
    shape += f" --scale {args.scale}" * (args.scale != "small")
    body = f"""## Forward cost: HookedRewardModel vs the HF reward model (issue 2)

Command: `{prefix}python benchmarks/bench_forward.py --device {args.device} --repeats {args.repeats}{shape}`
Llama-style reward model, {n_params / 1e6:.1f}M parameters, batch {args.batch} x {args.pos} tokens,
float32, {args.device}; {where}. Median of {args.repeats} interleaved runs.
Max |reward difference| to HF on this batch: {err:.1e} (every position: {err_full:.1e}).
HookedRewardModel's reward runs the last block at the scoring token only (keys and values at every
position) while nothing hooks the last block or the final norm; with a hook or cache there it
runs every position (the `fast_pooling=False` row), which is what a plain HookedTransformer does.
HookedRewardModel also stores its projection weights in `nn.Linear`'s layout, so that
TransformerLens's reshapes of them in every forward are views; the plain HookedTransformer has
TransformerLens's default layout and copies them in every forward (a fixed cost per forward,
which shows at small batches).

| forward | median ms | ratio to HF |
|---|---|---|
{rows}
"""
    print(body)
    if not args.no_write:
        key = f"forward-{args.device}" + (f"-{args.batch}x{args.pos}"
                                          if (args.batch, args.pos) != (16, 128) else "")
        key += f"-{args.scale}" * (args.scale != "small")
        write_section(key, body)


if __name__ == "__main__":
    main()
