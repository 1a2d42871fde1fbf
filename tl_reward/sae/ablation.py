"""The causal check: edit SAE features through the spliced SAE and measure the reward.

Each edit (ablate to zero, or patch from another run) goes into ``hook_sae_acts_post`` of the
SAE spliced in with its error term; sae-lens computes that error from the unedited activation with
the SAE's hooks disabled, so the edit changes the activation by exactly the feature's decoder write.
Next to each measured change sits the gradient's first-order prediction of it, so agreement between
attribution and intervention is a table, not a claim.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from .._readout import as_tokens, batches, choose
from ..errors import InvalidInputError
from ..model import HookedRewardModel, Text
from ._splice import attach_saes, check_sae, decoder_dot
from .attribution import (
    _check_decoder,
    _resolve_method,
    align_positions,
    gather_aligned,
    positions_mask,
    reward_readout,
)


@dataclass(frozen=True)
class FeatureAblationResult:
    """Reward changes from editing SAE features, next to what attribution predicted.

    ``effects[f, b]``: reward (or margin) with feature ``features[f]`` edited minus without, measured
    by a forward through the spliced SAE (error term kept, so only the feature's decoder write
    changes). ``predicted[f, b]``: what the attribution of the same ``method`` predicts: the
    change of the feature's direct contribution at the scoring token (``"direct"``, cached final
    norm scale) or gradient x activation change over every position (``"gradient"``).
    """

    hook: str
    features: tuple[int, ...]
    effects: Float[Tensor, "feature batch"]
    predicted: Float[Tensor, "feature batch"]
    clean: Float[Tensor, "batch"]
    mode: str
    method: str  # the attribution that made ``predicted``: "direct" or "gradient"
    is_pair: bool = False

    def agreement(self, predicted: Float[Tensor, "feature batch"] | None = None):
        """Per feature: mean measured and predicted change, their ratio and Pearson r over
        sequences (scipy), and the fraction of sequences where the signs agree.

        ``predicted`` replaces :attr:`predicted`, e.g. with the negated feature rows of an
        integrated-gradients pair attribution (``-attr.feature_values()[features]``).
        """
        import numpy as np
        import pandas as pd
        from scipy.stats import pearsonr

        p = self.predicted if predicted is None else predicted
        if p.shape != self.effects.shape:
            raise InvalidInputError(
                f"predicted has shape {tuple(p.shape)}, the effects {tuple(self.effects.shape)}"
            )
        e, p = self.effects.detach().cpu().numpy(), p.detach().cpu().numpy()
        rows = []
        for i, feat in enumerate(self.features):
            ok = np.std(e[i]) > 0 and np.std(p[i]) > 0 and len(e[i]) > 2
            rows.append({
                "feature": feat, "measured": e[i].mean(), "predicted": p[i].mean(),
                "ratio": e[i].mean() / p[i].mean() if p[i].mean() != 0 else float("nan"),
                "pearson_r": pearsonr(e[i], p[i])[0] if ok else float("nan"),
                "sign_agreement": float(np.mean(np.sign(e[i]) == np.sign(p[i]))),
            })
        return pd.DataFrame(rows)

    def correlation(self) -> float:
        """Pearson r between measured and predicted changes over every (feature, sequence)."""
        from scipy.stats import pearsonr

        e, p = self.effects.flatten().cpu().numpy(), self.predicted.flatten().cpu().numpy()
        if e.size < 3 or e.std() == 0 or p.std() == 0:
            return float("nan")
        return float(pearsonr(e, p)[0])

    def to_dataframe(self):
        """One row per (feature, sequence): measured and predicted change."""
        import pandas as pd

        n_f, n = self.effects.shape
        return pd.DataFrame({
            "feature": [f for f in self.features for _ in range(n)],
            "sequence": list(range(n)) * n_f,
            "measured": self.effects.detach().cpu().flatten().numpy(),
            "predicted": self.predicted.detach().cpu().flatten().numpy(),
        })

    def plot(self, title: str | None = None):
        """Measured against predicted change, one point per (feature, sequence)."""
        import plotly.express as px

        df = self.to_dataframe()
        df["feature"] = df["feature"].astype(str)
        what = "margin" if self.is_pair else "reward"
        lo, hi = min(df.measured.min(), df.predicted.min()), max(df.measured.max(), df.predicted.max())
        fig = px.scatter(df, x="predicted", y="measured", color="feature",
                         title=title or f"Feature {self.mode} on {self.hook}: {what} change",
                         labels={"predicted": "predicted by attribution", "measured": "measured"})
        fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line={"dash": "dot", "color": "gray"})
        return fig


ABLATION_MODES = ("zero", "patch")


def _ablate_side(model, sae, hook, features, tokens, mask, src_tokens, src_mask, mode, method,
                 batch_size, progress):
    """Measured and predicted reward changes ``[feature, batch]`` and the clean reward."""
    feats = torch.as_tensor(features, dtype=torch.long, device=tokens.device)
    n_f, n = len(features), tokens.shape[0]
    effects = torch.empty(n_f, n, device=tokens.device)
    predicted = torch.empty_like(effects)
    clean = torch.empty(n, device=tokens.device)
    store: dict[str, Tensor] = {}
    for rows in batches(n, batch_size, progress, f"feature {mode} ({hook})"):
        t = tokens[rows]
        m = None if mask is None else mask[rows]
        b = t.shape[0]
        # clean run: activations (leaf, for the gradient) and the reward
        def leaf(act, hook, store=store):
            if hook.name.endswith("hook_sae_acts_post"):
                act = act.detach().requires_grad_(method == "gradient")
            store[hook.name.rsplit(".", 1)[-1]] = act
            return act

        pooled = model.pooled_index(t, m)
        names = [f"{hook}.hook_sae_acts_post", "ln_final.hook_scale"]
        with torch.set_grad_enabled(method == "gradient"), attach_saes(model, [sae]):
            reward = model.run_with_hooks(t, attention_mask=m, pool_index=pooled,
                                          fwd_hooks=[(name, leaf) for name in names])
            if reward.ndim != 1:
                raise InvalidInputError(
                    "feature ablation needs a scalar reward; choose an objective with "
                    "model.set_objective(...)"
                )
            if method == "gradient":
                (g,) = torch.autograd.grad(reward.sum(), [store["hook_sae_acts_post"]])
        acts = store["hook_sae_acts_post"].detach()[..., feats]  # [b, pos, n_f]
        if mode == "zero":
            new = torch.zeros_like(acts)
        else:
            new = _aligned_source(model, sae, hook, src_tokens[rows],
                                  None if src_mask is None else src_mask[rows], t, m, feats, acts)
        where = positions_mask(acts, m)
        delta = new - acts if where is None else (new - acts) * where
        with torch.no_grad():
            if method == "gradient":  # first order: change . gradient, over every position
                predicted[:, rows] = (delta * g[..., feats]).reshape(b, -1, n_f).sum(1).T
            else:  # direct: change at the scoring token . decoder row . u (cached final scale)
                idx = torch.arange(b, device=t.device)
                u = reward_readout(model, store["hook_scale"][idx, pooled])
                predicted[:, rows] = (delta[idx, pooled] * decoder_dot(sae, u)[:, feats]).T
        clean[rows] = reward.detach()
        # edited runs: every feature as its own block of rows
        t_rep = t.repeat(n_f, 1)
        m_rep = None if m is None else m.repeat(n_f, 1)
        f_rep = feats.repeat_interleave(b)  # [n_f * b]
        new_rep = new.permute(2, 0, *range(1, new.ndim - 1)).reshape(n_f * b, *new.shape[1:-1])

        def edit(act, hook, f_rep=f_rep, new_rep=new_rep):
            act = act.clone()
            idx = torch.arange(act.shape[0], device=act.device)
            if act.ndim == 2:
                act[idx, f_rep] = new_rep
            else:  # [rows, pos, d_sae]: rows x pos entries of one feature per row
                act[idx, :, f_rep] = new_rep
            return act

        with torch.no_grad(), attach_saes(model, [sae]):
            edited = model.run_with_hooks(t_rep, attention_mask=m_rep, pool_index=pooled.repeat(n_f),
                                          fwd_hooks=[(f"{hook}.hook_sae_acts_post", edit)])
        effects[:, rows] = edited.reshape(n_f, b) - reward.detach()[None]
    return effects, predicted, clean


def _aligned_source(model, sae, hook, s_tokens, s_mask, t_tokens, t_mask, feats, t_acts):
    """Source feature activations at the target's positions, aligned from the scoring token;
    positions without a source counterpart keep the target's value."""
    store: dict[str, Tensor] = {}

    def keep(act, hook):
        store["acts"] = act.detach()
        return act

    with torch.no_grad(), attach_saes(model, [sae]):
        model.run_with_hooks(s_tokens, attention_mask=s_mask, return_type=None,
                             fwd_hooks=[(f"{hook}.hook_sae_acts_post", keep)])
    src = store["acts"][..., feats]
    if src.ndim == 2:
        return src
    ok, index = align_positions(model, t_tokens, t_mask, s_tokens, s_mask)
    return gather_aligned(src, index, ok, t_acts)


def sae_feature_ablation(
    model: HookedRewardModel,
    sae: SAE,
    tokens: Int[Tensor, "batch pos"] | Sequence[Text],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    features: Sequence[int],
    mode: str = "zero",
    source: Int[Tensor, "batch _pos"] | Sequence[Text] | None = None,
    source_mask: Int[Tensor, "batch _pos"] | None = None,
    method: str = "auto",
    batch_size: int = 32,
    progress: bool = True,
) -> FeatureAblationResult:
    """Edit each of ``features`` on its own, at every position, and measure the reward change.

    ``mode="zero"`` ablates the feature (activation 0); ``mode="patch"`` writes the ``source``
    run's activations (aligned from the scoring token; e.g. the chosen texts into the rejected
    ones, the intervention that ``method="integrated"`` pair attribution estimates). The SAE is
    spliced in with its error term, which sae-lens computes from the unedited activation, so the
    edit changes the activation by exactly the feature's decoder write. Each feature is one block
    of rows in a batched forward (``batch_size`` rows per forward).

    ``predicted`` comes from the attribution ``method`` (``"auto"``, ``"direct"`` or
    ``"gradient"``, resolved as in :func:`~tl_reward.sae.sae_reward_attribution`); compare with
    any other attribution through :meth:`FeatureAblationResult.agreement`.
    """
    hook = check_sae(model, sae)
    choose("mode", mode, ABLATION_MODES)
    method = _resolve_method(model, hook, method)
    _check_decoder(sae, method)
    features = _check_features(sae, features)
    tokens, attention_mask = as_tokens(model, tokens, attention_mask)
    s_tokens = s_mask = None
    if mode == "patch":
        if source is None:
            raise InvalidInputError("mode='patch' needs source= (the run to copy activations from)")
        s_tokens, s_mask = as_tokens(model, source, source_mask)
        if s_tokens.shape[0] != tokens.shape[0]:
            raise InvalidInputError(
                f"{tokens.shape[0]} target but {s_tokens.shape[0]} source sequences; they must match"
            )
    elif source is not None:
        raise InvalidInputError("source= goes with mode='patch'")
    effects, predicted, clean = _ablate_side(model, sae, hook, features, tokens, attention_mask,
                                             s_tokens, s_mask, mode, method,
                                             _rows_per_forward(batch_size, features), progress)
    return FeatureAblationResult(hook=hook, features=tuple(features), effects=effects,
                                 predicted=predicted, clean=clean, mode=mode, method=method)


def sae_pair_feature_ablation(
    model: HookedRewardModel,
    sae: SAE,
    chosen: Int[Tensor, "batch pos"] | Sequence[Text],
    rejected: Int[Tensor, "batch _pos"] | Sequence[Text],
    chosen_mask: Int[Tensor, "batch pos"] | None = None,
    rejected_mask: Int[Tensor, "batch _pos"] | None = None,
    *,
    features: Sequence[int],
    method: str = "auto",
    batch_size: int = 32,
    progress: bool = True,
) -> FeatureAblationResult:
    """Ablate each feature (zero, every position) on both sides of each pair: margin change."""
    a = sae_feature_ablation(model, sae, chosen, chosen_mask, features=features, method=method,
                             batch_size=batch_size, progress=progress)
    b = sae_feature_ablation(model, sae, rejected, rejected_mask, features=features, method=method,
                             batch_size=batch_size, progress=progress)
    if a.clean.shape != b.clean.shape:
        raise InvalidInputError(
            f"{a.clean.shape[0]} chosen but {b.clean.shape[0]} rejected sequences; pairs must match"
        )
    return FeatureAblationResult(hook=a.hook, features=a.features, effects=a.effects - b.effects,
                                 predicted=a.predicted - b.predicted, clean=a.clean - b.clean,
                                 mode="zero", method=a.method, is_pair=True)


def _check_features(sae: SAE, features: Sequence[int]) -> list[int]:
    if isinstance(features, int):
        features = [features]
    features = [int(f) for f in features]
    if not features:
        raise InvalidInputError("features is empty; pass the feature indices to edit")
    bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise InvalidInputError(f"features {bad} are not in 0..{sae.cfg.d_sae - 1} (d_sae={sae.cfg.d_sae})")
    return features


def _rows_per_forward(batch_size: int, features: Sequence[int]) -> int:
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    return max(1, batch_size // max(1, len(features)))
