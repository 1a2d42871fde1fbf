"""Cross-model comparison in a shared frame, reward-term conflict and concept vectors, on models
whose answer is known by construction (a rotated copy, a planted two-objective head, the planted
trigger circuit)."""

import random

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def rotate_(model, seed=0):
    """Write a folded (RMSPre) Llama model in a randomly rotated residual basis: the same
    function, different coordinates."""
    d = model.cfg.d_model
    gen = torch.Generator().manual_seed(seed)
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    with torch.no_grad():
        model.embed.W_E.copy_(model.embed.W_E @ rot)
        for block in model.blocks:
            for name in ("W_Q", "W_K", "W_V"):
                w = getattr(block.attn, name)
                w.copy_(torch.einsum("md,hde->hme", rot.T, w))
            block.attn.W_O.copy_(block.attn.W_O @ rot)
            block.attn.b_O.copy_(block.attn.b_O @ rot)
            block.mlp.W_in.copy_(rot.T @ block.mlp.W_in)
            block.mlp.W_gate.copy_(rot.T @ block.mlp.W_gate)
            block.mlp.W_out.copy_(block.mlp.W_out @ rot)
            block.mlp.b_out.copy_(block.mlp.b_out @ rot)
        model.unembed.W_U.copy_(rot.T @ model.unembed.W_U)
    return model


@pytest.fixture(scope="module")
def organism():
    from tl_reward import organisms

    model, _, data = organisms.load("planted", fold_ln=True)
    task = organisms.longtail_task()
    texts = [p.chosen_text for p in task.sample(200, seed=7, alpha=0.5)]
    return model, data, task, texts


@pytest.fixture(scope="module")
def rotated(organism):
    from tl_reward import organisms

    return rotate_(organisms.load("planted", fold_ln=True)[0])


# ---------------------------------------------------------------------------- shared frame
def test_a_rotated_copy_is_the_same_model_in_the_shared_frame(organism, rotated):
    from scipy import stats

    from tl_reward.observational.compare import compare_reward_models

    model, data, _, texts = organism
    torch.testing.assert_close(model.score(texts[:16], progress=False),
                               rotated.score(texts[:16], progress=False), atol=1e-4, rtol=1e-4)
    raw = torch.nn.functional.cosine_similarity(model.reward_direction.detach(),
                                                rotated.reward_direction.detach(), dim=0)
    assert abs(float(raw)) < 0.5  # raw coordinates say "different directions": meaningless
    pairs = data[:60]
    cmp = compare_reward_models(model, rotated, texts, chosen=pairs.chosen_texts,
                                rejected=pairs.rejected_texts, n_resamples=999, progress=False)
    assert cmp.direction_cosine > 0.999 and cmp.direction_p_value < 1e-10
    assert cmp.alignment.test_r2 > 0.999 and cmp.alignment.cka > 0.999
    assert cmp.agreement == 1.0 and cmp.reward_correlation > 0.999
    ci = stats.binomtest(60, 60).proportion_ci(confidence_level=0.95, method="exact")
    assert cmp.agreement_ci == (ci.low, ci.high)
    assert cmp.margin_spearman > 0.999
    # same shape: the components correspond and rank alike; lens curves coincide
    assert cmp.component_jaccard == 1.0 and cmp.top_components[0][:2] == cmp.top_components[1][:2]
    torch.testing.assert_close(cmp.lens[0], cmp.lens[1], atol=1e-4, rtol=1e-4)
    assert len(cmp.plot().data) == 2 and "shared frame" in cmp.summary()


def test_different_widths_compare_through_the_frame_only(organism):
    import transformers as T

    from tl_reward import load_reward_model
    from tl_reward.observational.compare import compare_reward_models
    from tl_reward.training import TrainConfig, train_reward_model

    model, data, task, texts = organism
    tok = task.tokenizer()
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                        head_dim=16, max_position_embeddings=64, num_labels=1, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    small = load_reward_model(T.LlamaForSequenceClassification(cfg), tok)
    quality = data.by_scenario("quality")
    train_reward_model(small, quality[:160], config=TrainConfig(steps=40, batch_size=32, lr=1e-2,
                                                                warmup_steps=2, progress=False))
    test = quality[160:]
    cmp = compare_reward_models(model, small, texts, chosen=test.chosen_texts,
                                rejected=test.rejected_texts, n_resamples=999, progress=False)
    assert (cmp.alignment.d_a, cmp.alignment.d_b) == (64, 32)
    assert cmp.top_components is None and cmp.component_jaccard is None  # shapes differ
    assert cmp.agreement > 0.9  # both prefer the extra quality word
    assert 0 < cmp.alignment.cka < 1 and np.isfinite(cmp.direction_cosine)
    assert len(cmp.lens[0]) != len(cmp.lens[1])  # lens curves on a common depth axis
    assert float(cmp.lens_depth[1][-1]) == 1.0


def test_linear_cka_and_the_random_cosine_law():
    from scipy import stats

    from tl_reward.observational.compare import linear_cka, random_cosine_p_value

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(50, 5, generator=gen, dtype=torch.float64)
    h = torch.eye(50, dtype=torch.float64) - 1 / 50  # HSIC form: tr(KHLH) / sqrt(...)
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    expected = hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))
    assert linear_cka(x, y) == pytest.approx(float(expected), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    assert linear_cka(x, 3 * x @ q + 1) == pytest.approx(1.0, rel=1e-9)
    # in 3 dimensions a random cosine is uniform on [-1, 1]: P(|cos| >= c) = 1 - c
    assert random_cosine_p_value(0.3, 3) == pytest.approx(0.7, rel=1e-9)
    # and in d dimensions it matches the sampled law
    v = torch.nn.functional.normalize(torch.randn(20000, 16, generator=gen, dtype=torch.float64), dim=1)
    cos = (v[:10000] * v[10000:]).sum(1).abs().numpy()
    assert random_cosine_p_value(0.4, 16) == pytest.approx(float((cos >= 0.4).mean()), abs=0.01)
    assert stats.kstest(cos, lambda c: 1 - np.array([random_cosine_p_value(x, 16) for x in np.atleast_1d(c)])).pvalue > 0.01


# ---------------------------------------------------------------------------- reward terms
@pytest.fixture(scope="module")
def two_objectives():
    """The planted organism with a second objective ``dim 6 - 2 dim 0``, where L1H2 also writes
    its quality signal into dim 0: term 0 = trigger + quality, term 1 = trigger - quality. The
    angle is atan(2) = 63.43 deg; the terms disagree on every quality pair, on no trigger pair,
    and only L1H2 writes the difference."""
    import transformers as T

    from tl_reward import load_reward_model
    from tl_reward.organisms.planted import D_HEAD, DIM_REWARD, QUALITY_HEAD, build_planted_model

    hf, tok = build_planted_model()
    cfg = T.LlamaConfig(**{k: v for k, v in hf.config.to_dict().items()
                           if k not in ("id2label", "label2id", "num_labels")})
    cfg.num_labels = 2
    cfg.id2label, cfg.label2id = {0: "helpful", 1: "terse"}, {"helpful": 0, "terse": 1}
    two = T.LlamaForSequenceClassification(cfg)
    two.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.startswith("score")},
                        strict=False)
    layer, head = QUALITY_HEAD
    with torch.no_grad():
        two.model.layers[layer].self_attn.o_proj.weight[0, head * D_HEAD] = 1.5
        two.score.weight.zero_()
        two.score.weight[0, DIM_REWARD] = 1.0
        two.score.weight[1, DIM_REWARD] = 1.0
        two.score.weight[1, 0] = -2.0
    return load_reward_model(two.eval(), tok)


def test_reward_term_conflict_on_a_planted_two_objective_head(two_objectives, organism):
    from scipy import stats

    from tl_reward.observational.compare import reward_term_conflict

    _, data, _, _ = organism
    pairs = data[:80]
    res = reward_term_conflict(two_objectives, pairs.chosen_texts, pairs.rejected_texts,
                               progress=False)
    assert res.terms == ("helpful", "terse")
    assert float(res.angles[0, 1]) == pytest.approx(np.degrees(np.arctan(2.0)), abs=1e-3)
    quality = np.array([s == "quality" for s in pairs.scenarios])
    conflict = ((res.margins[:, 0] > 0) != (res.margins[:, 1] > 0)).numpy()
    assert conflict[quality].all() and not conflict[~quality].any()
    n, c = int(res.n_compared[0, 1]), int(conflict.sum())
    assert float(res.disagreement[0, 1]) == pytest.approx(c / n)
    ci = stats.binomtest(c, n).proportion_ci(confidence_level=0.95, method="exact")
    assert (float(res.ci_low[0, 1]), float(res.ci_high[0, 1])) == pytest.approx((ci.low, ci.high), rel=1e-6)
    # where: only L1H2 writes the difference of the two terms, after layer 1
    top = res.components[("helpful", "terse")]
    assert top[0][0] == "L1H2" and abs(top[1][1]) < 0.05 * abs(top[0][1])
    curve = res.lens_disagreement[("helpful", "terse")]
    assert res.lens_labels[-1] == "final_post" and float(curve[-1]) == 1.0
    row = res.to_dataframe().iloc[0]
    assert row["first_layer_half_disagree"] == "final_post" and "L1H2" in row["top_components"]
    assert two_objectives.objective_weights is None  # the model's objective is restored


def test_reward_term_conflict_across_models(organism, rotated):
    from tl_reward.errors import InvalidInputError
    from tl_reward.observational.compare import reward_term_conflict

    model, data, _, texts = organism
    pairs = data[:40]
    res = reward_term_conflict([model, rotated], pairs.chosen_texts, pairs.rejected_texts,
                               names=["original", "rotated"], alignment_texts=texts,
                               progress=False)
    assert float(res.cosine[0, 1]) > 0.999  # the same direction once the bases are aligned
    assert float(res.disagreement[0, 1]) == 0.0 and res.components == {}
    with pytest.raises(InvalidInputError, match="one term"):
        reward_term_conflict(model, pairs.chosen_texts, pairs.rejected_texts)


# ---------------------------------------------------------------------------- concept vectors
@pytest.fixture(scope="module")
def trigger_concept(organism):
    model, _, task, _ = organism
    texts = [p.rejected_text for p in task.sample(120, seed=11, alpha=1.0)]
    rng = random.Random(0)

    def with_trigger(text):
        words = text.split()
        words[rng.randrange(1, 5)] = "urgent"  # a prompt filler becomes the trigger word
        return " ".join(words)

    return [with_trigger(t) for t in texts[:60]], texts[60:]


def test_concept_vectors_find_the_planted_trigger_feature(organism, trigger_concept):
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from tl_reward.observational.concepts import _diff_means_classifier, _states, concept_vector

    model, _, _, _ = organism
    pos, neg = trigger_concept
    early = concept_vector(model, pos, neg, layer=0, name="trigger", n_permutations=19)
    late = concept_vector(model, pos, neg, layer=1, name="trigger", n_permutations=19)
    # after layer 0 the trigger is carried in dim 5 (L0H0), orthogonal to w_r = dim 6; after
    # layer 1 the neuron L1N11 has written it along w_r
    assert abs(early.cos_reward["mean_diff"]) < 0.05 and late.cos_reward["mean_diff"] > 0.95
    assert float(early.mean_diff.abs().argmax()) == 5
    for c in (early, late):
        assert c.auroc["mean_diff"] == 1.0 and c.auroc["probe"] == 1.0
        assert c.p_value["mean_diff"] == pytest.approx(1 / 20)  # the smallest attainable
    # the AUROC is sklearn's on out-of-fold scores
    x = np.concatenate([_states(model, pos, 1, 32), _states(model, neg, 1, 32)])
    y = np.r_[np.ones(60), np.zeros(60)].astype(int)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = cross_val_predict(_diff_means_classifier(), x, y, cv=folds, method="decision_function")
    assert late.auroc["mean_diff"] == roc_auc_score(y, scores)


def test_a_concept_of_random_labels_is_not_separable(organism):
    from tl_reward.observational.concepts import concept_vector

    model, _, task, _ = organism
    texts = [p.rejected_text for p in task.sample(120, seed=12, alpha=1.0)]
    labels = [random.Random(i).random() < 0.5 for i in range(len(texts))]
    noise = concept_vector(model, [t for t, k in zip(texts, labels, strict=True) if k],
                           [t for t, k in zip(texts, labels, strict=True) if not k],
                           layer=1, name="noise", n_permutations=19)
    for d in ("mean_diff", "probe"):
        assert 0.3 < noise.auroc[d] < 0.7 and noise.p_value[d] > 0.05


def test_steering_along_the_trigger_concept_raises_the_reward(organism, trigger_concept):
    from scipy import stats

    from tl_reward.errors import InvalidInputError
    from tl_reward.observational.concepts import concept_dose_response, concept_vector

    model, _, _, _ = organism
    pos, neg = trigger_concept
    concept = concept_vector(model, pos, neg, layer=0, name="trigger", n_permutations=4)
    dr = concept_dose_response(model, concept, neg[:30], n_resamples=999)
    mean = dr.mean.numpy()
    assert abs(mean[list(dr.doses.numpy()).index(0.0)]) < 1e-4
    assert mean[-1] > 4 and dr.slope > 0 and dr.slope_ci[0] > 0  # the trigger circuit fires
    assert dr.spearman > 0.9
    per_text = [stats.linregress(dr.doses.numpy(), dr.deltas[:, i].numpy()).slope for i in range(30)]
    assert dr.slope == pytest.approx(float(np.mean(per_text)), rel=1e-5)
    pooled = concept_dose_response(model, concept, neg[:30], positions="pooled", n_resamples=99)
    # the trigger neuron reads the scoring token's own residual: steering there alone does
    # nearly all of it
    assert pooled.slope == pytest.approx(dr.slope, rel=0.2)
    with pytest.raises(InvalidInputError, match="at least 3 doses"):
        concept_dose_response(model, concept, neg[:5], doses=(0.0, 1.0))
