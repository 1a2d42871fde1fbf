"""CART against the baselines on the long-tail task: head and tail accuracy, tail calibration.

    python benchmarks/cart_longtail.py                    # alphas 0.95 0.99, 5 seeds; writes RESULTS.md
    python benchmarks/cart_longtail.py --alphas 0.99 --seeds 2 --no-write   # a quick look

For every (alpha, seed): a base reward model trained with plain ERM, CART circuit discovery on it,
then one fine-tuned copy per method, same steps and same starting point
(:func:`tl_reward.cart.experiment.train_methods`), evaluated on held-out noise-free pairs (half
tail). Mean and 95% Student-t CI over seeds. The fine-tuned models are saved under
``benchmarks/out/cart_models/`` for ``reward_hacking.py``.
"""

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from _results import machine, write_section

from tl_reward.cart.experiment import (
    ENSEMBLES,
    METHODS,
    ExperimentSettings,
    evaluate,
    mean_ci,
    train_methods,
)

OUT = Path(__file__).with_name("out")
MODELS = OUT / "cart_models"
METRICS = ("head_acc", "tail_acc", "tail_brier", "tail_ece")


def model_path(alpha: float, seed: int, method: str) -> Path:
    return MODELS / f"a{alpha}_s{seed}_{method}.pt"


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    order = list(METHODS) + list(ENSEMBLES)
    for (alpha, method), g in df.groupby(["alpha", "method"], sort=False):
        row = {"alpha": alpha, "method": method, "seeds": len(g)}
        for k in METRICS:
            m, lo, hi = mean_ci(g[k].tolist())
            row[k] = m
            row[k + "_ci"] = (lo, hi)
        row["seconds"] = float((g["train_seconds"] + g["extra_seconds"]).mean())
        rows.append(row)
    out = pd.DataFrame(rows)
    out["order"] = out["method"].map(order.index)
    return out.sort_values(["alpha", "order"]).drop(columns="order")


def markdown(summary: pd.DataFrame) -> str:
    lines = ["| alpha | method | head acc | tail acc | tail Brier | tail ECE | s / model |",
             "|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        cells = []
        for k in METRICS:
            lo, hi = r[k + "_ci"]
            cells.append(f"{r[k]:.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"| {r['alpha']} | {r['method']} | " + " | ".join(cells) + f" | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted(summary["alpha"].unique())
    fig, axes = plt.subplots(1, len(alphas), figsize=(6 * len(alphas), 4.5), squeeze=False)
    for ax, alpha in zip(axes[0], alphas, strict=True):
        s = summary[summary["alpha"] == alpha]
        x = range(len(s))
        for k, off, color in (("head_acc", -0.2, "tab:blue"), ("tail_acc", 0.2, "tab:red")):
            lo = [m - c[0] for m, c in zip(s[k], s[k + "_ci"], strict=True)]
            hi = [c[1] - m for m, c in zip(s[k], s[k + "_ci"], strict=True)]
            ax.bar([i + off for i in x], s[k], width=0.4, yerr=[lo, hi], color=color,
                   label=k.replace("_acc", " accuracy"), capsize=2)
        ax.set_xticks(list(x), s["method"], rotation=45, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"alpha = {alpha} (mean, 95% CI over {int(s['seeds'].max())} seeds)")
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.95, 0.99])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = ExperimentSettings()
    MODELS.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for alpha in args.alphas:
        for seed in range(args.seeds):
            trained = train_methods(alpha, seed, settings)
            rows += evaluate(trained, settings)
            for method, run in trained.runs.items():
                torch.save(run.model.state_dict(), model_path(alpha, seed, method))
            print(f"alpha {alpha} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(OUT / "cart_longtail.csv", index=False)
    summary = summarise(df)
    table = markdown(summary)
    print(table)
    figure = Path(__file__).with_name("cart_longtail.png")
    plot(summary, figure)
    s = settings
    body = "\n".join([
        "## CART vs baselines on the long-tail task (issue 8)",
        "",
        f"Command: `python benchmarks/cart_longtail.py --alphas {' '.join(map(str, args.alphas))} "
        f"--seeds {args.seeds}` ({time.perf_counter() - start:.0f} s). {machine()}.",
        f"Per (alpha, seed): {s.n_train} training pairs (label noise {s.task.noise}, "
        f"{s.task.n_tail} tail scenarios), a 2-layer d_model {s.hidden_size} Llama reward model "
        f"trained {s.pretrain.steps} steps with plain ERM, CART discovery on it (top "
        f"{s.discovery_top_k} units), then each method fine-tunes a copy for {s.finetune.steps} "
        f"steps (lr {s.finetune.lr}). Evaluation: {s.n_eval} held-out noise-free pairs, half "
        "tail. Calibration: Brier score and ECE of sigmoid(margin) on tail pairs, both "
        "orientations. `s / model`: fine-tuning plus discovery and augmentation where used "
        "(ensembles: all members). Mean [95% t-CI] over seeds.",
        "",
        table,
        "",
        "![CART vs baselines](cart_longtail.png)",
    ])
    if not args.no_write:
        write_section("cart-longtail", body)


if __name__ == "__main__":
    main()
