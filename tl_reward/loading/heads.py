"""Head adapters: which head a loaded model object has, read in its published layout.

One adapter per published head layout, tried in order (:data:`HEAD_ADAPTERS`); the first whose
``matches`` holds builds the head. The linear ``score`` of a ``*ForSequenceClassification``
model is the last one (it also gives the refusals of objects with no head).
"""

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HeadError, NotARewardModelError
from ..heads import ACTIVATIONS, ARMORM_LLAMA3_GATE_PATTERN, GatedHead, MLPHead, RewardHead


@dataclass(frozen=True)
class HeadAdapter:
    """``matches(hf_model)``: whether the object carries this layout; ``build(hf_model,
    gate_pattern)``: the head, and the ``score`` Linear that becomes ``unembed`` (linear only)."""

    kind: str
    matches: Callable[[Any], bool]
    build: Callable[[Any, Sequence[int] | None], tuple[RewardHead, nn.Linear | None]]


def score_head(hf_model: Any) -> nn.Linear:
    """The ``score`` Linear of a ``*ForSequenceClassification`` model, or the reason it has none."""
    classes = [c.__name__ for c in type(hf_model).__mro__]
    if not any(name.endswith("ForSequenceClassification") for name in classes):
        raise NotARewardModelError(
            f"{type(hf_model).__name__} is not a *ForSequenceClassification model, so it has no "
            "score head (a reward read at the last token); load the "
            "*ForSequenceClassification class of this architecture, e.g. "
            "AutoModelForSequenceClassification, or pass head= (an MLPHead, GatedHead or any "
            "module mapping the pooled state to rewards) with the trunk"
        )
    score = getattr(hf_model, "score", None)
    if not isinstance(score, nn.Linear):
        raise NotARewardModelError(
            f"{type(hf_model).__name__} has no score head (a Linear `score` module); load the "
            "*ForSequenceClassification class of this architecture, e.g. "
            "AutoModelForSequenceClassification"
        )
    return score


def _grm_matches(hf_model: Any) -> bool:
    summary = getattr(getattr(hf_model, "v_head", None), "summary", None)
    return isinstance(summary, nn.Sequential)


def _activation_of(seq: nn.Sequential, owner: Any) -> str:
    kinds = {type(m) for m in seq if not isinstance(m, nn.Linear)}
    names = [name for name, make in ACTIVATIONS.items() if {type(make())} == kinds]
    if len(names) != 1:
        raise HeadError(
            f"the MLP head of {type(owner).__name__} uses {sorted(k.__name__ for k in kinds)} "
            f"between its Linear layers; an MLP head takes one of {sorted(ACTIVATIONS)}"
        )
    return names[0]


def _grm_build(hf_model: Any, gate_pattern: Sequence[int] | None):
    summary = hf_model.v_head.summary
    return MLPHead.from_state_dict(summary.state_dict(), prefix="",
                                   activation=_activation_of(summary, hf_model)), None


def _sequential_score_matches(hf_model: Any) -> bool:
    return isinstance(getattr(hf_model, "score", None), nn.Sequential)


def _sequential_score_build(hf_model: Any, gate_pattern: Sequence[int] | None):
    score = hf_model.score
    return MLPHead.from_state_dict(score.state_dict(), prefix="",
                                   activation=_activation_of(score, hf_model)), None


def _armorm_matches(hf_model: Any) -> bool:
    return (isinstance(getattr(hf_model, "regression_layer", None), nn.Linear)
            and hasattr(getattr(hf_model, "gating", None), "layers"))


def _armorm_build(hf_model: Any, gate_pattern: Sequence[int] | None):
    if gate_pattern is None:
        raise HeadError(
            f"{type(hf_model).__name__} has a gated (ArmoRM) head, which gates on the state at "
            "the end of the prompt, found from a token pattern of the chat template: pass "
            "load_reward_model(..., gate_pattern=[ids]); ArmoRM-Llama3-8B-v0.1 uses "
            f"{list(ARMORM_LLAMA3_GATE_PATTERN)} (tl_reward.heads.ARMORM_LLAMA3_GATE_PATTERN)"
        )
    state = {k: v for k, v in hf_model.state_dict().items()
             if k.startswith(("regression_layer.", "gating.")) or k == "reward_transform_matrix"}
    temperature = float(getattr(hf_model.gating, "temperature", 10.0))
    return GatedHead.from_state_dict(state, gate_pattern, temperature=temperature), None


def _linear_build(hf_model: Any, gate_pattern: Sequence[int] | None):
    return RewardHead(), score_head(hf_model)


HEAD_ADAPTERS: tuple[HeadAdapter, ...] = (
    HeadAdapter("mlp", _grm_matches, _grm_build),  # GRM: v_head.summary
    # INF-ORM-Llama3.1-70B and Qwen2.5-Math-PRM: an MLP as `score`
    HeadAdapter("mlp", _sequential_score_matches, _sequential_score_build),
    HeadAdapter("gated", _armorm_matches, _armorm_build),
    HeadAdapter("linear", lambda hf_model: True, _linear_build),
)


def head_of(hf_model: Any, gate_pattern: Sequence[int] | None) -> tuple[RewardHead, nn.Linear | None]:
    """The head an HF model object carries (first matching adapter), and its ``score`` Linear."""
    adapter = next(a for a in HEAD_ADAPTERS if a.matches(hf_model))
    return adapter.build(hf_model, gate_pattern)


# ---------------------------------------------------------------- checkpoint directories
def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it: safetensors (single file or sharded index), else
    PyTorch pickles (``pytorch_model.bin`` or its sharded index), read with
    ``torch.load(weights_only=True)`` (no code runs)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        except Exception:  # noqa: BLE001 - unreadable: transformers' own load reports it
            return {}
    pickle = path / "pytorch_model.bin"
    if pickle.exists():
        try:
            return dict.fromkeys(_load_pickle(pickle), pickle)
        except Exception:  # noqa: BLE001 - unreadable: transformers' own load reports it
            return {}
    return {}


def _load_pickle(file: Path) -> dict[str, Tensor]:
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise HeadError(f"{str(file)!r} does not hold a state dict (got {type(state).__name__})")
    return state


def _read(files: dict[str, Path], names: list[str]) -> dict[str, Tensor]:
    from safetensors import safe_open

    out: dict[str, Tensor] = {}
    for file in {files[n] for n in names}:
        mine = [n for n in names if files[n] == file]
        if file.suffix == ".bin":
            state = _load_pickle(file)
            out.update({n: state[n] for n in mine})
            continue
        with safe_open(str(file), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in mine})
    return out


def checkpoint_head(path: Path, config: Mapping[str, Any],
                    gate_pattern: Sequence[int] | None) -> RewardHead | None:
    """The nonlinear head a checkpoint directory holds, read from its tensor names (never from
    its modelling code): GRM ``v_head.summary.*``, a ``Sequential`` ``score.<i>.*`` (INF-ORM,
    Qwen2.5-Math-PRM), ArmoRM ``regression_layer`` + ``gating``; ``None`` when none is there
    (safetensors, or ``pytorch_model.bin`` pickles read with ``weights_only=True``)."""
    files = _tensor_files(path)
    layouts = (("v_head.summary.", "mlp"), ("score.0.", "mlp"), ("regression_layer.", "gated"))
    for prefix, kind in layouts:
        if not any(name.startswith(prefix) for name in files):
            continue
        if kind == "mlp":
            head_prefix = prefix if prefix == "v_head.summary." else "score."
            names = [n for n in files if n.startswith(head_prefix)]
            return MLPHead.from_state_dict(_read(files, names), prefix=head_prefix)
        names = [n for n in files if n.startswith(("regression_layer.", "gating."))
                 or n == "reward_transform_matrix"]
        if gate_pattern is None:
            raise HeadError(
                f"{str(path)!r} holds a gated (ArmoRM) head, which gates on the state at the end "
                "of the prompt, found from a token pattern of the chat template: pass "
                "load_reward_model(..., gate_pattern=[ids]); ArmoRM-Llama3-8B-v0.1 uses "
                f"{list(ARMORM_LLAMA3_GATE_PATTERN)} (tl_reward.heads.ARMORM_LLAMA3_GATE_PATTERN)"
            )
        state = _read(files, names)
        if "reward_transform_matrix" not in state:  # a buffer-free save: ArmoRM's identity init
            k = state["regression_layer.weight"].shape[0]
            state["reward_transform_matrix"] = torch.eye(k)
        return GatedHead.from_state_dict(state, gate_pattern,
                                         temperature=float(config.get("gating_temperature", 10)))
    return None
