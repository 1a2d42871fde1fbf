"""Scale: lean loading (no second copy, no initialisation, no float32 round trip), bounded memory
of the tools at long inputs, and the scale benchmark at a tiny size."""

import pytest
import torch
from helpers import hf_rewards_alone, make_hf_model, pad_batch, ragged_sequences

from tl_reward import load_reward_model

BIG = ("embed.W_E", "blocks.0.attn.W_Q", "blocks.1.mlp.W_out", "blocks.0.attn.W_O")


def _storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_same_dtype_load_reuses_the_hf_tensors(arch):
    """Loaded in the HF model's dtype on its device, the weights are the HF tensors themselves
    (views in the layout the matmuls read), not copies; rewards still match HF."""
    hf = make_hf_model(arch, gqa=arch != "gpt_neox")
    model = load_reward_model(hf)
    hf_storages = _storages(hf)
    params = dict(model.named_parameters())
    for key in BIG:
        if key in params:
            assert params[key].untyped_storage().data_ptr() in hf_storages, key
    seqs = ragged_sequences(seed=3)
    tokens, mask = pad_batch(seqs, "right")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, attention_mask=mask),
                                   hf_rewards_alone(hf, seqs)[:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,kwargs", [("gpt2", {"fold_ln": True, "center_writing_weights": True}),
                                          ("llama", {"fold_ln": True}),
                                          ("gemma2", {"fold_ln": True, "dtype": torch.bfloat16})])
def test_processing_never_writes_into_the_hf_model(arch, kwargs):
    """Folding and centring make new tensors: the HF model whose tensors are reused is unchanged."""
    hf = make_hf_model(arch, gqa=arch != "gpt2")
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    load_reward_model(hf, **kwargs)
    for k, v in hf.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_identical_buffers_are_stored_once():
    """Rotary tables are the same in every layer of the same kind: one tensor, not one per layer
    (TransformerLens builds them per layer, [n_ctx, rotary_dim] each)."""
    model = load_reward_model(make_hf_model("llama", gqa=True))
    assert len({b.attn.rotary_sin.data_ptr() for b in model.blocks}) == 1
    assert len({b.attn.rotary_cos.data_ptr() for b in model.blocks}) == 1
    reference = load_reward_model(make_hf_model("llama", gqa=True)).blocks[1].attn.rotary_sin
    assert torch.equal(model.blocks[1].attn.rotary_sin, reference)


def test_directory_load_in_half_precision_is_memory_mapped(tmp_path):
    """From a directory, the checkpoint is read in the requested dtype (no float32 copy) and its
    tensors are the memory-mapped file's: the parameters live in a mapping of model.safetensors."""
    hf = make_hf_model("llama", gqa=True).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = load_reward_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    maps = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if fields[-1].endswith("model.safetensors") and str(tmp_path) in fields[-1]:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            maps.append((lo, hi))
    w_q = model.blocks[0].attn.W_Q
    assert any(lo <= w_q.data_ptr() < hi for lo, hi in maps), "W_Q is not the file's mapping"
    tokens, mask = pad_batch(ragged_sequences(seed=4), "right")
    with torch.no_grad():  # the same rewards as converting the same HF model in memory
        assert torch.equal(model(tokens, attention_mask=mask),
                           load_reward_model(hf)(tokens, attention_mask=mask))
