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

from .._memory import rows_that_fit
from .._readout import as_tokens, batches, centers, choose, pooled_run, readout_dtype
from ..errors import ObjectiveError
from ..heads import head_in_dtype
from ..model import HookedRewardModel, Text
from .attribution import AttributionResult

HEAD_METHODS = ("integrated_gradients", "gradient")
HEAD_LEVELS = ("component", "head", "neuron", "head_source")
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
    reads_prompt = head.reads_prompt_end

    def f(pooled: Tensor, prompt: Tensor | None = None) -> Tensor:
        out = head.compute(pooled, unembed, prompt if reads_prompt else None)
        return out @ weights.to(out.dtype) if weights is not None else out[..., 0]

    return f


def _gradient_at(f, points: Sequence[Tensor]) -> list[Tensor]:
    """Gradient of ``sum f(*points)`` at ``points``."""
    with torch.enable_grad():
        xs = [p.detach().requires_grad_(True) for p in points]
        out = f(*xs)
        return list(torch.autograd.grad(out.sum(), xs))


def _relu_cuts(f, module: torch.nn.Module, inputs: list[Tensor], starts: list[Tensor]) -> Tensor:
    """Points ``a`` in [0, 1] where a ReLU of ``module`` changes sign along one sequence's path
    ``starts + a (inputs - starts)`` (each ``[d_model]``), with 0 and 1, sorted."""
    relus = [m for m in module.modules() if isinstance(m, torch.nn.ReLU)]
    cuts = torch.tensor([0.0, 1.0], dtype=inputs[0].dtype, device=inputs[0].device)
    site = 0
    while True:  # ReLU calls in forward order: earlier ones' patterns are fixed between cuts
        seen: list[Tensor] = []
        handles = [r.register_forward_hook(lambda m, args, out, seen=seen: seen.append(args[0]))
                   for r in relus]
        try:
            with torch.no_grad():
                f(*[s[None] + cuts[:, None] * (x - s)[None]
                    for x, s in zip(inputs, starts, strict=True)])
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


def _integrated_gradients(f, module, inputs, starts, alphas, quad) -> list[Tensor]:
    """``int_0^1 grad f`` along each row's straight path, piecewise Gauss-Legendre between the
    ReLU kinks of ``module``."""
    out = [torch.empty_like(x) for x in inputs]
    for row in range(inputs[0].shape[0]):
        x = [t[row] for t in inputs]
        s = [t[row] for t in starts]
        cuts = _relu_cuts(f, module, x, s)
        lo, width = cuts[:-1], cuts[1:] - cuts[:-1]  # [piece]
        a = (lo[:, None] + width[:, None] * alphas[None]).reshape(-1)  # [piece * steps]
        w = (width[:, None] * quad[None]).reshape(-1)
        total = [torch.zeros_like(xi) for xi in x]
        for lo in range(0, len(a), _POINTS_PER_CALL):  # bounded memory however many kinks
            part, weight = a[lo:lo + _POINTS_PER_CALL], w[lo:lo + _POINTS_PER_CALL]
            path = [si[None] + part[:, None] * (xi - si)[None] for xi, si in zip(x, s, strict=True)]
            for t, g in zip(total, _gradient_at(f, path), strict=True):
                t += (g * weight[:, None]).sum(0)
        for o, t in zip(out, total, strict=True):
            o[row] = t
    return out


def _needed(level: str):
    base = ("hook_embed", "hook_pos_embed", "hook_attn_out", "hook_mlp_out", "_post.hook_scale")
    extra = {"component": (), "head": ("attn.hook_z",), "neuron": ("mlp.hook_post",),
             "head_source": ("attn.hook_pattern", "attn.hook_v")}[level]
    return lambda name: name.endswith(base + extra)


def _split(model: HookedRewardModel, cache, level: str, comp: Tensor, labels: list[str],
           directions: list[tuple[int, Tensor]]) -> tuple[Tensor, list[str]]:
    """Heads, head x source position or neurons from the component values ``comp``
    ``[component, batch]``. ``directions``: ``(slot, u)`` with ``u`` ``[batch, d_model]`` what a
    vector written to the residual stream at that kept position is dotted with (the gradient
    through the final norm, linearised at its cached scale). A layer's heads (its neurons) plus
    its ``attn_bias`` (``mlp_bias``) row equal its component value exactly: the bias row is that
    remainder (the output bias; zero without one)."""
    index = {lab: i for i, lab in enumerate(labels)}
    values: list[Tensor] = [comp[index[n]][None] for n in ("embed", "pos_embed") if n in index]
    out_labels = [n for n in ("embed", "pos_embed") if n in index]
    n_heads = model.cfg.n_heads

    def post(layer: int, which: str, slot: int, u: Tensor) -> Tensor:
        norm = getattr(model.blocks[layer], which, None)
        if norm is None or not model.cfg.use_normalization_before_and_after:
            return u
        scale = cache[f"blocks.{layer}.{which}.hook_scale"][:, slot]  # [batch, 1]
        return norm.w.to(u.dtype) * u / scale

    for layer in range(model.cfg.n_layers):
        attn_total = comp[index[f"{layer}_attn_out"]]
        if level in ("head", "head_source"):
            W_O = model.blocks[layer].attn.W_O.to(comp.dtype)  # [head, d_head, d_model]
            heads = 0
            for slot, u in directions:
                o = torch.einsum("hdm,bm->bhd", W_O, post(layer, "ln1_post", slot, u))
                if level == "head":
                    z = cache[f"blocks.{layer}.attn.hook_z"][:, slot]  # [batch, head, d_head]
                    heads = heads + (z * o).sum(-1).T  # [head, batch]
                else:
                    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, slot]
                    v = cache[f"blocks.{layer}.attn.hook_v"]  # [batch, src, kv_head, d_head]
                    if v.shape[2] != n_heads:  # grouped-query attention: shared K/V heads
                        v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
                    heads = heads + pattern * torch.einsum("bshd,bhd->bhs", v, o)
            if level == "head":
                values.append(heads)
                out_labels += [f"L{layer}H{h}" for h in range(n_heads)]
                rest = attn_total - heads.sum(0)
            else:  # [batch, head, src]
                n_src = heads.shape[-1]
                values.append(heads.permute(1, 2, 0).reshape(n_heads * n_src, -1))
                out_labels += [f"L{layer}H{h}.src{s}" for h in range(n_heads) for s in range(n_src)]
                rest = attn_total - heads.sum((1, 2))
            values.append(rest[None])
            out_labels.append(f"L{layer}.attn_bias")
        else:
            values.append(attn_total[None])
            out_labels.append(f"{layer}_attn_out")
        mlp_total = comp[index[f"{layer}_mlp_out"]]
        if level == "neuron":
            W_out = model.blocks[layer].mlp.W_out.to(comp.dtype)  # [d_mlp, d_model]
            neurons = 0
            for slot, u in directions:
                acts = cache[f"blocks.{layer}.mlp.hook_post"][:, slot]  # [batch, d_mlp]
                neurons = neurons + (acts * (post(layer, "ln2_post", slot, u) @ W_out.T)).T
            values += [neurons, (mlp_total - neurons.sum(0))[None]]
            out_labels += [f"L{layer}N{n}" for n in range(neurons.shape[0])]
            out_labels.append(f"L{layer}.mlp_bias")
        else:
            values.append(mlp_total[None])
            out_labels.append(f"{layer}_mlp_out")
    return torch.cat(values, dim=0), out_labels


def _attribute(model, tokens, attention_mask, f, module, slots: tuple[int, ...], *, level: str,
               method: str, steps: int, batch_size: int, progress: bool,
               desc: str) -> HeadAttributionResult:
    """Attribute ``f(*states)`` (one value per row) of the head inputs at the kept positions
    ``slots`` (0: the scoring token, 1: the end of the prompt) to the model's parts."""
    choose("method", method, HEAD_METHODS)
    choose("level", level, HEAD_LEVELS)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    tokens, attention_mask = as_tokens(model, tokens, attention_mask)
    if level == "head_source" and tokens.shape[0] > batch_size:
        batch_size = tokens.shape[0]  # one batch: its labels are its source positions
    with_prompt = model.reward_head.reads_prompt_end
    dt = readout_dtype(model)
    ln = model.ln_final
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.as_tensor((nodes + 1) / 2, dtype=dt, device=tokens.device)
    quad = torch.as_tensor(weights / 2, dtype=dt, device=tokens.device)
    if level != "head_source":
        batch_size = rows_that_fit(model.cfg, tokens.shape[1], batch_size)
    chunks, totals, gaps, labels, base_value = [], [], [], None, None
    for rows in batches(tokens.shape[0], batch_size, progress, desc):
        mask = None if attention_mask is None else attention_mask[rows]
        run = pooled_run(model, tokens[rows], mask, _needed(level), with_prompt_end=with_prompt)
        with torch.no_grad():
            comps, labels = run.cache.decompose_resid(
                layer=None, mode="all", apply_ln=True, incl_embeds=True, return_labels=True
            )  # [component, batch, 1 or 2 positions, d_model], centred and scaled
            comps = comps.to(dt)
            w = ln.w.to(dt) if getattr(ln, "w", None) is not None else None
            if w is not None:
                comps = comps * w
            base = torch.zeros(comps.shape[-1], dtype=dt, device=comps.device)
            if getattr(ln, "b", None) is not None:
                base = base + ln.b.to(dt)
            h = base + comps.sum(0)  # [batch, positions, d_model]: the head's input(s)
            inputs = [h[:, s] for s in slots]
            starts = [base.expand_as(x) for x in inputs]
            total = f(*inputs)
            base_out = f(*starts)
        if method == "gradient":
            grads = _gradient_at(f, inputs)
        else:
            grads = _integrated_gradients(f, module, inputs, starts, alphas, quad)
        with torch.no_grad():
            values = sum(torch.einsum("cbd,bd->cb", comps[:, :, s], g)
                         for s, g in zip(slots, grads, strict=True))
            if level != "component":
                scale = run.cache["ln_final.hook_scale"].to(dt)  # [batch, positions, 1]
                directions = []
                for s, g in zip(slots, grads, strict=True):
                    u = g * w if w is not None else g
                    if centers(model):
                        u = u - u.mean(-1, keepdim=True)
                    directions.append((s, u / scale[:, s]))
                values, labels = _split(model, run.cache, level, values, labels, directions)
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
        level=level,
        method=method,
        steps=steps if method == "integrated_gradients" else 1,
        completeness_gap=torch.cat(gaps).to(rd),
    )


def head_attribution(
    model: HookedRewardModel,
    tokens: Int[Tensor, "batch pos"] | Sequence[Text],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    method: str = "integrated_gradients",
    level: str = "component",
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

    ``level``: ``"component"`` (embeddings, each attention layer, each MLP), ``"head"`` (each
    attention head, plus a layer's ``attn_bias`` row), ``"neuron"`` (each MLP neuron, plus a
    layer's ``mlp_bias``) or ``"head_source"`` (each head's write split by the source position it
    attends to; one batch). The head input is a sum of these parts (under the final norm at its
    cached scale) and the integrated gradient is the same vector whatever the split, so every
    level has the same completeness gap, and a layer's heads (neurons) plus its bias row equal
    that layer's component value (the bias row is the output bias's share: zero for bias-free
    projections such as Llama's and Qwen2's ``o_proj`` and MLPs).
    """
    if not model.is_scalar:
        raise ObjectiveError(
            f"this head has {model.n_rewards} outputs {list(model.label_names)} and no scalar "
            "reward; choose one with model.set_objective(index or weight vector)"
        )
    dt = readout_dtype(model)  # a half-precision model's head runs in float32 here
    head, unembed = head_in_dtype(model.reward_head, model.unembed, dt)
    slots = (0, 1) if head.reads_prompt_end else (0,)
    return _attribute(model, tokens, attention_mask, _head_fn(model, head, unembed), head, slots,
                      level=level, method=method, steps=steps, batch_size=batch_size,
                      progress=progress, desc=f"head attribution ({method})")


def gate_attribution(
    model: HookedRewardModel,
    tokens: Int[Tensor, "batch pos"] | Sequence[Text],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    objective: int | str,
    method: str = "integrated_gradients",
    level: str = "component",
    steps: int = 16,
    batch_size: int = 32,
    progress: bool = True,
) -> HeadAttributionResult:
    """Which parts of the model switched a gated head's ``objective`` on: the gate weight of that
    objective (``total``) attributed to the parts of the state at the end of the prompt, where
    the gate reads, as :func:`head_attribution` does for the reward (same ``method``, ``level``
    and baseline: every part removed; ``bias`` is the gate weight there). ``level="head_source"``
    splits each head's share by the source position it attends to from the end of the prompt:
    which prompt tokens the heads moved into the gate's input (direct paths; a token reached
    through an earlier layer's head shows at the position that head wrote to)."""
    from ..errors import HeadError

    head = model.reward_head
    if head.kind != "gated":
        raise HeadError(f"this model's reward head is {head.kind!r}, not gated: it has no gate")
    names = list(head.objective_names)
    if isinstance(objective, str):
        if objective not in names:
            raise ObjectiveError(f"objective {objective!r} is not one of {names}")
        k = names.index(objective)
    else:
        if isinstance(objective, bool) or not -len(names) <= int(objective) < len(names):
            raise ObjectiveError(f"objective {objective!r} is out of range for {names}")
        k = int(objective)
    dt = readout_dtype(model)
    gated, _ = head_in_dtype(head, model.unembed, dt)

    def f(prompt: Tensor) -> Tensor:
        return gated.gating(prompt)[..., k]

    return _attribute(model, tokens, attention_mask, f, gated.gating, (1,), level=level,
                      method=method, steps=steps, batch_size=batch_size, progress=progress,
                      desc=f"gate attribution ({method})")
