"""The shipped organisms: longtail's head/tail gap, planted's circuits found by ablation."""

import pytest
import torch


@pytest.fixture(scope="module")
def longtail():
    from tl_reward import organisms

    return organisms.load("longtail")


@pytest.fixture(scope="module")
def planted():
    from tl_reward import organisms

    return organisms.load("planted")


def margins(model, data, fwd_hooks=()):
    """Margins of every pair, with the given TransformerLens hooks active."""
    ids_c = model.tokenize(data.chosen_texts)
    ids_r = model.tokenize(data.rejected_texts)
    tokens, mask = model.pad(ids_c + ids_r)
    with torch.no_grad():
        r = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=list(fwd_hooks))
    return r[: len(ids_c)] - r[len(ids_c):]


def zero_head(layer: int, head: int):
    def hook(z, hook):
        z[:, :, head, :] = 0.0
        return z

    return (f"blocks.{layer}.attn.hook_z", hook)


def zero_neurons(layer: int, neurons):
    neurons = list(neurons)

    def hook(post, hook):
        post[..., neurons] = 0.0
        return post

    return (f"blocks.{layer}.mlp.hook_post", hook)


# ---------------------------------------------------------------------------- longtail
def test_longtail_head_accuracy_and_tail_gap(longtail):
    from tl_reward.model import HookedRewardModel

    model, tokenizer, data = longtail
    assert isinstance(model, HookedRewardModel)
    assert tokenizer is model.tokenizer
    head, tail = data.head(), data.tail()
    assert len(head) >= 500 and len(tail) >= 500
    head_acc = model.score_pairs(head.chosen_texts, head.rejected_texts, progress=False).accuracy
    tail_acc = model.score_pairs(tail.chosen_texts, tail.rejected_texts, progress=False).accuracy
    assert head_acc >= 0.95
    assert head_acc - tail_acc >= 0.15


@pytest.mark.slow
def test_longtail_eval_set_is_gold_labelled_and_held_out(longtail):
    from tl_reward import organisms
    from tl_reward.organisms.train import N_TRAIN, TRAIN_SEED

    _, _, data = longtail
    task = organisms.longtail_task()
    gold = task.gold_rewards(data.chosen_texts) - task.gold_rewards(data.rejected_texts)
    assert bool((gold > 0).all())
    train = task.sample(N_TRAIN, seed=TRAIN_SEED)
    seen = {(p.prompt, p.chosen, p.rejected) for p in train}
    overlap = sum((p.prompt, p.chosen, p.rejected) in seen for p in data)
    assert overlap / len(data) < 0.01


def test_longtail_hooked_matches_hf(longtail):
    from transformers import AutoModelForSequenceClassification

    from tl_reward import organisms

    model, tokenizer, data = longtail
    hf = AutoModelForSequenceClassification.from_pretrained(
        organisms.path("longtail"), local_files_only=True
    ).eval()
    texts = data.chosen_texts[:16]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = hf(**batch).logits[:, 0]
    got = model.score(texts, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_organism_files_are_small_safetensors():
    from tl_reward import organisms

    total = 0
    for name in organisms.available():
        files = list(organisms.path(name).iterdir())
        assert any(f.suffix == ".safetensors" for f in files)
        assert not any(f.suffix in (".bin", ".pt", ".pth") for f in files)
        total += sum(f.stat().st_size for f in files)
        assert organisms.info(name)["name"] == name
    assert total < 5_000_000


def test_unknown_organism_names_the_choices():
    from tl_reward import organisms
    from tl_reward.errors import TLRewardError

    with pytest.raises(TLRewardError, match="did you mean 'longtail'"):
        organisms.load("longtial")


# ---------------------------------------------------------------------------- planted
def test_planted_weights_are_the_documented_construction():
    from safetensors.torch import load_file

    from tl_reward import organisms
    from tl_reward.organisms.planted import build_planted_model

    model, _ = build_planted_model()
    shipped = load_file(organisms.path("planted") / "model.safetensors")
    built = model.state_dict()
    assert set(shipped) <= set(built)
    for key, value in shipped.items():
        torch.testing.assert_close(value, built[key], msg=key)


def test_planted_components_are_documented_data():
    from tl_reward import organisms

    comps = organisms.planted_components()
    assert {c.label for c in comps} == {"L0H0", "L1N11", "L1H2"}
    assert {c.circuit for c in comps} == {"trigger", "quality"}
    for c in comps:
        assert c.hook.startswith(f"blocks.{c.layer}.")


def _signal(model, data, scenario, hooks=()):
    return float(margins(model, data.by_scenario(scenario), hooks).mean())


def test_planted_circuits_explain_the_reward(planted):
    model, _, data = planted
    comps = {c.label: c for c in data.metadata["components"]}
    base_trigger = _signal(model, data, "trigger")
    base_quality = _signal(model, data, "quality")
    assert base_trigger > 2.0 and base_quality > 0.5
    # every pair is ranked right by the intact model
    assert bool((margins(model, data) > 0).all())

    # ablating a planted part of a circuit removes that circuit's signal ...
    for label, scenario, base in (("L0H0", "trigger", base_trigger),
                                  ("L1N11", "trigger", base_trigger),
                                  ("L1H2", "quality", base_quality)):
        c = comps[label]
        hook = zero_head(c.layer, c.index) if c.kind == "head" else zero_neurons(c.layer, [c.index])
        assert abs(_signal(model, data, scenario, [hook])) < 0.1 * base, label
    # ... and leaves the other circuit's signal
    c = comps["L1H2"]
    assert _signal(model, data, "trigger", [zero_head(c.layer, c.index)]) > 0.5 * base_trigger
    c = comps["L0H0"]
    assert _signal(model, data, "quality", [zero_head(c.layer, c.index)]) > 0.8 * base_quality


def test_ablating_unplanted_parts_leaves_the_signal(planted):
    model, _, data = planted
    planted_heads = {(c.layer, c.index) for c in data.metadata["components"] if c.kind == "head"}
    planted_neurons = {(c.layer, c.index) for c in data.metadata["components"]
                       if c.kind == "neuron"}
    base = {s: _signal(model, data, s) for s in ("trigger", "quality")}
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            if (layer, head) in planted_heads:
                continue
            for s in base:
                assert _signal(model, data, s, [zero_head(layer, head)]) > 0.8 * base[s], (
                    layer, head, s)
        # every other neuron of the layer at once
        others = [n for n in range(model.cfg.d_mlp) if (layer, n) not in planted_neurons]
        for s in base:
            assert _signal(model, data, s, [zero_neurons(layer, others)]) > 0.8 * base[s], (
                layer, s)
