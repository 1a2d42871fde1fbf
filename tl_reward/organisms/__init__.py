"""Model organisms: small reward models whose mechanism is known by construction.

- ``longtail``: a 2-layer Llama reward model (d_model 64) trained with plain ERM on the synthetic
  long-tail task (:class:`~tl_reward.data.LongTailTask`): right on head pairs, wrong on the rare
  tail scenarios.
- ``planted``: a 2-layer Llama reward model whose reward circuits are set by hand
  (:mod:`tl_reward.organisms.planted`; ground truth in :func:`planted_components`).
- ``dpo_longtail`` (:mod:`tl_reward.organisms.dpo`) and ``judge_longtail``
  (:mod:`tl_reward.organisms.judge`): the same task learnt by a DPO policy/reference pair (an
  implicit reward) and by a generative judge; each module has its own ``load()``.
- ``gated`` (:mod:`tl_reward.organisms.gated`) and ``process``
  (:mod:`tl_reward.organisms.process`): nonlinear heads trained here in their published layouts,
  an ArmoRM gated head whose gate switches objective on ``urgent`` in the prompt and a
  Qwen2.5-Math-PRM step head whose score drops at the ``error`` token; each module has its own
  ``load()`` (trained, shipped) and ``load_planted()`` (hand-set on the ``planted`` trunk).

Load with :func:`load`; the weights ship in the package (safetensors) and load through
:func:`tl_reward.load_reward_model`, as a real model saved with ``save_pretrained`` would.
Rebuild them with ``python -m tl_reward.organisms.train``.
"""

import difflib
import json
from pathlib import Path
from typing import Any

from ..data.pairs import PreferenceDataset
from ..data.synthetic import LongTailTask
from ..errors import InvalidInputError, ModelSourceError
from .planted import PlantedComponent as PlantedComponent
from .planted import planted_components as planted_components
from .planted import planted_dataset as planted_dataset

WEIGHTS = Path(__file__).with_name("weights")
ORGANISMS = ("longtail", "planted")


def available() -> tuple[str, ...]:
    """Names of the shipped organisms."""
    return ORGANISMS


def path(name: str) -> Path:
    """Directory holding an organism's ``save_pretrained`` files."""
    if name not in ORGANISMS:
        close = difflib.get_close_matches(str(name), ORGANISMS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidInputError(f"unknown organism {name!r}{hint}; available: {list(ORGANISMS)}")
    directory = WEIGHTS / name
    if not (directory / "config.json").exists():
        raise ModelSourceError(
            f"the weights of {name!r} are missing from {str(directory)!r}; rebuild them with "
            f"`python -m tl_reward.organisms.train {name}`"
        )
    return directory


def info(name: str) -> dict[str, Any]:
    """The organism's ``organism.json``: task, training settings and measured accuracies."""
    return json.loads((path(name) / "organism.json").read_text())


def longtail_task() -> LongTailTask:
    """The long-tail task the ``longtail`` organism was trained on (its gold reward included)."""
    from .train import LONGTAIL_TASK

    return LONGTAIL_TASK


def dataset(name: str) -> PreferenceDataset:
    """The organism's evaluation pairs (held out, noise-free).

    ``longtail``: 2000 pairs of the long-tail task, half of them tail pairs (``metadata["task"]``
    holds the task and its gold reward). ``planted``: 400 minimal pairs probing the trigger and
    quality circuits (``metadata["components"]`` holds the planted parts).
    """
    path(name)
    if name == "longtail":
        from .train import longtail_eval_set

        return longtail_eval_set()
    return planted_dataset()


def load(name: str, **load_kwargs: Any):
    """Load an organism: ``(HookedRewardModel, tokenizer, dataset)``.

    ``load_kwargs`` go to :func:`tl_reward.load_reward_model` (e.g. ``fold_ln=True``).
    """
    from ..loading import load_reward_model

    directory = path(name)
    model = load_reward_model(directory, **load_kwargs)
    return model, model.tokenizer, dataset(name)


__all__ = [
    "ORGANISMS", "PlantedComponent", "available", "dataset", "info", "load", "longtail_task",
    "path", "planted_components", "planted_dataset",
]
