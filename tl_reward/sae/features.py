"""A feature's activation over tokens, and dataset-level views of SAE features on preference pairs.

:func:`sae_dataset_features` attributes every pair's margin to the features of one SAE and keeps
each text's maximum feature activation; :class:`SAEFeatureSummary` then answers: which features
carry the margin (:meth:`~SAEFeatureSummary.top_features`), which separate the chosen from the
rejected response (:meth:`~SAEFeatureSummary.separating_features`, a paired t-test per feature),
which are specific to a scenario or to the tail (:meth:`~SAEFeatureSummary.scenario_features`,
Mann-Whitney U per feature), and the texts that activate a feature most, tokens highlighted
(:meth:`~SAEFeatureSummary.top_examples`). Statistics come from scipy.
"""

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from .._readout import as_tokens, batches
from ..data.pairs import PreferenceDataset
from ..errors import InvalidInputError
from ..model import HookedRewardModel, Text
from ._splice import attach_saes, check_sae
from .attribution import pair_rows


@dataclass(frozen=True)
class FeatureActivations:
    """One feature's activation at every token of some texts (0 at padding)."""

    hook: str
    feature: int
    activations: Float[Tensor, "batch pos"] = field(repr=False)
    attention_mask: Int[Tensor, "batch pos"] = field(repr=False)
    tokens: tuple[tuple[str, ...], ...] = field(repr=False)  # token strings, padding included
    labels: tuple[str, ...] = ()  # a name for each row

    def _rows(self):
        for i, label in enumerate(self.labels):
            keep = self.attention_mask[i].bool().tolist()
            toks = [t for t, k in zip(self.tokens[i], keep, strict=True) if k]
            acts = self.activations[i][self.attention_mask[i].bool()].tolist()
            yield label, toks, acts

    def to_dataframe(self):
        """One row per (text, token): position, token string, activation."""
        import pandas as pd

        recs = [{"text": label, "position": p, "token": t, "activation": a}
                for label, toks, acts in self._rows() for p, (t, a) in enumerate(zip(toks, acts, strict=True))]
        return pd.DataFrame(recs, columns=["text", "position", "token", "activation"])

    def to_html(self) -> str:
        """The texts with each token's background shaded by the activation (max of the set = full)."""
        top = float(self.activations.max()) or 1.0
        lines = [f"<div><b>{html.escape(self.hook)} feature {self.feature}</b></div>"]
        for label, toks, acts in self._rows():
            spans = "".join(
                f'<span title="{a:.3f}" style="background: rgba(255,80,0,{max(a, 0) / top:.2f}); '
                f'padding: 1px 2px; margin: 1px; border-radius: 3px">{html.escape(t)}</span>'
                for t, a in zip(toks, acts, strict=True)
            )
            lines.append(f"<div style='font-family: monospace; margin: 4px 0'>"
                         f"<span style='color: gray'>{html.escape(label)} (max {max(acts):.2f})</span> "
                         f"{spans}</div>")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return self.to_html()

    def plot(self, title: str | None = None):
        """Heatmap of the activation over tokens, one row per text, tokens written in the cells."""
        import plotly.graph_objects as go

        n_pos = self.activations.shape[1]
        z, text = [], []
        for _, toks, acts in self._rows():
            z.append(acts + [None] * (n_pos - len(acts)))
            text.append(toks + [""] * (n_pos - len(toks)))
        fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", colorscale="Oranges",
                                   y=list(self.labels), hovertemplate="%{text}: %{z:.3f}<extra></extra>"))
        fig.update_layout(title=title or f"{self.hook} feature {self.feature}: activation over tokens",
                          xaxis_title="position", yaxis={"autorange": "reversed"})
        return fig


def _token_strings(model: HookedRewardModel, tokens: Tensor) -> tuple[tuple[str, ...], ...]:
    tok = model.tokenizer
    if tok is None:
        return tuple(tuple(str(i) for i in row) for row in tokens.tolist())
    return tuple(tuple(tok.convert_ids_to_tokens(row)) for row in tokens.tolist())


def sae_feature_activations(
    model: HookedRewardModel,
    sae: SAE,
    tokens: Int[Tensor, "batch pos"] | Sequence[Text],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    feature: int,
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> FeatureActivations:
    """The activation of ``feature`` at every token, read from the spliced SAE's
    ``hook_sae_acts_post`` (error term kept: the model's own forward)."""
    hook = check_sae(model, sae)
    if not 0 <= int(feature) < sae.cfg.d_sae:
        raise InvalidInputError(f"feature {feature} is not in 0..{sae.cfg.d_sae - 1} (d_sae={sae.cfg.d_sae})")
    tokens, attention_mask = as_tokens(model, tokens, attention_mask)
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    labels = tuple(str(i) for i in range(tokens.shape[0])) if labels is None else tuple(labels)
    if len(labels) != tokens.shape[0]:
        raise InvalidInputError(f"{len(labels)} labels for {tokens.shape[0]} texts")
    out = []
    store: dict[str, Tensor] = {}
    for rows in batches(tokens.shape[0], batch_size, progress, "feature activations"):

        def keep(act, hook, store=store):
            store["acts"] = act[..., int(feature)].detach()
            return act

        with torch.no_grad(), attach_saes(model, [sae]):
            model.run_with_hooks(tokens[rows], attention_mask=mask[rows], return_type=None,
                                 fwd_hooks=[(f"{hook}.hook_sae_acts_post", keep)])
        acts = store["acts"]
        if acts.ndim != 2:
            raise InvalidInputError(f"{hook!r} has no position axis; there is nothing to show per token")
        out.append(acts * mask[rows])
    return FeatureActivations(hook=hook, feature=int(feature), activations=torch.cat(out),
                              attention_mask=mask, tokens=_token_strings(model, tokens), labels=labels)


@dataclass(frozen=True)
class SAEFeatureSummary:
    """Per-pair feature attributions and activations of one SAE over a preference dataset.

    ``margin[f, p]``: feature ``f``'s contribution to pair ``p``'s margin (method as in
    :func:`~tl_reward.sae.sae_pair_attribution`); ``chosen_max`` / ``rejected_max``: the feature's
    maximum activation over each text's tokens.
    """

    hook: str
    method: str
    margin: Float[Tensor, "d_sae pair"]
    error: Float[Tensor, "pair"]
    chosen_max: Float[Tensor, "d_sae pair"]
    rejected_max: Float[Tensor, "d_sae pair"]
    margins: Float[Tensor, "pair"]
    scenarios: tuple[str, ...]
    tail: tuple[bool, ...]
    chosen_texts: tuple[Any, ...] = field(repr=False)
    rejected_texts: tuple[Any, ...] = field(repr=False)
    model: HookedRewardModel = field(repr=False, compare=False)
    sae: SAE = field(repr=False, compare=False)

    def select(self, scenario: str | None) -> Tensor:
        """Boolean mask over pairs: all (``None``), ``"tail"``, ``"head"`` or one scenario."""
        n = len(self.scenarios)
        if scenario is None:
            return torch.ones(n, dtype=torch.bool)
        if scenario in ("tail", "head") and scenario not in self.scenarios:
            if not any(self.tail):
                raise InvalidInputError(
                    f"no pair is marked tail; pick a scenario: {sorted(set(self.scenarios))}"
                )
            flags = torch.tensor(self.tail)
            return flags if scenario == "tail" else ~flags
        if scenario not in self.scenarios:
            raise InvalidInputError(
                f"no pair has scenario {scenario!r}; scenarios: {sorted(set(self.scenarios))}"
                + (", or 'tail' / 'head'" if any(self.tail) else "")
            )
        return torch.tensor([s == scenario for s in self.scenarios])

    def _pairs(self, scenario: str | None) -> Tensor:
        keep = self.select(scenario)
        if not bool(keep.any()):
            raise InvalidInputError(f"no pair selected by scenario={scenario!r}")
        return keep

    def top_features(self, k: int = 10, scenario: str | None = None):
        """The ``k`` features with the largest |mean contribution| to the margin."""
        import pandas as pd

        keep = self._pairs(scenario)
        m = self.margin[:, keep].cpu()
        order = m.mean(1).abs().argsort(descending=True)[:k]
        return pd.DataFrame({
            "feature": order.numpy(),
            "mean_margin_contribution": m[order].mean(1).numpy(),
            "mean_abs": m[order].abs().mean(1).numpy(),
            "frac_positive": (m[order] > 0).float().mean(1).numpy(),
            "chosen_fire_rate": (self.chosen_max[order][:, keep] > 0).float().mean(1).cpu().numpy(),
            "rejected_fire_rate": (self.rejected_max[order][:, keep] > 0).float().mean(1).cpu().numpy(),
            "share_of_margin": (m[order].mean(1) / self.margins[keep].mean()).numpy(),
        })

    def separating_features(self, k: int = 10, scenario: str | None = None):
        """Features whose activation differs most between chosen and rejected (paired t-test on the
        per-text maximum activation, ``scipy.stats.ttest_rel``), sorted by |t|."""
        import numpy as np
        import pandas as pd
        from scipy.stats import ttest_rel

        keep = self._pairs(scenario)
        c = self.chosen_max[:, keep].cpu().double().numpy()
        r = self.rejected_max[:, keep].cpu().double().numpy()
        diff = c - r
        with np.errstate(divide="ignore", invalid="ignore"):
            t, p = ttest_rel(c, r, axis=1) if c.shape[1] > 1 else (np.full(len(c), np.nan),) * 2
        t = np.where(np.abs(diff).max(1) == 0, 0.0, np.nan_to_num(t, nan=0.0))
        order = np.argsort(-np.abs(t), kind="stable")[:k]
        return pd.DataFrame({
            "feature": order, "mean_chosen": c[order].mean(1), "mean_rejected": r[order].mean(1),
            "mean_difference": diff[order].mean(1), "t": t[order], "p_value": np.asarray(p)[order],
        })

    def scenario_features(self, scenario: str = "tail", k: int = 10):
        """Features specific to ``scenario`` (``"tail"`` or a scenario name): fire rate and mean
        activation over its texts (both sides) against the other texts, Mann-Whitney U p-value
        (``scipy.stats.mannwhitneyu``), and the mean margin contribution inside and outside.
        Only features more active inside than outside, sorted by the difference in fire rate,
        then in mean activation (fewer than ``k`` rows when fewer qualify)."""
        import numpy as np
        import pandas as pd
        from scipy.stats import mannwhitneyu

        keep = self._pairs(scenario)
        if bool(keep.all()):
            raise InvalidInputError(f"every pair is in {scenario!r}: there is nothing to compare with")
        acts = torch.cat([self.chosen_max, self.rejected_max], dim=1).cpu().double().numpy()
        inside = torch.cat([keep, keep]).numpy()
        a_in, a_out = acts[:, inside], acts[:, ~inside]
        fire_in, fire_out = (a_in > 0).mean(1), (a_out > 0).mean(1)
        mean_in, mean_out = a_in.mean(1), a_out.mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = mannwhitneyu(a_in, a_out, axis=1, alternative="two-sided").pvalue
        m = self.margin.cpu()
        order = np.lexsort((-(mean_in - mean_out), -(fire_in - fire_out)))
        order = order[(mean_in - mean_out)[order] > 0][:k]
        return pd.DataFrame({
            "feature": order, "fire_rate_in": fire_in[order], "fire_rate_out": fire_out[order],
            "mean_activation_in": mean_in[order], "mean_activation_out": mean_out[order],
            "p_value": p[order],
            "mean_margin_contribution_in": m[order][:, keep].mean(1).numpy(),
            "mean_margin_contribution_out": m[order][:, ~keep].mean(1).numpy(),
        })

    def top_examples(self, feature: int, k: int = 5, scenario: str | None = None) -> FeatureActivations:
        """The ``k`` texts (chosen or rejected) where ``feature`` fires most, with its activation
        at every token (display in a notebook, ``.to_html()`` or ``.plot()``)."""
        if not 0 <= int(feature) < self.margin.shape[0]:
            raise InvalidInputError(f"feature {feature} is not in 0..{self.margin.shape[0] - 1}")
        keep = self._pairs(scenario)
        idx = torch.nonzero(keep).flatten()
        both = torch.cat([self.chosen_max[feature, idx], self.rejected_max[feature, idx]]).cpu()
        order = both.argsort(descending=True)[:k].tolist()
        n = len(idx)
        texts, labels = [], []
        for j in order:
            pair = int(idx[j % n])
            side = "chosen" if j < n else "rejected"
            texts.append((self.chosen_texts if side == "chosen" else self.rejected_texts)[pair])
            labels.append(f"pair {pair} {side} ({self.scenarios[pair]})")
        return sae_feature_activations(self.model, self.sae, texts, feature=int(feature),
                                       labels=labels, progress=False)

    def to_dataframe(self):
        """One row per feature: mean margin contribution (overall, and head/tail when marked),
        fire rates on chosen and rejected texts."""
        import pandas as pd

        m = self.margin.cpu()
        cols = {
            "feature": range(m.shape[0]),
            "mean_margin_contribution": m.mean(1).numpy(),
            "mean_abs": m.abs().mean(1).numpy(),
            "chosen_fire_rate": (self.chosen_max > 0).float().mean(1).cpu().numpy(),
            "rejected_fire_rate": (self.rejected_max > 0).float().mean(1).cpu().numpy(),
        }
        for s in sorted(set(self.scenarios)):
            cols[f"mean_margin_contribution[{s}]"] = m[:, self.select(s)].mean(1).numpy()
        return pd.DataFrame(cols)

    def plot(self, k: int = 20, scenario: str | None = None, title: str | None = None):
        """Bars of the top-``k`` features' mean margin contribution, one colour per scenario."""
        import pandas as pd
        import plotly.express as px

        top = self.top_features(k, scenario)["feature"].tolist()
        m = self.margin.cpu()
        frames = []
        for s in sorted(set(self.scenarios)) if scenario is None else [scenario]:
            sel = self.select(s)
            frames.append(pd.DataFrame({"feature": [str(f) for f in top], "scenario": s,
                                        "mean margin contribution": m[top][:, sel].mean(1).numpy()}))
        return px.bar(pd.concat(frames), x="feature", y="mean margin contribution", color="scenario",
                      barmode="group",
                      title=title or f"{self.hook}: top {k} features by mean margin contribution")


def sae_dataset_features(
    model: HookedRewardModel,
    sae: SAE,
    data: PreferenceDataset,
    *,
    method: str = "auto",
    steps: int = 8,
    batch_size: int = 32,
    progress: bool = True,
) -> SAEFeatureSummary:
    """Attribute every pair's margin to the features of ``sae`` (``method`` and ``steps`` as in
    :func:`~tl_reward.sae.sae_pair_attribution`) and summarise over the dataset."""
    if not isinstance(data, PreferenceDataset):
        raise InvalidInputError(
            f"data must be a tl_reward PreferenceDataset, got {type(data).__name__}; build one with "
            "tl_reward.data.pairs_from_records(...)"
        )
    if len(data) == 0:
        raise InvalidInputError("the dataset has no pairs")
    hook = check_sae(model, sae)
    rows, max_c, max_r = pair_rows(model, sae, data.chosen_texts, data.rejected_texts, None, None,
                                   method, steps, batch_size, progress)
    d = sae.cfg.d_sae
    return SAEFeatureSummary(
        hook=hook, method=rows["methods"][0],
        margin=rows["values"][:d], error=rows["values"][d],
        chosen_max=max_c[:d], rejected_max=max_r[:d],
        margins=rows["reward"], scenarios=data.scenarios, tail=data.is_tail,
        chosen_texts=tuple(data.chosen_texts), rejected_texts=tuple(data.rejected_texts),
        model=model, sae=sae,
    )
