"""Exact activation patching against TransformerLens's own patching, and its properties."""

import pytest
import torch
import transformer_lens.patching as tlp
from helpers import TL_CASES, make_config, make_hf_model, pad_batch, ragged_sequences, randomize_

from tl_reward import activation_patch, activation_patch_grids, errors, load_reward_model


def _pairs(n=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n, length), generator=g), torch.randint(3, 97, (n, length), generator=g)


def _assert_equals_transformer_lens(model, clean, corrupt, ours, tl_fn, perm):
    """Our effects, pair by pair, against TransformerLens's patching of that pair alone."""
    for i in range(len(clean)):
        _, clean_cache = model.run_with_cache(clean[i : i + 1])
        with torch.no_grad():
            ref = tl_fn(model, corrupt[i : i + 1], clean_cache, lambda out: out[0])
            base = model(corrupt[i : i + 1])[0]
        ref = ref.permute(*perm) if perm else ref
        torch.testing.assert_close(ours.effects[..., i], ref - base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,gqa", [("llama", True), ("gpt2", False), ("qwen3", True), ("gemma2", True),
                                      ("mistral", True), ("gpt_neox", False)])
@pytest.mark.parametrize("hook,per,tl_fn,perm", TL_CASES, ids=[f"{h}-{p}" for h, p, _, _ in TL_CASES])
def test_equals_transformer_lens_patching(arch, gqa, hook, per, tl_fn, perm):
    model = load_reward_model(make_hf_model(arch, gqa))
    clean, corrupt = _pairs()
    ours = activation_patch(model, clean, corrupt, hook=hook, per=per, progress=False)
    _assert_equals_transformer_lens(model, clean, corrupt, ours, tl_fn, perm)


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_kv_reuse_changes_nothing_with_ragged_left_padding(use_kv_cache):
    model = load_reward_model(make_hf_model("mistral", gqa=True))
    clean, c_mask = pad_batch(ragged_sequences(seed=1), "left")
    corrupt, r_mask = pad_batch(ragged_sequences(seed=2), "right")
    kw = dict(clean_mask=c_mask, corrupt_mask=r_mask, progress=False)
    fast = activation_patch(model, clean, corrupt, hook="z", per="head_pos", use_kv_cache=True, **kw)
    slow = activation_patch(model, clean, corrupt, hook="z", per="head_pos", use_kv_cache=use_kv_cache,
                            max_rows=5, **kw)
    torch.testing.assert_close(fast.effects, slow.effects, atol=1e-5, rtol=0, equal_nan=True)
    assert fast.stats.flops < activation_patch(
        model, clean, corrupt, hook="z", per="head_pos", use_kv_cache=False, **kw).stats.flops


def test_cells_at_different_positions_share_a_forward_exactly():
    """A forward starts at the earliest position it patches: one row per forward (each starting
    at its own position) and many rows per forward give the same effects."""
    model = load_reward_model(make_hf_model("qwen2", gqa=True))
    clean, c_mask = pad_batch(ragged_sequences(seed=3), "left")
    corrupt, r_mask = pad_batch(ragged_sequences(seed=4), "right")
    kw = dict(hook="resid_pre", per="layer_pos", clean_mask=c_mask, corrupt_mask=r_mask, progress=False)
    alone = activation_patch(model, clean, corrupt, max_rows=1, **kw)
    shared = activation_patch(model, clean, corrupt, max_rows=64, **kw)
    torch.testing.assert_close(shared.effects, alone.effects, atol=1e-5, rtol=0, equal_nan=True)
    assert alone.stats.n_forwards == alone.stats.n_rows
    assert shared.stats.n_forwards * 4 <= alone.stats.n_forwards


GRIDS = [("attn_out", "layer"), ("mlp_out", "layer"), ("z", "head"), ("resid_pre", "layer_pos"),
         ("mlp_post", "neuron")]


@pytest.mark.parametrize("mode", ["denoise", "noise", "zero", "mean"])
def test_grids_share_the_runs_and_equal_one_grid_at_a_time(mode, monkeypatch):
    model = load_reward_model(make_hf_model("llama", gqa=True))
    clean, corrupt = _pairs(n=3, length=9)
    corrupt[:, :4] = clean[:, :4]  # a shared prompt: the source run starts after it
    kw = dict(mode=mode, progress=False,
              reference=_pairs(n=4, length=7, seed=5)[0] if mode == "mean" else None)
    alone = [activation_patch(model, clean, corrupt, hook=h, per=p, **kw) for h, p in GRIDS]
    calls = []
    run_with_cache = model.run_with_cache
    monkeypatch.setattr(model, "run_with_cache",
                        lambda *a, **k: calls.append(1) or run_with_cache(*a, **k))
    together = activation_patch_grids(model, clean, corrupt, GRIDS, **kw)
    assert len(calls) == 2 + (mode == "mean")  # target, source (and reference) runs, once
    assert [(r.hook, r.per) for r in together] == GRIDS
    for one, many in zip(alone, together, strict=True):
        assert (one.axes, one.axis_labels, one.mode) == (many.axes, many.axis_labels, many.mode)
        torch.testing.assert_close(many.effects, one.effects, atol=1e-6, rtol=0, equal_nan=True)
        torch.testing.assert_close(many.normalized, one.normalized, atol=1e-5, rtol=0, equal_nan=True)
        assert (one.stats.n_forwards, one.stats.n_rows) == (many.stats.n_forwards, many.stats.n_rows)


@pytest.mark.parametrize("grids,match", [([], "non-empty"), ([("attn_out",)], "non-empty"), (["attn_out"], "non-empty"),
                                         ([("attn_out", "head")], "head"),
                                         ([("z", "head"), ("mlp", "layer")], "mlp")])
def test_bad_grids(grids, match):
    model = load_reward_model(make_hf_model("llama"))
    clean, corrupt = _pairs(n=2, length=5)
    with pytest.raises(errors.TLRewardError, match=match):
        activation_patch_grids(model, clean, corrupt, grids, progress=False)


def _four_layers(arch: str):
    import transformers as T

    config = make_config(arch, gqa=arch != "gpt2")
    setattr(config, "n_layer" if arch == "gpt2" else "num_hidden_layers", 4)
    torch.manual_seed(0)
    hf = T.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    return load_reward_model(randomize_(hf, 0).eval())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("pairs", ["unrelated", "shared prompt", "ragged"])
def test_rows_of_several_layers_in_one_forward_equal_hooked_runs(arch, pairs):
    """A patch between blocks lets the rows of every layer share one forward, each joining at the
    block after its patch (4 layers: rows join at three blocks); every cell against the patch
    made by a hook in a full forward of that pair alone."""
    from tl_reward.causal.patching import HOOKS

    model = _four_layers(arch)
    g = torch.Generator().manual_seed(7)
    lengths = [9, 6, 8] if pairs == "ragged" else [9, 9, 9]
    clean = [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]
    corrupt = [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]
    if pairs == "shared prompt":
        corrupt = [c[:4] + r[4:] for c, r in zip(clean, corrupt, strict=True)]
    (c_tok, c_mask), (r_tok, r_mask) = pad_batch(clean, "right"), pad_batch(corrupt, "right")
    grids = [("attn_out", "layer"), ("mlp_out", "layer"), ("resid_post", "layer"), ("z", "head")]
    results = activation_patch_grids(model, c_tok, r_tok, grids, clean_mask=c_mask,
                                     corrupt_mask=r_mask, progress=False)
    if pairs == "unrelated":  # layers 0-2 in one forward, the last layer's block output alone
        assert [r.stats.n_forwards for r in results] == [2, 2, 2, 2]
    model.fast_pooling = False  # the reference: TransformerLens's own full forward
    for i, (c, r) in enumerate(zip(clean, corrupt, strict=True)):
        c, r = torch.tensor([c]), torch.tensor([r])
        _, cache = model.run_with_cache(c)
        with torch.no_grad():
            base = model(r)[0]
            for (hook, per), res in zip(grids, results, strict=True):
                for layer in range(model.cfg.n_layers):
                    name = f"blocks.{layer}.{HOOKS[hook][0]}"
                    for unit in range(model.cfg.n_heads if per == "head" else 1):
                        def put(act, hook, unit=unit, per=per, cache=cache):
                            if per != "head":
                                return cache[hook.name]
                            act = act.clone()
                            act[:, :, unit] = cache[hook.name][:, :, unit]
                            return act
                        ref = model.run_with_hooks(r, fwd_hooks=[(name, put)])[0] - base
                        got = res.effects[layer, unit, i] if per == "head" else res.effects[layer, i]
                        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0,
                                                   msg=f"{hook} L{layer} unit {unit} pair {i}")


def test_forward_partition_covers_every_row_once_and_trades_waste_for_forwards():
    from tl_reward.causal.patching import _chunks

    starts = torch.randint(0, 20, (300,), generator=torch.Generator().manual_seed(0)).sort().values
    counts = torch.unique(starts, return_counts=True)[1]
    n_forwards = []
    for overhead in (0, 8, 10**9):
        chunks = _chunks(starts, 24, 16, overhead)
        assert torch.equal(torch.cat(chunks).sort().values, torch.arange(len(starts)))
        assert all(0 < len(c) <= 16 and bool((c.diff() > 0).all()) for c in chunks)
        if overhead == 0:  # no forward overhead: no row starts early, forwards are filled
            assert all(int(starts[c[0]]) == int(starts[c[-1]]) for c in chunks)
            assert len(chunks) == sum(-(-int(c) // 16) for c in counts)
        n_forwards.append(len(chunks))
    assert n_forwards[0] > n_forwards[1] > n_forwards[2]
    # forwards cost everything: full forwards of one start, the remainders packed in order
    packs, fill = 0, 16
    for rest in (int(c) % 16 for c in counts if int(c) % 16):
        packs, fill = (packs + 1, rest) if fill + rest > 16 else (packs, fill + rest)
    assert n_forwards[2] == sum(int(c) // 16 for c in counts) + packs


def test_align_end_patches_the_scoring_token_for_different_lengths():
    """The peer library left-aligns, so the scoring token of the longer sequence is never patched."""
    model = load_reward_model(make_hf_model("llama"))
    clean, c_mask = pad_batch([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], "right")
    corrupt, r_mask = pad_batch([[20, 21, 22], [23, 24, 25, 26, 27, 28]], "right")
    res = activation_patch(model, clean, corrupt, hook="resid_post", per="layer_pos",
                           clean_mask=c_mask, corrupt_mask=r_mask, progress=False)
    last = model.cfg.n_layers - 1
    with torch.no_grad():
        clean_r = model(clean, attention_mask=c_mask)
        corrupt_r = model(corrupt, attention_mask=r_mask)
    # patching the final residual at the scoring token ("0") gives the clean reward exactly
    torch.testing.assert_close(res.effects[last, -1], clean_r - corrupt_r, atol=1e-5, rtol=0)
    # positions before the shorter sequence's start are NaN, not a silent 0
    assert torch.isnan(res.effects[0, 0, 0]) and torch.isnan(res.effects[0, 0, 1])
    assert res.axis_labels[-1][-1] == "0"


def test_clean_into_clean_has_no_effect_and_full_resid_patch_restores_clean():
    model = load_reward_model(make_hf_model("gpt2"))
    clean, corrupt = _pairs(seed=3)
    same = activation_patch(model, clean, clean, hook="z", per="head_pos", progress=False)
    assert same.effects.abs().max() < 1e-5
    full = activation_patch(model, clean, corrupt, hook="resid_pre", per="layer", progress=False)
    gap = full.clean_reward - full.corrupt_reward
    torch.testing.assert_close(full.effects, gap.expand_as(full.effects), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.normalized, torch.ones_like(full.normalized), atol=1e-4, rtol=0)


def test_noise_zero_and_mean_modes_by_hand():
    model = load_reward_model(make_hf_model("qwen2", gqa=True))
    clean, corrupt = _pairs(seed=4)
    layer = 1

    def run_with(value_fn):
        def hook(act, hook):
            return value_fn(act)
        with torch.no_grad():
            return model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", hook)])

    zero = activation_patch(model, clean, None, hook="mlp_out", per="layer", mode="zero", progress=False)
    torch.testing.assert_close(zero.effects[layer], run_with(torch.zeros_like) - zero.clean_reward,
                               atol=1e-5, rtol=0)
    ref = torch.randint(3, 97, (5, 6))
    _, cache = model.run_with_cache(ref)
    mean = cache[f"blocks.{layer}.hook_mlp_out"].mean((0, 1))
    res = activation_patch(model, clean, None, hook="mlp_out", per="layer", mode="mean",
                           reference=ref, progress=False)
    torch.testing.assert_close(res.effects[layer], run_with(lambda a: mean.expand_as(a)) - res.clean_reward,
                               atol=1e-5, rtol=0)
    _, corrupt_cache = model.run_with_cache(corrupt)
    noise = activation_patch(model, clean, corrupt, hook="mlp_out", per="layer", mode="noise", progress=False)
    expected = run_with(lambda a: corrupt_cache[f"blocks.{layer}.hook_mlp_out"])
    torch.testing.assert_close(noise.effects[layer], expected - noise.clean_reward, atol=1e-5, rtol=0)
    gap = noise.clean_reward - noise.corrupt_reward
    torch.testing.assert_close(noise.normalized[layer], (noise.clean_reward - expected) / gap, atol=1e-4, rtol=0)


def test_neurons_and_explicit_position_map():
    model = load_reward_model(make_hf_model("llama", gqa=True))
    clean, corrupt = _pairs(n=2, length=6, seed=5)
    neurons = activation_patch(model, clean, corrupt, hook="mlp_post", per="neuron", layers=[1],
                               progress=False)
    assert neurons.effects.shape == (1, model.cfg.d_mlp, 2)
    n = 7
    _, cc = model.run_with_cache(clean)

    def hook(act, hook):
        act = act.clone()
        act[:, :, n] = cc["blocks.1.mlp.hook_post"][:, :, n]
        return act

    with torch.no_grad():
        manual = model.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.mlp.hook_post", hook)])
    torch.testing.assert_close(neurons.effects[0, n], manual - neurons.corrupt_reward, atol=1e-5, rtol=0)
    identity = torch.arange(6).expand(2, 6)
    mapped = activation_patch(model, clean, corrupt, hook="resid_pre", positions=identity, progress=False)
    aligned = activation_patch(model, clean, corrupt, hook="resid_pre", progress=False)
    torch.testing.assert_close(mapped.effects, aligned.effects, atol=1e-6, rtol=0)
    assert mapped.axis_labels[-1] == tuple(str(i) for i in range(6))


def test_result_views():
    model = load_reward_model(make_hf_model("gpt2"))
    clean, corrupt = _pairs(n=2, length=5, seed=6)
    res = activation_patch(model, clean, corrupt, hook="z", per="head", progress=False)
    values, labels = res.flat()
    assert labels[:2] == ("L0H0", "L0H1") and values.shape == (len(labels), 2)
    assert len(res.to_dataframe()) == values.numel()
    assert res.plot().data[0].type == "heatmap"
    layer = activation_patch(model, clean, corrupt, hook="attn_out", per="layer", progress=False)
    assert layer.flat()[1] == ("0_attn_out", "1_attn_out")
    assert layer.plot().data[0].type == "bar"
    assert res.stats.n_forwards >= 1 and res.stats.flops > 0


def test_matmul_rate_of_a_device_this_machine_lacks():
    from tl_reward.causal.patching import matmul_rate

    with pytest.raises(errors.DeviceError, match="bogus"):
        matmul_rate("bogus")


def test_stats_compare_the_rate_with_the_matmul_rate_where_it_ran(monkeypatch):
    """Every causal tool's stats carry the model's device and dtype (float64 here, not the
    default), and compare the achieved FLOP rate with the matmul rate measured there, once."""
    import tl_reward.causal.patching as P
    from tl_reward import attribution_patch, path_patch

    model = load_reward_model(make_hf_model("llama"), dtype=torch.float64)
    clean, corrupt = _pairs()
    results = [activation_patch(model, clean, corrupt, hook="z", per="head", progress=False),
               attribution_patch(model, clean, corrupt, hooks=("z",), progress=False),
               path_patch(model, clean, corrupt, senders="heads", receiver="L1.mlp", progress=False)]
    monkeypatch.setattr(P, "_MATMUL_RATES", {})
    measured = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: measured.append(a.dtype) or mm(a, b))
    for res in results:
        assert (res.stats.device, res.stats.dtype) == ("cpu", torch.float64)
        fraction = res.stats.fraction_of_matmul_rate()
        rate = P.matmul_rate("cpu", torch.float64)
        assert fraction == pytest.approx(res.stats.flops / res.stats.seconds / rate)
        assert 0 < fraction < 10
    assert measured == [torch.float64] * 6  # one warm-up and 5 timed matmuls, measured once


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hook="resid_pree"), "resid_pre"),
        (dict(hook="resid_pre", per="head"), "layer_pos"),
        (dict(mode="denoising"), "denoise"),
        (dict(layers=[5]), "layers"),
        (dict(max_rows=0), "max_rows"),
        (dict(positions="align_start"), "align_end"),
        (dict(positions="align_start", mode="zero"), "align_end"),  # not ignored without a source
    ],
)
def test_bad_arguments(kwargs, match):
    model = load_reward_model(make_hf_model("llama"))
    clean, corrupt = _pairs(n=2, length=5)
    with pytest.raises(errors.TLRewardError, match=match):
        activation_patch(model, clean, corrupt, progress=False, **kwargs)


def test_bad_inputs():
    model = load_reward_model(make_hf_model("llama"))
    clean, corrupt = _pairs(n=2, length=5)
    with pytest.raises(errors.InvalidInputError, match="pairs must match"):
        activation_patch(model, clean, corrupt[:1], progress=False)
    with pytest.raises(errors.InvalidInputError, match="needs corrupt"):
        activation_patch(model, clean, None, progress=False)
    with pytest.raises(errors.InvalidInputError, match="reference"):
        activation_patch(model, clean, None, mode="mean", progress=False)
    short, s_mask = pad_batch([[5, 6, 7], [8, 9, 10, 11, 12]], "right")
    with pytest.raises(errors.InvalidInputError, match="identical token layouts"):
        activation_patch(model, clean, short, corrupt_mask=s_mask, hook="pattern", per="head", progress=False)
    multi = load_reward_model(make_hf_model("llama", num_labels=2))
    with pytest.raises(errors.InvalidInputError, match="objective"):
        activation_patch(multi, clean, corrupt, progress=False)


# ---------------------------------------------------------------------------- planted organism
N_PLANTED = 40  # pairs per circuit: enough to see every insertion position, fast on 2 cores


@pytest.fixture(scope="module")
def planted():
    from tl_reward import organisms

    return organisms.load("planted")


def _circuit(circuit: str):
    """``{kind: component}`` of a planted circuit, from the documented ground truth."""
    from tl_reward import organisms

    return {c.kind: c for c in organisms.planted_components() if c.circuit == circuit}


def _pairs_of(data, circuit: str):
    pairs = data.by_scenario(circuit)
    return pairs.chosen_texts[:N_PLANTED], pairs.rejected_texts[:N_PLANTED]


@pytest.mark.parametrize("circuit", ["trigger", "quality"])
def test_planted_head_patching_puts_the_effect_on_the_planted_head(planted, circuit):
    model, _, data = planted
    comp = _circuit(circuit)["head"]
    chosen, rejected = _pairs_of(data, circuit)
    res = activation_patch(model, chosen, rejected, hook="z", per="head", mode="denoise",
                           progress=False)
    assert res.effects.shape == (model.cfg.n_layers, model.cfg.n_heads, N_PLANTED)
    assert bool((res.clean_reward > res.corrupt_reward).all())
    norm = res.normalized  # [layer, head, pair]
    # the planted head restores (nearly) the whole gap, in every pair ...
    planted_head = norm[comp.layer, comp.index]
    assert bool((planted_head > 0.9).all()), planted_head.min()
    flat = norm.reshape(-1, N_PLANTED)
    index = comp.layer * model.cfg.n_heads + comp.index
    assert bool((flat.argmax(0) == index).all())
    # ... and no unplanted head moves the reward by more than 10% of it in any pair
    others = torch.cat([flat[:index], flat[index + 1:]])
    assert float(others.abs().max()) < 0.1


def test_planted_trigger_head_is_found_by_patching_not_by_direct_attribution(planted):
    """L0H0 acts only through L1N11: patching sees all of it, direct attribution none of it."""
    from tl_reward import pair_reward_attribution

    model, _, data = planted
    comp = _circuit("trigger")["head"]
    chosen, rejected = _pairs_of(data, "trigger")
    patched = activation_patch(model, chosen, rejected, hook="z", per="head", progress=False)
    direct = pair_reward_attribution(model, chosen, rejected, level="head", progress=False)
    gap = patched.clean_reward - patched.corrupt_reward
    torch.testing.assert_close(direct.total, gap, atol=1e-4, rtol=0)
    assert float(patched.normalized[comp.layer, comp.index].min()) > 0.9
    assert float((direct.values[direct.labels.index(comp.label)].abs() / gap).max()) < 0.01


@pytest.mark.parametrize("circuit", ["trigger", "quality"])
def test_planted_neuron_patching(planted, circuit):
    """Trigger pairs: the planted neuron restores the gap, no other neuron matters. Quality pairs
    (a circuit without a planted neuron): no neuron matters."""
    model, _, data = planted
    chosen, rejected = _pairs_of(data, circuit)
    res = activation_patch(model, chosen, rejected, hook="mlp_post", per="neuron", progress=False)
    assert res.effects.shape == (model.cfg.n_layers, model.cfg.d_mlp, N_PLANTED)
    flat = res.normalized.reshape(-1, N_PLANTED)
    neuron = _circuit(circuit).get("neuron")
    if neuron is None:
        assert float(flat.abs().max()) < 0.05
        return
    index = neuron.layer * model.cfg.d_mlp + neuron.index
    assert bool((flat[index] > 0.9).all()), flat[index].min()
    assert bool((flat.argmax(0) == index).all())
    others = torch.cat([flat[:index], flat[index + 1:]])
    assert float(others.abs().max()) < 0.05


@pytest.mark.parametrize("circuit", ["trigger", "quality"])
def test_planted_residual_patching_tracks_where_the_information_is(planted, circuit):
    """resid_pre per layer x position: at layer 0 only the edited token matters; at the layer of
    the component that writes the reward it sits where the planted parts read it: the scoring
    token for the trigger (L0H0 moved it there), the quality word for quality (L1H2 reads it)."""
    model, _, data = planted
    chosen, rejected = _pairs_of(data, circuit)
    c_tokens, c_mask = model.pad(model.tokenize(chosen))
    r_tokens, r_mask = model.pad(model.tokenize(rejected))
    assert c_tokens.shape == r_tokens.shape and torch.equal(c_mask, r_mask)  # minimal pairs
    res = activation_patch(model, c_tokens, r_tokens, hook="resid_pre", per="layer_pos",
                           clean_mask=c_mask, corrupt_mask=r_mask, progress=False)
    pooled = model.pooled_index(r_tokens, r_mask)
    edited = ((c_tokens != r_tokens) & r_mask.bool()).int().argmax(1)  # the one changed token
    assert bool(((c_tokens != r_tokens).sum(1) == 1).all())
    labels = res.axis_labels[-1]
    col_edit = torch.tensor([labels.index(str(int(e - p))) for e, p in zip(edited, pooled, strict=True)])
    col_score = labels.index("0")
    pairs = torch.arange(N_PLANTED)
    norm = res.normalized.nan_to_num(0.0)  # [layer, pos, pair]; NaN: before a short pair's start

    def only(layer: int, cols: torch.Tensor) -> None:
        hit = norm[layer, cols, pairs]
        torch.testing.assert_close(hit, torch.ones_like(hit), atol=0.1, rtol=0)
        rest = norm[layer].clone()
        rest[cols, pairs] = 0.0
        assert float(rest.abs().max()) < 0.1, (layer, float(rest.abs().max()))

    only(0, col_edit)
    reader = _circuit(circuit)["neuron" if circuit == "trigger" else "head"].layer
    only(reader, torch.full_like(col_edit, col_score) if circuit == "trigger" else col_edit)


def _shared_prompt_pairs(n=3, prompt=6, response=4, seed=0):
    """Preference pairs: one prompt each, two different responses (and one identical pair)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(3, 97, (n, prompt), generator=g)
    clean = torch.cat([p, torch.randint(3, 97, (n, response), generator=g)], 1)
    corrupt = torch.cat([p, torch.randint(3, 97, (n, response), generator=g)], 1)
    corrupt[-1] = clean[-1]
    return clean, corrupt


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("hook,per,tl_fn,perm", TL_CASES, ids=[f"{h}-{p}" for h, p, _, _ in TL_CASES])
def test_shared_prompts_equal_transformer_lens_and_skip_the_prefix(arch, hook, per, tl_fn, perm):
    """Pairs sharing their prompt: the patch starts where the runs differ; the cells in the
    prompt (and every cell of an identical pair) are exactly 0, and TransformerLens agrees."""
    model = load_reward_model(make_hf_model(arch, gqa=arch == "llama"))
    clean, corrupt = _shared_prompt_pairs()
    ours = activation_patch(model, clean, corrupt, hook=hook, per=per, progress=False)
    full = activation_patch(model, clean, corrupt, hook=hook, per=per, use_kv_cache=False,
                            progress=False)
    _assert_equals_transformer_lens(model, clean, corrupt, ours, tl_fn, perm)
    torch.testing.assert_close(ours.effects, full.effects, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.normalized[..., :-1], full.normalized[..., :-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.clean_reward, full.clean_reward, atol=1e-5, rtol=0)
    assert bool((ours.effects[..., -1] == 0).all())  # the identical pair: never run
    if per.endswith("_pos"):
        assert bool((ours.effects[..., :6, :] == 0).all())  # the shared prompt's cells
    assert ours.stats.flops < 0.7 * full.stats.flops


def test_shared_prefix_respects_padding_and_alignment():
    """Equal padding and equal tokens at equal positions are shared; the same tokens at
    shifted positions (row 1) are not, nor is anything after the padding differs."""
    from tl_reward.causal._runs import cached_run, position_map, shared_prefix

    model = load_reward_model(make_hf_model("gpt2"))
    a, a_m = pad_batch([[0, 0, 5, 6, 7, 8], [5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10]], "right")
    b, b_m = pad_batch([[0, 0, 5, 6, 9, 9], [6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 10]], "right")
    a_m[0, :2] = 0  # row 0: both left-padded by 2, then 5 6 shared
    b_m[0, :2] = 0
    ta, tb = cached_run(model, a, a_m, set()), cached_run(model, b, b_m, set())
    shared = shared_prefix(ta, tb, position_map(ta, tb, "align_end"))
    assert shared.tolist() == [4, 0, 6]
    b_m[0, 1] = 1  # padded differently from position 1 on: only position 0 is shared
    tb = cached_run(model, b, b_m, set())
    assert int(shared_prefix(ta, tb, position_map(ta, tb, "align_end"))[0]) == 1


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])
def test_ragged_batches_equal_each_pair_alone_on_the_full_forward(arch):
    """Pairs of different lengths in one right-padded batch (the last block then runs at scoring
    tokens in different positions) equal TransformerLens's patching of each pair alone, with the
    model's full forward (``fast_pooling=False``) as the reference."""
    model = load_reward_model(make_hf_model(arch, gqa=arch != "gpt_neox"))
    g = torch.Generator().manual_seed(5)
    lengths = [9, 5, 7]
    clean_seqs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]
    corrupt_seqs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]
    clean, c_mask = pad_batch(clean_seqs, "right")
    corrupt, r_mask = pad_batch(corrupt_seqs, "right")
    ours = activation_patch(model, clean, corrupt, hook="z", per="head", clean_mask=c_mask,
                            corrupt_mask=r_mask, progress=False)
    model.fast_pooling = False
    for i, (c, r) in enumerate(zip(clean_seqs, corrupt_seqs, strict=True)):
        c, r = torch.tensor([c]), torch.tensor([r])
        _, clean_cache = model.run_with_cache(c)
        with torch.no_grad():
            ref = tlp.get_act_patch_attn_head_out_all_pos(model, r, clean_cache, lambda out: out[0])
            base = model(r)[0]
        # float32 rounding of rewards of size ~4 (the last block runs at the scoring token alone)
        torch.testing.assert_close(ours.effects[..., i], ref - base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("hook,per", [("mlp_post", "neuron"), ("resid_post", "layer_pos")])
def test_block_outputs_written_directly_equal_hooked_runs(arch, hook, per):
    """Patches of a block's output skip the block: checked against the patch made by a hook in a
    full forward, in every layer (neurons: a few of each layer; Gemma-2's post-MLP norm makes
    its neurons take the ordinary path)."""
    model = load_reward_model(make_hf_model(arch, gqa=arch != "gpt2" and arch != "gpt_neox"))
    clean, corrupt = _shared_prompt_pairs(n=2, prompt=3, response=4, seed=6)
    res = activation_patch(model, clean, corrupt, hook=hook, per=per, progress=False)
    name = "mlp.hook_post" if hook == "mlp_post" else "hook_resid_post"
    _, cc = model.run_with_cache(clean)
    model.fast_pooling = False
    n_pos = clean.shape[1]
    for layer in range(model.cfg.n_layers):
        units = [0, 5, model.cfg.d_mlp - 1] if hook == "mlp_post" else [-1, -3, 3 - n_pos, 1]
        for u in units:
            def patch(act, hook, u=u, layer=layer):
                act = act.clone()
                src = cc[f"blocks.{layer}.{name}"]
                if per == "neuron":
                    act[:, :, u] = src[:, :, u]
                else:
                    act[:, u] = src[:, u]
                return act

            with torch.no_grad():
                manual = model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{layer}.{name}", patch)])
            got = res.effects[layer, u] if per == "neuron" else res.effects[layer, u % n_pos]
            torch.testing.assert_close(got, manual - res.corrupt_reward, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
@pytest.mark.parametrize("mode", ["denoise", "noise"])
def test_shared_prompts_with_left_padding_equal_the_full_computation(arch, mode):
    """Left-padded pairs sharing a prompt: the source run starts after the prompt on the target's
    keys and values (absolute and rotary positions from the mask), equal to recomputing it all."""
    model = load_reward_model(make_hf_model(arch, gqa=arch == "qwen3"))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 3, 6)]
    clean_seqs = [p + torch.randint(3, 97, (4,), generator=g).tolist() for p in prompts]
    corrupt_seqs = [p + torch.randint(3, 97, (4,), generator=g).tolist() for p in prompts]
    clean, c_mask = pad_batch(clean_seqs, "left")
    corrupt, r_mask = pad_batch(corrupt_seqs, "left")
    kw = dict(clean_mask=c_mask, corrupt_mask=r_mask, mode=mode, progress=False)
    for hook, per in [("resid_pre", "layer_pos"), ("z", "head"), ("mlp_out", "layer")]:
        fast = activation_patch(model, clean, corrupt, hook=hook, per=per, **kw)
        full = activation_patch(model, clean, corrupt, hook=hook, per=per, use_kv_cache=False, **kw)
        torch.testing.assert_close(fast.effects, full.effects, atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(fast.clean_reward, full.clean_reward, atol=1e-5, rtol=0)
        torch.testing.assert_close(fast.corrupt_reward, full.corrupt_reward, atol=1e-5, rtol=0)
        assert fast.stats.flops < full.stats.flops
