"""Generative judges as reward models.

A judge is a causal LM prompted to judge a text; its score is read from the next-token logits at
the last token of the prompt. ``logit(Yes) - logit(No)``, or any fixed weighted sum of token
logits ``sum_k a_k logit(t_k)``, equals ``(W_U[:, t] @ a) . ln_final(h) + b_U[t] @ a``: a linear
head on the final normalised residual at the last real token. :class:`HookedJudgeModel` is a
:class:`~tl_reward.model.HookedRewardModel` whose reward head is that one column, and whose
texts go through the judge template before tokenization; every reward-model tool works on it and
decomposes the judge's score exactly. Build one with :func:`tl_reward.load_judge_reward_model`.

An expected-score judge (``read="expected_score"``: ``sum_k v_k softmax(logits_S)_k`` over score
tokens ``S``, e.g. "1".."5") is not linear in the residual: its head is :class:`ExpectedScoreHead`,
a nonlinear reward head (:mod:`tl_reward.heads`), and the tools treat it as one (lens exact,
``head_attribution`` by integrated gradients with its completeness gap, patching on the score;
``direct_reward_attribution`` refuses).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformerConfig

from .errors import InvalidInputError
from .model import HookedRewardModel, Text

Template = str | Callable[[Text], Text]
"""A judge template: a format string with one ``{text}`` field, or a callable from a text to the
judge prompt (a string, or a chat rendered with ``add_generation_prompt=True``)."""

JudgeRead = Literal["yes_no", "expected_score"] | Mapping[str | int, float]


class ExpectedScoreHead(nn.Module):
    """``sum_k values_k * softmax(cap(pooled @ weight.T + bias))_k``: the expected score of a judge
    over its score tokens, from the final normalised residual ``pooled`` [batch, d_model].

    ``weight`` [k, d_model] and ``bias`` [k] are the LM head's rows of the score tokens; ``cap``
    is the model's final logit softcap (Gemma-2's ``cap * tanh(logit / cap)``), applied before the
    softmax as in the HF forward; the softmax over the score tokens alone is the renormalised
    distribution over them (the other tokens' logits cancel)."""

    def __init__(self, weight: Tensor, bias: Tensor, values: Tensor, cap: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("values", values.detach().clone())
        self.cap = cap

    def forward(self, pooled: Tensor) -> Tensor:
        logits = pooled @ self.weight.T + self.bias
        if self.cap:
            logits = self.cap * torch.tanh(logits / self.cap)
        return torch.softmax(logits.float(), dim=-1).to(pooled.dtype) @ self.values.to(pooled.dtype)


def _chat_as_lines(chat: Sequence[Mapping[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in chat)


class HookedJudgeModel(HookedRewardModel):
    """A judge LM as a :class:`HookedRewardModel`: the reward is a fixed linear read-out of the
    next-token logits at the last real token of the templated text.

    ``read_token_ids`` and ``read_weights`` record the read-out (``W_R = W_U[:, ids] @ weights``
    of the original LM head). Pooling is at the last position the attention mask keeps (a judge
    reads the last prompt token whatever its id, so no pad-id rule is applied).
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        tokenizer=None,
        *,
        template: Template,
        read_token_ids: tuple[int, ...],
        read_weights: tuple[float, ...],
        label_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(template, str):
            if template.count("{text}") != 1:
                raise InvalidInputError(
                    f"a string judge template needs exactly one '{{text}}' field, got {template!r}"
                )
        elif not callable(template):
            raise InvalidInputError(
                f"template must be a format string or a callable, got {type(template).__name__}"
            )
        super().__init__(cfg, tokenizer, pad_token_id=None, label_names=label_names)
        self.template = template
        self.read_token_ids = read_token_ids
        self.read_weights = read_weights

    def judge_prompt(self, text: Text) -> Text:
        """The prompt the judge sees for ``text`` (a string, or a chat for the chat template).

        With a string template a chat text is written as ``role: content`` lines.
        """
        if isinstance(self.template, str):
            body = text if isinstance(text, str) else _chat_as_lines(text)
            return self.template.replace("{text}", body)
        return self.template(text)

    def tokenize(self, texts: Sequence[Text]) -> list[list[int]]:
        """Token ids of each text's judge prompt (see :meth:`judge_prompt`).

        A prompt that is a chat is rendered with the tokenizer's chat template and
        ``add_generation_prompt=True``: the judge's answer is the next token.
        """
        if self.tokenizer is None:
            raise InvalidInputError(
                "this judge has no tokenizer; pass one to load_judge_reward_model or call the "
                "model on token ids of already templated prompts"
            )
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) and not (
                isinstance(text, list | tuple) and text and all(isinstance(m, dict) for m in text)
            ):
                raise InvalidInputError(
                    f"text {i} must be a string or a non-empty list of chat messages, got "
                    f"{type(text).__name__}"
                )
            prompt = self.judge_prompt(text)
            if isinstance(prompt, str):
                out.extend(super().tokenize([prompt]))
                continue
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise InvalidInputError(
                    f"the judge template returned a chat for text {i} but the tokenizer has no "
                    "chat_template; return a string or set tokenizer.chat_template"
                )
            rendered = self.tokenizer.apply_chat_template(
                list(prompt), tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
            if len(ids) > self.cfg.n_ctx:
                raise InvalidInputError(
                    f"text {i}'s judge prompt has {len(ids)} tokens, more than n_ctx="
                    f"{self.cfg.n_ctx}; shorten it (tl_reward never truncates silently)"
                )
            out.append(ids)
        return out
