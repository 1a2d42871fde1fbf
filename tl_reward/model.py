"""HookedRewardModel: a TransformerLens HookedTransformer whose output is the reward.

The linear reward head ``r = W_R^T h + b_R`` is stored as TransformerLens's own ``unembed`` with
``d_vocab_out = n_rewards``, so TransformerLens's weight processing (``fold_layer_norm``) folds the
final norm into it exactly as it does for logits; ``center_unembed`` is never applied to it.
The head (any kind of :mod:`tl_reward.heads`) and its hook points live in ``reward_head``:

- ``reward_head.hook_pooled``  # [batch, d_model], the normalised residual at the pooled token
- ``reward_head.hook_reward``  # [batch, n_rewards], the head's raw output
- MLP heads: ``reward_head.hook_hidden``; gated heads: ``reward_head.hook_prompt``,
  ``reward_head.hook_objectives``, ``reward_head.hook_gate``.

A nonlinear head has no ``W_R``: ``model.W_R`` (and every tool that reads it) raises
:class:`~tl_reward.errors.LinearHeadRequiredError`; its ``unembed`` is unused.
"""

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from ._device import block_device, output_device
from .errors import (
    HeadError,
    InvalidInputError,
    LinearHeadRequiredError,
    ObjectiveError,
    UnsupportedConfigError,
)
from .heads import RewardHead, as_reward_head
from .text_reward import RewardInputs, one_hot_read_weights
from .texts import Text, TextMethods

if TYPE_CHECKING:
    from .process import StepRewards

logger = logging.getLogger(__name__)

ReturnType = Literal["reward", "per_position"] | None

def pooled_positions(
    tokens: Int[Tensor, "batch pos"] | None,
    attention_mask: Int[Tensor, "batch pos"] | None,
    pad_token_id: int | None,
    shape: tuple[int, int],
) -> Int[Tensor, "batch"]:
    """Index of the scoring token of each row.

    The rule of transformers' ``*ForSequenceClassification``: the rightmost token that is not
    ``pad_token_id`` (so right and left padding both work, and a trailing eos that equals the pad
    id is skipped, as HF does). Where an attention mask is given, masked positions are skipped too;
    with neither a pad id nor a mask, the last position is used.
    """
    batch, n_pos = shape
    device = (
        tokens.device if tokens is not None else attention_mask.device if attention_mask is not None else None
    )
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    if attention_mask is not None:
        valid &= attention_mask.bool()
    if tokens is not None and pad_token_id is not None:
        valid &= tokens != pad_token_id
    has_token = valid.any(dim=-1)
    if not bool(has_token.all()):
        bad = torch.nonzero(~has_token).flatten().tolist()
        raise InvalidInputError(
            f"rows {bad} have no token to score: every position is padding (pad_token_id="
            f"{pad_token_id}) or masked out. Drop those rows or fix their attention_mask."
        )
    index = torch.arange(n_pos, device=device)
    return (index * valid).argmax(dim=-1)


def exact_ambiguous_folds(
    state_dict: dict[str, Tensor], cfg: HookedTransformerConfig, center_unembed: bool = False
) -> dict[str, Tensor]:
    """The folded weights TransformerLens 3.9 would get wrong: MLP input weights of a square MLP
    and a head whose shape does not say which axis is ``d_model`` (see
    :meth:`HookedRewardModel.load_and_process_state_dict`). Empty where every shape is unambiguous.
    """
    if cfg.normalization_type not in ("LN", "RMS"):
        return {}
    layer_norm = cfg.normalization_type == "LN"  # LN: fold biases and centre, as TransformerLens
    offset = bool(getattr(cfg, "rmsnorm_uses_offset", False))
    out: dict[str, Tensor] = {}

    def gain(key: str) -> Tensor:
        w = state_dict[key].float()
        return 1.0 + w if offset else w

    if not cfg.attn_only and cfg.d_mlp == cfg.d_model and not cfg.num_experts:
        for layer in range(cfg.n_layers):
            p = f"blocks.{layer}."
            norm = p + ("ln2" if p + "ln2.w" in state_dict else "ln1")
            if norm == p + "ln1" and not (cfg.parallel_attn_mlp and p + "ln1.w" in state_dict):
                continue
            w = gain(norm + ".w")
            W_in = state_dict[p + "mlp.W_in"].float()  # [d_model, d_mlp]
            if layer_norm and norm + ".b" in state_dict:
                b_in = state_dict.get(p + "mlp.b_in")
                b_in = torch.zeros(cfg.d_mlp) if b_in is None else b_in.float()
                out[p + "mlp.b_in"] = b_in + state_dict[norm + ".b"].float() @ W_in
            W_in = W_in * w[:, None]
            out[p + "mlp.W_in"] = W_in - W_in.mean(0, keepdim=True) if layer_norm else W_in
            if cfg.gated_mlp:
                out[p + "mlp.W_gate"] = state_dict[p + "mlp.W_gate"].float() * w[:, None]
    W_U = state_dict["unembed.W_U"]  # [d_model, n_rewards]
    d_model, n_out = W_U.shape
    head_ambiguous = n_out == d_model or (layer_norm and d_model == cfg.d_vocab)
    if "ln_final.w" in state_dict and head_ambiguous:
        W_U = W_U.float()
        b_U = state_dict["unembed.b_U"].float()
        if layer_norm and "ln_final.b" in state_dict:
            b_U = b_U + state_dict["ln_final.b"].float() @ W_U
        W_U = W_U * gain("ln_final.w")[:, None]
        if layer_norm:
            W_U = W_U - W_U.mean(0, keepdim=True)
        if center_unembed:
            W_U, b_U = W_U - W_U.mean(-1, keepdim=True), b_U - b_U.mean()
        out["unembed.W_U"], out["unembed.b_U"] = W_U, b_U
    return out


def load_with_exact_folds(
    model: HookedTransformer, state_dict: dict[str, Tensor], *, fold_ln: bool, **processing: bool
) -> None:
    """TransformerLens's ``load_and_process_state_dict`` on ``model``, then the folds it gets
    wrong (:func:`exact_ambiguous_folds`) written over its result, in place (the stored layout
    is kept). ``processing``: TransformerLens's other keyword arguments."""
    center_unembed = processing.get("center_unembed", True)
    exact = exact_ambiguous_folds(state_dict, model.cfg, center_unembed) if fold_ln else {}
    HookedTransformer.load_and_process_state_dict(model, state_dict, fold_ln=fold_ln, **processing)
    if exact:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for key, value in exact.items():
                params[key].copy_(value)


class HookedRewardModel(TextMethods, HookedTransformer):
    """A HookedTransformer whose forward returns the pooled reward.

    Build one with :func:`tl_reward.load_reward_model`. Every TransformerLens trunk hook keeps its
    name; ``run_with_cache``, ``run_with_hooks`` and ``ActivationCache`` methods work unchanged.

    The pooled reward needs the last block at the scoring tokens only: while nothing observes the
    last block or the final norm (no TransformerLens hook, cache or torch hook on them), it runs
    there alone (keys and values still projected everywhere), the same reward for less work. Any
    hook there, or ``fast_pooling = False``, gives the full forward.
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        tokenizer=None,
        *,
        pad_token_id: int | None = None,
        label_names: Sequence[str] | None = None,
        objective: int | Sequence[float] | Tensor | None = None,
    ) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="HookedTransformer is deprecated", category=DeprecationWarning
            )
            # moved below, unless the parameters are still empty (meta: see loading._build)
            super().__init__(cfg, tokenizer=None, move_to_device=False)
        if not any(p.is_meta for p in self.parameters()):
            self.move_model_modules_to_device()
        # Kept as given: TransformerLens's set_tokenizer would mutate it (and may reach the hub).
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        n = cfg.d_vocab_out
        self.label_names: tuple[str, ...] = (
            tuple(label_names) if label_names is not None else tuple(f"reward_{i}" for i in range(n))
        )
        self.reward_head = RewardHead()
        self.fast_pooling = True
        self.register_buffer("objective_weights", None, persistent=False)
        self.setup()
        self.set_objective(objective)
        self._use_linear_layout()

    def _use_linear_layout(self) -> None:
        """Store the projection weights in the memory layout their matmuls read.

        TransformerLens reshapes ``W_Q/W_K/W_V`` ([head, d_model, d_head]) to
        ``[(head d_head), d_model]``, ``W_O`` to ``[d_model, (head d_head)]`` and a gated MLP's
        weights to their transposes before each ``F.linear``; in its default (contiguous) layout
        every one of those is a copy of the weight, in every forward (a quarter of a forward's
        time on a CPU). Here each parameter keeps its shape and values but is stored so that the
        reshape is a view (``nn.Linear``'s layout, as in the HF model). Loading copies into the
        parameters in place and moving them keeps strides, so the layout survives both.
        """
        from transformer_lens.components.mlps.gated_mlp import GatedMLP

        def store(param: Tensor, order: tuple[int, ...]) -> None:
            # memory order ``order`` (outermost first), same shape and values
            inverse = tuple(order.index(i) for i in range(param.ndim))
            param.data = param.data.permute(order).contiguous().permute(inverse)

        for block in self.blocks:
            for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
                w = block.attn._parameters.get(name)
                if w is not None and w.ndim == 3:  # [head, d_model, d_head] -> (head, d_head, d_model)
                    store(w, (0, 2, 1))
            w = block.attn._parameters.get("W_O")
            if w is not None and w.ndim == 3:  # [head, d_head, d_model] -> (d_model, head, d_head)
                store(w, (2, 0, 1))
            if isinstance(block.mlp, GatedMLP):  # [in, out] -> (out, in)
                for name in ("W_gate", "W_in", "W_out"):
                    store(block.mlp._parameters[name], (1, 0))

    def load_and_process_state_dict(
        self,
        state_dict: dict[str, Tensor],
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """TransformerLens's, with the norm folds whose layout its shapes do not tell done here.

        TransformerLens 3.9 folds a norm into the MLP's input weights and into the unembedding
        (the reward head) by guessing which axis is ``d_model`` from the shapes: with a square MLP
        (``d_mlp == d_model``) or a head with ``d_model`` outputs it scales the wrong axis, and
        with ``d_vocab == d_model`` it centres the head along its outputs. Those weights are
        folded here in the HookedTransformer layout (``W_in`` [d_model, d_mlp], ``W_U``
        [d_model, n_rewards]) and written over TransformerLens's result.
        """
        if fold_ln and not self.reward_head.is_linear:
            raise UnsupportedConfigError(
                f"fold_ln=True with a {self.head_kind} head: TransformerLens would fold the "
                "final norm into the unused unembed, not into the head, and the head would read "
                "an unweighted state. Keep the norms unfolded (fold_ln=False)."
            )
        load_with_exact_folds(
            self,
            state_dict,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )

    def remove_all_hook_fns(
        self,
        direction: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """TransformerLens's, visiting only the hook points that hold hooks.

        TransformerLens calls this on leaving every ``hooks()`` context (``run_with_hooks``,
        ``run_with_cache``) and reassigns both hook lists of every hook point, through
        ``nn.Module.__setattr__``, also where they are empty: about 4 ms per call on a 6-layer
        model on a CPU, 5-6% of a patching grid's time. Removing from an empty list changes
        nothing, so those points are skipped; the rest is TransformerLens's ``remove_hooks``.
        """
        if direction not in ("fwd", "bwd", "both"):
            raise ValueError(f"Invalid direction {direction}")
        for hp in self.hook_points():
            if hp.fwd_hooks or hp.bwd_hooks:
                hp.remove_hooks(direction, including_permanent=including_permanent, level=level)

    # ------------------------------------------------------------------ the head
    @property
    def n_rewards(self) -> int:
        """Number of outputs of the reward head (1 for a scalar reward model)."""
        return self.cfg.d_vocab_out

    @property
    def head_kind(self) -> str:
        """The reward head's kind: ``linear``, ``mlp``, ``gated`` or ``custom``."""
        return self.reward_head.kind

    @property
    def has_linear_head(self) -> bool:
        """Whether the reward is ``W_R^T h + b_R`` (the tools that read ``W_R`` apply)."""
        return self.reward_head.is_linear

    def set_reward_head(self, head: nn.Module) -> None:
        """Use ``head`` (a :mod:`tl_reward.heads` head, or any module mapping the pooled state
        ``[batch, d_model]`` to ``[batch, n_rewards]``) as the reward head, on the model's
        device and dtype, with its hook points registered. Its output count must be the model's
        ``n_rewards`` (a nonlinear head's model is built with that many outputs)."""
        head = as_reward_head(head)
        n_out = head.n_outputs(self.cfg.d_model)
        if n_out is not None and n_out != self.n_rewards:
            raise HeadError(
                f"the {head.kind} head returns {n_out} rewards but this model was built for "
                f"{self.n_rewards}; build the model with that many outputs"
            )
        self.reward_head = head.to(device=output_device(self.cfg), dtype=self.cfg.dtype)
        self.setup()

    def _linear_head(self) -> None:
        if not self.reward_head.is_linear:
            raise LinearHeadRequiredError(
                f"this model's reward head is {self.head_kind!r}, not linear: it has no W_R, so no "
                "reward direction and no exact direct attribution. Tools for any head: "
                "reward_lens (the head applied to each layer's residual), head_attribution "
                "(gradient x input or integrated gradients, with their completeness gap), "
                "activation_patch / attribution_patch and run_with_hooks on "
                "reward_head.hook_* (the model's output)."
            )

    @property
    def W_R(self) -> Float[Tensor, "d_model n_rewards"]:
        """Reward head weights in the model's current basis (folded after ``fold_ln``); a
        nonlinear head has none (:class:`~tl_reward.errors.LinearHeadRequiredError`)."""
        self._linear_head()
        return self.unembed.W_U

    @property
    def b_R(self) -> Float[Tensor, "n_rewards"]:
        """Reward head bias (includes the folded final-LayerNorm bias after ``fold_ln``)."""
        self._linear_head()
        return self.unembed.b_U

    @property
    def is_scalar(self) -> bool:
        """True when the forward returns one reward per sequence (one output or an objective)."""
        return self.n_rewards == 1 or self.objective_weights is not None

    @property
    def reward_direction(self) -> Float[Tensor, "d_model"]:
        """The direction in the (final-normalised) residual stream that the scalar reward reads."""
        return self.W_R @ self._scalar_weights()

    @property
    def reward_bias(self) -> Float[Tensor, ""]:
        """The scalar reward's bias: ``reward = reward_direction . h + reward_bias``."""
        return self.b_R @ self._scalar_weights()

    def _scalar_weights(self) -> Float[Tensor, "n_rewards"]:
        if self.objective_weights is not None:
            return self.objective_weights
        if self.n_rewards == 1:
            return torch.ones(1, dtype=self.unembed.W_U.dtype, device=self.unembed.W_U.device)
        raise ObjectiveError(
            f"this head has {self.n_rewards} objectives {list(self.label_names)} and no scalar "
            "reward; choose one with model.set_objective(index or weight vector) or "
            "load_reward_model(..., objective=...)."
        )

    def set_objective(self, objective: int | Sequence[float] | Tensor | None) -> None:
        """Choose the scalar reward of a multi-objective head: an output index or a weight vector.

        ``None`` returns every objective (``[batch, n_rewards]``) for a multi-objective head.
        """
        if objective is None:
            self.objective_weights = None
            return
        n = self.n_rewards
        if isinstance(objective, bool):
            raise ObjectiveError(f"objective must be an index or a weight vector, got {objective!r}")
        if isinstance(objective, int):
            if not -n <= objective < n:
                raise ObjectiveError(
                    f"objective index {objective} is out of range for a head with {n} outputs "
                    f"{list(self.label_names)}; use 0..{n - 1}."
                )
            weights = torch.zeros(n)
            weights[objective] = 1.0
        else:
            weights = torch.as_tensor(objective, dtype=torch.float32).flatten()
            if weights.shape != (n,):
                raise ObjectiveError(
                    f"objective weight vector has {weights.numel()} entries but the head has {n} "
                    f"outputs {list(self.label_names)}; pass {n} weights or an index."
                )
            if not bool(torch.isfinite(weights).all()):
                raise ObjectiveError(f"objective weights must be finite, got {weights.tolist()}")
        self.objective_weights = weights.to(device=self.unembed.W_U.device,
                                            dtype=self.unembed.W_U.dtype)

    def _reduce(self, rewards: Float[Tensor, "... n_rewards"]) -> Tensor:
        if self.objective_weights is not None:
            return rewards @ self.objective_weights
        if self.n_rewards == 1:
            return rewards[..., 0]
        return rewards

    # ------------------------------------------------------------------ input checks
    def _check_tokens(
        self, tokens: Tensor, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if tokens.ndim == 1:
            tokens = tokens[None]
            if attention_mask is not None and attention_mask.ndim == 1:
                attention_mask = attention_mask[None]
        if tokens.ndim != 2:
            raise InvalidInputError(
                f"tokens must be [batch, pos] integer ids, got shape {tuple(tokens.shape)}"
            )
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise InvalidInputError(
                f"tokens must be integer ids, got dtype {tokens.dtype}; to start from a residual "
                "stream pass start_at_layer="
            )
        batch, n_pos = tokens.shape
        if batch == 0 or n_pos == 0:
            raise InvalidInputError(f"empty input: tokens have shape {tuple(tokens.shape)}")
        if n_pos > self.cfg.n_ctx:
            raise InvalidInputError(
                f"sequence length {n_pos} exceeds the model's n_ctx={self.cfg.n_ctx}; truncate the "
                "input, or load with load_reward_model(..., n_ctx=...) if the HF model allows more."
            )
        lo, hi = torch.aminmax(tokens)
        if int(lo) < 0 or int(hi) >= self.cfg.d_vocab:
            raise InvalidInputError(
                f"token ids must lie in [0, {self.cfg.d_vocab}) (the model's vocabulary), got ids "
                f"from {int(lo)} to {int(hi)}; was the text tokenized with another tokenizer?"
            )
        if attention_mask is not None:
            if attention_mask.shape != tokens.shape:
                raise InvalidInputError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match tokens "
                    f"shape {tuple(tokens.shape)}"
                )
            attention_mask = attention_mask.to(device=tokens.device, dtype=torch.long)
        return tokens, attention_mask

    def pooled_index(
        self,
        tokens: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        shape: tuple[int, int] | None = None,
    ) -> Int[Tensor, "batch"]:
        """Position of the scoring token of each row (see :func:`pooled_positions`)."""
        if shape is None:
            ref = tokens if tokens is not None else attention_mask
            if ref is None:
                raise InvalidInputError("pooled_index needs tokens, an attention_mask or a shape")
            shape = tuple(ref.shape)
        return pooled_positions(tokens, attention_mask, self.pad_token_id, shape)

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self,
        input: Tensor,
        attention_mask: Tensor | None = None,
        *,
        return_type: ReturnType = "reward",
        pool_index: Tensor | None = None,
        tokens: Tensor | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        shortformer_pos_embed: Tensor | None = None,
        past_kv_cache=None,
    ) -> Tensor | None:
        """Reward of each sequence.

        Args:
            input: token ids ``[batch, pos]``, or the residual stream ``[batch, pos, d_model]``
                before layer ``start_at_layer``.
            attention_mask: 1 for real tokens, 0 for padding (left or right).
            return_type: ``"reward"`` (pooled: ``[batch]`` for a scalar reward,
                ``[batch, n_rewards]`` for a multi-objective head without an objective),
                ``"per_position"`` (the head applied at every position: ``[batch, pos]`` or
                ``[batch, pos, n_rewards]``), or ``None`` (run the trunk, return nothing).
            pool_index: the scoring position of each row; computed from ``tokens`` (or ``input``
                when it holds tokens) and ``attention_mask`` when not given.
            tokens: the token ids, when ``input`` is a residual stream (for pooling).
            start_at_layer, stop_at_layer, shortformer_pos_embed, past_kv_cache: as in
                ``HookedTransformer.forward``; with ``stop_at_layer`` the residual stream is
                returned.
        """
        if return_type not in ("reward", "per_position", None):
            raise InvalidInputError(
                f"return_type must be 'reward', 'per_position' or None, got {return_type!r}"
            )
        if start_at_layer is None:
            if isinstance(input, str | list):
                raise InvalidInputError(
                    "HookedRewardModel takes token ids; score texts with model.score(texts)"
                )
            input, attention_mask = self._check_tokens(input, attention_mask)
            tokens = input
            if attention_mask is not None and past_kv_cache is None and bool(attention_mask.all()):
                attention_mask = None  # no padding: skip TransformerLens's mask bookkeeping
        elif attention_mask is not None:
            attention_mask = attention_mask.to(device=input.device, dtype=torch.long)
        if (self.fast_pooling and return_type == "reward" and start_at_layer is None
                and stop_at_layer is None
                and past_kv_cache is None and shortformer_pos_embed is None
                and self._reward_needs_scoring_tokens_only()):
            return self._forward_to_scoring_tokens(tokens, attention_mask, pool_index)
        resid = super().forward(
            input,
            return_type=None,
            padding_side="right",  # never let TransformerLens infer a mask from the tokenizer
            start_at_layer=start_at_layer,
            stop_at_layer=self.cfg.n_layers if stop_at_layer is None else stop_at_layer,
            shortformer_pos_embed=shortformer_pos_embed,
            attention_mask=attention_mask,
            past_kv_cache=past_kv_cache,
        )
        if stop_at_layer is not None:
            return resid
        normed = self.ln_final(resid)  # [batch, pos, d_model]
        head = self.reward_head
        if return_type == "per_position" and head.is_linear:
            return self._reduce(normed @ self.W_R + self.b_R)
        if pool_index is None:
            pool_index = self.pooled_index(tokens, attention_mask, shape=tuple(normed.shape[:2]))
        batch_index = torch.arange(normed.shape[0], device=normed.device)
        prompt = None
        if head.reads_prompt_end:
            prompt_index = self.prompt_end_index(tokens, attention_mask, pool_index)
            prompt = normed[batch_index, prompt_index.to(normed.device)]
        if return_type == "per_position":
            flat = normed.reshape(-1, normed.shape[-1])
            if prompt is not None:
                prompt = prompt[:, None].expand_as(normed).reshape(flat.shape)
            out = head.compute(flat, self.unembed, prompt)
            return self._reduce(out.reshape(*normed.shape[:2], out.shape[-1]))
        return self._head(normed[batch_index, pool_index.to(normed.device)], return_type, prompt)

    def step_rewards(self, text: "Text | Tensor", separator: int, *,
                     score: str | None = None) -> "StepRewards":
        """One reward per step of a text, read at each ``separator`` token (a process reward
        model; see :func:`tl_reward.process.step_rewards`)."""
        from .process import step_rewards

        return step_rewards(self, text, separator, score=score)

    def prompt_end_index(
        self, tokens: Int[Tensor, "batch pos"] | None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        pool_index: Int[Tensor, "batch"] | None = None,
    ) -> Int[Tensor, "batch"]:
        """Position of the end of the prompt in each row, where a gated head's gate reads (see
        :class:`tl_reward.heads.GatedHead`)."""
        if tokens is None:
            raise InvalidInputError(
                f"the {self.head_kind} head reads the end of the prompt, found from the token ids: "
                "pass tokens= along with a residual-stream input"
            )
        if pool_index is None:
            pool_index = self.pooled_index(tokens, attention_mask)
        return self.reward_head.prompt_end(tokens, attention_mask, pool_index).to(tokens.device)

    def _head(self, normed: Float[Tensor, "batch d_model"], return_type: ReturnType,
              prompt: Float[Tensor, "batch d_model"] | None = None) -> Tensor | None:
        """The reward head on the normalised residual at the scoring tokens (and, for a gated
        head, at the end of the prompt)."""
        rewards = self.reward_head(normed, self.unembed, prompt)
        if return_type is None:
            return None
        return self._reduce(rewards)

    # ------------------------------------------------------------------ the fast path
    def _scoring_path_supported(self) -> bool:
        """Whether this architecture's last block can run at the scoring tokens alone through the
        key-value cache: standard attention, nothing that depends on a query's index."""
        cfg = self.cfg
        return not (
            cfg.positional_embedding_type not in ("standard", "rotary") or cfg.use_attn_in
            or cfg.use_split_qkv_input or cfg.use_attn_result or cfg.attn_only
            or getattr(cfg, "clip_qkv", None) is not None
            or getattr(cfg, "use_logn_attn", False) or getattr(cfg, "use_dynamic_ntk_rope", False)
            or cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM",
                                             "Olmo3ForCausalLM")
        )

    def _reward_needs_scoring_tokens_only(self) -> bool:
        """Whether the reward can be computed with the last block run at the scoring tokens only:
        a supported architecture and nothing observing the last block or the final norm (no hooks
        of any kind on them: a cache or a hook there sees every position, so it gets the full
        forward)."""
        if not self._scoring_path_supported() or self.reward_head.reads_prompt_end:
            return False
        nn_hooks = torch.nn.modules.module
        if (nn_hooks._global_forward_hooks or nn_hooks._global_forward_pre_hooks
                or nn_hooks._global_backward_hooks or nn_hooks._global_backward_pre_hooks):
            return False
        for part in (self.blocks[-1], self.ln_final):
            for m in part.modules():
                if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                        or m._backward_pre_hooks):
                    return False
        return True

    def _forward_to_scoring_tokens(
        self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None,
        pool_index: Int[Tensor, "batch"] | None,
    ) -> Tensor:
        """The pooled reward with the last block run where the reward is read (blocks before it
        as usual; see :meth:`_last_block_at_scoring_tokens`)."""
        last = self.cfg.n_layers - 1
        x = super().forward(tokens, return_type=None, padding_side="right", stop_at_layer=last,
                            attention_mask=attention_mask)
        if pool_index is None:
            pool_index = self.pooled_index(tokens, attention_mask, shape=tuple(x.shape[:2]))
        return self._last_block_at_scoring_tokens(x, attention_mask, pool_index)

    def _last_block_at_scoring_tokens(
        self,
        x: Float[Tensor, "batch new_pos d_model"],
        attention_mask: Int[Tensor, "batch pos"] | None,
        pool_index: Int[Tensor, "batch"],
        past: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The reward from the last block's input, the block run at the scoring tokens only.

        ``x`` holds the last block's input at positions ``start ..`` (``start`` = the length of
        ``past``, the last layer's keys and values of the earlier positions as TransformerLens's
        key-value cache stores them). The block's keys and values are projected at the positions
        before each row's scoring token; its queries, attention and MLP then run at the scoring
        token alone, through TransformerLens's key-value cache. Rows whose scoring token comes
        earlier get their keys left-padded and masked, the way TransformerLens runs left-padded
        batches, so rotary positions come out the same. The same function as the full forward
        (checked against it, and against HF, in the tests).
        """
        last = self.cfg.n_layers - 1
        n_past = int(pool_index.max())
        aligned = bool((pool_index == n_past).all())
        x = x.to(block_device(self.cfg, last))  # where the last block lives (layers split)
        if attention_mask is not None:
            attention_mask = attention_mask.to(x.device)
        batch = x.shape[0]
        start = past[0].shape[1] if past is not None else 0
        pool_index = pool_index.to(x.device)
        rows = torch.arange(batch, device=x.device)
        query = x[rows, pool_index - start][:, None]  # [batch, 1, d_model]
        block = self.blocks[last]
        normed = block.ln1(x[:, : n_past - start])
        _, k, v = block.attn.calculate_qkv_matrices(normed[:, :1], normed, normed)
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        real = (attention_mask[:, :n_past] if attention_mask is not None
                else torch.ones(batch, n_past, dtype=torch.long, device=x.device))
        if aligned:
            mask = attention_mask[:, : n_past + 1] if attention_mask is not None else None
        else:  # right-align each row's past so that every query sits at position n_past
            src = torch.arange(n_past, device=x.device)[None] - (n_past - pool_index)[:, None]
            keep = src >= 0
            src = src.clamp(min=0)
            k = k.gather(1, src[:, :, None, None].expand(-1, -1, *k.shape[2:]))
            v = v.gather(1, src[:, :, None, None].expand(-1, -1, *v.shape[2:]))
            real = torch.where(keep, real.gather(1, src), 0)
            mask = torch.cat([real, torch.ones(batch, 1, dtype=real.dtype, device=x.device)], 1)
        empty = torch.empty(0, device=x.device)
        entries = [TransformerLensKeyValueCacheEntry(past_keys=empty, past_values=empty, frozen=True)
                   for _ in range(last)]
        entries.append(TransformerLensKeyValueCacheEntry(past_keys=k, past_values=v, frozen=True))
        cache = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=real,
                                             frozen=True)
        out = super().forward(query, return_type=None, padding_side="right", start_at_layer=last,
                              stop_at_layer=self.cfg.n_layers, attention_mask=mask,
                              past_kv_cache=cache)
        return self._head(self.ln_final(out)[:, 0], "reward")

    # ------------------------------------------------------------------ TextReward
    # the interface probes and CART discovery call (tl_reward.text_reward.TextReward)
    @property
    def unit_model(self) -> "HookedRewardModel":
        """The model whose hooks hold circuit units: this model itself."""
        return self

    def encode_texts(self, texts: Sequence[Text]) -> RewardInputs:
        """Texts tokenized and right-padded, read out at each row's scoring token."""
        tokens, mask = self.pad(self.tokenize(list(texts)))
        index = self.pooled_index(tokens, mask)
        return RewardInputs(tokens, mask, one_hot_read_weights(index, tuple(tokens.shape),
                                                               tokens.device), index)

    def score_texts(self, texts: Sequence[Text], *, batch_size: int = 16,
                    progress: bool = True) -> Tensor:
        """The reward of each text (:meth:`score`)."""
        return self.score(list(texts), batch_size=batch_size, progress=progress)

    def reward_runner(self, inputs: RewardInputs, first_layer: int = 0):
        """``fwd_hooks -> rewards`` on ``inputs``, each forward starting at ``first_layer`` from
        a cached residual stream (exact: hooks before that layer are not allowed)."""
        tokens, mask, pool = inputs.tokens, inputs.attention_mask, inputs.read_index
        if pool is None:
            pool = self.pooled_index(tokens, mask)
        if first_layer <= 0:
            def run_full(fwd_hooks):
                with self.hooks(fwd_hooks=fwd_hooks):
                    return self(tokens, attention_mask=mask, pool_index=pool)
            return run_full
        with torch.no_grad():
            resid = self(tokens, attention_mask=mask, stop_at_layer=first_layer)

        def run(fwd_hooks):
            with self.hooks(fwd_hooks=fwd_hooks):
                return self(resid, attention_mask=mask, start_at_layer=first_layer,
                            pool_index=pool, tokens=tokens)  # tokens: a gated head's prompt end
        return run
