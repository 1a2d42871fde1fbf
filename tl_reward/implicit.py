"""The DPO implicit reward of a policy and its reference, on TransformerLens models.

``r(x, y) = beta * sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]`` over the response
tokens ``y_t``; with ``length_normalize`` the sum becomes a mean over the response tokens, and
without a reference (SimPO-style) the reference term is dropped. Policy and reference are
``HookedTransformer`` models converted from HF causal LMs (:func:`tl_reward.load_causal_lm`), so
every TransformerLens hook of both is available. Build one with
:func:`tl_reward.load_implicit_reward_model`.

The prompt/response boundary is explicit: :class:`ResponseBatch` carries a ``response_mask``
marking the tokens whose log-probability is summed, built from a prompt and a response (texts or
chats) so that it is right under left and right padding.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from .errors import InvalidInputError
from .text_reward import FwdHooks, RewardInputs
from .texts import PairScores, Text

logger = logging.getLogger(__name__)

PaddingSide = Literal["left", "right"]


@dataclass(frozen=True)
class ResponseBatch:
    """Token ids of prompt + response sequences, padded, with the response positions marked.

    ``response_mask[b, t] == 1`` where ``tokens[b, t]`` is a response token (its log-probability
    is read from the logits at ``t - 1``, always a real token of the same row).
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    response_mask: Int[Tensor, "batch pos"]

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.tokens, self.attention_mask, self.response_mask)}
        if len(shapes) != 1 or self.tokens.ndim != 2:
            raise InvalidInputError(
                f"tokens, attention_mask and response_mask must share one [batch, pos] shape, got "
                f"{[tuple(t.shape) for t in (self.tokens, self.attention_mask, self.response_mask)]}"
            )
        if bool((self.response_mask.bool() & ~self.attention_mask.bool()).any()):
            raise InvalidInputError("response_mask marks padding positions (attention_mask 0)")
        if bool(self.response_mask[:, 0].bool().any()):
            raise InvalidInputError(
                "response_mask marks position 0: the first token has no log-probability (nothing "
                "precedes it); give each response a non-empty prompt"
            )
        if bool((self.response_mask.sum(-1) == 0).any()):
            raise InvalidInputError("some rows have no response token (response_mask all 0)")
        # the token before each response token must be real
        before = torch.zeros_like(self.response_mask, dtype=torch.bool)
        before[:, 1:] = self.response_mask[:, 1:].bool() & ~self.attention_mask[:, :-1].bool()
        if bool(before.any()):
            raise InvalidInputError("a response token follows a padding position")

    @property
    def n_response_tokens(self) -> Int[Tensor, "batch"]:
        return self.response_mask.sum(-1)

    def to(self, device: str | torch.device) -> "ResponseBatch":
        return ResponseBatch(*(t.to(device) for t in (self.tokens, self.attention_mask,
                                                       self.response_mask)))

    def __getitem__(self, rows: slice | Tensor) -> "ResponseBatch":
        return ResponseBatch(self.tokens[rows], self.attention_mask[rows], self.response_mask[rows])


def response_batch_from_ids(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    padding_side: PaddingSide = "right",
) -> ResponseBatch:
    """Pad ``prompt + response`` id lists into a :class:`ResponseBatch`."""
    if len(prompt_ids) != len(response_ids):
        raise InvalidInputError(
            f"{len(prompt_ids)} prompts but {len(response_ids)} responses; they must match"
        )
    if not prompt_ids:
        raise InvalidInputError("no sequences given")
    if padding_side not in ("left", "right"):
        raise InvalidInputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if len(p) == 0 or len(r) == 0:
            raise InvalidInputError(
                f"sequence {i} has an empty {'prompt' if len(p) == 0 else 'response'}; the implicit "
                "reward needs at least one prompt token and one response token"
            )
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    n_pos = max(lengths)
    batch = len(lengths)
    tokens = torch.full((batch, n_pos), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, n_pos), dtype=torch.long)
    response = torch.zeros((batch, n_pos), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        start = 0 if padding_side == "right" else n_pos - lengths[row]
        tokens[row, start : start + lengths[row]] = torch.as_tensor(list(p) + list(r))
        mask[row, start : start + lengths[row]] = 1
        response[row, start + len(p) : start + lengths[row]] = 1
    return ResponseBatch(tokens, mask, response)


def token_log_probs(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos"]:
    """``log p(tokens[:, t] | tokens[:, <t])`` at every position ``t >= 1`` (0 at ``t = 0``), from the
    model's logits (softcap included) in float32 at least."""
    logits = model(tokens, attention_mask=attention_mask, padding_side="right")
    return log_probs_from_logits(logits, tokens)


def log_probs_from_logits(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos"]:
    """Log-probability of each next token from the logits of the positions before it."""
    dt = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits[:, :-1].to(dt), dim=-1)
    picked = logp.gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


class ImplicitRewardModel(nn.Module):
    """The DPO implicit reward of ``policy`` against ``reference`` (see the module docstring).

    Attributes:
        policy, reference: ``HookedTransformer`` causal LMs (``reference`` may be ``None``).
        beta: the DPO temperature.
        length_normalize: average over response tokens instead of summing.
        tokenizer: shared by both models; needed for texts.
        response_marker: where a single-string text splits into prompt and response (at the
            marker's first occurrence, the marker starting the response), for the tools that
            take plain texts (probes, CART discovery: :meth:`encode_texts`); ``None`` accepts
            only ``(prompt, response)`` pairs there.
    """

    def __init__(
        self,
        policy: HookedTransformer,
        reference: HookedTransformer | None,
        *,
        beta: float,
        length_normalize: bool = False,
        tokenizer=None,
        response_marker: str | None = None,
    ) -> None:
        super().__init__()
        if response_marker is not None and (not isinstance(response_marker, str)
                                            or not response_marker):
            raise InvalidInputError(
                f"response_marker must be a non-empty string or None, got {response_marker!r}")
        if not isinstance(beta, int | float) or isinstance(beta, bool) or not beta > 0:
            raise InvalidInputError(f"beta must be a positive number, got {beta!r}")
        if reference is not None:
            for key in ("d_vocab", "d_vocab_out", "n_ctx"):
                a, b = getattr(policy.cfg, key), getattr(reference.cfg, key)
                if a != b:
                    raise InvalidInputError(
                        f"policy and reference differ in {key} ({a} vs {b}); the implicit reward "
                        "compares log-probabilities of the same tokens, so they need one vocabulary"
                    )
        self.policy = policy
        self.reference = reference
        self.beta = float(beta)
        self.length_normalize = bool(length_normalize)
        self.tokenizer = tokenizer
        self.response_marker = response_marker

    @property
    def models(self) -> dict[str, HookedTransformer]:
        """``{"policy": ..., "reference": ...}`` (reference omitted when there is none)."""
        out = {"policy": self.policy}
        if self.reference is not None:
            out["reference"] = self.reference
        return out

    def token_weights(self, batch: ResponseBatch) -> Float[Tensor, "batch pos"]:
        """The factor each response token's log-ratio gets: ``beta`` (``beta / n_response`` with
        ``length_normalize``) at response tokens, 0 elsewhere."""
        w = batch.response_mask.to(torch.float32) * self.beta
        if self.length_normalize:
            w = w / batch.n_response_tokens[:, None].to(w.dtype)
        return w

    def checked(self, batch: ResponseBatch) -> ResponseBatch:
        """``batch`` on the models' device, after checking it is a ResponseBatch within the
        context and the vocabulary (a clear InvalidInputError otherwise)."""
        if not isinstance(batch, ResponseBatch):
            raise InvalidInputError(
                f"expected a ResponseBatch (see model.encode or response_batch_from_ids), got "
                f"{type(batch).__name__}"
            )
        n_pos = batch.tokens.shape[1]
        if n_pos > self.policy.cfg.n_ctx:
            raise InvalidInputError(
                f"sequence length {n_pos} exceeds n_ctx={self.policy.cfg.n_ctx}; shorten the texts"
            )
        lo, hi = torch.aminmax(batch.tokens)
        if int(lo) < 0 or int(hi) >= self.policy.cfg.d_vocab:
            raise InvalidInputError(
                f"token ids must lie in [0, {self.policy.cfg.d_vocab}), got {int(lo)}..{int(hi)}"
            )
        return batch.to(self.policy.cfg.device)

    def log_probs(self, batch: ResponseBatch) -> dict[str, Float[Tensor, "batch pos"]]:
        """Per-token log-probabilities of each model (``policy``, ``reference``) at every position."""
        batch = self.checked(batch)
        return {name: token_log_probs(m, batch.tokens, batch.attention_mask)
                for name, m in self.models.items()}

    def per_token_rewards(self, batch: ResponseBatch) -> Float[Tensor, "batch pos"]:
        """The dense view: each response token's summand ``w_t (log pi - log pi_ref)`` (0 at
        prompt and padding positions); rows sum to the reward."""
        lp = self.log_probs(batch)
        ratio = lp["policy"] - lp["reference"] if "reference" in lp else lp["policy"]
        return ratio * self.token_weights(batch).to(ratio)

    def forward(self, batch: ResponseBatch) -> Float[Tensor, "batch"]:
        """The implicit reward of each sequence."""
        return self.per_token_rewards(batch).sum(-1)

    # ------------------------------------------------------------------ texts
    def _encode_one(self, prompt: Text, response: str | Text, i: int) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not isinstance(response, str):
                raise InvalidInputError(f"pair {i}: a string prompt needs a string response")
            prompt_ids = tok(prompt)["input_ids"]
            full_ids = tok(prompt + response)["input_ids"]
        elif isinstance(prompt, list | tuple) and prompt and all(isinstance(m, dict) for m in prompt):
            if getattr(tok, "chat_template", None) is None:
                raise InvalidInputError(
                    f"pair {i}: the prompt is a chat but the tokenizer has no chat_template"
                )
            reply = ([{"role": "assistant", "content": response}] if isinstance(response, str)
                     else list(response))
            p_text = tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            f_text = tok.apply_chat_template(list(prompt) + reply, tokenize=False)
            prompt_ids = tok(p_text, add_special_tokens=False)["input_ids"]
            full_ids = tok(f_text, add_special_tokens=False)["input_ids"]
        else:
            raise InvalidInputError(
                f"pair {i}: the prompt must be a string or a non-empty chat, got {type(prompt).__name__}"
            )
        # the longest common prefix; what the prompt has beyond it may only be special tokens
        # a tokenizer appends to every text (an end token), never a merged word
        cut = 0
        while cut < min(len(prompt_ids), len(full_ids)) and prompt_ids[cut] == full_ids[cut]:
            cut += 1
        special = set(getattr(tok, "all_special_ids", None) or ())
        if cut == 0 or any(t not in special for t in prompt_ids[cut:]) or cut == len(full_ids):
            raise InvalidInputError(
                f"pair {i}: the tokens of prompt + response do not start with the prompt's tokens "
                "(the tokenizer merges across the boundary), or the response adds no token; "
                "end the prompt with whitespace or a separator, or pass token ids through "
                "response_batch_from_ids"
            )
        return full_ids[:cut], full_ids[cut:]

    def encode(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str | Text],
        *,
        padding_side: PaddingSide = "right",
    ) -> ResponseBatch:
        """Tokenize prompt/response pairs into a :class:`ResponseBatch`.

        A string prompt is tokenized with the tokenizer's special tokens and the response is what
        ``tokenizer(prompt + response)`` adds after the prompt's tokens (refused if the prompt's
        tokens are not a prefix). A chat prompt is rendered with ``add_generation_prompt=True``;
        the response (a string: the assistant's reply, or messages) is what the full chat adds.
        """
        if self.tokenizer is None:
            raise InvalidInputError(
                "this implicit reward model has no tokenizer; pass tokenizer= to "
                "load_implicit_reward_model, or build a ResponseBatch with response_batch_from_ids"
            )
        if isinstance(prompts, str) or isinstance(responses, str):
            raise InvalidInputError("encode takes lists of prompts and responses, not strings")
        if len(prompts) != len(responses):
            raise InvalidInputError(
                f"{len(prompts)} prompts but {len(responses)} responses; they must match"
            )
        pairs = [self._encode_one(p, r, i) for i, (p, r) in enumerate(zip(prompts, responses,
                                                                          strict=True))]
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        for i, (p, r) in enumerate(pairs):
            if len(p) + len(r) > self.policy.cfg.n_ctx:
                raise InvalidInputError(
                    f"pair {i} has {len(p) + len(r)} tokens, more than n_ctx={self.policy.cfg.n_ctx}"
                )
        return response_batch_from_ids([p for p, _ in pairs], [r for _, r in pairs],
                                       pad_token_id=pad, padding_side=padding_side)

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str | Text],
        *,
        batch_size: int = 16,
        progress: bool = True,
    ) -> Float[Tensor, "batch"]:
        """Implicit reward of each (prompt, response), in batches of ``batch_size``."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        if len(prompts) != len(responses):
            raise InvalidInputError(
                f"{len(prompts)} prompts but {len(responses)} responses; they must match"
            )
        out = []
        starts = range(0, len(prompts), batch_size)
        for s in tqdm(starts, desc="scoring", disable=not progress or len(starts) < 2, leave=False):
            out.append(self(self.encode(prompts[s : s + batch_size], responses[s : s + batch_size])))
        if not out:
            raise InvalidInputError("score() got no texts")
        return torch.cat(out)

    def score_pairs(
        self,
        prompts: Sequence[Text],
        chosen: Sequence[str | Text],
        rejected: Sequence[str | Text],
        *,
        batch_size: int = 16,
        progress: bool = True,
    ) -> PairScores:
        """Implicit rewards of chosen and rejected responses to the same prompts, and the margin."""
        if not len(prompts) == len(chosen) == len(rejected):
            raise InvalidInputError(
                f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected; "
                "they must match"
            )
        both = self.score(list(prompts) * 2, list(chosen) + list(rejected),
                          batch_size=batch_size, progress=progress)
        n = len(prompts)
        return PairScores(chosen=both[:n], rejected=both[n:], label_names=("implicit_reward",))

    # ------------------------------------------------------------------ TextReward
    # the interface probes and CART discovery call (tl_reward.text_reward.TextReward): units
    # live in the policy, the reference is held fixed
    @property
    def unit_model(self) -> HookedTransformer:
        """The policy: the model whose hooks hold the units probes and discovery work on."""
        return self.policy

    @property
    def is_scalar(self) -> bool:
        return True

    def split_text(self, text: "str | tuple[Text, str | Text]", i: int = 0
                   ) -> tuple[Text, str | Text]:
        """``(prompt, response)`` of one text: a pair as given, or a string cut at the first
        ``response_marker`` (the marker starts the response)."""
        if isinstance(text, tuple | list) and len(text) == 2 and not isinstance(text[0], dict):
            return text[0], text[1]
        if not isinstance(text, str):
            raise InvalidInputError(
                f"text {i}: an implicit reward takes (prompt, response) pairs or strings, got "
                f"{type(text).__name__}"
            )
        if self.response_marker is None:
            raise InvalidInputError(
                f"text {i} is one string, but this implicit reward has no response_marker to "
                "split it into prompt and response; pass (prompt, response) pairs, or set "
                "model.response_marker (e.g. ' answer')"
            )
        cut = text.find(self.response_marker)
        if cut <= 0:
            raise InvalidInputError(
                f"text {i} ({text[:40]!r}...) has no prompt before the response marker "
                f"{self.response_marker!r}; every text needs a prompt, then the marker"
            )
        return text[:cut], text[cut:]

    def encode_texts(self, texts: Sequence) -> RewardInputs:
        """Texts (``(prompt, response)`` pairs, or strings split at ``response_marker``) as
        right-padded inputs; the read-out weights are uniform over the positions whose logits
        predict a response token."""
        if isinstance(texts, str):
            raise InvalidInputError("encode_texts takes a list of texts, not one string")
        pairs = [self.split_text(t, i) for i, t in enumerate(texts)]
        batch = self.encode([p for p, _ in pairs], [r for _, r in pairs])
        batch = self.checked(batch)
        read = torch.zeros_like(batch.response_mask, dtype=torch.float32)
        read[:, :-1] = batch.response_mask[:, 1:].to(torch.float32)
        read = read / read.sum(-1, keepdim=True)
        return RewardInputs(batch.tokens, batch.attention_mask, read, None, batch)

    @torch.no_grad()
    def score_texts(self, texts: Sequence, *, batch_size: int = 16,
                    progress: bool = True) -> Float[Tensor, "batch"]:
        """The implicit reward of each text (see :meth:`encode_texts`)."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        if not texts:
            raise InvalidInputError("score_texts() got no texts")
        starts = range(0, len(texts), batch_size)
        out = [self(self.encode_texts(texts[s : s + batch_size]).payload)
               for s in tqdm(starts, desc="scoring", disable=not progress or len(starts) < 2,
                             leave=False)]
        return torch.cat(out)

    def reward_runner(self, inputs: RewardInputs, first_layer: int = 0):
        """``fwd_hooks -> implicit rewards`` on ``inputs``, the hooks on the policy (the reference
        unchanged); each policy forward starts at ``first_layer`` from a cached residual."""
        batch = inputs.payload
        if not isinstance(batch, ResponseBatch):
            raise InvalidInputError("these inputs were not encoded by an implicit reward model "
                                    "(use model.encode_texts)")
        tokens, mask = batch.tokens, batch.attention_mask
        weights = self.token_weights(batch)
        with torch.no_grad():
            ref = (token_log_probs(self.reference, tokens, mask) if self.reference is not None
                   else None)
            resid = (self.policy(tokens, attention_mask=mask, padding_side="right",
                                 stop_at_layer=first_layer) if first_layer > 0 else None)

        def run(fwd_hooks: FwdHooks) -> Float[Tensor, "batch"]:
            with self.policy.hooks(fwd_hooks=fwd_hooks):
                if resid is None:
                    logits = self.policy(tokens, attention_mask=mask, padding_side="right")
                else:
                    logits = self.policy(resid, attention_mask=mask, padding_side="right",
                                         start_at_layer=first_layer)
            lp = log_probs_from_logits(logits, tokens)
            ratio = lp - ref.to(lp) if ref is not None else lp
            return (ratio * weights.to(lp)).sum(-1)
        return run
