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
    assert abs(top.effect_tail) > 2 * table[table.circuit != "L0H0"].effect_tail.abs().max()
