"""The reward lens: the reward read out of the residual stream after every layer.

Built on TransformerLens's ``ActivationCache.accumulated_resid`` and ``apply_ln_to_stack``.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._memory import rows_that_fit
from .._readout import as_tokens, batches, choose, pooled_run, read_out, readout_dtype
from ..errors import InvalidInputError
from ..heads import head_in_dtype
from ..model import HookedRewardModel, Text

LENS_HOOKS = ("resid_post", "resid_mid")
LENS_NORMS = ("cached", "recomputed")


@dataclass(frozen=True)
class LensResult:
    """Reward read at the pooled token after the embeddings and after every layer.

    ``rewards`` is ``[layer, batch]`` (``[layer, batch, n_rewards]`` for a multi-objective head with
    no objective); ``labels`` names each read-out point (TransformerLens's ``accumulated_resid``
    labels: ``"0_pre"`` is the embeddings, ``"final_post"`` the last layer's output). With
    ``norm="cached"`` the last row equals the model's reward exactly.
    """

    rewards: Tensor
    labels: tuple[str, ...]
    norm: str
    objective_names: tuple[str, ...]

    def to_dataframe(self):
        """Long format: one row per (layer, sequence[, objective])."""
        import pandas as pd

        r = self.rewards.detach().cpu()
        rows = []
        for i, label in enumerate(self.labels):
            for b in range(r.shape[1]):
                if r.ndim == 2:
                    rows.append({"layer": i, "label": label, "sequence": b, "reward": float(r[i, b])})
                else:
                    for k, name in enumerate(self.objective_names):
                        rows.append({"layer": i, "label": label, "sequence": b,
                                     "objective": name, "reward": float(r[i, b, k])})
        return pd.DataFrame(rows)

    def plot(self, title: str | None = None):
        """Reward against layer, one line per sequence (plotly figure)."""
        import plotly.express as px

        df = self.to_dataframe()
        fig = px.line(df, x="label", y="reward", color="sequence", markers=True,
                      facet_row="objective" if "objective" in df else None,
                      title=title or f"Reward lens (norm={self.norm})")
        fig.update_xaxes(title="read-out point")
        return fig


@dataclass(frozen=True)
class PairLensResult:
    """Lens of chosen and rejected responses and the margin curve between them."""

    chosen: LensResult
    rejected: LensResult

    @property
    def margins(self) -> Tensor:
        """``[layer, pair]`` (``[layer, pair, n_rewards]`` for several objectives)."""
        return self.chosen.rewards - self.rejected.rewards

    def crystallisation_layer(self, fraction: float = 0.9) -> Int[Tensor, "pair"]:
        """First read-out index whose margin reaches ``fraction`` of the final margin and stays
        there (same sign, at least that large) up to the end; the last index when none earlier."""
        if not 0 < fraction <= 1:
            raise InvalidInputError(f"fraction must be in (0, 1], got {fraction}")
        m = self.margins
        if m.ndim != 2:
            raise InvalidInputError("crystallisation needs a scalar reward: set an objective")
        final = m[-1]
        reached = (m * final.sign()) >= fraction * final.abs()  # [layer, pair]
        # stays reached from this layer on: reversed cumulative AND
        stays = reached.flip(0).cumprod(0).flip(0).bool()
        return stays.float().argmax(0)

    def to_dataframe(self):
        import pandas as pd

        m = self.margins.detach().cpu()
        if m.ndim != 2:
            raise InvalidInputError("margin table needs a scalar reward: set an objective")
        return pd.DataFrame(
            [{"layer": i, "label": lab, "pair": p, "margin": float(m[i, p])}
             for i, lab in enumerate(self.chosen.labels) for p in range(m.shape[1])]
        )

    def plot(self, title: str | None = None):
        """Margin (chosen - rejected) against layer, one line per pair, with the mean."""
        import plotly.express as px

        df = self.to_dataframe()
        fig = px.line(df, x="label", y="margin", color="pair", markers=True,
                      title=title or f"Margin lens (norm={self.chosen.norm})")
        mean = df.groupby("label", sort=False)["margin"].mean()
        fig.add_scatter(x=list(mean.index), y=list(mean.values), name="mean",
                        line={"width": 4, "color": "black"})
        return fig


def reward_lens(
    model: HookedRewardModel,
    tokens: Int[Tensor, "batch pos"] | Sequence[Text],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    hook: str = "resid_post",
    norm: str = "cached",
    batch_size: int = 32,
    progress: bool = True,
) -> LensResult:
    """Read the reward out of the residual stream at the pooled token, layer by layer.

    Any head kind: a nonlinear head (MLP, gated, custom) is applied as a whole to each layer's
    residual, normalised by the final norm (weight and bias included) as the model's own forward
    normalises its last layer; a gated head reads each layer's residual at the end of the prompt
    too. The last row is the reward exactly (``norm="cached"``); the rows are not additive.

    Args:
        tokens: token ids (with ``attention_mask`` for padding) or texts.
        hook: ``"resid_post"`` (after the embeddings and after each layer) or ``"resid_mid"``
            (also between each layer's attention and MLP).
        norm: ``"cached"`` divides every read-out by the final norm's scale from the real forward,
            so the lens is additive and its last row is the reward; ``"recomputed"`` applies the
            final norm afresh to each layer's residual (the logit-lens convention).
    """
    choose("hook", hook, LENS_HOOKS)
    choose("norm", norm, LENS_NORMS)
    tokens, attention_mask = as_tokens(model, tokens, attention_mask)
    if not model.has_linear_head:
        return _head_lens(model, tokens, attention_mask, hook, norm, batch_size, progress)
    weights, bias = read_out(model)
    incl_mid = hook == "resid_mid"
    batch_size = rows_that_fit(model.cfg, tokens.shape[1], batch_size)  # the memory budget
    chunks, labels = [], None
    for rows in batches(tokens.shape[0], batch_size, progress, "reward lens"):
        mask = None if attention_mask is None else attention_mask[rows]
        run = pooled_run(model, tokens[rows], mask, lambda n: "hook_resid" in n)
        with torch.no_grad():
            stack, labels = run.cache.accumulated_resid(
                layer=None, incl_mid=incl_mid, return_labels=True
            )  # [layer, batch, 1, d_model]
            if norm == "cached":
                normed = run.cache.apply_ln_to_stack(stack, layer=None)
                read = normed[:, :, 0].to(weights.dtype) @ weights + bias
            else:
                normed = run.cache.apply_ln_to_stack(stack, layer=None, recompute_ln=True)
                # the recomputed norm already applied ln_final's own weight and bias
                head = _head(model)
                read = normed[:, :, 0].to(head.dtype) @ head + _head_bias(model)
        chunks.append(read)
    rewards = torch.cat(chunks, dim=1)
    if rewards.shape[-1] == 1:
        rewards = rewards[..., 0]
    names = ("reward",) if model.is_scalar else model.label_names
    return LensResult(rewards=rewards, labels=tuple(labels), norm=norm, objective_names=names)


def _head_lens(model: HookedRewardModel, tokens: Tensor, attention_mask: Tensor | None, hook: str,
               norm: str, batch_size: int, progress: bool) -> LensResult:
    """The lens of a nonlinear head: the head applied to each layer's normalised residual (in
    :func:`readout_dtype`: a half-precision model's head runs on a float32 copy)."""
    dt = readout_dtype(model)
    head, unembed = head_in_dtype(model.reward_head, model.unembed, dt)
    if model.n_rewards > 1 and not model.is_scalar:
        names = model.label_names
    else:
        names = ("reward",)
    batch_size = rows_that_fit(model.cfg, tokens.shape[1], batch_size)
    ln = model.ln_final
    chunks, labels = [], None
    for rows in batches(tokens.shape[0], batch_size, progress, "reward lens"):
        mask = None if attention_mask is None else attention_mask[rows]
        run = pooled_run(model, tokens[rows], mask, lambda n: "hook_resid" in n,
                         with_prompt_end=head.reads_prompt_end)
        with torch.no_grad():
            stack, labels = run.cache.accumulated_resid(
                layer=None, incl_mid=hook == "resid_mid", return_labels=True
            )  # [layer, batch, 1 or 2 positions, d_model]
            if norm == "cached":
                normed = run.cache.apply_ln_to_stack(stack, layer=None)
                if getattr(ln, "w", None) is not None:
                    normed = normed * ln.w.to(normed.dtype)
                if getattr(ln, "b", None) is not None:
                    normed = normed + ln.b.to(normed.dtype)
            else:  # ln_final afresh, with its weight and bias
                normed = run.cache.apply_ln_to_stack(stack, layer=None, recompute_ln=True)
            normed = normed.to(dt)
            n_layer, n_batch = normed.shape[:2]
            flat = normed.reshape(n_layer * n_batch, *normed.shape[2:])
            prompt = flat[:, 1] if head.reads_prompt_end else None
            out = head.compute(flat[:, 0], unembed, prompt)
            if model.objective_weights is not None:
                out = out @ model.objective_weights.to(dt)
            elif out.shape[-1] == 1:
                out = out[..., 0]
        chunks.append(out.reshape(n_layer, n_batch, *out.shape[1:]))
    return LensResult(rewards=torch.cat(chunks, dim=1), labels=tuple(labels), norm=norm,
                      objective_names=names)


def _head(model: HookedRewardModel) -> Float[Tensor, "d_model k"]:
    head = model.reward_direction[:, None] if model.is_scalar else model.W_R
    return head.to(readout_dtype(model))


def _head_bias(model: HookedRewardModel) -> Float[Tensor, "k"]:
    bias = model.reward_bias[None] if model.is_scalar else model.b_R
    return bias.to(readout_dtype(model))


def pair_reward_lens(
    model: HookedRewardModel,
    chosen: Int[Tensor, "batch pos"] | Sequence[Text],
    rejected: Int[Tensor, "batch _pos"] | Sequence[Text],
    chosen_mask: Int[Tensor, "batch pos"] | None = None,
    rejected_mask: Int[Tensor, "batch _pos"] | None = None,
    **kwargs,
) -> PairLensResult:
    """The reward lens of chosen and rejected responses, with the margin curve between them."""
    a = reward_lens(model, chosen, chosen_mask, **kwargs)
    b = reward_lens(model, rejected, rejected_mask, **kwargs)
    if a.rewards.shape[1] != b.rewards.shape[1]:
        raise InvalidInputError(
            f"{a.rewards.shape[1]} chosen but {b.rewards.shape[1]} rejected sequences; pairs must match"
        )
    return PairLensResult(chosen=a, rejected=b)
