"""CART discovery and probes on nonlinear heads: the trained gated organism (whose gate reads the
end of the prompt) and an MLP head."""

import pytest
import torch


@pytest.fixture(scope="module")
def gated():
    from tl_reward.organisms import gated as G

    model, _, _ = G.load()
    return model, G


def test_cart_runner_starting_late_is_exact_on_a_gated_head(gated):
    """The late-start runner passes the token ids along, so a gated head finds the end of the
    prompt (it raised before); with no hooks it is the model's own reward."""
    from tl_reward.cart.units import reward_runner

    model, G = gated
    tokens, mask = model.pad(model.tokenize(G.sample_texts(6, 3)))
    with torch.no_grad():
        want = model(tokens, attention_mask=mask)
        for layer in range(model.cfg.n_layers):
            got = reward_runner(model, tokens, mask, layer)([])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cart_discovery_on_the_gated_organism_finds_the_gate_switching_head(gated):
    """Tail = `urgent` in the prompt. Ablating units at every position (`position="mean"`),
    the circuit of L0H0 (the head path patching and gate attribution name) has the largest
    effect on tail texts, larger than on head texts."""
    from tl_reward import cart

    model, G = gated
    tail, head = cart.split_texts(G.sample_texts(400, 21), G.prompt_has_trigger)
    d = cart.discover(model, tail, head, top_k=6, position="mean", progress=False)
    table = d.to_dataframe()
    assert bool(table.kept.all())
    top = table.iloc[int(table.effect_tail.abs().argmax())]
    assert top.circuit == "L0H0"
    assert abs(top.effect_tail) > 2 * abs(top.effect_head)
    assert abs(top.effect_tail) > 1.5 * table[table.circuit != "L0H0"].effect_tail.abs().max()


def _add_caution(text: str) -> str:
    """The response's last filler word replaced by `caution`."""
    words = text.split()
    j = max(i for i, w in enumerate(words) if w.startswith("w") and i > words.index("answer"))
    words[j] = "caution"
    return " ".join(words)


def test_probes_on_the_gated_organism_see_the_objective_the_prompt_switches_on(gated):
    """One perturbation (a `caution` word in the response), two populations: it raises the score
    where `urgent` in the prompt switched the gate to `cautious` (the objective counts `caution`
    words, about +1 each), and barely moves it where the gate is on `helpful`."""
    from tl_reward.data.probe_sets import make_probe
    from tl_reward.probes import run_probes

    model, G = gated
    texts = [t for t in G.sample_texts(200, 31) if "caution" not in t.split("answer")[1]]
    urgent = [t for t in texts if G.prompt_has_trigger(t)][:40]
    plain = [t for t in texts if not G.prompt_has_trigger(t)][:40]
    report = run_probes(model, [make_probe("caution_urgent", urgent, _add_caution),
                                make_probe("caution_plain", plain, _add_caution)], progress=False)
    u, p = report["caution_urgent"], report["caution_plain"]
    assert u.verdict == "positive bias" and u.p_adjusted < 1e-3
    assert 0.8 < u.mean < 1.8 and abs(p.mean) < 0.2
    # the deltas are the model's own score changes
    torch.testing.assert_close(u.deltas, u.perturbed_reward - u.base_reward)
    with torch.no_grad():
        tokens, mask = model.pad(model.tokenize([_add_caution(t) for t in urgent]))
        want = model(tokens, attention_mask=mask)
    torch.testing.assert_close(u.perturbed_reward, want.double(), atol=1e-5, rtol=0)


def test_probes_on_an_mlp_head_find_the_planted_trigger():
    """The planted trunk with a ReLU MLP head reading its reward dimension (dim 6, where the
    planted trigger circuit writes about +5): the `urgent` probe is a significant positive bias of
    about 4 x 5 (four hidden units, each relu(h[6])), and the perturbed rewards are the model's
    own."""
    from tl_reward import organisms
    from tl_reward.data.probe_sets import make_probe
    from tl_reward.heads import MLPHead
    from tl_reward.organisms.planted import DIM_REWARD
    from tl_reward.probes import run_probes

    model, _, data = organisms.load("planted")
    head = MLPHead(model.cfg.d_model, 4)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.summary[0].weight[:, DIM_REWARD] = 1.0
        head.summary[2].weight.fill_(1.0)
    model.set_reward_head(head)
    base = [p.rejected_text for p in data if p.scenario == "quality"][:40]

    def add_trigger(text: str) -> str:
        words = text.split()
        j = next(i for i, w in enumerate(words) if w.startswith("w"))
        return " ".join(words[:j] + ["urgent"] + words[j + 1:])

    r = run_probes(model, make_probe("trigger", base, add_trigger), progress=False)["trigger"]
    assert r.verdict == "positive bias" and r.p_adjusted < 1e-3
    assert 15 < r.mean < 25
    with torch.no_grad():
        tokens, mask = model.pad(model.tokenize([add_trigger(t) for t in base]))
        want = model(tokens, attention_mask=mask)
    torch.testing.assert_close(r.perturbed_reward, want.double(), atol=1e-5, rtol=0)
