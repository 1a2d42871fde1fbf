"""CART pipeline on models: reading units, interventions against activation_patch, streaming,
the planted trigger circuit found and validated, assessment, errors."""

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cart():
    from tl_reward import cart

    return cart


@pytest.fixture(scope="module")
def planted():
    from tl_reward import cart, organisms

    model, _, data = organisms.load("planted")
    texts = [t for p in data for t in (p.chosen_text, p.rejected_text)]
    tail, head = cart.split_texts(texts, lambda t: "urgent" in t.split())
    return model, tail, head


@pytest.fixture(scope="module")
def planted_discovery(planted, cart):
    model, tail, head = planted
    return cart.discover(model, tail, head, top_k=8, progress=False)


MIXED = [  # different lengths, so padding and pooling matter
    "query w001 urgent w002 answer good w003",
    "query w004 answer w005",
    "query w006 w007 w008 w009 answer clear w010 good w011 w012",
    "query urgent answer w013 helpful",
]


def _tokens(model, texts=MIXED):
    return model.pad(model.tokenize(texts))


# --------------------------------------------------------------------------- reading
def test_unit_activations_match_the_cache(planted, cart):
    model = planted[0]
    tokens, mask = _tokens(model)
    units = [cart.neuron(1, 11), cart.head(0, 0), cart.neuron(0, 5), cart.head(1, 2)]
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    pool = model.pooled_index(tokens, mask)
    rows = torch.arange(len(MIXED))
    post1, post0 = cache["blocks.1.mlp.hook_post"], cache["blocks.0.mlp.hook_post"]
    z0, z1 = cache["blocks.0.attn.hook_z"], cache["blocks.1.attn.hook_z"]
    per_pos = torch.stack([post1[..., 11], z0[..., 0, :].norm(dim=-1), post0[..., 5],
                           z1[..., 2, :].norm(dim=-1)], -1)
    pooled = cart.unit_activations(model, tokens, mask, units)
    torch.testing.assert_close(pooled, per_pos[rows, pool])
    w = mask.float() / mask.sum(1, keepdim=True)
    mean = cart.unit_activations(model, tokens, mask, units, position="mean")
    torch.testing.assert_close(mean, torch.einsum("bp,bpk->bk", w, per_pos))
    # circuit aggregates, several read-out positions at once
    circuits = [cart.Circuit(units[:2], "sum"), cart.Circuit(units[2:], "norm", "mean")]
    acts = cart.circuit_activations(model, tokens, mask, circuits)
    torch.testing.assert_close(acts[:, 0], pooled[:, :2].sum(1))
    torch.testing.assert_close(acts[:, 1], mean[:, 2:].norm(dim=1))


def test_reading_is_differentiable(planted, cart):
    model = planted[0]
    tokens, mask = _tokens(model)
    acts = cart.circuit_activations(model, tokens, mask, [cart.Circuit(["L1N11", "L0H0"])])
    acts.var().backward()
    assert model.blocks[0].attn.W_V.grad is not None
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- interventions
def test_neuron_ablation_equals_activation_patch(planted, cart):
    """Zeroing a neuron at every real token equals tl_reward.activation_patch's zero ablation."""
    import tl_reward
    from tl_reward.cart.units import intervention_hooks, reward_runner

    model = planted[0]
    tokens, mask = _tokens(model)
    ref = tl_reward.activation_patch(model, tokens, clean_mask=mask, hook="mlp_post", per="neuron",
                                     mode="zero", layers=[1], progress=False)
    circuit = cart.Circuit([cart.neuron(1, 11)], position="mean")
    pool = model.pooled_index(tokens, mask)
    with torch.no_grad():
        clean = model(tokens, attention_mask=mask)
        ours = reward_runner(model, tokens, mask, 1)(
            intervention_hooks(model, circuit, pool, mask, values=torch.zeros(1))) - clean
    torch.testing.assert_close(ours, ref.effects[0, 11], atol=1e-5, rtol=1e-5)
    assert float(ours.abs().max()) > 1.0  # the trigger neuron matters on the trigger texts


def test_head_ablation_at_the_scoring_token_equals_activation_patch(planted, cart):
    import tl_reward
    from tl_reward.cart.units import intervention_hooks, reward_runner

    model = planted[0]
    tokens, mask = _tokens(model)
    ref = tl_reward.activation_patch(model, tokens, clean_mask=mask, hook="z", per="head_pos",
                                     mode="zero", layers=[0], progress=False)
    at_score = ref.axis_labels[2].index("0")
    circuit = cart.Circuit([cart.head(0, 0)])  # pooled
    pool = model.pooled_index(tokens, mask)
    with torch.no_grad():
        clean = model(tokens, attention_mask=mask)
        ours = reward_runner(model, tokens, mask, 0)(
            intervention_hooks(model, circuit, pool, mask, values=torch.zeros(16))) - clean
    torch.testing.assert_close(ours, ref.effects[0, 0, at_score], atol=1e-5, rtol=1e-5)


def test_shift_equals_a_hand_written_hook_and_starting_late_is_exact(planted, cart):
    from tl_reward.cart.units import intervention_hooks, reward_runner

    model = planted[0]
    tokens, mask = _tokens(model)
    pool = model.pooled_index(tokens, mask)
    rows = torch.arange(len(MIXED))
    circuit = cart.Circuit(["L1N11", "L1H2"])
    shift = torch.randn(len(MIXED), 1 + 16)

    def by_hand_neuron(act, hook):
        act = act.clone()
        act[rows, pool, 11] += shift[:, 0]
        return act

    def by_hand_head(act, hook):
        act = act.clone()
        act[rows, pool, 2, :] += shift[:, 1:]
        return act

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[
            ("blocks.1.mlp.hook_post", by_hand_neuron), ("blocks.1.attn.hook_z", by_hand_head)])
        hooks = intervention_hooks(model, circuit, pool, mask, shift=shift)
        late = reward_runner(model, tokens, mask, 1)(hooks)
        full = reward_runner(model, tokens, mask, 0)(hooks)
    torch.testing.assert_close(late, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)


class TinySAE(torch.nn.Module):
    """Stand-in for a sae-lens SAE: encode(x) and W_dec [d_sae, d_in]."""

    def __init__(self, d_in=64, d_sae=10):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=gen) / 8)
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=gen) / 8)

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)


def test_sae_feature_units(planted, cart):
    from tl_reward.cart.units import intervention_hooks, reward_runner

    model = planted[0]
    hook = "blocks.0.hook_resid_post"
    sae = TinySAE()
    saes = {hook: sae}
    tokens, mask = _tokens(model)
    pool = model.pooled_index(tokens, mask)
    rows = torch.arange(len(MIXED))
    units = cart.all_units(model, ["feature"], saes=saes)
    assert len(units) == 10 and units[3].label == f"F3@{hook}"
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    f = sae.encode(cache[hook])[rows, pool]
    torch.testing.assert_close(cart.unit_activations(model, tokens, mask, units, saes=saes), f)
    # ablating feature 3 to 0.5 moves the activation along its decoder row, keeping the error
    circuit = cart.Circuit([units[3]])

    def by_hand(act, hook):
        act = act.clone()
        act[rows, pool] += (0.5 - sae.encode(act[rows, pool])[:, 3:4]) * sae.W_dec[3]
        return act

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(hook, by_hand)])
        ours = reward_runner(model, tokens, mask, 0)(
            intervention_hooks(model, circuit, pool, mask, values=torch.tensor([0.5]), saes=saes))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- streaming
def test_streaming_statistics_equal_in_memory_ones(planted, cart):
    model, tail, head = planted
    tail, head = tail[:40], head[:50]
    units = cart.all_units(model)
    listed = cart.activation_statistics(model, tail, head, batch_size=16, progress=False)
    streamed = cart.activation_statistics(model, lambda: (t for t in tail),
                                          lambda: iter(head), batch_size=7, progress=False)
    torch.testing.assert_close(listed.delta, streamed.delta)
    torch.testing.assert_close(listed.var_tail, streamed.var_tail)
    with torch.no_grad():
        a_t = cart.unit_activations(model, *model.pad(model.tokenize(tail)), units).double()
        a_h = cart.unit_activations(model, *model.pad(model.tokenize(head)), units).double()
    torch.testing.assert_close(listed.delta, cart.differential_activation(a_t, a_h), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(listed.tau, cart.tau_specialization(a_t, a_h), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(listed.var_head, a_h.var(0), atol=1e-6, rtol=1e-4)


def test_effect_size_is_cohens_d_with_the_pooled_variance(cart):
    """Cohen's d of unequal samples (10 tail, 40 head): Delta over the sample-size weighted
    pooled sd, computed by hand with numpy (the unweighted average of the variances differs)."""
    import numpy as np

    from tl_reward.cart.discovery import UnitStatistics

    rng = np.random.default_rng(0)
    t = rng.normal(1.0, 3.0, size=(10, 2))
    h = rng.normal(0.0, 1.0, size=(40, 2))
    d = lambda x: torch.from_numpy(x)  # noqa: E731
    stats_ = UnitStatistics(
        units=(cart.neuron(0, 0), cart.neuron(0, 1)), position="last", n_tail=10, n_head=40,
        mean_tail=d(t.mean(0)), mean_head=d(h.mean(0)), var_tail=d(t.var(0, ddof=1)),
        var_head=d(h.var(0, ddof=1)), abs_mean_tail=d(np.abs(t).mean(0)),
        abs_mean_head=d(np.abs(h).mean(0)))
    pooled = np.sqrt((9 * t.var(0, ddof=1) + 39 * h.var(0, ddof=1)) / 48)
    np.testing.assert_allclose(stats_.effect_size.numpy(), (t.mean(0) - h.mean(0)) / pooled, rtol=1e-12)
    unweighted = np.sqrt((t.var(0, ddof=1) + h.var(0, ddof=1)) / 2)
    assert not np.allclose(stats_.effect_size.numpy(), (t.mean(0) - h.mean(0)) / unweighted, rtol=1e-2)


def test_group_circuits_on_a_block_matrix(cart):
    units = [cart.neuron(0, i) for i in range(5)]
    coh = torch.full((5, 5), -0.05, dtype=torch.float64)
    coh[:2, :2] = 0.9  # units 0, 1 coherent
    coh[2:4, 2:4] = 0.4  # units 2, 3 coherent; unit 4 alone
    coh.fill_diagonal_(float("nan"))
    circuits = cart.group_circuits(coh, units, threshold=0.1)
    assert [c.labels for c in circuits] == [("L0N0", "L0N1"), ("L0N2", "L0N3"), ("L0N4",)]
    assert [c.labels for c in cart.group_circuits(coh, units, threshold=0.5)] == [
        ("L0N0", "L0N1"), ("L0N2",), ("L0N3",), ("L0N4",)]


# --------------------------------------------------------------------------- the planted organism
def test_discovery_ranks_the_planted_trigger_units_first(planted_discovery):
    from tl_reward import organisms

    truth = {c.label for c in organisms.planted_components() if c.circuit == "trigger"}
    ranked = planted_discovery.statistics.to_dataframe()
    assert set(ranked.unit[:2]) == truth == {"L1N11", "L0H0"}
    assert {u.label for u in planted_discovery.candidates[:2]} == truth


def test_causal_validation_keeps_the_planted_units(planted_discovery):
    d = planted_discovery
    table = d.to_dataframe()
    kept = table[table.kept]
    kept_units = {u for units in kept.units for u in units.split(", ")}
    assert {"L1N11", "L0H0"} <= kept_units
    assert (kept.p_effect_adjusted < 1e-10).all()
    # the trigger head alone: the whole +5 trigger reward, on tail inputs only
    head_row = table[table.circuit == "L0H0"].iloc[0]
    assert head_row.effect_tail == pytest.approx(-5.2, abs=0.3)
    assert abs(head_row.effect_head) < 1e-3 and head_row.p_specific_adjusted < 1e-10
    # noise neurons with a tiny (significant but negligible) effect are not kept
    assert (table[~table.kept].effect_tail.abs() < table.min_effect.iloc[0]).all()
    assert len(table) == len(d.circuits) and d.settings["estimator"] == "gaussian"


def test_assessment_of_the_planted_circuits(planted, planted_discovery, cart):
    model, tail, head = planted
    a = cart.assess(model, planted_discovery, tail, head, eps=0.5, pgd_steps=5, progress=False)
    df = a.to_dataframe()
    assert set(df.circuit) == {c.name for c in planted_discovery.kept_circuits}
    assert (df.coverage == 1.0).all()  # every tail text switches the trigger circuit on
    row = df[df.circuit == "L0H0"].iloc[0]
    assert row.consistency == pytest.approx(1.0, abs=1e-6)  # attention to the trigger: constant
    manual = (1 - df.consistency) + df.sens_pgd + (1 - df.coverage)
    torch.testing.assert_close(torch.tensor(df.vulnerability.values), torch.tensor(manual.values))
    assert (df.sens_pgd > 0).all() and (df.sens_first_order > 0).all()
    assert df.vulnerability.is_monotonic_decreasing
    assert a.divergence > 0 and a.bound(0.1, 100).value > 0.1
    for fig in (a.plot(), planted_discovery.plot_delta(), planted_discovery.plot_coherence()):
        assert fig.data


def test_a_planted_blind_spot_ranks_most_vulnerable(planted, cart):
    """A circuit that no tail input activates (its tau_act above every |a_c|) is a blind spot:
    eq. (9) ranks it first (1 - Cov = 1), not last with a NaN."""
    model, tail, head = planted
    circuits = [cart.Circuit(["L0H0"]), cart.Circuit(["L1N11"])]
    a = cart.assess(model, circuits, tail[:40], head[:40], eps=1e-3, pgd_steps=2,
                    tau_act=[0.0, 1e9], progress=False)
    assert float(a.coverage[1]) == 0.0 and int(a.n_consistency[1]) == 0
    assert torch.isnan(a.consistency[1]) and torch.isfinite(a.vulnerability).all()
    df = a.to_dataframe()
    assert df.circuit.iloc[0] == "L1N11"
    assert float(a.vulnerability[1]) == pytest.approx(2.0 + float(a.sens_pgd[1]))
    assert a.plot().data


def test_first_order_sensitivity_matches_the_gradient_norm(planted, cart):
    model, tail, _ = planted
    circuit = cart.Circuit(["L1N11"])
    small = cart.assess(model, [circuit], tail[:30], tail[30:60] , eps=1e-3, pgd_steps=3,
                        progress=False)
    # for a tiny eps the reward is linear in the perturbation: PGD = first order
    assert float(small.sens_pgd[0]) == pytest.approx(float(small.sens_first_order[0]), rel=0.02)
    double = cart.assess(model, [circuit], tail[:30], tail[30:60], eps=2e-3, pgd_steps=3,
                         progress=False)
    assert float(double.sens_first_order[0]) == pytest.approx(2 * float(small.sens_first_order[0]))


def test_longtail_discovery_runs_with_a_sampled_estimator(cart):
    from tl_reward import organisms

    model, _, data = organisms.load("longtail")
    task = organisms.longtail_task()
    texts = data.chosen_texts[:300] + data.rejected_texts[:300]
    tail, head = cart.split_texts(texts, lambda t: task.scenario_of(t) != "head")
    d = cart.discover(model, tail, head, top_k=6, estimator="binned", max_samples=200,
                      max_validation=100, progress=False)
    table = d.to_dataframe()
    assert table.kept.any() and d.settings["estimator"] == "binned"
    a = cart.assess(model, d, tail, head, groups=task.scenario_of, pgd_steps=3, max_samples=100,
                    progress=False)
    assert a.settings["n_groups"] == 3 and a.vulnerability.isfinite().all()


# --------------------------------------------------------------------------- errors
def test_errors_name_the_problem(planted, cart):
    from tl_reward.errors import HookNameError, InvalidInputError

    model, tail, head = planted
    gen = (t for t in tail)
    with pytest.raises(InvalidInputError, match="zero-argument callable"):
        cart.activation_statistics(model, gen, head, progress=False)
    with pytest.raises(HookNameError, match="Did you mean"):
        cart.unit_activations(model, *_tokens(model),
                              [cart.Unit("neuron", 1, 3, "blocks.1.mlp.hook_pots")])
    with pytest.raises(InvalidInputError, match="index 99 is not in 0..63"):
        cart.discover(model, tail, head, units=[cart.neuron(0, 99)], progress=False)
    with pytest.raises(InvalidInputError, match="more than once"):
        cart.Circuit(["L0H0", "L0H0"])
    with pytest.raises(InvalidInputError, match="cannot read unit label"):
        cart.Circuit(["H0"])
    with pytest.raises(InvalidInputError, match="Did you mean 'mean'"):
        cart.Circuit(["L0H0"], aggregate="maen")
    with pytest.raises(InvalidInputError, match="no SAE is attached"):
        cart.unit_activations(model, *_tokens(model), [cart.feature("blocks.0.hook_resid_post", 1)])
