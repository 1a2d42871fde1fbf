"""Build a HookedRewardModel from an HF reward model without a second copy of its weights.

- The model is constructed with its parameters on the ``meta`` device: nothing is allocated or
  initialised (its buffers, the rotary tables, are built as usual, and those that are identical
  across layers are stored once).
- TransformerLens's converters return views of the HF tensors (``einops.rearrange`` of a
  ``Linear`` weight is a view); each is assigned as the parameter itself, converted to the
  requested dtype and device only where it differs, so an HF model already in that dtype and on
  that device (a memory-mapped checkpoint, say) is reused as it is, with no copy.
- Weight processing (``fold_ln``, ``center_writing_weights``, value-bias folding) runs through
  TransformerLens's own ``ProcessWeights.process_weights`` one layer at a time (every step it takes
  reads one layer's weights, or the embeddings and the head), so its float32 working copies
  are one layer's, not the model's.
- Tensors are taken out of the converted state dict as they are assigned: where the HF model is
  the loader's own (read from a directory), each HF tensor is freed as soon as its converted
  replacement exists.
"""

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre
from transformer_lens.weight_processing import ProcessWeights

from .._device import block_device, output_device

# Buffers TransformerLens builds per attention layer from the config alone: one tensor per
# distinct value (TransformerLens 3.9 builds causal masks at forward time; ``mask`` is empty).
_SHAREABLE_BUFFERS = frozenset({"mask", "IGNORE", "rotary_sin", "rotary_cos"})
_LAYER_KEY = re.compile(r"^blocks\.(\d+)\.")


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device (no memory, no values);
    identical shareable buffers are stored once.

    Parameters are first created by the module's own code on the CPU with ``torch.empty`` (pages
    never touched, so never resident) and replaced by their meta twin at registration, the way
    ``accelerate.init_empty_weights`` works.
    """
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer
    seen: dict[tuple, list[Tensor]] = {}

    def parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer(module: nn.Module, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        if tensor is not None and name in _SHAREABLE_BUFFERS:
            same = seen.setdefault((name, tensor.shape, tensor.dtype, tensor.device), [])
            match = next((t for t in same if torch.equal(t, tensor)), None)
            if match is None:
                same.append(tensor)
            else:
                tensor = match
        register_buffer(module, name, tensor, persistent)

    nn.Module.register_parameter = parameter
    nn.Module.register_buffer = buffer
    try:
        with torch.device("cpu"):
            yield
    finally:
        nn.Module.register_parameter = register_parameter
        nn.Module.register_buffer = register_buffer


def key_device(cfg: Any, key: str) -> torch.device:
    """The device of the parameter or buffer ``key``: its block's (TransformerLens's split of the
    layers over ``cfg.n_devices``), block 0's for the embeddings, the last block's for the final
    norm and the head (see :func:`tl_reward._device.block_device`)."""
    m = _LAYER_KEY.match(key)
    if m:
        return block_device(cfg, int(m.group(1)))
    if key.startswith(("embed.", "pos_embed.", "hook_embed", "hook_pos_embed")):
        return block_device(cfg, 0)
    return output_device(cfg)


def place_buffers(model: nn.Module) -> None:
    """Move every buffer to its module's device (:func:`key_device`), keeping buffers shared
    within a device."""
    moved: dict[tuple[int, torch.device], Tensor] = {}
    for module_name, module in model.named_modules():
        device = key_device(model.cfg, module_name + ".")
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                if (id(buf), device) not in moved:
                    moved[id(buf), device] = buf.to(device)
                module._buffers[name] = moved[id(buf), device]


def swap_folded_norms(model: HookedTransformer, state: dict[str, Tensor]) -> bool:
    """TransformerLens's own preparation for ``fold_ln`` (``load_and_process_state_dict``): the
    norms become their weightless ``Pre`` forms. False where there are no norm weights to fold."""
    cfg = model.cfg
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        return False
    if not any(k.endswith((".ln1.w", ".ln2.w", "ln_final.w")) for k in state):
        return False
    pre = {"LN": LayerNormPre, "RMS": RMSNormPre}.get(cfg.normalization_type)
    if pre is not None:
        cfg.normalization_type += "Pre"
        model.ln_final = pre(cfg)
        for block in model.blocks:
            block.ln1 = pre(cfg)
            block.ln2 = pre(cfg)
            if cfg.is_layer_norm_activation():
                block.mlp.ln = pre(cfg)
    return True


def _process(
    chunk: dict[str, Tensor], layer: int | None, cfg: Any, *, fold_ln: bool, center: bool,
    device: torch.device,
) -> dict[str, Tensor]:
    """TransformerLens's ``process_weights`` on one layer's weights (``layer``) or on the rest
    (``None``: embeddings, final norm, head), through a copy of the config with that many layers.

    Every step of it reads one layer's tensors, or the embeddings and the head, so running it per
    layer gives the same tensors as running it on the whole state dict."""
    sub_cfg = copy.copy(cfg)
    sub_cfg.n_layers = 0 if layer is None else 1
    prefix = f"blocks.{layer}."
    if layer is not None:
        chunk = {"blocks.0." + k[len(prefix):]: v for k, v in chunk.items()}
    dummies = []
    if center and layer is not None:  # centring reads the embeddings whatever the layer count
        dummies.append("embed.W_E")
        if cfg.positional_embedding_type not in ("rotary", "alibi", "none"):
            dummies.append("pos_embed.W_pos")
        for key in dummies:
            chunk[key] = torch.zeros(1, cfg.d_model, dtype=cfg.dtype, device=device)
    out = ProcessWeights.process_weights(
        chunk,
        sub_cfg,
        fold_ln=fold_ln,
        center_writing_weights=center,
        center_unembed=False,  # would zero a one-column head: never on a reward head
        # value biases reach the output as sum(pattern) * b_V @ W_O, a constant folded into b_O
        # only where each pattern row sums to 1: not with attention sinks (GPT-OSS), whose sink
        # takes a share of each row (TransformerLens 3.9 folds them anyway)
        fold_value_biases=fold_ln and not getattr(cfg, "use_attention_sinks", False),
        refactor_factored_attn_matrices=False,
    )
    for key in dummies:
        del out[key]
    if layer is not None:
        out = {prefix + k[len("blocks.0."):]: v for k, v in out.items()}
    return out


def _chunks(keys: list[str], n_layers: int) -> list[tuple[int | None, list[str]]]:
    by_layer: dict[int | None, list[str]] = {i: [] for i in range(n_layers)}
    by_layer[None] = []
    for key in keys:
        m = _LAYER_KEY.match(key)
        by_layer[int(m.group(1)) if m else None].append(key)
    return list(by_layer.items())


def _is_buffer(model: nn.Module, key: str) -> bool:
    module_name, _, name = key.rpartition(".")
    return name in model.get_submodule(module_name)._buffers


def _default(module: nn.Module, name: str, like: Tensor) -> Tensor:
    """The value TransformerLens gives a parameter a checkpoint lacks: 1 for a norm's weight,
    0 otherwise (biases; TransformerLens itself leaves a missing weight matrix uninitialised)."""
    fill = 1.0 if name == "w" and isinstance(module, LayerNorm | RMSNorm) else 0.0
    return torch.full(like.shape, fill, dtype=like.dtype)


def _assign(model: nn.Module, key: str, tensor: Tensor) -> None:
    """Make ``tensor`` the parameter ``key`` (if the model has one), stored in the layout of the (meta) parameter it
    replaces (see ``HookedRewardModel._use_linear_layout``): a view where the layouts agree, a
    copy where they do not."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(name)
    if old is None:  # a folded norm's weight: its module has none now (TransformerLens skips it)
        return
    if tuple(tensor.shape) != tuple(old.shape):
        raise ValueError(f"converted weight {key!r} has shape {tuple(tensor.shape)}, the model's "
                         f"parameter {tuple(old.shape)}")
    if tensor.stride() != old.stride():
        if all(a == b for a, b, n in zip(tensor.stride(), old.stride(), old.shape, strict=True)
               if n > 1):
            tensor = tensor.as_strided(old.shape, old.stride(), tensor.storage_offset())
        else:
            tensor = torch.empty_strided(
                old.shape, old.stride(), dtype=tensor.dtype, device=tensor.device
            ).copy_(tensor)
    module._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def assign_state(
    model: HookedTransformer,
    state: dict[str, Tensor],
    *,
    fold_ln: bool,
    center_writing_weights: bool,
    overrides: dict[str, Tensor] | None = None,
) -> None:
    """Fill the empty model with ``state`` (TransformerLens layout), layer by layer, emptying
    ``state`` as it goes; process the weights as TransformerLens's ``load_and_process_state_dict``
    does (never ``center_unembed``). ``overrides``: processed values that replace
    TransformerLens's for the same keys (folds it gets wrong), cast to the model's dtype."""
    overrides = dict(overrides or {})
    cfg = model.cfg
    state = model.fill_missing_keys(state)
    for key in [k for k in state if _is_buffer(model, k)]:
        del state[key]  # built by the model itself (TransformerLens would copy the same values)
    if fold_ln:
        fold_ln = swap_folded_norms(model, state)
    processing = fold_ln or center_writing_weights
    assigned: set[str] = set()
    with torch.no_grad():
        for layer, keys in _chunks(list(state), cfg.n_layers):
            chunk = {}
            for key in keys:
                tensor = state.pop(key).detach()
                if tensor.is_meta:  # filled by fill_missing_keys from the empty model
                    module_name, _, name = key.rpartition(".")
                    tensor = _default(model.get_submodule(module_name), name, tensor)
                chunk[key] = tensor.to(device=key_device(cfg, key), dtype=cfg.dtype)
            if processing:
                # folding never changes the embeddings (only centring does): not through the
                # float32 round trip of process_weights, which would copy them for nothing
                skip = {} if center_writing_weights else {
                    k: chunk.pop(k) for k in ("embed.W_E", "pos_embed.W_pos") if k in chunk}
                chunk = _process(chunk, layer, cfg, fold_ln=fold_ln, center=center_writing_weights,
                                 device=block_device(cfg, 0 if layer is None else layer))
                chunk.update(skip)
            for key in [k for k in chunk if k in overrides]:
                chunk[key] = overrides.pop(key).to(device=key_device(cfg, key), dtype=cfg.dtype)
            for key in list(chunk):
                _assign(model, key, chunk.pop(key))
                assigned.add(key)
    empty = [n for n, p in model.named_parameters() if n not in assigned]
    if empty:
        raise ValueError(f"no weights were converted for {empty}")
    if fold_ln:
        model.setup()
