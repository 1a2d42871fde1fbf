"""Attribution of the reward to the model's components through a nonlinear head.

With a linear head the reward is a sum over components (:func:`direct_reward_attribution`,
exact). With a nonlinear head ``f`` it is not, and this module says so with a number. Under the
final norm linearised at its cached scale (as the direct attribution does), the head's input is

    h = b + sum_c x_c        x_c = w * center(c) / scale   (w, b: the final norm's weight, bias)

for the components ``c`` of :meth:`ActivationCache.decompose_resid` (embeddings, each attention
layer, each MLP). A gated head reads two such states (the scoring token and the end of the
prompt); each component then has a share of both.

- ``method="integrated_gradients"``: ``attr_c = x_c . G`` with ``G = int_0^1 grad f(h0 + a (h -
  h0)) da`` from the baseline ``h0 = b`` (every component removed: the norm's bias, zero under
  RMSNorm). The path is first cut where any ``nn.ReLU`` of the head changes sign (found exactly:
  between cuts every pre-activation is affine in ``a`` when, as in the MLP and gated heads, only
  affine maps precede each ReLU), then each piece is integrated with ``steps``-point
  Gauss-Legendre quadrature: exact for a ReLU MLP head, smooth pieces elsewhere (the gate's
  softmax, GELU). Completeness: ``sum_c attr_c = f(h) - f(h0)`` up to the quadrature error,
  reported per sequence as ``completeness_gap``.
- ``method="gradient"``: ``attr_c = x_c . grad f(h)``, the head's linearisation at the pooled
  state (gradient x input); ``completeness_gap`` is how far the head is from linear along the way
  (zero for a linear head).

``values.sum(0) + bias + completeness_gap == total`` exactly, with ``bias = f(h0)`` and ``total``
the reward as the head computes it from the reconstructed state, in float32 at least (a
half-precision model's head is run on a float32 copy, as every read-out of tl_reward is).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._memory import rows_that_fit
from ._readout import as_tokens, batches, choose, pooled_run, readout_dtype
from .attribution import AttributionResult
from .errors import ObjectiveError
from .heads import head_in_dtype
from .model import HookedRewardModel, Text

HEAD_METHODS = ("integrated_gradients", "gradient")
_POINTS_PER_CALL = 2048  # path points per head call (integrated gradients)


@dataclass(frozen=True)
class HeadAttributionResult(AttributionResult):
    """Components' shares of the reward through a nonlinear head.

    ``values.sum(0) + bias + completeness_gap == total``: ``bias`` is the head's output at the
    baseline, ``completeness_gap`` ``[batch]`` what the additive decomposition misses (the
    quadrature error of integrated gradients; the head's nonlinearity for ``gradient``).
    """

    method: str = "integrated_gradients"
    steps: int = 0
    completeness_gap: Float[Tensor, "batch"] | None = None


def _head_fn(model: HookedRewardModel, head, unembed):
    weights = model.objective_weights

    def f(pooled: Tensor, prompt: Tensor | None) -> Tensor:
        out = head.compute(pooled, unembed, prompt)
        return out @ weights.to(out.dtype) if weights is not None else out[..., 0]

    return f


def _gradient_at(f, points: Sequence[Tensor], reads_prompt: bool) -> list[Tensor]:
    """Gradient of ``sum f`` at ``points`` (pooled, and prompt state for a gated head)."""
    with torch.enable_grad():
        xs = [p.detach().requires_grad_(True) for p in points]
        out = f(xs[0], xs[1] if reads_prompt else None)
        return list(torch.autograd.grad(out.sum(), xs))


def _relu_cuts(f, head: torch.nn.Module, inputs: list[Tensor], starts: list[Tensor],
               reads_prompt: bool) -> Tensor:
    """Points ``a`` in [0, 1] where a ReLU of the head changes sign along one sequence's path
    ``starts + a (inputs - starts)`` (each ``[d_model]``), with 0 and 1, sorted."""
    relus = [m for m in head.modules() if isinstance(m, torch.nn.ReLU)]
    cuts = torch.tensor([0.0, 1.0], dtype=inputs[0].dtype, device=inputs[0].device)
    site = 0
    while True:  # ReLU calls in forward order: earlier ones' patterns are fixed between cuts
        seen: list[Tensor] = []
        handles = [r.register_forward_hook(lambda m, args, out, seen=seen: seen.append(args[0]))
                   for r in relus]
        try:
            with torch.no_grad():
                points = [s[None] + cuts[:, None] * (x - s)[None]
                          for x, s in zip(inputs, starts, strict=True)]
                f(points[0], points[1] if reads_prompt else None)
        finally:
            for handle in handles:
                handle.remove()
        if site >= len(seen):
            return cuts
        z = seen[site].reshape(len(cuts), -1)  # [cut, unit]
        a, b = z[:-1], z[1:]
        cross = (a * b) < 0
        lo, hi = cuts[:-1, None], cuts[1:, None]
        where = (lo + (hi - lo) * a / (a - b))[cross]
        cuts = torch.unique(torch.cat([cuts, where.clamp(0, 1)]))  # sorted
        site += 1


def _integrated_gradients(f, head, inputs, starts, reads_prompt, alphas, quad) -> list[Tensor]:
    """``int_0^1 grad f`` along each row's straight path, piecewise Gauss-Legendre between the
    head's ReLU kinks."""
    out = [torch.empty_like(x) for x in inputs]
    for row in range(inputs[0].shape[0]):
        x = [t[row] for t in inputs]
        s = [t[row] for t in starts]
        cuts = _relu_cuts(f, head, x, s, reads_prompt)
        lo, width = cuts[:-1], cuts[1:] - cuts[:-1]  # [piece]
        a = (lo[:, None] + width[:, None] * alphas[None]).reshape(-1)  # [piece * steps]
        w = (width[:, None] * quad[None]).reshape(-1)
        total = [torch.zeros_like(xi) for xi in x]
        for lo in range(0, len(a), _POINTS_PER_CALL):  # bounded memory however many kinks
            part, weight = a[lo:lo + _POINTS_PER_CALL], w[lo:lo + _POINTS_PER_CALL]
            path = [si[None] + part[:, None] * (xi - si)[None] for xi, si in zip(x, s, strict=True)]
            for t, g in zip(total, _gradient_at(f, path, reads_prompt), strict=True):
                t += (g * weight[:, None]).sum(0)
        for o, t in zip(out, total, strict=True):
            o[row] = t
    return out


def head_attribution(
    model: HookedRewardModel,
    tokens: Int[Tensor, "batch pos"] | Sequence[Text],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    method: str = "integrated_gradients",
    steps: int = 16,
    batch_size: int = 32,
    progress: bool = True,
) -> HeadAttributionResult:
    """Each component's share of the pooled reward through the model's head, of any kind.

    ``method``: ``"integrated_gradients"`` (from the baseline with every component removed,
    ``steps`` Gauss-Legendre points on each piece of the path between the head's ReLU kinks;
    sums to reward minus baseline up to ``completeness_gap``: below 1e-4 at ``steps=16`` on the
    tiny MLP and gated heads of the tests, exact at ``steps=1`` for a ReLU MLP head) or
    ``"gradient"`` (gradient x input at the pooled state). See the module docstring. For a linear
    head both equal :func:`direct_reward_attribution` (gap 0 up to float error).
    """
    choose("method", method, HEAD_METHODS)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not model.is_scalar:
        raise ObjectiveError(
            f"this head has {model.n_rewards} outputs {list(model.label_names)} and no scalar "
            "reward; choose one with model.set_objective(index or weight vector)"
        )
    tokens, attention_mask = as_tokens(model, tokens, attention_mask)
    reads_prompt = model.reward_head.reads_prompt_end
    dt = readout_dtype(model)  # a half-precision model's head runs in float32 here
    head, unembed = head_in_dtype(model.reward_head, model.unembed, dt)
    f = _head_fn(model, head, unembed)
    ln = model.ln_final
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.as_tensor((nodes + 1) / 2, dtype=dt, device=tokens.device)
    quad = torch.as_tensor(weights / 2, dtype=dt, device=tokens.device)
    batch_size = rows_that_fit(model.cfg, tokens.shape[1], batch_size)
    chunks, totals, gaps, labels, base_value = [], [], [], None, None
    for rows in batches(tokens.shape[0], batch_size, progress, f"head attribution ({method})"):
        mask = None if attention_mask is None else attention_mask[rows]
        run = pooled_run(model, tokens[rows], mask,
                         lambda n: n.endswith(("hook_embed", "hook_pos_embed", "hook_attn_out",
                                               "hook_mlp_out", "_post.hook_scale")),
                         with_prompt_end=reads_prompt)
        with torch.no_grad():
            comps, labels = run.cache.decompose_resid(
                layer=None, mode="all", apply_ln=True, incl_embeds=True, return_labels=True
            )  # [component, batch, 1 or 2 positions, d_model], centred and scaled
            comps = comps.to(dt)
            if getattr(ln, "w", None) is not None:
                comps = comps * ln.w.to(dt)
            base = torch.zeros(comps.shape[-1], dtype=dt, device=comps.device)
            if getattr(ln, "b", None) is not None:
                base = base + ln.b.to(dt)
            h = base + comps.sum(0)  # [batch, positions, d_model]: the head's input(s)
            h0 = base.expand_as(h)
            inputs = [h[:, 0]] + ([h[:, 1]] if reads_prompt else [])
            starts = [h0[:, 0]] + ([h0[:, 1]] if reads_prompt else [])
            total = f(inputs[0], inputs[1] if reads_prompt else None)
            base_out = f(starts[0], starts[1] if reads_prompt else None)
        if method == "gradient":
            grads = _gradient_at(f, inputs, reads_prompt)
        else:
            grads = _integrated_gradients(f, head, inputs, starts, reads_prompt, alphas, quad)
        with torch.no_grad():
            values = sum(torch.einsum("cbd,bd->cb", comps[:, :, i], g)
                         for i, g in enumerate(grads))
        chunks.append(values.detach())
        totals.append(total.detach())
        gaps.append((total - base_out - values.sum(0)).detach())
        base_value = base_out[0].detach()
    rd = readout_dtype(model)
    return HeadAttributionResult(
        values=torch.cat(chunks, dim=1).to(rd),
        labels=tuple(labels),
        bias=base_value.to(rd),
        total=torch.cat(totals).to(rd),
        level="component",
        method=method,
        steps=steps if method == "integrated_gradients" else 1,
        completeness_gap=torch.cat(gaps).to(rd),
    )
