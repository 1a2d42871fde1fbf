"""The small interface the probes and CART discovery call on a reward: :class:`TextReward`.

Two kinds of reward satisfy it: :class:`~tl_reward.HookedRewardModel` (a score head read at one
pooled token) and :class:`~tl_reward.ImplicitRewardModel` (the DPO implicit reward, a weighted sum
of log-probability ratios over the response tokens). A tool written against :class:`TextReward`
needs to know neither:

- ``encode_texts(texts)`` turns texts into :class:`RewardInputs`: token ids, the attention mask,
  and the *read-out weights* ``read_weights[batch, pos]``, the positions whose residual streams
  the reward is read from (one-hot at the scoring token for a score head; uniform over the
  positions that predict the response tokens for an implicit reward);
- ``score_texts(texts)`` is the reward of each text;
- ``reward_runner(inputs, first_layer)`` gives a function ``fwd_hooks -> rewards`` that runs the
  reward with TransformerLens forward hooks on ``unit_model`` (the model whose hooks carry the
  units: the reward model itself, or the policy of an implicit reward, the reference held fixed).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from .errors import InvalidInputError

FwdHooks = list[tuple[str, Callable]]


@dataclass(frozen=True)
class RewardInputs:
    """Encoded texts, ready for :meth:`TextReward.reward_runner` and for reading units.

    ``read_weights[b, p]``: the weight of position ``p`` of row ``b`` in the reward's read-out
    (rows sum to 1, zero on padding). ``read_index``: the single read position of each row when
    there is one (a score head's pooled token), else ``None``. ``payload``: what the reward's own
    forward needs beyond the tokens (an implicit reward's :class:`~tl_reward.implicit.ResponseBatch`).
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    read_weights: Float[Tensor, "batch pos"]
    read_index: Int[Tensor, "batch"] | None = None
    payload: Any = None

    def __post_init__(self) -> None:
        if self.tokens.shape != self.attention_mask.shape or self.tokens.shape != self.read_weights.shape:
            raise InvalidInputError(
                f"tokens {tuple(self.tokens.shape)}, attention_mask "
                f"{tuple(self.attention_mask.shape)} and read_weights "
                f"{tuple(self.read_weights.shape)} must share one [batch, pos] shape"
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def ids(self) -> list[list[int]]:
        """The real (unpadded) token ids of each row."""
        return [row[m.bool()].tolist() for row, m in zip(self.tokens, self.attention_mask,
                                                          strict=True)]


def one_hot_read_weights(index: Int[Tensor, "batch"], shape: tuple[int, int],
                         device: torch.device | str) -> Float[Tensor, "batch pos"]:
    """Read-out weights of a reward read at one position per row."""
    w = torch.zeros(shape, device=device)
    w[torch.arange(shape[0], device=device), index.to(device)] = 1.0
    return w


@runtime_checkable
class TextReward(Protocol):
    """What probes and CART discovery need from a reward (see the module docstring)."""

    @property
    def unit_model(self) -> HookedTransformer:
        """The TransformerLens model whose hooks hold the units read and intervened on."""
        ...

    @property
    def is_scalar(self) -> bool:
        """Whether the reward is one number per text (probes and discovery need it)."""
        ...

    def encode_texts(self, texts: Sequence[Any]) -> RewardInputs:
        """Tokenize and pad texts (on the model's device)."""
        ...

    def score_texts(self, texts: Sequence[Any], *, batch_size: int = 16,
                    progress: bool = True) -> Float[Tensor, "batch"]:
        """The reward of each text."""
        ...

    def reward_runner(self, inputs: RewardInputs, first_layer: int = 0
                      ) -> Callable[[FwdHooks], Float[Tensor, "batch"]]:
        """``fwd_hooks -> rewards`` on ``inputs``; hooks may only touch layers from
        ``first_layer`` on (earlier activations may come from a cache)."""
        ...
