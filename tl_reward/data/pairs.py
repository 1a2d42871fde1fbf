"""Preference pairs and loaders for the common formats.

The formats are the ones TRL and RewardBench use:

- *explicit prompt*: ``prompt``, ``chosen``, ``rejected`` columns (RewardBench adds ``subset``,
  read here as the scenario label);
- *implicit prompt*: ``chosen`` and ``rejected`` hold the whole text, the prompt included;
- *conversational*: the same columns holding lists of ``{"role", "content"}`` messages.

Optional columns: ``scenario`` (or ``subset``), ``tail`` (bool); pairs without a scenario are
labelled ``"all"``. Every loader checks each row and names the bad one (and the file) in an
:class:`~tl_reward.errors.InvalidInputError`.

In a CSV file or a DataFrame a chat is a cell holding the message list as text (what pandas
writes for a column of lists: a Python literal, or JSON): such cells are parsed as chats; a cell
that looks like a message list but does not parse is refused, never scored as a literal string.
"""

import ast
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

Message = Mapping[str, str]
Text = str | tuple[Message, ...]
"""A response or prompt: a string, or a conversation (a tuple of ``{"role", "content"}``)."""

SCENARIO_COLUMNS = ("scenario", "subset")
NO_SCENARIO = "all"
"""The scenario label of pairs whose source has no scenario column."""


def _join(prompt: Text, response: Text) -> str | list[dict[str, str]]:
    if isinstance(response, str):
        if not prompt:
            return response
        if not isinstance(prompt, str):
            raise InvalidInputError("a conversational prompt needs conversational responses")
        if prompt[-1:].isspace() or response[:1].isspace():
            return prompt + response
        return prompt + " " + response
    messages = []
    if isinstance(prompt, str):
        if prompt:
            messages.append({"role": "user", "content": prompt})
    else:
        messages.extend(dict(m) for m in prompt)
    messages.extend(dict(m) for m in response)
    return messages


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` is preferred to ``rejected`` as a reply to ``prompt``.

    ``prompt`` may be empty (the implicit-prompt format: the responses hold the whole text).
    ``scenario`` labels the kind of pair (``"head"`` or a tail scenario of the synthetic task, a
    RewardBench subset, ...; ``"all"`` when the data has none); ``tail`` marks rare scenarios.
    """

    chosen: Text
    rejected: Text
    prompt: Text = ""
    scenario: str = NO_SCENARIO
    tail: bool = False

    @property
    def chosen_text(self) -> str | list[dict[str, str]]:
        """The text a reward model scores for the chosen side: prompt and response joined.

        Strings are joined with one space unless the prompt ends or the response starts with
        whitespace; conversations are concatenated (a string prompt becomes a user message).
        """
        return _join(self.prompt, self.chosen)

    @property
    def rejected_text(self) -> str | list[dict[str, str]]:
        """The text a reward model scores for the rejected side (see :attr:`chosen_text`)."""
        return _join(self.prompt, self.rejected)

    def prompt_and_response(self, side: str) -> tuple[Text, Text]:
        """The prompt and the ``side`` ("chosen" or "rejected") response split where
        :attr:`chosen_text` / :attr:`rejected_text` join them: for strings, the joining space
        ends the prompt (``prompt + response`` is the scored text), the form a DPO implicit
        reward's ``encode(prompts, responses)`` takes; conversations are returned as they are."""
        if side not in ("chosen", "rejected"):
            raise InvalidInputError(f"side must be 'chosen' or 'rejected', got {side!r}")
        response = getattr(self, side)
        prompt = self.prompt
        if isinstance(prompt, str) and isinstance(response, str) and prompt:
            if not (prompt[-1:].isspace() or response[:1].isspace()):
                prompt += " "
        return prompt, response


@dataclass(frozen=True)
class PreferenceDataset(Sequence[PreferencePair]):
    """An immutable list of :class:`PreferencePair` with views by scenario.

    ``metadata`` holds free-form facts about where the pairs come from (the generator's
    parameters, a planted mechanism, ...).
    """

    pairs: tuple[PreferencePair, ...]
    name: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", tuple(self.pairs))
        for i, pair in enumerate(self.pairs):
            if not isinstance(pair, PreferencePair):
                raise InvalidInputError(
                    f"pair {i} is a {type(pair).__name__}, not a PreferencePair"
                )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return replace(self, pairs=self.pairs[index])
        return self.pairs[index]

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    def __repr__(self) -> str:
        counts = self.scenario_counts()
        return f"PreferenceDataset(name={self.name!r}, n={len(self)}, scenarios={counts})"

    @property
    def chosen_texts(self) -> list:
        """Prompt + chosen response of every pair, as a reward model scores them."""
        return [p.chosen_text for p in self.pairs]

    @property
    def rejected_texts(self) -> list:
        """Prompt + rejected response of every pair."""
        return [p.rejected_text for p in self.pairs]

    @property
    def scenarios(self) -> tuple[str, ...]:
        return tuple(p.scenario for p in self.pairs)

    @property
    def is_tail(self) -> tuple[bool, ...]:
        return tuple(p.tail for p in self.pairs)

    def scenario_counts(self) -> dict[str, int]:
        """Number of pairs per scenario, in order of first appearance."""
        counts: dict[str, int] = {}
        for p in self.pairs:
            counts[p.scenario] = counts.get(p.scenario, 0) + 1
        return counts

    def filter(self, keep) -> "PreferenceDataset":
        """The pairs for which ``keep(pair)`` is true."""
        return replace(self, pairs=tuple(p for p in self.pairs if keep(p)))

    def head(self) -> "PreferenceDataset":
        """The pairs not marked ``tail``."""
        return self.filter(lambda p: not p.tail)

    def tail(self) -> "PreferenceDataset":
        """The pairs marked ``tail``."""
        return self.filter(lambda p: p.tail)

    def by_scenario(self, scenario: str) -> "PreferenceDataset":
        if scenario not in self.scenario_counts():
            raise InvalidInputError(
                f"no pair has scenario {scenario!r}; scenarios: {list(self.scenario_counts())}"
            )
        return self.filter(lambda p: p.scenario == scenario)

    def split(self, test_fraction: float, *, seed: int = 0) -> tuple["PreferenceDataset", "PreferenceDataset"]:
        """A seeded random ``(train, test)`` split."""
        if not 0 < test_fraction < 1:
            raise InvalidInputError(f"test_fraction must be in (0, 1), got {test_fraction}")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n_test = round(len(self) * test_fraction)
        test = sorted(order[:n_test])
        train = sorted(order[n_test:])
        return (
            replace(self, pairs=tuple(self.pairs[i] for i in train)),
            replace(self, pairs=tuple(self.pairs[i] for i in test)),
        )

    def sample(self, n: int, *, seed: int = 0) -> "PreferenceDataset":
        """``n`` pairs drawn at random without replacement (seeded), in their original order;
        the whole dataset when it has at most ``n`` pairs."""
        if n < 1:
            raise InvalidInputError(f"cannot draw {n} pairs; ask for at least 1")
        return self if n >= len(self) else self.split(1 - n / len(self), seed=seed)[0]

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per pair with prompt, chosen, rejected, scenario, tail (round-trips)."""
        out = []
        for p in self.pairs:
            rec = {}
            for key in ("prompt", "chosen", "rejected"):
                value = getattr(p, key)
                rec[key] = value if isinstance(value, str) else [dict(m) for m in value]
            rec["scenario"] = p.scenario
            rec["tail"] = p.tail
            out.append(rec)
        return out

    def to_dataframe(self):
        """A pandas DataFrame with the columns of :meth:`to_records`."""
        import pandas as pd

        return pd.DataFrame(self.to_records(), columns=["prompt", "chosen", "rejected", "scenario", "tail"])

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """Write one JSON object per line (readable by :func:`pairs_from_jsonl`)."""
        with open(path, "w", encoding="utf-8") as f:
            for rec in self.to_records():
                f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------------------- validation
_ROLE_KEY = re.compile(r"""\{\s*['"]role['"]\s*:""")


def _chat_from_cell(value: str, row: int, column: str) -> Any:
    """A text cell that holds a message list (JSON or a Python literal) as that list; any other
    text as is. A cell that looks like a message list but does not parse is refused."""
    stripped = value.strip()
    if not (stripped.startswith("[") and _ROLE_KEY.search(stripped)):
        return value
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(stripped)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
            return parsed
        break
    raise InvalidInputError(
        f"row {row}: column {column!r} looks like a list of chat messages but is not one "
        f"(neither JSON nor a Python literal list of {{'role', 'content'}} dicts): "
        f"{stripped[:80]!r}{'...' if len(stripped) > 80 else ''}. Fix the cell, or store the pairs "
        "as JSONL, where a chat is a JSON list."
    )


def _check_text(value: Any, row: int, column: str, *, allow_empty: bool,
                chat_cells: bool = False) -> Text:
    if chat_cells and isinstance(value, str):
        value = _chat_from_cell(value, row, column)
    if isinstance(value, str):
        if not value and not allow_empty:
            raise InvalidInputError(f"row {row}: column {column!r} is an empty string")
        return value
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        if allow_empty:
            return ""
        raise InvalidInputError(f"row {row}: column {column!r} is missing (got {value!r})")
    if isinstance(value, Sequence) or hasattr(value, "tolist"):
        messages = list(value.tolist() if hasattr(value, "tolist") else value)
        if not messages and not allow_empty:
            raise InvalidInputError(f"row {row}: column {column!r} is an empty conversation")
        for j, m in enumerate(messages):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise InvalidInputError(
                    f"row {row}: column {column!r} message {j} must be a dict with string 'role' "
                    f"and 'content', got {m!r}"
                )
        return tuple({"role": m["role"], "content": m["content"]} for m in messages)
    raise InvalidInputError(
        f"row {row}: column {column!r} must be a string or a list of chat messages, got "
        f"{type(value).__name__} {value!r}"
    )


def _pair_from_row(row: Mapping[str, Any], i: int, *, chat_cells: bool = False) -> PreferencePair:
    if not isinstance(row, Mapping):
        raise InvalidInputError(f"row {i} must be a mapping of columns, got {type(row).__name__}")
    missing = [c for c in ("chosen", "rejected") if c not in row]
    if missing:
        raise InvalidInputError(
            f"row {i} has no {missing} column(s); found {sorted(row)}. Expected 'chosen' and "
            "'rejected' (and optionally 'prompt'), the TRL / RewardBench preference format."
        )
    prompt = _check_text(row.get("prompt", ""), i, "prompt", allow_empty=True, chat_cells=chat_cells)
    chosen = _check_text(row["chosen"], i, "chosen", allow_empty=False, chat_cells=chat_cells)
    rejected = _check_text(row["rejected"], i, "rejected", allow_empty=False,
                           chat_cells=chat_cells)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise InvalidInputError(
            f"row {i}: 'chosen' and 'rejected' must both be strings or both conversations"
        )
    if prompt and not isinstance(prompt, str) and isinstance(chosen, str):
        raise InvalidInputError(
            f"row {i}: a conversational 'prompt' needs conversational 'chosen'/'rejected'"
        )
    scenario = NO_SCENARIO
    for col in SCENARIO_COLUMNS:
        if col in row and row[col] is not None:
            scenario = row[col]
            if not isinstance(scenario, str) or not scenario:
                raise InvalidInputError(
                    f"row {i}: column {col!r} must be a non-empty string, got {scenario!r}"
                )
            break
    tail = row.get("tail", False)
    if tail is None:
        tail = False
    if hasattr(tail, "item"):
        tail = tail.item()
    if not isinstance(tail, bool):
        raise InvalidInputError(f"row {i}: column 'tail' must be a bool, got {tail!r}")
    return PreferencePair(chosen=chosen, rejected=rejected, prompt=prompt, scenario=scenario,
                          tail=tail)


# ---------------------------------------------------------------------------- loaders
def pairs_from_records(
    records: Iterable[Mapping[str, Any]], *, name: str = ""
) -> PreferenceDataset:
    """Pairs from an iterable of row dicts (``chosen``, ``rejected``, optional ``prompt``,
    ``scenario``/``subset``, ``tail``)."""
    pairs = tuple(_pair_from_row(row, i) for i, row in enumerate(records))
    if not pairs:
        raise InvalidInputError("no preference pairs: the source has no rows")
    return PreferenceDataset(pairs, name=name)


def pairs_from_jsonl(path: str | os.PathLike, *, name: str | None = None) -> PreferenceDataset:
    """Pairs from a JSON-lines file, one object per line (blank lines skipped).

    Errors name the line number (1-based) of the bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{str(path)!r} is not a file")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInputError(f"{path.name} line {lineno} is not valid JSON: {err}") from err
            try:
                pairs.append(_pair_from_row(row, len(pairs)))
            except InvalidInputError as err:
                raise InvalidInputError(f"{path.name} line {lineno}: {err}") from err
    if not pairs:
        raise InvalidInputError(f"{str(path)!r} holds no preference pairs")
    return PreferenceDataset(tuple(pairs), name=path.stem if name is None else name)


def pairs_from_dataframe(df: Any, *, name: str = "") -> PreferenceDataset:
    """Pairs from a pandas DataFrame; errors name the DataFrame index of the bad row.

    Text cells holding a chat message list (as ``pd.read_csv`` returns a column of lists: its
    Python repr, or JSON) are parsed as chats.
    """
    pairs = []
    for position, (index, row) in enumerate(df.iterrows()):
        try:
            values = {k: (None if _is_missing(v) else v) for k, v in row.to_dict().items()}
            pairs.append(_pair_from_row(values, position, chat_cells=True))
        except InvalidInputError as err:
            raise InvalidInputError(f"DataFrame index {index!r}: {err}") from err
    if not pairs:
        raise InvalidInputError("the DataFrame has no rows")
    return PreferenceDataset(tuple(pairs), name=name)


def pairs_from_hf_dataset(dataset: Any, *, name: str = "") -> PreferenceDataset:
    """Pairs from a Hugging Face ``datasets.Dataset`` (one split; its rows are dicts)."""
    if _is_dataset_dict(dataset):
        raise InvalidInputError(
            f"got a DatasetDict with splits {list(dataset.keys())}; pass one split, e.g. "
            f"dataset[{next(iter(dataset.keys()))!r}]"
        )
    if not hasattr(dataset, "column_names"):
        raise InvalidInputError(
            f"expected a datasets.Dataset (with column_names), got {type(dataset).__name__}"
        )
    return pairs_from_records(iter(dataset), name=name)


def load_pairs(source: Any, *, name: str | None = None) -> PreferenceDataset:
    """Preference pairs from any supported source.

    ``source`` may be a :class:`PreferenceDataset` (returned as is), a path to a ``.jsonl`` /
    ``.json`` / ``.csv`` file, a pandas DataFrame, a Hugging Face ``datasets.Dataset``, or a list of row
    dicts.
    """
    if isinstance(source, PreferenceDataset):
        return source
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.suffix == ".json" and path.is_file():
            with open(path, encoding="utf-8") as f:
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as err:
                    raise InvalidInputError(f"{path.name} is not valid JSON: {err}") from err
            if not isinstance(rows, list):
                raise InvalidInputError(f"{path.name} must hold a JSON list of rows")
            return pairs_from_records(rows, name=path.stem if name is None else name)
        if path.suffix == ".csv" and path.is_file():
            return _pairs_from_csv(path, name=path.stem if name is None else name)
        return pairs_from_jsonl(path, name=name)
    if hasattr(source, "iterrows") and hasattr(source, "columns"):
        return pairs_from_dataframe(source, name=name or "")
    if _is_dataset_dict(source) or hasattr(source, "column_names"):
        return pairs_from_hf_dataset(source, name=name or "")
    if isinstance(source, Sequence) and not isinstance(source, str | bytes):
        return pairs_from_records(source, name=name or "")
    raise InvalidInputError(
        f"cannot read preference pairs from a {type(source).__name__}; pass a JSONL path, a "
        "pandas DataFrame, a datasets.Dataset or a list of dicts"
    )


def _pairs_from_csv(path: Path, *, name: str) -> PreferenceDataset:
    """A CSV file through pandas; every error names the file (and the data row: 0 is the first
    row after the header)."""
    import pandas as pd

    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InvalidInputError(f"{path.name} is not a readable CSV file: {err}") from err
    try:
        return pairs_from_dataframe(df, name=name)
    except InvalidInputError as err:
        message = str(err.args[0]).replace("DataFrame index ", "data row ", 1)
        raise InvalidInputError(f"{path.name}: {message}") from err


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _is_dataset_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(hasattr(v, "column_names") for v in obj.values())
    )
