"""Attribution of the reward (and of a pair's margin) to SAE features.

Rows: one per feature, plus the SAE's error term and decoder bias, so every SAE's rows add up.

- ``method="direct"`` (SAEs on the residual stream; the default on the final residual): each
  feature's activation at the scoring token times (its decoder row . the effective reward direction
  divided by the final norm's cached scale), the reading :func:`tl_reward.direct_reward_attribution`
  uses (:func:`tl_reward._readout.read_out`). A ``rest`` row holds what the layers after the hook
  add. Exact: rows + read-out bias == reward.
- ``method="gradient"`` (any hook point; the default elsewhere): gradient x activation through the
  spliced SAE, summed over positions: attribution patching against a zero activation, the
  first-order estimate of ablating the feature everywhere. The error term and the decoder bias
  get the same treatment, so the rows add up to the hook's own gradient x activation (``totals``).

Each SAE is spliced in alone (error term kept), so the gradients are the model's own.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor
from transformer_lens.utilities import get_act_name

from .._memory import rows_that_fit
from .._readout import as_tokens, batches, centers, choose, read_out, readout_dtype
from ..errors import InvalidInputError, LinearHeadRequiredError, ObjectiveError
from ..model import HookedRewardModel, Text
from ._splice import (
    RESIDUAL_HOOKS,
    SAEMismatchError,
    attach_saes,
    check_sae,
    decoder_bias,
    decoder_dot,
    sae_list,
)

METHODS = ("auto", "direct", "gradient")
PAIR_METHODS = (*METHODS, "integrated")


@dataclass(frozen=True)
class SAEAttributionResult:
    """Each SAE feature's contribution to the pooled reward (or to a pair's margin).

    Rows: every feature of every SAE (``kinds == "feature"``), then per SAE its ``error`` term, its
    ``decoder_bias`` (``decode(0)``) and, for the direct and integrated methods, a ``rest`` row
    (direct: what the layers after the hook add to the residual; integrated: the part of the
    margin that does not pass through the hook). ``totals[s]`` is what SAE ``s``'s rows add up
    to: ``reward - bias`` for the direct method (exact), the hook's own gradient x activation for
    the gradient method, the margin for the integrated method (up to the midpoint rule's error).
    ``completeness()`` is the difference. ``max_activation``: each feature's maximum over the
    tokens of each text (chosen minus rejected for pairs).
    """

    values: Float[Tensor, "row batch"]
    labels: tuple[str, ...]
    hooks: tuple[str, ...]  # the SAE hook of each row
    kinds: tuple[str, ...]  # "feature", "error", "decoder_bias" or "rest"
    features: tuple[int, ...]  # feature index of each row, -1 for the other kinds
    sae_hooks: tuple[str, ...]
    methods: tuple[str, ...]  # per SAE
    totals: Float[Tensor, "sae batch"]
    reward: Float[Tensor, "batch"]  # the model's reward (margin for pairs)
    bias: Float[Tensor, ""]  # read-out bias (0 for margins; NaN for a nonlinear head: it has none)
    max_activation: Float[Tensor, "row batch"] = field(repr=False)  # per feature row, max over tokens
    is_pair: bool = False

    def _rows(self, hook: str | None, kind: str | None = None) -> list[int]:
        if hook is None:
            if len(self.sae_hooks) > 1:
                raise InvalidInputError(
                    f"this result holds several SAEs {list(self.sae_hooks)}; pass hook="
                )
            hook = self.sae_hooks[0]
        choose("hook", hook, self.sae_hooks)
        return [i for i, h in enumerate(self.hooks) if h == hook and kind in (None, self.kinds[i])]

    def feature_values(self, hook: str | None = None) -> Float[Tensor, "d_sae batch"]:
        """The feature rows of one SAE (``hook`` may be omitted when there is one)."""
        return self.values[self._rows(hook, "feature")]

    def row(self, kind: str, hook: str | None = None) -> Float[Tensor, "batch"]:
        """The ``error``, ``decoder_bias`` or ``rest`` row of one SAE."""
        choose("kind", kind, ("error", "decoder_bias", "rest"))
        rows = self._rows(hook, kind)
        if not rows:
            raise InvalidInputError(
                f"no {kind!r} row: it exists for the direct and integrated methods only"
            )
        return self.values[rows[0]]

    def completeness(self) -> Float[Tensor, "sae batch"]:
        """Sum of each SAE's rows minus its ``totals`` (zero up to float error)."""
        sums = torch.stack([self.values[self._rows(h)].sum(0) for h in self.sae_hooks])
        return sums - self.totals

    def top(self, k: int = 10, hook: str | None = None, kinds: Sequence[str] = ("feature",)):
        """The ``k`` rows with the largest mean |contribution| (features only by default)."""
        import pandas as pd

        rows = [i for i in range(len(self.labels)) if self.kinds[i] in kinds
                and (hook is None or self.hooks[i] == hook)]
        v = self.values[rows].detach().cpu()
        order = v.mean(1).abs().argsort(descending=True)[:k].tolist()
        return pd.DataFrame({
            "label": [self.labels[rows[i]] for i in order],
            "hook": [self.hooks[rows[i]] for i in order],
            "feature": [self.features[rows[i]] for i in order],
            "mean": v[order].mean(1).numpy(),
            "mean_abs": v[order].abs().mean(1).numpy(),
            "frac_positive": (v[order] > 0).float().mean(1).numpy(),
        })

    def rank(self, feature: int, hook: str | None = None) -> int:
        """1-based rank of ``feature`` among its SAE's features by |mean contribution|."""
        v = self.feature_values(hook).detach().mean(1).abs()
        if not 0 <= feature < v.shape[0]:
            raise InvalidInputError(f"feature {feature} is not in 0..{v.shape[0] - 1}")
        return int((v > v[feature]).sum()) + 1

    def to_dataframe(self):
        """Long format: one row per (attribution row, sequence)."""
        import pandas as pd

        v = self.values.detach().cpu()
        n_rows, n_seq = v.shape
        rep = lambda xs: [x for x in xs for _ in range(n_seq)]  # noqa: E731
        return pd.DataFrame({
            "label": rep(self.labels), "hook": rep(self.hooks), "kind": rep(self.kinds),
            "feature": rep(self.features), "sequence": list(range(n_seq)) * n_rows,
            "value": v.flatten().numpy(),
        })

    def plot(self, k: int = 20, hook: str | None = None, title: str | None = None):
        """Bars of the ``k`` features with the largest mean |contribution|, plus the error,
        decoder-bias and rest rows."""
        import pandas as pd
        import plotly.express as px

        top = self.top(k, hook)
        top["kind"] = "feature"
        other = self.top(len(self.labels), hook, kinds=("error", "decoder_bias", "rest"))
        other["kind"] = [lab.rsplit("/", 1)[-1] for lab in other["label"]]
        frame = pd.concat([top, other], ignore_index=True)
        what = "margin" if self.is_pair else "reward"
        return px.bar(frame, x="label", y="mean", color="kind",
                      title=title or f"SAE feature attribution to the {what} (mean over sequences)",
                      labels={"mean": f"mean contribution to the {what}", "label": ""})


def final_writes(model: HookedRewardModel) -> tuple[str, ...]:
    """Hooks whose only path to the reward is the final norm: the final residual and what the
    last layer adds to it last (its MLP output; also its attention output when attention and
    MLP run in parallel). Direct attribution is their whole effect."""
    last = model.cfg.n_layers - 1
    hooks = [get_act_name("resid_post", last), get_act_name("mlp_out", last)]
    if model.cfg.parallel_attn_mlp:
        hooks.append(get_act_name("attn_out", last))
    return tuple(hooks)


def _resolve_method(model: HookedRewardModel, hook: str, method: str) -> str:
    choose("method", method, METHODS)
    if method == "auto":
        linear = model.has_linear_head
        return "direct" if linear and hook in final_writes(model) else "gradient"
    if method == "direct" and not model.has_linear_head:
        raise LinearHeadRequiredError(
            f"method='direct' reads the reward head's weights (W_R); this model's head is "
            f"{model.head_kind!r}, not linear. Use method='gradient' (or 'integrated' for pairs), "
            "which needs only the model's output."
        )
    residual = hook.startswith("blocks.") and hook.rsplit(".", 1)[-1] in RESIDUAL_HOOKS
    if method == "direct" and not residual:
        raise InvalidInputError(
            f"method='direct' needs an SAE on the residual stream (a hook ending in one of "
            f"{list(RESIDUAL_HOOKS)}), not {hook!r}; use method='gradient'"
        )
    return method


def _check_decoder(sae: SAE, method: str) -> None:
    if method == "direct" and sae.cfg.normalize_activations in ("layer_norm", "constant_norm_rescale"):
        raise SAEMismatchError(
            f"the SAE normalises its input at run time (normalize_activations="
            f"{sae.cfg.normalize_activations!r}), so a feature's write depends on the token; use "
            "method='gradient'"
        )


def _scalar_reward(model: HookedRewardModel) -> None:
    if not model.is_scalar:
        raise ObjectiveError(
            f"this head has {model.n_rewards} objectives {list(model.label_names)} and no scalar "
            "reward; choose one with model.set_objective(index or weight vector)"
        )


def reward_readout(
    model: HookedRewardModel, scale: Float[Tensor, "batch 1"]
) -> Float[Tensor, "batch d_model"]:
    """Per-sequence direction ``u`` with ``reward = final_residual . u + bias`` at the scoring
    token: the effective reward direction (final norm's weight folded in, centred for LayerNorm)
    over the final norm's cached scale, as :mod:`tl_reward.observational.attribution` reads the residual."""
    w = read_out(model)[0][:, 0]
    if centers(model):
        w = w - w.mean()
    return w[None] / scale


def positions_mask(act: Tensor, mask: Tensor | None) -> Tensor | None:
    """The attention mask shaped to broadcast over ``act`` (None when there is no position axis)."""
    if mask is None or act.ndim < 3 or act.shape[1] != mask.shape[1]:
        return None
    return mask.reshape(*mask.shape, *([1] * (act.ndim - 2))).to(act.dtype)


def _attribute_chunk(model, sae, hook, method, tokens, mask):
    """Rows ``[d_sae + 2 (+1), batch]``, totals ``[batch]``, rewards, max activations.

    ``direct`` keeps, of each activation, the scoring token's row only (and the features' maxima
    over the real tokens), taken as the forward produces it; ``gradient`` keeps the activations
    the gradient is taken against, at every position."""
    pooled = model.pooled_index(tokens, mask)
    n = tokens.shape[0]
    rows_ = torch.arange(n, device=tokens.device)
    store: dict[str, Tensor] = {}
    names = [f"{hook}.hook_sae_acts_post", f"{hook}.hook_sae_error", f"{hook}.hook_sae_input"]
    grad = method == "gradient"

    def keep(act: Tensor, hook) -> Tensor:
        if grad:
            if not hook.name.endswith("hook_sae_input"):
                act = act.detach().requires_grad_(True)  # a leaf: its gradient is what we want
            store[hook.name] = act
            return act
        if hook.name.endswith("hook_sae_acts_post"):
            where = positions_mask(act, mask)
            masked = act if where is None else act * where
            store["max"] = masked.reshape(n, -1, act.shape[-1]).amax(1).T  # [d_sae, batch]
        if act.ndim >= 3 and act.shape[1] == tokens.shape[1]:
            store[hook.name] = act[rows_, pooled]  # the scoring token's row
        else:
            store[hook.name] = act
        return act

    fwd = [(name, keep) for name in names]
    if method == "direct":
        fwd += [(name, keep) for name in ("ln_final.hook_scale", "ln_final.hook_normalized")]
    with torch.set_grad_enabled(grad), attach_saes(model, [sae], use_error_term=True):
        reward = model.run_with_hooks(tokens, attention_mask=mask, pool_index=pooled, fwd_hooks=fwd)
    if reward.ndim != 1:
        raise InvalidInputError(
            "SAE attribution needs a scalar reward; choose an objective with model.set_objective(...)"
        )
    acts, err, x = (store[name] for name in names)
    dt = readout_dtype(model)  # sums of many small terms: float32 at least
    b0 = decoder_bias(sae).to(dt)
    if grad:
        where = positions_mask(acts, mask)
        masked = acts.detach() if where is None else acts.detach() * where
        max_act = masked.reshape(n, -1, acts.shape[-1]).amax(1).T  # [d_sae, batch]
        g_acts, g_out = torch.autograd.grad(reward.sum(), [acts, err])
        with torch.no_grad():
            g_acts, g_out = g_acts.to(dt), g_out.to(dt)
            feat = (masked.to(dt) * g_acts).reshape(n, -1, acts.shape[-1]).sum(1).T  # [d_sae, batch]
            w = positions_mask(err, mask)
            g_out = g_out if w is None else g_out * w
            g_flat = g_out.reshape(n, -1, b0.shape[0])  # [batch, pos, d_in]
            error = (err.detach().to(dt) * g_out).reshape(n, -1).sum(-1)
            bias_row = (g_flat @ b0).sum(1)
            totals = (x.detach().to(dt).reshape(n, -1) * g_flat.reshape(n, -1)).sum(-1)
        rows = [feat, error[None], bias_row[None]]
        return torch.cat(rows), totals, reward.detach().to(dt), max_act.to(dt)
    with torch.no_grad():
        scale = store["ln_final.hook_scale"].to(dt)  # [batch, 1], at the scoring token
        u = reward_readout(model, scale)  # reward = final_resid . u + bias
        bias = read_out(model)[1]
        a = acts.to(dt)  # [batch, d_sae]
        feat = (a * decoder_dot(sae, u)).T
        error = (err.to(dt) * u).sum(-1)
        bias_row = u @ b0
        # the centred final residual
        final = store["ln_final.hook_normalized"].to(dt) * scale
        rest = ((final - x.to(dt)) * u).sum(-1)
        reward = reward.to(dt)
        totals = reward - bias[0]
    return (torch.cat([feat, error[None], bias_row[None], rest[None]]), totals, reward,
            store["max"].to(dt))


def attribution_rows(model, saes, tokens, attention_mask, method, batch_size, progress) -> dict:
    """The fields of an :class:`SAEAttributionResult` for one set of sequences."""
    items = sae_list(saes)
    hooks = [check_sae(model, s) for s in items]
    if len(set(hooks)) != len(hooks):
        raise InvalidInputError(f"two SAEs read the same hook: {hooks}")
    methods = [_resolve_method(model, h, method) for h in hooks]
    for sae, m in zip(items, methods, strict=True):
        _check_decoder(sae, m)
    tokens, attention_mask = as_tokens(model, tokens, attention_mask)
    _scalar_reward(model)  # a multi-objective head needs an objective: clear error here
    # a nonlinear head has no read-out bias (its methods are the gradient ones, which need none)
    bias = read_out(model)[1] if model.has_linear_head else torch.full((1,), float("nan"))
    values, totals, maxes, labels, row_hooks, kinds, feats = [], [], [], [], [], [], []
    reward = None
    for sae, hook, m in zip(items, hooks, methods, strict=True):
        chunks = []
        # the memory budget: a forward per batch (and its graph for the gradient method), plus
        # the SAE's activations kept at every position for the gradient
        kept = 3 * sae.cfg.d_sae * tokens.shape[1] * 4 if m == "gradient" else 0
        fit = rows_that_fit(model.cfg, tokens.shape[1], batch_size, kept_per_row=kept,
                            grad=m == "gradient")
        for rows in batches(tokens.shape[0], fit, progress, f"SAE attribution ({hook})"):
            mask = None if attention_mask is None else attention_mask[rows]
            chunks.append(_attribute_chunk(model, sae, hook, m, tokens[rows], mask))
        v, t, r, mx = (torch.cat([c[i] for c in chunks], dim=-1) for i in range(4))
        values.append(v)
        totals.append(t)
        maxes.append(torch.cat([mx, torch.full_like(v[mx.shape[0]:], float("nan"))]))
        reward = r if reward is None else reward
        d = sae.cfg.d_sae
        extra = ["error", "decoder_bias"] + (["rest"] if m == "direct" else [])
        labels += [f"{hook}/f{i}" for i in range(d)] + [f"{hook}/{e}" for e in extra]
        row_hooks += [hook] * (d + len(extra))
        kinds += ["feature"] * d + extra
        feats += list(range(d)) + [-1] * len(extra)
    return dict(
        values=torch.cat(values), labels=tuple(labels), hooks=tuple(row_hooks), kinds=tuple(kinds),
        features=tuple(feats), sae_hooks=tuple(hooks), methods=tuple(methods),
        totals=torch.stack(totals), reward=reward, bias=bias[0].detach(),
        max_activation=torch.cat(maxes),
    )


def sae_reward_attribution(
    model: HookedRewardModel,
    saes: Any,
    tokens: Int[Tensor, "batch pos"] | Sequence[Text],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    method: str = "auto",
    batch_size: int = 32,
    progress: bool = True,
) -> SAEAttributionResult:
    """Each SAE feature's contribution to the pooled reward of each sequence.

    Args:
        saes: a sae-lens ``SAE`` or a list of them (one per hook; each is spliced in alone, with
            its error term, so the model's own gradients are used).
        tokens, attention_mask: token ids and mask, or texts.
        method: ``"direct"`` (residual-stream SAEs: activation at the scoring token x decoder row .
            effective reward direction / cached final-norm scale; exact, with a ``rest`` row for
            what the later layers add), ``"gradient"`` (gradient x activation summed over
            positions, any hook), or ``"auto"``: direct where it is the whole effect (the final
            residual ``blocks.{n_layers-1}.hook_resid_post`` and the last MLP's output, see
            :func:`final_writes`), gradient elsewhere.

    Each SAE's rows add up to its ``totals`` (see :class:`SAEAttributionResult`).
    """
    rows = attribution_rows(model, saes, tokens, attention_mask, method, batch_size, progress)
    return SAEAttributionResult(**rows)


def align_positions(
    model: HookedRewardModel,
    t_tokens: Int[Tensor, "batch pos"],
    t_mask: Int[Tensor, "batch pos"] | None,
    s_tokens: Int[Tensor, "batch _pos"],
    s_mask: Int[Tensor, "batch _pos"] | None,
) -> tuple[Tensor, Tensor]:
    """Source position of each target position, aligned from the scoring token (target position
    ``p`` reads ``p - pooled_t + pooled_s``), and whether it exists (in range and not padding)."""
    pt, ps = model.pooled_index(t_tokens, t_mask), model.pooled_index(s_tokens, s_mask)
    pos = torch.arange(t_tokens.shape[1], device=t_tokens.device)[None]
    sp = pos - pt[:, None] + ps[:, None]  # [batch, t_pos]
    ok = (sp >= 0) & (sp < s_tokens.shape[1])
    sp = sp.clamp(0, s_tokens.shape[1] - 1)
    if s_mask is not None:
        ok &= s_mask.gather(1, sp).bool()
    if t_mask is not None:
        ok &= t_mask.bool()
    return ok, sp


def gather_aligned(src: Tensor, index: Tensor, ok: Tensor, fallback: Tensor) -> Tensor:
    """``src`` (``[batch, s_pos, ...]``) read at the aligned positions; ``fallback`` where none."""
    if src.ndim == 2:  # no position axis
        return src
    shape = (*index.shape, *src.shape[2:])
    idx = index.reshape(*index.shape, *([1] * (src.ndim - 2))).expand(shape)
    keep = ok.reshape(*ok.shape, *([1] * (src.ndim - 2)))
    return torch.where(keep, src.gather(1, idx), fallback)


def _integrated_chunk(model, sae, hook, steps, c_tokens, c_mask, r_tokens, r_mask):
    """Integrated gradients along the straight path from the rejected run's SAE activations
    (features and error) to the chosen run's, aligned from the scoring token."""
    names = (f"{hook}.hook_sae_acts_post", f"{hook}.hook_sae_error")
    store: dict[str, Tensor] = {}

    def keep(act, hook):
        store[hook.name] = act.detach()
        return act

    with torch.no_grad(), attach_saes(model, [sae]):
        r_c = model.run_with_hooks(c_tokens, attention_mask=c_mask, fwd_hooks=[(n, keep) for n in names])
        acts_c, err_c = (store[n] for n in names)
        r_r = model.run_with_hooks(r_tokens, attention_mask=r_mask, fwd_hooks=[(n, keep) for n in names])
        acts_r, err_r = (store[n] for n in names)
    if r_c.ndim != 1:
        raise InvalidInputError(
            "SAE attribution needs a scalar reward; choose an objective with model.set_objective(...)"
        )
    ok, index = align_positions(model, r_tokens, r_mask, c_tokens, c_mask)
    d_acts = gather_aligned(acts_c, index, ok, acts_r) - acts_r
    d_err = gather_aligned(err_c, index, ok, err_r) - err_r
    b = r_tokens.shape[0]
    alphas = torch.cat([(torch.arange(steps, device=r_tokens.device) + 0.5) / steps,
                        torch.ones(1, device=r_tokens.device)])  # midpoints, then the end point
    n_rows = len(alphas) * b

    def path(start: Tensor, delta: Tensor) -> Tensor:
        a = alphas.repeat_interleave(b).reshape(n_rows, *([1] * (start.ndim - 1)))
        return (start.repeat(len(alphas), *([1] * (start.ndim - 1)))
                + a * delta.repeat(len(alphas), *([1] * (delta.ndim - 1))))

    leaves = {names[0]: path(acts_r, d_acts).requires_grad_(True),
              names[1]: path(err_r, d_err).requires_grad_(True)}

    def place(act, hook):
        return leaves[hook.name]

    pooled = model.pooled_index(r_tokens, r_mask).repeat(len(alphas))
    mask = None if r_mask is None else r_mask.repeat(len(alphas), 1)
    with torch.enable_grad(), attach_saes(model, [sae]):
        rewards = model.run_with_hooks(r_tokens.repeat(len(alphas), 1), attention_mask=mask,
                                       pool_index=pooled, fwd_hooks=[(n, place) for n in names])
        g_acts, g_err = torch.autograd.grad(rewards[: steps * b].sum(), [leaves[n] for n in names])
    with torch.no_grad():
        g_acts = g_acts[: steps * b].reshape(steps, *d_acts.shape).mean(0)
        g_err = g_err[: steps * b].reshape(steps, *d_err.shape).mean(0)
        feat = (d_acts * g_acts).reshape(b, -1, d_acts.shape[-1]).sum(1).T
        error = (d_err * g_err).reshape(b, -1).sum(-1)
        patched = rewards[steps * b:].detach()
        rest = r_c - patched  # what this hook does not carry from the chosen run
        zero = torch.zeros_like(error)  # decode(0) is the same on both sides: it cancels
        rows = torch.cat([feat, error[None], zero[None], rest[None]])
        max_c = _max_over_positions(acts_c, c_mask)
        max_r = _max_over_positions(acts_r, r_mask)
    return rows, r_c - r_r, r_c - r_r, max_c, max_r


def _max_over_positions(acts: Tensor, mask: Tensor | None) -> Tensor:
    where = positions_mask(acts, mask)
    masked = acts if where is None else acts * where
    return masked.reshape(acts.shape[0], -1, acts.shape[-1]).amax(1).T


def pair_rows(model, saes, chosen, rejected, chosen_mask, rejected_mask, method, steps, batch_size,
              progress) -> tuple[dict, Tensor, Tensor]:
    """Fields of a pair :class:`SAEAttributionResult`, and the chosen and rejected per-text maxima
    of every feature row."""
    choose("method", method, PAIR_METHODS)
    if method != "integrated":
        a = attribution_rows(model, saes, chosen, chosen_mask, method, batch_size, progress)
        b = attribution_rows(model, saes, rejected, rejected_mask, method, batch_size, progress)
        if a["values"].shape[1] != b["values"].shape[1]:
            raise InvalidInputError(
                f"{a['values'].shape[1]} chosen but {b['values'].shape[1]} rejected sequences; "
                "pairs must match"
            )
        out = dict(a)
        for key in ("values", "totals", "reward", "max_activation"):
            out[key] = a[key] - b[key]
        out["bias"] = torch.zeros_like(a["bias"])
        return out, a["max_activation"], b["max_activation"]
    if steps < 1:
        raise InvalidInputError(f"steps must be >= 1, got {steps}")
    items = sae_list(saes)
    hooks = [check_sae(model, s) for s in items]
    if len(set(hooks)) != len(hooks):
        raise InvalidInputError(f"two SAEs read the same hook: {hooks}")
    c_tokens, c_mask = as_tokens(model, chosen, chosen_mask)
    r_tokens, r_mask = as_tokens(model, rejected, rejected_mask)
    if c_tokens.shape[0] != r_tokens.shape[0]:
        raise InvalidInputError(
            f"{c_tokens.shape[0]} chosen but {r_tokens.shape[0]} rejected sequences; pairs must match"
        )
    _scalar_reward(model)
    values, totals, max_c, max_r, labels, row_hooks, kinds, feats = [], [], [], [], [], [], [], []
    margin = None
    pairs_per_forward = max(1, batch_size // (steps + 1))
    for sae, hook in zip(items, hooks, strict=True):
        chunks = []
        for rows in batches(c_tokens.shape[0], pairs_per_forward, progress,
                            f"integrated gradients ({hook})"):
            chunks.append(_integrated_chunk(
                model, sae, hook, steps, c_tokens[rows], None if c_mask is None else c_mask[rows],
                r_tokens[rows], None if r_mask is None else r_mask[rows]))
        v, t, m, mc, mr = (torch.cat([c[i] for c in chunks], dim=-1) for i in range(5))
        values.append(v)
        totals.append(t)
        nan = torch.full_like(v[mc.shape[0]:], float("nan"))
        max_c.append(torch.cat([mc, nan]))
        max_r.append(torch.cat([mr, nan]))
        margin = m if margin is None else margin
        d = sae.cfg.d_sae
        extra = ["error", "decoder_bias", "rest"]
        labels += [f"{hook}/f{i}" for i in range(d)] + [f"{hook}/{e}" for e in extra]
        row_hooks += [hook] * (d + len(extra))
        kinds += ["feature"] * d + extra
        feats += list(range(d)) + [-1] * len(extra)
    max_c, max_r = torch.cat(max_c), torch.cat(max_r)
    out = dict(
        values=torch.cat(values), labels=tuple(labels), hooks=tuple(row_hooks), kinds=tuple(kinds),
        features=tuple(feats), sae_hooks=tuple(hooks), methods=("integrated",) * len(hooks),
        totals=torch.stack(totals), reward=margin, bias=torch.zeros((), device=margin.device),
        max_activation=max_c - max_r,
    )
    return out, max_c, max_r


def sae_pair_attribution(
    model: HookedRewardModel,
    saes: Any,
    chosen: Int[Tensor, "batch pos"] | Sequence[Text],
    rejected: Int[Tensor, "batch _pos"] | Sequence[Text],
    chosen_mask: Int[Tensor, "batch pos"] | None = None,
    rejected_mask: Int[Tensor, "batch _pos"] | None = None,
    *,
    method: str = "auto",
    steps: int = 8,
    batch_size: int = 32,
    progress: bool = True,
) -> SAEAttributionResult:
    """Each SAE feature's contribution to each pair's margin (chosen - rejected).

    Methods:

    - ``"direct"``, ``"gradient"``, ``"auto"``: as in :func:`sae_reward_attribution`, on each
      side separately (so lengths may differ), chosen minus rejected. The read-out bias cancels:
      the direct rows add up to the margin.
    - ``"integrated"``: integrated gradients along the straight path from the rejected run's SAE
      activations (every feature and the error term, at every position, aligned from the scoring
      token) to the chosen run's, ``steps`` midpoints, run on the rejected tokens. Follows the
      reward through saturating norms and gates where one gradient does not (the gradient at a
      zero activation of a gated unit is 0). Rows add up to the margin: features + error + ``rest``,
      where ``rest`` = chosen reward - reward of the rejected run with this hook fully patched
      (0 for a residual-stream hook and pairs of equal length), up to the midpoint rule's error.

    ``max_activation`` holds the chosen-minus-rejected difference of the per-text maxima.
    """
    out, _, _ = pair_rows(model, saes, chosen, rejected, chosen_mask, rejected_mask, method, steps,
                          batch_size, progress)
    return SAEAttributionResult(**out, is_pair=True)
