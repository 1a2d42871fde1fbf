"""Correctness on an accelerator: the test suite's central checks, run on ``--device``.

CI has no GPU, so this is run by hand where one is lent (its figures go to RESULTS.md):

- parity: every architecture of the test suite (tiny random configs, float32, GQA where the
  architecture has it, left and right padding, with and without ``fold_ln``, the scoring-token
  path and the full forward) against the HF model's own forward on the same device, each
  sequence alone, unpadded (the tolerance of the suite: 1e-4);
- patching: ``activation_patch`` on the device against ``transformer_lens.patching`` on the
  device (each pair alone; 1e-5) and against ``activation_patch`` on the CPU, for the suite's
  TransformerLens cases, on unrelated pairs and on pairs sharing a prompt;
- ``activation_patch_grids`` against one grid at a time, and attribution patching against the
  CPU;
- precision: the twelve read-out, attribution and patching tools of ``tests/test_dtypes.py`` on
  models in bfloat16, float16 and float64 on the device, against the same model in a reference
  precision on the device (the test's tolerances, relative to the largest value).

    python benchmarks/device_check.py --device cuda      # writes its section of RESULTS.md
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's patching draws a bar per grid

import torch  # noqa: E402
from _results import machine, write_section

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import (  # noqa: E402
    ARCHS,
    GQA_ARCHS,
    TL_CASES,
    make_hf_model,
    pad_batch,
    ragged_sequences,
)
from test_dtypes import PRECISIONS, precision_errors, precision_inputs  # noqa: E402

from tl_reward import activation_patch, activation_patch_grids, load_reward_model  # noqa: E402
from tl_reward.causal.atp import attribution_patch  # noqa: E402

PARITY_TOL, PATCH_TOL = 1e-4, 1e-5
PATCH_ARCHS = [("llama", True), ("qwen3", True), ("gemma2", True), ("gpt2", False),
               ("gpt_neox", False)]


def parity(device: str) -> tuple[list[str], float]:
    rows, worst = [], 0.0
    for arch in ARCHS:
        for gqa in ([False, True] if arch in GQA_ARCHS else [False]):
            hf = make_hf_model(arch, gqa).to(device)
            seqs = ragged_sequences(seed=1)
            with torch.no_grad():
                truth = torch.cat([hf(torch.tensor([s], device=device)).logits for s in seqs])[:, 0]
            errs = []
            for fold_ln in (False, True):
                model = load_reward_model(hf, fold_ln=fold_ln)
                for side in ("right", "left"):
                    tokens, mask = (t.to(device) for t in pad_batch(seqs, side))
                    for fast in (True, False):
                        model.fast_pooling = fast
                        with torch.no_grad():
                            errs.append(float((model(tokens, attention_mask=mask) - truth).abs().max()))
            err = max(errs)
            worst = max(worst, err)
            rows.append(f"| {arch}{' (GQA)' if gqa else ''} | {len(errs)} | {err:.1e} | "
                        f"{'ok' if err < PARITY_TOL else 'FAIL'} |")
    return rows, worst


def _tl_effects(model, clean, corrupt, tl_fn, perm) -> torch.Tensor:
    """TransformerLens's patching of each pair alone, minus the corrupt reward: [..., pair]."""
    out = []
    for i in range(len(clean)):
        _, cache = model.run_with_cache(clean[i : i + 1])
        with torch.no_grad():
            ref = tl_fn(model, corrupt[i : i + 1], cache, lambda r: r[0]) - model(corrupt[i : i + 1])[0]
        out.append(ref.permute(*perm) if perm else ref)
    return torch.stack(out, -1)


def patching(device: str) -> tuple[list[str], float]:
    rows, worst = [], 0.0
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 97, (3, 9), generator=gen)
    corrupt = torch.randint(3, 97, (3, 9), generator=gen)
    shared = corrupt.clone()
    shared[:, :4] = clean[:, :4]  # a shared prompt
    for arch, gqa in PATCH_ARCHS:
        hf = make_hf_model(arch, gqa)
        cpu_model = load_reward_model(hf)
        model = load_reward_model(hf.to(device))
        for name, corr in (("unrelated", corrupt), ("shared prompt", shared)):
            c, r = clean.to(device), corr.to(device)
            err_tl = err_cpu = 0.0
            for hook, per, tl_fn, perm in TL_CASES:
                ours = activation_patch(model, c, r, hook=hook, per=per, progress=False)
                on_cpu = activation_patch(cpu_model, clean, corr, hook=hook, per=per, progress=False)
                ref = _tl_effects(model, c, r, tl_fn, perm)
                err_tl = max(err_tl, float((ours.effects - ref).abs().max()))
                err_cpu = max(err_cpu, float((ours.effects.cpu() - on_cpu.effects).nan_to_num().abs().max()))
            worst = max(worst, err_tl)
            rows.append(f"| {arch}{' (GQA)' if gqa else ''} | {name} | {len(TL_CASES)} | "
                        f"{err_tl:.1e} | {err_cpu:.1e} | {'ok' if err_tl < PATCH_TOL else 'FAIL'} |")
    return rows, worst


def grids_and_atp(device: str) -> list[str]:
    hf = make_hf_model("llama", True)
    model, cpu_model = load_reward_model(hf.to(device)), load_reward_model(hf.cpu())
    clean, c_mask = pad_batch(ragged_sequences(seed=3), "left")
    corrupt, r_mask = pad_batch(ragged_sequences(seed=4), "right")
    kw = dict(clean_mask=c_mask.to(device), corrupt_mask=r_mask.to(device), progress=False)
    grids = [("attn_out", "layer"), ("mlp_out", "layer"), ("z", "head_pos"), ("mlp_post", "neuron")]
    together = activation_patch_grids(model, clean.to(device), corrupt.to(device), grids, **kw)
    err = max(float((activation_patch(model, clean.to(device), corrupt.to(device), hook=h, per=p, **kw)
                     .effects - t.effects).nan_to_num().abs().max())
              for (h, p), t in zip(grids, together, strict=True))
    hooks = ("z", "mlp_post", "resid_pre")
    atp = attribution_patch(model, clean.to(device), corrupt.to(device), hooks=hooks, **kw)
    atp_cpu = attribution_patch(cpu_model, clean, corrupt, hooks=hooks, clean_mask=c_mask,
                                corrupt_mask=r_mask, progress=False)
    err_atp = max(float((atp.as_patch_result(h, p).effects.cpu()
                         - atp_cpu.as_patch_result(h, p).effects).nan_to_num().abs().max())
                  for h, p in (("z", "head_pos"), ("mlp_post", "neuron"), ("resid_pre", "layer_pos")))
    return [f"- `activation_patch_grids` ({len(grids)} grids, ragged left/right-padded pairs) vs one "
            f"grid at a time on {device}: max |difference| {err:.1e}.",
            f"- `attribution_patch` (z, mlp_post, resid_pre) on {device} vs the CPU: max |difference| "
            f"{err_atp:.1e}."]


def precision(device: str) -> tuple[list[str], bool]:
    """Every tool of tests/test_dtypes.py in each precision on the device, against the reference
    precision on the device; the test's tolerance applies to its model (Llama, GQA), the other
    architectures are reported against it."""
    rows, ok = [], True

    def short(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    for arch, gqa in PATCH_ARCHS:
        hf = make_hf_model(arch, gqa).to(device)
        for dtype, reference, tol in PRECISIONS:
            try:
                errs = precision_errors(load_reward_model(hf, dtype=dtype),
                                        load_reward_model(hf, dtype=reference),
                                        *precision_inputs(device))
            except Exception as exc:  # a crash is what this section is for
                ok = False
                rows.append(f"| {arch}{' (GQA)' if gqa else ''} | {short(dtype)} | "
                            f"{short(reference)} | | {type(exc).__name__}: {exc} | FAIL |")
                continue
            name, worst = max(errs.items(), key=lambda kv: kv[1])
            tested = arch == "llama"
            ok &= worst <= tol or not tested
            check = ("ok" if worst <= tol else "FAIL" if tested
                     else f"above the test's {tol:g} (not its model)")
            rows.append(f"| {arch}{' (GQA)' if gqa else ''} | {short(dtype)} | {short(reference)} "
                        f"| {len(errs)} | {worst:.1e} ({name}) | {check} |")
    return rows, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    device = args.device
    started = time.perf_counter()
    where = machine() + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else "")
    par_rows, par_worst = parity(device)
    patch_rows, patch_worst = patching(device)
    extra = grids_and_atp(device)
    prec_rows, prec_ok = precision(device)
    ok = par_worst < PARITY_TOL and patch_worst < PATCH_TOL and prec_ok
    body = f"""## Correctness on {device} (issues 2 and 5)

Command: `python benchmarks/device_check.py --device {device}` ({time.perf_counter() - started:.0f} s).
{where}. float32 (TF32 off, torch's default). Verdict: {'all checks pass' if ok else 'FAILURES'}.

Parity with the HF model's own forward on {device}, each sequence alone (tiny random configs of the
test suite; fold_ln off/on x right/left padding x scoring-token path/full forward; tolerance 1e-4):

| architecture | forwards | max abs reward error | check |
|---|---|---|---|
{chr(10).join(par_rows)}

`activation_patch` on {device} against `transformer_lens.patching` on {device} (each pair alone,
tolerance 1e-5) and against `activation_patch` on the CPU, over the suite's TransformerLens cases
(resid_pre, attn_out, mlp_out per layer x position; z per head and head x position; v per head x
position; pattern per head), 3 pairs of 9 tokens, unrelated or sharing a 4-token prompt:

| architecture | pairs | cases | max diff to TransformerLens | max diff to the CPU | check |
|---|---|---|---|---|---|
{chr(10).join(patch_rows)}

{chr(10).join(extra)}

Precision: the tools of `tests/test_dtypes.py` (patching z per head, resid_pre per layer x
position, the component grids, mean ablation, path patching, AtP, pair attribution per neuron,
attribution per head source, the lens with cached and recomputed norm, SAE attribution direct and
gradient) on a model in each precision on {device}, against the same model in the reference
precision on {device}; outputs in float32 at least (checked); the largest error relative to the
reference's largest value, and the tool it came from. The test's tolerance (bfloat16 0.1, float16
0.02, float64 1e-4) holds for its model, Llama with GQA; other architectures are shown against it.

| architecture | precision | reference | tools | worst relative error | check |
|---|---|---|---|---|---|
{chr(10).join(prec_rows)}
"""
    print(body)
    if not args.no_write:
        write_section(f"device-check-{torch.device(device).type}", body)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
