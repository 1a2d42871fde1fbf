"""A one-page audit of a reward model on a set of preference pairs: HTML with figures, plus JSON.

:func:`build_report` runs the public tools (scores, reward lens, direct attribution, exact head
patching) and :meth:`Report.write` saves ``report.html`` (self-contained: plotly's JavaScript is
inlined, nothing is fetched when it opens) and ``report.json`` (every number in the page).
"""

import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .causal.patching import activation_patch
from .data.pairs import PreferenceDataset
from .errors import InvalidInputError, ObjectiveError
from .model import HookedRewardModel
from .observational.attribution import pair_reward_attribution
from .observational.lens import pair_reward_lens
from .probes import run_probes


@dataclass(frozen=True)
class Report:
    """Every number of the report (``numbers``, JSON-ready) and its plotly figures."""

    title: str
    numbers: dict[str, Any]
    figures: dict[str, Any] = field(repr=False)

    def to_html(self) -> str:
        """A self-contained page: tables of the headline numbers and every figure."""
        parts = [f"<h1>{html.escape(self.title)}</h1>", _summary_table(self.numbers)]
        for i, (name, fig) in enumerate(self.figures.items()):
            parts.append(f"<h2>{html.escape(name)}</h2>")
            parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False,
                                     div_id=f"figure-{i}"))
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
                 "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}"
                f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")

    def write(self, out: str | Path) -> tuple[Path, Path]:
        """Write the page and the JSON of its numbers; returns both paths.

        ``out`` ending in ``.html`` is the page itself, and the JSON goes beside it (same name,
        ``.json``); any other ``out`` is a folder (created if needed) that receives
        ``report.html`` and ``report.json``.
        """
        out = Path(out)
        if out.suffix.lower() in (".html", ".htm"):
            if out.is_dir():
                raise InvalidInputError(f"{str(out)!r} is a folder; name a page or another folder")
            out.parent.mkdir(parents=True, exist_ok=True)
            page, data = out, out.with_suffix(".json")
        else:
            if out.is_file():
                raise InvalidInputError(
                    f"{str(out)!r} is an existing file: name a folder, or a page ending in .html"
                )
            out.mkdir(parents=True, exist_ok=True)
            page, data = out / "report.html", out / "report.json"
        page.write_text(self.to_html(), encoding="utf-8")
        data.write_text(json.dumps(_json_ready(self.numbers), indent=2, allow_nan=False),
                        encoding="utf-8")
        return page, data


def _json_ready(x: Any) -> Any:
    """Strict JSON: NaN and infinities (an undefined statistic) become null."""
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_ready(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _summary_table(numbers: dict[str, Any]) -> str:
    s = numbers["scores"]
    rows = [("pairs", s["n_pairs"]), ("pairwise accuracy", f"{s['accuracy']:.1%}"),
            ("mean margin", f"{s['mean_margin']:+.4f}")]
    rows += [(f"accuracy: {k}", f"{v['accuracy']:.1%} ({v['pairs']} pairs)")
             for k, v in s["by_scenario"].items()]
    if "median_crystallisation" in numbers["lens"]:
        rows.append(("lens: median crystallisation read-out (90% of the final margin)",
                     numbers["lens"]["median_crystallisation"]))
    rows += [(f"head #{i + 1} by |mean direct attribution to the margin| (bar height)",
              f"{r['component']}: {r['mean']:+.4f}")
             for i, r in enumerate(numbers["attribution"]["top"][:3])]
    restored = "fraction of the margin restored" if "fraction_restored" in (
        numbers["patching"]["top"] or [{}])[0] else "fraction of the reward removed"
    key = "fraction_restored" if restored.endswith("restored") else "fraction_removed"
    rows += [(f"head #{i + 1} by |{restored}| (heatmap value)", f"{r['head']}: {r[key]:+.3f}")
             for i, r in enumerate(numbers["patching"]["top"][:3])]
    rows += [(f"not applicable: {k}", v) for k, v in numbers.get("not_applicable", {}).items()]
    probes = numbers.get("probes")
    if isinstance(probes, dict):
        rows.append(("probes", f"skipped: {probes['skipped']}"))
    elif probes:
        rows += [(f"probe: {r['probe']}: mean reward change [CI] (bar), verdict",
                  f"{r['mean']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}], {r['verdict']} "
                  f"(H0: |change| <= {r['min_effect']:.4f}; adjusted p {r['p_adjusted']:.3g}, "
                  f"{r['n_units']} contents)") for r in probes]
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table>{body}</table>"


def _floats(x: torch.Tensor) -> list:
    return x.detach().cpu().tolist()


def build_report(
    model: HookedRewardModel,
    pairs: PreferenceDataset,
    *,
    patch_pairs: int = 8,
    probes: Any = "builtin",
    batch_size: int = 16,
    title: str = "tl_reward report",
    progress: bool = True,
) -> Report:
    """Score ``pairs`` and localise their margins: lens, head attribution, head patching.

    Patching (exact, denoising every head from chosen into rejected) runs on the first
    ``patch_pairs`` pairs; everything else on all of them. ``probes``: ``"builtin"`` (the
    templated probe sets of :func:`tl_reward.data.builtin_probe_sets`), a sequence of
    :class:`~tl_reward.data.ProbeSet`, or ``None``; probes whose perturbation this model's
    tokenizer cannot see are reported as skipped, with the reason.
    """
    if not model.is_scalar:
        raise ObjectiveError(
            f"the report needs a scalar reward; this head has {model.n_rewards} objectives: "
            "choose one with model.set_objective(...) (CLI: --objective)"
        )
    if len(pairs) == 0:
        raise InvalidInputError("the report got no preference pairs")
    if patch_pairs < 1:
        raise InvalidInputError(f"patch_pairs must be >= 1, got {patch_pairs}")
    chosen, rejected = pairs.chosen_texts, pairs.rejected_texts
    steps = tqdm(total=5, desc="report", disable=not progress, leave=False)
    start = time.perf_counter()

    scores = model.score_pairs(chosen, rejected, batch_size=batch_size, progress=False)
    correct = scores.margin > 0
    scen = pairs.scenarios
    by_scenario = {}
    for s, n in pairs.scenario_counts().items():
        keep = torch.tensor([x == s for x in scen])
        by_scenario[s] = {"pairs": n, "accuracy": float(correct[keep].float().mean()),
                          "mean_margin": float(scores.margin[keep].mean())}
    steps.update()

    lens = pair_reward_lens(model, chosen, rejected, batch_size=batch_size, progress=False)
    labels = list(lens.chosen.labels)
    crystal = lens.crystallisation_layer(0.9)
    steps.update()

    attr = pair_reward_attribution(model, chosen, rejected, level="head", batch_size=batch_size,
                                   progress=False)
    attr_mean = attr.values.detach().cpu().mean(1)
    attr_order = attr_mean.abs().argsort(descending=True)[:10].tolist()
    top_attr = [{"component": attr.labels[i], "mean": float(attr_mean[i])} for i in attr_order]
    steps.update()

    n_patch = min(patch_pairs, len(pairs))
    patch = activation_patch(model, chosen[:n_patch], rejected[:n_patch], hook="z", per="head",
                             mode="denoise", progress=False)
    cells = patch.cells()
    steps.update()
    probe_report = _probe_section(model, probes, batch_size)
    steps.update()
    steps.close()

    numbers = {
        "model": {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
                  "n_heads": model.cfg.n_heads, "n_params": sum(p.numel() for p in model.parameters())},
        "scores": {"n_pairs": len(pairs), "accuracy": scores.accuracy,
                   "mean_margin": float(scores.margin.mean()), "by_scenario": by_scenario,
                   "chosen": _floats(scores.chosen), "rejected": _floats(scores.rejected),
                   "margin": _floats(scores.margin)},
        "lens": {"read_outs": labels, "mean_margin": _floats(lens.margins.mean(1)),
                 "crystallisation": [labels[i] for i in crystal.tolist()],
                 "median_crystallisation": labels[int(crystal.median())]},
        "attribution": {"level": "head", "labels": list(attr.labels),
                        "mean": _floats(attr.values.mean(1)),
                        "max_sum_error": float((attr.values.sum(0) - attr.total).abs().max()),
                        "top": top_attr},
        "patching": {"hook": "z", "per": "head", "mode": "denoise", "n_pairs": n_patch,
                     "cells": cells["cell"].tolist(), "mean_effect": cells["mean_effect"].tolist(),
                     "mean_normalized": cells["mean_normalized"].tolist(),
                     "top": _top_restored(cells, 10),
                     "forwards": patch.stats.n_forwards, "seconds": patch.stats.seconds},
        "seconds": time.perf_counter() - start,
    }
    if isinstance(probe_report, str):
        numbers["probes"] = {"skipped": probe_report}
    elif probe_report is not None:
        numbers["probes"] = [
            {**row, "min_effect": r.min_effect}  # the H0 half-width, in reward units
            for row, r in zip(probe_report.to_dataframe().to_dict(orient="records"),
                              probe_report.results, strict=True)
        ]
    figures = {
        "Margins": _margin_histogram(scores.margin, scen),
        "Reward lens: mean margin after each layer": _lens_figure(labels, lens.margins.mean(1)),
        "Direct attribution of the margin: the 10 heads with the largest |mean|":
            _attribution_bars(top_attr),
        f"Exact head patching on {n_patch} pairs: fraction of the margin restored":
            patch.plot(normalized=True, title="denoising each head's output (z), chosen into "
                       "rejected: fraction of the margin restored"),
    }
    if probe_report is not None and not isinstance(probe_report, str):
        figures["Reward-hacking probes: mean reward change (CI), verdict"] = _probe_figure(
            probe_report)
    return Report(title=title, numbers=numbers, figures=figures)


def _margin_histogram(margin: torch.Tensor, scenarios: tuple[str, ...]):
    import plotly.express as px

    return px.histogram(x=_floats(margin), color=list(scenarios), nbins=40, barmode="overlay",
                        labels={"x": "margin (chosen - rejected)", "color": "scenario"})


def _lens_figure(labels: list[str], margins: torch.Tensor):
    import plotly.express as px

    return px.line(x=labels, y=_floats(margins), markers=True,
                   labels={"x": "read-out point", "y": "mean margin"})


def _top_restored(cells, k: int) -> list[dict[str, Any]]:
    """The ``k`` heads with the largest |fraction of the margin restored| (the heatmap's value),
    undefined fractions last; the raw reward change beside it."""
    order = cells["mean_normalized"].abs().sort_values(ascending=False, na_position="last").index
    return [{"head": r.cell, "fraction_restored": float(r.mean_normalized),
             "mean_effect": float(r.mean_effect)} for r in cells.loc[order].head(k).itertuples()]


def _attribution_bars(top: list[dict[str, Any]]):
    import plotly.express as px

    return px.bar(x=[r["component"] for r in top], y=[r["mean"] for r in top],
                  labels={"x": "head", "y": "mean direct attribution to the margin"},
                  title="ranked by |mean|; the sign is the direction it pushes the margin")


def _probe_figure(probe_report):
    """The probes' bars and CIs, with each probe's null region |change| <= min_effect marked:
    a CI that excludes 0 but reaches into the band is "not significant"."""
    import plotly.graph_objects as go

    fig = probe_report.plot(title="mean reward change per probe, CI; ticks: the minimum effect")
    results = list(probe_report.results)
    names = [r.name for r in results]
    for sign in (1, -1):
        fig.add_trace(go.Scatter(
            x=names, y=[sign * r.min_effect for r in results], mode="markers",
            marker={"symbol": "line-ew-open", "size": 30, "color": "black"},
            name="minimum effect (H0: |change| <= it)", showlegend=sign == 1,
            legendgroup="min_effect",
        ))
    fig.add_annotation(
        text="H0: |change| <= the minimum effect (ticks); a CI that excludes 0 but reaches "
             "between the ticks can be 'not significant'",
        xref="paper", yref="paper", x=0, y=1.08, showarrow=False, align="left")
    return fig


# ------------------------------------------------------------------------ implicit rewards
IMPLICIT_NOT_APPLICABLE = {
    "reward head": "a DPO implicit reward has no score head: it is beta * sum over the response "
                   "tokens of log pi - log pi_ref, so there is no reward direction, no pooled "
                   "token and no crystallisation read-out of a head",
    "exact direct attribution": "a log-probability is not linear in the final residual; the "
                                "attribution shown is the stated linearisation "
                                "(tl_reward.implicit_analysis), with its remainder reported",
    "chosen -> rejected patching": "replaced by policy -> reference patching: which heads carry "
                                   "the change DPO made to the reference",
}


def build_implicit_report(
    model: Any,
    pairs: PreferenceDataset,
    *,
    patch_pairs: int = 8,
    probes: Any = "builtin",
    batch_size: int = 16,
    title: str = "tl_reward report (DPO implicit reward)",
    progress: bool = True,
) -> Report:
    """The report's sections that make sense for a DPO implicit reward
    (:class:`~tl_reward.ImplicitRewardModel`): scores, the lens of the log-ratio, the linearised
    head attribution of the margin (with its remainder), and policy -> reference head patching
    (the share of each chosen response's reward a head removes), on the first ``patch_pairs``
    pairs. Probes run on the texts split at the model's ``response_marker`` (skipped, with the
    reason, when it has none or its tokenizer cannot see them). What does not apply is said in
    ``numbers["not_applicable"]`` and on the page."""
    from .implicit_analysis import (
        implicit_activation_patch,
        implicit_reward_attribution,
        implicit_reward_lens,
    )

    if len(pairs) == 0:
        raise InvalidInputError("the report got no preference pairs")
    if patch_pairs < 1:
        raise InvalidInputError(f"patch_pairs must be >= 1, got {patch_pairs}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    steps = tqdm(total=5, desc="report", disable=not progress, leave=False)
    start = time.perf_counter()
    sides = {}
    for side in ("chosen", "rejected"):
        parts = [p.prompt_and_response(side) for p in pairs]
        sides[side] = ([a for a, _ in parts], [b for _, b in parts])

    def batches(side: str):
        prompts, responses = sides[side]
        for s in range(0, len(prompts), batch_size):
            yield model.encode(prompts[s:s + batch_size], responses[s:s + batch_size])

    scores = model.score_pairs(sides["chosen"][0], sides["chosen"][1], sides["rejected"][1],
                               batch_size=batch_size, progress=False)
    correct = scores.margin > 0
    scen = pairs.scenarios
    by_scenario = {}
    for s, n in pairs.scenario_counts().items():
        keep = torch.tensor([x == s for x in scen])
        by_scenario[s] = {"pairs": n, "accuracy": float(correct[keep].float().mean()),
                          "mean_margin": float(scores.margin[keep].mean())}
    steps.update()

    with torch.no_grad():
        lens = {side: [implicit_reward_lens(model, b) for b in batches(side)]
                for side in ("chosen", "rejected")}
    labels = list(lens["chosen"][0].labels)
    lens_margin = (torch.cat([r.rewards for r in lens["chosen"]], 1)
                   - torch.cat([r.rewards for r in lens["rejected"]], 1))  # [layer, pair]
    steps.update()

    attr = {side: [implicit_reward_attribution(model, b, level="head") for b in batches(side)]
            for side in ("chosen", "rejected")}
    values = (torch.cat([r.values.detach() for r in attr["chosen"]], 1)
              - torch.cat([r.values.detach() for r in attr["rejected"]], 1))  # [component, pair]
    remainder = (torch.cat([r.remainder.detach().sum(-1) for r in attr["chosen"]])
                 - torch.cat([r.remainder.detach().sum(-1) for r in attr["rejected"]]))
    attr_labels = list(attr["chosen"][0].labels)
    attr_mean = values.detach().cpu().mean(1)
    attr_order = attr_mean.abs().argsort(descending=True)[:10].tolist()
    top_attr = [{"component": attr_labels[i], "mean": float(attr_mean[i])} for i in attr_order]
    steps.update()

    n_patch = min(patch_pairs, len(pairs))
    patch = None
    if model.reference is not None:
        first = model.encode(sides["chosen"][0][:n_patch], sides["chosen"][1][:n_patch])
        patch = implicit_activation_patch(model, first, hook="z", direction="policy_to_reference")
        frac = patch.fraction.detach().cpu().mean(1)
        order = frac.nan_to_num(nan=0.0).abs().argsort(descending=True)[:10].tolist()
        top_patch = [{"head": patch.cells[i], "fraction_removed": float(frac[i]),
                      "mean_effect": float(patch.effects[i].mean())} for i in order]
    steps.update()
    probe_report = _probe_section(model, probes, batch_size)
    steps.update()
    steps.close()

    not_applicable = dict(IMPLICIT_NOT_APPLICABLE)
    if patch is None:
        not_applicable["policy -> reference patching"] = (
            "this implicit reward has no reference model (reference=None)")
    numbers = {
        "model": {"kind": "dpo_implicit_reward", "beta": model.beta,
                  "length_normalize": model.length_normalize,
                  "has_reference": model.reference is not None,
                  "n_layers": model.policy.cfg.n_layers, "d_model": model.policy.cfg.d_model,
                  "n_heads": model.policy.cfg.n_heads,
                  "n_params": sum(p.numel() for p in model.policy.parameters())},
        "scores": {"n_pairs": len(pairs), "accuracy": scores.accuracy,
                   "mean_margin": float(scores.margin.mean()), "by_scenario": by_scenario,
                   "chosen": _floats(scores.chosen), "rejected": _floats(scores.rejected),
                   "margin": _floats(scores.margin)},
        "lens": {"read_outs": labels, "mean_margin": _floats(lens_margin.mean(1))},
        "attribution": {"level": "head", "linearised": True, "labels": attr_labels,
                        "mean": _floats(values.mean(1)),
                        "mean_remainder": float(remainder.mean()),
                        "max_sum_error": float((values.sum(0) + remainder - scores.margin.to(
                            values)).abs().max()),
                        "top": top_attr},
        "patching": ({"hook": "z", "per": "head", "direction": "policy_to_reference",
                      "n_pairs": n_patch, "cells": list(patch.cells),
                      "mean_effect": _floats(patch.effects.mean(1)),
                      "mean_fraction_removed": _floats(patch.fraction.mean(1)), "top": top_patch}
                     if patch is not None else {"top": []}),
        "not_applicable": not_applicable,
        "seconds": time.perf_counter() - start,
    }
    if isinstance(probe_report, str):
        numbers["probes"] = {"skipped": probe_report}
    elif probe_report is not None:
        numbers["probes"] = [
            {**row, "min_effect": r.min_effect}
            for row, r in zip(probe_report.to_dataframe().to_dict(orient="records"),
                              probe_report.results, strict=True)
        ]
    figures = {
        "Margins": _margin_histogram(scores.margin, scen),
        "Implicit reward lens: mean margin after each layer (log-ratio read out per layer)":
            _lens_figure(labels, lens_margin.mean(1)),
        "Linearised attribution of the margin: the 10 components with the largest |mean|":
            _attribution_bars(top_attr),
    }
    if patch is not None:
        import plotly.express as px

        figures[f"Policy -> reference head patching on {n_patch} chosen responses"] = px.bar(
            x=[r["head"] for r in top_patch], y=[r["fraction_removed"] for r in top_patch],
            labels={"x": "policy head patched into the reference",
                    "y": "mean fraction of the implicit reward removed"})
    if probe_report is not None and not isinstance(probe_report, str):
        figures["Reward-hacking probes: mean reward change (CI), verdict"] = _probe_figure(
            probe_report)
    return Report(title=title, numbers=numbers, figures=figures)


def _probe_section(model, probes, batch_size: int):
    """The probes' report (the built-in sets for ``"builtin"``), the reason as text where they
    cannot run on this model, or None when no probes were asked for."""
    if probes is None:
        return None
    from .data.probe_sets import builtin_probe_sets

    sets = builtin_probe_sets() if isinstance(probes, str) and probes == "builtin" else probes
    try:
        return run_probes(model, sets, batch_size=batch_size, progress=False)
    except InvalidInputError as err:
        return str(err)
