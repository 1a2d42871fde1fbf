"""A tuned reward lens: one learned affine translator per read-out point (Belrose et al.'s tuned
lens, with the reward head in place of the unembedding).

Each translator maps a layer's pooled residual ``h`` to ``h + A h + c`` (initialised at zero, so an
untrained lens is the recomputed-norm reward lens); the final norm and the reward head then read
it. Translators are fitted on a dataset with the model frozen, to match the model's final reward
(mean squared error), and the held-out fit is reported next to the plain lens's.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .._memory import rows_that_fit
from .._readout import as_tokens, batches, pooled_run, readout_dtype
from ..errors import InvalidInputError
from ..model import HookedRewardModel, Text
from .lens import LensResult, _head, _head_bias


@dataclass(frozen=True)
class TunedLensFit:
    """Held-out and training fit of each translator, as R^2 against the model's final reward."""

    labels: tuple[str, ...]
    train_r2: Tensor
    heldout_r2: Tensor
    heldout_r2_plain: Tensor  # the recomputed-norm lens on the same held-out sequences
    n_train: int
    n_heldout: int

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "label": list(self.labels),
                "train_r2": self.train_r2.numpy(),
                "heldout_r2": self.heldout_r2.numpy(),
                "heldout_r2_plain_lens": self.heldout_r2_plain.numpy(),
            }
        )


def _r2(pred: Float[Tensor, "layer n"], target: Float[Tensor, "n"]) -> Float[Tensor, "layer"]:
    resid = ((pred - target) ** 2).sum(-1)
    total = ((target - target.mean()) ** 2).sum()
    return 1 - resid / total


def _pooled_stack(model, tokens, mask, batch_size, progress):
    stacks, rewards, labels = [], [], None
    batch_size = rows_that_fit(model.cfg, tokens.shape[1], batch_size)  # the memory budget
    for rows in batches(tokens.shape[0], batch_size, progress, "collecting residuals"):
        run = pooled_run(model, tokens[rows], None if mask is None else mask[rows],
                         lambda n: "hook_resid" in n)
        stack, labels = run.cache.accumulated_resid(layer=None, return_labels=True)
        stacks.append(stack[:, :, 0].detach())
        rewards.append(run.rewards.detach())
    return torch.cat(stacks, dim=1), torch.cat(rewards), labels


class TunedRewardLens(nn.Module):
    """Per-layer affine translators read through the final norm and the reward head.

    Fit with :meth:`fit`; apply with :meth:`lens` (returns a :class:`LensResult`).
    """

    def __init__(self, model: HookedRewardModel, labels: Sequence[str]) -> None:
        super().__init__()
        _ = model.reward_direction  # scalar reward needed
        d = model.cfg.d_model
        self.labels = tuple(labels)
        # the last read-out point is the final residual itself: it needs no translator
        self.translators = nn.ModuleList(nn.Linear(d, d) for _ in self.labels[:-1])
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)
        self.to(device=model.cfg.device, dtype=readout_dtype(model))  # float32 for a half model
        self.fit_report: TunedLensFit | None = None

    def read(
        self, model: HookedRewardModel, stack: Float[Tensor, "layer batch d_model"]
    ) -> Float[Tensor, "layer batch"]:
        """Rewards read from a stack of pooled residuals (one row per read-out point)."""
        if stack.shape[0] != len(self.labels):
            raise InvalidInputError(
                f"stack has {stack.shape[0]} read-out points, the lens was fitted on {len(self.labels)}"
            )
        moved = [h + t(h) for h, t in zip(stack[:-1], self.translators, strict=True)]
        moved = torch.stack([*moved, stack[-1]])
        normed = model.ln_final(moved.reshape(-1, 1, moved.shape[-1])).reshape(moved.shape)
        head = _head(model)
        return (normed.to(head.dtype) @ head + _head_bias(model))[..., 0]

    @classmethod
    def fit(
        cls,
        model: HookedRewardModel,
        tokens: Int[Tensor, "batch pos"] | Sequence[Text],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        heldout_fraction: float = 0.25,
        steps: int = 300,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        seed: int = 0,
        batch_size: int = 64,
        progress: bool = True,
    ) -> "TunedRewardLens":
        """Fit translators on a dataset (model frozen); the held-out fit goes to ``fit_report``."""
        if not 0 < heldout_fraction < 1:
            raise InvalidInputError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        tokens, attention_mask = as_tokens(model, tokens, attention_mask)
        with torch.no_grad():
            stack, target, labels = _pooled_stack(model, tokens, attention_mask, batch_size, progress)
        n = stack.shape[1]
        n_held = int(round(n * heldout_fraction))
        if n_held < 2 or n - n_held < 2:
            raise InvalidInputError(
                f"{n} sequences are too few to fit and evaluate a tuned lens with "
                f"heldout_fraction={heldout_fraction}; need at least 2 on each side"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(stack.device)
        held, train = perm[:n_held], perm[n_held:]
        lens = cls(model, labels)
        frozen = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            opt = torch.optim.AdamW(lens.parameters(), lr=lr, weight_decay=weight_decay)
            from tqdm.auto import trange

            for _ in trange(steps, desc="tuned lens", disable=not progress, leave=False):
                opt.zero_grad()
                pred = lens.read(model, stack[:, train])
                loss = ((pred[:-1] - target[train]) ** 2).mean()
                loss.backward()
                opt.step()
        finally:
            for p, flag in zip(model.parameters(), frozen, strict=True):
                p.requires_grad_(flag)
        with torch.no_grad():
            plain = cls(model, labels)  # zero translators: the recomputed-norm lens
            lens.fit_report = TunedLensFit(
                labels=tuple(labels),
                train_r2=_r2(lens.read(model, stack[:, train]), target[train]).cpu(),
                heldout_r2=_r2(lens.read(model, stack[:, held]), target[held]).cpu(),
                heldout_r2_plain=_r2(plain.read(model, stack[:, held]), target[held]).cpu(),
                n_train=len(train),
                n_heldout=n_held,
            )
        return lens

    @torch.no_grad()
    def lens(
        self,
        model: HookedRewardModel,
        tokens: Int[Tensor, "batch pos"] | Sequence[Text],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        batch_size: int = 32,
        progress: bool = True,
    ) -> LensResult:
        """The tuned reward lens of these sequences."""
        tokens, attention_mask = as_tokens(model, tokens, attention_mask)
        stack, _, labels = _pooled_stack(model, tokens, attention_mask, batch_size, progress)
        if tuple(labels) != self.labels:
            raise InvalidInputError("this lens was fitted on another model or read-out points")
        return LensResult(rewards=self.read(model, stack), labels=self.labels, norm="tuned",
                          objective_names=("reward",))
