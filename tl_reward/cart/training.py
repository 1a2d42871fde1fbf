"""CART's training interventions (arXiv 2509.24713, section 3.5, eqs. (10)-(16)) and the baselines
the paper positions CART against, as plug-ins of :func:`tl_reward.training.train_reward_model`.

Each intervention is a loss term (``term(batch) -> scalar``, see :class:`~tl_reward.training.
TrainBatch`) or a set of per-pair weights, so every term can be switched on and off:

- eq. (10)-(11) circuit-guided augmentation: :func:`circuit_guided_augmentation` picks, among
  variants ``x' ~ G(x)`` of tail inputs, the one that maximises the vulnerable circuits' summed
  activation; :class:`AugmentationLoss` is the MSE of the model's reward on those inputs to the
  labeller's targets.
- eq. (12) circuit regularisation: :class:`CircuitVarianceLoss`, ``lambda * sum_c Var_tail[a_c]``
  on a batch of tail inputs drawn at every step, read through hooks (differentiable).
- eq. (13) progressive strengthening: :func:`curriculum_weight` and :class:`ProgressiveLoss`.
- eqs. (14)-(15) circuit-aware ensembling: :func:`fit_ensemble_weights` (simplex-constrained
  least squares, SLSQP, checked; or the paper's constraint alone in closed form) and
  :func:`ensemble_rewards`.
- eq. (16) the combined objective: :func:`cart_objective`.

Where this departs from the paper, and why:

- ``L_head`` and ``L_prog`` use the Bradley-Terry pairwise loss, not the squared error to a target
  reward of eqs. (13) and (16): preference data give a winner per pair, not a target reward, and
  Bradley-Terry is how reward models are trained on it. ``L_aug`` (eq. (11)) keeps the squared error
  because augmented inputs get a target reward from the labeller (the gold reward on organisms).
- Eq. (13) as written gives weight 0 to head examples; they are covered by ``L_head`` in eq. (16),
  so :func:`cart_objective` gives tail pairs weight 0 in ``L_head`` and weight ``w_t`` in ``L_prog``.
- Eq. (10)'s ``argmax`` is over a finite set of ``n_variants`` sampled variants.
- Eq. (15) constrains only ``sum_k alpha_k = 1``; :func:`fit_ensemble_weights` also asks
  ``alpha_k >= 0`` by default (``nonnegative=False`` is the paper's constraint alone). Negative
  weights short one member against another: fitted on the few tail examples eq. (15) uses, they
  extrapolate beyond every member (the ensemble's reward can leave the range of its members'
  rewards on an input) and overfit the tail; a convex mixture stays within that range.

Baselines on the same trainer: plain ERM (no term), tail upweighting (:func:`tail_upweights`),
label smoothing (``TrainConfig(label_smoothing=...)``), a hidden-state regulariser
(:class:`HiddenStateLoss`) and a uniform ensemble (:func:`ensemble_rewards` with equal weights).
"""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Bool, Float, jaxtyped
from torch import Tensor

from ..errors import InvalidInputError
from ..model import HookedRewardModel
from ..training import TrainBatch
from .units import Circuit, circuit_activations

Labeller = Callable[[Sequence[str]], Tensor]


# ------------------------------------------------------------------------------- eq. (13)
@jaxtyped(typechecker=beartype)
def curriculum_weight(step: int, is_tail: Bool[Tensor, "pair"], eta: float) -> Float[Tensor, "pair"]:
    """Eq. (13): ``w_t(x) = min(1, eta * t * 1[x in tail])`` at training step ``t``."""
    if eta < 0 or step < 0:
        raise InvalidInputError(f"need eta >= 0 and step >= 0, got eta={eta}, step={step}")
    return torch.clamp(eta * step * is_tail.float(), max=1.0)


class ProgressiveLoss:
    """Eq. (13) in Bradley-Terry form: ``(1/N) sum_i w_t(x_i) * -log sigmoid(margin_i)`` over the
    batch's ``N`` pairs, ``w_t`` from :func:`curriculum_weight` (zero on head pairs)."""

    def __init__(self, is_tail: Sequence[bool] | Tensor, eta: float) -> None:
        if eta <= 0:
            raise InvalidInputError(f"eta must be > 0, got {eta}")
        self.is_tail = torch.as_tensor(is_tail, dtype=torch.bool)
        self.eta = eta

    def __call__(self, batch: TrainBatch) -> Tensor:
        w = curriculum_weight(batch.step, self.is_tail[batch.pair_index.cpu()], self.eta)
        return (w.to(batch.margins.device) * -F.logsigmoid(batch.margins)).mean()


# ------------------------------------------------------------------------------- eq. (12)
def _tokens(model: HookedRewardModel, texts: Sequence[Any]) -> list[list[int]]:
    if not isinstance(model, HookedRewardModel):
        raise InvalidInputError(
            f"circuit terms read hooks: pass a HookedRewardModel, got {type(model).__name__}"
        )
    if len(texts) == 0:
        raise InvalidInputError("no texts given")
    return model.tokenize(list(texts))


class _Pool:
    """Token ids of a fixed set of texts and a seeded sampler of batches of them."""

    def __init__(self, model: HookedRewardModel, texts: Sequence[Any], batch_size: int, seed: int):
        if batch_size < 2:
            raise InvalidInputError(f"batch_size must be >= 2, got {batch_size}")
        self.model = model
        self.ids = _tokens(model, texts)
        self.batch_size = min(batch_size, len(self.ids))
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.randperm(len(self.ids), generator=self.gen)[: self.batch_size]
        tokens, mask = self.model.pad([self.ids[i] for i in idx.tolist()])
        return idx, tokens, mask


class CircuitVarianceLoss:
    """Eq. (12): ``lambda * sum_c Var_{x ~ tail}[a_c(x)]``, estimated at every step on
    ``batch_size`` inputs drawn from ``tail_texts`` (unbiased variance), through the model's hooks
    (:func:`tl_reward.cart.circuit_activations`), so the gradient reaches every weight upstream."""

    def __init__(self, model: HookedRewardModel, circuits: Sequence[Circuit],
                 tail_texts: Sequence[Any], lam: float, *, batch_size: int = 16, seed: int = 0):
        if lam <= 0:
            raise InvalidInputError(f"lambda must be > 0, got {lam}")
        if not circuits:
            raise InvalidInputError("circuit regularisation needs at least one circuit")
        self.circuits, self.lam = tuple(circuits), lam
        self.pool = _Pool(model, tail_texts, batch_size, seed)

    def __call__(self, batch: TrainBatch) -> Tensor:
        _, tokens, mask = self.pool.draw()
        a = circuit_activations(batch.model, tokens, mask, self.circuits)
        return self.lam * a.var(0).sum()


# ------------------------------------------------------------------------------- eqs. (10)-(11)
def _response_span(words: list[str], after: str | None) -> int:
    """Index of the first editable word (after the last ``after`` marker, or 0)."""
    if after is None:
        return 0
    marks = [i for i, w in enumerate(words) if w == after]
    return marks[-1] + 1 if marks else len(words)


@dataclass(frozen=True)
class TokenSubstitution:
    """G: replace ``n`` random words after the ``after`` marker by words of ``vocabulary``."""

    vocabulary: tuple[str, ...]
    n: int = 1
    after: str | None = "answer"

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        start = _response_span(words, self.after)
        for _ in range(min(self.n, len(words) - start)):
            words[rng.randrange(start, len(words))] = rng.choice(self.vocabulary)
        return " ".join(words)


@dataclass(frozen=True)
class SpanInsertion:
    """G: insert a span of 1 to ``max_len`` words of ``vocabulary`` after the ``after`` marker."""

    vocabulary: tuple[str, ...]
    max_len: int = 2
    after: str | None = "answer"

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        at = rng.randint(_response_span(words, self.after), len(words))
        span = [rng.choice(self.vocabulary) for _ in range(rng.randint(1, self.max_len))]
        return " ".join(words[:at] + span + words[at:])


@dataclass(frozen=True)
class SpanDeletion:
    """G: delete a span of 1 to ``max_len`` words after the ``after`` marker (keeps one word)."""

    max_len: int = 2
    after: str | None = "answer"

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        start = _response_span(words, self.after)
        room = len(words) - start - 1
        if room < 1:
            return text
        k = rng.randint(1, min(self.max_len, room))
        at = rng.randint(start, len(words) - k)
        return " ".join(words[:at] + words[at + k:])


@dataclass(frozen=True)
class AugmentedSet:
    """Eq. (10)'s augmented inputs with their eq. (11) targets.

    ``texts[i]`` is the chosen variant of ``sources[i]``; ``circuit_score[i]`` its
    ``sum_c a_c(x~)``; ``targets[i]`` the labeller's reward; ``selection`` how variants were picked.
    """

    texts: tuple[str, ...]
    sources: tuple[str, ...]
    targets: Float[Tensor, "batch"]
    circuit_score: Float[Tensor, "batch"]
    selection: str

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"source": self.sources, "augmented": self.texts,
                             "target": self.targets.numpy(), "circuit_score": self.circuit_score.numpy()})


@torch.no_grad()
def circuit_guided_augmentation(
    model: HookedRewardModel,
    circuits: Sequence[Circuit],
    texts: Sequence[str],
    transforms: Sequence[Callable[[str, random.Random], str]],
    labeller: Labeller,
    *,
    n_variants: int = 8,
    selection: str = "circuit",
    batch_size: int = 64,
    seed: int = 0,
) -> AugmentedSet:
    """Eq. (10): for each ``x`` in ``texts`` draw ``n_variants`` variants ``x' = G(x)`` (``G``
    picked at random from ``transforms``) and keep ``argmax_x' sum_c a_c(x')`` over the
    ``circuits`` (``selection="circuit"``), or a random variant (``selection="random"``: the
    ablation that keeps ``G`` and drops the circuits). Targets come from ``labeller(texts)``.
    """
    if selection not in ("circuit", "random"):
        raise InvalidInputError(f"selection must be 'circuit' or 'random', got {selection!r}")
    if n_variants < 1 or not transforms:
        raise InvalidInputError(
            f"need n_variants >= 1 and at least one transform, got {n_variants}, {len(transforms)}"
        )
    if selection == "circuit" and not circuits:
        raise InvalidInputError("selection='circuit' needs at least one circuit")
    if any(not isinstance(t, str) for t in texts):
        raise InvalidInputError("augmentation transforms edit plain-text inputs, not chats")
    rng = random.Random(seed)
    variants = [rng.choice(transforms)(x, rng) for x in texts for _ in range(n_variants)]
    if circuits:
        ids = _tokens(model, variants)
        scores = []
        for start in range(0, len(ids), batch_size):
            tokens, mask = model.pad(ids[start:start + batch_size])
            scores.append(circuit_activations(model, tokens, mask, circuits).sum(1).cpu())
        score = torch.cat(scores).reshape(len(texts), n_variants)
    else:
        score = torch.zeros(len(texts), n_variants)
    if selection == "circuit":
        pick = score.argmax(1)
    else:
        pick = torch.tensor([rng.randrange(n_variants) for _ in texts])
    chosen = [variants[i * n_variants + int(j)] for i, j in enumerate(pick)]
    targets = torch.as_tensor(labeller(chosen), dtype=torch.float32)
    if targets.shape != (len(chosen),):
        raise InvalidInputError(
            f"labeller must return one reward per text ({len(chosen)}), got {tuple(targets.shape)}"
        )
    return AugmentedSet(texts=tuple(chosen), sources=tuple(texts), targets=targets,
                        circuit_score=score.gather(1, pick[:, None])[:, 0], selection=selection)


class AugmentationLoss:
    """Eq. (11): ``weight * mean (R(x~) - y_x~)^2`` over ``batch_size`` augmented inputs drawn
    from ``augmented`` at every step."""

    def __init__(self, model: HookedRewardModel, augmented: AugmentedSet, *, weight: float = 1.0,
                 batch_size: int = 16, seed: int = 0):
        if weight <= 0:
            raise InvalidInputError(f"weight must be > 0, got {weight}")
        self.pool = _Pool(model, augmented.texts, batch_size, seed)
        self.targets, self.weight = augmented.targets, weight

    def __call__(self, batch: TrainBatch) -> Tensor:
        idx, tokens, mask = self.pool.draw()
        r = batch.model(tokens, attention_mask=mask).float()
        return self.weight * ((r - self.targets[idx].to(r.device)) ** 2).mean()


# ------------------------------------------------------------------------------- baselines
class HiddenStateLoss:
    """Baseline hidden-state regulariser: ``lam * mean ||h||^2 / d_model`` of the normalised
    residual the head reads (``reward_head.hook_pooled``). A stand-in for the hidden-state
    regularisation of Yang et al. (2024), whose text-generation term needs an LM head that a
    reward model does not have."""

    hooks = ("reward_head.hook_pooled",)

    def __init__(self, lam: float):
        if lam <= 0:
            raise InvalidInputError(f"lambda must be > 0, got {lam}")
        self.lam = lam

    def __call__(self, batch: TrainBatch) -> Tensor:
        h = batch.activations["reward_head.hook_pooled"]
        return self.lam * h.pow(2).mean()


def tail_upweights(is_tail: Sequence[bool] | Tensor, *, factor: float | None = None) -> Tensor:
    """Importance weights: tail pairs weigh ``factor`` (default: n_head / n_tail, so head and tail
    carry equal total weight), head pairs 1."""
    is_tail = torch.as_tensor(is_tail, dtype=torch.bool)
    n_tail = int(is_tail.sum())
    if n_tail == 0:
        raise InvalidInputError("no tail pairs to upweight")
    factor = float(len(is_tail) - n_tail) / n_tail if factor is None else factor
    if factor <= 0:
        raise InvalidInputError(f"factor must be > 0, got {factor}")
    return torch.where(is_tail, factor, 1.0)


# ------------------------------------------------------------------------------- eqs. (14)-(15)
@jaxtyped(typechecker=beartype)
def ensemble_rewards(predictions: Float[Tensor, "member batch"],
                     weights: Float[Tensor, "member"], *,
                     nonnegative: bool = True) -> Float[Tensor, "batch"]:
    """Eq. (14): ``R_ensemble(x) = sum_k alpha_k R_k(x)`` with ``sum alpha = 1`` (and
    ``alpha >= 0`` unless ``nonnegative=False``, the paper's constraint alone)."""
    if not torch.isclose(weights.sum(), weights.new_tensor(1.0), atol=1e-5):
        raise InvalidInputError(f"ensemble weights must sum to 1, got {weights.tolist()}")
    if nonnegative and bool((weights < -1e-8).any()):
        raise InvalidInputError(
            f"ensemble weights must lie on the simplex, got {weights.tolist()}; pass "
            "nonnegative=False for weights fitted under the paper's constraint alone")
    return weights @ predictions


@jaxtyped(typechecker=beartype)
def fit_ensemble_weights(predictions: Float[Tensor, "member batch"],
                         targets: Float[Tensor, "batch"], *,
                         nonnegative: bool = True) -> Float[Tensor, "member"]:
    """Eq. (15): ``argmin_alpha mean (sum_k alpha_k R_k(x) - y_x)^2`` subject to
    ``sum alpha = 1``.

    ``nonnegative=True`` (default, a departure from the paper; see the module docstring) also
    asks ``alpha >= 0``: SLSQP on the convex quadratic over the simplex, the result checked to
    lie on it and to be no worse than the best vertex and the uniform mixture.
    ``nonnegative=False`` is the paper's constraint alone, solved in closed form from the KKT
    system ``[[2G, 1], [1', 0]] [alpha; mu] = [2l; 1]`` (``G = P P' / n``, ``l = P y / n``);
    with linearly dependent members (``G`` singular) the minimum-norm solution is returned.
    """
    from scipy.optimize import minimize

    p = predictions.detach().double().cpu().numpy()
    y = targets.detach().double().cpu().numpy()
    k = p.shape[0]
    if k < 1 or p.shape[1] < 1:
        raise InvalidInputError(f"need at least one member and one input, got {tuple(p.shape)}")
    if not (np.isfinite(p).all() and np.isfinite(y).all()):
        raise InvalidInputError("predictions and targets must be finite")
    gram, lin = p @ p.T / p.shape[1], p @ y / p.shape[1]
    if not nonnegative:
        kkt = np.block([[2 * gram, np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
        sol = np.linalg.lstsq(kkt, np.concatenate([2 * lin, [1.0]]), rcond=None)[0]
        return torch.as_tensor(sol[:k], dtype=predictions.dtype)

    def loss(a):
        return a @ gram @ a - 2 * a @ lin

    res = minimize(loss, np.full(k, 1.0 / k), jac=lambda a: 2 * (gram @ a - lin), method="SLSQP",
                   bounds=[(0.0, 1.0)] * k,
                   constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0,
                                 "jac": lambda a: np.ones_like(a)}],
                   options={"ftol": 1e-12, "maxiter": 500})
    alpha = np.clip(res.x, 0.0, None)
    alpha /= alpha.sum()
    candidates = [np.full(k, 1.0 / k), *np.eye(k)]
    best = min(loss(c) for c in candidates)
    if not res.success or loss(alpha) > best + 1e-9 * max(1.0, abs(best)):
        raise InvalidInputError(
            f"the simplex least-squares fit did not converge ({res.message}); check the inputs"
        )
    return torch.as_tensor(alpha, dtype=predictions.dtype)


# ------------------------------------------------------------------------------- eq. (16)
def cart_objective(
    model: HookedRewardModel,
    is_tail: Sequence[bool] | Tensor,
    *,
    circuits: Sequence[Circuit] = (),
    tail_texts: Sequence[Any] = (),
    circuit_lambda: float | None = None,
    eta: float | None = None,
    augmented: AugmentedSet | None = None,
    aug_weight: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[Tensor, dict[str, Any]]:
    """Eq. (16), ``L_head + L_aug + L_circuit + L_prog``, as ``(sample_weights, extra_losses)``
    for :func:`tl_reward.training.train_reward_model`. A term is on when its setting is given:
    ``circuit_lambda`` (eq. (12), with ``circuits`` and ``tail_texts``), ``eta`` (eq. (13)),
    ``augmented`` (eq. (11)). With ``eta`` the tail pairs leave ``L_head`` (weight 0) and enter
    ``L_prog``; without it every pair stays in ``L_head``, as in plain ERM.
    """
    is_tail = torch.as_tensor(is_tail, dtype=torch.bool)
    weights = torch.ones(len(is_tail))
    terms: dict[str, Any] = {}
    if eta is not None:
        weights = (~is_tail).float()
        terms["prog"] = ProgressiveLoss(is_tail, eta)
    if circuit_lambda is not None:
        if not tail_texts:
            raise InvalidInputError("circuit regularisation needs tail_texts to estimate Var_tail")
        terms["circuit"] = CircuitVarianceLoss(model, circuits, tail_texts, circuit_lambda,
                                               batch_size=batch_size, seed=seed)
    if augmented is not None:
        terms["aug"] = AugmentationLoss(model, augmented, weight=aug_weight,
                                        batch_size=batch_size, seed=seed + 1)
    return weights, terms
