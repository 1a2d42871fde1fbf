"""A memory budget for the tools' working sets, and the batch sizes it allows.

The tools run batches of sequences; at long inputs a batch's working memory grows with
``batch x n_heads x pos^2`` (the attention scores TransformerLens materialises) and
``batch x pos x (d_model, d_mlp)`` (the residual stream and MLP activations). Each tool asks
:func:`rows_that_fit` how many rows of its batch fit the budget and never runs more (at least
one: a single sequence that does not fit the budget still runs, as it must, unless it does not
fit the memory available at all: then :class:`~tl_reward.errors.InsufficientMemoryError` says so
before anything is allocated, instead of the process being killed by the system).

A tool that takes gradients through the trunk (attribution patching, SAE gradient attribution)
keeps every layer's graph for its backward pass; where one sequence's graph does not fit the
budget it runs the blocks under :func:`checkpointed_blocks` (PyTorch's activation checkpointing:
each block's graph is recomputed during the backward pass from the block's input, so one layer's
graph is held at a time), at the cost of one more forward.

The budget is, in order: what :func:`set_memory_budget` was given (also as a context manager,
``with memory_budget(8): ...``); else half the memory available now on the model's device
(``psutil``'s available host memory, or the free memory of the GPU).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from .errors import InsufficientMemoryError, InvalidInputError

_budget: int | None = None


def set_memory_budget(gib: int | float | None) -> None:
    """Bytes the tools may use for activations beyond the weights, in GiB (``None``: half of the
    memory available when each tool starts)."""
    global _budget
    if gib is not None and not gib > 0:
        raise InvalidInputError(f"memory budget must be a positive number of GiB, got {gib!r}")
    _budget = None if gib is None else int(gib * 2**30)


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes available now on ``device``: the GPU's free memory, or the host's available memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free
    import psutil

    return psutil.virtual_memory().available


def get_memory_budget(device: str | torch.device = "cpu") -> int:
    """The budget in bytes on ``device``: the one set, else half of what is available now."""
    if _budget is not None:
        return _budget
    return available_memory(device) // 2


@contextmanager
def memory_budget(gib: int | float | None) -> Iterator[None]:
    """``set_memory_budget`` for the duration of a ``with`` block."""
    global _budget
    previous = _budget
    set_memory_budget(gib)
    try:
        yield
    finally:
        _budget = previous


def forward_bytes_per_row(cfg, n_pos: int, *, grad: bool = False,
                          checkpointed: bool = False) -> int:
    """Working memory of one sequence of ``n_pos`` tokens through a HookedTransformer forward:
    the attention scores of one layer (scores, mask, softmax and pattern: four
    ``[n_heads, pos, pos]`` tensors, float32 at most), the MLP's hidden activations and a few
    residual-stream tensors. With ``grad`` (a backward pass follows), every layer's are kept;
    with ``checkpointed`` as well, one layer's graph and its gradients at a time, plus every
    block's input (see :func:`checkpointed_blocks`)."""
    item = max(torch.tensor([], dtype=cfg.dtype).element_size(), 4)
    attn = 4 * cfg.n_heads * n_pos * n_pos * item
    mlp = 3 * (cfg.d_mlp or 4 * cfg.d_model) * n_pos * item
    resid = 8 * cfg.d_model * n_pos * item
    per_layer = attn + mlp + resid
    if not grad:
        return per_layer
    if checkpointed:
        return 2 * per_layer + cfg.n_layers * cfg.d_model * n_pos * item
    return per_layer * cfg.n_layers


def needs_checkpointing(cfg, n_pos: int, *, kept_per_row: int = 0) -> bool:
    """Whether one sequence's full backward graph (plus ``kept_per_row``) exceeds the budget, so
    that a gradient tool should run its blocks under :func:`checkpointed_blocks`."""
    per_row = forward_bytes_per_row(cfg, n_pos, grad=True) + kept_per_row
    return per_row > get_memory_budget(cfg.device)


@contextmanager
def checkpointed_blocks(model) -> Iterator[None]:
    """Run every transformer block of ``model`` under non-reentrant activation checkpointing
    (``torch.utils.checkpoint``) for the duration of the ``with`` block: a forward with
    gradients keeps only each block's input; the block's graph is recomputed during the
    backward pass. Hooks see the same activations in the forward (they are not run again by
    the recomputation), and gradients are the same as without checkpointing.

    A block input that does not require gradients (frozen parameters upstream) is given a
    leaf that does, so the recomputation builds the same graph as the forward."""
    blocks = list(model.blocks)

    def wrap(forward):
        def run(resid: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return forward(resid, *args, **kwargs)
            if not resid.requires_grad:
                resid = resid.detach().requires_grad_(True)
            return checkpoint(forward, resid, *args, use_reentrant=False, **kwargs)

        return run

    for block in blocks:
        block.forward = wrap(block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute: the class's forward again


def rows_that_fit(cfg, n_pos: int, requested: int, *, kept_per_row: int = 0,
                  grad: bool = False, checkpointed: bool = False) -> int:
    """The batch size to use: ``requested``, or fewer so that the rows' forward working memory
    plus what the tool keeps of each row (``kept_per_row`` bytes) fits the budget; at least 1."""
    if requested < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {requested}")
    per_row = forward_bytes_per_row(cfg, n_pos, grad=grad, checkpointed=checkpointed) + kept_per_row
    budget = get_memory_budget(cfg.device)
    if per_row > budget:
        available = available_memory(cfg.device)
        if per_row > available:
            raise InsufficientMemoryError(
                f"one sequence of {n_pos} tokens needs about {_size(per_row)} of working "
                f"memory for this tool"
                + (" (its backward pass keeps every layer's attention scores, "
                   f"{cfg.n_layers} x {cfg.n_heads} x {n_pos}^2)" if grad and not checkpointed
                   else "")
                + f", more than the {_size(available)} available on {cfg.device}. "
                "Shorten the input"
                + (", use exact activation patching (no backward), " if grad else ", ")
                + "or run on a device with more memory."
            )
    return max(1, min(requested, budget // max(per_row, 1)))


def _size(n_bytes: int) -> str:
    """``n_bytes`` in GiB, or MiB below a tenth of a GiB."""
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 / 10 else f"{n_bytes / 2**20:.1f} MiB"
