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


@pytest.mark.parametrize("kind", ["reward_model", "causal_lm"])
def test_directory_load_in_half_precision_is_memory_mapped(tmp_path, kind):
    """From a directory, the checkpoint is read in the requested dtype (no float32 copy); a
    reward model's tensors are the memory-mapped file's: the parameters live in a mapping of
    model.safetensors. A causal LM (what judges and implicit rewards load) is read the same way;
    its HookedTransformer keeps TransformerLens's own parameter layout, so the attention weights
    are copied per tensor."""
    import transformers as T
    from helpers import make_config

    from tl_reward import load_causal_lm

    if kind == "reward_model":
        hf, load = make_hf_model("llama", gqa=True), load_reward_model
    else:
        hf = T.LlamaForCausalLM(make_config("llama", gqa=True)).eval()
        load = load_causal_lm
    hf = hf.to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = load(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    maps = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if fields[-1].endswith("model.safetensors") and str(tmp_path) in fields[-1]:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            maps.append((lo, hi))
    w_q = model.blocks[0].attn.W_Q
    in_file = any(lo <= w_q.data_ptr() < hi for lo, hi in maps)
    assert in_file == (kind == "reward_model"), "W_Q is not the file's mapping"
    assert maps, "the checkpoint was not memory-mapped"
    tokens, mask = pad_batch(ragged_sequences(seed=4), "right")
    with torch.no_grad():  # the same outputs as converting the same HF model in memory
        assert torch.equal(model(tokens, attention_mask=mask),
                           load(hf)(tokens, attention_mask=mask))


def test_a_sequence_whose_graph_cannot_fit_is_checkpointed_or_refused(monkeypatch):
    """AtP's backward keeps every layer's graph (measured: AtP at 2,048 tokens on a 1B model was
    killed by the system's OOM killer at 23 GB before checkpointing). Where one sequence's full
    graph exceeds the memory available, AtP recomputes it block by block (the same estimates);
    asked not to checkpoint, it is refused before it runs, and so is a sequence whose
    checkpointed graph does not fit either; a forward-only tool on the same input still runs.
    Only the available-memory reading is replaced here, not any number the tools compute."""
    import transformers as T
    from helpers import make_config, randomize_

    import tl_reward._memory as memory
    from tl_reward import attribution_patch, errors, reward_lens

    config = make_config("llama", gqa=True)
    config.num_hidden_layers = 8
    torch.manual_seed(0)
    hf = T.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    model = load_reward_model(randomize_(hf).eval())
    tokens, mask = pad_batch(ragged_sequences(seed=5), "right")
    n = tokens.shape[1]
    kw = dict(hooks=("z", "resid_pre"), layers=[6, 7], progress=False)
    plain = attribution_patch(model, tokens[:2], tokens[2:4], checkpoint=False, **kw)
    forward = memory.forward_bytes_per_row(model.cfg, n)
    kept = 3 * n * 2 * (64 + 64) * 4  # both runs' activations and the gradients of z, resid_pre
    backward = memory.forward_bytes_per_row(model.cfg, n, grad=True) + kept
    checkpointed = memory.forward_bytes_per_row(model.cfg, n, grad=True, checkpointed=True) + kept
    assert forward < checkpointed < backward
    available = (checkpointed + backward) // 2
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": available)
    with memory.memory_budget(available / 2**30):
        reward_lens(model, tokens, mask)
        atp = attribution_patch(model, tokens[:2], tokens[2:4], **kw)
        assert atp.stats.n_forwards == 3 * 2  # checkpointed: one pair a chunk, one more forward
        for hook, est in plain.estimates.items():
            torch.testing.assert_close(atp.estimates[hook], est, atol=1e-5, rtol=1e-4)
        with pytest.raises(errors.InsufficientMemoryError, match=rf"one sequence of {n} tokens.*"
                           r"backward pass keeps every layer"):
            attribution_patch(model, tokens[:2], tokens[2:4], checkpoint=False, **kw)
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": forward)
    with memory.memory_budget(forward / 2**30), pytest.raises(errors.InsufficientMemoryError):
        attribution_patch(model, tokens[:2], tokens[2:4], **kw)


def test_memory_budget_picks_smaller_batches_with_the_same_results():
    """A budget that fits one row's forward runs the tools one row at a time, with the results
    of one big batch; the budget is restored on leaving the block."""
    from tl_reward import direct_reward_attribution, memory_budget, reward_lens
    from tl_reward._memory import forward_bytes_per_row, get_memory_budget, rows_that_fit

    model = load_reward_model(make_hf_model("llama", gqa=True))
    tokens, mask = pad_batch(ragged_sequences(seed=5), "right")
    big_lens = reward_lens(model, tokens, mask, batch_size=32)
    big_attr = direct_reward_attribution(model, tokens, mask, level="head", batch_size=32)
    one_row = forward_bytes_per_row(model.cfg, tokens.shape[1])
    outside = get_memory_budget()
    with memory_budget(1.5 * one_row / 2**30):
        assert rows_that_fit(model.cfg, tokens.shape[1], 32) == 1
        lens = reward_lens(model, tokens, mask, batch_size=32)
        attr = direct_reward_attribution(model, tokens, mask, level="head", batch_size=32)
    assert get_memory_budget() >= outside // 2  # not left at the tiny budget
    torch.testing.assert_close(lens.rewards, big_lens.rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(attr.values, big_attr.values, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positive"):
        memory_budget(0.0).__enter__()


def test_pooled_run_keeps_only_the_scoring_token():
    """The observational tools keep [batch, 1, ...] of each activation they read (the pattern's
    pooled query row), never the full [batch, pos, ...] activations, and no autograd graph."""
    from tl_reward._readout import pooled_run

    model = load_reward_model(make_hf_model("llama", gqa=True))
    tokens, mask = pad_batch(ragged_sequences(seed=6), "right")
    run = pooled_run(model, tokens, mask, lambda n: "hook_resid" in n or "hook_pattern" in n)
    assert not run.rewards.requires_grad
    for name, act in run.cache.cache_dict.items():
        if name.endswith("hook_pattern"):
            assert act.shape == (tokens.shape[0], model.cfg.n_heads, 1, tokens.shape[1])
        else:
            assert act.shape[:2] == (tokens.shape[0], 1), name
    _, full = model.run_with_cache(tokens, attention_mask=mask)
    rows = torch.arange(tokens.shape[0])
    torch.testing.assert_close(run.cache["blocks.1.hook_resid_pre"][:, 0],
                               full["blocks.1.hook_resid_pre"][rows, run.pool_index])


def test_a_chat_longer_than_n_ctx_says_how_to_raise_it():
    model = load_reward_model(make_hf_model("llama", gqa=True), n_ctx=16)
    with pytest.raises(ValueError, match=r"load_reward_model\(\.\.\., n_ctx=\.\.\.\)"):
        model(torch.full((1, 17), 5))


def test_bench_scale_runs_at_tiny_scale():
    """benchmarks/bench_scale.py, the GPU scale check, at tiny shapes on the CPU: it runs, and its
    figures hold together (attribution adds up, the lens ends at the reward, grids have the
    model's shape, bf16 agrees with float32)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.run("tiny", "cpu")
    n_layers, n_heads = 2, 4
    assert r["attribution_completeness"] < 1e-2 and r["lens_last_vs_reward"] < 1e-2
    assert r["resid_grid_shape"][0] == n_layers and r["head_grid_shape"][:2] == [n_layers, n_heads]
    assert r["atp_cells"] == n_layers * (n_heads + 128) * bench.SIZES["tiny"][2]
    assert r["bf16_effect_corr"] > 0.99
    assert r["bf16_reward_gap"] < 0.05 * r["bf16_reward_scale"] + 1e-3
    assert "| forward 2 x 128" in bench.table(r)


def test_layers_split_over_devices_are_placed_where_transformer_lens_runs_them(monkeypatch):
    """``n_devices``: block i lives on TransformerLens's ``get_device_for_block_index(i)``, the
    embeddings with block 0, the final norm and the head with the last block, and the forward
    (both paths) passes the residual stream between them. Without several GPUs, the placement
    alone is replaced: the second half of the layers goes to the ``meta`` device (shapes, no
    numbers), where any operation mixing devices fails as it would across GPUs. The numbers are
    checked on one device by every other test."""
    import sys

    import transformer_lens.utilities.multi_gpu as multi_gpu

    from tl_reward import errors, reward_lens
    from tl_reward._device import block_device, checked_n_devices

    def split(index, cfg, device=None):
        return torch.device("meta" if index >= cfg.n_layers // 2 else "cpu")

    monkeypatch.setattr(multi_gpu, "get_device_for_block_index", split)
    monkeypatch.setattr(sys.modules["transformer_lens.HookedTransformer"],
                        "get_device_for_block_index", split)
    hf = make_hf_model("llama", gqa=True)
    model = load_reward_model(hf)
    n = model.cfg.n_layers
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("blocks."):
            expected = block_device(model.cfg, int(name.split(".")[1]))
        else:
            expected = torch.device("cpu" if name.startswith("embed") else "meta")
        assert tensor.device == expected, name
    assert block_device(model.cfg, n - 1).type == "meta"
    tokens = torch.randint(3, 90, (3, 9), generator=torch.Generator().manual_seed(0))
    for return_type in ("reward", "per_position"):  # the scoring-token path and the full one
        reward = model(tokens, return_type=return_type)
        assert reward.device.type == "meta" and reward.shape[0] == 3
    with pytest.raises(errors.DeviceError, match="split over 2"):
        model.cfg.n_devices = 2
        reward_lens(model, tokens)
    with pytest.raises(errors.DeviceError, match="pass device='cuda'"):
        checked_n_devices("cpu", 2)
    with pytest.raises(errors.DeviceError, match="positive integer"):
        checked_n_devices("cpu", 0)
    with pytest.raises(errors.DeviceError, match="pass device='cuda'"):
        load_reward_model(hf, n_devices=2)
