"""Divergence-aware activation patching: flag patched states the model never produces.

Definition. Patching writes one run's activation into another; the residual stream that results
may be a state the model never reaches on real text ("divergent representations", the
reward-lens paper's motivation, after Zhang & Nanda and "Addressing divergent representations
from causal interventions on neural networks", 2025). An effect measured there says what the
model does off its own distribution, not how it computes. For each patched cell and pair this
module measures how far the patched state is from the model's natural states and reports the
patching effects with and without the divergent cases:

- the *state* of a patch at layer ``l`` is the residual stream right after that layer
  (``blocks.{l}.hook_resid_post``) at the scoring token, where the patched component's write
  meets the reward read-out;
- the *natural distribution* at layer ``l`` is the same state on ``reference`` texts, modelled
  by its mean and a Ledoit-Wolf shrinkage covariance (``sklearn.covariance.LedoitWolf``: stable
  when the reference set is not much larger than ``d_model``);
- the *distance* is the Mahalanobis distance ``sqrt((x - mu)^T Sigma^-1 (x - mu))``;
- a patched state is *divergent* when its distance exceeds the ``quantile`` of the distances of
  held-out reference states (the reference is split: one part fits mu and Sigma, the other
  calibrates the threshold), so a natural state is flagged with probability about
  ``1 - quantile``, without assuming Gaussian activations.

The effects are exactly :func:`tl_reward.activation_patch`'s (all positions of the cell,
aligned from the scoring token); each patched forward also records the state.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from .._readout import as_tokens, choose
from ..errors import InvalidInputError
from ..model import HookedRewardModel, Text
from ._runs import HOOKS, aligned, cached_run, pair_tokens, position_map

DIVERGENCE_HOOKS = {"z": "head", "attn_out": "layer", "mlp_out": "layer", "mlp_post": "neuron"}
DIVERGENCE_MODES = ("denoise", "noise", "zero", "mean")


@dataclass(frozen=True)
class DivergencePatchResult:
    """Patching effects with the distance of each patched state from the natural distribution.

    ``effects[c, i]``: patched reward minus the target run's reward for cell ``labels[c]`` and
    pair ``i`` (as :func:`tl_reward.activation_patch`); ``distance[c, i]``: Mahalanobis distance
    of the patched state (residual after the cell's layer, scoring token); ``flagged``:
    ``distance > threshold[layer of the cell]``. ``target_distance[l, i]``: distance of the
    unpatched target run's state at layer ``l`` (a natural state: flagged at about the nominal
    rate). ``calibration_distance[l]``: the held-out reference distances the thresholds come
    from.
    """

    effects: Float[Tensor, "component pair"]
    distance: Float[Tensor, "component pair"]
    flagged: Bool[Tensor, "component pair"]
    labels: tuple[str, ...]
    cell_layer: Int[Tensor, "component"]
    threshold: Float[Tensor, "layer"]
    target_distance: Float[Tensor, "layer pair"]
    calibration_distance: Float[Tensor, "layer batch"]
    hook: str
    mode: str
    quantile: float

    @property
    def mean_effect(self) -> Float[Tensor, "component"]:
        """Mean effect over every pair."""
        return self.effects.nanmean(-1)

    @property
    def mean_effect_on_distribution(self) -> Float[Tensor, "component"]:
        """Mean effect over the pairs whose patched state is not divergent (NaN when all are)."""
        kept = torch.where(self.flagged, torch.full_like(self.effects, float("nan")), self.effects)
        return kept.nanmean(-1)

    @property
    def fraction_flagged(self) -> Float[Tensor, "component"]:
        return self.flagged.float().mean(-1)

    def to_dataframe(self):
        """One row per cell: mean effect with and without divergent patches, the fraction of
        patched states flagged, and the fraction of the unpatched target states flagged at the
        same layer (the baseline: about ``1 - quantile`` when the pairs resemble the
        reference)."""
        import pandas as pd

        target_flagged = (self.target_distance > self.threshold[:, None]).float().mean(-1)
        return pd.DataFrame({
            "component": self.labels, "layer": self.cell_layer.numpy(),
            "mean_effect": self.mean_effect.numpy(),
            "mean_effect_on_distribution": self.mean_effect_on_distribution.numpy(),
            "fraction_flagged": self.fraction_flagged.numpy(),
            "target_fraction_flagged": target_flagged[self.cell_layer].numpy(),
            "median_distance": self.distance.nanmedian(-1).values.numpy(),
        })

    def plot(self, title: str | None = None):
        """Mean effect per cell over all pairs and over the non-divergent pairs."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_trace(go.Bar(x=list(self.labels), y=self.mean_effect.numpy(), name="all pairs"))
        fig.add_trace(go.Bar(x=list(self.labels), y=self.mean_effect_on_distribution.numpy(),
                             name="on-distribution pairs",
                             hovertext=[f"{f:.0%} flagged" for f in self.fraction_flagged.tolist()]))
        fig.update_layout(barmode="group", yaxis_title="patching effect",
                          title=title or f"{self.mode} patching of {self.hook}, divergent states "
                          f"(distance above the {self.quantile:.0%} quantile) left out")
        return fig


def _pooled_resid(model: HookedRewardModel, tokens: Tensor, mask: Tensor | None,
                  layers: Sequence[int], batch_size: int) -> dict[int, np.ndarray]:
    names = {get_act_name("resid_post", l) for l in layers}
    out: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    for start in range(0, tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        m = None if mask is None else mask[rows]
        run = cached_run(model, tokens[rows], m, names)
        idx = torch.arange(run.tokens.shape[0])
        for l in layers:
            act = run.cache[get_act_name("resid_post", l)][idx, run.pooled]
            out[l].append(act.detach().cpu().double().numpy())
    return {l: np.concatenate(v) for l, v in out.items()}


def divergence_aware_patch(
    model: HookedRewardModel,
    clean: Int[Tensor, "pair pos"] | Sequence[Text],
    corrupt: Int[Tensor, "_pair _pos"] | Sequence[Text] | None = None,
    *,
    reference: Int[Tensor, "batch _pos"] | Sequence[Text],
    hook: str = "z",
    mode: str = "denoise",
    clean_mask: Int[Tensor, "pair pos"] | None = None,
    corrupt_mask: Int[Tensor, "_pair _pos"] | None = None,
    reference_mask: Int[Tensor, "batch _pos"] | None = None,
    quantile: float = 0.95,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> DivergencePatchResult:
    """Patch every cell of ``hook`` (all positions) and flag the patched states that are off the
    model's activation distribution; see the module docstring for the definition.

    Args:
        clean, corrupt: the two runs of each pair (texts, or token ids with masks).
        reference: natural texts (or token ids) whose states define the distribution; the
            more the better (at least ``1 / (1 - quantile)`` land in the calibration part).
        hook: ``"z"`` (per head), ``"attn_out"``, ``"mlp_out"`` (per layer) or ``"mlp_post"``
            (per neuron).
        mode: ``"denoise"`` (clean into corrupt), ``"noise"`` (corrupt into clean), ``"zero"``
            or ``"mean"`` (over ``reference``'s tokens) ablation of the clean run.
        quantile: a state is divergent beyond this quantile of held-out reference distances.
        calibration_fraction: share of the reference held out to calibrate the threshold.
    """
    from sklearn.covariance import LedoitWolf

    choose("hook", hook, DIVERGENCE_HOOKS)
    choose("mode", mode, DIVERGENCE_MODES)
    if not 0 < quantile < 1 or not 0 < calibration_fraction < 1:
        raise InvalidInputError(
            f"quantile and calibration_fraction must lie in (0, 1), got {quantile}, {calibration_fraction}"
        )
    hook_name, kind = HOOKS[hook]
    per = DIVERGENCE_HOOKS[hook]
    if not model.is_scalar:
        raise InvalidInputError("patching measures a scalar reward; choose an objective with "
                                "model.set_objective(...)")
    cfg = model.cfg
    layers = list(range(cfg.n_layers))
    clean_t, clean_m, corrupt_t, corrupt_m = pair_tokens(model, clean, corrupt, clean_mask,
                                                          corrupt_mask, mode)
    ref_t, ref_m = as_tokens(model, reference, reference_mask)
    n_ref = ref_t.shape[0]
    n_cal = int(round(n_ref * calibration_fraction))
    if n_cal * (1 - quantile) < 1 or n_ref - n_cal < 2:
        raise InvalidInputError(
            f"{n_ref} reference texts leave {n_cal} for calibration: too few for the {quantile} "
            f"quantile (need at least {int(np.ceil(1 / (1 - quantile)))}); pass more reference "
            "texts or a lower quantile"
        )

    # --- the natural distribution per layer: fit on one part, calibrate on the other
    states = _pooled_resid(model, ref_t, ref_m, layers, batch_size)
    order = np.random.default_rng(seed).permutation(n_ref)
    cal, fit = order[:n_cal], order[n_cal:]
    estimators, thresholds, cal_dist = {}, [], []
    for l in layers:
        est = LedoitWolf().fit(states[l][fit])
        estimators[l] = est
        d = np.sqrt(est.mahalanobis(states[l][cal]))
        cal_dist.append(d)
        thresholds.append(float(np.quantile(d, quantile)))

    # --- target and source runs, aligned as activation_patch aligns them
    names = {f"blocks.{l}.{hook_name}" for l in layers}
    names |= {get_act_name("resid_post", l) for l in layers}
    target_is_clean = mode != "denoise"
    t_tokens, t_mask = (clean_t, clean_m) if target_is_clean else (corrupt_t, corrupt_m)
    target = cached_run(model, t_tokens, t_mask, names)
    source = None
    if mode in ("denoise", "noise"):
        s_tokens, s_mask = (corrupt_t, corrupt_m) if target_is_clean else (clean_t, clean_m)
        source = cached_run(model, s_tokens, s_mask, names)
    pos_map = position_map(target, source, "align_end")
    n_pairs = t_tokens.shape[0]
    idx = torch.arange(n_pairs, device=t_tokens.device)
    target_distance = np.stack([
        np.sqrt(estimators[l].mahalanobis(
            target.cache[get_act_name("resid_post", l)][idx, target.pooled].detach().cpu().double().numpy()))
        for l in layers])
    if mode == "mean":
        ref_run = cached_run(model, ref_t, ref_m, {f"blocks.{l}.{hook_name}" for l in layers})
        real = (ref_m.bool() if ref_m is not None else torch.ones(ref_t.shape, dtype=torch.bool,
                                                                  device=ref_t.device))

    # --- one forward per cell over all pairs, recording the reward and the state
    from tqdm.auto import tqdm

    effects, distances, labels, cell_layer = [], [], [], []
    keep = (pos_map >= 0)  # target positions that receive a replacement
    for l in tqdm(layers, desc=f"divergence-aware patching of {hook}", disable=not progress,
                  leave=False):
        name = f"blocks.{l}.{hook_name}"
        act_t = target.cache[name]
        if mode in ("denoise", "noise"):
            repl = aligned(source.cache[name], pos_map, kind)
        elif mode == "zero":
            repl = torch.zeros_like(act_t)
        else:
            repl = ref_run.cache[name][real].mean(0).expand_as(act_t)
        n_units = act_t.shape[2] if per in ("head", "neuron") else 1
        for u in range(n_units):
            sel = keep.reshape(*keep.shape, *([1] * (act_t.ndim - 2))).expand_as(act_t).clone()
            if per in ("head", "neuron"):
                unit = torch.zeros(act_t.shape[2], dtype=torch.bool, device=act_t.device)
                unit[u] = True
                sel &= unit.reshape(1, 1, -1, *([1] * (act_t.ndim - 3)))
            rewards, state = [], []
            for start in range(0, n_pairs, batch_size):
                rows = slice(start, start + batch_size)
                captured = {}

                def patch(act, hook, rows=rows, sel=sel, repl=repl):
                    return torch.where(sel[rows], repl[rows], act)

                def grab(act, hook, captured=captured):
                    captured["x"] = act

                with torch.no_grad():
                    r = model.run_with_hooks(
                        target.tokens[rows],
                        attention_mask=None if target.mask is None else target.mask[rows],
                        pool_index=target.pooled[rows],
                        fwd_hooks=[(name, patch), (get_act_name("resid_post", l), grab)],
                    )
                rows_idx = torch.arange(r.shape[0], device=r.device)
                rewards.append(r.detach().cpu())
                state.append(captured["x"][rows_idx, target.pooled[rows]].detach().cpu().double().numpy())
            effects.append(torch.cat(rewards) - target.reward.detach().cpu())
            distances.append(np.sqrt(estimators[l].mahalanobis(np.concatenate(state))))
            cell_layer.append(l)
            labels.append({"head": f"L{l}H{u}", "neuron": f"L{l}N{u}"}.get(per, f"{l}_{hook}"))

    distance = torch.from_numpy(np.stack(distances)).float()
    threshold = torch.tensor(thresholds, dtype=torch.float32)
    cell_layer_t = torch.tensor(cell_layer)
    return DivergencePatchResult(
        effects=torch.stack(effects).float(), distance=distance,
        flagged=distance > threshold[cell_layer_t][:, None], labels=tuple(labels),
        cell_layer=cell_layer_t, threshold=threshold,
        target_distance=torch.from_numpy(target_distance).float(),
        calibration_distance=torch.from_numpy(np.stack(cal_dist)).float(),
        hook=hook, mode=mode, quantile=quantile,
    )
