"""The ``process`` organisms: process reward models whose step score drops at a planted error.

Two variants:

- :func:`load` (shipped, **trained here**): a Qwen2.5-Math-PRM-shaped model, a 2-layer trunk
  (d_model 32, grouped-query attention) with the published head ``score`` =
  ``Sequential(Linear(h, h), ReLU, Linear(h, 2))`` on every token, the step score the softmax
  probability of output 1 (``correct``) at each step separator ``<extra_0>`` (Qwen2.5-Math-PRM's
  separator). The trunk is a Llama one with grouped-query attention, not Qwen2: with
  ``model_type: qwen2`` in ``config.json``, transformers 5's ``AutoTokenizer`` replaces the
  saved word-level tokenizer by ``Qwen2Tokenizer``, which drops every word; the head's layout
  is what the organism is about. Trained from a fixed seed in under a minute on CPU and stored in
  ``weights/process`` in that layout (``model.*``, ``score.{0,2}.*``), which
  :func:`tl_reward.load_reward_model` reads. Rebuild with ``python -m tl_reward.organisms.process``.
- :func:`load_planted`: a hand-set head of the same shape on the ``planted`` trunk (below).

**Task of the trained organism** (:func:`sample_solutions`): ``query p1 p2 answer`` then 3-4
steps of 2-5 filler words, each step ended by ``<extra_0>``; in three solutions of four one
word of a random step is the planted error token ``error``. A step's label is ``correct``
exactly when no step up to and including it contains ``error`` (the score drops at the first
error and stays low), learnt with the cross-entropy of the two-label head at every separator.
Ground truth: :func:`first_error_step` (generic: ``error`` for the trained organism). Measured
accuracies are in ``organism.json`` (:func:`info`).

**Planted variant** (:func:`load_planted`): the planted trigger head ``L0H0`` attends from every
``<eos>`` to an earlier ``urgent`` and writes "trigger seen" (residual dimension 5) there; one
hidden unit, ``relu(40 * (h[5] - 0.25))``, lowers the "correct" logit by that much. So a step's
score is 0.88 until the step that contains ``urgent`` and near 0 from that step on; steps end
with ``<eos>`` (the tokenizer appends the last one). :data:`ERROR_COMPONENT` (``L0H0``) carries
the error to the separators.
"""

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.synthetic import RESPONSE_MARK, LongTailTask, word_tokenizer
from ..errors import ModelSourceError
from ..heads import MLPHead
from .planted import DIM_SEEN, TRIGGER, TRIGGER_HEAD

DIRECTORY = Path(__file__).with_name("weights") / "process"
TASK = LongTailTask()
STEP_SEPARATOR = "<extra_0>"
ERROR = "error"
LABELS = ("incorrect", "correct")
N_FILLER = 60
ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
STEPS, BATCH, LR, MODEL_SEED, TRAIN_SEED = 200, 64, 1e-2, 0, 0
N_EVAL, EVAL_SEED = 500, 1

SEPARATOR = "<eos>"  # planted variant
THRESHOLD = 0.25
GAIN = 40.0
ERROR_COMPONENT = f"L{TRIGGER_HEAD[0]}H{TRIGGER_HEAD[1]}"
"""Planted variant: the component that carries the error to the separators."""


def first_error_step(text: str, error: str = TRIGGER, separator: str = SEPARATOR) -> int | None:
    """Index of the first step that contains ``error`` (steps end with ``separator``; the prompt
    is part of step 0), or ``None``. Defaults: the planted variant's (``urgent``, ``<eos>``);
    the trained organism: ``first_error_step(text, ERROR, STEP_SEPARATOR)``."""
    step = 0
    for word in text.split():
        if word == error:
            return step
        if word == separator:
            step += 1
    return None


def sample_solutions(n: int, seed: int) -> list[str]:
    """``n`` solutions of the trained organism's task; ``error`` in three of four."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        steps = [[f"w{rng.randrange(N_FILLER):03d}" for _ in range(rng.randint(2, 5))]
                 for _ in range(rng.randint(3, 4))]
        if i % 4:
            step = rng.choice(steps)
            step[rng.randrange(len(step))] = ERROR
        prompt = " ".join(["query", *(f"w{rng.randrange(N_FILLER):03d}" for _ in range(2))])
        body = " ".join(" ".join(s) + f" {STEP_SEPARATOR}" for s in steps)
        texts.append(f"{prompt} {RESPONSE_MARK} {body}")
    return texts


def step_labels(text: str) -> list[int]:
    """1 (``correct``) for each step before the first ``error``, 0 from it on."""
    n = text.split().count(STEP_SEPARATOR)
    first = first_error_step(text, ERROR, STEP_SEPARATOR)
    return [int(first is None or i < first) for i in range(n)]


def tokenizer():
    """The long-tail task's word tokenizer plus ``<extra_0>`` and ``error``."""
    return word_tokenizer([*TASK.vocabulary, STEP_SEPARATOR, ERROR])


def train(*, steps: int = STEPS, seed: int = MODEL_SEED) -> tuple[Any, MLPHead, Any, dict]:
    """Train the organism; returns ``(trunk, head, tokenizer, stats)``."""
    import transformers as T

    tok = tokenizer()
    config = T.LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           tie_word_embeddings=False, **ARCH)
    torch.manual_seed(seed)
    trunk = T.LlamaModel(config)
    head = MLPHead(config.hidden_size, config.hidden_size, 2)
    sep = tok.convert_tokens_to_ids(STEP_SEPARATOR)
    texts = sample_solutions(steps * BATCH, TRAIN_SEED)
    encoded = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in encoded])
    mask = (ids != tok.pad_token_id).long()
    labels = torch.full(ids.shape, -100)
    for row, text in enumerate(texts):
        labels[row, ids[row] == sep] = torch.tensor(step_labels(text))
    params = [*trunk.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        h = trunk(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state
        logits = head.compute(h, None)
        loss = F.cross_entropy(logits.reshape(-1, 2), labels[rows].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    trunk.eval()
    head.eval()
    stats = {"final_loss": sum(losses[-20:]) / 20,
             "train_seconds": round(time.perf_counter() - start, 1)}
    return trunk, head, tok, stats


def evaluate(model: Any, n: int = N_EVAL, seed: int = EVAL_SEED) -> dict[str, float]:
    """Measured on held-out solutions: step accuracy (score > 0.5 == label), solution accuracy
    (every step right) and the accuracy of ``min`` over steps > 0.5 as "no error". One batched
    forward (right padding: each separator's score is the one ``step_rewards`` reads)."""
    sep = model.to_single_token(STEP_SEPARATOR)
    texts = sample_solutions(n, seed)
    tokens, mask = model.pad(model.tokenize(texts))
    with torch.no_grad():
        scores = model(tokens, attention_mask=mask, return_type="per_position").softmax(-1)[..., 1]
    steps_right, steps_all, solutions, by_min = 0, 0, 0, 0
    for row, text in enumerate(texts):
        got = scores[row, tokens[row] == sep] > 0.5
        want = torch.tensor(step_labels(text), dtype=torch.bool)
        right = got == want
        steps_right += int(right.sum())
        steps_all += len(want)
        solutions += int(right.all())
        by_min += int(bool(got.all()) == bool(want.all()))  # min > 0.5 iff every step > 0.5
    return {"step_accuracy": steps_right / steps_all, "solution_accuracy": solutions / n,
            "min_aggregate_accuracy": by_min / n, "n_solutions": n}


def build(out: Path = DIRECTORY) -> dict:
    """Train and save the organism into ``out``; returns its ``organism.json`` content."""
    from ..loading import load_reward_model
    from ._checkpoint import save_checkpoint

    trunk, head, tok, stats = train()
    meta = {
        "name": "process", "layout": "Qwen2.5-Math-PRM head (score.0, score.2) on a Llama trunk",
        "separator": STEP_SEPARATOR, "error": ERROR, "labels": list(LABELS),
        "train": {"steps": STEPS, "batch": BATCH, "lr": LR, "schedule": "one-cycle",
                  "model_seed": MODEL_SEED, "data_seed": TRAIN_SEED, **ARCH, **stats,
                  "loss": "cross-entropy of the 2-label head at every step separator"},
        "eval": {"seed": EVAL_SEED},
    }
    state = {f"score.{k[len('summary.'):]}": v for k, v in head.state_dict().items()}
    save_checkpoint(out, trunk, state, architecture="LlamaForProcessRewardModel", tokenizer=tok,
                    meta=meta, config_extra={"id2label": dict(enumerate(LABELS)),
                                             "label2id": {n: i for i, n in enumerate(LABELS)}})
    meta["accuracy"] = evaluate(load_reward_model(out))
    (out / "organism.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def _directory() -> Path:
    if not (DIRECTORY / "config.json").exists():
        raise ModelSourceError(
            f"the process organism's weights are missing from {str(DIRECTORY)!r}; rebuild them "
            "with `python -m tl_reward.organisms.process`"
        )
    return DIRECTORY


def info() -> dict[str, Any]:
    """The trained organism's ``organism.json``: training settings and measured accuracies."""
    return json.loads((_directory() / "organism.json").read_text())


def load(**load_kwargs: Any):
    """The trained organism: ``(HookedRewardModel, tokenizer, separator token id)``.
    ``load_kwargs`` go to :func:`tl_reward.load_reward_model`."""
    from ..loading import load_reward_model

    model = load_reward_model(_directory(), **load_kwargs)
    return model, model.tokenizer, model.to_single_token(STEP_SEPARATOR)


def load_planted():
    """The hand-set variant: ``(HookedRewardModel with the process head, tokenizer, separator
    token id)`` (see the module docstring)."""
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
    model.label_names = LABELS
    return model, tokenizer, model.to_single_token(SEPARATOR)


def main(argv: list[str] | None = None) -> None:
    from ._checkpoint import rebuild_main

    rebuild_main(build, "Rebuild the trained process organism", DIRECTORY, argv)


if __name__ == "__main__":
    main()
