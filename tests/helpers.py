"""Shared builders: tiny random HF reward models of every supported architecture."""

import torch
import transformer_lens.patching as tlp
import transformers as T

VOCAB = 97
PAD = 1  # pad == eos in every tiny config, the case where pooling is easy to get wrong
BASE = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=PAD, bos_token_id=2)


def llama_like(
    cls, gqa: bool, *, num_labels: int = 1, **extra
) -> T.PretrainedConfig:
    return cls(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        head_dim=16,
        max_position_embeddings=64,
        num_labels=num_labels,
        **BASE,
        **({"num_hidden_layers": 2} | extra),
    )


def make_config(arch: str, gqa: bool = False, num_labels: int = 1) -> T.PretrainedConfig:
    """A tiny config of ``arch`` that exercises the architecture's special features."""
    if arch == "llama":
        rope = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return llama_like(T.LlamaConfig, gqa, num_labels=num_labels, rope_parameters=rope)
    if arch == "mistral":
        return llama_like(T.MistralConfig, gqa, num_labels=num_labels, sliding_window=5)
    if arch == "qwen2":
        return llama_like(
            T.Qwen2Config, gqa, num_labels=num_labels, use_sliding_window=True,
            sliding_window=5, max_window_layers=1,
        )
    if arch == "qwen3":
        return llama_like(T.Qwen3Config, gqa, num_labels=num_labels)
    if arch == "gemma":
        return llama_like(T.GemmaConfig, gqa, num_labels=num_labels)
    if arch == "gemma2":
        return llama_like(
            T.Gemma2Config, gqa, num_labels=num_labels, sliding_window=5,
            query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
        )
    if arch == "gpt2":
        return T.GPT2Config(
            n_embd=64, n_head=4, n_layer=2, n_positions=64, num_labels=num_labels, **BASE
        )
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(
            hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
            max_position_embeddings=64, num_labels=num_labels,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                             "partial_rotary_factor": 0.5},
            **BASE,
        )
    if arch == "gptj":  # rotary on a quarter of each head, as GPT-J 6B
        return T.GPTJConfig(
            n_embd=64, n_head=4, n_layer=2, n_positions=64, rotary_dim=4, num_labels=num_labels,
            **BASE,
        )
    if arch == "phi":  # Phi-2's partial rotary (0.4)
        return T.PhiConfig(
            hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
            max_position_embeddings=64, num_labels=num_labels,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                             "partial_rotary_factor": 0.4}, **BASE,
        )
    if arch == "opt":
        return T.OPTConfig(
            hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=96,
            max_position_embeddings=64, word_embed_proj_dim=64, num_labels=num_labels, **BASE,
        )
    if arch == "phi3":  # a partial rotary factor, as Phi-4-mini
        return llama_like(
            T.Phi3Config, gqa, num_labels=num_labels, sliding_window=5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                             "partial_rotary_factor": 0.75},
        )
    if arch == "mixtral":
        return llama_like(
            T.MixtralConfig, gqa, num_labels=num_labels, sliding_window=5, num_local_experts=4,
            num_experts_per_tok=2,
        )
    if arch == "olmo2":
        return llama_like(T.Olmo2Config, gqa, num_labels=num_labels)
    if arch == "gemma3_text":
        return llama_like(
            T.Gemma3TextConfig, gqa, num_labels=num_labels, num_hidden_layers=3, sliding_window=5,
            query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention",
                                                   "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
            },
        )
    if arch == "gpt_neo":  # local and global layers, a window shorter than the sequences
        return T.GPTNeoConfig(
            hidden_size=64, num_heads=4, num_layers=2, intermediate_size=96,
            max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
            window_size=5, num_labels=num_labels, **BASE,
        )
    if arch == "bloom":  # ALiBi positions, a LayerNorm on the embeddings
        return T.BloomConfig(
            hidden_size=64, n_head=8, n_layer=2, num_labels=num_labels, **BASE,
        )
    if arch == "olmo":  # clamped query/key/value projections, as OLMo-7B-0424
        return llama_like(T.OlmoConfig, gqa, num_labels=num_labels, clip_qkv=0.5)
    if arch == "olmo3":  # OLMo-2's block, sliding layers, YaRN on the full-attention layers
        return llama_like(
            T.Olmo3Config, gqa, num_labels=num_labels, num_hidden_layers=3, sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                   "original_max_position_embeddings": 16,
                                   "attention_factor": 1.2},
            },
        )
    if arch == "gpt_oss":  # sinks, sliding and full layers, YaRN, 4 experts (top 2), biases
        return llama_like(
            T.GptOssConfig, gqa, num_labels=num_labels, sliding_window=5, num_local_experts=4,
            num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 8.0,
                             "original_max_position_embeddings": 16, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False},
        )
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox"]
GQA_ARCHS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral",
             "olmo2", "gemma3_text", "olmo", "olmo3",
             "gpt_oss"}
# Families added by issue 18 (parity-tested in test_loading; the tool tests keep ARCHS)
MORE_ARCHS = ["phi3", "mixtral", "olmo2", "gemma3_text", "gptj", "opt", "phi", "gpt_neo", "bloom",
              "olmo", "olmo3", "gpt_oss"]
POST_NORM_ARCHS = {"olmo2", "olmo3"}  # fold_ln is refused: no linear map follows their norms


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.25) -> torch.nn.Module:
    """Overwrite every weight with noise large enough that rewards vary by O(1) across inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            is_norm = "norm" in name or ".ln_" in name or name.endswith(("ln_f.weight", "ln_f.bias"))
            if is_norm and name.endswith("weight"):
                base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(base + 0.2 * noise)
            else:
                p.copy_(std * noise)
    return model


def make_hf_model(arch: str, gqa: bool = False, num_labels: int = 1, seed: int = 0):
    config = make_config(arch, gqa, num_labels)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    return randomize_(model, seed).eval()


def ragged_sequences(seed: int = 0, n: int = 6, lo: int = 3, hi: int = 14) -> list[list[int]]:
    """Sequences of different lengths; some end in the pad/eos id, none contain only pads."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        seq = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        if i % 2 == 1:
            seq[-1] = PAD  # ends in eos == pad: HF pools the token before it
        seqs.append(seq)
    return seqs


def pad_batch(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    n_pos = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), n_pos), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), n_pos), dtype=torch.long)
    for row, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(n_pos - len(s), n_pos)
        tokens[row, sl] = torch.tensor(s)
        mask[row, sl] = 1
    return tokens, mask


@torch.no_grad()
def hf_rewards_alone(hf_model, seqs: list[list[int]]) -> torch.Tensor:
    """The truth: each sequence run alone through the HF model, unpadded."""
    return torch.cat([hf_model(torch.tensor([s])).logits for s in seqs])


# TransformerLens's patching functions our grids are checked against: (hook, per, function,
# permutation of its output to our [layer, head, pos] order)
TL_CASES = [
    ("resid_pre", "layer_pos", tlp.get_act_patch_resid_pre, None),
    ("attn_out", "layer_pos", tlp.get_act_patch_attn_out, None),
    ("mlp_out", "layer_pos", tlp.get_act_patch_mlp_out, None),
    ("z", "head", tlp.get_act_patch_attn_head_out_all_pos, None),
    ("z", "head_pos", tlp.get_act_patch_attn_head_out_by_pos, (0, 2, 1)),
    ("v", "head_pos", tlp.get_act_patch_attn_head_v_by_pos, (0, 2, 1)),
    ("pattern", "head", tlp.get_act_patch_attn_head_pattern_all_pos, None),
]
