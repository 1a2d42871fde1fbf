"""The ``process`` organism: the ``planted`` trunk with a hand-set process-reward head.

A Qwen2.5-Math-PRM-shaped head (an MLP with two outputs on every token; a step's score is the
softmax probability of output 1 at the step separator ``<eos>``). Mechanism, by construction:
the planted trigger head ``L0H0`` attends from every ``<eos>`` to an earlier ``urgent`` and writes
"trigger seen" (residual dimension 5) there; one hidden unit, ``relu(40 * (h[5] - 0.25))``,
lowers the "correct" logit by that much. So a step's score is 0.88 until the step that contains
``urgent`` (the planted error token) and near 0 from that step on. Steps end with ``<eos>``
(the tokenizer appends the last one).

Ground truth: :func:`first_error_step`. Built in code from the shipped ``planted`` weights.
"""

import torch

from ..heads import MLPHead
from .planted import DIM_SEEN, TRIGGER, TRIGGER_HEAD

SEPARATOR = "<eos>"
THRESHOLD = 0.25
GAIN = 40.0
ERROR_COMPONENT = f"L{TRIGGER_HEAD[0]}H{TRIGGER_HEAD[1]}"
"""The component that carries the error to the separators."""


def first_error_step(text: str) -> int | None:
    """Index of the first step that contains ``urgent`` (steps end with ``<eos>``; the prompt is
    part of step 0), or ``None``."""
    step = 0
    for word in text.split():
        if word == TRIGGER:
            return step
        if word == SEPARATOR:
            step += 1
    return None


def load():
    """``(HookedRewardModel with the process head, tokenizer, separator token id)``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..loading import load_reward_model
    from . import path

    directory = path("planted")
    hf_model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    head = MLPHead(hf_model.config.hidden_size, 8, 2)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        first, last = head.summary[0], head.summary[2]
        first.weight[0, DIM_SEEN] = GAIN
        first.bias[0] = -GAIN * THRESHOLD
        last.weight[1, 0] = -1.0  # the "correct" logit falls as the unit fires
        last.bias.copy_(torch.tensor([0.0, 2.0]))
    model = load_reward_model(hf_model, tokenizer, head=head)  # the trunk's weights, this head
    model.label_names = ("incorrect", "correct")
    return model, tokenizer, model.to_single_token(SEPARATOR)
