"""Patching a process reward with a step's score or a solution's aggregate as the metric
(tl_reward.causal.step_analysis), against whole solutions patched with plain TransformerLens hooks."""

import pytest
import torch
from helpers import make_hf_model
from test_heads import grm

from tl_reward import errors, load_reward_model
from tl_reward.causal.step_analysis import _solutions, step_patch
from tl_reward.process import aggregate_steps

METRICS = ["min", "last", "product", "mean", 1]


@pytest.fixture(scope="module")
def prm():
    from tl_reward.organisms import process as P

    model, _, sep = P.load()
    texts = [t for t in P.sample_solutions(40, 11) if P.first_error_step(t, P.ERROR, P.STEP_SEPARATOR) is not None][:3]
    clean = [t.replace(P.ERROR, "w001") for t in texts]
    return model, sep, [model.to_tokens(t)[0] for t in clean], [model.to_tokens(t)[0] for t in texts]


def _scores(model, tokens, sep, score, cell=None, source=None):
    """Step scores of one whole solution (``[1, pos]``), optionally with ``cell`` =
    ``(hook name, position or None, head or None)`` patched from ``source``'s run (or zeroed)."""
    hooks = []
    if cell is not None:
        name, pos, head = cell
        src = None
        if source is not None:
            _, cache = model.run_with_cache(source, names_filter=name)
            src = cache[name]

        def patch(act, hook):
            new = torch.zeros_like(act) if src is None else src
            idx = (slice(None), slice(None) if pos is None else pos)
            if head is not None:
                idx = idx + (head,)
            act[idx] = new[idx]
            return act

        hooks = [(name, patch)]
    with torch.no_grad():
        out = model.run_with_hooks(tokens, return_type="per_position", fwd_hooks=hooks)[0]
    at = out[tokens[0] == sep]
    return at.softmax(-1)[:, 1] if score == "probability" else at


def _metric(scores, metric):
    return aggregate_steps(scores, metric) if isinstance(metric, str) else scores[metric]


@pytest.mark.parametrize("metric", METRICS)
def test_aggregate_effects_equal_whole_solutions_patched_with_hooks(prm, metric):
    model, sep, clean, corrupt = prm
    res = step_patch(model, clean, corrupt, separator=sep, metric=metric, hook="resid_pre",
                     per="layer_pos", progress=False)
    assert res.solutions.effects.shape[-1] == len(clean) and res.score == "probability"
    n_steps = [int((c == sep).sum()) for c in clean]
    width = res.solutions.effects.shape[1]  # positions up to the last separator of any solution
    assert width == max(int((c == sep).nonzero().max()) for c in clean) + 1
    assert res.steps.effects.shape[-1] == sum(n_steps)
    for s, (c, k) in enumerate(zip(clean, corrupt, strict=True)):
        m_clean = _metric(_scores(model, c[None], sep, "probability"), metric)
        m_corrupt = _metric(_scores(model, k[None], sep, "probability"), metric)
        torch.testing.assert_close(res.solutions.clean_reward[s], m_clean, atol=1e-5, rtol=0)
        torch.testing.assert_close(res.solutions.corrupt_reward[s], m_corrupt, atol=1e-5, rtol=0)
        for layer in range(model.cfg.n_layers):
            for pos in range(len(c)):
                patched = _metric(_scores(model, k[None], sep, "probability",
                                          (f"blocks.{layer}.hook_resid_pre", pos, None), c[None]),
                                  metric)
                want = float(patched - m_corrupt)
                if pos >= width:  # after the last separator of every solution: no step reads it
                    assert want == 0.0
                    continue
                got = res.solutions.effects[layer, pos, s]
                assert abs(float(got) - want) < 1e-5, (layer, pos, s)
        # cells past a solution's end do not exist for it
        assert bool(res.solutions.effects[:, len(c):, s].isnan().all())


def test_the_error_position_at_layer_0_restores_the_whole_aggregate(prm):
    """The planted mechanism under the aggregate metric: at layer 0 the error token's position
    carries the whole drop of the weakest step (normalised effect 1, every other position 0)."""
    model, sep, clean, corrupt = prm
    res = step_patch(model, clean, corrupt, separator=sep, metric="min", layers=[0],
                     progress=False)
    assert model.objective_weights is None  # the log-odds objective the engine read is undone
    for s, (c, k) in enumerate(zip(clean, corrupt, strict=True)):
        assert float(res.solutions.clean_reward[s]) > 0.5 > float(res.solutions.corrupt_reward[s])
        where = int((c != k).nonzero())
        norm = res.solutions.normalized[0, : len(c), s]
        assert abs(float(norm[where]) - 1) < 1e-4
        others = torch.cat([norm[:where], norm[where + 1:]])
        assert float(others.abs().max()) < 1e-4


@pytest.mark.parametrize("mode", ["noise", "zero"])
def test_head_grid_and_ablation_modes_on_a_scalar_reward(mode):
    """A linear-head model's scalar reward as the step score; heads patched at every position."""
    model = load_reward_model(make_hf_model("qwen2", gqa=True))
    sep = 7
    gen = torch.Generator().manual_seed(3)
    sols = []
    for n in (9, 12):
        ids = torch.randint(8, model.cfg.d_vocab, (n,), generator=gen)
        ids[[2, 5, n - 1]] = sep
        sols.append(ids)
    corrupt = [s.clone() for s in sols]
    for c in corrupt:
        c[1] = 9 if int(c[1]) != 9 else 10
    res = step_patch(model, sols, corrupt, separator=sep, metric="product", score="reward",
                     hook="z", per="head", mode=mode, progress=False)
    assert res.score == "reward"
    for s, (c, k) in enumerate(zip(sols, corrupt, strict=True)):
        base = _metric(_scores(model, c[None], sep, "reward"), "product")
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                cell = (f"blocks.{layer}.attn.hook_z", None, head)
                got = _metric(_scores(model, c[None], sep, "reward", cell,
                                      k[None] if mode == "noise" else None), "product")
                want = float(got - base)
                assert abs(float(res.solutions.effects[layer, head, s]) - want) < 1e-4 * max(1, abs(want))


def test_nonlinear_head_and_different_layouts_without_a_position_axis():
    """An MLP head (GRM) as the step score; clean and corrupt solutions of different lengths pair
    up step by step when the grid has no position axis, and are refused with one."""
    model = load_reward_model(grm("llama"))
    sep = 5
    clean = [torch.tensor([11, 12, sep, 13, 14, 15, sep])]
    corrupt = [torch.tensor([11, 16, 17, sep, 13, 14, sep])]
    res = step_patch(model, clean, corrupt, separator=sep, metric="mean", hook="mlp_out",
                     per="layer", progress=False)
    assert res.solutions.effects.shape == (model.cfg.n_layers, 1)
    assert torch.equal(res.separator, torch.tensor([2, 6]))
    # a step's effect: the patched step minus the corrupt step; the mean of them is the metric's
    torch.testing.assert_close(res.steps.effects.mean(-1), res.solutions.effects[:, 0])
    with pytest.raises(errors.InvalidInputError, match="separators at the same positions"):
        step_patch(model, clean, corrupt, separator=sep, progress=False)


def test_bad_arguments_are_refused_with_the_fix():
    model = load_reward_model(grm("llama"))
    sol = torch.tensor([11, 12, 5, 13, 5])
    with pytest.raises(errors.InvalidInputError, match="aggregate"):
        step_patch(model, sol, sol, separator=5, metric="max", progress=False)
    with pytest.raises(errors.InvalidInputError, match="does not exist in solution 0"):
        step_patch(model, sol, sol, separator=5, metric=4, per="layer", progress=False)
    with pytest.raises(errors.InvalidInputError, match="different numbers of steps"):
        step_patch(model, sol, torch.tensor([11, 12, 5, 13, 14]), separator=5, per="layer",
                   progress=False)
    with pytest.raises(errors.InvalidInputError, match="list of 1-D token id tensors"):
        _solutions(sol[None], "clean")  # a padded batch (the tests' type checker refuses it first)
    with pytest.raises(errors.InvalidInputError, match="no step separator"):
        step_patch(model, sol, sol, separator=6, progress=False)
    with pytest.raises(errors.ObjectiveError, match="two outputs"):
        step_patch(model, sol, sol, separator=5, score="probability", progress=False)


def _whole_solution_atp(model, clean, corrupt, sep, metric, hook="hook_resid_pre"):
    """AtP by hand on the whole corrupt solution: the metric's gradient with respect to each
    layer's activation, times (clean - corrupt) activation, summed over d_model: ``[layer, pos]``."""
    names = [f"blocks.{l}.{hook}" for l in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(clean[None], names_filter=lambda n: n in names)
    leaves, acts = {}, {}

    def leaf(act, hook):  # a zero added to the activation: its gradient is the activation's
        leaves[hook.name] = torch.zeros_like(act, requires_grad=True)
        acts[hook.name] = act.detach()
        return act + leaves[hook.name]

    with torch.enable_grad():
        out = model.run_with_hooks(corrupt[None], return_type="per_position",
                                   fwd_hooks=[(n, leaf) for n in names])[0]
        scores = out[corrupt == sep].softmax(-1)[:, 1]
        _metric(scores, metric).backward()
    return torch.stack([((cache[n][0] - acts[n][0]) * leaves[n].grad[0]).sum(-1)
                        for n in names])


@pytest.mark.parametrize("metric", METRICS)
def test_step_atp_is_the_metrics_gradient_on_whole_solutions(prm, metric):
    from tl_reward.causal.step_analysis import step_attribution_patch

    model, sep, clean, corrupt = prm
    res = step_attribution_patch(model, clean, corrupt, separator=sep, metric=metric,
                                 hooks=("resid_pre", "z"), progress=False)
    est = res.estimates["resid_pre"]  # [layer, pos, solution]
    for s, (c, k) in enumerate(zip(clean, corrupt, strict=True)):
        want = _whole_solution_atp(model, c, k, sep, metric)
        n = min(want.shape[1], est.shape[1])
        torch.testing.assert_close(est[:, :n, s], want[:, :n], atol=1e-6, rtol=1e-4)
        assert float(want[:, n:].abs().sum()) == 0.0  # after the last separator
        torch.testing.assert_close(
            res.clean_reward[s], _metric(_scores(model, c[None], sep, "probability"), metric))
    # the grid of step_patch's shape, normalised by the metric's gap
    grid = res.as_patch_result("resid_pre", "layer_pos")
    exact = step_patch(model, clean, corrupt, separator=sep, metric=metric, progress=False)
    assert grid.effects.shape == exact.solutions.effects.shape
    assert grid.axis_labels == exact.solutions.axis_labels
