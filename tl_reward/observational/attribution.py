"""Direct reward attribution: what each part of the model writes along the reward direction.

Exact under the cached final-norm scale: contributions plus the read-out bias equal the reward.
Components come from TransformerLens's ``ActivationCache.decompose_resid``; heads and neurons are
projected on the per-sequence effective reward direction so no ``[component, d_model]`` stack is
materialised (``d_mlp x n_layers`` neurons stay cheap).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._memory import rows_that_fit
from .._readout import as_tokens, batches, centers, choose, pooled_run, read_out
from ..errors import InvalidInputError
from ..model import HookedRewardModel, Text

LEVELS = ("component", "head", "neuron", "head_source")


@dataclass(frozen=True)
class AttributionResult:
    """Each part's direct contribution to the pooled reward (or to a pair's margin).

    ``values.sum(0) + bias == total`` (the reward or margin) within float error.
    """

    values: Float[Tensor, "component batch"]
    labels: tuple[str, ...]
    bias: Float[Tensor, ""]
    total: Float[Tensor, "batch"]
    level: str

    def to_dataframe(self):
        """Long format: one row per (component, sequence)."""
        import pandas as pd

        v = self.values.detach().cpu()
        n_comp, n_seq = v.shape
        return pd.DataFrame(
            {
                "component": [lab for lab in self.labels for _ in range(n_seq)],
                "sequence": list(range(n_seq)) * n_comp,
                "value": v.flatten().numpy(),
            }
        )

    def top(self, k: int = 10):
        """The ``k`` components with the largest mean |contribution|, with their mean."""
        import pandas as pd

        v = self.values.detach().cpu()
        order = v.abs().mean(1).argsort(descending=True)[:k]
        return pd.DataFrame(
            {
                "component": [self.labels[i] for i in order.tolist()],
                "mean": v[order].mean(1).numpy(),
                "mean_abs": v[order].abs().mean(1).numpy(),
            }
        )

    def head_matrix(self) -> Float[Tensor, "layer head"]:
        """Mean contribution of each head as a ``[layer, head]`` matrix (head level only)."""
        if self.level != "head":
            raise InvalidInputError(f"head_matrix needs level='head', this result is {self.level!r}")
        heads = [(i, lab) for i, lab in enumerate(self.labels) if _is_head(lab)]
        n_layers = 1 + max(int(lab[1:].split("H")[0]) for _, lab in heads)
        n_heads = 1 + max(int(lab.split("H")[1]) for _, lab in heads)
        out = torch.zeros(n_layers, n_heads)
        mean = self.values.detach().cpu().mean(1)
        for i, lab in heads:
            layer, head = lab[1:].split("H")
            out[int(layer), int(head)] = mean[i]
        return out

    def plot(self, k: int = 20, title: str | None = None):
        """Layer x head heatmap at head level, else bars of the top ``k`` mean contributions."""
        import plotly.express as px

        what = "margin" if self.level.startswith("pair") else "reward"
        if self.level == "head":
            m = self.head_matrix().numpy()
            lim = float(abs(m).max()) or 1.0
            fig = px.imshow(m, color_continuous_scale="RdBu", zmin=-lim, zmax=lim,
                            labels={"x": "head", "y": "layer", "color": f"mean {what}"},
                            title=title or f"Direct {what} attribution per head")
            return fig
        top = self.top(k)
        return px.bar(top, x="component", y="mean",
                      title=title or f"Direct {what} attribution ({self.level}), top {k}")


def _is_head(label: str) -> bool:
    return label.startswith("L") and "H" in label and "." not in label


def _needed(level: str):
    base = ("hook_embed", "hook_pos_embed", "hook_attn_out", "hook_mlp_out", "_post.hook_scale")
    extra = {"component": (), "head": ("attn.hook_z",), "neuron": ("mlp.hook_post",),
             "head_source": ("attn.hook_pattern", "attn.hook_v")}[level]
    names = base + extra
    return lambda name: name.endswith(names)


def _post_norm(model, cache, layer: int, which: str, u: Tensor) -> Tensor:
    """Map the direction through a sublayer's post-norm (Gemma-2), linearised at its cached scale."""
    norm = getattr(model.blocks[layer], which, None)
    if norm is None or not model.cfg.use_normalization_before_and_after:
        return u
    scale = cache[f"blocks.{layer}.{which}.hook_scale"][:, 0]  # [batch, 1]
    return norm.w.to(u.dtype) * u / scale


def _attribute(model: HookedRewardModel, run, level: str, weights: Tensor) -> tuple[Tensor, list[str]]:
    cache = run.cache
    components, labels = cache.decompose_resid(
        layer=None, mode="all", apply_ln=True, incl_embeds=True, return_labels=True
    )
    comp = (components[:, :, 0] @ weights)[..., 0]  # [component, batch]
    if level == "component":
        return comp, labels
    # per-sequence effective direction for vectors written to the residual stream
    w = weights[:, 0]
    if centers(model):
        w = w - w.mean()
    u = w / cache["ln_final.hook_scale"][:, 0]  # [batch, d_model]
    index = {lab: i for i, lab in enumerate(labels)}
    values, out_labels = [], []
    for name in ("embed", "pos_embed"):
        if name in index:
            values.append(comp[index[name]])
            out_labels.append(name)
    n_heads = model.cfg.n_heads
    for layer in range(model.cfg.n_layers):
        attn_total = comp[index[f"{layer}_attn_out"]]
        u_attn = _post_norm(model, cache, layer, "ln1_post", u)
        W_O = model.blocks[layer].attn.W_O.to(u.dtype)  # [head, d_head, d_model]
        if level in ("head", "head_source"):
            o = torch.einsum("hdm,bm->bhd", W_O, u_attn)  # [batch, head, d_head]
            if level == "head":
                z = cache[f"blocks.{layer}.attn.hook_z"][:, 0]  # [batch, head, d_head]
                heads = (z * o).sum(-1).T  # [head, batch]
                values.append(heads)
                out_labels += [f"L{layer}H{h}" for h in range(n_heads)]
            else:
                pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, 0]  # [batch, head, src]
                v = cache[f"blocks.{layer}.attn.hook_v"]  # [batch, src, kv_head, d_head]
                if v.shape[2] != n_heads:  # grouped-query attention: share K/V heads
                    v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
                per_src = pattern * torch.einsum("bshd,bhd->bhs", v, o)  # [batch, head, src]
                heads = per_src.sum(-1).T
                n_src = per_src.shape[-1]
                values.append(per_src.permute(1, 2, 0).reshape(n_heads * n_src, -1))
                out_labels += [f"L{layer}H{h}.src{s}" for h in range(n_heads) for s in range(n_src)]
            values.append((attn_total - heads.sum(0))[None])
            out_labels.append(f"L{layer}.attn_bias")
        else:
            values.append(attn_total[None])
            out_labels.append(f"{layer}_attn_out")
        mlp_total = comp[index[f"{layer}_mlp_out"]]
        if level == "neuron":
            u_mlp = _post_norm(model, cache, layer, "ln2_post", u)
            post = cache[f"blocks.{layer}.mlp.hook_post"][:, 0]  # [batch, d_mlp]
            W_out = model.blocks[layer].mlp.W_out.to(u.dtype)
            neurons = (post * (u_mlp @ W_out.T)).T  # [d_mlp, batch]
            values += [neurons, (mlp_total - neurons.sum(0))[None]]
            out_labels += [f"L{layer}N{n}" for n in range(neurons.shape[0])]
            out_labels.append(f"L{layer}.mlp_bias")
        else:
            values.append(mlp_total[None])
            out_labels.append(f"{layer}_mlp_out")
    values = [v if v.ndim == 2 else v[None] for v in values]
    return torch.cat(values, dim=0), out_labels


def direct_reward_attribution(
    model: HookedRewardModel,
    tokens: Int[Tensor, "batch pos"] | Sequence[Text],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    level: str = "component",
    batch_size: int = 32,
    progress: bool = True,
) -> AttributionResult:
    """Direct contribution of each part of the model to the pooled reward.

    Levels: ``"component"`` (embeddings, each attention layer, each MLP), ``"head"`` (each head,
    plus each layer's attention bias and MLP), ``"neuron"`` (each MLP neuron, plus each layer's
    MLP bias and attention output), ``"head_source"`` (each head split by the source position
    its attention reads, through the attention pattern). ``values.sum(0) + bias`` equals the
    reward (final norm linearised at its cached scale, as the model's own forward computes it).
    """
    choose("level", level, LEVELS)
    tokens, attention_mask = as_tokens(model, tokens, attention_mask)
    _ = model.reward_direction  # a multi-objective head needs an objective: clear error here
    weights, bias = read_out(model)
    if level == "head_source" and tokens.shape[0] > batch_size:
        raise InvalidInputError(
            "head_source labels are source positions of one padded batch: pass at most "
            f"batch_size={batch_size} sequences or raise batch_size"
        )
    if level != "head_source":  # head_source: one padded batch by contract (its labels)
        batch_size = rows_that_fit(model.cfg, tokens.shape[1], batch_size)  # the memory budget
    chunks, rewards, labels = [], [], None
    for rows in batches(tokens.shape[0], batch_size, progress, f"attribution ({level})"):
        mask = None if attention_mask is None else attention_mask[rows]
        run = pooled_run(model, tokens[rows], mask, _needed(level))
        with torch.no_grad():
            values, labels = _attribute(model, run, level, weights)
        chunks.append(values)
        rewards.append(run.rewards.detach())
    return AttributionResult(
        values=torch.cat(chunks, dim=1),
        labels=tuple(labels),
        bias=bias[0].detach(),
        total=torch.cat(rewards),
        level=level,
    )


def pair_reward_attribution(
    model: HookedRewardModel,
    chosen: Int[Tensor, "batch pos"] | Sequence[Text],
    rejected: Int[Tensor, "batch _pos"] | Sequence[Text],
    chosen_mask: Int[Tensor, "batch pos"] | None = None,
    rejected_mask: Int[Tensor, "batch _pos"] | None = None,
    *,
    level: str = "component",
    batch_size: int = 32,
    progress: bool = True,
) -> AttributionResult:
    """Decompose each pair's margin (chosen - rejected) into the parts' direct contributions.

    The read-out bias cancels in a margin, so ``values.sum(0) == total`` (the margins).
    """
    if level == "head_source":
        raise InvalidInputError(
            "head_source is per source position, which does not line up between a chosen and a "
            "rejected response; attribute each side with direct_reward_attribution"
        )
    a = direct_reward_attribution(model, chosen, chosen_mask, level=level,
                                  batch_size=batch_size, progress=progress)
    b = direct_reward_attribution(model, rejected, rejected_mask, level=level,
                                  batch_size=batch_size, progress=progress)
    if a.values.shape[1] != b.values.shape[1]:
        raise InvalidInputError(
            f"{a.values.shape[1]} chosen but {b.values.shape[1]} rejected sequences; pairs must match"
        )
    return AttributionResult(
        values=a.values - b.values,
        labels=a.labels,
        bias=torch.zeros_like(a.bias),
        total=a.total - b.total,
        level=f"pair_{level}",
    )
