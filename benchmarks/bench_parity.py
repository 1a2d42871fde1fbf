"""Largest float32 difference between tl_reward's rewards and the HF model's own, per family.

The same cases as tests/test_loading.py's parity battery (tiny random models with randomised norm
weights, MHA and GQA where the family has it, 1 and 3 labels, every processing the family allows,
left and right padding, the fast scoring path and the full forward), each sequence's HF reward
computed alone and unpadded; the figure is the largest |tl_reward - HF| over all of them.
Run: PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_parity.py [--no-write]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _results import machine, write_section  # noqa: E402
from helpers import (  # noqa: E402
    ARCHS,
    GQA_ARCHS,
    MORE_ARCHS,
    POST_NORM_ARCHS,
    hf_rewards_alone,
    make_hf_model,
    pad_batch,
    ragged_sequences,
)

from tl_reward import load_reward_model  # noqa: E402

LN_ARCHS = {"gpt2", "gpt_neox", "gptj", "opt", "phi", "gpt_neo", "bloom", "olmo"}


def processing(arch: str) -> list[dict]:
    if arch in POST_NORM_ARCHS:
        return [{}]
    opts = [{}, {"fold_ln": True}]
    if arch in LN_ARCHS:
        opts += [{"center_writing_weights": True}, {"fold_ln": True, "center_writing_weights": True}]
    return opts


def worst_difference(arch: str) -> tuple[float, float, int]:
    """(largest |tl_reward - HF|, the spread (std) of the HF rewards, number of comparisons)."""
    worst, spread, n = 0.0, float("inf"), 0
    seqs = ragged_sequences(seed=1)
    for gqa in ([False, True] if arch in GQA_ARCHS else [False]):
        for num_labels in (1, 3):
            hf = make_hf_model(arch, gqa, num_labels)
            truth = hf_rewards_alone(hf, seqs)
            spread = min(spread, float(truth.std()))
            for kwargs in processing(arch):
                model = load_reward_model(hf, **kwargs)
                for side in ("right", "left"):
                    tokens, mask = pad_batch(seqs, side)
                    for fast in (True, False):
                        model.fast_pooling = fast
                        with torch.no_grad():
                            out = model(tokens, attention_mask=mask)
                        out = out if out.ndim == 2 else out[:, None]
                        worst = max(worst, float((out - truth).abs().max()))
                        n += truth.numel()
    return worst, spread, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows, overall = [], 0.0
    for arch in ARCHS + MORE_ARCHS:
        worst, spread, n = worst_difference(arch)
        overall = max(overall, worst)
        rows.append(f"| `{arch}` | {worst:.1e} | {spread:.2f} | {n} |")
        print(rows[-1], flush=True)
    body = "\n".join([
        "## Parity with the HF reward model, per family (`python benchmarks/bench_parity.py`)",
        "",
        f"Machine: {machine()}. float32; tiny random models (tests/helpers.py) with randomised "
        "norm weights; MHA and GQA where the family has it, 1 and 3 labels, every processing the "
        "family allows (fold_ln, centring), left and right padding, fast and full paths; each "
        "HF reward computed alone, unpadded. Largest difference over all families: "
        f"**{overall:.1e}** (the tests' tolerance: 1e-4).",
        "",
        "| model_type | largest abs. difference to HF | smallest std of the HF rewards | rewards compared |",
        "|---|---|---|---|",
        *rows,
    ])
    print(body)
    if not args.no_write:
        write_section("parity", body)


if __name__ == "__main__":
    main()
