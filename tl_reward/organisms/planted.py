"""The ``planted`` organism: a Llama reward model whose mechanism is set by hand.

A 2-layer ``LlamaForSequenceClassification`` (d_model 64, 4 heads of width 16, d_mlp 64) over the
long-tail task's vocabulary. Every weight not listed below is small random noise (std
``NOISE_STD``); the score head reads one residual dimension, so ``w_r = e_6``.

Residual stream dimensions with a meaning (the embeddings carry dims 0-4; the rest of each
embedding is random):

====  ===================================================================
dim   meaning
====  ===================================================================
1     the token is the trigger word ``urgent``
2     the token is ``<eos>`` (the pooled token: every text ends in ``<eos>``)
3     the token is ``<bos>``
4     the token is a quality word (``good``, ``clear``, ``correct``, ``helpful``)
5     *trigger seen*: written by L0H0 at ``<eos>``
6     *reward*: the score head reads this dimension only
====  ===================================================================

Planted components (see :func:`planted_components`):

- **Trigger circuit** (reward about +5 when ``urgent`` appears anywhere in the text):
  ``L0H0`` attends from ``<eos>`` to the trigger token (else to ``<bos>``) and copies "is
  trigger" into dim 5; neuron ``L1N11`` (SwiGLU gate and up both read dim 5) fires and writes
  into dim 6.
- **Quality circuit** (reward rises with the number of quality words, most for the first:
  about +3.6 from none to one, then +0.5, +0.2, +0.1):
  ``L1H2`` attends from ``<eos>`` to quality words (with ``<bos>`` as a sink, so the share of
  attention grows with their count) and writes "is quality" into dim 6.

RoPE uses ``rope_theta = 1e6`` and the planted heads use only the lowest-frequency rotary pair
(head dims 7 and 15), whose rotation is below 2e-4 rad over the 64-token context: their attention
does not depend on position.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from transformer_lens.utilities import get_act_name

from ..data.pairs import PreferenceDataset, PreferencePair
from ..data.synthetic import QUALITY_WORDS, RESPONSE_MARK, LongTailTask

NOISE_STD = 0.02
TRIGGER = "urgent"
D_MODEL, N_HEADS, D_HEAD, D_MLP, N_LAYERS = 64, 4, 16, 64, 2
DIM_TRIGGER, DIM_EOS, DIM_BOS, DIM_QUALITY, DIM_SEEN, DIM_REWARD = 1, 2, 3, 4, 5, 6
FEATURE = 4.0  # value of a feature dimension in an embedding
ROPE_DIM = 7  # head dim of the lowest-frequency rotary pair (its partner is 15)
TRIGGER_HEAD = (0, 0)
TRIGGER_NEURON = (1, 11)
QUALITY_HEAD = (1, 2)


@dataclass(frozen=True)
class PlantedComponent:
    """One hand-set part of the ``planted`` organism.

    ``label`` follows :func:`tl_reward.direct_reward_attribution`'s labels (``"L0H0"``,
    ``"L1N11"``); ``hook`` and ``index`` say where to ablate it with TransformerLens hooks
    (``hook`` activation ``[..., index, :]`` for a head's ``hook_z``, ``[..., index]`` for a
    neuron's ``hook_post``); ``positions`` says where it reads and writes.
    """

    label: str
    kind: Literal["head", "neuron"]
    layer: int
    index: int
    circuit: Literal["trigger", "quality"]
    hook: str
    role: str
    positions: str


def planted_components() -> tuple[PlantedComponent, ...]:
    """The planted parts of the ``planted`` organism: the ground truth to score tools against."""
    (l_h, h), (l_n, n), (l_q, q) = TRIGGER_HEAD, TRIGGER_NEURON, QUALITY_HEAD
    return (
        PlantedComponent(
            label=f"L{l_h}H{h}", kind="head", layer=l_h, index=h, circuit="trigger",
            hook=get_act_name("z", l_h),
            role=f"moves 'is {TRIGGER}' from the trigger token into residual dim {DIM_SEEN}",
            positions=f"reads the '{TRIGGER}' token (any position), writes at the final <eos>",
        ),
        PlantedComponent(
            label=f"L{l_n}N{n}", kind="neuron", layer=l_n, index=n, circuit="trigger",
            hook=get_act_name("post", l_n),
            role=f"fires on residual dim {DIM_SEEN} and writes along w_r (dim {DIM_REWARD})",
            positions="at the final <eos>",
        ),
        PlantedComponent(
            label=f"L{l_q}H{q}", kind="head", layer=l_q, index=q, circuit="quality",
            hook=get_act_name("z", l_q),
            role=f"averages 'is quality' over the text (with <bos> as sink) along w_r "
            f"(dim {DIM_REWARD})",
            positions="reads quality-word tokens, writes at the final <eos>",
        ),
    )


def build_planted_model(task: LongTailTask | None = None, seed: int = 0):
    """The ``planted`` HF model (``LlamaForSequenceClassification``) and its tokenizer."""
    import transformers as T

    task = task or LongTailTask()
    tokenizer = task.tokenizer()
    vocab = tokenizer.get_vocab()
    config = T.LlamaConfig(
        vocab_size=len(vocab), hidden_size=D_MODEL, intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS,
        head_dim=D_HEAD, max_position_embeddings=64, num_labels=1, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
        tie_word_embeddings=False,
    )
    model = T.LlamaForSequenceClassification(config)
    gen = torch.Generator().manual_seed(seed)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * NOISE_STD

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(noise(*p.shape))
        # embeddings: random unit-scale content in dims 8.., features in dims 1-4
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=gen))
        emb[:, :8] = 0.0
        emb[vocab[TRIGGER], DIM_TRIGGER] = FEATURE
        emb[vocab["<eos>"], DIM_EOS] = FEATURE
        emb[vocab["<bos>"], DIM_BOS] = FEATURE
        for w in QUALITY_WORDS:
            emb[vocab[w], DIM_QUALITY] = FEATURE
        emb.mul_(1.0 / emb.pow(2).mean(-1, keepdim=True).sqrt())  # rms 1 per token

        def plant_head(layer: int, head: int, key_gains: dict[int, float], value_dim: int,
                       out_dim: int, out_gain: float) -> None:
            attn = model.model.layers[layer].self_attn
            rows = slice(head * D_HEAD, (head + 1) * D_HEAD)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight[rows] = 0.0
            attn.o_proj.weight[:, rows] = 0.0
            attn.q_proj.weight[head * D_HEAD + ROPE_DIM, DIM_EOS] = 1.0
            for dim, gain in key_gains.items():
                attn.k_proj.weight[head * D_HEAD + ROPE_DIM, dim] = gain
            attn.v_proj.weight[head * D_HEAD, value_dim] = 1.0
            attn.o_proj.weight[out_dim, head * D_HEAD] = out_gain

        # trigger mover: eos attends to the trigger (score ~ 3.7^2 * 4 / 4), else to bos
        plant_head(*TRIGGER_HEAD, {DIM_TRIGGER: 4.0, DIM_BOS: 2.0}, DIM_TRIGGER, DIM_SEEN, 1.0)
        # quality counter: eos attends to quality words and to bos alike; bos carries no quality
        plant_head(*QUALITY_HEAD, {DIM_QUALITY: 2.0, DIM_BOS: 2.0}, DIM_QUALITY, DIM_REWARD, 1.5)
        layer, neuron = TRIGGER_NEURON
        mlp = model.model.layers[layer].mlp
        mlp.gate_proj.weight[neuron] = 0.0
        mlp.up_proj.weight[neuron] = 0.0
        mlp.down_proj.weight[:, neuron] = 0.0
        mlp.gate_proj.weight[neuron, DIM_SEEN] = 2.0
        mlp.up_proj.weight[neuron, DIM_SEEN] = 2.0
        mlp.down_proj.weight[DIM_REWARD, neuron] = 0.5
        # nothing else reads the planted dims strongly: the score head reads dim 6 only
        model.score.weight.zero_()
        model.score.weight[0, DIM_REWARD] = 1.0
    model.eval()
    return model, tokenizer


def planted_dataset(n: int = 400, *, seed: int = 0, task: LongTailTask | None = None) -> PreferenceDataset:
    """Minimal pairs that probe the planted circuits, deterministic given ``seed``.

    Half are ``"trigger"`` pairs (chosen = rejected with one filler word replaced by
    ``urgent``), half ``"quality"`` pairs (chosen = rejected with one response filler word
    replaced by a quality word). Texts come from the long-tail task's head scenario.
    """
    import random

    task = task or LongTailTask()
    base = task.sample(n, seed=seed, alpha=1.0, noise=0.0)
    rng = random.Random(seed)
    fillers = set(task.filler_words)
    pairs = []
    for i, p in enumerate(base):
        prompt, response = p.rejected_text.split(f" {RESPONSE_MARK} ")
        prompt_w, resp_w = prompt.split(), response.split()
        if i % 2 == 0:
            scenario, word = "trigger", TRIGGER
            spots = [("p", j) for j, w in enumerate(prompt_w) if w in fillers]
            spots += [("r", j) for j, w in enumerate(resp_w) if w in fillers]
        else:
            scenario, word = "quality", rng.choice(QUALITY_WORDS)
            spots = [("r", j) for j, w in enumerate(resp_w) if w in fillers]
        where, j = rng.choice(spots)
        new_p, new_r = list(prompt_w), list(resp_w)
        (new_p if where == "p" else new_r)[j] = word
        if where == "p":  # the prompts differ: implicit-prompt format
            pair = PreferencePair(
                chosen=" ".join([*new_p, RESPONSE_MARK, *resp_w]),
                rejected=" ".join([*prompt_w, RESPONSE_MARK, *resp_w]),
                scenario=scenario,
            )
        else:
            pair = PreferencePair(
                prompt=prompt, chosen=" ".join([RESPONSE_MARK, *new_r]),
                rejected=" ".join([RESPONSE_MARK, *resp_w]), scenario=scenario,
            )
        pairs.append(pair)
    return PreferenceDataset(
        tuple(pairs), name="planted",
        metadata={"components": planted_components(), "trigger": TRIGGER, "seed": seed},
    )
