"""A judge organism: a tiny causal LM trained to judge the long-tail task by ``logit(yes) - logit(no)``.

A 2-layer Llama causal LM (d_model 32) over the task's word vocabulary plus ``verdict``, ``yes``
and ``no``. The judge prompt is ``TEMPLATE`` (the scored text, then ``verdict``) and its score is
the next-token logit difference ``logit(yes) - logit(no)`` at the prompt's last token, trained with
the Bradley-Terry loss on that score over long-tail pairs (``alpha = 0.97``: tail pairs are rare).
It is the generative-judge twin of the ``longtail`` classifier and the ``dpo_longtail`` implicit
reward: right on the head rule, wrong on the rare tail scenarios, comparable on the same pairs.
Weights ship in ``weights/judge_longtail/model``; rebuild with ``python -m tl_reward.organisms.judge``.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.pairs import PreferenceDataset
from ..data.synthetic import LongTailTask, word_tokenizer
from ..errors import ModelSourceError

DIRECTORY = Path(__file__).with_name("weights") / "judge_longtail"
TASK = LongTailTask()
TEMPLATE = "{text} verdict"
YES, NO = "yes", "no"
N_TRAIN, TRAIN_SEED, MODEL_SEED = 512, 1, 0
STEPS, BATCH, LR = 120, 64, 3e-3
N_EVAL, EVAL_SEED, EVAL_ALPHA = 400, 7, 0.5


def tokenizer():
    """The task's word tokenizer with the judge's three words appended."""
    return word_tokenizer([*TASK.vocabulary, "verdict", YES, NO])


def _judge_scores(model: Any, ids: list[list[int]], yes: int, no: int, pad: int) -> torch.Tensor:
    """``logit(yes) - logit(no)`` at each prompt's last token, through the HF model (right padding)."""
    n = max(map(len, ids))
    tokens = torch.tensor([s + [pad] * (n - len(s)) for s in ids])
    mask = (torch.arange(n)[None] < torch.tensor([len(s) for s in ids])[:, None]).long()
    logits = model(tokens, attention_mask=mask).logits
    last = logits[torch.arange(len(ids)), mask.sum(1) - 1]
    return last[:, yes] - last[:, no]


def train_judge(*, steps: int = STEPS, seed: int = MODEL_SEED) -> tuple[Any, Any, list[float]]:
    """Train the judge; returns (HF causal LM, tokenizer, losses)."""
    import transformers as T

    tok = tokenizer()
    config = T.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(config)
    yes, no = tok.convert_tokens_to_ids([YES, NO])
    data = TASK.sample(N_TRAIN, seed=TRAIN_SEED)

    def encode(texts: list) -> list[list[int]]:
        return [tok(TEMPLATE.replace("{text}", t))["input_ids"] for t in texts]

    chosen, rejected = encode(data.chosen_texts), encode(data.rejected_texts)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, N_TRAIN, (BATCH,), generator=gen).tolist()
        margin = (_judge_scores(model, [chosen[i] for i in idx], yes, no, tok.pad_token_id)
                  - _judge_scores(model, [rejected[i] for i in idx], yes, no, tok.pad_token_id))
        loss = -F.logsigmoid(margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return model.eval(), tok, losses


def eval_set() -> PreferenceDataset:
    return TASK.sample(N_EVAL, seed=EVAL_SEED, alpha=EVAL_ALPHA, noise=0.0)


def load(**load_kwargs: Any):
    """The shipped judge as a :class:`~tl_reward.HookedJudgeModel` reading
    ``logit(yes) - logit(no)`` after ``TEMPLATE``. ``load_kwargs``: as
    :func:`tl_reward.load_judge_reward_model` (``device``, ``dtype``, ``fold_ln``, ...)."""
    from ..loading.causal_lm import load_judge_reward_model

    if not (DIRECTORY / "model" / "config.json").exists():
        raise ModelSourceError(
            f"the judge organism's weights are missing from {str(DIRECTORY)!r}; rebuild them "
            "with `python -m tl_reward.organisms.judge`"
        )
    return load_judge_reward_model(DIRECTORY / "model", template=TEMPLATE, read="yes_no",
                                   yes=YES, no=NO, **load_kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the judge long-tail organism")
    parser.add_argument("--out", type=Path, default=DIRECTORY)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, tok, losses = train_judge()
    model.save_pretrained(args.out / "model", safe_serialization=True)
    tok.save_pretrained(args.out / "model")
    meta = {"task": TASK.to_dict(), "template": TEMPLATE, "yes": YES, "no": NO, "steps": STEPS,
            "batch": BATCH, "lr": LR, "n_train": N_TRAIN, "train_seed": TRAIN_SEED,
            "model_seed": MODEL_SEED, "final_loss": sum(losses[-10:]) / 10,
            "train_seconds": round(time.perf_counter() - start, 1)}
    (args.out / "organism.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
