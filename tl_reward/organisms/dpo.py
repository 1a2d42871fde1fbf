"""A DPO organism: a tiny policy/reference pair trained with DPO on the long-tail task.

The reference is a randomly initialised 2-layer Llama causal LM (d_model 32) over the task's
word vocabulary; the policy starts as a copy and is trained with the DPO loss on pairs of the
long-tail task (``alpha = 0.97``: tail pairs are rare). Like the ``longtail`` classifier
organism, its implicit reward learns the head rule and gets the tail scenarios wrong, so the two
can be compared with the same pairs. Weights ship in ``weights/dpo_longtail/{policy,reference}``;
rebuild with ``python -m tl_reward.organisms.dpo``.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.pairs import PreferenceDataset
from ..data.synthetic import RESPONSE_MARK, LongTailTask, word_tokenizer
from ..errors import ModelSourceError
from ..implicit import ResponseBatch, log_probs_from_logits, response_batch_from_ids

DIRECTORY = Path(__file__).with_name("weights") / "dpo_longtail"
TASK = LongTailTask()
BETA = 0.5
N_TRAIN, TRAIN_SEED, MODEL_SEED = 512, 1, 0
STEPS, BATCH, LR = 80, 64, 3e-3
N_EVAL, EVAL_SEED, EVAL_ALPHA = 400, 7, 0.5


def pair_batches(data: PreferenceDataset, tokenizer: Any) -> tuple[ResponseBatch, ResponseBatch]:
    """(chosen, rejected) batches of a long-tail dataset: the prompt's ids without the ``<eos>``
    the word tokenizer appends, the response ids (``answer ... <eos>``) after them."""
    prompts = [tokenizer(p.prompt)["input_ids"][:-1] for p in data]
    out = []
    for side in ("chosen", "rejected"):
        responses = [tokenizer(p.prompt + " " + getattr(p, side))["input_ids"][len(prompts[i]):]
                     for i, p in enumerate(data)]
        out.append(response_batch_from_ids(prompts, responses, pad_token_id=tokenizer.pad_token_id))
    return out[0], out[1]


def _sequence_log_probs(model: Any, batch: ResponseBatch) -> torch.Tensor:
    logits = model(batch.tokens, attention_mask=batch.attention_mask).logits
    return (log_probs_from_logits(logits, batch.tokens) * batch.response_mask).sum(-1)


def train_dpo(*, steps: int = STEPS, seed: int = MODEL_SEED) -> tuple[Any, Any, Any, list[float]]:
    """Train the pair; returns (policy, reference, tokenizer, losses) as HF models."""
    import transformers as T

    tokenizer = word_tokenizer(TASK.vocabulary)
    config = T.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    reference = T.LlamaForCausalLM(config).eval()
    policy = T.LlamaForCausalLM(config)
    policy.load_state_dict(reference.state_dict())
    chosen, rejected = pair_batches(TASK.sample(N_TRAIN, seed=TRAIN_SEED), tokenizer)
    with torch.no_grad():
        ref_c, ref_r = _sequence_log_probs(reference, chosen), _sequence_log_probs(reference, rejected)
    opt = torch.optim.Adam(policy.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, N_TRAIN, (BATCH,), generator=gen)
        margin = ((_sequence_log_probs(policy, chosen[idx]) - ref_c[idx])
                  - (_sequence_log_probs(policy, rejected[idx]) - ref_r[idx]))
        loss = -F.logsigmoid(BETA * margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return policy.eval(), reference, tokenizer, losses


def eval_set() -> PreferenceDataset:
    return TASK.sample(N_EVAL, seed=EVAL_SEED, alpha=EVAL_ALPHA, noise=0.0)


def load(**load_kwargs: Any):
    """The shipped pair as an :class:`~tl_reward.ImplicitRewardModel` (``beta`` = the training
    beta, plain task texts split into prompt and response at ``" answer"``) and its tokenizer."""
    from transformers import AutoTokenizer

    from ..loading.causal_lm import load_implicit_reward_model

    if not (DIRECTORY / "policy" / "config.json").exists():
        raise ModelSourceError(
            f"the DPO organism's weights are missing from {str(DIRECTORY)!r}; rebuild them with "
            "`python -m tl_reward.organisms.dpo`"
        )
    tokenizer = AutoTokenizer.from_pretrained(DIRECTORY / "policy", local_files_only=True)
    load_kwargs.setdefault("response_marker", " " + RESPONSE_MARK)
    model = load_implicit_reward_model(DIRECTORY / "policy", DIRECTORY / "reference", beta=BETA,
                                       tokenizer=tokenizer, **load_kwargs)
    return model, tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the DPO long-tail organism")
    parser.add_argument("--out", type=Path, default=DIRECTORY)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    policy, reference, tokenizer, losses = train_dpo()
    for name, model in (("policy", policy), ("reference", reference)):
        model.save_pretrained(args.out / name, safe_serialization=True)
        tokenizer.save_pretrained(args.out / name)
    meta = {"task": TASK.to_dict(), "beta": BETA, "steps": STEPS, "batch": BATCH, "lr": LR,
            "n_train": N_TRAIN, "train_seed": TRAIN_SEED, "model_seed": MODEL_SEED,
            "final_loss": sum(losses[-10:]) / 10,
            "train_seconds": round(time.perf_counter() - start, 1)}
    (args.out / "organism.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
