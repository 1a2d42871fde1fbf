"""Gated multi-objective heads (ArmoRM): the objectives, the gate, and the gate as a patch.

The head's intermediates are hook points (``reward_head.hook_objectives`` [batch, k],
``reward_head.hook_gate`` [batch, k], ``reward_head.hook_prompt`` [batch, d_model]); these helpers
read and patch them with full forwards of the model.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._device import readout_dtype
from .._readout import as_tokens
from ..errors import HeadError, InvalidInputError
from ..model import HookedRewardModel, Text

_NAMES = ("reward_head.hook_objectives", "reward_head.hook_gate")


def _check_gated(model: HookedRewardModel) -> None:
    if model.head_kind != "gated":
        raise HeadError(
            f"this model's reward head is {model.head_kind!r}, not gated: it has no objectives "
            "or gate; load a gated model (load_reward_model(..., head=GatedHead(...)) or an "
            "ArmoRM model object with gate_pattern=)"
        )


@dataclass(frozen=True)
class GatedOutputs:
    """What a gated head computed: ``score = (gate * (objectives @ transform)).sum(-1)``."""

    score: Float[Tensor, "batch"]
    objectives: Float[Tensor, "batch k"]
    gate: Float[Tensor, "batch k"]
    prompt_end: Int[Tensor, "batch"]
    objective_names: tuple[str, ...]

    @property
    def top_objective(self) -> Int[Tensor, "batch"]:
        """Index of the objective with the largest gate weight (which one the prompt switched on)."""
        return self.gate.argmax(-1)

    def to_dataframe(self):
        """One row per (sequence, objective): objective reward and gate weight."""
        import pandas as pd

        obj, gate = self.objectives.detach().cpu(), self.gate.detach().cpu()
        return pd.DataFrame([
            {"sequence": b, "objective": name, "reward": float(obj[b, k]),
             "gate": float(gate[b, k]), "score": float(self.score[b])}
            for b in range(obj.shape[0]) for k, name in enumerate(self.objective_names)
        ])


def gated_outputs(
    model: HookedRewardModel,
    tokens: Int[Tensor, "batch pos"] | Sequence[Text],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> GatedOutputs:
    """The score, the k objective rewards, the gate weights and the prompt-end position of each
    sequence, from one forward (its ``reward_head`` hook points)."""
    _check_gated(model)
    tokens, attention_mask = as_tokens(model, tokens, attention_mask)
    dt = readout_dtype(model)
    with torch.no_grad():
        score, cache = model.run_with_cache(tokens, attention_mask=attention_mask,
                                            names_filter=lambda n: n in _NAMES)
    return GatedOutputs(
        score=score.to(dt),
        objectives=cache["reward_head.hook_objectives"].to(dt),
        gate=cache["reward_head.hook_gate"].to(dt),
        prompt_end=model.prompt_end_index(tokens, attention_mask),
        objective_names=model.reward_head.objective_names,
    )


def gate_patch(
    model: HookedRewardModel,
    target: Int[Tensor, "batch pos"] | Sequence[Text],
    source: Int[Tensor, "batch _pos"] | Sequence[Text],
    target_mask: Int[Tensor, "batch pos"] | None = None,
    source_mask: Int[Tensor, "batch _pos"] | None = None,
) -> Float[Tensor, "batch"]:
    """Effect of the gate as a component: the reward of each ``target`` sequence with its gate
    weights replaced by those of the paired ``source`` sequence, minus its own reward.

    The objectives stay the target's, so the effect is ``((gate_source - gate_target) *
    (objectives @ transform)).sum(-1)``: how much the prompt's choice of objectives moved the
    score. Computed by patching ``reward_head.hook_gate`` in a full forward.
    """
    _check_gated(model)
    t_tokens, t_mask = as_tokens(model, target, target_mask)
    s_tokens, s_mask = as_tokens(model, source, source_mask)
    if t_tokens.shape[0] != s_tokens.shape[0]:
        raise InvalidInputError(
            f"{t_tokens.shape[0]} target but {s_tokens.shape[0]} source sequences; pairs must match"
        )
    with torch.no_grad():
        _, cache = model.run_with_cache(s_tokens, attention_mask=s_mask,
                                        names_filter="reward_head.hook_gate")
        gate = cache["reward_head.hook_gate"]
        base = model(t_tokens, attention_mask=t_mask)
        patched = model.run_with_hooks(
            t_tokens, attention_mask=t_mask,
            fwd_hooks=[("reward_head.hook_gate", lambda act, hook: gate)],
        )
    dt = readout_dtype(model)
    return patched.to(dt) - base.to(dt)
