"""Splicing sae-lens SAEs into a HookedRewardModel, with sae-lens's own mechanics.

:func:`attach_saes` does what ``HookedSAETransformer.add_sae`` does, on a
:class:`~tl_reward.HookedRewardModel` (a plain ``HookedTransformer`` subclass, not a
``HookedSAETransformer``): each SAE is wrapped in sae-lens's own wrapper module (the
``_SAEWrapper`` that ``add_sae`` uses, so the error term, the ``hook_sae_error`` /
``hook_sae_output`` hook points and the hook-disabled recomputation of the error are sae-lens's)
and set at its hook point with sae-lens's ``set_deep_attr``; the model's hook dictionary is then
rebuilt. The SAE's hook points appear under the hook's name
(``blocks.1.hook_resid_post.hook_sae_acts_post``, ``...hook_sae_error``, ...). The whole
TransformerLens / sae-lens coupling of the package lives in this module.
"""

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE
from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper, get_deep_attr, set_deep_attr
from sae_lens.saes.sae import _disable_hooks
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from .._readout import choose
from ..errors import InvalidInputError, NotAnSAEError, SAEMismatchError
from ..model import HookedRewardModel

# Hooks whose activation lives in the residual basis and is added to (or is) the residual stream.
RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                  "hook_mlp_out")


def sae_list(saes: Any) -> list[SAE]:
    items = [saes] if isinstance(saes, SAE) else list(saes) if isinstance(saes, Sequence) else [saes]
    if not items:
        raise InvalidInputError("no SAE given; pass a sae_lens SAE or a list of them")
    for i, sae in enumerate(items):
        if not isinstance(sae, SAE):
            raise NotAnSAEError(
                f"item {i} is a {type(sae).__name__}, not a sae_lens SAE; load one with "
                "sae_lens.SAE.load_from_disk(path) or train one with tl_reward.sae.train_sae"
            )
    return items


def _width(model: HookedRewardModel, hook: str) -> int | None:
    """Width of the activation at ``hook`` as an SAE sees it (heads flattened), when known."""
    cfg = model.cfg
    last = hook.rsplit(".", 1)[-1]
    if last in RESIDUAL_HOOKS or last in ("hook_embed", "hook_pos_embed") or hook.startswith(
        ("ln_final.hook_normalized", "reward_head.hook_pooled")
    ):
        return cfg.d_model
    if ".mlp." in hook and last in ("hook_pre", "hook_post", "hook_pre_linear"):
        return cfg.d_mlp
    if last == "hook_z" or (last == "hook_q" and ".attn." in hook):
        return cfg.n_heads * cfg.d_head
    return None


def check_sae(model: HookedRewardModel, sae: SAE) -> str:
    """Check that ``sae`` fits ``model`` and return its hook name.

    Checked: it is a sae-lens SAE with ``cfg.metadata.hook_name`` set to a hook of the model, not a
    transcoder, with the width of that hook's activation, on the model's device and dtype.
    """
    (sae,) = sae_list(sae)
    hook = sae.cfg.metadata.hook_name
    if not hook:
        raise SAEMismatchError(
            "the SAE has no cfg.metadata.hook_name; set it to the hook it reads, e.g. "
            "sae.cfg.metadata.hook_name = 'blocks.1.hook_resid_post'"
        )
    out = sae.cfg.metadata.hook_name_out
    if out and out != hook:
        raise SAEMismatchError(
            f"the SAE reads {hook!r} and writes {out!r} (a transcoder); only SAEs that "
            "reconstruct the activation they read are supported"
        )
    choose("hook", hook, [n for n in model.hook_dict if not n.startswith("reward_head.hook_reward")])
    width = _width(model, hook)
    if width is not None and sae.cfg.d_in != width:
        raise SAEMismatchError(
            f"the SAE has d_in={sae.cfg.d_in} but {hook!r} has width {width} in this model; "
            "was it trained on another model or hook?"
        )
    if sae.W_dec.device.type != torch.device(model.cfg.device).type:
        raise SAEMismatchError(
            f"the SAE is on {sae.W_dec.device} and the model on {model.cfg.device}; move it with "
            f"sae.to({str(model.cfg.device)!r})"
        )
    if sae.W_dec.dtype != model.cfg.dtype:
        raise SAEMismatchError(
            f"the SAE is {sae.W_dec.dtype} and the model {model.cfg.dtype}; cast it with "
            f"sae.to(dtype={model.cfg.dtype})"
        )
    return hook


@contextlib.contextmanager
def attach_saes(
    model: HookedRewardModel, saes: Any, *, use_error_term: bool = True
) -> Iterator[HookedRewardModel]:
    """Splice sae-lens SAEs into the model for the duration of a ``with`` block.

    ``saes``: one ``SAE`` or a list (each at its ``cfg.metadata.hook_name``). The SAE's hooks are
    then ``f"{hook}.hook_sae_acts_post"``, ``...hook_sae_error``, ``...hook_sae_input``,
    ``...hook_sae_output`` and work with ``run_with_cache`` / ``run_with_hooks``. With
    ``use_error_term=True`` (the default) the rewards are the model's own; with ``False`` the
    activation is replaced by the SAE's reconstruction. The original hook points (and any hook
    functions on them) are restored on exit.
    """
    items = sae_list(saes)
    hooks = [check_sae(model, sae) for sae in items]
    if len(set(hooks)) != len(hooks):
        raise InvalidInputError(f"two SAEs read the same hook: {hooks}; attach one per hook")
    attached: list[tuple[str, Any, SAE]] = []
    try:
        for sae, hook in zip(items, hooks, strict=True):
            original = get_deep_attr(model, hook)
            if not isinstance(original, HookPoint):
                raise InvalidInputError(f"an SAE is already attached at {hook!r}")
            set_deep_attr(model, hook, _SAEWrapper(sae, use_error_term=use_error_term))
            attached.append((hook, original, sae))
        model.setup()
        yield model
    finally:
        for hook, original, _ in reversed(attached):
            set_deep_attr(model, hook, original)
        model.setup()
        for _, _, sae in attached:
            sae.setup()  # the model's setup renamed the SAE's hook points: give them back


def decoder_bias(sae: SAE) -> Tensor:
    """``decode(0)``: what the SAE writes with no feature active, flattened to ``[d_in]``."""
    with torch.no_grad(), _disable_hooks(sae):
        zero = torch.zeros(1, sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
        return sae.decode(zero).reshape(-1)


def decoder_dot(sae: SAE, u: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
    """``(decode(e_i) - decode(0)) . u[b]`` for every feature ``i``: one vector-Jacobian product.

    Exact for the affine decoders of sae-lens (standard, TopK with or without decoder-norm
    rescaling, JumpReLU, gated) without materialising a ``[d_sae, d_in]`` matrix.
    """
    with torch.enable_grad(), _disable_hooks(sae):
        f = torch.zeros(u.shape[0], sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=u.device,
                        requires_grad=True)
        out = sae.decode(f).reshape(u.shape[0], -1)
        (grad,) = torch.autograd.grad((out.to(u.dtype) * u.detach()).sum(), f)
    return grad.to(u.dtype)  # in u's dtype (float32 for a half-precision SAE)
