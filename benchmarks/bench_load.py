"""Loading cost: tl_reward's load_reward_model against HF's from_pretrained, same directory.

    .venv/bin/python benchmarks/bench_load.py              # Llama-3.2-1B shapes, bfloat16 (~2.5 GB)
    .venv/bin/python benchmarks/bench_load.py --tiny       # seconds; what the test suite runs

Writes a random reward model (LlamaForSequenceClassification, one label) in bfloat16 as one
safetensors file in a temporary directory, then, each in its own fresh process after
``import tl_reward``: HF ``from_pretrained(dir, dtype=bfloat16)`` followed by one short forward
(which touches every weight), and ``load_reward_model(dir, dtype=bfloat16)`` followed by the same
forward (plain, and with ``fold_ln=True``). Each reports its peak resident memory over its own
post-import baseline (``VmHWM``, reset after import, against the RSS then) and its wall time; ratios are
taken against the weights' size and against HF, measured in the same run. Results go into
benchmarks/RESULTS.md unless ``--no-write``.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _host_memory import peak, reset_peak, rss

SHAPES = {  # Llama-3.2-1B (no lm_head: a reward model has a one-column score head instead)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
               max_position_embeddings=131072, rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                 max_position_embeddings=256),
}
FORWARD_TOKENS = 16


def write_model(directory: Path, shape: str, dtype: torch.dtype) -> int:
    """A random reward model in ``dtype``, one safetensors file; returns the weights' bytes."""
    import transformers as T
    from safetensors.torch import save_file

    config = T.LlamaConfig(**SHAPES[shape], num_labels=1, pad_token_id=0, eos_token_id=0,
                           bos_token_id=1, tie_word_embeddings=False, dtype=str(dtype)[6:])
    config.architectures = ["LlamaForSequenceClassification"]
    with torch.device("meta"):
        meta = T.LlamaForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)
    state, total = {}, 0
    for name, p in meta.state_dict().items():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(dtype)
        if name.endswith("norm.weight"):
            state[name] = noise.mul_(0.1).add_(1.0)
        else:
            state[name] = noise.mul_(0.02 if name != "score.weight" else 1.0)
        total += state[name].numel() * state[name].element_size()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(directory)
    return total




def measure(tool: str, directory: str, dtype_name: str) -> dict:
    """In this (fresh) process: peak RSS over the post-import baseline and time of one load plus
    one short forward."""
    import transformers as T

    import tl_reward  # noqa: F401  (the baseline is after import)

    dtype = getattr(torch, dtype_name)
    tokens = torch.arange(2, 2 + FORWARD_TOKENS)[None]
    reset_peak()
    base = rss()
    start = time.perf_counter()
    if tool == "hf":
        model = T.AutoModelForSequenceClassification.from_pretrained(
            directory, dtype=dtype, local_files_only=True)
        loaded = time.perf_counter()
        with torch.no_grad():
            reward = model(tokens).logits[0, 0]
    else:
        model = tl_reward.load_reward_model(directory, dtype=dtype, fold_ln=tool == "tl_fold_ln")
        loaded = time.perf_counter()
        with torch.no_grad():
            reward = model(tokens)[0]
    end = time.perf_counter()
    return {"tool": tool, "load_s": loaded - start, "total_s": end - start,
            "peak_over_base": peak() - base, "reward": float(reward)}


def run_child(tool: str, directory: Path, dtype_name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, "--dir", str(directory), "--dtype", dtype_name]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{tool} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (seconds)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=1, help="processes per tool (median)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.dir, args.dtype)))
        return
    shape = "tiny" if args.tiny else "1b"
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        directory = Path(tmp)
        weights = write_model(directory, shape, getattr(torch, args.dtype))
        runs: dict[str, list[dict]] = {"hf": [], "tl": [], "tl_fold_ln": []}
        for _ in range(args.repeats):
            for tool in runs:  # interleaved, so load on the machine hits each alike
                runs[tool].append(run_child(tool, directory, args.dtype))

    def med(tool: str, key: str) -> float:
        vals = sorted(r[key] for r in runs[tool])
        return vals[len(vals) // 2]

    hf_total = med("hf", "total_s")
    rows = []
    for tool, label in (("hf", "HF from_pretrained + forward"),
                        ("tl", "load_reward_model + forward"),
                        ("tl_fold_ln", "load_reward_model(fold_ln=True) + forward")):
        peak = med(tool, "peak_over_base")
        rows.append(f"| {label} | {med(tool, 'load_s'):.2f} | {med(tool, 'total_s'):.2f} | "
                    f"{med(tool, 'total_s') / hf_total:.2f}x | {peak / 1e9:.2f} | "
                    f"{peak / weights:.2f}x |")
    gap = abs(med("tl", "reward") - med("hf", "reward"))
    result = {"weights_bytes": weights, "hf": runs["hf"], "tl": runs["tl"],
              "tl_fold_ln": runs["tl_fold_ln"]}
    print(json.dumps(result, indent=1))
    n_params = weights // getattr(torch, args.dtype).itemsize
    from _results import machine

    body = "\n".join([
        f"## Loading a saved reward model: host memory and time (issue 19){' [tiny]' if args.tiny else ''}",
        "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/bench_load.py', *sys.argv[1:]])}` "
        f"({machine()}; other processes shared the 2 cores and memory, so times are noisy;"
        f" median of {args.repeats} process(es) per row, interleaved).",
        "",
        f"A random LlamaForSequenceClassification with {'Llama-3.2-1B' if not args.tiny else 'tiny'}"
        f" shapes, {n_params / 1e9:.3f}B parameters, {weights / 1e9:.3f} GB of {args.dtype} "
        "weights in one safetensors file. Each row is a fresh process after `import tl_reward`; "
        f"the load is followed by one {FORWARD_TOKENS}-token forward (which touches every weight)."
        " Peak host memory is the peak RSS (`VmHWM`, reset after import) over the RSS after "
        "import (file-backed pages of the memory-mapped checkpoint count).",
        "",
        "| what | load s | load + forward s | vs HF | peak host memory over baseline GB "
        "| vs weights |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Rewards of the same tokens, tl_reward vs HF ({args.dtype}): differ by {gap:.2e}.",
        "Targets (issue 19): at most 1.3x the weights, at most 2x HF's time.",
    ])
    print(body)
    if not args.no_write:
        from _results import write_section

        write_section("bench-load" + ("-tiny" if args.tiny else ""), body)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
