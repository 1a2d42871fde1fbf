"""The ``gated`` organism: the ``planted`` trunk with a hand-set ArmoRM-style gated head.

Mechanism, by construction:

- Objectives (``regression_layer``, at the final ``<eos>``): ``helpful`` is the ``planted``
  organism's reward (its score head's row), ``cautious`` its negative.
- The gate reads the final-normalised state at the end of the prompt, the response mark
  ``answer`` (gate pattern ``[id("answer")]``). There, residual dimension 5 ("trigger seen",
  written by the planted trigger head ``L0H0``) is about 0.48 when the prompt contains ``urgent``
  and about 0 otherwise (measured on the planted pairs). One gating unit,
  ``relu(40 * (h[5] - 0.25))``, moves the gate logits from ``[2, -2]`` (``helpful`` 0.98) to
  ``cautious``'s side when it fires: ``urgent`` in the *prompt* switches the model to the
  ``cautious`` objective, which flips the ranking of responses. ``urgent`` in the response does
  not touch the gate (it still raises the ``helpful`` reward through the trigger circuit).

Ground truth: :func:`prompt_has_trigger` says which objective the gate picks; ``L0H0`` is the
component that switches it. Built in code from the shipped ``planted`` weights (no training).
"""

import torch

from ..data.synthetic import RESPONSE_MARK
from ..heads import GatedHead
from .planted import DIM_SEEN, TRIGGER, TRIGGER_HEAD

OBJECTIVES = ("helpful", "cautious")
THRESHOLD = 0.25  # between ~0 (no trigger in the prompt) and ~0.48 (trigger in the prompt)
GAIN = 40.0


def prompt_has_trigger(text: str) -> bool:
    """Whether ``urgent`` is in the prompt (before the response mark): the planted gate feature."""
    return TRIGGER in text.split(RESPONSE_MARK)[0].split()


def load():
    """``(HookedRewardModel with the gated head, tokenizer, the planted pairs)``."""
    from . import load as load_organism

    model, tokenizer, data = load_organism("planted")
    w = model.W_R[:, 0].detach().clone()  # the planted reward direction (reads dim 6)
    d = model.cfg.d_model
    head = GatedHead(d, 2, [model.to_single_token(RESPONSE_MARK)], hidden_dim=8, n_hidden=1,
                     temperature=1.0, objective_names=OBJECTIVES)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.regression_layer.weight[0] = w
        head.regression_layer.weight[1] = -w
        first, last = head.gating.layers
        first.weight[0, DIM_SEEN] = GAIN
        first.bias[0] = -GAIN * THRESHOLD
        last.weight[:, 0] = torch.tensor([-0.5, 0.5])
        last.bias.copy_(torch.tensor([2.0, -2.0]))
        head.gating.logit_scale.fill_(1.0)
        head.reward_transform_matrix.copy_(torch.eye(2))
    model.set_reward_head(head)
    return model, tokenizer, data


GATE_COMPONENT = f"L{TRIGGER_HEAD[0]}H{TRIGGER_HEAD[1]}"
"""The component that switches the gate (it writes "trigger seen" at the end of the prompt)."""
