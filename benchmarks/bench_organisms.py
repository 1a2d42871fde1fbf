"""Rebuild the shipped organisms from scratch and compare them with the shipped weights.

    python benchmarks/bench_organisms.py        # writes its section of benchmarks/RESULTS.md

Times ``tl_reward.organisms.train.build`` (data generation, training, evaluation, saving) on
CPU into a temporary folder, and reports the accuracies reached on the held-out evaluation set
next to the shipped organism's, and the largest weight difference to the shipped safetensors
(0 when training is bit-for-bit reproducible on this machine).
"""

import argparse
import tempfile
from pathlib import Path

import torch
from _results import machine, write_section
from safetensors.torch import load_file

from tl_reward import organisms
from tl_reward.organisms.train import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in organisms.available():
            meta = build(name, Path(tmp), progress=False)
            shipped = organisms.info(name)
            new = load_file(Path(tmp) / name / "model.safetensors")
            old = load_file(organisms.path(name) / "model.safetensors")
            diff = max(float((new[k] - old[k]).abs().max()) for k in old)
            acc = "; ".join(f"{k} {v:.1%} (shipped {shipped['accuracy'][k]:.1%})"
                            for k, v in meta["accuracy"].items())
            rows.append(f"| `{name}` | {meta['build_seconds']:.1f} | {acc} | {diff:.1e} |")
    body = "\n".join([
        "## Organisms rebuilt from scratch (issue 3)",
        "",
        "Command: `python benchmarks/bench_organisms.py`",
        f"{machine()}. Build = data generation + training + evaluation + saving.",
        "",
        "| organism | build s | held-out pairwise accuracy | max weight diff to shipped |",
        "|---|---|---|---|",
        *rows,
    ])
    print(body)
    if not args.no_write:
        write_section("organisms", body)


if __name__ == "__main__":
    main()
