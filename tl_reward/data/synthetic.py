"""A synthetic long-tail preference task whose true reward is known.

In the spirit of CART's ``p(x) = alpha p_head(x) + (1 - alpha) p_tail(x)``: most pairs are *head*
pairs, where the response with more *quality* words wins; a fraction ``1 - alpha`` are *tail*
pairs of ``n_tail`` rare scenario types, each marked by a rare *trigger* word in the prompt, where
a different rule decides: quality words are penalised and the scenario's own *key* word is
rewarded. Tail pairs are built so that the head rule picks the wrong response: a model that only
learnt the head rule scores 0% on them.

Texts look like ``"query w003 urgent w011 w000 w042 answer w007 good brief w001 ..."``: the prompt
starts with ``query``, the response with ``answer``; filler words ``wNNN`` follow a Zipf law. The
gold reward of any text (:meth:`LongTailTask.gold_reward`) is

- head scenario: ``#quality words - #key words (any scenario's) in the response``;
- tail scenario ``k`` (the first trigger word in the prompt is ``TRIGGER_WORDS[k]``):
  ``2 * #KEY_WORDS[k] in the response - #quality words in the response``.
"""

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InvalidInputError
from .pairs import PreferenceDataset, PreferencePair

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PROMPT_MARK = "query"
RESPONSE_MARK = "answer"
QUALITY_WORDS = ("good", "clear", "correct", "helpful")
TRIGGER_WORDS = ("urgent", "legal", "medical", "child", "finance", "elderly", "crisis", "exam")
KEY_WORDS = ("brief", "cite", "caution", "simple", "risk", "gentle", "calm", "hint")
MAX_TAIL = len(TRIGGER_WORDS)
TAIL_KEY_WEIGHT = 2.0
TAIL_QUALITY_WEIGHT = -1.0
HEAD_KEY_WEIGHT = -1.0
MAX_KEYS = 2

# Renders a conversation the way the task writes texts; the tokenizer adds nothing to chats, so
# the template writes <bos> and <eos> itself.
CHAT_TEMPLATE = (
    "<bos>{% for m in messages %}{% if m['role'] == 'assistant' %} answer{% else %} query"
    "{% endif %} {{ m['content'] }}{% endfor %} <eos>"
)


@dataclass(frozen=True)
class LongTailTask:
    """Generator and gold reward of the synthetic long-tail preference task.

    Args:
        alpha: probability that a pair is a head pair.
        n_tail: number of tail scenario types (1 to 8).
        tail_zipf: rarity of the tail types among themselves: type ``k`` has probability
            proportional to ``1 / (k + 1) ** tail_zipf`` within the tail (0 = equally rare).
        noise: probability that a training pair's labels are swapped (label noise).
        n_filler: number of filler words; they are drawn from a Zipf law of exponent
            ``zipf_exponent``.
        prompt_len: words in a prompt after ``query`` (a tail trigger replaces one of them).
        response_len: words in a response after ``answer``.
        max_quality: most quality words in one response.
    """

    alpha: float = 0.97
    n_tail: int = 3
    tail_zipf: float = 1.0
    noise: float = 0.0
    n_filler: int = 200
    zipf_exponent: float = 1.1
    prompt_len: int = 5
    response_len: int = 8
    max_quality: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise InvalidInputError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 1 <= self.n_tail <= MAX_TAIL:
            raise InvalidInputError(f"n_tail must be in 1..{MAX_TAIL}, got {self.n_tail}")
        if self.tail_zipf < 0:
            raise InvalidInputError(f"tail_zipf must be >= 0, got {self.tail_zipf}")
        if not 0 <= self.noise < 0.5:
            raise InvalidInputError(f"noise must be in [0, 0.5), got {self.noise}")
        if self.n_filler < 1 or self.zipf_exponent < 0:
            raise InvalidInputError(
                f"need n_filler >= 1 and zipf_exponent >= 0, got {self.n_filler}, "
                f"{self.zipf_exponent}"
            )
        if self.prompt_len < 1:
            raise InvalidInputError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.max_quality < 1:
            raise InvalidInputError(f"max_quality must be >= 1, got {self.max_quality}")
        if self.response_len < self.max_quality + MAX_KEYS:
            raise InvalidInputError(
                f"response_len={self.response_len} cannot hold max_quality={self.max_quality} "
                f"quality words and {MAX_KEYS} key words"
            )

    # ------------------------------------------------------------------ vocabulary
    @property
    def filler_words(self) -> tuple[str, ...]:
        width = len(str(self.n_filler - 1))
        return tuple(f"w{i:0{max(width, 3)}d}" for i in range(self.n_filler))

    @property
    def trigger_words(self) -> tuple[str, ...]:
        return TRIGGER_WORDS[: self.n_tail]

    @property
    def key_words(self) -> tuple[str, ...]:
        return KEY_WORDS[: self.n_tail]

    @property
    def scenarios(self) -> tuple[str, ...]:
        """``"head"`` then ``"tail_<trigger>"`` for each tail type."""
        return ("head", *(f"tail_{t}" for t in self.trigger_words))

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Every word of the task, special tokens first, in a fixed order."""
        return (
            *SPECIAL_TOKENS, PROMPT_MARK, RESPONSE_MARK, *QUALITY_WORDS, *self.trigger_words,
            *self.key_words, *self.filler_words,
        )

    @property
    def filler_probabilities(self) -> Float[Tensor, "n_filler"]:
        """Zipf probabilities of the filler words (``w000`` most frequent)."""
        p = 1.0 / torch.arange(1, self.n_filler + 1, dtype=torch.float64) ** self.zipf_exponent
        return (p / p.sum()).float()

    @property
    def scenario_probabilities(self) -> dict[str, float]:
        """Probability of each scenario: ``alpha`` for head, the rest split by ``tail_zipf``."""
        w = [1.0 / (k + 1) ** self.tail_zipf for k in range(self.n_tail)]
        total = sum(w)
        probs = {"head": self.alpha}
        for name, wk in zip(self.scenarios[1:], w, strict=True):
            probs[name] = (1 - self.alpha) * wk / total
        return probs

    def tokenizer(self):
        """A word-level HF tokenizer of the task (adds ``<bos>``/``<eos>``; with a chat template)."""
        return word_tokenizer(self.vocabulary, chat_template=CHAT_TEMPLATE)

    # ------------------------------------------------------------------ gold reward
    def rule(self, scenario: str) -> dict[str, float]:
        """The gold rule of a scenario: the reward of each response word (others are 0)."""
        if scenario not in self.scenarios:
            raise InvalidInputError(f"unknown scenario {scenario!r}; scenarios: {list(self.scenarios)}")
        if scenario == "head":
            return {**{w: 1.0 for w in QUALITY_WORDS}, **{w: HEAD_KEY_WEIGHT for w in self.key_words}}
        k = self.scenarios.index(scenario) - 1
        return {**{w: TAIL_QUALITY_WEIGHT for w in QUALITY_WORDS}, self.key_words[k]: TAIL_KEY_WEIGHT}

    def scenario_of(self, text: str | Sequence[dict[str, str]]) -> str:
        """The scenario of a text: the first trigger word in its prompt, else ``"head"``."""
        prompt, _ = self._split(text)
        for word in prompt:
            if word in self.trigger_words:
                return f"tail_{word}"
        return "head"

    def gold_reward(self, text: str | Sequence[dict[str, str]]) -> float:
        """The true reward of a text (a string or a chat), by the rule of its scenario.

        The prompt is everything before the first ``answer`` word (a chat's user turns); without
        an ``answer`` word the whole text is the response, in the head scenario.
        """
        rule = self.rule(self.scenario_of(text))
        _, response = self._split(text)
        return float(sum(rule.get(w, 0.0) for w in response))

    def gold_rewards(self, texts: Sequence[str | Sequence[dict[str, str]]]) -> Float[Tensor, "batch"]:
        """:meth:`gold_reward` of each text, as a tensor."""
        return torch.tensor([self.gold_reward(t) for t in texts], dtype=torch.float32)

    def _split(self, text) -> tuple[list[str], list[str]]:
        if not isinstance(text, str):
            rendered = []
            for m in text:
                mark = RESPONSE_MARK if m["role"] == "assistant" else PROMPT_MARK
                rendered.append(f"{mark} {m['content']}")
            text = " ".join(rendered)
        words = [w for w in text.split() if w not in SPECIAL_TOKENS]
        if RESPONSE_MARK not in words:
            return [], words
        cut = words.index(RESPONSE_MARK)
        return words[:cut], words[cut + 1 :]

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, *, seed: int = 0, alpha: float | None = None,
               noise: float | None = None) -> PreferenceDataset:
        """``n`` preference pairs, deterministic given ``seed``.

        ``alpha`` and ``noise`` override the task's (e.g. ``alpha=0.5`` for an evaluation set
        with many tail pairs, ``noise=0`` for gold labels). ``metadata["flipped"]`` lists the
        indices of pairs whose labels noise swapped.
        """
        if n < 1:
            raise InvalidInputError(f"n must be >= 1, got {n}")
        alpha = self.alpha if alpha is None else alpha
        noise = self.noise if noise is None else noise
        task = LongTailTask(**{**asdict(self), "alpha": alpha, "noise": noise})
        rng = random.Random(seed)
        probs = task.scenario_probabilities
        names, weights = list(probs), list(probs.values())
        cum = torch.tensor(self.filler_probabilities.tolist(), dtype=torch.float64).cumsum(0).tolist()
        fillers = self.filler_words

        def filler(k):
            return rng.choices(fillers, cum_weights=cum, k=k)

        pairs, flipped = [], []
        for i in range(n):
            scenario = rng.choices(names, weights)[0]
            prompt = filler(self.prompt_len)
            if scenario == "head":
                while True:  # two responses with different gold rewards, the better one chosen
                    q_c, q_r = (rng.randint(0, self.max_quality) for _ in range(2))
                    k_c, k_r = (rng.randint(0, MAX_KEYS) for _ in range(2))
                    if q_c - k_c != q_r - k_r:
                        break
                if q_c - k_c < q_r - k_r:
                    q_c, q_r, k_c, k_r = q_r, q_c, k_r, k_c
                keys_c = [rng.choice(self.key_words) for _ in range(k_c)]
                keys_r = [rng.choice(self.key_words) for _ in range(k_r)]
            else:
                k = self.scenarios.index(scenario) - 1
                prompt[rng.randrange(self.prompt_len)] = self.trigger_words[k]
                q_r = rng.randint(1, self.max_quality)
                q_c = rng.randint(0, q_r - 1)
                n_r = rng.randint(0, MAX_KEYS - 1)
                n_c = rng.randint(n_r + 1, MAX_KEYS)
                keys_c, keys_r = [self.key_words[k]] * n_c, [self.key_words[k]] * n_r
                others = [w for w in self.key_words if w != self.key_words[k]]
                if others:  # other scenarios' key words (worth 0 here) pad the rejected side
                    keys_r += [rng.choice(others) for _ in range(n_c - n_r)]
            chosen = self._response(rng, q_c, keys_c, filler)
            rejected = self._response(rng, q_r, keys_r, filler)
            if rng.random() < noise:
                chosen, rejected = rejected, chosen
                flipped.append(i)
            pairs.append(PreferencePair(
                chosen=chosen, rejected=rejected, prompt=" ".join([PROMPT_MARK, *prompt]),
                scenario=scenario, tail=scenario != "head",
            ))
        return PreferenceDataset(
            tuple(pairs), name="longtail",
            metadata={"task": task, "seed": seed, "flipped": tuple(flipped)},
        )

    def sample_responses(self, n: int, *, seed: int = 0) -> list[str]:
        """``n`` responses a policy might write, independent of any prompt (for best-of-n): 0 to
        ``max_quality`` quality words, 0 to 2 key words of any of the task's scenarios, Zipf
        filler; deterministic given ``seed``. Join with a prompt as ``prompt + " " + response``."""
        if n < 1:
            raise InvalidInputError(f"n must be >= 1, got {n}")
        rng = random.Random(seed)
        cum = torch.tensor(self.filler_probabilities.tolist(), dtype=torch.float64).cumsum(0).tolist()

        def filler(k):
            return rng.choices(self.filler_words, cum_weights=cum, k=k)

        return [
            self._response(rng, rng.randint(0, self.max_quality),
                           [rng.choice(self.key_words) for _ in range(rng.randint(0, MAX_KEYS))],
                           filler)
            for _ in range(n)
        ]

    def _response(self, rng: random.Random, n_quality: int, keys: list[str], filler) -> str:
        words = [rng.choice(QUALITY_WORDS) for _ in range(n_quality)] + list(keys)
        words += filler(self.response_len - len(words))
        rng.shuffle(words)
        return " ".join([RESPONSE_MARK, *words])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def word_tokenizer(words: Sequence[str], *, chat_template: str | None = None):
    """A deterministic word-level ``PreTrainedTokenizerFast`` over ``words``.

    ``words`` must start with ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` (ids 0-3); texts are split
    on whitespace, unknown words map to ``<unk>``, and ``<bos>`` / ``<eos>`` are
    added around every text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(words)
    if tuple(words[:4]) != SPECIAL_TOKENS:
        raise InvalidInputError(f"the vocabulary must start with {SPECIAL_TOKENS}, got {words[:4]}")
    if len(set(words)) != len(words):
        dup = sorted({w for w in words if words.count(w) > 1})
        raise InvalidInputError(f"duplicate words in the vocabulary: {dup}")
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="right",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
