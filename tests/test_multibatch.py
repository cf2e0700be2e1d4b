"""Multi-batch methods (SDMGrad, MoDo): the batch splitter, the update against a hand-written
step of the papers' algorithms on a linear model, and the refusals."""

from __future__ import annotations

import types
from collections import namedtuple

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _helpers import LinearNet, TinyNet, loader, trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw import MoCo, MoDo, MultiTaskModule, SDMGrad
from lightning_aw.functional import modo, project_simplex, sdmgrad

split = MultiTaskModule.split_batch  # uses no module state: callable on None


# ---------------------------------------------------------------------------------- split_batch
def test_split_batch_splits_tensors_dicts_lists_and_tuples_along_the_first_dimension():
    x = torch.arange(7.0)
    parts = split(None, x, 3)
    assert [p.tolist() for p in parts] == [[0.0, 1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    Pair = namedtuple("Pair", "inputs targets")
    batch = {"x": torch.arange(14.0).view(7, 2), "y": Pair(torch.arange(7), [torch.ones(7, 3)])}
    parts = split(None, batch, 3)
    assert len(parts) == 3
    for part, rows in zip(parts, ([0, 1, 2], [3, 4], [5, 6]), strict=True):
        assert set(part) == {"x", "y"} and isinstance(part["y"], Pair)
        assert part["x"][:, 0].tolist() == [2.0 * r for r in rows]
        assert part["y"].inputs.tolist() == rows
        assert isinstance(part["y"].targets, list) and part["y"].targets[0].shape == (len(rows), 3)
    first, second = split(None, (torch.zeros(4, 1), torch.ones(4)), 2)
    assert isinstance(first, tuple) and first[0].shape == (2, 1) and second[1].tolist() == [1, 1]
    # disjoint and complete: the parts concatenate to the batch
    assert torch.equal(torch.cat(split(None, x, 3)), x)


def test_split_batch_errors_name_the_problem():
    with pytest.raises(TypeError, match=r"holds a str at batch\['name'\].*Override"):
        split(None, {"x": torch.zeros(4), "name": "img.png"}, 2)
    with pytest.raises(ValueError, match=r"different sizes along dimension 0 \(\[3, 4\]\)"):
        split(None, (torch.zeros(4), torch.zeros(3)), 2)
    with pytest.raises(ValueError, match=r"into 3 disjoint parts, but this batch has 2 row"):
        split(None, torch.zeros(2, 5), 3)
    with pytest.raises(ValueError, match="0-d tensor at batch\\[1\\]"):
        split(None, (torch.zeros(4), torch.tensor(1.0)), 2)
    with pytest.raises(ValueError, match="`parts` should be an int >= 1"):
        split(None, torch.zeros(4), 0)


# ---------------------------------------------------------------------------------- functional
def test_project_simplex_is_the_euclidean_projection():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.randn(4, generator=gen, dtype=torch.float64) * 2
        p = project_simplex(v)
        assert p.min() >= 0 and p.sum().item() == pytest.approx(1.0)
        # optimality: no feasible point on a fine random sample is closer
        cands = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((4000,))
        assert (p - v).norm() <= (cands - v).norm(dim=1).min() + 1e-12


def test_modo_and_sdmgrad_twins_match_their_formulas():
    A = torch.tensor([[3.0, -1.0, 0.5], [0.2, 2.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    lam = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    # MoDo, by hand: lam - gamma (A lam + rho lam) stays positive here, so the projection only
    # shifts it onto the sum-1 plane
    step = lam - 0.1 * (A @ lam + 0.05 * lam)
    np.testing.assert_allclose(modo(A, lam, gamma=0.1, rho=0.05), step - (step.sum() - 1) / 3)
    # SDMGrad with one plain step and no normalisation: one projected step on the formula
    g0 = A @ torch.full((3,), 1.0 / 3, dtype=torch.float64)
    one = sdmgrad(A, lam, lam=0.5, lr=0.05, momentum=0.0, niter=1, normalize=False)
    expected = lam - 0.05 * (A @ lam + 0.5 * g0)
    np.testing.assert_allclose(one, expected - (expected.sum() - 1) / 3)
    with pytest.raises(ValueError, match=r"`weights` should have shape \[3\]"):
        modo(A, lam[:2])


# ---------------------------------------------------------------------------------- a real step
TASKS3 = ("a", "b", "c")


def _grads(W, V, X, Y):
    """Per task: dL_i/dW [2, 2] and dL_i/dv_i [2], by hand (L_i = mean (v_i^T W x - y_i)^2)."""
    H = X @ W.T
    out = []
    for i in range(3):
        r = H @ V[i] - Y[:, i]
        out.append((2 / len(X) * np.outer(V[i], r @ X), 2 / len(X) * H.T @ r))
    return out


def _hand_run(method, W, V, X, Y, lr, batch):
    """The paper's algorithm on the linear model, written out; returns the weights after every
    step and the final parameters."""
    W, V = W.copy(), V.copy()
    T = 3
    simplex = np.full(T, 1.0 / T)
    weights = []
    for start in range(0, len(X), batch):
        xb, yb = X[start : start + batch], Y[start : start + batch]
        (p1, p2, p3) = np.array_split(np.arange(len(xb)), 3)
        g1 = np.array([gw.ravel() for gw, _ in _grads(W, V, xb[p1], yb[p1])])
        g2 = np.array([gw.ravel() for gw, _ in _grads(W, V, xb[p2], yb[p2])])
        A = g1 @ g2.T
        if isinstance(method, MoDo):
            step = simplex - method.gamma * (A @ simplex + method.rho * simplex)
            simplex = _project(step)
            coefs = simplex
        else:
            A = A / np.mean(np.sqrt(np.maximum(np.diag(A), 0) + 1e-4)) ** 2
            buf = np.zeros(T)
            for s in range(method.niter):
                grad = A @ simplex + method.lam * A.mean(axis=1) + method.rho * simplex
                buf = grad if s == 0 else method.momentum * buf + grad
                simplex = _project(simplex - method.lr * buf)
            coefs = (T * simplex + method.lam) / (1 + method.lam)
        weights.append(coefs.copy())
        g3 = _grads(W, V, xb[p3], yb[p3])  # the direction: the third part
        W = W - lr * sum(c * gw for c, (gw, _) in zip(coefs, g3, strict=True))
        V = V - lr * np.array([c * gv for c, (_, gv) in zip(coefs, g3, strict=True)])
    return np.array(weights), W, V


def _project(v):
    """Simplex projection: the threshold found by bisection (not the library's sort)."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
    return np.maximum(v - (lo + hi) / 2, 0)


class _Weights(pl.Callback):
    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(pl_module.weighting.weight_tensor().double().numpy().copy())


@pytest.mark.parametrize(
    "method",
    [MoDo(gamma=0.3, rho=0.1), SDMGrad(lam=0.4, lr=0.7, momentum=0.5, niter=3)],
    ids=["modo", "sdmgrad"],
)
def test_trainer_steps_equal_the_hand_written_algorithm(tmp_path, method):
    gen = np.random.default_rng(0)
    W, V = gen.normal(size=(2, 2)), gen.normal(size=(3, 2))
    X, Y = gen.normal(size=(14, 2)), gen.normal(size=(14, 3)) * [1.0, 3.0, 0.3]
    lr, batch = 0.1, 7  # parts of 3, 2 and 2 rows
    expected_w, expected_W, expected_V = _hand_run(method, W, V, X, Y, lr, batch)
    net = LinearNet(W, V, {"lr": lr})
    rec = _Weights()
    data = DataLoader(TensorDataset(torch.as_tensor(X), torch.as_tensor(Y)), batch_size=batch)
    t = trainer(tmp_path, [method, rec], max_epochs=1)
    t.fit(net.double(), data)
    np.testing.assert_allclose(np.array(rec.after), expected_w, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(net.trunk.weight.detach().numpy(), expected_W, rtol=1e-6)
    got_V = np.vstack([net.heads[t].weight.detach().numpy() for t in TASKS3])
    np.testing.assert_allclose(got_V, expected_V, rtol=1e-6)
    assert np.isclose(np.array(rec.after).sum(1), method_total(method)).all()


def method_total(method):
    return 3.0 if method.total == "T" else 1.0


def test_accumulation_updates_the_weights_once_per_optimizer_step(tmp_path):
    """Two micro-batches per optimizer step: lambda moves at the first of each window only."""

    class Count(_Weights):
        def __init__(self):
            super().__init__()
            self.before = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before.append(pl_module.weighting.weight_tensor().double().numpy().copy())

    rec = Count()
    t = trainer(tmp_path, [MoDo(gamma=0.5), rec], max_epochs=1, accumulate_grad_batches=2)
    t.fit(TinyNet(), loader(n=128, batch_size=32))
    before, after = np.array(rec.before), np.array(rec.after)
    assert t.global_step == 2
    for k in range(4):
        moved = not np.array_equal(before[k], after[k])
        assert moved == (k % 2 == 0), f"micro-batch {k}"


def test_absent_tasks_and_small_batches_are_refused(tmp_path):
    net = TinyNet(absent=lambda batch_idx, task: task == "c")
    with pytest.raises(MisconfigurationException, match=r"task\(s\) \['c'\] are absent"):
        trainer(tmp_path, [SDMGrad()], max_epochs=1).fit(net, loader(n=32, batch_size=8))
    with pytest.raises(ValueError, match="this batch has 2 row"):
        trainer(tmp_path, [MoDo()], max_epochs=1).fit(TinyNet(), loader(n=8, batch_size=2))


def test_sharded_strategies_are_refused_before_the_first_step():
    for name in ("FSDPStrategy", "ModelParallelStrategy"):
        fake = types.SimpleNamespace(strategy=type(name, (), {})())
        with pytest.raises(MisconfigurationException, match=f"not supported under {name}"):
            MoDo().on_fit_start(fake, TinyNet())  # type: ignore[arg-type]


def test_invalid_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="`gamma` should be a finite number > 0"):
        MoDo(gamma=0.0)
    with pytest.raises(ValueError, match=r"`momentum` should be a finite number >= 0\.0 and < 1"):
        SDMGrad(momentum=1.0)
    with pytest.raises(ValueError, match="`niter` should be an int >= 1"):
        SDMGrad(niter=0)


@pytest.mark.parametrize("make", [lambda: MoDo(gamma=0.5), SDMGrad], ids=["modo", "sdmgrad"])
def test_fp16_gradscaler_steps_update_the_weights(tmp_path, make):
    """Under the fp16 GradScaler the parts' per-task gradients are taken unscaled: scaled by the
    scale tuned for the step's backward they overflowed on most steps (found: 11 of 12)."""
    from lightning.pytorch.plugins import MixedPrecision

    method = make()
    t = trainer(
        tmp_path,
        [method],
        max_epochs=2,
        accumulate_grad_batches=2,
        plugins=[MixedPrecision("16-mixed", "cpu")],
    )
    t.fit(TinyNet(optimizer={"name": "adam", "lr": 0.01}), loader(n=128, batch_size=16))
    assert float(method._fallbacks) == 0.0
    assert not torch.allclose(method.simplex_weights, torch.full((3,), 1.0 / 3))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MoDo(gamma=0.0), r"`gamma` should be a finite number > 0\.0\. Found 0\.0"),
        (lambda: MoDo(rho=-1.0), r"`rho` should be a finite number >= 0\.0\. Found -1\.0"),
        (
            lambda: SDMGrad(momentum=1.0),
            r"`momentum` should be a finite number >= 0\.0 and < 1\.0\.",
        ),
        (lambda: SDMGrad(lr=float("nan")), r"`lr` should be a finite number > 0\.0\. Found nan"),
        (lambda: SDMGrad(lam=True), r"`lam` should be a finite number >= 0\.0\. Found True"),
        (
            lambda: MoCo(beta=1.5),
            r"`beta` should be a finite number >= 0\.0 and <= 1\.0\. Found 1\.5",
        ),
        (
            lambda: MoCo(gamma=float("inf")),
            r"`gamma` should be a finite number >= 0\.0\. Found inf",
        ),
    ],
)
def test_bad_hyperparameters_name_the_argument_and_its_range(make, match):
    with pytest.raises(ValueError, match=match):
        make()
