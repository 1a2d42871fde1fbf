"""Measured figures of tl_reward.sae on the organisms (CPU, float32).

    python benchmarks/bench_sae.py [--seeds 3]     # writes its section of benchmarks/RESULTS.md

Reports: the completeness error of direct attribution (rows + read-out bias vs the model's own
reward) and the reward change from splicing random SAEs with their error term; for SAEs trained
on the planted organism's final residual (one per seed): training time, the feature first in
margin attribution on the trigger pairs, its cosine with the planted neuron's write, where it
fires, its share of the margin, and how well each attribution predicts its own intervention.
"""

import argparse
import time

import torch
from _results import machine, write_section
from sae_lens import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

import tl_reward.sae as S
from tl_reward import organisms
from tl_reward.organisms import planted as P

N_PAIRS = 100


def random_sae(hook: str, arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg_cls, cls = {"standard": (StandardSAEConfig, StandardSAE), "topk": (TopKSAEConfig, TopKSAE),
                    "jumprelu": (JumpReLUSAEConfig, JumpReLUSAE)}[arch]
    cfg = cfg_cls(d_in=64, d_sae=256, **({"k": 8} if arch == "topk" else {}))
    cfg.metadata.hook_name = hook
    sae = cls(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        if hasattr(sae, "b_enc"):
            sae.b_enc.normal_(0, 0.5)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.2)
    return sae


def splice_and_completeness() -> list[str]:
    worst_splice, worst_direct = 0.0, 0.0
    for name in ("planted", "longtail"):
        model, _, data = organisms.load(name)
        texts = data.chosen_texts[:N_PAIRS] + data.rejected_texts[:N_PAIRS]
        tokens, mask = model.pad(model.tokenize(texts))
        with torch.no_grad():
            reward = model(tokens, attention_mask=mask)
        for i, hook in enumerate(("blocks.0.hook_resid_post", "blocks.1.hook_attn_out",
                                  "blocks.1.hook_resid_post")):
            for arch in ("standard", "topk", "jumprelu"):
                sae = random_sae(hook, arch, seed=i)
                with torch.no_grad(), S.attach_saes(model, sae):
                    spliced = model(tokens, attention_mask=mask)
                worst_splice = max(worst_splice, float((spliced - reward).abs().max()))
                res = S.sae_reward_attribution(model, sae, tokens, mask, method="direct",
                                               progress=False)
                err = float((res.values.sum(0) + res.bias - reward).abs().max())
                worst_direct = max(worst_direct, err)
    return [f"random SAEs with error term (3 architectures x 3 hooks x 2 organisms, "
            f"{2 * N_PAIRS} texts each): max |reward change| = {worst_splice:.2e}",
            f"direct attribution, same SAEs: max |rows + bias - reward| = {worst_direct:.2e}"]


def planted(seeds: int) -> list[str]:
    model, _, data = organisms.load("planted")
    trig = data.by_scenario("trigger")[:N_PAIRS]
    quality = data.by_scenario("quality")[:N_PAIRS]
    layer, neuron = P.TRIGGER_NEURON
    w_out = model.blocks[layer].mlp.W_out[neuron].detach()
    lines = []
    for seed in range(seeds):
        started = time.perf_counter()
        sae = S.train_sae(model, data, "blocks.1.hook_resid_post", d_sae=128, seed=seed,
                          progress=False)
        seconds = time.perf_counter() - started
        attr = S.sae_pair_attribution(model, sae, trig.chosen_texts, trig.rejected_texts,
                                      progress=False)
        f = int(attr.top(1).feature[0])
        completeness = float((attr.values.sum(0) - attr.reward).abs().max())
        on = S.sae_dataset_features(model, sae, trig, progress=False)
        off = S.sae_dataset_features(model, sae, quality, progress=False)
        cos = float(torch.cosine_similarity(sae.W_dec[f].detach(), w_out, dim=0))
        integrated = S.sae_pair_attribution(model, sae, trig.chosen_texts, trig.rejected_texts,
                                            method="integrated", steps=16, progress=False)
        zero = S.sae_pair_feature_ablation(model, sae, trig.chosen_texts, trig.rejected_texts,
                                           features=[f], progress=False).agreement().iloc[0]
        patch = S.sae_feature_ablation(model, sae, trig.rejected_texts, features=[f], mode="patch",
                                       source=trig.chosen_texts, progress=False)
        ig = patch.agreement(predicted=integrated.feature_values()[[f]]).iloc[0]
        share = float(attr.feature_values()[f].mean() / attr.reward.mean())
        lines.append(f"seed {seed}: trained in {seconds:.1f} s (l0 {sae.cfg.metadata.l0:.2f}); "
              f"feature {f}: rank {attr.rank(f)} direct / {integrated.rank(f)} integrated, "
              f"share of margin {share:.2f}, cosine with W_out[L1N11] {cos:.3f}, fires on "
              f"trigger chosen {float(on.chosen_max[f].gt(0).float().mean()):.2f} / rejected "
              f"{float(on.rejected_max[f].gt(0).float().mean()):.2f} / quality "
              f"{float(torch.cat([off.chosen_max[f], off.rejected_max[f]]).gt(0).float().mean()):.2f}; "
              f"completeness {completeness:.1e}")
        lines.append(f"    zero on both sides: measured {zero.measured:+.2f}, direct predicts "
              f"{zero.predicted:+.2f} (ratio {zero.ratio:.2f}, r {zero.pearson_r:.2f}); "
              f"patch chosen->rejected: measured {ig.measured:+.2f}, integrated predicts "
              f"{ig.predicted:+.2f} (ratio {ig.ratio:.2f}, r {ig.pearson_r:.2f}); "
              f"integrated completeness {float(integrated.completeness().abs().max()):.1e}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    lines = splice_and_completeness() + planted(args.seeds)
    body = "\n".join([
        "## SAE attribution on the organisms (`bench_sae.py`)",
        "",
        f"`python benchmarks/bench_sae.py --seeds {args.seeds}` ({machine()}; "
        f"{time.perf_counter() - started:.0f} s in all, float32)",
        "",
        "```",
        *lines,
        "```",
    ])
    print(body)
    if not args.no_write:
        write_section("sae", body)


if __name__ == "__main__":
    main()
