"""Saving an organism as a checkpoint directory in a published head layout.

The trunk's tensors go under ``model.*`` (as ``save_pretrained`` of a model with
``base_model_prefix = "model"`` writes them), the head's under its published names, all in one
``model.safetensors``; ``config.json`` is the trunk's config with the published
``architectures`` name (and any extra keys the layout's config carries); the tokenizer and an
``organism.json`` (training settings, measured accuracies) go beside them.
:func:`tl_reward.load_reward_model` reads such a directory from its tensor names.
"""

import argparse
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def save_checkpoint(out: Path, trunk: Any, head_state: Mapping[str, Tensor], *,
                    architecture: str, tokenizer: Any, meta: Mapping[str, Any],
                    config_extra: Mapping[str, Any] | None = None) -> None:
    """Write ``trunk`` (an HF ``*Model``) and ``head_state`` (published tensor names) to ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in trunk.state_dict().items()}
    clash = sorted(set(tensors) & set(head_state))
    if clash:
        raise ValueError(f"head tensor names clash with the trunk's: {clash}")
    tensors.update(head_state)
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config = trunk.config
    config.architectures = [architecture]
    for key, value in (config_extra or {}).items():
        setattr(config, key, value)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "organism.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def rebuild_main(build: Callable[[Path], Mapping[str, Any]], description: str, directory: Path,
                 argv: list[str] | None = None) -> None:
    """The command line that rebuilds an organism: ``build(out)`` on ``--threads`` torch threads
    (one, the default, reproduces the shipped tensors bit for bit), its accuracies printed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=directory)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    meta = build(args.out)
    print(json.dumps({"accuracy": meta["accuracy"], "train": meta["train"],
                      "build_seconds": round(time.perf_counter() - start, 1)}))
