"""Concept vectors: the probe's held-out AUROC fits the feature scaler inside each fold."""

import random

import numpy as np
import pytest


@pytest.fixture(scope="module")
def planted():
    from tl_reward import organisms

    model, _, _ = organisms.load("planted")
    return model, organisms.longtail_task()


def test_probe_scaler_is_fitted_inside_each_fold(planted):
    """The cross-validated AUROC of the probe equals a hand-written loop that standardises with
    the training fold's mean and sd only (scaling on all texts first leaks the held-out texts'
    statistics into the fit, and gives other scores). Random labels: no concept to find."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from tl_reward.observational.concepts import _states, concept_vector

    model, task = planted
    texts = [p.rejected_text for p in task.sample(80, seed=21, alpha=1.0)]
    labels = [random.Random(i).random() < 0.5 for i in range(len(texts))]
    pos = [t for t, k in zip(texts, labels, strict=True) if k]
    neg = [t for t, k in zip(texts, labels, strict=True) if not k]
    c = concept_vector(model, pos, neg, layer=1, n_permutations=1)
    x = np.concatenate([_states(model, pos, 1, 32), _states(model, neg, 1, 32)])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))].astype(int)
    scores = np.empty(len(y))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
        mu, sd = x[train].mean(0), x[train].std(0)
        sd = np.where(sd > 0, sd, 1.0)
        fit = LogisticRegression(C=1.0, solver="liblinear", max_iter=1000).fit((x[train] - mu) / sd, y[train])
        scores[test] = fit.decision_function((x[test] - mu) / sd)
    assert c.auroc["probe"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    # the direction: the full-data fit's weights mapped back to residual coordinates
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    w = LogisticRegression(C=1.0, solver="liblinear", max_iter=1000).fit((x - mu) / sd, y).coef_[0] / sd
    np.testing.assert_allclose(c.probe.numpy(), w / np.linalg.norm(w), atol=1e-6)
