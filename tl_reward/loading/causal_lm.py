"""Convert HF causal LMs (``*ForCausalLM``, ``GPT2LMHeadModel``) into TransformerLens models.

The same family adapters as the reward-model loader (:mod:`tl_reward.loading.llama_like`,
:mod:`tl_reward.loading.gpt`) map the config and convert the trunk through TransformerLens's
converters; only the head differs:

- :func:`load_causal_lm`: a plain ``HookedTransformer`` with the LM head as its ``unembed`` (and
  Gemma-2's final logit softcap as TransformerLens's ``output_logits_soft_cap``): the logits of
  the HF model. The implicit reward (:mod:`tl_reward.implicit`) is built from two of these.
- :func:`load_judge_reward_model`: a :class:`~tl_reward.judge.HookedJudgeModel`, a
  :class:`~tl_reward.model.HookedRewardModel` whose head is a fixed linear read-out of the
  next-token logits (``logit(Yes) - logit(No)``, or any weighted sum of token logits): one
  column ``W_U[:, tokens] @ weights``, so every reward-model tool works on a judge unchanged.
"""

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer, HookedTransformerConfig

from .._device import checked_device, checked_n_devices
from ..errors import (
    InvalidInputError,
    ModelSourceError,
    NotARewardModelError,
    UnsupportedConfigError,
)
from ..implicit import ImplicitRewardModel
from ..judge import ExpectedScoreHead, HookedJudgeModel, JudgeRead, Template
from . import (
    _adapter_for,
    _checked_config,
    _read_kwargs,
    converted_state,
    fill,
    hooked_config,
    local_directory,
    local_tokenizer,
)
from ._build import empty_parameters

logger = logging.getLogger(__name__)


def _causal_from_directory(path: Path, tokenizer: Any, **read: Any) -> tuple[Any, Any]:
    """The causal LM in ``path``, read once as ``read`` (``_read_kwargs``) says, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = _checked_config(
        path, ("ForCausalLM", "LMHeadModel"),
        "a causal LM (*ForCausalLM): it has no language-model head",
    )
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **read)
    except Exception as err:  # noqa: BLE001 - any failure to read the checkpoint, with its cause
        raise ModelSourceError(
            f"cannot load the {model_type} checkpoint in {str(path)!r} with transformers: "
            f"{type(err).__name__}: {err}"
        ) from err
    return hf_model, local_tokenizer(path, tokenizer)


def _as_causal_lm(model: Any, tokenizer: Any,
                  read: dict[str, Any] | None = None) -> tuple[Any, Any, nn.Linear]:
    """The HF causal LM object (loaded from a local directory if one is given, in the dtype and
    on the devices of ``read``) and its LM head."""
    if isinstance(model, str | os.PathLike):
        path = local_directory(model)
        model, tokenizer = _causal_from_directory(path, tokenizer, **(read or {}))
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ModelSourceError(
            f"model must be an HF causal LM (*ForCausalLM) or a local directory, got "
            f"{type(model).__name__}"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise NotARewardModelError(
            f"{type(model).__name__} has no language-model head (get_output_embeddings() is not a "
            "Linear); load the *ForCausalLM class of this architecture, e.g. AutoModelForCausalLM"
        )
    return model, tokenizer, head


def _softcap(hf_config: Any) -> float | None:
    cap = getattr(hf_config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _build(
    model: Any,
    head_weight: Tensor,
    head_bias: Tensor,
    make: Any,
    *,
    fold_ln: bool,
    center_writing_weights: bool,
    device: Any,
    dtype: torch.dtype | None,
    n_ctx: int | None,
    extra_cfg: dict[str, Any] | None = None,
    n_devices: int = 1,
):
    """The reward-model loader's construction with another head: ``head_weight`` [n_out,
    d_model] and ``head_bias`` [n_out] become ``unembed``. ``make(cfg)`` builds the model
    (under ``empty_parameters``: its weights are the HF model's, converted layer by layer)."""
    adapter = _adapter_for(model.config)
    cfg = hooked_config(
        model, adapter, head_weight.shape[0], center_writing_weights=center_writing_weights,
        n_ctx=n_ctx, dtype=dtype, device=device, extra_cfg=extra_cfg, n_devices=n_devices,
    )
    with empty_parameters():
        hooked = make(cfg)
    head = SimpleNamespace(weight=head_weight.detach(), bias=head_bias.detach(),
                           out_features=head_weight.shape[0])
    state = converted_state(model, adapter, head, cfg)
    fill(hooked, state, fold_ln=fold_ln, center_writing_weights=center_writing_weights)
    adapter.set_rotary(hooked, model.config)
    hooked.eval()
    return hooked


def load_causal_lm(
    model: Any,
    tokenizer: Any = None,
    *,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    n_ctx: int | None = None,
    n_devices: int = 1,
) -> HookedTransformer:
    """Convert an HF causal LM into a ``HookedTransformer`` with the same logits.

    Args:
        model: an HF ``*ForCausalLM`` (or ``GPT2LMHeadModel``) object, or a local directory
            written by ``save_pretrained`` (never a hub id).
        tokenizer: kept on the model as ``.tokenizer`` unchanged (loaded from the directory when
            omitted and present there).
        fold_ln, center_writing_weights: TransformerLens's weight processing; logits unchanged
            (``center_unembed`` is never applied, so log-probabilities are read from the very
            logits HF computes).
        device, dtype, n_ctx, n_devices: as :func:`tl_reward.load_reward_model` (a directory is
            read once, in ``dtype``, onto the devices).

    Gemma-2's ``final_logit_softcapping`` becomes ``cfg.output_logits_soft_cap``. Padding (left or
    right) is given by ``attention_mask``; positions start at each row's first real token.
    """
    if device is not None:
        device = checked_device(device)
    n_devices = checked_n_devices(device, n_devices)
    model, tokenizer, head = _as_causal_lm(model, tokenizer, _read_kwargs(device, dtype, n_devices))
    bias = head.bias if head.bias is not None else torch.zeros(head.out_features)
    cap = _softcap(model.config)

    def make(cfg: HookedTransformerConfig) -> HookedTransformer:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="HookedTransformer is deprecated", category=DeprecationWarning
            )
            hooked = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
        hooked.tokenizer = tokenizer  # as given: TransformerLens's set_tokenizer would mutate it
        return hooked

    hooked = _build(
        model, head.weight, bias, make, fold_ln=fold_ln,
        center_writing_weights=center_writing_weights, device=device, dtype=dtype, n_ctx=n_ctx,
        extra_cfg={"output_logits_soft_cap": cap} if cap else None, n_devices=n_devices,
    )
    logger.info("converted %s into a HookedTransformer", type(model).__name__)
    return hooked


def _token_id(tokenizer: Any, token: str | int, vocab: int) -> int:
    if isinstance(token, bool):
        raise InvalidInputError(f"a judge read token must be a string or an id, got {token!r}")
    if isinstance(token, int):
        tid = token
    else:
        if tokenizer is None:
            raise InvalidInputError(
                f"the judge reads token {token!r} but no tokenizer was given; pass the tokenizer "
                "or token ids"
            )
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise InvalidInputError(
                f"judge read token {token!r} is {len(ids)} tokens {ids} under this tokenizer, not "
                "one; pick a single-token string (e.g. with a leading space) or pass its id"
            )
        tid = ids[0]
    if not 0 <= tid < vocab:
        raise InvalidInputError(f"judge read token id {tid} is outside the vocabulary [0, {vocab})")
    return tid


def _read_weights(read: JudgeRead, yes: str | int, no: str | int) -> dict[str | int, float]:
    if isinstance(read, str):
        if read == "yes_no":
            return {yes: 1.0, no: -1.0}
        raise InvalidInputError(
            f"read={read!r} is not one of 'yes_no', 'expected_score' or a mapping "
            "{token: weight}"
        )
    if not isinstance(read, Mapping) or not read:
        raise InvalidInputError(
            f"read must be 'yes_no' or a non-empty mapping {{token: weight}}, got {read!r}"
        )
    return {k: float(v) for k, v in read.items()}


def load_judge_reward_model(
    model: Any,
    tokenizer: Any = None,
    *,
    template: Template,
    read: JudgeRead = "yes_no",
    yes: str | int = "Yes",
    no: str | int = "No",
    scores: Mapping[str | int, float] | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    n_ctx: int | None = None,
    n_devices: int = 1,
) -> HookedJudgeModel:
    """A generative judge as a reward model: a linear read-out of its next-token logits.

    The reward of a text is read at the last real token of ``template(text)``:

    - ``read="yes_no"``: ``logit(yes) - logit(no)`` (= ``log p(yes) - log p(no)``);
    - ``read={token: weight, ...}``: ``sum_k weight_k * logit(token_k)``.

    Both are ``w . ln_final(h) + b`` with ``w = W_U[:, ids] @ weights`` and
    ``b = b_U[ids] @ weights``: a one-column reward head on the final normalised residual, so the
    result is a :class:`~tl_reward.model.HookedRewardModel` and every tool (lens, attribution,
    patching, AtP, probes, CART discovery) decomposes the judge's score exactly.

    Args:
        model, tokenizer: an HF causal LM object or local directory, and its tokenizer.
        template: how a text becomes the judge prompt: a format string with one ``{text}``
            field, or a callable returning a string or a chat (rendered with the tokenizer's
            chat template and ``add_generation_prompt=True``).
        read: ``"yes_no"``, a mapping from tokens (single-token strings or ids) to weights, or
            ``"expected_score"``: ``sum_k v_k softmax(logits of the score tokens)_k`` with the
            tokens and values of ``scores`` (e.g. ``{"1": 1, ..., "5": 5}``). That one is not
            linear in the residual: its head is a nonlinear
            :class:`~tl_reward.judge.ExpectedScoreHead` (Gemma-2's final softcap included), so
            use ``head_attribution`` (integrated gradients, completeness gap reported) rather
            than direct attribution, which refuses; ``fold_ln`` is refused with it.
        yes, no: the tokens ``read="yes_no"`` contrasts.
        scores: the score tokens and their values, for ``read="expected_score"`` only.
        fold_ln, center_writing_weights, device, dtype, n_ctx, n_devices: as
            :func:`tl_reward.load_reward_model`.

    With a linear read, a model with a final logit softcap (Gemma-2's
    ``final_logit_softcapping``) is refused: the difference of capped logits is not linear in the
    residual (``read="expected_score"`` includes the cap).
    """
    if device is not None:
        device = checked_device(device)
    n_devices = checked_n_devices(device, n_devices)
    model, tokenizer, head = _as_causal_lm(model, tokenizer, _read_kwargs(device, dtype, n_devices))
    cap = _softcap(model.config)
    if read == "expected_score":
        return _expected_score_judge(
            model, tokenizer, head, cap, template=template, scores=scores, fold_ln=fold_ln,
            center_writing_weights=center_writing_weights, device=device, dtype=dtype, n_ctx=n_ctx,
            n_devices=n_devices)
    if scores is not None:
        raise InvalidInputError(f"scores= is read only with read='expected_score', not read={read!r}")
    if cap:
        raise UnsupportedConfigError(
            f"final_logit_softcapping={cap}: the judge's capped logits cap*tanh(logit/cap) make "
            "its score nonlinear in the residual, so it is not a reward head. Set "
            "model.config.final_logit_softcapping = None to analyse the uncapped logit "
            "difference (a different, monotone-per-token quantity), or use load_causal_lm."
        )
    weights_by_token = _read_weights(read, yes, no)
    vocab = head.out_features
    ids = [_token_id(tokenizer, t, vocab) for t in weights_by_token]
    if len(set(ids)) != len(ids):
        raise InvalidInputError(f"judge read tokens {list(weights_by_token)} map to repeated ids {ids}")
    w = torch.tensor(list(weights_by_token.values()), dtype=head.weight.dtype)
    column = (w @ head.weight[ids].detach())[None]  # [1, d_model]
    bias = head.bias[ids].detach() @ w if head.bias is not None else torch.zeros((), dtype=w.dtype)
    label = (
        f"logit({yes!s})-logit({no!s})" if read == "yes_no"
        else " + ".join(f"{v:g}*logit({k!s})" for k, v in weights_by_token.items())
    )

    def make(cfg: HookedTransformerConfig) -> HookedJudgeModel:
        return HookedJudgeModel(
            cfg, tokenizer, template=template, read_token_ids=tuple(ids),
            read_weights=tuple(float(x) for x in w), label_names=(label,),
        )

    judge = _build(
        model, column, bias.reshape(1), make, fold_ln=fold_ln,
        center_writing_weights=center_writing_weights, device=device, dtype=dtype, n_ctx=n_ctx,
        n_devices=n_devices,
    )
    logger.info("converted %s into a judge reading %s", type(model).__name__, label)
    return judge


def _expected_score_judge(
    model: Any, tokenizer: Any, head: nn.Linear, cap: float | None, *, template: Template,
    scores: Mapping[str | int, float] | None, fold_ln: bool, center_writing_weights: bool,
    device: Any, dtype: torch.dtype | None, n_ctx: int | None, n_devices: int = 1,
) -> HookedJudgeModel:
    """The judge whose reward is the expected score over ``scores``' tokens (see
    :func:`load_judge_reward_model`): the trunk as for any judge, the head an
    :class:`~tl_reward.judge.ExpectedScoreHead` on the final normalised residual."""
    if not isinstance(scores, Mapping) or len(scores) < 2:
        raise InvalidInputError(
            "read='expected_score' needs scores={token: value, ...} with at least two score "
            f"tokens (e.g. {{'1': 1, '2': 2, '3': 3}}), got {scores!r}"
        )
    if fold_ln:
        raise UnsupportedConfigError(
            "fold_ln=True with read='expected_score': the final norm would have to be folded "
            "into a nonlinear head; load with fold_ln=False"
        )
    ids = [_token_id(tokenizer, t, head.out_features) for t in scores]
    if len(set(ids)) != len(ids):
        raise InvalidInputError(f"score tokens {list(scores)} map to repeated ids {ids}")
    weight = head.weight[ids].detach()
    bias = head.bias[ids].detach() if head.bias is not None else torch.zeros(len(ids))
    values = torch.tensor([float(v) for v in scores.values()])
    label = "E[score] over " + ", ".join(f"{k!s}={float(v):g}" for k, v in scores.items())

    def make(cfg: HookedTransformerConfig) -> HookedJudgeModel:
        return HookedJudgeModel(
            cfg, tokenizer, template=template, read_token_ids=tuple(ids),
            read_weights=tuple(float(v) for v in values), label_names=(label,),
        )

    placeholder = torch.zeros(1, weight.shape[1], dtype=weight.dtype)  # the nonlinear head reads
    judge = _build(  # the normalised residual itself, not unembed
        model, placeholder, torch.zeros(1, dtype=weight.dtype), make, fold_ln=False,
        center_writing_weights=center_writing_weights, device=device, dtype=dtype, n_ctx=n_ctx,
        n_devices=n_devices,
    )
    judge.set_reward_head(ExpectedScoreHead(weight, bias.to(weight.dtype), values, cap))
    logger.info("converted %s into a judge reading %s", type(model).__name__, label)
    return judge


def load_implicit_reward_model(
    policy: Any,
    reference: Any = None,
    *,
    beta: float,
    length_normalize: bool = False,
    tokenizer: Any = None,
    fold_ln: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    n_ctx: int | None = None,
    n_devices: int = 1,
    response_marker: str | None = None,
) -> ImplicitRewardModel:
    """The DPO implicit reward ``beta * sum_t [log pi(y_t|..) - log pi_ref(y_t|..)]``.

    Args:
        policy, reference: HF causal LMs (objects or local ``save_pretrained`` directories; never
            hub ids), or ``HookedTransformer`` models already converted with
            :func:`load_causal_lm`. ``reference=None`` drops the reference term (SimPO-style).
        beta: the DPO temperature (> 0).
        length_normalize: average the log-ratio over the response tokens instead of summing.
        tokenizer: the shared tokenizer (taken from the policy's directory when omitted).
        fold_ln, device, dtype, n_ctx, n_devices: as :func:`load_causal_lm`, for both models.
        response_marker: where a plain-string text splits into prompt and response, for the
            tools that take texts (probes, CART discovery); see :class:`ImplicitRewardModel`.
    """

    def convert(m: Any, tok: Any) -> tuple[HookedTransformer, Any]:
        if isinstance(m, HookedTransformer):
            return m, tok if tok is not None else getattr(m, "tokenizer", None)
        hooked = load_causal_lm(m, tok, fold_ln=fold_ln, device=device, dtype=dtype, n_ctx=n_ctx,
                                n_devices=n_devices)
        return hooked, hooked.tokenizer

    pol, tokenizer = convert(policy, tokenizer)
    ref = None if reference is None else convert(reference, tokenizer)[0]
    return ImplicitRewardModel(pol, ref, beta=beta, length_normalize=length_normalize,
                               tokenizer=tokenizer, response_marker=response_marker)
