"""Train reward models on preference pairs: Bradley-Terry loss, optional MSE to gold rewards.

Works on a :class:`~tl_reward.HookedRewardModel` and on an HF ``*ForSequenceClassification``
model alike, on CPU, seeded. Built to be extended (CART training builds on it):

- ``sample_weights``: one weight per pair, multiplying its loss terms;
- ``extra_losses``: named callables ``term(batch: TrainBatch) -> scalar tensor`` added to the
  loss at every step, with the rewards, tokens and pair indices of the batch in hand. A term with
  a ``hooks`` attribute (TransformerLens hook names) finds those activations of the training
  forward, with their graph, in ``batch.activations`` (HookedRewardModel only).

The loss at a step is ``bradley_terry_loss(margins, w) + mse_weight * weighted MSE(rewards, gold)
+ sum(extra_losses)``.
"""

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from .data.pairs import load_pairs
from .errors import InvalidInputError, ObjectiveError
from .model import HookedRewardModel
from .texts import right_pad

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`train_reward_model`.

    AdamW with linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr``;
    ``steps`` optimizer steps of ``batch_size`` pairs (epochs reshuffle, seeded).
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float | None = 1.0
    mse_weight: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise InvalidInputError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 0.5:
            raise InvalidInputError(
                f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.mse_weight < 0:
            raise InvalidInputError(f"mse_weight must be >= 0, got {self.mse_weight}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise InvalidInputError(
                f"need warmup_steps >= 0 and min_lr_ratio in [0, 1], got {self.warmup_steps}, "
                f"{self.min_lr_ratio}"
            )


@dataclass(frozen=True)
class TrainBatch:
    """What an extra loss term sees at one step.

    ``chosen``/``rejected`` rewards keep their graph; ``tokens``/``mask`` hold the chosen rows
    first, then the rejected rows (``2 * pair`` rows).
    """

    model: Any
    step: int
    pair_index: Int[Tensor, "pair"]
    chosen: Float[Tensor, "pair"]
    rejected: Float[Tensor, "pair"]
    weights: Float[Tensor, "pair"]
    tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]
    activations: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def margins(self) -> Float[Tensor, "pair"]:
        return self.chosen - self.rejected


LossTerm = Callable[[TrainBatch], Tensor]
"""An extra loss term: ``term(batch) -> scalar tensor`` added to the loss."""


@dataclass(frozen=True)
class TrainResult:
    """The loss curves of a training run.

    ``losses`` is the total loss per step; ``terms`` maps each part (``"bt"``, ``"mse"`` and each
    extra term) to its value per step.
    """

    losses: Float[Tensor, "step"]
    terms: Mapping[str, Tensor] = field(default_factory=dict)
    wall_seconds: float = 0.0
    config: TrainConfig = field(default_factory=TrainConfig)

    def to_dataframe(self):
        import pandas as pd

        cols = {"step": range(len(self.losses)), "loss": self.losses.numpy()}
        cols.update({k: v.numpy() for k, v in self.terms.items()})
        return pd.DataFrame(cols)

    def plot(self, title: str | None = None):
        """Loss curves against step (plotly figure)."""
        import plotly.express as px

        df = self.to_dataframe().melt(id_vars="step", var_name="term", value_name="value")
        return px.line(df, x="step", y="value", color="term", title=title or "Training loss")


def bradley_terry_loss(
    margins: Float[Tensor, "pair"], weights: Float[Tensor, "pair"] | None = None,
    smoothing: float = 0.0,
) -> Float[Tensor, ""]:
    """``-log sigmoid(r_chosen - r_rejected)``, averaged with ``weights`` (sum-normalised).

    With ``smoothing = e`` the label is soft: ``-(1 - e) log sigmoid(m) - e log sigmoid(-m)``.
    """
    loss = -F.logsigmoid(margins)
    if smoothing:
        loss = (1 - smoothing) * loss - smoothing * F.logsigmoid(-margins)
    if weights is None:
        return loss.mean()
    return (loss * weights).sum() / weights.sum().clamp_min(1e-12)


# ---------------------------------------------------------------------------- model access
def encode(model: Any, texts: Sequence[Any], tokenizer: Any = None) -> list[list[int]]:
    """Token ids of each text (special tokens included; chats through the chat template)."""
    if isinstance(model, HookedRewardModel) and tokenizer is None:
        return model.tokenize(texts)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InvalidInputError("this model has no tokenizer: pass tokenizer=")
    ids = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            ids.append(list(tokenizer(text)["input_ids"]))
        else:
            rendered = tokenizer.apply_chat_template(list(text), tokenize=False)
            ids.append(list(tokenizer(rendered, add_special_tokens=False)["input_ids"]))
        if not ids[-1]:
            raise InvalidInputError(f"text {i} tokenizes to no tokens")
    return ids


def _pad_id(model: Any, tokenizer: Any) -> int:
    pad = getattr(model, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    return 0 if pad is None else int(pad)


def rewards_of(model: Any, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"],
               capture: dict[str, Any] | None = None) -> Float[Tensor, "batch"]:
    """Scalar reward of each row, from a HookedRewardModel or an HF reward model.

    ``capture`` (HookedRewardModel only): a dict whose keys are hook names; the forward fills in
    their activations, graph kept.
    """
    if isinstance(model, HookedRewardModel):
        def store(act, hook):
            capture[hook.name] = act

        hooks = [(name, store) for name in capture] if capture else []
        out = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
        if out.ndim != 1:
            raise ObjectiveError(
                "training needs a scalar reward; choose an objective with model.set_objective()"
            )
        return out
    logits = model(input_ids=tokens, attention_mask=mask).logits
    if logits.shape[-1] != 1:
        raise ObjectiveError(
            f"training needs a scalar reward; this HF model has {logits.shape[-1]} outputs"
        )
    return logits[:, 0]


def _device(model: Any):
    return next(model.parameters()).device


@torch.no_grad()
def pair_margins(
    model: Any,
    data: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 128,
    progress: bool = True,
) -> Float[Tensor, "pair"]:
    """Reward margin (chosen - rejected) of every pair, for either kind of model."""
    from tqdm.auto import tqdm

    data = load_pairs(data)
    chosen = encode(model, data.chosen_texts, tokenizer)
    rejected = encode(model, data.rejected_texts, tokenizer)
    pad_id, device = _pad_id(model, tokenizer), _device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, len(data), batch_size), desc="margins", disable=not progress,
                          leave=False):
            rows = chosen[start : start + batch_size] + rejected[start : start + batch_size]
            tokens, mask = right_pad(rows, pad_id, device)
            r = rewards_of(model, tokens, mask).float().cpu()
            n = len(r) // 2
            out.append(r[:n] - r[n:])
    finally:
        model.train(was_training)
    return torch.cat(out)


def pairwise_accuracy(model: Any, data: Any, *, tokenizer: Any = None, batch_size: int = 128,
                      progress: bool = True) -> float:
    """Fraction of pairs whose chosen response gets the higher reward."""
    margins = pair_margins(model, data, tokenizer=tokenizer, batch_size=batch_size,
                           progress=progress)
    return float((margins > 0).float().mean())


# ---------------------------------------------------------------------------- training
def train_reward_model(
    model: Any,
    data: Any,
    *,
    tokenizer: Any = None,
    config: TrainConfig | None = None,
    gold: Callable[[Sequence[Any]], Tensor] | None = None,
    sample_weights: Float[Tensor, "pair"] | Sequence[float | int] | None = None,
    extra_losses: Mapping[str, LossTerm] | None = None,
) -> TrainResult:
    """Train ``model`` in place on preference pairs.

    Args:
        model: a :class:`HookedRewardModel` or an HF ``*ForSequenceClassification`` model with
            one output.
        data: a :class:`~tl_reward.data.PreferenceDataset` or anything
            :func:`~tl_reward.data.load_pairs` reads.
        tokenizer: needed for an HF model (a HookedRewardModel uses its own).
        config: :class:`TrainConfig` (steps, batch size, learning rate, seed, ...).
        gold: ``gold(texts) -> [n]`` true rewards, used by the MSE term when
            ``config.mse_weight > 0`` (e.g. ``LongTailTask.gold_rewards``).
        sample_weights: one non-negative weight per pair for every built-in loss term.
        extra_losses: named extra terms ``term(batch) -> scalar`` added to the loss.

    The run is deterministic given ``config.seed`` and the model's initial weights.
    """
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    data = load_pairs(data)
    n = len(data)
    extra_losses = dict(extra_losses or {})
    for name, term in extra_losses.items():
        if not callable(term):
            raise InvalidInputError(f"extra loss {name!r} is not callable: {term!r}")
        if name in ("bt", "mse", "loss"):
            raise InvalidInputError(f"extra loss name {name!r} is reserved; choose another")
    if sample_weights is None:
        weights = torch.ones(n)
    else:
        weights = torch.as_tensor(sample_weights, dtype=torch.float32).flatten()
        if weights.shape != (n,):
            raise InvalidInputError(
                f"sample_weights has {weights.numel()} entries for {n} pairs; give one per pair"
            )
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            bad = int(torch.nonzero(~torch.isfinite(weights) | (weights < 0))[0])
            raise InvalidInputError(
                f"sample_weights must be finite and >= 0; pair {bad} has {float(weights[bad])}"
            )
    hooks = sorted({h for term in extra_losses.values() for h in getattr(term, "hooks", ())})
    if hooks and not isinstance(model, HookedRewardModel):
        raise InvalidInputError(
            f"extra losses read hooks {hooks}: train a HookedRewardModel (tl_reward.load_reward_model)"
        )
    if config.mse_weight > 0 and gold is None:
        raise InvalidInputError("mse_weight > 0 needs gold= (a function texts -> true rewards)")

    chosen_ids = encode(model, data.chosen_texts, tokenizer)
    rejected_ids = encode(model, data.rejected_texts, tokenizer)
    if config.mse_weight > 0:
        gold_c = torch.as_tensor(gold(data.chosen_texts), dtype=torch.float32)
        gold_r = torch.as_tensor(gold(data.rejected_texts), dtype=torch.float32)
        if gold_c.shape != (n,) or gold_r.shape != (n,):
            raise InvalidInputError(
                f"gold() must return one reward per text ({n}), got {tuple(gold_c.shape)}"
            )
    pad_id, device = _pad_id(model, tokenizer), _device(model)

    gen = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        span = max(config.steps - config.warmup_steps, 1)
        progress = (step - config.warmup_steps) / span
        cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cos)

    names = ["bt", *(["mse"] if config.mse_weight > 0 else []), *extra_losses]
    history = {k: [] for k in names}
    totals = []
    was_training = model.training
    model.train()
    order = torch.randperm(n, generator=gen)
    cursor = 0
    start_time = time.perf_counter()
    bar = tqdm(range(config.steps), desc="training", disable=not config.progress, leave=False)
    try:
        for step in bar:
            if cursor + config.batch_size > n and cursor > 0:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor : cursor + config.batch_size]
            cursor += config.batch_size
            rows = [chosen_ids[i] for i in idx.tolist()] + [rejected_ids[i] for i in idx.tolist()]
            tokens, mask = right_pad(rows, pad_id, device)
            acts = dict.fromkeys(hooks)
            rewards = rewards_of(model, tokens, mask, acts).float()
            k = len(idx)
            r_c, r_r = rewards[:k], rewards[k:]
            w = weights[idx].to(rewards.device)
            parts = {"bt": bradley_terry_loss(r_c - r_r, w, config.label_smoothing)}
            if config.mse_weight > 0:
                target = torch.cat([gold_c[idx], gold_r[idx]]).to(rewards.device)
                err = (rewards - target) ** 2
                ww = torch.cat([w, w])
                parts["mse"] = (err * ww).sum() / ww.sum().clamp_min(1e-12)
            if extra_losses:
                batch = TrainBatch(model=model, step=step, pair_index=idx, chosen=r_c,
                                   rejected=r_r, weights=w, tokens=tokens, mask=mask,
                                   activations=acts)
                for name, term in extra_losses.items():
                    value = term(batch)
                    if not isinstance(value, Tensor) or value.numel() != 1:
                        raise InvalidInputError(
                            f"extra loss {name!r} must return a scalar tensor, got {value!r}"
                        )
                    parts[name] = value.reshape(())
            loss = parts["bt"]
            if "mse" in parts:
                loss = loss + config.mse_weight * parts["mse"]
            for name in extra_losses:
                loss = loss + parts[name]
            if not bool(torch.isfinite(loss)):
                raise InvalidInputError(
                    f"the loss became {float(loss)} at step {step}; lower the learning rate"
                )
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            totals.append(float(loss.detach()))
            for name in names:
                history[name].append(float(parts[name].detach()))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{totals[-1]:.4f}")
    finally:
        model.train(was_training)
    wall = time.perf_counter() - start_time
    logger.info("trained %d steps in %.1f s, final loss %.4f", config.steps, wall, totals[-1])
    return TrainResult(
        losses=torch.tensor(totals),
        terms={k: torch.tensor(v) for k, v in history.items()},
        wall_seconds=wall,
        config=config,
    )
