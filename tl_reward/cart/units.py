"""Circuit units and circuits: what they are, how to read them, how to intervene on them.

A :class:`Unit` is one MLP neuron (``blocks.L.mlp.hook_post[..., i]``), one attention head
(``blocks.L.attn.hook_z[..., h, :]``) or one SAE feature (``sae.encode(act)[..., i]`` at the SAE's
hook point). Its scalar activation at a position is the neuron's value, the feature's value, or
the Euclidean norm of the head's ``z`` vector; its *raw* activation (what interventions write) is
the neuron's or feature's value, or the head's whole ``z`` vector (``d_head`` numbers).

A :class:`Circuit` is a set of units plus two recorded choices: ``position`` (``"pooled"``: read
at the scoring token; ``"mean"``: averaged over the real tokens) and ``aggregate`` (``a_c`` is the
``mean``, ``sum`` or ``norm`` of its units' scalar activations). Interventions (ablation, the
perturbations of eq. (7)) act at the positions the circuit reads: the scoring token, or every
real token.

SAE features need an object with ``encode(x)`` (``[..., d_in] -> [..., d_sae]``) and ``W_dec``
(``[d_sae, d_in]``), e.g. a sae-lens ``SAE``, passed as ``saes={hook_name: sae}``. Writing a
feature changes the hook activation along its decoder row (``x + (new - f_i) W_dec[i]``), so the
SAE's reconstruction error is left in place.

Reading is differentiable (no ``no_grad``, no detached cache): CART training can regularise
circuit activations with it.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from .._readout import choose
from ..errors import HookNameError, InvalidInputError
from ..model import HookedRewardModel
from .metrics import AGGREGATES, circuit_activation

KINDS = ("neuron", "head", "feature")
POSITIONS = ("pooled", "mean")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class Unit:
    """One circuit unit: ``kind`` at ``hook``, number ``index`` (neuron, head or feature)."""

    kind: str
    layer: int
    index: int
    hook: str

    def __post_init__(self) -> None:
        choose("kind", self.kind, KINDS)

    @property
    def label(self) -> str:
        """``L1N11`` (neuron), ``L0H0`` (head), ``F7@blocks.0.hook_resid_post`` (SAE feature)."""
        if self.kind == "neuron":
            return f"L{self.layer}N{self.index}"
        if self.kind == "head":
            return f"L{self.layer}H{self.index}"
        return f"F{self.index}@{self.hook}"


def neuron(layer: int, index: int) -> Unit:
    """MLP neuron ``index`` of layer ``layer`` (``blocks.L.mlp.hook_post``)."""
    return Unit("neuron", layer, index, get_act_name("post", layer))


def head(layer: int, index: int) -> Unit:
    """Attention head ``index`` of layer ``layer`` (``blocks.L.attn.hook_z``)."""
    return Unit("head", layer, index, get_act_name("z", layer))


def feature(hook: str, index: int) -> Unit:
    """Feature ``index`` of the SAE attached at ``hook``."""
    m = _LAYER.match(hook)
    return Unit("feature", int(m.group(1)) if m else -1, index, hook)


def parse_unit(label: str) -> Unit:
    """A unit from its label: ``"L1N11"``, ``"L0H0"`` or ``"F7@blocks.0.hook_resid_post"``."""
    m = re.fullmatch(r"L(\d+)([NH])(\d+)", label)
    if m:
        layer, kind, index = int(m.group(1)), m.group(2), int(m.group(3))
        return neuron(layer, index) if kind == "N" else head(layer, index)
    m = re.fullmatch(r"F(\d+)@(.+)", label)
    if m:
        return feature(m.group(2), int(m.group(1)))
    raise InvalidInputError(
        f"cannot read unit label {label!r}; use 'L<layer>N<neuron>', 'L<layer>H<head>' or "
        "'F<feature>@<hook name>'"
    )


@dataclass(frozen=True)
class Circuit:
    """A set of units with its activation ``a_c(x)``: the ``aggregate`` of the units' activations
    read at ``position`` (both recorded). ``name`` defaults to the unit labels joined by ``+``."""

    units: Sequence[Unit | str]
    aggregate: str = "mean"
    position: str = "pooled"
    name: str = field(default="")

    def __post_init__(self) -> None:
        units = tuple(parse_unit(u) if isinstance(u, str) else u for u in self.units)
        object.__setattr__(self, "units", units)  # always a tuple of Units
        if not units:
            raise InvalidInputError("a circuit needs at least one unit")
        if len(set(units)) != len(units):
            dup = sorted({u.label for u in units if units.count(u) > 1})
            raise InvalidInputError(f"circuit lists units {dup} more than once")
        choose("aggregate", self.aggregate, AGGREGATES)
        choose("position", self.position, POSITIONS)
        if not self.name:
            object.__setattr__(self, "name", "+".join(u.label for u in units))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(u.label for u in self.units)

    @property
    def first_layer(self) -> int:
        """Earliest layer a unit sits in (0 for units outside the blocks)."""
        return min(max(u.layer, 0) for u in self.units)


def all_units(
    model: HookedRewardModel,
    kinds: Sequence[str] = ("neuron", "head"),
    *,
    layers: Sequence[int] | None = None,
    saes: Mapping[str, Any] | None = None,
) -> tuple[Unit, ...]:
    """Every unit of the given kinds: all MLP neurons, all attention heads (of ``layers``), and
    every feature of each SAE in ``saes`` (with ``"feature"`` in ``kinds``)."""
    cfg = model.cfg
    for k in kinds:
        choose("kind", k, KINDS)
    layers = list(range(cfg.n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < cfg.n_layers]
    if bad:
        raise InvalidInputError(f"layers {bad} are not in 0..{cfg.n_layers - 1}")
    units: list[Unit] = []
    for l in layers:
        if "neuron" in kinds:
            if cfg.d_mlp is None or cfg.attn_only:
                raise InvalidInputError("this model has no MLP neurons; drop 'neuron' from kinds")
            units += [neuron(l, i) for i in range(cfg.d_mlp)]
        if "head" in kinds:
            units += [head(l, h) for h in range(cfg.n_heads)]
    if "feature" in kinds:
        if not saes:
            raise InvalidInputError("kind 'feature' needs saes={hook_name: sae}")
        for hook, sae in saes.items():
            units += [feature(hook, i) for i in range(_d_sae(sae))]
    return tuple(units)


def _d_sae(sae: Any) -> int:
    w = getattr(sae, "W_dec", None)
    if w is None or not hasattr(sae, "encode"):
        raise InvalidInputError(
            f"an SAE must have encode(x) and W_dec [d_sae, d_in]; got {type(sae).__name__}"
        )
    return int(w.shape[0])


def check_units(
    model: HookedRewardModel, units: Sequence[Unit], saes: Mapping[str, Any] | None
) -> None:
    """Raise a clear error for a hook the model lacks, an index out of range or a missing SAE."""
    cfg = model.cfg
    for u in units:
        if u.hook not in model.hook_dict:
            import difflib

            close = difflib.get_close_matches(u.hook, list(model.hook_dict), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise HookNameError(f"unit {u.label}: the model has no hook {u.hook!r}.{hint}")
        if u.kind == "neuron":
            size = cfg.d_mlp
        elif u.kind == "head":
            size = cfg.n_heads
        else:
            if not saes or u.hook not in saes:
                raise InvalidInputError(
                    f"unit {u.label} is an SAE feature but no SAE is attached at {u.hook!r}; pass "
                    f"saes={{{u.hook!r}: sae}}"
                )
            size = _d_sae(saes[u.hook])
        if not 0 <= u.index < size:
            raise InvalidInputError(f"unit {u.label}: index {u.index} is not in 0..{size - 1}")


def raw_width(model: HookedRewardModel, unit: Unit) -> int:
    """Number of raw activation values of a unit: ``d_head`` for a head, 1 otherwise."""
    return model.cfg.d_head if unit.kind == "head" else 1


def circuit_width(model: HookedRewardModel, circuit: Circuit) -> int:
    """``d_circuit``: the length of the circuit's concatenated raw activations."""
    return sum(raw_width(model, u) for u in circuit.units)


# ----------------------------------------------------------------------------- reading
def _stop_layer(model: HookedRewardModel, hooks: Sequence[str]) -> int | None:
    layers = []
    for h in hooks:
        m = _LAYER.match(h)
        if m is None:
            return None
        layers.append(int(m.group(1)))
    stop = max(layers) + 1
    return None if stop >= model.cfg.n_layers else stop


def _positions(
    batch: int, n_pos: int, position: str, pool_index: Tensor, mask: Tensor | None, device
) -> Tensor:
    """``[batch, pos]`` weights of each position in the circuit's read-out (they sum to 1)."""
    if position == "pooled":
        w = torch.zeros(batch, n_pos, device=device)
        w[torch.arange(batch, device=device), pool_index] = 1.0
        return w
    real = (mask.bool() if mask is not None
            else torch.ones(batch, n_pos, dtype=torch.bool, device=device)).float()
    return real / real.sum(-1, keepdim=True)


def _unit_values(act: Tensor, units: Sequence[Unit], saes) -> tuple[Tensor, Tensor]:
    """Scalar ``[batch, pos, k]`` and raw ``[batch, pos, widths]`` values of units at one hook."""
    idx = torch.tensor([u.index for u in units], device=act.device)
    kind = units[0].kind
    if kind == "neuron":
        vals = act[..., idx]
        return vals, vals
    if kind == "head":
        z = act[..., idx, :]  # [batch, pos, k, d_head]
        return z.norm(dim=-1), z.flatten(-2)
    f = saes[units[0].hook].encode(act)[..., idx]
    return f, f


def _by_hook(units: Sequence[Unit]) -> dict[tuple[str, str], list[int]]:
    """Unit positions in ``units`` grouped by (hook, kind), in first-appearance order."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault((u.hook, u.kind), []).append(i)
    return groups


def read_units(
    model: HookedRewardModel,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    units: Sequence[Unit],
    *,
    position: str = "pooled",
    saes: Mapping[str, Any] | None = None,
    raw: bool = False,
) -> tuple[Float[Tensor, "batch unit"], Tensor | None]:
    """Scalar activations ``[batch, unit]`` of ``units`` (and their raw activations, position-
    weighted and concatenated in unit order, with ``raw=True``), from one forward that stops after
    the last layer needed. Differentiable."""
    choose("position", position, POSITIONS)
    if not units:
        raise InvalidInputError("no units to read")
    check_units(model, units, saes)
    pool_index = model.pooled_index(tokens, attention_mask)
    groups = _by_hook(units)
    store: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    weights: list[Tensor] = []

    def make_hook(key, members):
        def hook(act, hook):
            if not weights:
                weights.append(_positions(act.shape[0], act.shape[1], position, pool_index,
                                          attention_mask, act.device))
            w = weights[0]
            if position == "pooled":  # gather first: SAE encoders then see one position
                rows = torch.arange(act.shape[0], device=act.device)
                sel = act[rows, pool_index][:, None]
                scal, rawv = _unit_values(sel, [units[i] for i in members], saes)
                store[key] = (scal[:, 0], rawv[:, 0])
            else:
                scal, rawv = _unit_values(act, [units[i] for i in members], saes)
                store[key] = (torch.einsum("bp,bpk->bk", w.to(scal.dtype), scal),
                              torch.einsum("bp,bpk->bk", w.to(rawv.dtype), rawv))
            return None
        return hook

    fwd_hooks = [(hook_name, make_hook((hook_name, kind), members))
                 for (hook_name, kind), members in groups.items()]
    model.run_with_hooks(tokens, attention_mask=attention_mask, return_type=None,
                         stop_at_layer=_stop_layer(model, [h for h, _ in groups]),
                         fwd_hooks=fwd_hooks)
    batch = tokens.shape[0]
    dtype = next(iter(store.values()))[0].dtype
    scalars = torch.empty(batch, len(units), dtype=dtype, device=tokens.device)
    order = torch.cat([torch.tensor(m) for m in groups.values()])
    scalars = scalars.index_copy(1, order.to(tokens.device),
                                 torch.cat([store[k][0] for k in groups], 1))
    if not raw:
        return scalars, None
    widths = [raw_width(model, u) for u in units]
    pieces: list[Tensor | None] = [None] * len(units)
    for key, members in groups.items():
        r = store[key][1]
        off = 0
        for i in members:
            pieces[i] = r[:, off : off + widths[i]]
            off += widths[i]
    return scalars, torch.cat(pieces, 1)  # type: ignore[arg-type]


def unit_activations(
    model: HookedRewardModel,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    units: Sequence[Unit],
    *,
    position: str = "pooled",
    saes: Mapping[str, Any] | None = None,
) -> Float[Tensor, "batch unit"]:
    """Scalar activation of each unit on each input (see the module docstring). Differentiable."""
    return read_units(model, tokens, attention_mask, units, position=position, saes=saes)[0]


def circuit_activations(
    model: HookedRewardModel,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    circuits: Sequence[Circuit],
    *,
    saes: Mapping[str, Any] | None = None,
) -> Float[Tensor, "batch circuit"]:
    """``a_c(x)`` of every circuit on every input, one forward per read-out position.
    Differentiable, so a training loss can use it."""
    if not circuits:
        raise InvalidInputError("no circuits given")
    out: list[Tensor | None] = [None] * len(circuits)
    for position in POSITIONS:
        members = [i for i, c in enumerate(circuits) if c.position == position]
        if not members:
            continue
        units = list(dict.fromkeys(u for i in members for u in circuits[i].units))
        where = {u: k for k, u in enumerate(units)}
        acts = unit_activations(model, tokens, attention_mask, units, position=position, saes=saes)
        for i in members:
            c = circuits[i]
            cols = torch.tensor([where[u] for u in c.units], device=acts.device)
            out[i] = circuit_activation(acts[:, cols], c.aggregate)
    return torch.stack(out, 1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- interventions
def intervention_hooks(
    model: HookedRewardModel,
    circuit: Circuit,
    pool_index: Int[Tensor, "batch"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    *,
    shift: Float[Tensor, "batch d_circuit"] | None = None,
    values: Float[Tensor, "d_circuit"] | None = None,
    saes: Mapping[str, Any] | None = None,
) -> list[tuple[str, Callable]]:
    """TransformerLens forward hooks that change the circuit's raw activations at the positions it
    reads: add ``shift`` (the ``delta`` of eq. (7), per input) or set them to ``values`` (an
    ablation: zeros, or a reference mean). Exactly one of the two must be given."""
    if (shift is None) == (values is None):
        raise InvalidInputError("give exactly one of shift= (perturb) or values= (ablate)")
    widths = [raw_width(model, u) for u in circuit.units]
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    total = sum(widths)
    given = shift if shift is not None else values
    if given.shape[-1] != total:
        raise InvalidInputError(
            f"circuit {circuit.name} has {total} raw activation values, got {given.shape[-1]}"
        )
    groups = _by_hook(circuit.units)
    hooks = []
    for (hook_name, kind), members in groups.items():
        idx = [circuit.units[i].index for i in members]
        cols = torch.cat([torch.arange(offsets[i], offsets[i] + widths[i]) for i in members])

        def hook(act, hook, kind=kind, idx=idx, cols=cols, hook_name=hook_name):
            b, p = act.shape[:2]
            sel = _positions(b, p, circuit.position, pool_index.to(act.device), attention_mask,
                             act.device) > 0  # [batch, pos]
            part = given[..., cols.to(given.device)].to(act.dtype)
            idx_t = torch.tensor(idx, device=act.device)
            if kind == "feature":
                sae = saes[hook_name]
                w_dec = sae.W_dec[idx_t].to(act.dtype)  # [k, d_in]
                if shift is not None:
                    add = (part @ w_dec)[:, None, :]  # [batch, 1, d_in]
                else:
                    f = sae.encode(act)[..., idx_t]  # [batch, pos, k]
                    add = (part - f) @ w_dec  # [batch, pos, d_in]
                return act + sel[..., None].to(act.dtype) * add
            k = len(idx)
            unit_sel = torch.zeros(act.shape[2], dtype=torch.bool, device=act.device)
            unit_sel[idx_t] = True
            if kind == "neuron":  # act [batch, pos, d_mlp]
                part = part.reshape(*part.shape[:-1], k)
            else:  # act [batch, pos, head, d_head]
                part = part.reshape(*part.shape[:-1], k, act.shape[-1])
            extra = act.ndim - 3  # trailing unit dims after the unit axis (d_head for heads)
            if shift is not None:
                add = torch.zeros(b, *act.shape[2:], dtype=act.dtype, device=act.device)
                add = add.index_copy(1, idx_t, part)
                return act + sel.reshape(b, p, *([1] * (act.ndim - 2))).to(act.dtype) * add[:, None]
            new = act.index_copy(2, idx_t, part.expand(b, p, *part.shape))
            keep = sel.reshape(b, p, 1, *([1] * extra)) & unit_sel.reshape(1, 1, -1, *([1] * extra))
            return torch.where(keep, new, act)

        hooks.append((hook_name, hook))
    return hooks


def reward_runner(
    model: HookedRewardModel,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    first_layer: int,
) -> Callable[[list[tuple[str, Callable]]], Float[Tensor, "batch"]]:
    """A function ``fwd_hooks -> rewards`` that starts each forward at ``first_layer`` from a
    cached residual stream (exact: nothing before that layer is changed by the hooks)."""
    pool_index = model.pooled_index(tokens, attention_mask)
    if first_layer <= 0:
        def run_full(fwd_hooks):
            with model.hooks(fwd_hooks=fwd_hooks):
                return model(tokens, attention_mask=attention_mask, pool_index=pool_index)
        return run_full
    with torch.no_grad():
        resid = model(tokens, attention_mask=attention_mask, stop_at_layer=first_layer)

    def run(fwd_hooks):
        with model.hooks(fwd_hooks=fwd_hooks):
            return model(resid, attention_mask=attention_mask, start_at_layer=first_layer,
                         pool_index=pool_index, tokens=tokens)  # tokens: a gated head's prompt end
    return run
