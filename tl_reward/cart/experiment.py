"""The first empirical test of CART: long-tail robustness and best-of-n over-optimisation.

:func:`train_methods` trains, for one ``(alpha, seed)`` of the long-tail task
(:class:`~tl_reward.data.LongTailTask`), a base reward model with plain ERM, runs CART's circuit
discovery on it (:func:`tl_reward.cart.discover`), then fine-tunes a copy of the base with each
method for the same number of steps from the same starting point:

- baselines: ``erm`` (more ERM), ``upweight`` (tail importance weights), ``label_smoothing``,
  ``hidden_reg`` (hidden-state regulariser);
- CART: ``cart_reg`` (eq. (12)), ``cart_prog`` (eq. (13)), ``cart_aug`` (eqs. (10)-(11)),
  ``cart_full`` (eq. (16), all three), and the ablation ``aug_random`` (eq. (11) on randomly picked
  variants of the same transformations: augmentation without circuit guidance).

Both augmentation methods use the task's gold reward as the labeller: they see labels that the
other methods do not, which is why ``aug_random`` is the control for ``cart_aug``.

:func:`evaluate` measures head and tail pairwise accuracy and tail calibration on held-out,
noise-free pairs; :func:`ensemble_results` builds the ``cart_ensemble`` (eq. (15) weights fitted on
the training tail pairs) and the ``uniform_ensemble`` over the same members; :func:`best_of_n`
computes the Goodhart curve of a model against the gold reward.
"""

import copy
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..data.pairs import PreferenceDataset
from ..data.synthetic import KEY_WORDS, LongTailTask
from ..errors import InvalidInputError
from ..training import TrainConfig, pair_margins, train_reward_model
from .discovery import discover
from .training import (
    HiddenStateLoss,
    SpanDeletion,
    SpanInsertion,
    TokenSubstitution,
    cart_objective,
    circuit_guided_augmentation,
    ensemble_rewards,
    fit_ensemble_weights,
    tail_upweights,
)

logger = logging.getLogger(__name__)

BASELINES = ("erm", "upweight", "label_smoothing", "hidden_reg")
CART_METHODS = ("cart_reg", "cart_prog", "cart_aug", "aug_random", "cart_full")
METHODS = BASELINES + CART_METHODS
ENSEMBLES = ("uniform_ensemble", "cart_ensemble")


@dataclass(frozen=True)
class ExperimentSettings:
    """Every knob of the experiment (the defaults are the benchmark's)."""

    n_train: int = 8000
    n_eval: int = 1000
    task: LongTailTask = LongTailTask(alpha=0.99, n_tail=3, tail_zipf=1.0, noise=0.05)
    hidden_size: int = 64
    n_layers: int = 2
    pretrain: TrainConfig = TrainConfig(steps=200, batch_size=64, lr=3e-3, warmup_steps=20,
                                        progress=False)
    finetune: TrainConfig = TrainConfig(steps=60, batch_size=64, lr=1e-3, warmup_steps=5,
                                        progress=False)
    label_smoothing: float = 0.1
    hidden_lambda: float = 0.01
    circuit_lambda: float = 0.1
    eta: float = 0.02
    aug_weight: float = 0.1
    n_variants: int = 8
    term_batch: int = 16
    discovery_top_k: int = 12
    n_head_texts: int = 2000


@dataclass
class MethodRun:
    """One fine-tuned model and what it cost."""

    model: Any
    seconds: float
    extra_seconds: float = 0.0  # discovery / augmentation, for the methods that need them


@dataclass
class TrainedMethods:
    """The models of one ``(alpha, seed)``: base, one per method, the circuits CART used."""

    alpha: float
    seed: int
    task: LongTailTask
    train: PreferenceDataset
    base: Any
    base_seconds: float
    circuits: tuple
    discovery_seconds: float
    runs: dict[str, MethodRun] = field(default_factory=dict)


def _base_model(task: LongTailTask, settings: ExperimentSettings, seed: int):
    import transformers as T

    from ..loading import load_reward_model

    tok = task.tokenizer()
    vocab = tok.get_vocab()
    d = settings.hidden_size
    config = T.LlamaConfig(
        vocab_size=len(vocab), hidden_size=d, intermediate_size=2 * d,
        num_hidden_layers=settings.n_layers, num_attention_heads=4, num_key_value_heads=4,
        head_dim=d // 4, max_position_embeddings=64, num_labels=1, tie_word_embeddings=False,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
    )
    torch.manual_seed(seed)
    return load_reward_model(T.LlamaForSequenceClassification(config), tok)


def train_methods(alpha: float, seed: int, settings: ExperimentSettings = ExperimentSettings(),
                  methods: tuple[str, ...] = METHODS) -> TrainedMethods:
    """Base ERM model, CART discovery on it, and one fine-tuned copy per method."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidInputError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    task = replace(settings.task, alpha=alpha)
    train = task.sample(settings.n_train, seed=seed)
    if not any(train.is_tail):
        raise InvalidInputError(
            f"alpha={alpha} with n_train={settings.n_train} drew no tail pair; lower alpha or "
            "raise n_train"
        )
    base = _base_model(task, settings, seed)
    start = time.perf_counter()
    train_reward_model(base, train, config=replace(settings.pretrain, seed=seed))
    base_seconds = time.perf_counter() - start

    tail_pairs = train.tail()
    tail_texts = tail_pairs.chosen_texts + tail_pairs.rejected_texts
    head_pairs = train.head().sample(max(1, settings.n_head_texts // 2), seed=seed)
    head_texts = head_pairs.chosen_texts + head_pairs.rejected_texts
    start = time.perf_counter()
    found = discover(base, tail_texts, head_texts, top_k=settings.discovery_top_k,
                     progress=False, seed=seed)
    v = found.validation
    kept = tuple(c for c, k in zip(v.circuits, v.kept, strict=True) if k) or tuple(v.circuits)
    discovery_seconds = time.perf_counter() - start
    out = TrainedMethods(alpha=alpha, seed=seed, task=task, train=train, base=base,
                         base_seconds=base_seconds, circuits=kept,
                         discovery_seconds=discovery_seconds)

    is_tail = torch.tensor(train.is_tail)
    vocab = tuple(task.vocabulary[4:])  # no special tokens
    transforms = (TokenSubstitution(vocab, n=2), SpanInsertion(vocab), SpanDeletion())
    augmented = {}
    for selection in ("circuit", "random"):
        if (selection == "circuit" and {"cart_aug", "cart_full"} & set(methods)) or (
            selection == "random" and "aug_random" in methods
        ):
            start = time.perf_counter()
            augmented[selection] = circuit_guided_augmentation(
                base, kept, tail_texts, transforms, task.gold_rewards,
                n_variants=settings.n_variants, selection=selection, seed=seed)
            augmented[selection + "_seconds"] = time.perf_counter() - start

    for method in methods:
        model = copy.deepcopy(base)
        config = replace(settings.finetune, seed=seed + 1)
        weights, terms, extra = None, {}, 0.0
        kw = dict(circuits=kept, tail_texts=tail_texts, batch_size=settings.term_batch, seed=seed)
        if method == "upweight":
            weights = tail_upweights(is_tail)
        elif method == "label_smoothing":
            config = replace(config, label_smoothing=settings.label_smoothing)
        elif method == "hidden_reg":
            terms = {"hidden": HiddenStateLoss(settings.hidden_lambda)}
        elif method == "cart_reg":
            weights, terms = cart_objective(model, is_tail, circuit_lambda=settings.circuit_lambda, **kw)
        elif method == "cart_prog":
            weights, terms = cart_objective(model, is_tail, eta=settings.eta, **kw)
        elif method in ("cart_aug", "aug_random"):
            sel = "circuit" if method == "cart_aug" else "random"
            weights, terms = cart_objective(model, is_tail, augmented=augmented[sel],
                                            aug_weight=settings.aug_weight, **kw)
            extra = augmented[sel + "_seconds"]
        elif method == "cart_full":
            weights, terms = cart_objective(
                model, is_tail, circuit_lambda=settings.circuit_lambda, eta=settings.eta,
                augmented=augmented["circuit"], aug_weight=settings.aug_weight, **kw)
            extra = augmented["circuit_seconds"]
        if method.startswith("cart"):
            extra += discovery_seconds
        start = time.perf_counter()
        train_reward_model(model, train, config=config, sample_weights=weights, extra_losses=terms)
        out.runs[method] = MethodRun(model=model, seconds=time.perf_counter() - start,
                                     extra_seconds=extra)
    return out


# ------------------------------------------------------------------------------- evaluation
def tail_calibration(margins: Float[Tensor, "pair"], n_bins: int = 10) -> dict[str, float]:
    """Calibration of ``P(chosen wins) = sigmoid(margin)`` on pairs whose chosen side truly wins,
    symmetrised (each pair counted in both orientations, labels 1 and 0): Brier score and the
    expected calibration error over ``n_bins`` equal-width bins."""
    p = torch.sigmoid(margins.double())
    probs = torch.cat([p, 1 - p])
    labels = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    brier = float(((probs - labels) ** 2).mean())
    bins = torch.clamp((probs * n_bins).long(), max=n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if bool(sel.any()):
            ece += float(sel.double().mean()) * abs(float(probs[sel].mean() - labels[sel].mean()))
    return {"tail_brier": brier, "tail_ece": ece}


def evaluate_margins(margins: Float[Tensor, "pair"], is_tail: Tensor) -> dict[str, float]:
    """Head and tail pairwise accuracy and tail calibration of held-out margins."""
    correct = (margins > 0).float()
    return {"head_acc": float(correct[~is_tail].mean()), "tail_acc": float(correct[is_tail].mean()),
            **tail_calibration(margins[is_tail])}


def eval_set(task: LongTailTask, settings: ExperimentSettings, seed: int) -> PreferenceDataset:
    """Held-out, noise-free evaluation pairs, half of them tail pairs."""
    return task.sample(settings.n_eval, seed=10_000 + seed, alpha=0.5, noise=0.0)


def ensemble_margins(trained: TrainedMethods, evalset: PreferenceDataset,
                     members: tuple[str, ...] = METHODS,
                     member_margins: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Eval margins of the ``uniform_ensemble`` and the ``cart_ensemble`` (eq. (15) weights fitted
    on the training tail pairs' margins against their gold margins) over ``members``.
    ``member_margins``: the members' margins on ``evalset`` when already computed."""
    tail = trained.train.tail()
    fit = torch.stack([pair_margins(trained.runs[m].model, tail, progress=False) for m in members])
    gold = trained.task.gold_rewards(tail.chosen_texts) - trained.task.gold_rewards(tail.rejected_texts)
    alpha = fit_ensemble_weights(fit, gold.float())
    member_margins = member_margins or {}
    ev = torch.stack([member_margins[m] if m in member_margins
                      else pair_margins(trained.runs[m].model, evalset, progress=False)
                      for m in members])
    uniform = torch.full((len(members),), 1.0 / len(members))
    return {"uniform_ensemble": ensemble_rewards(ev, uniform),
            "cart_ensemble": ensemble_rewards(ev, alpha), "weights": alpha}


def evaluate(trained: TrainedMethods, settings: ExperimentSettings) -> list[dict[str, Any]]:
    """One row per method (and per ensemble): accuracies, calibration, compute."""
    evalset = eval_set(trained.task, settings, trained.seed)
    is_tail = torch.tensor(evalset.is_tail)
    rows = []
    base = {"alpha": trained.alpha, "seed": trained.seed, "n_circuits": len(trained.circuits)}
    margins = {}
    for method, run in trained.runs.items():
        m = margins[method] = pair_margins(run.model, evalset, progress=False)
        rows.append({**base, "method": method, **evaluate_margins(m, is_tail),
                     "train_seconds": run.seconds, "extra_seconds": run.extra_seconds})
    if set(METHODS) <= set(trained.runs):
        ens = ensemble_margins(trained, evalset, member_margins=margins)
        seconds = sum(r.seconds for r in trained.runs.values())
        extra = max(r.extra_seconds for r in trained.runs.values())
        for name in ENSEMBLES:
            rows.append({**base, "method": name, **evaluate_margins(ens[name], is_tail),
                         "train_seconds": seconds, "extra_seconds": extra})
    return rows


# ------------------------------------------------------------------------------- best-of-n
@dataclass(frozen=True)
class BestOfN:
    """Expected gold reward, proxy reward (z-scored per prompt) and fraction of responses that use
    a tail key word, of the best-of-n response, per ``n`` and prompt kind (``head`` / ``tail``)."""

    ns: tuple[int, ...]
    gold: dict[str, Tensor]
    proxy: dict[str, Tensor]
    key_word_fraction: dict[str, Tensor]


def _best_of_n_weights(n_samples: int, ns: tuple[int, ...]) -> Float[Tensor, "n sample"]:
    """``P(the i-th smallest of N samples is the max of a random n-subset) = C(i-1, n-1) / C(N, n)``
    (the unbiased best-of-n estimator from ``N`` samples)."""
    i = torch.arange(1, n_samples + 1, dtype=torch.float64)
    rows = []
    for n in ns:
        log_w = (torch.lgamma(i) - torch.lgamma(torch.tensor(float(n))) - torch.lgamma(i - n + 1)
                 - (math.lgamma(n_samples + 1) - math.lgamma(n + 1) - math.lgamma(n_samples - n + 1)))
        rows.append(torch.where(i >= n, log_w.exp(), torch.zeros_like(i)))
    return torch.stack(rows)


@torch.no_grad()
def best_of_n(model: Any, task: LongTailTask, prompts: list[str], *, n_samples: int = 256,
              ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256), seed: int = 0,
              batch_size: int = 512) -> BestOfN:
    """Best-of-n against ``model`` with the task's gold reward as ground truth: for each prompt,
    ``n_samples`` responses from :meth:`LongTailTask.sample_responses`, ranked by the model's
    reward; the expectation over random n-subsets is exact (:func:`_best_of_n_weights`)."""
    if max(ns) > n_samples or min(ns) < 1:
        raise InvalidInputError(f"every n must be in [1, n_samples={n_samples}], got {ns}")
    weights = _best_of_n_weights(n_samples, ns)
    key_words = set(KEY_WORDS[: task.n_tail])
    sums: dict[str, list[Tensor]] = {}
    for j, prompt in enumerate(prompts):
        responses = task.sample_responses(n_samples, seed=seed * 100_003 + j)
        texts = [prompt + " " + r for r in responses]
        proxy = torch.cat([model.score(texts[s:s + batch_size], batch_size=batch_size, progress=False)
                           for s in range(0, len(texts), batch_size)]).double().cpu()
        gold = task.gold_rewards(texts).double()
        keys = torch.tensor([bool(key_words & set(r.split())) for r in responses], dtype=torch.float64)
        order = proxy.argsort()
        z = (proxy - proxy.mean()) / proxy.std().clamp_min(1e-12)
        kind = "head" if task.scenario_of(texts[0]) == "head" else "tail"
        sums.setdefault(kind, []).append(torch.stack([weights @ gold[order], weights @ z[order],
                                                      weights @ keys[order]]))
    out = {k: torch.stack(v).mean(0) for k, v in sums.items()}
    return BestOfN(ns=tuple(ns), gold={k: v[0] for k, v in out.items()},
                   proxy={k: v[1] for k, v in out.items()},
                   key_word_fraction={k: v[2] for k, v in out.items()})


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval over seeds (``(mean, nan, nan)`` for one value)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    lo, hi = stats.t.interval(confidence, len(x) - 1, loc=m, scale=stats.sem(x))
    if not np.isfinite(lo):  # zero spread
        lo = hi = m
    return m, float(lo), float(hi)


__all__ = [
    "BASELINES", "CART_METHODS", "ENSEMBLES", "METHODS", "BestOfN", "ExperimentSettings",
    "TrainedMethods", "best_of_n", "ensemble_margins", "eval_set", "evaluate", "evaluate_margins",
    "mean_ci", "tail_calibration", "train_methods",
]
