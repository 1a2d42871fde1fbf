"""The runs the patching tools share: hook names, cached runs, position maps, keys and values
of a cached prefix, FLOP counts.

:func:`tl_reward.activation_patch`, :func:`tl_reward.path_patch`, :func:`tl_reward.attribution_patch`
and :func:`tl_reward.divergence_aware_patch` build on these: a cached run of the target (its
residual inputs, keys and values), the source activations aligned to the target's positions, and
patched forwards that start at a later position on the target's keys and values.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from .._readout import as_tokens
from ..errors import InvalidInputError
from ..model import HookedRewardModel

# name -> (hook inside a block, kind of activation)
HOOKS: dict[str, tuple[str, str]] = {
    "resid_pre": ("hook_resid_pre", "resid"),
    "resid_mid": ("hook_resid_mid", "resid"),
    "resid_post": ("hook_resid_post", "resid"),
    "attn_out": ("hook_attn_out", "resid"),
    "mlp_out": ("hook_mlp_out", "resid"),
    "z": ("attn.hook_z", "head"),
    "q": ("attn.hook_q", "head"),
    "k": ("attn.hook_k", "head"),
    "v": ("attn.hook_v", "head"),
    "pattern": ("attn.hook_pattern", "pattern"),
    "mlp_post": ("mlp.hook_post", "neuron"),
}
PERS: dict[str, tuple[str, ...]] = {
    "resid": ("layer", "layer_pos"),
    "head": ("layer", "layer_pos", "head", "head_pos"),
    "pattern": ("head", "head_pos"),
    "neuron": ("layer", "layer_pos", "neuron"),
}
MODES = ("denoise", "noise", "zero", "mean")


# ---------------------------------------------------------------------------------- runs
@dataclass
class Run:
    tokens: Tensor
    mask: Tensor | None
    pooled: Tensor
    reward: Tensor
    cache: dict[str, Tensor]


def cached_run(model: HookedRewardModel, tokens, mask, names) -> Run:
    pooled = model.pooled_index(tokens, mask)
    with torch.no_grad():
        reward, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=lambda n: n in names, pool_index=pooled,
            return_cache_object=False,
        )
    if reward.ndim != 1:
        raise InvalidInputError(
            "patching measures a scalar reward; choose an objective with model.set_objective(...)"
        )
    return Run(tokens, mask, pooled, reward, cache)


def common_prefix(model, target: Run, tokens: Tensor, mask: Tensor | None, positions) -> int:
    """How many leading positions every pair's other run shares with the target run (and may
    take from it), short of every scoring token."""
    if tokens.shape != target.tokens.shape:
        return 0
    other = Run(tokens, mask, model.pooled_index(tokens, mask), target.reward, {})
    shared = shared_prefix(target, other, position_map(target, other, positions))
    return int(torch.minimum(shared, torch.minimum(target.pooled, other.pooled)).min())


def run_after(model, tokens, mask, names, target: Run, start: int) -> Run:
    """:func:`cached_run` of a sequence whose first ``start`` positions are the target run's: those
    positions' activations are the target's (same tokens, same positions, causal attention), the
    rest runs on the target's keys and values."""
    pooled = model.pooled_index(tokens, mask)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    kv = kv_prefix(model, target, 0, rows, start)
    new_mask = mask[:, start:] if mask is not None else torch.ones_like(tokens[:, start:])
    with torch.no_grad():
        reward, cache = model.run_with_cache(
            tokens[:, start:], attention_mask=new_mask, past_kv_cache=kv, pool_index=pooled - start,
            names_filter=lambda n: n in names, return_cache_object=False,
        )
    full = {n: torch.cat([target.cache[n][:, :, :start] if n.endswith("hook_pattern")
                          else target.cache[n][:, :start], act],
                         2 if n.endswith("hook_pattern") else 1)
            for n, act in cache.items()}
    return Run(tokens, mask, pooled, reward, full)


def post_qk_norm_keys(model: HookedRewardModel, layer: int, k: Tensor) -> Tensor:
    """Keys as TransformerLens's key-value cache stores them (after Qwen3's k-norm, pre-rotary)."""
    attn = model.blocks[layer].attn
    if model.cfg.use_qk_norm:
        return attn._apply_qk_norm(k, attn.k_norm)
    return k


def kv_prefix(model, target: Run, layer: int, rows: Tensor, start: int):
    """A frozen key-value cache holding the target run's first ``start`` positions of ``rows``."""
    cfg = model.cfg
    entries = []
    for l in range(cfg.n_layers):
        if l < layer:  # blocks before the start layer are not run
            k = v = torch.empty(0)
        else:
            k = post_qk_norm_keys(model, l, target.cache[f"blocks.{l}.attn.hook_k"][rows, :start])
            v = target.cache[f"blocks.{l}.attn.hook_v"][rows, :start]
        entries.append(TransformerLensKeyValueCacheEntry(past_keys=k, past_values=v, frozen=True))
    prev = (target.mask[rows, :start] if target.mask is not None
            else torch.ones(len(rows), start, dtype=torch.long, device=target.tokens.device))
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=prev, frozen=True)


def layer_flops(model: HookedRewardModel, n_new: int, n_kv: int) -> float:
    """Matmul FLOPs of one block for one row with ``n_new`` new positions attending ``n_kv``."""
    cfg = model.cfg
    n_kv_heads = cfg.n_key_value_heads or cfg.n_heads
    attn_params = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * n_kv_heads)
    mlp_params = cfg.d_model * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    dense = 2 * n_new * (attn_params + mlp_params)
    attention = 4 * n_new * n_kv * cfg.d_head * cfg.n_heads
    return float(dense + attention)


def scoring_block_flops(model: HookedRewardModel, n_new: int, n_kv: int) -> float:
    """Matmul FLOPs of the last block run at one row's scoring token alone: keys and values of
    the row's other ``n_new - 1`` new positions, the rest at the scoring token attending ``n_kv``."""
    cfg = model.cfg
    n_kv_heads = cfg.n_key_value_heads or cfg.n_heads
    kv = 2 * (n_new - 1) * cfg.d_model * cfg.d_head * 2 * n_kv_heads
    return float(kv + layer_flops(model, 1, n_kv))


# ---------------------------------------------------------------------------------- alignment
def position_map(target: Run, source: Run | None, positions) -> Tensor:
    """``[pair, target_pos]`` -> source position, or -1 where the target position has no source."""
    n_pairs, n_t = target.tokens.shape
    real_t = (target.mask.bool() if target.mask is not None
              else torch.ones(n_pairs, n_t, dtype=torch.bool, device=target.tokens.device))
    pos = torch.arange(n_t, device=target.tokens.device).expand(n_pairs, n_t)
    if isinstance(positions, str) and positions != "align_end":
        raise InvalidInputError(
            f"positions={positions!r}: use 'align_end' (the scoring tokens line up) or a "
            "[pair, target_pos] tensor of source positions (-1 where a target position has none)"
        )
    if source is None:  # zero / mean ablation: every real target position
        return torch.where(real_t, pos, -1)
    n_s = source.tokens.shape[1]
    if isinstance(positions, str):
        src = pos + (source.pooled - target.pooled)[:, None]
    else:
        src = torch.as_tensor(positions, device=target.tokens.device).long()
        if src.shape != (n_pairs, n_t):
            raise InvalidInputError(
                f"positions map must be [pair, target_pos] = {(n_pairs, n_t)}, got {tuple(src.shape)}"
            )
        if int(src.max()) >= n_s:
            raise InvalidInputError(f"positions map points past the source length {n_s}")
    ok = real_t & (src >= 0) & (src < n_s)
    src = src.clamp(0, n_s - 1)
    if source.mask is not None:
        ok &= source.mask.bool().gather(1, src)
    return torch.where(ok, src, -1)


def aligned(act: Tensor, pos_map: Tensor, kind: str) -> Tensor:
    """Source activation gathered at the mapped positions (zeros where there is none)."""
    idx = pos_map.clamp(min=0)
    if kind == "pattern":  # [pair, head, q, k]: only identical layouts are supported
        return act
    expand = idx.reshape(*idx.shape, *([1] * (act.ndim - 2))).expand(*idx.shape, *act.shape[2:])
    out = act.gather(1, expand)
    keep = (pos_map >= 0).reshape(*idx.shape, *([1] * (act.ndim - 2)))
    return torch.where(keep, out, torch.zeros((), dtype=act.dtype, device=act.device))


def pair_tokens(model, clean, corrupt, clean_mask, corrupt_mask, mode: str):
    """Token ids and masks of the clean and (optional) corrupt runs, checked to pair up."""
    clean_t, clean_m = as_tokens(model, clean, clean_mask)
    if corrupt is None:
        if mode in ("denoise", "noise"):
            raise InvalidInputError(f"mode={mode!r} needs corrupt inputs")
        return clean_t, clean_m, None, None
    corrupt_t, corrupt_m = as_tokens(model, corrupt, corrupt_mask)
    if corrupt_t.shape[0] != clean_t.shape[0]:
        raise InvalidInputError(
            f"{clean_t.shape[0]} clean but {corrupt_t.shape[0]} corrupt sequences; pairs must match"
        )
    return clean_t, clean_m, corrupt_t, corrupt_m


def shared_prefix(target: Run, source: Run | None, pos_map: Tensor) -> Int[Tensor, "pair"]:
    """Per pair, how many leading target positions the source run has identically: same
    tokens at the same positions (padding in both where either pads), so under causal attention
    every activation there is the same function of the same inputs and patching changes nothing.
    Preference pairs sharing their prompt share it."""
    n_pairs, n_t = target.tokens.shape
    if source is None:
        return torch.zeros(n_pairs, dtype=torch.long, device=target.tokens.device)
    n = min(n_t, source.tokens.shape[1])

    def real(run):
        m = run.mask[:, :n] if run.mask is not None else torch.ones_like(run.tokens[:, :n])
        return m.bool()

    t_real, s_real = real(target), real(source)
    pos = torch.arange(n, device=pos_map.device)
    same_token = (target.tokens[:, :n] == source.tokens[:, :n]) & (pos_map[:, :n] == pos)
    same = (t_real == s_real) & (~t_real | same_token)
    return same.long().cumprod(1).sum(1)
