"""SAMME and Hedge against scikit-learn's AdaBoostClassifier and hand-computed updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_aw.functional import hedge, samme, samme_alpha

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import make_gaussian_quantiles  # noqa: E402
from sklearn.ensemble import AdaBoostClassifier  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402


class RecordingTree(DecisionTreeClassifier):
    """A decision tree that records the sample weights AdaBoostClassifier fits it on."""

    seen: list[np.ndarray] = []  # noqa: RUF012 (class-level on purpose: sklearn clones it)

    def fit(self, X, y, sample_weight=None, check_input=True):
        RecordingTree.seen.append(np.array(sample_weight, dtype=np.float64, copy=True))
        return super().fit(X, y, sample_weight=sample_weight, check_input=check_input)


@pytest.mark.parametrize(("depth", "lr", "n"), [(1, 1.0, 60), (2, 0.5, 40)])
def test_samme_reproduces_adaboost_over_a_whole_run(depth, lr, n):
    X, y = make_gaussian_quantiles(n_samples=300, n_features=4, n_classes=3, random_state=1)
    RecordingTree.seen = []
    ada = AdaBoostClassifier(
        estimator=RecordingTree(max_depth=depth), n_estimators=n, learning_rate=lr, random_state=0
    ).fit(X, y)
    assert len(ada.estimators_) == n  # no early stop on this data
    w = torch.full((len(y),), 1.0, dtype=torch.float64)  # samme normalises
    for m, est in enumerate(ada.estimators_):
        # sklearn's own sample weights of round m are ours (it fits each learner on them)
        np.testing.assert_allclose(w.numpy() / w.sum().item(), RecordingTree.seen[m], rtol=1e-10)
        # our own weak learner, fitted on our weights, is sklearn's
        tree = DecisionTreeClassifier(max_depth=depth, random_state=est.random_state)
        pred = tree.fit(X, y, sample_weight=w.numpy()).predict(X)
        np.testing.assert_array_equal(pred, est.predict(X))
        w, alpha, error = samme(w, torch.from_numpy(pred != y), num_classes=3, learning_rate=lr)
        assert alpha.dtype == torch.float64 and w.dtype == torch.float64
        assert alpha.item() == pytest.approx(ada.estimator_weights_[m], rel=1e-10, abs=1e-12)
        assert error.item() == pytest.approx(ada.estimator_errors_[m], rel=1e-10, abs=1e-12)
        assert w.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_samme_by_hand_with_zero_weights():
    w = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    inc = torch.tensor([1, 1, 0, 0])
    new, alpha, err = samme(w, inc, num_classes=4, learning_rate=0.5)
    eps = 0.25  # (0 + 1) / 4; the zero-weight sample does not count
    a = 0.5 * (math.log((1 - eps) / eps) + math.log(3))
    expected = np.array([0.0, math.exp(a), 1.0, 2.0])
    np.testing.assert_allclose(new.numpy(), expected / expected.sum(), rtol=1e-14)
    assert err.item() == pytest.approx(eps) and alpha.item() == pytest.approx(a, rel=1e-14)


def test_samme_perfect_learner_as_sklearn():
    # sklearn: a perfect first learner gets weight 1, error 0, and boosting stops after it
    X = np.array([[0.0], [1.0], [2.0], [3.0]])
    y = np.array([0, 0, 1, 1])
    ada = AdaBoostClassifier(estimator=DecisionTreeClassifier(max_depth=1), n_estimators=5)
    ada.fit(X, y)
    assert len(ada.estimators_) == 1
    w0 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    new, alpha, err = samme(w0, torch.zeros(4, dtype=torch.bool), num_classes=2)
    assert alpha.item() == ada.estimator_weights_[0] == 1.0
    assert err.item() == ada.estimator_errors_[0] == 0.0
    torch.testing.assert_close(new, w0 / 10, rtol=0, atol=1e-15)  # unchanged, normalised


def test_samme_no_better_than_chance_as_sklearn():
    # a learner with error >= 1 - 1/K: sklearn discards it (weight 0 in estimator_weights_) and
    # stops; a first such learner raises. samme gives alpha 0 and leaves the weights unchanged.
    X = np.zeros((6, 1))
    y = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="worse than random"):
        AdaBoostClassifier(estimator=DecisionTreeClassifier(max_depth=1)).fit(X, y)
    w0 = torch.ones(6, dtype=torch.float64)  # sklearn's weights: these, normalised
    inc = torch.from_numpy(y != 0)  # the stump predicts class 0 everywhere: error 2/3 = 1 - 1/3
    new, alpha, err = samme(w0, inc, num_classes=3)
    assert alpha.item() == 0.0 and err.item() == pytest.approx(2 / 3)
    torch.testing.assert_close(new, w0 / 6)
    # just below chance: a small positive vote
    inc[3] = False
    _, alpha, _ = samme(w0, inc, num_classes=3)
    assert alpha.item() == pytest.approx(math.log((1 / 2) / (1 / 2)) + math.log(2))


def test_samme_alpha_matches_the_formula_and_edges():
    err = torch.tensor([0.0, 0.1, 0.4, 0.5, 0.9], dtype=torch.float64)
    got = samme_alpha(err, num_classes=2, learning_rate=0.3)
    expected = [1.0, 0.3 * math.log(9), 0.3 * math.log(1.5), 0.0, 0.0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-14)


def test_samme_dtype_and_device_kept():
    w = torch.ones(5, dtype=torch.float32)
    new, alpha, err = samme(w, torch.tensor([1, 0, 0, 0, 0]), num_classes=3)
    assert new.dtype == alpha.dtype == err.dtype == torch.float32
    assert torch.isfinite(new).all() and alpha.item() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sample_weight": torch.ones(3), "incorrect": torch.zeros(4)}, "same shape"),
        ({"sample_weight": torch.tensor([1.0, -1.0])}, "non-negative"),
        ({"sample_weight": torch.tensor([1.0, float("nan")])}, "finite"),
        ({"sample_weight": torch.zeros(2)}, "positive sum"),
        ({"sample_weight": torch.ones(2, 2), "incorrect": torch.zeros(2, 2)}, "1-D"),
        ({"incorrect": torch.tensor([0.5, 0.0])}, "0/1"),
        ({"num_classes": 1}, "num_classes"),
        ({"learning_rate": 0.0}, "learning_rate"),
    ],
)
def test_samme_bad_input(kwargs, match):
    args = {
        "sample_weight": torch.ones(2),
        "incorrect": torch.tensor([True, False]),
        "num_classes": 2,
        "learning_rate": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        samme(**args)


def test_hedge_by_hand_and_beta_form():
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    loss = torch.tensor([0.1, 0.7, 0.4], dtype=torch.float64)
    beta = 0.6
    expected = w.numpy() * beta ** loss.numpy()
    np.testing.assert_allclose(
        hedge(w, loss, eta=-math.log(beta)).numpy(), expected / expected.sum(), rtol=1e-14
    )
    # zero weights stay zero; huge losses do not underflow every weight
    out = hedge(torch.tensor([0.0, 0.5, 0.5]), torch.tensor([0.0, 1e4, 1e4 + 1]), eta=1.0)
    assert out[0] == 0 and torch.isfinite(out).all()
    assert out.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("weights", "losses", "eta", "match"),
    [
        (torch.ones(2), torch.ones(3), 1.0, "shape"),
        (torch.ones(2), torch.tensor([1.0, float("inf")]), 1.0, "finite"),
        (torch.ones(2), torch.ones(2), -1.0, "eta"),
        (torch.tensor([1.0, -1.0]), torch.ones(2), 1.0, "non-negative"),
    ],
)
def test_hedge_bad_input(weights, losses, eta, match):
    with pytest.raises(ValueError, match=match):
        hedge(weights, losses, eta)
