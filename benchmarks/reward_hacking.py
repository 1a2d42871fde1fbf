"""Best-of-n against each trained reward model, with the task's gold reward as ground truth.

    python benchmarks/reward_hacking.py          # after cart_longtail.py; writes RESULTS.md

For the alpha = 0.99 models of ``cart_longtail.py`` (trained here when they are missing): 40 head
and 40 tail prompts of the evaluation set, 256 policy samples per prompt
(``LongTailTask.sample_responses``), and for n = 1..256 the exact expectation over random
n-subsets of the gold reward of the response the model ranks first (the Goodhart curve), its
proxy reward (z-scored per prompt) and the fraction of picked responses that use a tail key
word. Mean [95% t-CI] over seeds.
"""

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from _results import machine, write_section
from cart_longtail import model_path

from tl_reward.cart.experiment import (
    METHODS,
    ExperimentSettings,
    _base_model,
    best_of_n,
    eval_set,
    mean_ci,
    train_methods,
)

NS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def models_for(alpha: float, seed: int, settings: ExperimentSettings):
    from dataclasses import replace

    task = replace(settings.task, alpha=alpha)
    if all(model_path(alpha, seed, m).exists() for m in METHODS):
        out = {}
        for m in METHODS:
            model = _base_model(task, settings, seed)
            model.load_state_dict(torch.load(model_path(alpha, seed, m)))
            out[m] = model.eval()
        return task, out
    trained = train_methods(alpha, seed, settings)
    return task, {m: r.model.eval() for m, r in trained.runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=40, help="per kind (head, tail)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = ExperimentSettings()
    rows, start = [], time.perf_counter()
    for seed in range(args.seeds):
        task, models = models_for(args.alpha, seed, settings)
        ev = eval_set(task, settings, seed)
        prompts = ([p.prompt for p in ev.head()][: args.prompts]
                   + [p.prompt for p in ev.tail()][: args.prompts])
        for method, model in models.items():
            res = best_of_n(model, task, prompts, ns=NS, seed=seed)
            for kind in res.gold:
                for i, n in enumerate(NS):
                    rows.append({"seed": seed, "method": method, "prompts": kind, "n": n,
                                 "gold": float(res.gold[kind][i]), "proxy_z": float(res.proxy[kind][i]),
                                 "key_word_fraction": float(res.key_word_fraction[kind][i])})
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    df = pd.DataFrame(rows)
    out = Path(__file__).with_name("out")
    out.mkdir(exist_ok=True)
    df.to_csv(out / "reward_hacking.csv", index=False)

    agg = (df.groupby(["method", "prompts", "n"], sort=False)
             .agg(gold=("gold", lambda g: mean_ci(g.tolist())),
                  key=("key_word_fraction", "mean")).reset_index())
    lines = ["| method | prompts | gold n=1 | gold n=16 | gold n=256 [95% CI] | gold(256) - gold(16) | key-word share n=256 |",
             "|---|---|---|---|---|---|---|"]
    for (method, kind), g in agg.groupby(["method", "prompts"], sort=False):
        by_n = g.set_index("n")
        g1, g16, g256 = (by_n.loc[n, "gold"] for n in (1, 16, 256))
        drop = df[(df.method == method) & (df.prompts == kind)].pivot(index="seed", columns="n", values="gold")
        d = mean_ci((drop[256] - drop[16]).tolist())
        lines.append(f"| {method} | {kind} | {g1[0]:.2f} | {g16[0]:.2f} | {g256[0]:.2f} "
                     f"[{g256[1]:.2f}, {g256[2]:.2f}] | {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] | "
                     f"{by_n.loc[256, 'key']:.2f} |")
    table = "\n".join(lines)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ("head", "tail"), strict=True):
        for method, g in agg[agg.prompts == kind].groupby("method", sort=False):
            ax.plot(g["n"], [v[0] for v in g["gold"]], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n (best-of-n)")
        ax.set_ylabel("gold reward of the pick")
        ax.set_title(f"{kind} prompts (alpha = {args.alpha})")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("reward_hacking.png"), dpi=110)

    body = "\n".join([
        "## Best-of-n over-optimisation (issue 8)",
        "",
        f"Command: `python benchmarks/reward_hacking.py --alpha {args.alpha} --seeds {args.seeds}` "
        f"({time.perf_counter() - start:.0f} s, models of `cart_longtail.py`). {machine()}.",
        f"{args.prompts} head and {args.prompts} tail prompts per seed, 256 policy samples each; "
        "exact expectation over n-subsets. The gold reward of the best-of-n pick; a curve that "
        "falls as n grows is over-optimisation (Goodhart). Key-word share: picks that use a tail "
        "scenario's key word.",
        "",
        table,
        "",
        "![Goodhart curves](reward_hacking.png)",
    ])
    if not args.no_write:
        write_section("reward-hacking", body)


if __name__ == "__main__":
    main()
