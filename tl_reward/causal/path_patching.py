"""Path patching: the effect of a sender (attention head or MLP) through one path only.

The corrupt run is kept everywhere except on the chosen path: the sender's clean-minus-corrupt
output is added to the receiver's input alone (an attention head's query, key or value input, an
MLP's input, or the final residual the reward head reads), and everything downstream of the
receiver is recomputed. Components between sender and receiver keep their corrupt values, so only
the direct sender -> receiver path carries the change (Wang et al., 2022). One forward per chunk of
(sender, pair) rows, started at the receiver's layer from the cached corrupt residual.
"""

import re
import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Int
from torch import Tensor

from .._readout import as_tokens, choose, readout_dtype
from ..errors import InvalidInputError
from ..model import HookedRewardModel, Text
from ._runs import aligned, cached_run, layer_flops, position_map
from .patching import PatchResult, PatchStats

_RECEIVER = re.compile(r"^(reward|L(\d+)H(\d+)\.([qkv])|L(\d+)\.mlp)$")


def _parse_receiver(receiver: str, cfg) -> tuple[str, int, int | None, str | None]:
    match = _RECEIVER.match(receiver)
    if not match:
        raise InvalidInputError(
            f"receiver={receiver!r} is not 'reward', 'L<layer>H<head>.q|k|v' or 'L<layer>.mlp'"
        )
    if match.group(1) == "reward":
        return "reward", cfg.n_layers, None, None
    if match.group(2) is not None:
        layer, head, which = int(match.group(2)), int(match.group(3)), match.group(4)
        n_heads = cfg.n_heads if which == "q" else (cfg.n_key_value_heads or cfg.n_heads)
        if not (0 <= layer < cfg.n_layers and 0 <= head < n_heads):
            raise InvalidInputError(f"receiver {receiver!r} is not a head of this model")
        return "head", layer, head, which
    layer = int(match.group(5))
    if not 0 <= layer < cfg.n_layers:
        raise InvalidInputError(f"receiver {receiver!r}: layer {layer} is not in 0..{cfg.n_layers - 1}")
    return "mlp", layer, None, None


@contextmanager
def _receiver_hooks_enabled(model: HookedRewardModel, kind: str):
    """Turn on TransformerLens's per-head q/k/v input hooks or the MLP input hook, then restore."""
    cfg = model.cfg
    before = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in)
    try:
        if kind == "head":
            model.set_use_split_qkv_input(True)
        elif kind == "mlp":
            model.set_use_hook_mlp_in(True)
        yield
    finally:
        model.set_use_split_qkv_input(before[0])
        model.set_use_hook_mlp_in(before[1])


def _sender_deltas(model, clean, corrupt, pos_map, senders: str, layers: list[int]) -> Tensor:
    """``[sender, pair, pos, d_model]``: what each sender's clean output adds to the residual
    stream of the corrupt run (through a post-norm, where the model has one)."""
    valid = (pos_map >= 0)[..., None]
    deltas = []
    for layer in layers:
        block = model.blocks[layer]
        if senders == "mlps":
            name = f"blocks.{layer}.hook_mlp_out"
            diff = aligned(clean.cache[name], pos_map, "resid") - corrupt.cache[name]
            deltas.append(torch.where(valid, diff, 0.0)[None])
            continue
        name = f"blocks.{layer}.attn.hook_z"
        z_clean = aligned(clean.cache[name], pos_map, "head")
        z_corrupt = corrupt.cache[name]
        W_O = block.attn.W_O  # [head, d_head, d_model]
        per_head = torch.einsum("bphd,hdm->hbpm", z_clean - z_corrupt, W_O)
        per_head = torch.where(valid[None], per_head, 0.0)
        post = getattr(block, "ln1_post", None) if model.cfg.use_normalization_before_and_after else None
        if post is not None:  # the head's share of the attention output after the post-norm
            pre = torch.einsum("bphd,hdm->bpm", z_corrupt, W_O) + block.attn.b_O
            per_head = post(pre[None] + per_head) - post(pre)[None]
        deltas.append(per_head)
    return torch.cat(deltas)


def path_patch(
    model: HookedRewardModel,
    clean: Int[Tensor, "pair pos"] | Sequence[Text],
    corrupt: Int[Tensor, "_pair _pos"] | Sequence[Text],
    *,
    senders: str = "heads",
    receiver: str = "reward",
    clean_mask: Int[Tensor, "pair pos"] | None = None,
    corrupt_mask: Int[Tensor, "_pair _pos"] | None = None,
    positions: str | Tensor = "align_end",
    max_rows: int = 64,
    progress: bool = True,
) -> PatchResult:
    """Effect on the corrupt run's reward of each sender's clean output, through one receiver.

    Args:
        senders: ``"heads"`` (every attention head) or ``"mlps"`` (every MLP layer).
        receiver: ``"reward"`` (the final residual the head reads), ``"L<l>H<h>.q"`` / ``.k`` /
            ``.v`` (one head's query/key/value input; key/value heads under grouped-query
            attention), or ``"L<l>.mlp"`` (one MLP's input).
    Senders that do not come before the receiver are NaN. Effects are patched - corrupt reward;
    ``normalized`` divides by the clean - corrupt gap.
    """
    choose("senders", senders, ("heads", "mlps"))
    if max_rows < 1:
        raise InvalidInputError(f"max_rows must be >= 1, got {max_rows}")
    started = time.perf_counter()
    cfg = model.cfg
    kind, r_layer, r_head, which = _parse_receiver(receiver, cfg)
    clean_t, clean_m = as_tokens(model, clean, clean_mask)
    corrupt_t, corrupt_m = as_tokens(model, corrupt, corrupt_mask)
    if clean_t.shape[0] != corrupt_t.shape[0]:
        raise InvalidInputError(
            f"{clean_t.shape[0]} clean but {corrupt_t.shape[0]} corrupt sequences; pairs must match"
        )
    # senders strictly before the receiver (an MLP receiver also reads its own layer's attention)
    last = r_layer + (1 if kind == "mlp" and senders == "heads" else 0)
    layers = list(range(min(last, cfg.n_layers)))
    if not layers:
        raise InvalidInputError(f"no {senders} come before receiver {receiver!r}")
    sender_hook = "hook_mlp_out" if senders == "mlps" else "attn.hook_z"
    names = {f"blocks.{l}.{sender_hook}" for l in layers}
    corrupt_names = names | {f"blocks.{r_layer}.hook_resid_pre" if r_layer < cfg.n_layers
                             else f"blocks.{cfg.n_layers - 1}.hook_resid_post"}
    corrupt_run = cached_run(model, corrupt_t, corrupt_m, corrupt_names)
    clean_run = cached_run(model, clean_t, clean_m, names)
    pos_map = position_map(corrupt_run, clean_run, positions)
    with torch.no_grad():
        deltas = _sender_deltas(model, clean_run, corrupt_run, pos_map, senders, layers)
    n_senders, n_pairs, n_t = deltas.shape[:3]
    resid_name = (f"blocks.{r_layer}.hook_resid_pre" if r_layer < cfg.n_layers
                  else f"blocks.{cfg.n_layers - 1}.hook_resid_post")
    resid = corrupt_run.cache[resid_name]

    sender_idx, pair_idx = torch.meshgrid(
        torch.arange(n_senders, device=resid.device), torch.arange(n_pairs, device=resid.device),
        indexing="ij",
    )
    sender_idx, pair_idx = sender_idx.flatten(), pair_idx.flatten()
    dt = readout_dtype(model)
    flat = torch.empty(n_senders * n_pairs, dtype=dt, device=resid.device)
    n_forwards = 0
    from tqdm.auto import tqdm

    with _receiver_hooks_enabled(model, kind):
        for lo in tqdm(range(0, len(flat), max_rows), desc=f"path patching -> {receiver}",
                       disable=not progress, leave=False):
            sel = slice(lo, lo + max_rows)
            s, p = sender_idx[sel], pair_idx[sel]
            delta = deltas[s, p]  # [rows, pos, d_model]
            x = resid[p]
            hooks = []
            if kind == "reward":
                x = x + delta
            elif kind == "head":
                def add_head(act, hook, delta=delta):
                    act = act.clone()
                    act[:, :, r_head] += delta
                    return act
                hooks.append((f"blocks.{r_layer}.hook_{which}_input", add_head))
            else:
                hooks.append((f"blocks.{r_layer}.hook_mlp_in", lambda act, hook, d=delta: act + d))
            mask = corrupt_run.mask[p] if corrupt_run.mask is not None else None
            with torch.no_grad():
                flat[sel] = model.run_with_hooks(
                    x, attention_mask=mask, start_at_layer=r_layer, fwd_hooks=hooks,
                    pool_index=corrupt_run.pooled[p], tokens=corrupt_run.tokens[p],  # a gated head's prompt end
                )
            n_forwards += 1
    clean_r, corrupt_r = clean_run.reward.to(dt), corrupt_run.reward.to(dt)
    effects_known = (flat - corrupt_r[pair_idx]).reshape(n_senders, n_pairs)
    if senders == "heads":
        effects = torch.full((cfg.n_layers, cfg.n_heads, n_pairs), float("nan"), dtype=dt,
                             device=resid.device)
        effects[: len(layers)] = effects_known.reshape(len(layers), cfg.n_heads, n_pairs)
        axes, labels = ("layer", "head"), (tuple(str(l) for l in range(cfg.n_layers)),
                                          tuple(str(h) for h in range(cfg.n_heads)))
    else:
        effects = torch.full((cfg.n_layers, n_pairs), float("nan"), dtype=dt, device=resid.device)
        effects[: len(layers)] = effects_known
        axes, labels = ("layer",), (tuple(str(l) for l in range(cfg.n_layers)),)
    gap = clean_r - corrupt_r
    flops = n_senders * n_pairs * (cfg.n_layers - r_layer) * layer_flops(model, n_t, n_t)
    return PatchResult(
        effects=effects, normalized=effects / gap, clean_reward=clean_r,
        corrupt_reward=corrupt_r, axes=axes, axis_labels=labels,
        hook=f"{'z' if senders == 'heads' else 'mlp_out'}->{receiver}",
        per="head" if senders == "heads" else "layer", mode="path",
        stats=PatchStats(n_forwards, n_senders * n_pairs, flops, time.perf_counter() - started,
                         str(effects.device), cfg.dtype),
    )
