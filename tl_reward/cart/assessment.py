"""CART vulnerability assessment (section 3.4, eqs. (6)-(9)) and circuit divergence (eq. (5)).

:func:`assess` measures, for each circuit, on tail inputs:

- **Consist(c)** (eq. 6) within each group of semantically similar tail inputs (``groups``: a
  label per text, e.g. the long-tail task's scenario), restricted by default to the inputs that
  *activate* c (``|a_c| > tau_act``, as the paper's ``X_tail^(c)``), averaged over groups with
  their sizes as weights; NaN when no tail input activates c (then ``Cov = 0`` and eq. (9)
  takes ``1 - Consist = 1``: a blind spot ranks as the most exposed, see
  :func:`~tl_reward.cart.vulnerability`).
- **Sens(c)** (eq. 7), with ``delta`` added to the circuit's raw activations (neuron and feature
  values, heads' ``z`` vectors) at the positions it reads, ``||delta|| <= eps``: the first-order
  closed form ``eps E||dR/da_c||_*`` and projected gradient ascent through TransformerLens hooks.
- **Cov(c)** (eq. 8) ``= P_tail(|a_c| > tau_act)``; ``tau_act`` defaults, per circuit, to the
  ``tau_quantile`` quantile of ``|a_c|`` on head inputs (activation beyond the head range).
- **Vuln(c)** (eq. 9) ``= alpha (1 - Consist) + beta Sens + gamma (1 - Cov)``.

and ``Div(C_tail, C_head)`` over the circuit set (:func:`~tl_reward.cart.circuit_divergence`).
Everything runs on uniform samples of at most ``max_samples`` tail and head inputs.
"""

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._readout import choose
from ..errors import InvalidInputError
from ..model import HookedRewardModel
from .discovery import Discovery, _sample_texts, iter_batches
from .metrics import (
    DIVERGENCES,
    NORMS,
    Number,
    TailBound,
    circuit_divergence,
    consistency,
    coverage,
    max_perturbation_effect,
    sensitivity_first_order,
    tail_generalization_bound,
    vulnerability,
)
from .streaming import Reservoir, TextSource, chunks, open_source
from .units import (
    Circuit,
    check_units,
    circuit_activations,
    circuit_width,
    intervention_hooks,
    reward_runner,
)

SENSITIVITIES = ("pgd", "first_order")


@dataclass(frozen=True)
class Assessment:
    """Vulnerability of each circuit (eqs. 6-9), with the settings used.

    Tensors are indexed like ``circuits``. ``sensitivity`` names the estimate of eq. (7) that
    enters ``vulnerability``; both are kept. ``divergence`` is ``Div(C_tail, C_head)`` over all
    the circuits (``settings["divergence"]``). ``n_consistency`` is the number of tail inputs
    eq. (6) used (those activating the circuit, with ``activating_only``); where it is 0,
    ``consistency`` is NaN (undefined) and eq. (9) takes ``1 - Consist = 1`` (a circuit that
    never fires on the tail is a blind spot: ``1 - Cov = 1`` too), so it ranks among the most
    vulnerable, not last.
    """

    circuits: tuple[Circuit, ...]
    consistency: Float[Tensor, "circuit"]
    sens_first_order: Float[Tensor, "circuit"]
    sens_pgd: Float[Tensor, "circuit"]
    coverage: Float[Tensor, "circuit"]
    tau_act: Float[Tensor, "circuit"]
    vulnerability: Float[Tensor, "circuit"]
    n_consistency: Int[Tensor, "circuit"]
    a_tail: Float[Tensor, "circuit batch"] = field(repr=False)
    a_head: Float[Tensor, "circuit _batch"] = field(repr=False)
    divergence: float
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_dataframe(self):
        """One row per circuit, most vulnerable first, with every metric and its weight."""
        import pandas as pd

        s = self.settings
        df = pd.DataFrame({
            "circuit": [c.name for c in self.circuits],
            "units": [", ".join(c.labels) for c in self.circuits],
            "n_units": [len(c.units) for c in self.circuits],
            "aggregate": [c.aggregate for c in self.circuits],
            "position": [c.position for c in self.circuits],
            "mean_a_tail": self.a_tail.mean(1).numpy(),
            "mean_a_head": self.a_head.mean(1).numpy(),
            "consistency": self.consistency.numpy(),
            "n_consistency": self.n_consistency.numpy(),
            "sens_first_order": self.sens_first_order.numpy(),
            "sens_pgd": self.sens_pgd.numpy(),
            "coverage": self.coverage.numpy(),
            "tau_act": self.tau_act.numpy(),
            "vulnerability": self.vulnerability.numpy(),
            "alpha": s.get("alpha"), "beta": s.get("beta"), "gamma": s.get("gamma"),
            "eps": s.get("eps"), "norm": s.get("norm"), "sensitivity": s.get("sensitivity"),
        })
        df = df.sort_values("vulnerability", ascending=False, na_position="last")
        df.insert(0, "rank", np.arange(1, len(df) + 1))
        return df.reset_index(drop=True)

    def bound(self, head_loss: Number, n_tail: int, *, constant: Number = 1.0,
              beta: Number = 1.0, delta: Number = 0.05) -> TailBound:
        """Eqs. (4)-(5) with ``|C_tail|`` = the number of circuits assessed and this
        assessment's divergence (the paper's conjecture; see
        :func:`~tl_reward.cart.tail_generalization_bound`)."""
        return tail_generalization_bound(head_loss, len(self.circuits), n_tail, self.divergence,
                                         constant=constant, beta=beta, delta=delta)

    def plot(self, title: str | None = None):
        """Vulnerability ranking: stacked bars of the three weighted terms of eq. (9)."""
        import plotly.graph_objects as go

        df = self.to_dataframe()
        s = self.settings
        sens = df.sens_pgd if s.get("sensitivity") == "pgd" else df.sens_first_order
        terms = {
            "alpha (1 - Consist)": s["alpha"] * (1 - df.consistency.fillna(0.0)),
            "beta Sens": s["beta"] * sens,
            "gamma (1 - Cov)": s["gamma"] * (1 - df.coverage),
        }
        fig = go.Figure([go.Bar(name=k, x=df.circuit, y=v) for k, v in terms.items()])
        fig.update_layout(barmode="stack", title=title or "Circuit vulnerability, eq. (9)",
                          xaxis_title="circuit (most vulnerable first)", yaxis_title="Vuln(c)")
        return fig


def _circuit_acts(model, circuits, texts, saes, batch_size) -> Tensor:
    out = []
    with torch.no_grad():
        for _, tokens, mask in iter_batches(model, texts, batch_size, "texts"):
            out.append(circuit_activations(model, tokens, mask, circuits, saes=saes).cpu())
    return torch.cat(out).T.double()


def _sensitivity(model, circuit, texts, eps, norm, steps, saes, batch_size):
    """Per-input first-order and PGD values of eq. (7)'s inner maximum for one circuit."""
    width = circuit_width(model, circuit)
    first, pgd = [], []
    for _, tokens, mask in iter_batches(model, texts, batch_size, "tail"):
        pool = model.pooled_index(tokens, mask)
        run = reward_runner(model, tokens, mask, circuit.first_layer)
        dtype = model.unembed.W_U.dtype  # the head's dtype, whatever its kind

        def reward_fn(delta, run=run, pool=pool, mask=mask):
            return run(intervention_hooks(model, circuit, pool, mask, shift=delta, saes=saes))

        zero = torch.zeros(tokens.shape[0], width, dtype=dtype, device=tokens.device,
                           requires_grad=True)
        (g,) = torch.autograd.grad(reward_fn(zero).sum(), zero)
        first.append(g.detach().cpu())
        pgd.append(max_perturbation_effect(reward_fn, tokens.shape[0], width, eps, norm=norm,
                                           steps=steps, dtype=dtype,
                                           device=tokens.device).detach().cpu())
    return torch.cat(first), torch.cat(pgd)


def assess(
    model: HookedRewardModel,
    circuits: Sequence[Circuit] | Discovery,
    tail: TextSource,
    head: TextSource,
    *,
    groups: Callable[[Any], Hashable] | None = None,
    eps: Number = 1.0,
    norm: str = "l2",
    pgd_steps: int = 20,
    sensitivity: str = "pgd",
    tau_act: Number | Sequence[Number] | None = None,
    tau_quantile: Number = 0.95,
    activating_only: bool = True,
    alpha: Number = 1.0,
    beta: Number = 1.0,
    gamma: Number = 1.0,
    divergence: str = "wasserstein",
    max_samples: int = 1024,
    saes: Mapping[str, Any] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> Assessment:
    """CART vulnerability assessment (section 3.4) of ``circuits`` on ``tail`` inputs.

    Args:
        circuits: circuits, or a :class:`Discovery` (its kept circuits).
        tail, head: text sources as in :func:`~tl_reward.cart.discover`; ``head`` sets the
            default ``tau_act`` and the head side of ``Div``.
        groups: a text -> group label function; tail inputs with the same label are the
            "semantically similar" sets of eq. (6) (default: one group).
        eps, norm, pgd_steps, sensitivity: eq. (7)'s ball (``l2`` or ``linf``, in raw activation
            units), the projected-gradient steps, and which estimate enters ``Vuln``.
        tau_act, tau_quantile: eq. (8)'s threshold (one for all, one per circuit, or per circuit
            the ``tau_quantile`` quantile of ``|a_c|`` on head inputs).
        activating_only: restrict eq. (6) to tail inputs with ``|a_c| > tau_act``.
        alpha, beta, gamma: the weights of eq. (9).
        divergence: ``Div``'s definition (:func:`~tl_reward.cart.circuit_divergence`).
    """
    from tqdm.auto import tqdm

    choose("norm", norm, NORMS)
    choose("sensitivity", sensitivity, SENSITIVITIES)
    choose("divergence", divergence, DIVERGENCES)
    if isinstance(circuits, Discovery):
        circuits = circuits.kept_circuits
        if not circuits:
            raise InvalidInputError(
                "the discovery kept no circuit (validation rejected all); pass "
                "discovery.circuits to assess them anyway"
            )
    circuits = tuple(circuits)
    if not circuits:
        raise InvalidInputError("no circuits to assess")
    check_units(model, [u for c in circuits for u in c.units], saes)
    if not 0 < tau_quantile < 1:
        raise InvalidInputError(f"tau_quantile must be in (0, 1), got {tau_quantile}")
    if max_samples < 2:
        raise InvalidInputError(f"max_samples must be >= 2, got {max_samples}")

    res = Reservoir(max_samples, seed=seed)
    for batch in chunks(open_source(tail, "tail"), 256):
        res.add(batch)
    tail_s = res.items
    head_s = _sample_texts(head, max_samples, seed + 1, "head")
    if len(tail_s) < 1:
        raise InvalidInputError("tail gave no texts")
    labels = [groups(t) for t in tail_s] if groups is not None else [0] * len(tail_s)
    codes = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
    group_idx = torch.tensor([codes[lab] for lab in labels])

    a_t = _circuit_acts(model, circuits, tail_s, saes, batch_size)  # [circuit, n_tail]
    a_h = _circuit_acts(model, circuits, head_s, saes, batch_size)
    n_c = len(circuits)
    if tau_act is None:
        tau = torch.quantile(a_h.abs(), float(tau_quantile), dim=1)
    else:
        tau = torch.as_tensor(tau_act, dtype=torch.float64).expand(n_c).clone()
        if bool((tau < 0).any()) or not bool(torch.isfinite(tau).all()):
            raise InvalidInputError(f"tau_act must be finite and >= 0, got {tau.tolist()}")

    cov = coverage(a_t.T, tau)
    consist = torch.full((n_c,), float("nan"), dtype=torch.float64)
    n_active = torch.zeros(n_c, dtype=torch.long)
    for c in range(n_c):
        active = (a_t[c].abs() > tau[c] if activating_only
                  else torch.ones(len(tail_s), dtype=torch.bool))
        n_active[c] = int(active.sum())
        vals, sizes = [], []
        for g in torch.unique(group_idx).tolist():
            sel = a_t[c][active & (group_idx == g)]
            if sel.numel():
                vals.append(consistency(sel))
                sizes.append(sel.numel())
        if vals:
            w = torch.tensor(sizes, dtype=torch.float64)
            consist[c] = (torch.stack(vals) * w).sum() / w.sum()

    s_first = torch.empty(n_c, dtype=torch.float64)
    s_pgd = torch.empty(n_c, dtype=torch.float64)
    for c, circuit in enumerate(tqdm(circuits, desc="sensitivity", disable=not progress,
                                     leave=False)):
        grads, best = _sensitivity(model, circuit, tail_s, eps, norm, pgd_steps, saes,
                                   batch_size)
        s_first[c] = sensitivity_first_order(grads.double(), eps, norm)
        s_pgd[c] = best.double().mean()
    sens = s_pgd if sensitivity == "pgd" else s_first
    vuln = vulnerability(consist, sens, cov, alpha, beta, gamma)
    div = circuit_divergence(a_t.T, a_h.T, divergence)
    settings = dict(
        eps=float(eps), norm=norm, pgd_steps=pgd_steps, sensitivity=sensitivity,
        tau_quantile=float(tau_quantile) if tau_act is None else None,
        activating_only=activating_only, alpha=float(alpha), beta=float(beta),
        gamma=float(gamma), divergence=divergence, max_samples=max_samples,
        n_tail=len(tail_s), n_head=len(head_s), n_groups=len(codes),
        groups=tuple(codes), seed=seed,
    )
    return Assessment(
        circuits=circuits, consistency=consist, sens_first_order=s_first, sens_pgd=s_pgd,
        coverage=cov, tau_act=tau, vulnerability=vuln, n_consistency=n_active, a_tail=a_t,
        a_head=a_h, divergence=div,
        settings=settings,
    )


def assessment_summary(assessment: Assessment) -> str:
    """One line per circuit: name, Vuln and its three terms (for logs and notebooks)."""
    df = assessment.to_dataframe()
    lines = [
        f"{r.rank:>2}. {r.circuit:<24} Vuln={r.vulnerability:.3f}  Consist={r.consistency:.3f}  "
        f"Sens={r.sens_pgd:.3f} (1st order {r.sens_first_order:.3f})  Cov={r.coverage:.3f}"
        for r in df.itertuples()
    ]
    return "\n".join(lines) if lines else "(no circuits)"

