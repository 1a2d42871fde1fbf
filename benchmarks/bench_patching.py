"""Exact activation patching: tl_reward against TransformerLens, reward-lens 2.0.1 and AtP.

One run, one model, the same pairs for every method: the ~25M-parameter Llama-style reward model
of bench_forward.py (random weights, float32, CPU), ``--pairs`` clean/corrupt pairs of ``--pos``
random tokens (same length: TransformerLens's patching needs it). Every grid is denoising: the
clean activation is written into the corrupt run and the effect is the patched reward minus the
corrupt reward.

- (a) layer x position grid of ``resid_pre`` and the layer x head grid of ``z``:
  ``tl_reward.activation_patch`` vs ``transformer_lens.patching`` (one forward per cell over the
  whole batch of pairs, metric = mean reward of the batch), checked cell by cell;
- (b) per-component (attn_out, mlp_out of every layer) and per-head patching vs reward-lens 2.0.1
  (``reward_lens.legacy.ActivationPatcher``, one pair at a time at batch size 1), checked per
  pair; needs ``pip install reward-lens==2.0.1`` (not a dependency of tl_reward: skipped if absent);
- (c) attribution patching (``tl_reward.attribution_patch``) vs the exact head x position grid:
  wall time and Spearman rank correlation over cells;
- (d) with (b): a plain forward's rate per row at batch 1, 4 and 16 against the peer's batch-1
  forward, and from it the most any exact method can gain over reward-lens on this machine.

FLOPs of each grid (``PatchResult.stats.flops``) are reported against the machine's measured
float32 matmul rate. Peers run ``--repeats`` times, tl_reward at least 3 times, interleaved; the
median is reported.

    python benchmarks/bench_patching.py            # writes its section of benchmarks/RESULTS.md
"""

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's patching draws a bar per grid

import torch
from _results import machine, write_section
from bench_forward import SCALES, build
from scipy.stats import spearmanr

from tl_reward import activation_patch, activation_patch_grids, load_reward_model
from tl_reward.causal._runs import layer_flops, scoring_block_flops
from tl_reward.causal.patching import matmul_rate

VOCAB = 8192
DEVICE = "cpu"  # --device


def sync() -> None:
    """Wait for the GPU's queued work, so that wall time measures it (no-op on the CPU)."""
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------- helpers
def interleaved(runs: dict[str, tuple[Callable, int]]) -> tuple[dict[str, float], dict]:
    """Run each ``fn`` ``n`` times, round-robin; median seconds and the last output of each."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    out: dict[str, object] = {}
    for r in range(max(n for _, n in runs.values())):
        for name, (fn, n) in runs.items():
            if r < n:
                sync()
                start = time.perf_counter()
                out[name] = fn()
                sync()
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, out


def forward_flops(model, n_rows: int, n_pos: int, scoring_only: bool = False) -> float:
    """Matmul FLOPs of ``n_rows`` full forwards of ``n_pos`` tokens (the unit of the peers);
    ``scoring_only``: HookedRewardModel's forward with nothing hooked on the last block (keys
    and values everywhere, the rest of the block at the scoring token)."""
    cfg = model.cfg
    if not scoring_only:
        return n_rows * cfg.n_layers * layer_flops(model, n_pos, n_pos)
    return n_rows * ((cfg.n_layers - 1) * layer_flops(model, n_pos, n_pos)
                     + scoring_block_flops(model, n_pos, n_pos))


SHARED_PROMPT = 0  # --shared-prompt: the source run starts after it


def our_flops(model, results, n_pos: int) -> float:
    """``stats.flops`` of each grid (the patched forwards) plus the target run and the source
    run (which starts after a shared prompt), which the grids of one call share."""
    results = results if isinstance(results, list) else [results]
    n_pairs = results[0].effects.shape[-1]
    source = n_pairs * model.cfg.n_layers * layer_flops(model, n_pos - SHARED_PROMPT, n_pos)
    return (sum(r.stats.flops for r in results) + forward_flops(model, n_pairs, n_pos)
            + source)


def checked(what: str, err: float, tol: float = 1e-4) -> str:
    return f"{what} {err:.1e} {'ok' if err < tol else 'FAIL'}"


class Table:
    """Rows of (grid, method, seconds, FLOPs); ratios are to the last row added with peer=True.

    FLOP rates are shown against ``peak``: the highest matmul rate measured during the run (the
    machine's speed drifts, so one measurement at the start can be exceeded later). A row with a
    ``target`` speed-up also gets the FLOP rate at which its FLOPs would reach the target."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.rows: list[tuple] = []
        self.peer: tuple[float, float | None] = (float("nan"), None)

    def measure_peak(self) -> None:
        self.peak = max(self.peak, matmul_rate(DEVICE, cached=False))

    def add(self, grid: str, method: str, seconds: float, flops: float | None, check: str,
            peer: bool = False, target: float | None = None) -> None:
        if peer:
            self.peer = (seconds, flops)
        self.rows.append((grid, method, seconds, flops, check, peer, target, self.peer))
        print(self._format(self.rows[-1]), flush=True)

    def _format(self, row: tuple) -> str:
        grid, method, seconds, flops, check, peer, target, (peer_s, peer_flops) = row
        gf = f"{flops / 1e9:.0f}" if flops is not None else ""
        frac = f"{100 * flops / seconds / self.peak:.0f}%" if flops and self.peak else ""
        ratio = "1.0x" if peer else f"**{peer_s / seconds:.1f}x**"
        bound = ("1.0x" if peer else
                 f"{peer_flops / flops:.1f}x" if flops and peer_flops is not None else "")
        needs = ""
        if target is not None and flops:
            rate = target * flops / peer_s  # our FLOPs in peer_s / target seconds
            needs = f">= {target:g}x: {rate / 1e9:.0f} GFLOP/s"
            needs += f" ({100 * rate / self.peak:.0f}% of peak)" if self.peak else ""
        return (f"| {grid} | {method} | {seconds:.2f} | {ratio} | {gf} | {bound} | {frac} "
                f"| {needs} | {check} |")

    def markdown(self) -> str:
        head = ("| grid | method | seconds | speed-up | GFLOP | FLOP ratio | % of peak matmul rate "
                "| FLOP rate the target needs | check |\n|---|---|---|---|---|---|---|---|---|")
        return head + "\n" + "\n".join(self._format(r) for r in self.rows)


# ---------------------------------------------------------------------------------- (a) TL
def compare_transformer_lens(model, clean, corrupt, table: Table, n_ours: int, n_peer: int,
                             notes: list[str]) -> dict:
    import transformer_lens.patching as tlp

    n_pairs, n_pos = clean.shape
    cfg = model.cfg

    def tl_grid(fn, hook_suffix):
        def run():
            with torch.no_grad():  # TransformerLens's own demos switch grad off too
                _, cache = model.run_with_cache(clean,
                                                names_filter=lambda n: n.endswith(hook_suffix))
                base = model(corrupt).mean()
                return fn(model, corrupt, cache, lambda reward: reward.mean()) - base
        return run

    runs = {
        "ours resid": (lambda: activation_patch(model, clean, corrupt, hook="resid_pre",
                                                per="layer_pos", progress=False), n_ours),
        "tl resid": (tl_grid(tlp.get_act_patch_resid_pre, "hook_resid_pre"), n_peer),
        "ours head": (lambda: activation_patch(model, clean, corrupt, hook="z", per="head",
                                               progress=False), n_ours),
        "tl head": (tl_grid(tlp.get_act_patch_attn_head_out_all_pos, "hook_z"), n_peer),
    }
    med, out = interleaved(runs)
    ours_resid, ours_head = out["ours resid"], out["ours head"]
    # ours: effects[layer, pos(relative to the scoring token = the last one), pair]
    err_resid = float((ours_resid.mean_effect - out["tl resid"]).abs().max())
    err_head = float((ours_head.mean_effect - out["tl head"]).abs().max())

    # a hook below the last block leaves HookedRewardModel's scoring-token path on
    last, below = n_pos * n_pairs, (cfg.n_layers - 1) * n_pos * n_pairs
    tl_flops_resid = (forward_flops(model, last, n_pos)
                      + forward_flops(model, below, n_pos, scoring_only=True))
    last, below = cfg.n_heads * n_pairs, (cfg.n_layers - 1) * cfg.n_heads * n_pairs
    tl_flops_head = (forward_flops(model, last, n_pos)
                     + forward_flops(model, below, n_pos, scoring_only=True))
    g1 = f"resid_pre layer x pos ({cfg.n_layers}x{n_pos})"
    table.add(g1, "TransformerLens `get_act_patch_resid_pre`", med["tl resid"], tl_flops_resid,
              f"{cfg.n_layers * n_pos} forwards of batch {n_pairs}", peer=True)
    table.add(g1, "tl_reward `activation_patch`", med["ours resid"],
              our_flops(model, ours_resid, n_pos), checked("max diff of pair means", err_resid),
              target=3)
    g2 = f"z layer x head ({cfg.n_layers}x{cfg.n_heads})"
    table.add(g2, "TransformerLens `get_act_patch_attn_head_out_all_pos`", med["tl head"],
              tl_flops_head, f"{cfg.n_layers * cfg.n_heads} forwards of batch {n_pairs}", peer=True)
    table.add(g2, "tl_reward `activation_patch`", med["ours head"],
              our_flops(model, ours_head, n_pos), checked("max diff of pair means", err_head))
    notes.append(
        "TransformerLens runs on the same HookedRewardModel, under `torch.no_grad()` (so its "
        "forwards with a hook below the last block get the model's scoring-token path, and "
        "every forward the weight layout that spares TransformerLens's per-forward weight "
        "copies, see forward-cpu: a faster baseline than a plain HookedTransformer), with the "
        "metric "
        "`reward.mean()` over the batch of pairs (one call on all pairs; its timing includes the "
        "clean cache and the corrupt baseline). Check: tl_reward's per-pair effects averaged over "
        "pairs against TransformerLens's metric minus the corrupt baseline."
    )
    return {"head": ours_head, "head_seconds": med["ours head"]}


# ---------------------------------------------------------------------------------- (b) reward-lens
def word_tokenizer():
    """Word-level tokenizer: "w17" <-> id 17, nothing added, so texts map to our exact ids."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", unk_token="w0")
    # reward-lens formats (prompt, response) with the chat template; ours returns them as they are
    fast.chat_template = "{{ messages[0]['content'] }}{{ messages[1]['content'] }}"
    return fast


def compare_reward_lens(hf, model, clean, corrupt, table: Table, n_ours: int, n_peer: int,
                        notes: list[str]) -> None:
    try:
        import reward_lens
        from reward_lens.legacy import ActivationPatcher, RewardModel
        from reward_lens.model_adapters import LlamaAdapter
    except ImportError as exc:
        msg = (f"reward-lens section skipped (import failed: {exc}); "
               "`pip install reward-lens==2.0.1`")
        print(msg)
        notes.append(msg)
        return
    version = getattr(reward_lens, "__version__", "?")
    tok = word_tokenizer()
    rm = RewardModel(model=hf, tokenizer=tok, adapter=LlamaAdapter(), device=clean.device)
    patcher = ActivationPatcher(rm)
    clean_txt, corrupt_txt = ([" ".join(f"w{i}" for i in row) for row in t.tolist()]
                              for t in (clean, corrupt))
    for txt, ids in zip(clean_txt + corrupt_txt, torch.cat([clean, corrupt]), strict=True):
        got = rm.tokenize_conversation("", txt, max_length=10_000)["input_ids"][0]
        assert torch.equal(got.cpu(), ids.cpu()), "tokenizer does not reproduce the token ids"
    n_pairs, n_pos = clean.shape
    cfg = model.cfg

    def rl(method):
        def run():
            return [getattr(patcher, method)("", c, r, mode="denoising", max_length=10_000,
                                             show_progress=False)
                    for c, r in zip(clean_txt, corrupt_txt, strict=True)]
        return run

    def ours_components():  # one call: the two grids share the clean and corrupt runs
        return activation_patch_grids(model, clean, corrupt,
                                      [("attn_out", "layer"), ("mlp_out", "layer")], progress=False)

    runs = {
        "ours comp": (ours_components, n_ours),
        "rl comp": (rl("patch_all_components"), n_peer),
        "ours head": (lambda: activation_patch(model, clean, corrupt, hook="z", per="head",
                                               progress=False), n_ours),
        "rl head": (rl("patch_all_heads"), n_peer),
    }
    med, out = interleaved(runs)

    # reward-lens: names attn_L{l}, mlp_L{l} (per pair); ours: effects[layer, pair]
    attn, mlp = out["ours comp"]
    rl_comp = torch.tensor([list(r.patch_effects) for r in out["rl comp"]], dtype=torch.float64).T
    ours_comp = torch.stack([attn.effects, mlp.effects], 1).reshape(2 * cfg.n_layers, n_pairs)
    names = out["rl comp"][0].component_names
    assert names[:2] == ["attn_L0", "mlp_L0"], names[:4]
    err_comp = float((rl_comp - ours_comp.double().cpu()).abs().max())
    rl_head = torch.tensor([list(r.patch_effects) for r in out["rl head"]], dtype=torch.float64).T
    ours_head = out["ours head"].effects.reshape(cfg.n_layers * cfg.n_heads, n_pairs)
    err_head = float((rl_head - ours_head.double().cpu()).abs().max())

    comp_fwd = (2 + 2 * cfg.n_layers) * n_pairs  # 2 cached runs + 1 per component, per pair
    head_fwd = (4 + cfg.n_layers * cfg.n_heads) * n_pairs  # 2 scores + 2 captures + 1 per head
    g1 = f"attn_out + mlp_out per layer ({2 * cfg.n_layers} components)"
    table.add(g1, f"reward-lens {version} `patch_all_components`", med["rl comp"],
              forward_flops(model, comp_fwd, n_pos), f"{comp_fwd} forwards of batch 1", peer=True)
    table.add(g1, "tl_reward `activation_patch_grids`", med["ours comp"],
              our_flops(model, out["ours comp"], n_pos),
              checked("max per-pair diff", err_comp), target=5)
    g2 = f"z per head ({cfg.n_layers * cfg.n_heads} heads)"
    table.add(g2, f"reward-lens {version} `patch_all_heads`", med["rl head"],
              forward_flops(model, head_fwd, n_pos), f"{head_fwd} forwards of batch 1", peer=True)
    table.add(g2, "tl_reward `activation_patch`", med["ours head"],
              our_flops(model, out["ours head"], n_pos), checked("max per-pair diff", err_head),
              target=5)
    notes.append(
        f"reward-lens {version} wraps the same HF `LlamaForSequenceClassification` object "
        "(`reward_lens.legacy.RewardModel(model, tokenizer, LlamaAdapter(), device)`) with a local "
        "word-level tokenizer whose texts give exactly our token ids (asserted); prompt '' and the "
        "whole sequence as the response. It is run with `mode='denoising'`, whose effect "
        "(original_diff - patched_diff = patched - corrupt reward) is tl_reward's `denoise` "
        "effect; its default `mode='noising'` reports clean - patched, i.e. minus tl_reward's "
        "`noise` effect (normalised effects agree in both modes). "
        "It patches a component at every position at once (no per-position grid), one pair at a "
        "time at batch size 1, and aligns clean and corrupt from the left (same lengths here, so "
        "the alignment does not matter); `patch_all_heads` adds the (source - target) per-head "
        "difference to o_proj's input, which equals replacing `z`. tl_reward's component row "
        "is one `activation_patch_grids` call: its attn_out and mlp_out grids share the clean and "
        "corrupt runs, as `patch_all_components` shares its two cached runs."
    )


# ---------------------------------------------------------------------------------- (c) AtP
def compare_atp(model, clean, corrupt, table: Table, n_ours: int, n_peer: int,
                notes: list[str], head_result=None) -> None:
    try:
        from tl_reward.causal.atp import attribution_patch
    except ImportError as exc:
        msg = f"AtP section skipped (tl_reward.causal.atp not importable: {exc})"
        print(msg)
        notes.append(msg)
        return
    cfg = model.cfg
    n_pairs, n_pos = clean.shape
    runs = {
        "exact": (lambda: activation_patch(model, clean, corrupt, hook="z", per="head_pos",
                                           progress=False), n_peer),
        "atp": (lambda: attribution_patch(model, clean, corrupt, hooks=("z",), progress=False),
                max(n_ours, 5)),
    }
    med, out = interleaved(runs)
    exact, atp = out["exact"], out["atp"]
    est = atp.as_patch_result("z", "head_pos").effects
    keep = ~torch.isnan(exact.effects)
    rho_cells = spearmanr(exact.effects[keep].cpu(), est[keep].cpu()).statistic
    est_mean = atp.as_patch_result("z", "head_pos").mean_effect
    rho_mean = spearmanr(exact.mean_effect.flatten().cpu(), est_mean.flatten().cpu()).statistic
    check = (f"Spearman rho {rho_cells:.3f} over {int(keep.sum())} cells x pairs, "
             f"{rho_mean:.3f} on pair means")
    if head_result is not None:
        est_head = atp.as_patch_result("z", "head").effects
        rho_head = spearmanr(head_result.effects.flatten().cpu(), est_head.flatten().cpu()).statistic
        check += f"; per head (all positions) {rho_head:.3f}"
    g = f"z head x pos ({cfg.n_layers}x{cfg.n_heads}x{n_pos})"
    table.add(g, "tl_reward exact `activation_patch`", med["exact"], our_flops(model, exact, n_pos),
              f"{exact.stats.n_forwards} forwards, {exact.stats.n_rows} rows", peer=True)
    table.add(g, "tl_reward AtP `attribution_patch`", med["atp"], atp.stats.flops, check,
              target=50)
    notes.append(
        "AtP: `attribution_patch(hooks=('z',))` (two forwards and one backward for all cells) "
        "against the exact head x position grid on the same pairs; Spearman rank correlation "
        "(scipy) between estimates and exact effects. Random weights: the effects are small and "
        "the ranking is a property of this model, not of trained reward models."
    )


# ---------------------------------------------------------------------------------- (d) ceiling
def batching_ceiling(hf, model, n_pos: int, repeats: int = 7) -> tuple[float, list[str]]:
    """The fastest FLOP rate a plain forward of this model reaches here, at any batch size.

    Times a full forward of ``n_pos`` random tokens, HF and HookedRewardModel (nothing hooked:
    its last block at the scoring token), at batch 1, 4 and 16 (medians of ``repeats``
    interleaved runs); returns the best matmul FLOP rate and table rows."""
    gen = torch.Generator().manual_seed(1)
    runs, flops = {}, {}
    for batch in (1, 4, 16):
        tokens = torch.randint(1, VOCAB, (batch, n_pos), generator=gen).to(DEVICE)
        runs[("HF", batch)] = ((lambda t=tokens: hf(t).logits), repeats)
        flops[("HF", batch)] = forward_flops(model, batch, n_pos)
        runs[("HookedRewardModel", batch)] = ((lambda t=tokens: model(t)), repeats)
        flops[("HookedRewardModel", batch)] = forward_flops(model, batch, n_pos, scoring_only=True)
    with torch.no_grad():
        for fn, _ in runs.values():  # warm-up
            fn()
        med, _ = interleaved(runs)
    rate = {k: flops[k] / med[k] for k in runs}
    rows = [f"| {name} | {batch} | {1e3 * med[(name, batch)] / batch:.1f} | "
            f"{rate[(name, batch)] / 1e9:.0f} |" for name, batch in runs]
    return max(rate.values()), rows


GPU_NOTE = (
    "On the GPU a forward of a few hundred tokens leaves the device mostly idle (see the % of the "
    "matmul rate): a method's time follows the number of forwards it runs more than its FLOPs. "
    "tl_reward runs many cells in one forward as rows of a batch (at most `max_rows`): the cells "
    "of a per-position or per-head grid, and in the per-layer component grid the rows of every "
    "layer, which join one forward at the block after their patch (2 forwards per grid here)."
)


# ---------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--pos", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of the peers (tl_reward runs max(3, repeats) times)")
    parser.add_argument("--shared-prompt", type=int, default=0,
                        help="clean and corrupt share their first N tokens (a preference pair's "
                             "prompt); 0: two unrelated sequences")
    parser.add_argument("--skip-reward-lens", action="store_true")
    parser.add_argument("--skip-atp", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--scale", default="small", choices=SCALES,
                        help="small: 24.6M parameters; large: 0.8B (for a GPU)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = device = args.device

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        hf = build(device, args.scale)
        n_params = sum(p.numel() for p in hf.parameters())
        model = load_reward_model(hf)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(1, VOCAB, (args.pairs, args.pos), generator=gen)
    corrupt = torch.randint(1, VOCAB, (args.pairs, args.pos), generator=gen)
    if not 0 <= args.shared_prompt < args.pos:
        parser.error(f"--shared-prompt must lie in [0, --pos), got {args.shared_prompt}")
    corrupt[:, : args.shared_prompt] = clean[:, : args.shared_prompt]
    clean, corrupt = clean.to(device), corrupt.to(device)
    global SHARED_PROMPT
    SHARED_PROMPT = args.shared_prompt
    with torch.no_grad():  # warm-up, and the parity the comparisons rest on
        r_hf = hf(torch.cat([clean, corrupt])).logits[:, 0]
        r_ours = model(torch.cat([clean, corrupt]))
    parity = float((r_hf - r_ours).abs().max())
    gap = (r_ours[: args.pairs] - r_ours[args.pairs:])

    where = machine() + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else "")
    table = Table()
    table.measure_peak()
    print(f"matmul rate: {table.peak / 1e9:.1f} GFLOP/s; {where}")
    notes: list[str] = []
    n_ours, n_peer = max(3, args.repeats), args.repeats

    t0 = time.perf_counter()
    res = compare_transformer_lens(model, clean, corrupt, table, n_ours, n_peer, notes)
    print(f"(a) TransformerLens done in {time.perf_counter() - t0:.0f}s")
    table.measure_peak()
    if args.skip_reward_lens:
        notes.append("reward-lens section skipped (--skip-reward-lens).")
    else:
        t0 = time.perf_counter()
        compare_reward_lens(hf, model, clean, corrupt, table, n_ours, n_peer, notes)
        print(f"(b) reward-lens done in {time.perf_counter() - t0:.0f}s")
        table.measure_peak()
    if args.skip_atp:
        notes.append("AtP section skipped (--skip-atp).")
    else:
        t0 = time.perf_counter()
        compare_atp(model, clean, corrupt, table, n_ours, n_peer, notes, head_result=res["head"])
        print(f"(c) AtP done in {time.perf_counter() - t0:.0f}s")
        table.measure_peak()

    ceiling_note = ""
    if not args.skip_reward_lens:
        rate, ceiling_rows = batching_ceiling(hf, model, args.pos)
        # tl_reward's two cached runs run their last block at every position (the cache hooks
        # observe it); an exact method could run it at the scoring token alone
        waste = sum(args.pairs * (layer_flops(model, n_new, args.pos)
                                  - scoring_block_flops(model, n_new, args.pos))
                    for n_new in (args.pos, args.pos - args.shared_prompt))
        bounds = [(grid, peer_s, (flops - waste)) for grid, _, _, flops, _, _, target,
                  (peer_s, _) in table.rows if target == 5 and flops]
        ceiling_note = (
            f"\n\nThe most an exact method can gain over reward-lens here. A plain forward of "
            f"{args.pos} tokens (median of 7 interleaved runs, nothing hooked):\n\n| forward | "
            "batch | ms per row | GFLOP/s |\n|---|---|---|---|\n" + "\n".join(ceiling_rows)
            + "\n\nAn exact method runs at least tl_reward's FLOPs less the last block of its two "
            "cached runs away from the scoring tokens (tl_reward recomputes what a patch changes "
            "and nothing else, but runs that block everywhere: "
            f"{waste / 1e9:.1f} GFLOP). Built on HF's or TransformerLens's forward it runs them "
            f"at most at the fastest rate above, {rate / 1e9:.0f} GFLOP/s, so its speed-up over "
            "reward-lens is at most the peer's seconds over (those FLOPs / that rate): " + "; ".join(
                f"{grid}: {peer_s:.2f} s / ({need / 1e9:.1f} GFLOP / {rate / 1e9:.0f} GFLOP/s) = "
                f"{peer_s * rate / need:.1f}x" for grid, peer_s, need in bounds)
            + " (target 5x)."
        )
        print(ceiling_note)
    flags = [f"--device {device}"] * (device != "cpu") + [f"--scale {args.scale}"] * (
        args.scale != "small") + [f"--pairs {args.pairs}", f"--pos {args.pos}", f"--repeats {args.repeats}"]
    flags += [f"--shared-prompt {args.shared_prompt}"] * bool(args.shared_prompt)
    flags += ["--skip-reward-lens"] * args.skip_reward_lens + ["--skip-atp"] * args.skip_atp
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    if device.startswith("cuda"):
        notes.append(GPU_NOTE)
    notes.append(
        "What bounds the all-position grids (per layer, per head): patching a component at every "
        "position changes every position from the patched layer on, so an exact method has to "
        "recompute them. tl_reward recomputes only those: it skips the layers before the patch, "
        "the positions after the scoring token and the last block's work away from the scoring "
        "token, about half of one forward per cell on this "
        f"{model.cfg.n_layers}-layer model (the FLOP ratio). The rest of a speed-up has to come "
        "from running those FLOPs at a higher rate than the peer does: batching, which pays "
        "most where a forward's fixed costs dominate (short sequences, GPUs); on a CPU a forward's "
        "rate stops rising at a few rows of 64 tokens. The column 'FLOP "
        "rate the target needs' is the rate at which tl_reward's FLOPs would take the peer's "
        "time divided by the target; above 100% of the peak, no implementation that runs those "
        "FLOPs reaches the target on this machine. Per-position grids also skip the positions "
        "before the patch (cached keys and values). When clean "
        "and corrupt share a prompt (--shared-prompt), every grid starts at the first position "
        "where they differ: the prompt's activations are the same in both runs, so a patch "
        "cannot change them (cells inside the prompt are exactly 0 without a forward); the "
        "peers recompute the prompt for every cell."
    )
    shared = (f"; both share their first {args.shared_prompt} tokens, a prompt, and differ in the "
              f"last {args.pos - args.shared_prompt}, the responses" if args.shared_prompt else
              "; unrelated sequences, nothing shared")
    body = f"""## Activation patching: tl_reward vs TransformerLens, reward-lens and AtP (issue 5)

Command: `{prefix}python benchmarks/bench_patching.py {' '.join(flags)}`
Llama-style reward model, {n_params / 1e6:.1f}M parameters ({model.cfg.n_layers} layers,
{model.cfg.n_heads} heads), float32, {device}; {where}.
{args.pairs} pairs of {args.pos} random tokens (clean and corrupt of the same length{shared}), denoising
(clean written into corrupt; effect = patched - corrupt reward). Max |reward difference|
HookedRewardModel vs HF on these sequences: {parity:.1e}; clean - corrupt reward gaps
{', '.join(f'{g:+.3f}' for g in gap.tolist())}.
Peak float32 matmul rate: {table.peak / 1e9:.1f} GFLOP/s (fastest 2048^3 `torch.mm` of 5, measured before
and after each section; the highest). Seconds: median of
{n_ours} interleaved runs for tl_reward, {n_peer} for the peers and for the exact grid AtP is
compared with. GFLOP: matmul FLOPs the method runs (tl_reward: `PatchResult.stats.flops` plus its
clean and corrupt cached runs, the source run from the end of the shared prompt; peers: their
forwards x one forward's FLOPs). FLOP ratio: the peer's FLOPs over ours, the speed-up at equal FLOP rate (what skipping work buys; the rest is efficiency).
Targets: >= 3x TransformerLens, >= 5x reward-lens, AtP >= 50x the exact grid.

{table.markdown()}

{chr(10).join(f'- {n}' for n in notes)}{ceiling_note}
"""
    print(body)
    if not args.no_write:  # one section per device and problem size ("patching-cpu": default)
        default = (args.pairs, args.pos) == (parser.get_default("pairs"), parser.get_default("pos"))
        kind = torch.device(device).type
        key = f"patching-{kind}" if default else f"patching-{kind}-{args.pairs}x{args.pos}"
        key += f"-prompt{args.shared_prompt}" if args.shared_prompt else ""
        write_section(key + (f"-{args.scale}" if args.scale != "small" else ""), body)


if __name__ == "__main__":
    main()
