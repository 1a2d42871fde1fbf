"""Peak memory of streamed CART discovery: 2,000 vs 20,000 sequences (issue 7).

Each measurement runs in a fresh child process on the ``longtail`` organism (every MLP neuron and
attention head: 264 units). Texts are generated lazily, 250 pairs at a time, by the long-tail
task (tail sources: ``alpha=0``; head sources: ``alpha=1``), so nothing holds the data set.

- ``streamed``: :func:`tl_reward.cart.discover` with generator-function sources (two passes,
  Gaussian coherence from running covariances, validation on a 512-text reservoir sample).
- ``materialised`` (the contrast): the texts in lists and every unit activation kept, stacked,
  then ``Delta`` from the stack, as an in-memory implementation would do.

Memory: peak resident set size during the run minus the RSS just before it (sampled every
5 ms by a thread, psutil), and the tracemalloc peak of Python allocations (torch tensors are not
seen by tracemalloc; the RSS figure covers them).

    python benchmarks/bench_cart_memory.py            # writes the cart-memory section of RESULTS.md
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

CHUNK = 250  # pairs generated at a time (the same for every size)


def _texts(n_sequences: int, tail: bool, seed0: int):
    """Generator function: ``n_sequences / 2`` texts of one side, made ``CHUNK`` pairs at a time."""
    from tl_reward import organisms

    task = organisms.longtail_task()
    want = n_sequences // 2

    def gen():
        made, seed = 0, seed0
        while made < want:
            pairs = task.sample(CHUNK, seed=seed, alpha=0.0 if tail else 1.0, noise=0.0)
            for t in pairs.chosen_texts + pairs.rejected_texts:
                if made == want:
                    return
                made += 1
                yield t
            seed += 1

    return gen


def child(n: int, mode: str) -> dict:
    import os
    import tracemalloc

    import psutil
    import torch

    from tl_reward import cart, organisms

    torch.set_num_threads(1)
    model, _, _ = organisms.load("longtail")
    tail, head = _texts(n, True, 0), _texts(n, False, 10_000)
    # warm-up: one small run so lazy imports and allocator pools are in place
    cart.discover(model, lambda: list(tail())[:64], lambda: list(head())[:64], top_k=4,
                  max_validation=16, progress=False)
    proc = psutil.Process(os.getpid())
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    tracemalloc.start()
    started = time.perf_counter()
    if mode == "streamed":
        d = cart.discover(model, tail, head, top_k=16, progress=False)
        result = {"top": [u.label for u in d.candidates[:3]], "n_tail": d.statistics.n_tail,
                  "n_head": d.statistics.n_head, "kept": int(sum(d.validation.kept))}
    else:
        units = cart.all_units(model)
        stacks = {}
        texts = {"tail": list(tail()), "head": list(head())}
        with torch.no_grad():
            for side, items in texts.items():
                acts = []
                for i in range(0, len(items), 128):
                    tokens, mask = model.pad(model.tokenize(items[i : i + 128]))
                    acts.append(cart.unit_activations(model, tokens, mask, units).double())
                stacks[side] = torch.cat(acts)
        delta = cart.differential_activation(stacks["tail"], stacks["head"])
        top = torch.argsort(delta.abs(), descending=True)[:3].tolist()
        result = {"top": [units[i].label for i in top], "n_tail": len(texts["tail"]),
                  "n_head": len(texts["head"]), "kept": None}
    seconds = time.perf_counter() - started
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stop.set()
    thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return {"n": n, "mode": mode, "rss_growth_mb": (peak[0] - base) / 2**20,
            "rss_base_mb": base / 2**20, "tracemalloc_peak_mb": py_peak / 2**20,
            "seconds": seconds, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--modes", nargs="+", default=["streamed", "materialised"])
    parser.add_argument("--child", nargs=2, metavar=("N", "MODE"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1])))
        return

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _results import machine, write_section

    torch.set_num_threads(1)  # as in the children, so machine() reports what they ran with

    rows = []
    for mode in args.modes:
        for n in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), mode],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            rows.append(row)
    lines = [
        "## Streamed CART discovery: peak memory, 2k vs 20k sequences (issue 7)",
        "",
        "Command: `python benchmarks/bench_cart_memory.py`",
        f"`longtail` organism, all 264 units (256 MLP neurons + 8 heads) read at the scoring token; "
        f"{machine()}, one fresh process per row. Texts generated lazily "
        "(250 pairs at a time), half tail, half head. `streamed` = `tl_reward.cart.discover` "
        "(two streamed passes, Gaussian coherence of 16 candidates, validation on 512-text "
        "samples); `materialised` = texts in lists and every activation stacked in memory (the "
        "contrast). RSS growth = peak RSS during the run (5 ms sampling) minus RSS before it.",
        "",
        "| mode | sequences | RSS growth MB | tracemalloc peak MB | seconds | top units by abs(Delta) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['n']:,} | {r['rss_growth_mb']:.1f} | "
                     f"{r['tracemalloc_peak_mb']:.2f} | {r['seconds']:.1f} | {', '.join(r['top'])} |")
    by = {(r["mode"], r["n"]): r for r in rows}
    lo, hi = min(args.sizes), max(args.sizes)
    for mode in args.modes:
        if (mode, lo) in by and (mode, hi) in by:
            a, b = by[(mode, lo)], by[(mode, hi)]
            lines.append("")
            lines.append(
                f"{mode}: {hi // lo}x the sequences -> RSS growth {b['rss_growth_mb']:.1f} vs "
                f"{a['rss_growth_mb']:.1f} MB, tracemalloc peak {b['tracemalloc_peak_mb']:.2f} vs "
                f"{a['tracemalloc_peak_mb']:.2f} MB."
            )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("cart-memory", body)


if __name__ == "__main__":
    main()
