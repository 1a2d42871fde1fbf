"""How far bfloat16 rewards are from the float32 truth, for HF and tl_reward alike.

bench_load.py reports the gap between tl_reward's and HF's bfloat16 rewards on its random 1B model;
this script shows where that gap comes from: the same checkpoint (bfloat16 weights) read by HF in
float32 is the truth, and HF's own bfloat16 forward is compared with it as tl_reward's is.
Run: PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_bf16_gap.py  (minutes, about 12 GB of RAM)
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import bench_load
    import transformers as T

    import tl_reward

    tokens = torch.arange(2, 2 + bench_load.FORWARD_TOKENS)[None]
    loaders = {
        "HF float32": lambda d: T.AutoModelForSequenceClassification.from_pretrained(
            d, dtype=torch.float32),
        "HF bfloat16": lambda d: T.AutoModelForSequenceClassification.from_pretrained(
            d, dtype=torch.bfloat16),
        "tl_reward bfloat16": lambda d: tl_reward.load_reward_model(d, dtype=torch.bfloat16),
        "tl_reward float32": lambda d: tl_reward.load_reward_model(d, dtype=torch.float32),
    }
    rewards = {}
    with tempfile.TemporaryDirectory() as d:
        bench_load.write_model(Path(d), "1b", torch.bfloat16)
        for name, load in loaders.items():
            model = load(d)
            with torch.no_grad():
                out = model(tokens)
            rewards[name] = float(out.logits[0, 0] if hasattr(out, "logits") else out[0])
            del model
    truth = rewards["HF float32"]
    for name, r in rewards.items():
        print(f"{name:20s} {r:+.4f}   |vs HF float32| {abs(r - truth):.3e}")


if __name__ == "__main__":
    main()
