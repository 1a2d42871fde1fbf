"""Rebuild the shipped organisms from scratch.

    python -m tl_reward.organisms.train                 # both, into the package's weights/
    python -m tl_reward.organisms.train longtail --out /tmp/organisms --threads 2

``longtail`` is trained with plain ERM (Bradley-Terry loss, no reweighting) on
:data:`LONGTAIL_TASK`; ``planted`` is written by hand (:mod:`tl_reward.organisms.planted`). Both
are saved with ``save_pretrained`` (safetensors, config, tokenizer) plus ``organism.json``
(task, training settings, measured accuracies), and load with ``tl_reward.load_reward_model``.
"""

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..data.pairs import PreferenceDataset
from ..data.synthetic import LongTailTask
from ..training import TrainConfig, TrainResult, pair_margins, train_reward_model
from .planted import build_planted_model, planted_dataset

logger = logging.getLogger(__name__)

WEIGHTS = Path(__file__).with_name("weights")

LONGTAIL_TASK = LongTailTask(alpha=0.99, n_tail=3, tail_zipf=1.0, noise=0.05)
LONGTAIL_ARCH = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
)
LONGTAIL_TRAIN = TrainConfig(steps=500, batch_size=64, lr=3e-3, warmup_steps=30, seed=0)
N_TRAIN, TRAIN_SEED = 20000, 0
N_EVAL, EVAL_SEED, EVAL_ALPHA = 2000, 1, 0.5
MODEL_SEED = 0


def longtail_eval_set() -> PreferenceDataset:
    """Held-out, noise-free pairs of the long-tail task with half of them tail pairs."""
    return LONGTAIL_TASK.sample(N_EVAL, seed=EVAL_SEED, alpha=EVAL_ALPHA, noise=0.0)


def build_longtail_model(tokenizer: Any, seed: int = MODEL_SEED):
    """An untrained Llama reward model of the ``longtail`` shape, seeded."""
    import transformers as T

    vocab = tokenizer.get_vocab()
    config = T.LlamaConfig(
        vocab_size=len(vocab), num_labels=1, tie_word_embeddings=False,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
        **LONGTAIL_ARCH,
    )
    torch.manual_seed(seed)
    return T.LlamaForSequenceClassification(config)


def accuracies(model: Any, data: PreferenceDataset, *, tokenizer: Any = None,
               progress: bool = False) -> dict[str, float]:
    """Pairwise accuracy per scenario, plus ``"tail"`` over every tail pair (if any)."""
    margins = pair_margins(model, data, tokenizer=tokenizer, progress=progress)
    correct = (margins > 0).float()
    scen = data.scenarios
    out = {s: float(correct[torch.tensor([x == s for x in scen])].mean())
           for s in data.scenario_counts()}
    tail = torch.tensor(data.is_tail)
    if bool(tail.any()):
        out["tail"] = float(correct[tail].mean())
    return out


def train_longtail(*, progress: bool = True, config: TrainConfig | None = None):
    """Train the ``longtail`` organism: returns ``(hf_model, tokenizer, TrainResult)``."""
    tokenizer = LONGTAIL_TASK.tokenizer()
    train = LONGTAIL_TASK.sample(N_TRAIN, seed=TRAIN_SEED)
    model = build_longtail_model(tokenizer)
    config = config or LONGTAIL_TRAIN
    if config.progress != progress:
        config = TrainConfig(**{**asdict(config), "progress": progress})
    result: TrainResult = train_reward_model(model, train, tokenizer=tokenizer, config=config)
    model.eval()
    return model, tokenizer, result


def _save(model: Any, tokenizer: Any, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "organism.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def build(name: str, out_dir: Path, *, progress: bool = True) -> dict:
    """Rebuild one organism into ``out_dir / name``; returns its ``organism.json`` content."""
    start = time.perf_counter()
    if name == "longtail":
        model, tokenizer, result = train_longtail(progress=progress)
        acc = accuracies(model, longtail_eval_set(), tokenizer=tokenizer)
        meta = {
            "name": "longtail",
            "task": LONGTAIL_TASK.to_dict(),
            "train": {**{k: v for k, v in asdict(LONGTAIL_TRAIN).items() if k != "progress"},
                      "n_pairs": N_TRAIN, "data_seed": TRAIN_SEED,
                      "model_seed": MODEL_SEED, "final_loss": float(result.losses[-50:].mean()),
                      "train_seconds": round(result.wall_seconds, 1)},
            "eval": {"n_pairs": N_EVAL, "seed": EVAL_SEED, "alpha": EVAL_ALPHA, "noise": 0.0},
            "accuracy": acc,
        }
    elif name == "planted":
        model, tokenizer = build_planted_model()
        acc = accuracies(model, planted_dataset(), tokenizer=tokenizer)
        meta = {"name": "planted", "accuracy": acc}
    else:
        raise ValueError(f"unknown organism {name!r}; choose longtail or planted")
    meta["build_seconds"] = round(time.perf_counter() - start, 1)
    _save(model, tokenizer, out_dir / name, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="organisms to rebuild: longtail, planted (default: both)")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="output folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    names = args.names or ["longtail", "planted"]
    unknown = [n for n in names if n not in ("longtail", "planted")]
    if unknown:
        parser.error(f"unknown organism(s) {unknown}; choose from longtail, planted")
    torch.set_num_threads(args.threads)
    for name in names:
        meta = build(name, args.out, progress=not args.no_progress)
        print(json.dumps({"name": name, "accuracy": meta["accuracy"],
                          "build_seconds": meta["build_seconds"]}))


if __name__ == "__main__":
    main()
