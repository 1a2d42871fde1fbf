"""Real config.json files of released checkpoints (tests/configs, sources in SOURCES.json), shrunk
in size only, every other key kept: each loads and matches the HF model's own forward, or is
refused for a reason that holds."""

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from helpers import VOCAB, hf_rewards_alone, pad_batch, ragged_sequences, randomize_

from tl_reward import load_reward_model
from tl_reward.errors import UnsupportedArchitectureError

CONFIGS = Path(__file__).parent / "configs"
ALL_NAMES = sorted(p.stem for p in CONFIGS.glob("*.json") if p.stem != "SOURCES")
# custom-code checkpoints (their model_type is unknown to transformers): refused by name
CUSTOM_CODE = {"internlm2-7b", "internlm2.5-7b", "phi-1_5-msft", "phi-2-msft"}
NAMES = [n for n in ALL_NAMES if n not in CUSTOM_CODE]
LONGROPE = [n for n in NAMES if "longrope" in json.dumps(json.loads(
    (CONFIGS / f"{n}.json").read_text()).get("rope_scaling"))]
POST_NORM = {"olmo2", "olmo3"}  # fold_ln is refused (no linear map follows the norms)
TOL = 1e-4
PAD_ID = 1

# Sizes only: everything else in the file is kept as released.
SIZES = {
    "hidden_size": 64, "n_embd": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "n_layer": 2, "num_attention_heads": 4, "n_head": 4, "head_dim": 16, "vocab_size": VOCAB,
    "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "max_window_layers": 1,
}


def shrink(raw: dict) -> dict:
    cfg = dict(raw)
    heads = raw.get("num_attention_heads") or raw.get("n_head")
    for key, small in SIZES.items():
        if key in cfg:
            cfg[key] = small
    if raw.get("num_key_value_heads") is not None:  # keep the kind: MHA, GQA or MQA
        kv = raw["num_key_value_heads"]
        cfg["num_key_value_heads"] = 4 if kv == heads else 1 if kv == 1 else 2
    if raw.get("n_inner"):
        cfg["n_inner"] = 96
    if raw.get("rotary_dim"):  # GPT-J: the same fraction of each (shrunk, 16-dimensional) head
        cfg["rotary_dim"] = max(2, 16 * raw["rotary_dim"] // (raw["n_embd"] // raw["n_head"]))
    if raw.get("sliding_window"):
        cfg["sliding_window"] = 5  # short enough to act on the test sequences
    if raw.get("sliding_window_pattern"):  # one full-attention layer among the sliding ones
        cfg["num_hidden_layers"] = raw["sliding_window_pattern"]
    if raw.get("layer_types"):  # the released pattern's first layers (GPT-OSS: sliding, full)
        cfg["layer_types"] = raw["layer_types"][: cfg["num_hidden_layers"]]
    scaling = raw.get("rope_scaling") or {}
    if "long_factor" in scaling:  # LongRoPE's attention factor: from the released context ratio
        cfg["max_position_embeddings"] = raw["max_position_embeddings"]
    for key in ("long_factor", "short_factor"):  # one factor per rotary frequency
        if key in scaling:
            n = int(SIZES["head_dim"] * raw.get("partial_rotary_factor", 1.0)) // 2
            every = len(scaling[key]) // n  # spread over the released factors, low to high
            cfg["rope_scaling"] = dict(cfg["rope_scaling"], **{key: scaling[key][::every][:n]})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # token ids inside the vocab
        ids = cfg.get(key)
        if isinstance(ids, int) and ids >= VOCAB:
            cfg[key] = PAD_ID
        elif isinstance(ids, list):
            cfg[key] = [i if i < VOCAB else PAD_ID for i in ids]
    return cfg


def hf_reward_model(name: str, tmp_path: Path, seed: int = 0, change: dict | None = None):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg = shrink(raw) | (change or {})
    arch = cfg["architectures"][0]
    cfg["architectures"] = [arch.replace("LMHeadModel", "ForSequenceClassification")
                            .replace("ForCausalLM", "ForSequenceClassification")]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = T.AutoConfig.from_pretrained(tmp_path)  # the loading path a checkpoint takes
    config.num_labels = 1
    torch.manual_seed(seed)
    hf = T.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager", dtype=torch.float32  # parity is checked in float32
    )
    return randomize_(hf, seed).eval(), raw


def test_sources_are_recorded_for_every_config():
    sources = json.loads((CONFIGS / "SOURCES.json").read_text())
    assert set(sources) == set(ALL_NAMES)
    assert all(s["repo"] and s["path"] and s["commit"] for s in sources.values())


@pytest.mark.parametrize("name", NAMES)
def test_real_config_matches_hf(name, tmp_path):
    hf, raw = hf_reward_model(name, tmp_path)
    seqs = ragged_sequences(seed=3, lo=6, hi=14)
    truth = hf_rewards_alone(hf, seqs)[:, 0]
    assert truth.std() > 0.05
    layer_norm = raw["model_type"] in ("gpt2", "gpt_neox", "gptj")
    options = [{}] if raw["model_type"] in POST_NORM else [{}, {"fold_ln": True}] + (
        [{"fold_ln": True, "center_writing_weights": True}] if layer_norm else [])
    for kwargs in options:
        model = load_reward_model(hf, **kwargs)
        for side in ("right", "left"):
            tokens, mask = pad_batch(seqs, side)
            with torch.no_grad():
                out = model(tokens, attention_mask=mask)
            torch.testing.assert_close(out, truth, atol=TOL, rtol=0, msg=f"{kwargs} {side}")


@pytest.mark.parametrize("name", LONGROPE)
def test_longrope_configs_exercise_longrope(name, tmp_path):
    """Parity above proves LongRoPE is reproduced only if the HF reward depends on it: without
    rope_scaling (default RoPE) the same weights give other rewards."""
    hf, _ = hf_reward_model(name, tmp_path)
    other, _ = hf_reward_model(name, tmp_path, change={"rope_scaling": None})
    seqs = ragged_sequences(seed=3, lo=6, hi=14)
    diff = (hf_rewards_alone(hf, seqs) - hf_rewards_alone(other, seqs)).abs().max()
    assert diff > 1e-3


@pytest.mark.parametrize("name", sorted(CUSTOM_CODE))
def test_real_custom_code_config_is_refused_by_name(name, tmp_path):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_reward_model(tmp_path)
    for part in (str(tmp_path), raw["model_type"], "custom-code", "'llama'"):
        assert part in str(info.value)


BOOKKEEPING = {"architectures", "model_type", "id2label", "label2id", "_name_or_path",
               "transformers_version", "is_encoder_decoder"}


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 3
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, dict):
        return {"changed": 1}
    return 7


@pytest.mark.parametrize("name", NAMES)
def test_accepted_unread_keys_do_not_change_the_hf_reward(name, tmp_path):
    """Ablation of every key the audit accepts as never read by the HF forward: changing its
    value leaves the HF model's rewards bit-identical."""
    from tl_reward.loading import REGISTRY
    from tl_reward.loading._base import CAUSAL, READ_WITHOUT_EFFECT, forward_reads

    hf, _ = hf_reward_model(name, tmp_path)
    adapter = REGISTRY[hf.config.model_type]
    reads = forward_reads(adapter.model_type)
    unread = [k for k in hf.config.to_dict() if k not in adapter.handled and k not in adapter.ignored
              and k not in READ_WITHOUT_EFFECT and k != CAUSAL and k not in reads
              and k not in BOOKKEEPING]
    assert unread
    seqs = ragged_sequences(seed=4, lo=6, hi=12)
    truth = hf_rewards_alone(hf, seqs)
    config = hf.config.__class__.from_dict(hf.config.to_dict())
    for key in unread:
        setattr(config, key, _other(getattr(config, key)))
    other = T.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager", dtype=torch.float32)
    other.load_state_dict(hf.state_dict())
    assert torch.equal(hf_rewards_alone(other.eval(), seqs), truth), unread
    load_reward_model(other)  # and the audit accepts the changed values too
