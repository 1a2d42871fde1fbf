"""Nonlinear reward heads: parity with the reference implementations, and the completeness of
integrated gradients against the number of quadrature points.

    python benchmarks/bench_heads.py        # writes its section of benchmarks/RESULTS.md

Parity: largest |reward - reference| over Llama, Qwen2, Qwen3 and Gemma-2 tiny random trunks
(norm weights randomised), left and right padding, 5 ragged sequences each; the reference is the
published head in plain PyTorch on the HF trunk (tests/head_references.py), each sequence alone.
Completeness: largest |reward - baseline - sum of integrated-gradients attributions| over 5
sequences, by ``steps`` (Gauss-Legendre points per piece between the head's ReLU kinks).
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch
from _results import machine, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from head_references import ArmoRMReference, GRMReference, randomized  # noqa: E402
from helpers import make_config, pad_batch  # noqa: E402
from test_heads import ARCHS, PATTERN, sequences  # noqa: E402
from torch import nn  # noqa: E402

from tl_reward import head_attribution, load_reward_model  # noqa: E402


def parity() -> dict[str, float]:
    worst = {"mlp (GRM)": 0.0, "gated (ArmoRM)": 0.0}
    for arch in ARCHS:
        for side in ("left", "right"):
            ref = randomized(GRMReference(make_config(arch)), 0)
            model = load_reward_model(ref)
            seqs = sequences(1)
            tokens, mask = pad_batch(seqs, side)
            with torch.no_grad():
                truth = torch.cat([ref(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                                   for s in seqs])
                err = (model(tokens, attention_mask=mask) - truth).abs().max()
            worst["mlp (GRM)"] = max(worst["mlp (GRM)"], float(err))
            ref = randomized(ArmoRMReference(make_config(arch), PATTERN), 0)
            model = load_reward_model(ref, gate_pattern=PATTERN)
            seqs = sequences(2, with_pattern=True)
            tokens, mask = pad_batch(seqs, side)
            with torch.no_grad():
                truth = torch.cat([ref(torch.tensor([s]))[0] for s in seqs])
                err = (model(tokens, attention_mask=mask) - truth).abs().max()
            worst["gated (ArmoRM)"] = max(worst["gated (ArmoRM)"], float(err))
    return worst


def completeness(steps_list: list[int]) -> list[str]:
    cases = [
        ("mlp, ReLU", randomized(GRMReference(make_config("llama")), 0), {}),
        ("mlp, GELU", randomized(GRMReference(make_config("llama"), act=nn.GELU), 0), {}),
        ("gated", randomized(ArmoRMReference(make_config("llama"), PATTERN), 0),
         {"gate_pattern": PATTERN}),
    ]
    rows = []
    tokens, mask = pad_batch(sequences(2, with_pattern=True), "left")
    for name, ref, kw in cases:
        model = load_reward_model(ref, **kw)
        gaps = []
        for steps in steps_list:
            ig = head_attribution(model, tokens, mask, steps=steps, progress=False)
            gaps.append(f"{float(ig.completeness_gap.abs().max()):.1e}")
        grad = head_attribution(model, tokens, mask, method="gradient", progress=False)
        rows.append(f"| {name} | " + " | ".join(gaps)
                    + f" | {float(grad.completeness_gap.abs().max()):.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md alone")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    steps_list = [1, 4, 16, 64]
    worst = parity()
    body = "\n".join([
        "## Nonlinear reward heads (`python benchmarks/bench_heads.py`)",
        "",
        f"Machine: {machine()}. float32.",
        "",
        "| head | largest abs. difference to the reference (4 trunks x 2 paddings) |",
        "|---|---|",
        *[f"| {k} | {v:.1e} |" for k, v in worst.items()],
        "",
        "Integrated gradients: largest |completeness gap| over 5 sequences, by steps; last "
        "column: the gap of gradient x input (the head's nonlinearity).",
        "",
        "| head | " + " | ".join(f"steps={s}" for s in steps_list) + " | gradient x input |",
        "|---|" + "---|" * (len(steps_list) + 1),
        *completeness(steps_list),
    ])
    print(body)
    if not args.no_write:
        write_section("heads", body)


if __name__ == "__main__":
    main()
