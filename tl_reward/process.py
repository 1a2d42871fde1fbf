"""Process rewards: one reward per reasoning step, read at each step-separator token.

A process reward model (PRM) applies its head at every token and reads it where the text marks
the end of a step with a separator token (Qwen2.5-Math-PRM: ``<extra_0>``, its head an MLP with
two outputs, the step score ``softmax(logits)[..., 1]``, the probability that the step is
correct). :func:`step_rewards` does that for any head (``model(tokens,
return_type="per_position")`` at the separator positions):

- ``score="probability"`` (default for a head with two outputs and no objective): the softmax
  probability of output 1 ("positive");
- ``score="reward"`` (default otherwise): the scalar reward itself (one output, or the chosen
  objective).

A solution's reward is an aggregate of its steps (:meth:`StepRewards.aggregate`): ``min`` (the
weakest step), ``last``, ``product`` (all steps right, for probabilities) or ``mean``.

Per-step analysis with every tool: attention is causal, so step ``i``'s reward is the pooled
reward of the text cut right after its separator. :func:`step_tokens` gives those cuts, one row
per step (right-padded, with the mask); with ``model.set_objective([-1.0, 1.0])`` a two-output
head's pooled reward is the step's log-odds ``logit_1 - logit_0`` (``sigmoid`` of it is the
step's probability), so the lens, ``head_attribution``, patching (a chosen step of a clean and a
corrupt solution as the pair) read a chosen step's reward.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._device import readout_dtype
from .errors import InvalidInputError, ObjectiveError
from .model import HookedRewardModel, Text

STEP_SCORES = ("probability", "reward")
AGGREGATES = ("min", "last", "product", "mean")


@dataclass(frozen=True)
class StepRewards:
    """One text's step rewards: ``rewards[i]`` read at token ``positions[i]`` (a separator)."""

    rewards: Float[Tensor, "step"]
    positions: Int[Tensor, "step"]
    score: str

    def aggregate(self, how: str = "min") -> Float[Tensor, ""]:
        """The solution's reward: ``min``, ``last``, ``product`` or ``mean`` of its steps."""
        return aggregate_steps(self.rewards, how)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"step": range(len(self.rewards)),
                             "position": self.positions.cpu().numpy(),
                             "reward": self.rewards.detach().cpu().numpy()})


def _ids(model: HookedRewardModel, text: "Text | Tensor") -> Tensor:
    if isinstance(text, Tensor):
        tokens = text.to(model.cfg.device).long()
        if tokens.ndim != 1:
            raise InvalidInputError(f"one text's token ids [pos] are needed, got shape "
                                    f"{tuple(tokens.shape)}")
        return tokens[None]
    return model.to_tokens(text)


def _separators(tokens: Tensor, separator: int) -> Tensor:
    if isinstance(separator, bool) or not isinstance(separator, int):
        raise InvalidInputError(f"separator must be a token id (an int), got {separator!r}")
    positions = (tokens[0] == separator).nonzero().flatten()
    if len(positions) == 0:
        raise InvalidInputError(
            f"the text has no step separator (token id {separator}); end each step with it"
        )
    return positions


def step_score(model: HookedRewardModel, score: str | None) -> str:
    """The step score to read, checked against the head: ``score`` or its default
    (``"probability"`` for a head with two outputs and no objective, ``"reward"`` otherwise)."""
    two_outputs = model.n_rewards == 2 and model.objective_weights is None
    score = score or ("probability" if two_outputs else "reward")
    if score not in STEP_SCORES:
        raise InvalidInputError(f"score {score!r} is not one of {list(STEP_SCORES)}")
    if score == "probability" and not two_outputs:
        raise ObjectiveError(
            f"score='probability' needs a head with two outputs (negative, positive) and no "
            f"objective; this one has {model.n_rewards}. Use score='reward'."
        )
    if score == "reward" and not model.is_scalar:
        raise ObjectiveError(
            f"this head has {model.n_rewards} outputs {list(model.label_names)}: use "
            "score='probability' (two outputs) or choose one with model.set_objective(...)"
        )
    return score


def aggregate_steps(values: Tensor, how: str, dim: int = -1) -> Tensor:
    """A solution's reward from its step scores along ``dim``: ``min``, ``last``, ``product`` or
    ``mean``."""
    if how not in AGGREGATES:
        raise InvalidInputError(f"aggregate {how!r} is not one of {list(AGGREGATES)}")
    if how == "min":
        return values.amin(dim)
    if how == "last":
        return values.select(dim, -1)
    return values.prod(dim) if how == "product" else values.mean(dim)


def step_tokens(
    model: HookedRewardModel, text: Text | Int[Tensor, "pos"], separator: int
) -> tuple[Int[Tensor, "step cut_pos"], Int[Tensor, "step cut_pos"]]:
    """``(tokens, attention_mask)``: row ``i`` is the text up to and including step ``i``'s
    separator, right-padded, so that its scoring token is that separator (see the module
    docstring)."""
    tokens = _ids(model, text)
    if separator == model.pad_token_id:
        raise InvalidInputError(
            f"the separator {separator} is the pad id: the pooled token of a cut would be the one "
            "before it. Use a separator that is not the pad token."
        )
    ends = _separators(tokens, separator).tolist()
    return model.pad([tokens[0, : end + 1].tolist() for end in ends])


def step_rewards(
    model: HookedRewardModel,
    text: Text | Int[Tensor, "pos"],
    separator: int,
    *,
    score: str | None = None,
) -> StepRewards:
    """The reward of each step of one text: the head at every ``separator`` token.

    ``text``: a string or chat (tokenised as :meth:`HookedRewardModel.to_tokens` does) or token
    ids ``[pos]``. ``separator``: the step-separator token id (Qwen2.5-Math-PRM: the id of
    ``<extra_0>``). ``score``: ``"probability"`` or ``"reward"`` (see the module docstring).
    """
    score = step_score(model, score)
    tokens = _ids(model, text)
    positions = _separators(tokens, separator)
    with torch.no_grad():
        per_pos = model(tokens, return_type="per_position")[0, positions]
    dt = readout_dtype(model)
    rewards = per_pos.to(dt).softmax(-1)[:, 1] if score == "probability" else per_pos.to(dt)
    return StepRewards(rewards=rewards, positions=positions, score=score)

