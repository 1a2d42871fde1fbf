"""The text side of :class:`~tl_reward.model.HookedRewardModel`: tokenizing strings and chats,
padding, input checks, and scoring texts and preference pairs (:class:`PairScores`).

:class:`TextMethods` is a base class of ``HookedRewardModel``; its methods use the model's
tokenizer, its token checks and its forward.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

from ._device import readout_dtype
from ._memory import rows_that_fit
from .errors import InvalidInputError, ObjectiveError

Text = str | list[dict[str, str]]
"""A text to score: a plain string, or a chat as a list of ``{"role", "content"}`` messages."""

UNKNOWN_TOKEN_SHARE = 0.05
"""Share of the tokenizer's unknown token above which texts are flagged (the tokenizer does not
know their words, so every such word reads the same to the model)."""


class SuspectInputWarning(UserWarning):
    """Inputs that give numbers without meaning: mostly unknown tokens, or a pair whose chosen and
    rejected texts tokenise identically (margin 0 by construction)."""


class TextMethods:
    """Texts in, rewards out: the methods of :class:`~tl_reward.model.HookedRewardModel` that
    take strings and chats."""

    def tokenize(self, texts: Sequence[Text]) -> list[list[int]]:
        """Token ids of each text, special tokens included, no padding, no truncation.

        Chats (lists of ``{"role", "content"}`` messages) go through the tokenizer's chat template.
        """
        if self.tokenizer is None:
            raise InvalidInputError(
                "this model has no tokenizer; pass one to load_reward_model(model, tokenizer) "
                "or call the model on token ids"
            )
        ids = []
        for i, text in enumerate(texts):
            if isinstance(text, str):
                ids.append(self.tokenizer(text)["input_ids"])
            elif isinstance(text, list | tuple) and all(isinstance(m, dict) for m in text) and text:
                if getattr(self.tokenizer, "chat_template", None) is None:
                    raise InvalidInputError(
                        f"text {i} is a chat but the tokenizer has no chat_template; set "
                        "tokenizer.chat_template or pass rendered strings"
                    )
                rendered = self.tokenizer.apply_chat_template(list(text), tokenize=False)
                ids.append(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
            else:
                raise InvalidInputError(
                    f"text {i} must be a string or a non-empty list of chat messages, got "
                    f"{type(text).__name__}"
                )
            if len(ids[-1]) == 0:
                raise InvalidInputError(f"text {i} tokenizes to no tokens")
            if len(ids[-1]) > self.cfg.n_ctx:
                raise InvalidInputError(
                    f"text {i} has {len(ids[-1])} tokens, more than n_ctx={self.cfg.n_ctx}; "
                    "shorten it (tl_reward never truncates silently)"
                )
        message = self._unknown_token_problem(ids)
        if message is not None:
            warnings.warn(message, SuspectInputWarning, stacklevel=2)
        return ids

    def _unknown_token_problem(self, ids: Sequence[Sequence[int]]) -> str | None:
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None:
            return None
        n_unk = sum(row.count(unk) for row in map(list, ids))
        n_all = sum(len(row) for row in ids)
        if n_all == 0 or n_unk / n_all <= UNKNOWN_TOKEN_SHARE:
            return None
        return (
            f"{n_unk} of {n_all} tokens ({n_unk / n_all:.0%}) are the tokenizer's unknown token "
            f"{self.tokenizer.unk_token!r}: it does not know these words, so the model cannot tell "
            "them apart and their rewards mean little; check that the texts fit this model's "
            "tokenizer"
        )

    def _pair_problems(self, chosen_ids: Sequence[Sequence[int]],
                       rejected_ids: Sequence[Sequence[int]]) -> list[str]:
        problems = []
        unknown = self._unknown_token_problem([*chosen_ids, *rejected_ids])
        if unknown is not None:
            problems.append(unknown)
        same = [i for i, (c, r) in enumerate(zip(chosen_ids, rejected_ids, strict=True))
                if list(c) == list(r)]
        if same:
            shown = ", ".join(map(str, same[:10])) + (", ..." if len(same) > 10 else "")
            problems.append(
                f"{len(same)} of {len(chosen_ids)} pairs (pair {shown}) have chosen and rejected "
                "texts that tokenise identically: their margin is 0 by construction"
                + (" (the unknown token hides their differences)" if unknown else "")
            )
        return problems

    def input_problems(self, chosen: Sequence[Text], rejected: Sequence[Text]) -> list[str]:
        """What makes these pairs' numbers meaningless, one sentence each (empty when nothing):
        more than ``UNKNOWN_TOKEN_SHARE`` of the tokens unknown to the tokenizer, or pairs whose
        chosen and rejected texts tokenise to the same ids. :meth:`score_pairs` warns
        (:class:`SuspectInputWarning`) with these; the CLI refuses them unless ``--force``."""
        if len(chosen) != len(rejected):
            raise InvalidInputError(
                f"chosen has {len(chosen)} texts but rejected has {len(rejected)}; pairs must match"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SuspectInputWarning)
            return self._pair_problems(self.tokenize(list(chosen)), self.tokenize(list(rejected)))

    # ------------------------------------------------------------------ TransformerLens habits
    def _pad_id(self) -> int | None:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None

    def _text_ids(self, input: "Text | Sequence[Text]", prepend_bos: bool | None,
                  truncate: bool) -> list[list[int]]:
        texts = [input] if _is_one_text(input) else list(input)
        if prepend_bos is None and not truncate:
            return self.tokenize(texts)
        ids = []
        for i, text in enumerate(texts):
            if prepend_bos is False or not isinstance(text, str):  # a fragment, or a chat
                row = self.tokenize([text])[0] if not isinstance(text, str) else (
                    self.tokenizer(text, add_special_tokens=False)["input_ids"])
            else:
                row = self.tokenizer(text)["input_ids"]
                bos = getattr(self.tokenizer, "bos_token_id", None)
                if prepend_bos and bos is not None and row[:1] != [bos]:
                    row = [bos, *row]
            if truncate:
                row = row[: self.cfg.n_ctx]
            if not row:
                raise InvalidInputError(f"text {i} tokenizes to no tokens")
            if len(row) > self.cfg.n_ctx:
                raise InvalidInputError(
                    f"text {i} has {len(row)} tokens, more than n_ctx={self.cfg.n_ctx}; shorten "
                    "it or pass truncate=True"
                )
            ids.append(row)
        return ids

    def to_tokens_and_mask(
        self,
        input: "Text | Sequence[Text]",
        *,
        padding_side: Literal["left", "right"] = "right",
        prepend_bos: bool | None = None,
        truncate: bool = False,
        move_to_device: bool = True,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """``(tokens, attention_mask)`` of one text or a list, as the reward model scores them:
        the HF tokenizer's own special tokens, chats (lists of ``{"role", "content"}`` messages)
        through its chat template, padded on ``padding_side`` with the pad id.
        ``model(tokens, attention_mask=mask)`` gives :meth:`score`'s rewards.

        ``prepend_bos``: ``None`` (default) tokenises as the HF tokenizer does; ``False`` adds no
        special tokens (a fragment of a text); ``True`` also puts the BOS token first when the
        tokenizer does not. ``truncate=True`` cuts each text to ``n_ctx`` (otherwise a longer
        text is an error).
        """
        if self.tokenizer is None:
            raise InvalidInputError(
                "this model has no tokenizer; pass one to load_reward_model(model, tokenizer)"
            )
        if padding_side not in ("left", "right"):
            raise InvalidInputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        ids = self._text_ids(input, prepend_bos, truncate)
        n_pos = max(len(row) for row in ids)
        pad_id = self._pad_id()
        if pad_id is None and any(len(row) != n_pos for row in ids):
            raise InvalidInputError(
                "the texts differ in length and neither the model nor its tokenizer has a pad "
                "token; set tokenizer.pad_token (e.g. to its eos token) or tokenise one at a time"
            )
        tokens = torch.full((len(ids), n_pos), 0 if pad_id is None else pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), n_pos), dtype=torch.long)
        for row, x in enumerate(ids):
            span = slice(0, len(x)) if padding_side == "right" else slice(n_pos - len(x), n_pos)
            tokens[row, span] = torch.as_tensor(x, dtype=torch.long)
            mask[row, span] = 1
        if move_to_device:
            tokens, mask = tokens.to(self.cfg.device), mask.to(self.cfg.device)
        return tokens, mask

    def to_tokens(  # type: ignore[override]
        self,
        input: "Text | Sequence[Text]",
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = False,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]`` of one text or a list, as TransformerLens's ``to_tokens``,
        with the reward model's HF tokenizer (see :meth:`to_tokens_and_mask` for the arguments).

        Texts of different lengths are right-padded with the pad id: ``model(tokens)`` then gives
        the same rewards as with the mask (attention is causal and the reward is read at the last
        non-pad token, as HF does). Left padding needs the mask: use :meth:`to_tokens_and_mask`.
        Unlike TransformerLens, a text longer than ``n_ctx`` is an error unless ``truncate=True``.
        """
        tokens, mask = self.to_tokens_and_mask(
            input, padding_side=padding_side or "right", prepend_bos=prepend_bos,
            truncate=truncate, move_to_device=move_to_device,
        )
        if padding_side == "left" and not bool(mask.all()):
            raise InvalidInputError(
                "left-padded tokens need their attention mask: tokens, mask = "
                "model.to_tokens_and_mask(texts, padding_side='left'); "
                "model(tokens, attention_mask=mask)"
            )
        return tokens

    def to_str_tokens(  # type: ignore[override]
        self, input, prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token as a string, as TransformerLens's ``to_str_tokens``: a text, a chat (its
        chat template applied), token ids ``[pos]`` / ``[1, pos]``, or a list of texts (a list of
        lists). Texts are tokenised as :meth:`to_tokens` does."""
        if _is_one_text(input):
            input = self.to_tokens(input, prepend_bos=prepend_bos, move_to_device=False)[0]
        elif isinstance(input, list | tuple) and input and all(_is_one_text(t) for t in input):
            return [self.to_str_tokens(t, prepend_bos=prepend_bos) for t in input]
        return super().to_str_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)

    def to_single_token(self, string: str) -> int:
        """The id of ``string``, which must be exactly one token (no special tokens added)."""
        ids = self._text_ids(string, False, False)[0] if string else []
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids) if ids else []
            raise InvalidInputError(
                f"{string!r} is {len(ids)} tokens {pieces}, not a single token; use to_tokens"
            )
        return ids[0]

    def get_token_position(  # type: ignore[override]
        self, single_token: str | int, input, mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None, padding_side: Literal["left", "right"] | None = None,
    ) -> int:
        """Position of ``single_token`` (a string of one token, or an id) in a text, a chat or
        token ids ``[pos]`` / ``[1, pos]``, as TransformerLens's ``get_token_position``."""
        if _is_one_text(input):
            input = self.to_tokens(input, prepend_bos=prepend_bos, move_to_device=False)
        token = self.to_single_token(single_token) if isinstance(single_token, str) else single_token
        tokens = torch.as_tensor(input)
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise InvalidInputError(
                f"get_token_position takes one sequence, got tokens of shape {tuple(tokens.shape)}"
            )
        if mode not in ("first", "last"):
            raise InvalidInputError(f"mode must be 'first' or 'last', got {mode!r}")
        where = (tokens == token).nonzero().flatten()
        if len(where) == 0:
            raise InvalidInputError(f"token {single_token!r} (id {token}) is not in the input")
        return int(where[0] if mode == "first" else where[-1])

    def pad(
        self, ids: Sequence[Sequence[int]]
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Right-pad token id lists into ``(tokens, attention_mask)`` on the model's device."""
        pad_id = self.pad_token_id
        if pad_id is None and self.tokenizer is not None:
            pad_id = self.tokenizer.pad_token_id
        return right_pad(ids, 0 if pad_id is None else pad_id, self.cfg.device)

    @torch.no_grad()
    def score(
        self, texts: Text | Sequence[Text], *, batch_size: int = 16, progress: bool = True
    ) -> Tensor:
        """Reward of each text: ``[n]`` for a scalar reward, ``[n, n_rewards]`` otherwise.

        Texts are sorted by length into batches of ``batch_size`` (right padding, attention
        mask, HF pooling), with a progress bar unless ``progress=False``. In the model's dtype,
        float32 at least. Texts that are mostly the tokenizer's unknown token raise a
        :class:`SuspectInputWarning`.
        """
        if isinstance(texts, str) or (
            isinstance(texts, list) and texts and isinstance(texts[0], dict)
        ):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise InvalidInputError("score() got no texts")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        return self._score_ids(self.tokenize(texts), batch_size, progress)

    @torch.no_grad()
    def _score_ids(self, ids: list[list[int]], batch_size: int, progress: bool) -> Tensor:
        from tqdm.auto import tqdm

        # at most the rows whose forward fits the memory budget (tl_reward.set_memory_budget)
        batch_size = rows_that_fit(self.cfg, max(len(x) for x in ids), batch_size)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        chunks = []
        for start in tqdm(
            range(0, len(order), batch_size), desc="scoring", disable=not progress, leave=False
        ):
            batch = order[start : start + batch_size]
            tokens, mask = self.pad([ids[i] for i in batch])
            chunks.append(self(tokens, attention_mask=mask))
        sorted_rewards = torch.cat(chunks)
        # float32 at least: a half-precision model's rewards, and the margins taken from them
        out = torch.empty_like(sorted_rewards, dtype=readout_dtype(self))
        out[torch.as_tensor(order, device=out.device)] = sorted_rewards.to(out.dtype)
        return out

    def score_pairs(
        self,
        chosen: Sequence[Text],
        rejected: Sequence[Text],
        *,
        batch_size: int = 16,
        progress: bool = True,
    ) -> "PairScores":
        """Rewards of chosen and rejected responses and their margin (chosen - rejected).

        Warns (:class:`SuspectInputWarning`) when the texts are mostly unknown tokens or a pair's
        chosen and rejected texts tokenise identically (see :meth:`input_problems`).
        """
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise InvalidInputError("score_pairs takes two lists of texts, not single strings")
        if len(chosen) != len(rejected):
            raise InvalidInputError(
                f"chosen has {len(chosen)} texts but rejected has {len(rejected)}; pairs must match"
            )
        if not chosen:
            raise InvalidInputError("score_pairs() got no pairs")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        with warnings.catch_warnings():  # warned once below, for the pairs
            warnings.simplefilter("ignore", SuspectInputWarning)
            ids_c, ids_r = self.tokenize(list(chosen)), self.tokenize(list(rejected))
        for problem in self._pair_problems(ids_c, ids_r):
            warnings.warn(problem, SuspectInputWarning, stacklevel=2)
        both = self._score_ids(ids_c + ids_r, batch_size, progress)
        n = len(chosen)
        return PairScores(chosen=both[:n], rejected=both[n:], label_names=self.label_names)


def right_pad(ids: Sequence[Sequence[int]], pad_id: int,
              device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Token id lists right-padded with ``pad_id`` into ``(tokens, attention_mask)`` on ``device``."""
    n_pos = max(len(x) for x in ids)
    tokens = torch.full((len(ids), n_pos), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), n_pos), dtype=torch.long)
    for row, x in enumerate(ids):
        tokens[row, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    return tokens.to(device), mask.to(device)


def _is_one_text(x: object) -> bool:
    """A string, or one chat: a non-empty list of message dicts."""
    return isinstance(x, str) or (
        isinstance(x, list | tuple) and bool(x) and all(isinstance(m, dict) for m in x)
    )


@dataclass(frozen=True)
class PairScores:
    """Rewards of preference pairs: ``chosen``, ``rejected`` and ``margin`` (chosen - rejected)."""

    chosen: Tensor
    rejected: Tensor
    label_names: tuple[str, ...] = ("reward",)

    @property
    def margin(self) -> Tensor:
        return self.chosen - self.rejected

    @property
    def accuracy(self) -> float:
        """Fraction of pairs whose chosen response gets the higher reward (scalar rewards only)."""
        if self.margin.ndim != 1:
            raise ObjectiveError(
                "accuracy needs a scalar reward; this head returns several objectives: choose one "
                "with model.set_objective(...)"
            )
        return float((self.margin > 0).float().mean())

    def to_dataframe(self):
        """One row per pair: chosen, rejected, margin (one column set per objective)."""
        import pandas as pd

        if self.margin.ndim == 1:
            return pd.DataFrame(
                {
                    "chosen": self.chosen.cpu().numpy(),
                    "rejected": self.rejected.cpu().numpy(),
                    "margin": self.margin.cpu().numpy(),
                }
            )
        cols = {}
        for k, name in enumerate(self.label_names):
            cols[f"chosen_{name}"] = self.chosen[:, k].cpu().numpy()
            cols[f"rejected_{name}"] = self.rejected[:, k].cpu().numpy()
            cols[f"margin_{name}"] = self.margin[:, k].cpu().numpy()
        return pd.DataFrame(cols)

    def plot(self, *, scenarios: Sequence[str] | None = None, nbins: int = 40):
        """A plotly histogram of the margins (chosen - rejected) with the zero line: pairs right of
        it are ranked correctly. ``scenarios`` (one label per pair, e.g. ``data.scenarios``)
        colours the bars; a multi-objective head gets one panel per objective."""
        import pandas as pd
        import plotly.express as px

        margin = self.margin.detach().float().cpu()
        if scenarios is not None and len(scenarios) != margin.shape[0]:
            raise InvalidInputError(
                f"scenarios has {len(scenarios)} labels for {margin.shape[0]} pairs"
            )
        labels = list(scenarios) if scenarios is not None else None
        if margin.ndim == 1:
            df = pd.DataFrame({"margin": margin.numpy(), "scenario": labels})
            title = f"{len(df)} pairs, accuracy {self.accuracy:.1%}"
            facet = None
        else:
            df = pd.DataFrame([
                {"margin": float(margin[i, k]), "objective": name,
                 "scenario": labels[i] if labels else None}
                for k, name in enumerate(self.label_names) for i in range(margin.shape[0])
            ])
            title, facet = f"{margin.shape[0]} pairs, margin per objective", "objective"
        fig = px.histogram(df, x="margin", color="scenario" if labels else None, nbins=nbins,
                           facet_col=facet, barmode="overlay", title=title,
                           labels={"margin": "margin (chosen - rejected)"})
        fig.add_vline(x=0, line_dash="dash", line_color="black")
        return fig
