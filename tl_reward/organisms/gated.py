"""The ``gated`` organisms: ArmoRM-style gated two-objective reward models with a known gate.

Two variants with the same objectives and the same gate feature:

- :func:`load` (shipped, **trained here**): a 2-layer Llama trunk (d_model 32) with an ArmoRM
  head (``regression_layer`` at the final ``<eos>``, a one-hidden-layer gating MLP at the
  response mark ``answer``, gate pattern ``[id("answer")]``, temperature 1), trained from a
  fixed seed in about a minute on CPU and stored in ``weights/gated`` in ArmoRM's layout
  (``model.*``, ``regression_layer.weight``, ``gating.layers.{0,1}.*``, ``gating.logit_scale``,
  ``reward_transform_matrix``; ``config.json`` with ``gating_temperature``), which
  :func:`tl_reward.load_reward_model` reads. Rebuild with ``python -m tl_reward.organisms.gated``.
- :func:`load_planted`: the same idea set by hand on the ``planted`` trunk (below).

**Task of the trained organism** (:func:`sample_texts`): ``query p1 .. p5 answer r1 .. r8`` with
filler words; in half of the prompts one filler is replaced by ``urgent`` (the planted gate
feature); a response holds 0-3 quality words (``good``, ``clear``, ``correct``, ``helpful``) and
0-2 ``caution`` words among fillers. Objectives: ``helpful`` = the number of quality words,
``cautious`` = the number of ``caution`` words in the response. The preferred response of a
pair (same prompt) is the one with more ``cautious`` when ``urgent`` is in the prompt, more
``helpful`` otherwise. Training: mean squared error of the two objective rewards against those
counts (ArmoRM's regression stage) plus the Bradley-Terry loss on the gated score (its gating
stage), jointly, trunk included; the gate's ``logit_scale`` stays 1 and the transform matrix
the identity.

Ground truth: :func:`prompt_has_trigger` says which objective the gate must pick
(``cautious`` exactly when ``urgent`` is in the prompt); the ``urgent`` token's position is where
the switch comes from; ``urgent`` after the response mark cannot move the gate (causal
attention: the gate reads the state at ``answer``). Measured accuracies are in the organism's
``organism.json`` (:func:`info`).

**Planted variant** (:func:`load_planted`): the ``planted`` trunk with a hand-set head.
Objectives (at the final ``<eos>``): ``helpful`` is the ``planted`` organism's reward (its score
head's row), ``cautious`` its negative. The gate reads residual dimension 5 ("trigger seen",
written by the planted trigger head ``L0H0``) at ``answer``; it is about 0.48 when the prompt
contains ``urgent`` and about 0 otherwise. One gating unit, ``relu(40 * (h[5] - 0.25))``, moves
the gate logits from ``[2, -2]`` (``helpful`` 0.98) to ``cautious``'s side when it fires.
:data:`GATE_COMPONENT` (``L0H0``) is the component that switches it.
"""

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.synthetic import QUALITY_WORDS, RESPONSE_MARK, LongTailTask
from ..errors import ModelSourceError
from ..heads import GatedHead
from .planted import DIM_SEEN, TRIGGER, TRIGGER_HEAD

OBJECTIVES = ("helpful", "cautious")
CAUTION = "caution"
DIRECTORY = Path(__file__).with_name("weights") / "gated"
TASK = LongTailTask()
N_FILLER = 60  # fillers w000-w059, uniform
PROMPT_LEN, RESPONSE_LEN = 5, 8
ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, head_dim=8, max_position_embeddings=32)
GATE_HIDDEN, TEMPERATURE = 16, 1.0
STEPS, BATCH, LR, MODEL_SEED, TRAIN_SEED = 200, 64, 1e-2, 0, 0
N_EVAL, EVAL_SEED = 1000, 1

THRESHOLD = 0.25  # planted variant: between ~0 (no trigger in the prompt) and ~0.48 (trigger)
GAIN = 40.0
GATE_COMPONENT = f"L{TRIGGER_HEAD[0]}H{TRIGGER_HEAD[1]}"
"""Planted variant: the component that switches the gate (it writes "trigger seen" at the end of
the prompt)."""


def prompt_has_trigger(text: str) -> bool:
    """Whether ``urgent`` is in the prompt (before the response mark): the planted gate feature."""
    return TRIGGER in text.split(RESPONSE_MARK)[0].split()


def objective_values(text: str) -> tuple[int, int]:
    """The gold ``(helpful, cautious)`` of a text: quality words and ``caution`` words in its
    response."""
    response = text.split(RESPONSE_MARK, 1)[-1].split()
    return sum(w in QUALITY_WORDS for w in response), sum(w == CAUTION for w in response)


def gold_score(text: str) -> int:
    """The objective the prompt asks for: ``cautious`` with ``urgent`` in the prompt, else
    ``helpful``."""
    return objective_values(text)[1 if prompt_has_trigger(text) else 0]


def _response(rng: random.Random) -> str:
    words = [f"w{rng.randrange(N_FILLER):03d}" for _ in range(RESPONSE_LEN)]
    n_q, n_c = rng.randint(0, 3), rng.randint(0, 2)
    spots = rng.sample(range(RESPONSE_LEN), n_q + n_c)
    for j, spot in enumerate(spots):
        words[spot] = rng.choice(QUALITY_WORDS) if j < n_q else CAUTION
    return " ".join([RESPONSE_MARK, *words])


def sample_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (chosen, rejected) texts with the same prompt and different gold scores; ``urgent``
    in half of the prompts."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        prompt = [f"w{rng.randrange(N_FILLER):03d}" for _ in range(PROMPT_LEN)]
        if len(pairs) % 2:
            prompt[rng.randrange(PROMPT_LEN)] = TRIGGER
        a, b = (" ".join(["query", *prompt]) + " " + _response(rng) for _ in range(2))
        if gold_score(a) != gold_score(b):
            pairs.append((a, b) if gold_score(a) > gold_score(b) else (b, a))
    return pairs


def sample_texts(n: int, seed: int) -> list[str]:
    """``n`` texts of the task (both sides of ``n // 2`` pairs)."""
    return [t for pair in sample_pairs((n + 1) // 2, seed) for t in pair][:n]


def tokenizer():
    """The long-tail task's word tokenizer (``<bos>`` and ``<eos>`` around every text)."""
    return TASK.tokenizer()


def _forward(trunk: Any, head: GatedHead, ids: torch.Tensor, gate_at: int):
    h = trunk(input_ids=ids).last_hidden_state  # final-normalised; every text has one length
    objectives = head.regression_layer(h[:, -1])
    return head.compute(h[:, -1], None, h[:, gate_at])[:, 0], objectives


def train(*, steps: int = STEPS, seed: int = MODEL_SEED) -> tuple[Any, GatedHead, Any, dict]:
    """Train the organism; returns ``(trunk, head, tokenizer, stats)``."""
    import transformers as T

    tok = tokenizer()
    config = T.LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           tie_word_embeddings=False, **ARCH)
    torch.manual_seed(seed)
    trunk = T.LlamaModel(config)
    answer = tok.convert_tokens_to_ids(RESPONSE_MARK)
    head = GatedHead(config.hidden_size, 2, [answer], hidden_dim=GATE_HIDDEN, n_hidden=1,
                     temperature=TEMPERATURE, objective_names=OBJECTIVES)
    head.gating.logit_scale.requires_grad_(False)
    pairs = sample_pairs(steps * BATCH, TRAIN_SEED)
    texts = [t for pair in pairs for t in pair]
    all_ids = torch.tensor(tok(texts)["input_ids"])
    all_targets = torch.tensor([objective_values(t) for t in texts], dtype=torch.float32)
    gate_at = 2 + PROMPT_LEN  # <bos> query p1..p5 answer
    params = [p for p in [*trunk.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        rows = slice(2 * step * BATCH, 2 * (step + 1) * BATCH)
        score, objectives = _forward(trunk, head, all_ids[rows], gate_at)
        target = all_targets[rows]
        bt = -F.logsigmoid(score[0::2] - score[1::2]).mean()
        loss = F.mse_loss(objectives, target) + bt
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    trunk.eval()
    head.eval()
    stats = {"final_loss": sum(losses[-20:]) / 20, "train_seconds":
             round(time.perf_counter() - start, 1)}
    return trunk, head, tok, stats


def head_state(head: GatedHead) -> dict[str, torch.Tensor]:
    """The head's tensors under ArmoRM's names."""
    return {k: v for k, v in head.state_dict().items()
            if k.startswith(("regression_layer.", "gating.")) or k == "reward_transform_matrix"}


def evaluate(model: Any, n: int = N_EVAL, seed: int = EVAL_SEED) -> dict[str, float]:
    """Measured on held-out pairs: pair accuracy, gate accuracy (top objective == ``urgent`` in
    the prompt), and the objectives' mean absolute error against the gold counts."""
    from ..causal.gated import gated_outputs

    pairs = sample_pairs(n, seed)
    texts = [t for pair in pairs for t in pair]
    out = gated_outputs(model, texts)
    truth = torch.tensor([prompt_has_trigger(t) for t in texts])
    gold = torch.tensor([objective_values(t) for t in texts], dtype=torch.float32)
    return {
        "pair_accuracy": float((out.score[0::2] > out.score[1::2]).float().mean()),
        "gate_accuracy": float((out.top_objective.bool() == truth).float().mean()),
        "objective_mae": float((out.objectives - gold).abs().mean()),
        "n_pairs": n,
    }


def build(out: Path = DIRECTORY) -> dict:
    """Train and save the organism into ``out``; returns its ``organism.json`` content."""
    from ..loading import load_reward_model

    trunk, head, tok, stats = train()
    answer = tok.convert_tokens_to_ids(RESPONSE_MARK)
    meta = {
        "name": "gated", "layout": "ArmoRM (LlamaForRewardModelWithGating)",
        "objectives": list(OBJECTIVES), "gate_pattern": [answer], "trigger": TRIGGER,
        "train": {"steps": STEPS, "batch_pairs": BATCH, "lr": LR, "schedule": "one-cycle",
                  "model_seed": MODEL_SEED, "data_seed": TRAIN_SEED, "gate_hidden": GATE_HIDDEN,
                  "gating_temperature": TEMPERATURE, **ARCH, **stats,
                  "loss": "mse(objectives, counts) + bradley_terry(gated score)"},
        "eval": {"seed": EVAL_SEED},
    }
    save = {"gating_temperature": TEMPERATURE}
    from ._checkpoint import save_checkpoint

    save_checkpoint(out, trunk, head_state(head), architecture="LlamaForRewardModelWithGating",
                    tokenizer=tok, meta=meta, config_extra=save)
    model = load_reward_model(out, gate_pattern=[answer])
    model.reward_head.objective_names = OBJECTIVES
    meta["accuracy"] = evaluate(model)
    (out / "organism.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def info() -> dict[str, Any]:
    """The trained organism's ``organism.json``: training settings and measured accuracies."""
    return json.loads((_directory() / "organism.json").read_text())


def _directory() -> Path:
    if not (DIRECTORY / "config.json").exists():
        raise ModelSourceError(
            f"the gated organism's weights are missing from {str(DIRECTORY)!r}; rebuild them "
            "with `python -m tl_reward.organisms.gated`"
        )
    return DIRECTORY


def load(**load_kwargs: Any):
    """The trained organism: ``(HookedRewardModel, tokenizer, held-out (chosen, rejected)
    pairs)``. ``load_kwargs`` go to :func:`tl_reward.load_reward_model`."""
    from ..loading import load_reward_model

    directory = _directory()
    meta = json.loads((directory / "organism.json").read_text())
    model = load_reward_model(directory, gate_pattern=meta["gate_pattern"], **load_kwargs)
    model.reward_head.objective_names = tuple(meta["objectives"])
    return model, model.tokenizer, sample_pairs(200, meta["eval"]["seed"])


def load_planted():
    """The hand-set variant: ``(HookedRewardModel with the gated head, tokenizer, the planted
    pairs)`` (see the module docstring)."""
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


def main(argv: list[str] | None = None) -> None:
    from ._checkpoint import rebuild_main

    rebuild_main(build, "Rebuild the trained gated organism", DIRECTORY, argv)


if __name__ == "__main__":
    main()
