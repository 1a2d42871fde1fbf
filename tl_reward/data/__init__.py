"""Preference data: the pair type, loaders for the common formats, the synthetic long-tail task."""

from .pairs import PreferenceDataset as PreferenceDataset
from .pairs import PreferencePair as PreferencePair
from .pairs import load_pairs as load_pairs
from .pairs import pairs_from_dataframe as pairs_from_dataframe
from .pairs import pairs_from_hf_dataset as pairs_from_hf_dataset
from .pairs import pairs_from_jsonl as pairs_from_jsonl
from .pairs import pairs_from_records as pairs_from_records
from .probe_sets import ProbeSet as ProbeSet
from .probe_sets import builtin_probe_sets as builtin_probe_sets
from .probe_sets import make_probe as make_probe
from .synthetic import LongTailTask as LongTailTask
from .synthetic import word_tokenizer as word_tokenizer
