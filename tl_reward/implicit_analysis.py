"""Tools on the DPO implicit reward: lens, linearised direct attribution, patching, AtP.

The implicit reward ``r = sum_t w_t [lp_pi(y_t) - lp_ref(y_t)]`` (``w_t = beta``, or
``beta / n_response``) sums log-probabilities, and a log-probability is *not* linear in the final
residual: ``lp(y) = l_y - logsumexp(l)`` with ``l = W_U^T h + b_U`` (softcapped for Gemma-2).

**The stated linearisation** (:func:`implicit_reward_attribution`). Write the final norm's output
as ``h = a(n)`` with ``n = center(x) / scale`` (``ln_final.hook_normalized``) and ``a`` the norm's
affine map. At each response token, with ``g = d lp / d n`` at the actual forward (for an uncapped
head ``g = w_ln * (W_U[:, y] - W_U p)``, ``p`` the softmax),

    lp(y) = g . n + c,   c = lp(y) - g . n

exactly at that forward. ``n`` is the sum of every component's ``center(c_i) / scale`` under the
cached final-norm scale (as in all direct attribution), so ``g . center(c_i) / scale`` is component
``i``'s *first-order* contribution to the log-probability, and ``c`` (for an uncapped head:
``b_U[y] - p . b_U - H(p) + g_h . b_ln``, the entropy term of the log-sum-exp) is what the
linearisation does not assign to components. Attributions plus the remainders ``c`` add up to the
reward exactly; each attribution is the derivative of the reward along that component's
contribution to the final normalised state (tested against finite differences).

**Patching** (:func:`implicit_activation_patch`): run one model with an activation replaced by the
other model's on the same tokens; the metric is the implicit reward. ``policy_to_reference``
patches policy activations into the reference: a component that moves the reference's
log-probabilities onto the policy's carries part of the change DPO made.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from ._readout import choose, long_frame
from .errors import InvalidInputError
from .implicit import ImplicitRewardModel, ResponseBatch, log_probs_from_logits, token_log_probs

SIGNS = {"policy": 1.0, "reference": -1.0}
LEVELS = ("component", "head", "neuron")


def _targets(batch: ResponseBatch) -> tuple[Tensor, Tensor]:
    """(row, position) of every response token, in row-major order."""
    rows, pos = torch.nonzero(batch.response_mask.bool(), as_tuple=True)
    return rows, pos


def _softcapped(model: HookedTransformer, logits: Tensor) -> Tensor:
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    if cap is not None and cap > 0:
        return cap * torch.tanh(logits / cap)
    return logits


def _affine(model: HookedTransformer, n: Tensor) -> Tensor:
    """The final norm's weight and bias applied to its normalised input."""
    ln = model.ln_final
    w, b = getattr(ln, "w", None), getattr(ln, "b", None)
    out = n * w.to(n.dtype) if w is not None else n
    return out + b.to(n.dtype) if b is not None else out


def _log_probs_from_normalized(
    model: HookedTransformer, n: Float[Tensor, "batch d_model"], targets: Tensor
) -> Float[Tensor, "batch"]:
    """``log p(target)`` from the final norm's normalised input ``n`` (rows are tokens)."""
    dt = n.dtype
    logits = _affine(model, n) @ model.unembed.W_U.to(dt) + model.unembed.b_U.to(dt)
    return torch.log_softmax(_softcapped(model, logits), -1).gather(-1, targets[:, None])[:, 0]


# ---------------------------------------------------------------------------------------- lens
@dataclass(frozen=True)
class ImplicitLensResult:
    """The implicit reward read at each layer (logit lens of the log-ratio).

    ``per_token[layer, batch, pos]``: each response token's summand with both models read at the
    same layer (final norm recomputed on that layer's residual, then unembed, softcap and
    log-softmax); 0 off the response. ``log_probs[name][layer, batch]``: each model's weighted
    log-probability sum. The last layer is the model's output: ``rewards[-1]`` is the reward.
    """

    per_token: Float[Tensor, "layer batch pos"]
    log_probs: dict[str, Float[Tensor, "layer batch"]]
    labels: tuple[str, ...]

    @property
    def rewards(self) -> Float[Tensor, "layer batch"]:
        return self.per_token.sum(-1)

    def to_dataframe(self):
        return long_frame(self.rewards, ("layer", "sequence"), {"layer": self.labels},
                          value="reward",
                          extra={f"log_prob_{k}": v for k, v in self.log_probs.items()})


@torch.no_grad()
def implicit_reward_lens(model: ImplicitRewardModel, batch: ResponseBatch) -> ImplicitLensResult:
    """Logit lens of the implicit reward: both models read out after the embeddings and after each
    layer (``resid_post``), the final norm recomputed on each layer's residual (the logit-lens
    convention: a log-probability needs a normalised residual, so no cached scale)."""
    batch = model.checked(batch)
    rows, pos = _targets(batch)
    weights = model.token_weights(batch)[rows, pos]
    targets = batch.tokens[rows, pos]
    per_token, log_probs, labels = None, {}, None
    for name, m in model.models.items():
        _, cache = m.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                    padding_side="right",
                                    names_filter=lambda n: "hook_resid" in n or n.endswith("embed"))
        stack, labels = cache.accumulated_resid(layer=None, return_labels=True)  # [L+1, b, p, d]
        stack = stack[:, rows, pos - 1]  # the positions that predict the response tokens
        dt = torch.promote_types(stack.dtype, torch.float32)
        ln = m.ln_final
        lps = []
        for layer_resid in stack.to(dt):
            x = layer_resid
            if m.cfg.normalization_type in ("LN", "LNPre"):
                x = x - x.mean(-1, keepdim=True)
            n = x / (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
            lps.append(_log_probs_from_normalized(m, n, targets))
        lp = torch.stack(lps) * weights.to(dt)  # [layer, token]
        dense = torch.zeros(lp.shape[0], *batch.tokens.shape, dtype=dt, device=lp.device)
        dense[:, rows, pos] = lp
        log_probs[name] = dense.sum(-1)
        term = SIGNS[name] * dense
        per_token = term if per_token is None else per_token + term
    return ImplicitLensResult(per_token=per_token, log_probs=log_probs, labels=tuple(labels))


# --------------------------------------------------------------------------------- attribution
@dataclass(frozen=True)
class ImplicitAttributionResult:
    """Linearised direct attribution of the implicit reward (see the module docstring).

    ``per_position[component, batch, pos]``: component's first-order contribution to the summand
    at each response token; ``remainder[batch, pos]``: the linearisation's constant ``c`` (both
    models, weighted). ``values.sum(0) + remainder.sum(-1) == total`` within float error.
    Labels are ``"<model>/<part>"`` with TransformerLens's part names (``embed``, ``3_attn_out``,
    ``L3H1``, ``3_attn_bias``: ``b_O``).
    """

    per_position: Float[Tensor, "component batch pos"]
    remainder: Float[Tensor, "batch pos"]
    total: Float[Tensor, "batch"]
    labels: tuple[str, ...]
    level: str

    @property
    def values(self) -> Float[Tensor, "component batch"]:
        return self.per_position.sum(-1)

    def to_dataframe(self):
        return long_frame(self.values, ("component", "sequence"), {"component": self.labels})

    def top(self, k: int = 10):
        """The ``k`` components with the largest mean |contribution|."""
        import pandas as pd

        v = self.values.detach().cpu()
        order = v.abs().mean(1).argsort(descending=True)[:k]
        return pd.DataFrame({"component": [self.labels[i] for i in order.tolist()],
                             "mean": v[order].mean(1).numpy()})


def _parts(m: HookedTransformer, cache, rows: Tensor, pos: Tensor, level: str, dt: torch.dtype):
    """Every additive part of the final residual at (rows, pos): ``[part, token, d_model]``."""
    parts, labels = [], []

    def at(name: str) -> Tensor:
        return cache[name][rows, pos].to(dt)

    if "hook_embed" in cache.cache_dict:
        parts.append(at("hook_embed"))
        labels.append("embed")
    if "hook_pos_embed" in cache.cache_dict:
        parts.append(at("hook_pos_embed"))
        labels.append("pos_embed")
    for layer in range(m.cfg.n_layers):
        attn_out = at(get_act_name("attn_out", layer))
        if level == "head":
            attn = m.blocks[layer].attn
            z = at(get_act_name("z", layer))  # [token, head, d_head]
            heads = torch.einsum("thd,hdm->htm", z, attn.W_O.to(dt))
            post = getattr(m.blocks[layer], "ln1_post", None)
            if post is not None and m.cfg.use_normalization_before_and_after:
                scale = at(f"blocks.{layer}.ln1_post.hook_scale")  # [token, 1]
                heads = heads * post.w.to(dt) / scale
            parts.extend(heads)
            labels.extend(f"L{layer}H{h}" for h in range(m.cfg.n_heads))
            parts.append(attn_out - heads.sum(0))
            labels.append(f"{layer}_attn_bias")
        else:
            parts.append(attn_out)
            labels.append(f"{layer}_attn_out")
        if level != "neuron":
            parts.append(at(get_act_name("mlp_out", layer)))
            labels.append(f"{layer}_mlp_out")
    return torch.stack(parts), labels


def _neuron_contributions(m: HookedTransformer, cache, rows: Tensor, pos: Tensor, layer: int,
                          g: Tensor, dt: torch.dtype) -> tuple[Tensor, list[str]]:
    """First-order contribution ``[d_mlp + 1, token]`` of each MLP neuron of ``layer`` (and of
    the rest of its output, ``b_out``) to the log-probability, given ``g = d lp / d resid`` at the
    final residual (centred and divided by the final norm's scale). A neuron writes
    ``post_i * W_out[i]``, through a norm after the MLP (Gemma-2's ``ln2_post``, OLMo-2's
    ``ln2``) under its cached scale, so its contribution is ``post_i * (W_out[i] . g')`` without
    materialising ``[d_mlp, token, d_model]``."""
    block = m.blocks[layer]
    post = cache[get_act_name("post", layer)][rows, pos].to(dt)  # [token, d_mlp]
    gl = g
    after = []
    if m.cfg.use_normalization_before_and_after and getattr(block, "ln2_post", None) is not None:
        after.append(("ln2_post", block.ln2_post))
    if m.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        after.append(("ln2", block.ln2))
    for name, norm in after:
        if getattr(norm, "b", None) is not None or m.cfg.normalization_type in ("LN", "LNPre"):
            raise InvalidInputError(
                f"neuron-level attribution through a centring norm after the MLP ({name}) is "
                "not supported; use level='component'"
            )
        w = getattr(norm, "w", None)
        gl = gl * (w.to(dt) if w is not None else 1.0) / cache[
            f"blocks.{layer}.{name}.hook_scale"][rows, pos].to(dt)
    neurons = (post * (gl @ block.mlp.W_out.detach().to(dt).T)).T  # [d_mlp, token]
    whole = (cache[get_act_name("mlp_out", layer)][rows, pos].to(dt) * g).sum(-1)
    labels = [f"L{layer}N{i}" for i in range(neurons.shape[0])] + [f"{layer}_mlp_bias"]
    return torch.cat([neurons, (whole - neurons.sum(0))[None]]), labels


def implicit_reward_attribution(
    model: ImplicitRewardModel, batch: ResponseBatch, *, level: str = "component"
) -> ImplicitAttributionResult:
    """Linearised direct attribution of the implicit reward to each model's components.

    ``level``: ``"component"`` (embeddings, each layer's attention and MLP output), ``"head"``
    (attention outputs split into heads and the output bias ``b_O``; after ``fold_ln=True`` the
    value biases are folded into ``b_O``, so they move from the heads to that row) or
    ``"neuron"`` (each layer's attention output, and its MLP output split into neurons
    ``L3N7``, ``post_i * W_out[i]``, and the rest ``3_mlp_bias``, i.e. ``b_out``; the rows of a
    layer add up to its ``3_mlp_out`` at the component level). Reference
    components enter
    with a minus sign. See the module docstring for what is decomposed: each part's first-order
    contribution through the log-softmax, linearised at the actual final state, plus a remainder
    per token.
    """
    choose("level", level, LEVELS)
    batch = model.checked(batch)
    rows, pos = _targets(batch)
    src = pos - 1  # the position whose logits predict each response token
    weights = model.token_weights(batch)[rows, pos]
    targets = batch.tokens[rows, pos]
    per_position, remainder, labels = [], None, []
    shape = tuple(batch.tokens.shape)
    wanted = ("hook_embed", "hook_pos_embed", "hook_attn_out", "hook_mlp_out",
              "ln_final.hook_normalized", "ln_final.hook_scale", "ln1_post.hook_scale")
    if level == "head":
        wanted = (*wanted, "attn.hook_z")
    if level == "neuron":
        wanted = (*wanted, "mlp.hook_post", "ln2_post.hook_scale", "ln2.hook_scale")
    for name, m in model.models.items():
        with torch.no_grad():
            _, cache = m.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                        padding_side="right",
                                        names_filter=lambda n: n.endswith(wanted))
        dt = torch.promote_types(m.cfg.dtype, torch.float32)
        n = cache["ln_final.hook_normalized"][rows, src].to(dt).requires_grad_(True)
        with torch.enable_grad():
            lp = _log_probs_from_normalized(m, n, targets)
            (grad,) = torch.autograd.grad(lp.sum(), n)
        lp, n = lp.detach(), n.detach()
        parts, part_labels = _parts(m, cache, rows, src, level, dt)
        if m.cfg.normalization_type in ("LN", "LNPre"):
            parts = parts - parts.mean(-1, keepdim=True)
        scale = cache["ln_final.hook_scale"][rows, src].to(dt)  # [token, 1]
        w = (SIGNS[name] * weights).to(dt)
        contrib = torch.einsum("ctd,td->ct", parts / scale, grad) * w  # [part, token]
        if level == "neuron":
            g = grad - grad.mean(-1, keepdim=True) if m.cfg.normalization_type in (
                "LN", "LNPre") else grad
            for layer in range(m.cfg.n_layers):
                c, lab = _neuron_contributions(m, cache, rows, src, layer, g / scale, dt)
                contrib = torch.cat([contrib, c * w])
                part_labels = [*part_labels, *lab]
        const = (lp - (grad * n).sum(-1)) * w
        dense = torch.zeros(len(part_labels), *shape, dtype=dt, device=contrib.device)
        dense[:, rows, pos] = contrib
        per_position.append(dense)
        rem = torch.zeros(shape, dtype=dt, device=contrib.device)
        rem[rows, pos] = const
        remainder = rem if remainder is None else remainder + rem
        labels.extend(f"{name}/{lab}" for lab in part_labels)
    total = model(batch).to(remainder.dtype)
    return ImplicitAttributionResult(
        per_position=torch.cat(per_position), remainder=remainder, total=total,
        labels=tuple(labels), level=level,
    )


# ------------------------------------------------------------------------------------ patching
PATCH_HOOKS = ("resid_pre", "attn_out", "mlp_out", "z")
DIRECTIONS = ("policy_to_reference", "reference_to_policy")


@dataclass(frozen=True)
class ImplicitPatchResult:
    """Effects on the implicit reward of patching one model's activations into the other.

    ``effects[cell, batch]`` = patched reward - unpatched reward; ``cells`` label the layers
    (``"3_attn_out"``) or heads (``"L3H1"``); every position is patched at once. ``fraction``:
    ``-effects / reward`` for ``policy_to_reference`` (the share of the reward a patch removes by
    making the reference compute what the policy computes), ``effects / reward`` otherwise.
    """

    effects: Float[Tensor, "cell batch"]
    reward: Float[Tensor, "batch"]
    cells: tuple[str, ...]
    hook: str
    direction: str

    @property
    def fraction(self) -> Float[Tensor, "cell batch"]:
        sign = -1.0 if self.direction == "policy_to_reference" else 1.0
        return sign * self.effects / self.reward

    def to_dataframe(self):
        return long_frame(self.effects, ("cell", "sequence"), {"cell": self.cells},
                          value="effect")


def _hook_name(hook: str, layer: int) -> str:
    return get_act_name(hook, layer)


def _check_same_shape(model: ImplicitRewardModel) -> None:
    if model.reference is None:
        raise InvalidInputError(
            "patching between policy and reference needs a reference model; this implicit reward "
            "has none (reference=None)"
        )
    keys = ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "n_key_value_heads")
    diff = [k for k in keys if getattr(model.policy.cfg, k) != getattr(model.reference.cfg, k)]
    if diff:
        raise InvalidInputError(f"policy and reference differ in {diff}: activations cannot be swapped")


def implicit_activation_patch(
    model: ImplicitRewardModel,
    batch: ResponseBatch,
    *,
    hook: str = "attn_out",
    direction: str = "policy_to_reference",
    layers: Sequence[int] | None = None,
) -> ImplicitPatchResult:
    """Exact activation patching between policy and reference with the implicit reward as metric.

    Each cell replaces one activation (a layer's ``hook``, or one head's ``z``) of the target
    model, at every position, by the source model's on the same tokens, and recomputes the
    reward with the other model unchanged. One forward of the target per cell.
    """
    choose("hook", hook, PATCH_HOOKS)
    choose("direction", direction, DIRECTIONS)
    _check_same_shape(model)
    batch = model.checked(batch)
    source_name, target_name = direction.split("_to_")
    source, target = model.models[source_name], model.models[target_name]
    layers = list(range(target.cfg.n_layers)) if layers is None else list(layers)
    bad = [la for la in layers if not 0 <= la < target.cfg.n_layers]
    if bad:
        raise InvalidInputError(f"layers {bad} out of range 0..{target.cfg.n_layers - 1}")
    names = {_hook_name(hook, la) for la in layers}
    weights = model.token_weights(batch)
    tokens, mask = batch.tokens, batch.attention_mask
    with torch.no_grad():
        _, src_cache = source.run_with_cache(tokens, attention_mask=mask, padding_side="right",
                                             names_filter=lambda n: n in names)
        lp_other = token_log_probs(source, tokens, mask)
        lp_target = token_log_probs(target, tokens, mask)

        def reward(lp_t: Tensor) -> Tensor:
            lp = {source_name: lp_other, target_name: lp_t}
            return ((lp["policy"] - lp["reference"]) * weights.to(lp_t)).sum(-1)

        base = reward(lp_target)
        effects, cells = [], []
        for la in layers:
            name = _hook_name(hook, la)
            units = range(target.cfg.n_heads) if hook == "z" else [None]
            for unit in units:
                def patch(act, hook, unit=unit, name=name):
                    new = act.clone()
                    if unit is None:
                        new[:] = src_cache[name]
                    else:
                        new[:, :, unit] = src_cache[name][:, :, unit]
                    return new

                logits = target.run_with_hooks(tokens, attention_mask=mask, padding_side="right",
                                               fwd_hooks=[(name, patch)])
                effects.append(reward(log_probs_from_logits(logits, tokens)) - base)
                cells.append(f"L{la}H{unit}" if unit is not None else f"{la}_{hook}")
    return ImplicitPatchResult(effects=torch.stack(effects), reward=base, cells=tuple(cells),
                               hook=hook, direction=direction)


POSITION_HOOKS = ("resid_pre", "attn_out", "mlp_out", "resid_mid", "resid_post")


@dataclass(frozen=True)
class ImplicitPositionPatchResult:
    """Single-position patching between policy and reference with the implicit reward as metric.

    ``effects[layer, pos, batch]``: patched reward - unpatched reward when ``hook`` of layer
    ``layers[l]`` is replaced at position ``pos`` only (in the padded batch's positions; 0 at
    padding) by the source model's; ``reward[batch]``: the unpatched reward.
    """

    effects: Float[Tensor, "layer pos batch"]
    reward: Float[Tensor, "batch"]
    layers: tuple[int, ...]
    hook: str
    direction: str

    def to_dataframe(self):
        return long_frame(self.effects, ("layer", "position", "sequence"),
                          {"layer": list(self.layers)}, value="effect")


def implicit_position_patch(
    model: ImplicitRewardModel,
    batch: ResponseBatch,
    *,
    hook: str = "resid_pre",
    direction: str = "policy_to_reference",
    layers: Sequence[int] | None = None,
    max_rows: int = 64,
) -> ImplicitPositionPatchResult:
    """Exact single-position patching (a layer x position grid, as
    ``transformer_lens.patching.get_act_patch_resid_pre``) between policy and reference: each
    cell writes the source model's ``hook`` activation at one layer and one position into the
    target model, on every sequence at once, and recomputes the implicit reward with the other
    model unchanged. Batched: the cells of a layer run as rows of a few forwards (at most
    ``max_rows`` rows each) that start at the patched layer from the target's cached residual.
    """
    choose("hook", hook, POSITION_HOOKS)
    choose("direction", direction, DIRECTIONS)
    _check_same_shape(model)
    if max_rows < 1:
        raise InvalidInputError(f"max_rows must be >= 1, got {max_rows}")
    batch = model.checked(batch)
    source_name, target_name = direction.split("_to_")
    source, target = model.models[source_name], model.models[target_name]
    n_layers = target.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [la for la in layers if not 0 <= la < n_layers]
    if bad:
        raise InvalidInputError(f"layers {bad} out of range 0..{n_layers - 1}")
    tokens, mask = batch.tokens, batch.attention_mask
    n_batch, n_pos = tokens.shape
    weights = model.token_weights(batch)
    names = {_hook_name(hook, la) for la in layers}
    starts = {get_act_name("resid_pre", la) for la in layers}
    with torch.no_grad():
        _, src_cache = source.run_with_cache(tokens, attention_mask=mask, padding_side="right",
                                             names_filter=lambda n: n in names)
        _, tgt_cache = target.run_with_cache(tokens, attention_mask=mask, padding_side="right",
                                             names_filter=lambda n: n in starts)
        lp_source = token_log_probs(source, tokens, mask)
        lp_target = token_log_probs(target, tokens, mask)

        def reward(lp_t: Tensor, lp_s: Tensor, w: Tensor) -> Tensor:
            lp = {source_name: lp_s, target_name: lp_t}
            return ((lp["policy"] - lp["reference"]) * w.to(lp_t)).sum(-1)

        base = reward(lp_target, lp_source, weights)
        # every (position, sequence) cell as one row; rows of a chunk run in one forward
        cell_pos = torch.arange(n_pos, device=tokens.device).repeat_interleave(n_batch)
        cell_row = torch.arange(n_batch, device=tokens.device).repeat(n_pos)
        per_chunk = max(1, max_rows)
        effects = torch.zeros(len(layers), n_pos * n_batch, dtype=base.dtype, device=base.device)
        for li, la in enumerate(layers):
            name = _hook_name(hook, la)
            src_act = src_cache[name]
            start = tgt_cache[get_act_name("resid_pre", la)]
            for s in range(0, n_pos * n_batch, per_chunk):
                rows, pos = cell_row[s:s + per_chunk], cell_pos[s:s + per_chunk]
                k = torch.arange(len(rows), device=tokens.device)

                def patch(act, hook, rows=rows, pos=pos, k=k, src_act=src_act):
                    act = act.clone()
                    act[k, pos] = src_act[rows, pos].to(act.dtype)
                    return act

                with target.hooks(fwd_hooks=[(name, patch)]):
                    logits = target(start[rows], attention_mask=mask[rows], padding_side="right",
                                    start_at_layer=la)
                lp_t = log_probs_from_logits(logits, tokens[rows])
                effects[li, s:s + per_chunk] = (reward(lp_t, lp_source[rows], weights[rows])
                                                - base[rows])
    effects = effects.reshape(len(layers), n_pos, n_batch)
    return ImplicitPositionPatchResult(effects=effects, reward=base, layers=tuple(layers),
                                       hook=hook, direction=direction)


def implicit_attribution_patch(
    model: ImplicitRewardModel,
    batch: ResponseBatch,
    *,
    hook: str = "attn_out",
    direction: str = "policy_to_reference",
    layers: Sequence[int] | None = None,
) -> ImplicitPatchResult:
    """Attribution patching (AtP): the first-order estimate of :func:`implicit_activation_patch`,
    ``(a_source - a_target) . d reward / d a_target`` summed over positions, for every cell from
    one forward and one backward of the target model."""
    choose("hook", hook, PATCH_HOOKS)
    choose("direction", direction, DIRECTIONS)
    _check_same_shape(model)
    batch = model.checked(batch)
    source_name, target_name = direction.split("_to_")
    source, target = model.models[source_name], model.models[target_name]
    layers = list(range(target.cfg.n_layers)) if layers is None else list(layers)
    names = [_hook_name(hook, la) for la in layers]
    tokens, mask = batch.tokens, batch.attention_mask
    weights = model.token_weights(batch)
    with torch.no_grad():
        _, src_cache = source.run_with_cache(tokens, attention_mask=mask, padding_side="right",
                                             names_filter=lambda n: n in names)
        lp_source = token_log_probs(source, tokens, mask)
    acts: dict[str, Tensor] = {}

    def keep(act, hook):
        act.retain_grad()
        acts[hook.name] = act
        return act

    with torch.enable_grad():
        logits = target.run_with_hooks(tokens, attention_mask=mask, padding_side="right",
                                       fwd_hooks=[(n, keep) for n in names])
        lp = {source_name: lp_source, target_name: log_probs_from_logits(logits, tokens)}
        per_row = ((lp["policy"] - lp["reference"]) * weights.to(logits.dtype)).sum(-1)
        grads = torch.autograd.grad(per_row.sum(), [acts[n] for n in names])
    effects, cells = [], []
    valid = mask.to(per_row.dtype)
    for la, n, g in zip(layers, names, grads, strict=True):
        delta = (src_cache[n] - acts[n].detach()) * g
        if hook == "z":
            est = (delta.sum(-1) * valid[:, :, None]).sum(1)  # [batch, head]
            effects.extend(est.T)
            cells.extend(f"L{la}H{h}" for h in range(target.cfg.n_heads))
        else:
            effects.append((delta.sum(-1) * valid).sum(1))
            cells.append(f"{la}_{hook}")
    return ImplicitPatchResult(effects=torch.stack(effects).detach(), reward=per_row.detach(),
                               cells=tuple(cells), hook=hook, direction=direction)
