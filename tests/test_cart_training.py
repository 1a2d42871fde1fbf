"""CART training terms (eqs. (10)-(16)) and the baselines, on hand-made batches and tiny models."""

import random

import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    """A tiny random hooked reward model over the long-tail task's vocabulary, and the task."""
    import transformers as T

    from tl_reward import load_reward_model
    from tl_reward.data import LongTailTask

    task = LongTailTask(alpha=0.8, n_filler=20)
    tok = task.tokenizer()
    vocab = tok.get_vocab()
    cfg = T.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        head_dim=8, max_position_embeddings=64, num_labels=1,
                        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"],
                        eos_token_id=vocab["<eos>"])
    torch.manual_seed(0)
    return load_reward_model(T.LlamaForSequenceClassification(cfg), tok), task


def fast(**kw):
    from tl_reward.training import TrainConfig

    return TrainConfig(**{"steps": 6, "batch_size": 16, "lr": 1e-2, "warmup_steps": 1,
                          "progress": False, **kw})


def batch_of(model, margins, step=0, idx=None):
    from tl_reward.training import TrainBatch

    n = len(margins)
    idx = torch.arange(n) if idx is None else idx
    return TrainBatch(model=model, step=step, pair_index=idx, chosen=margins,
                      rejected=torch.zeros(n), weights=torch.ones(n),
                      tokens=torch.zeros(2 * n, 3, dtype=torch.long),
                      mask=torch.ones(2 * n, 3, dtype=torch.long))


# ------------------------------------------------------------------------------- eq. (13)
def test_curriculum_weight_follows_eq_13():
    from tl_reward.cart.training import curriculum_weight

    tail = torch.tensor([True, False, True])
    assert curriculum_weight(0, tail, 0.1).tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(curriculum_weight(3, tail, 0.1), torch.tensor([0.3, 0.0, 0.3]))
    assert curriculum_weight(50, tail, 0.1).tolist() == [1.0, 0.0, 1.0]  # min(1, .)
    with pytest.raises(ValueError, match="eta >= 0"):
        curriculum_weight(1, tail, -1.0)


def test_progressive_loss_value_by_hand():
    from tl_reward.cart.training import ProgressiveLoss

    is_tail = torch.tensor([False, True, True, False])
    term = ProgressiveLoss(is_tail, eta=0.25)
    m = torch.tensor([0.5, -1.0, 2.0, 0.0])
    got = term(batch_of(None, m, step=2))  # w = [0, .5, .5, 0]
    want = (0.5 * -torch.nn.functional.logsigmoid(torch.tensor(-1.0))
            + 0.5 * -torch.nn.functional.logsigmoid(torch.tensor(2.0))) / 4
    torch.testing.assert_close(got, want)
    assert float(term(batch_of(None, m, step=0))) == 0.0


# ------------------------------------------------------------------------------- eq. (12)
def test_circuit_variance_equals_variance_of_read_activations(tiny):
    from tl_reward.cart import Circuit, circuit_activations, neuron
    from tl_reward.cart.training import CircuitVarianceLoss

    model, task = tiny
    tail = task.sample(40, seed=3).tail().chosen_texts
    circuits = [Circuit((neuron(1, 3), neuron(1, 5))), Circuit((neuron(0, 1),), aggregate="sum")]
    term = CircuitVarianceLoss(model, circuits, tail, lam=0.5, batch_size=len(tail), seed=0)
    got = term(batch_of(model, torch.zeros(2)))
    tokens, mask = model.pad(model.tokenize(tail))
    a = circuit_activations(model, tokens, mask, circuits)
    torch.testing.assert_close(got, 0.5 * a.var(0).sum(), atol=1e-6, rtol=1e-5)


def test_circuit_variance_gradient_flows_only_upstream_of_the_circuit(tiny):
    from tl_reward.cart import Circuit, neuron
    from tl_reward.cart.training import CircuitVarianceLoss

    model, task = tiny
    tail = task.sample(40, seed=3).tail().chosen_texts
    term = CircuitVarianceLoss(model, [Circuit((neuron(0, 2),))], tail, lam=1.0, batch_size=8)
    model.zero_grad()
    term(batch_of(model, torch.zeros(2))).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["blocks.0.mlp.W_in"].abs().sum() > 0 and grads["embed.W_E"].abs().sum() > 0
    for name in ("blocks.1.mlp.W_out", "blocks.1.attn.W_Q", "unembed.W_U", "blocks.0.mlp.W_out"):
        assert grads[name] is None or float(grads[name].abs().sum()) == 0.0, name
    model.zero_grad()


# ------------------------------------------------------------------------------- eqs. (10)-(11)
def test_transforms_edit_only_the_response():
    from tl_reward.cart.training import SpanDeletion, SpanInsertion, TokenSubstitution

    rng = random.Random(0)
    text = "query urgent w1 answer good w2 w3 brief"
    for g in (TokenSubstitution(("zz",), n=2), SpanInsertion(("zz",), max_len=3), SpanDeletion(3)):
        for _ in range(20):
            out = g(text, rng)
            assert out.split()[:4] == ["query", "urgent", "w1", "answer"], (g, out)
            assert len(out.split()) > 4
    assert "zz" in TokenSubstitution(("zz",), n=4)(text, rng)
    assert len(SpanDeletion(2)(text, rng).split()) < len(text.split())


def test_circuit_guided_augmentation_picks_the_argmax_variant(tiny):
    from tl_reward.cart import Circuit, circuit_activations, neuron
    from tl_reward.cart.training import (
        SpanInsertion,
        TokenSubstitution,
        circuit_guided_augmentation,
    )

    model, task = tiny
    texts = task.sample(80, seed=4).tail().chosen_texts[:5]
    assert len(texts) == 5
    circuits = [Circuit((neuron(1, 7),))]
    g = [TokenSubstitution(task.vocabulary[4:], n=2), SpanInsertion(task.vocabulary[4:])]
    aug = circuit_guided_augmentation(model, circuits, texts, g, task.gold_rewards,
                                      n_variants=6, seed=1)
    rnd = circuit_guided_augmentation(model, circuits, texts, g, task.gold_rewards,
                                      n_variants=6, seed=1, selection="random")
    # the same variants are drawn with the same seed: re-draw them and check the argmax by hand
    rng = random.Random(1)
    variants = [rng.choice(g)(x, rng) for x in texts for _ in range(6)]
    tokens, mask = model.pad(model.tokenize(variants))
    with torch.no_grad():
        score = circuit_activations(model, tokens, mask, circuits).sum(1).reshape(5, 6)
    assert list(aug.texts) == [variants[i * 6 + int(j)] for i, j in enumerate(score.argmax(1))]
    torch.testing.assert_close(aug.circuit_score, score.max(1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aug.targets, task.gold_rewards(list(aug.texts)))
    assert (aug.circuit_score >= rnd.circuit_score - 1e-6).all()
    with pytest.raises(ValueError, match="selection"):
        circuit_guided_augmentation(model, circuits, texts, g, task.gold_rewards, selection="best")


def test_augmentation_loss_is_the_mse_to_targets(tiny):
    from tl_reward.cart.training import AugmentationLoss, AugmentedSet

    model, task = tiny
    texts = tuple(task.sample(6, seed=5).chosen_texts)
    targets = torch.arange(6.0)
    aug = AugmentedSet(texts=texts, sources=texts, targets=targets,
                       circuit_score=torch.zeros(6), selection="random")
    term = AugmentationLoss(model, aug, weight=2.0, batch_size=6)
    got = term(batch_of(model, torch.zeros(2)))
    with torch.no_grad():
        r = model.score(list(texts), progress=False)
    torch.testing.assert_close(got.detach(), 2.0 * ((r - targets) ** 2).mean(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- baselines
def test_hidden_state_loss_reads_the_training_forward(tiny):
    from tl_reward.cart.training import HiddenStateLoss
    from tl_reward.training import train_reward_model

    model, task = tiny
    data = task.sample(64, seed=6)
    seen = []
    term = HiddenStateLoss(0.1)

    def spy(batch):
        h = batch.activations["reward_head.hook_pooled"]
        seen.append((h.shape, h.requires_grad))
        return term(batch)

    spy.hooks = HiddenStateLoss.hooks
    res = train_reward_model(model, data, config=fast(), extra_losses={"hidden": spy})
    assert seen[0] == (torch.Size([32, model.cfg.d_model]), True) and len(seen) == 6
    assert res.terms["hidden"].min() > 0


def test_label_smoothing_and_upweights():
    from tl_reward.cart.training import tail_upweights
    from tl_reward.training import bradley_terry_loss

    m = torch.tensor([2.0, -1.0])
    ls = torch.nn.functional.logsigmoid
    want = (0.9 * -ls(m) + 0.1 * -ls(-m)).mean()
    torch.testing.assert_close(bradley_terry_loss(m, smoothing=0.1), want)
    w = tail_upweights(torch.tensor([True, False, False, False]))
    assert w.tolist() == [3.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="no tail pairs"):
        tail_upweights([False, False])


# ------------------------------------------------------------------------------- eqs. (14)-(15)
def test_ensemble_weights_on_the_simplex_beat_uniform_and_match_a_grid():
    from tl_reward.cart.training import ensemble_rewards, fit_ensemble_weights

    gen = torch.Generator().manual_seed(0)
    y = torch.randn(200, generator=gen)
    preds = torch.stack([y + 0.3 * torch.randn(200, generator=gen),
                         0.5 * y + 0.1 * torch.randn(200, generator=gen),
                         torch.randn(200, generator=gen)])
    alpha = fit_ensemble_weights(preds, y)
    assert float(alpha.min()) >= 0 and float(alpha.sum()) == pytest.approx(1.0, abs=1e-6)

    def mse(a):
        return float(((ensemble_rewards(preds, a) - y) ** 2).mean())

    assert mse(alpha) < mse(torch.full((3,), 1 / 3))
    grid = [torch.tensor([a, b, 1 - a - b]) for a in torch.linspace(0, 1, 41).tolist()
            for b in torch.linspace(0, 1, 41).tolist() if a + b <= 1 + 1e-9]
    best = min(mse(g.clamp_min(0)) for g in grid)
    assert mse(alpha) <= best + 1e-6
    with pytest.raises(ValueError, match="simplex"):
        ensemble_rewards(preds, torch.tensor([0.7, 0.7, -0.4]))


def test_ensemble_weights_under_the_papers_constraint_alone_match_the_closed_form():
    """nonnegative=False: eq. (15) with sum(alpha) = 1 only, against the Lagrange closed form
    alpha = G^-1 l + G^-1 1 (1 - 1' G^-1 l) / (1' G^-1 1); a member anti-correlated with the
    target gets a negative weight, which the simplex fit cannot give."""
    import numpy as np

    from tl_reward.cart.training import ensemble_rewards, fit_ensemble_weights

    gen = torch.Generator().manual_seed(1)
    y = torch.randn(300, generator=gen, dtype=torch.float64)
    noise = torch.randn(300, generator=gen, dtype=torch.float64)
    preds = torch.stack([y + 0.5 * noise, 0.8 * y + 0.2 * torch.randn(300, generator=gen, dtype=torch.float64),
                         noise])  # the third member predicts the first one's error
    alpha = fit_ensemble_weights(preds, y, nonnegative=False)
    p, t = preds.numpy(), y.numpy()
    g, lin, one = p @ p.T / 300, p @ t / 300, np.ones(3)
    gi_l, gi_1 = np.linalg.solve(g, lin), np.linalg.solve(g, one)
    closed = gi_l + gi_1 * (1 - one @ gi_l) / (one @ gi_1)
    np.testing.assert_allclose(alpha.numpy(), closed, rtol=1e-8, atol=1e-10)
    assert float(alpha.sum()) == pytest.approx(1.0) and float(alpha[2]) < 0
    simplex = fit_ensemble_weights(preds, y)
    assert float(simplex.min()) >= 0

    def mse(a, **kw):
        return float(((ensemble_rewards(preds, a, **kw) - y) ** 2).mean())

    assert mse(alpha, nonnegative=False) < mse(simplex) - 1e-3
    with pytest.raises(ValueError, match="nonnegative=False"):
        ensemble_rewards(preds, alpha)


# ------------------------------------------------------------------------------- eq. (16)
def test_cart_objective_switches_terms_and_trains(tiny):
    from tl_reward.cart import Circuit, neuron
    from tl_reward.cart.training import cart_objective
    from tl_reward.training import train_reward_model

    model, task = tiny
    data = task.sample(64, seed=7)
    is_tail = torch.tensor(data.is_tail)
    w, terms = cart_objective(model, is_tail)
    assert terms == {} and w.tolist() == [1.0] * 64  # nothing on: plain ERM
    w, terms = cart_objective(model, is_tail, eta=0.1, circuit_lambda=0.01,
                              circuits=[Circuit((neuron(1, 0),))],
                              tail_texts=data.tail().chosen_texts)
    assert set(terms) == {"prog", "circuit"}
    assert w.tolist() == (~is_tail).float().tolist()  # tail pairs leave L_head for L_prog
    res = train_reward_model(model, data, config=fast(), sample_weights=w, extra_losses=terms)
    assert set(res.terms) == {"bt", "prog", "circuit"}
    torch.testing.assert_close(res.losses, res.terms["bt"] + res.terms["prog"] + res.terms["circuit"])
    with pytest.raises(ValueError, match="tail_texts"):
        cart_objective(model, is_tail, circuit_lambda=0.1, circuits=[Circuit((neuron(1, 0),))])
