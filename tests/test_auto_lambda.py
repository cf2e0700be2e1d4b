"""Auto-Lambda: a Trainer run equal to the paper's algorithm written out on a linear model (the
look-ahead step with SGD momentum and weight decay, the exact hypergradient, which the authors'
finite difference approximates, Adam on the weights), the validation-data sources and the
refusals."""

from __future__ import annotations

import types

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _helpers import LinearNet, TinyNet, loader, trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw import AutoLambda
from lightning_aw.functional import auto_lambda_grad

TASKS3 = ("a", "b", "c")


def _losses(W, V, X, Y):
    return np.array([np.mean((X @ W.T @ V[i] - Y[:, i]) ** 2) for i in range(3)])


def _grads(W, V, X, Y):
    """Per task, by hand: the gradient on (W, V) of L_i = mean (v_i^T W x - y_i)^2."""
    H = X @ W.T
    out = []
    for i in range(3):
        r = H @ V[i] - Y[:, i]
        gV = np.zeros_like(V)
        gV[i] = 2 / len(X) * H.T @ r
        out.append((2 / len(X) * np.outer(V[i], r @ X), gV))
    return out


def _hand_run(X, Y, Xv, Yv, W, V, *, lr, momentum, decay, meta_lr, init, primary, batch):
    """The algorithm, written out: per step, the virtual SGD step (momentum buffer, weight
    decay) on sum_i lam_i L_i, the hypergradient -lr <g_i, grad L_val(theta')>, one Adam step
    on lam, then the real SGD step on sum_i lam_i L_i with the new lam."""
    lam = np.full(3, init)
    m = v = np.zeros(3)
    buf_W = buf_V = None
    history, fd_checks = [], []
    for k, start in enumerate(range(0, len(X), batch)):
        xb, yb = X[start : start + batch], Y[start : start + batch]
        xv, yv = Xv[k * batch : (k + 1) * batch], Yv[k * batch : (k + 1) * batch]
        g = _grads(W, V, xb, yb)
        gW = sum(lam[i] * g[i][0] for i in range(3)) + decay * W
        gV = sum(lam[i] * g[i][1] for i in range(3)) + decay * V
        mW = 0 if buf_W is None else momentum * buf_W
        mV = 0 if buf_V is None else momentum * buf_V
        W_, V_ = W - lr * (mW + gW), V - lr * (mV + gV)
        gv = _grads(W_, V_, xv, yv)
        dW = sum(gv[i][0] for i in primary)
        dV = sum(gv[i][1] for i in primary)
        meta = np.array([-lr * (np.sum(g[i][0] * dW) + np.sum(g[i][1] * dV)) for i in range(3)])
        # the authors' approximation: central difference of sum_i lam_i L_i along d, eps 0.01/|d|
        eps = 0.01 / np.sqrt(np.sum(dW**2) + np.sum(dV**2))
        plus = _losses(W + eps * dW, V + eps * dV, xb, yb)
        minus = _losses(W - eps * dW, V - eps * dV, xb, yb)
        fd_checks.append((meta, -lr * (plus - minus) / (2 * eps)))
        # Adam (bias-corrected, betas 0.9/0.999, eps 1e-8)
        m = 0.9 * m + 0.1 * meta
        v = 0.999 * v + 0.001 * meta**2
        lam = lam - meta_lr * (m / (1 - 0.9 ** (k + 1))) / (
            np.sqrt(v / (1 - 0.999 ** (k + 1))) + 1e-8
        )
        history.append(lam.copy())
        # the real step with the new weights: SGD with momentum and weight decay
        g = _grads(W, V, xb, yb)
        gW = sum(lam[i] * g[i][0] for i in range(3)) + decay * W
        gV = sum(lam[i] * g[i][1] for i in range(3)) + decay * V
        buf_W = gW if buf_W is None else momentum * buf_W + gW
        buf_V = gV if buf_V is None else momentum * buf_V + gV
        W, V = W - lr * buf_W, V - lr * buf_V
    return np.array(history), W, V, fd_checks


class _Weights(pl.Callback):
    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(pl_module.weighting.weight_tensor().double().numpy().copy())


def test_trainer_steps_equal_the_hand_written_algorithm(tmp_path):
    gen = np.random.default_rng(1)
    W, V = gen.normal(size=(2, 2)), gen.normal(size=(3, 2))
    X, Y = gen.normal(size=(12, 2)), gen.normal(size=(12, 3)) * [1.0, 3.0, 0.3]
    Xv, Yv = gen.normal(size=(12, 2)), gen.normal(size=(12, 3)) * [1.0, 3.0, 0.3]
    opt = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    primary = [0, 2]
    expected, eW, eV, fd = _hand_run(
        X,
        Y,
        Xv,
        Yv,
        W,
        V,
        lr=0.05,
        momentum=0.9,
        decay=0.01,
        meta_lr=0.02,
        init=0.3,
        primary=primary,
        batch=4,
    )
    val = DataLoader(TensorDataset(torch.as_tensor(Xv), torch.as_tensor(Yv)), batch_size=4)
    method = AutoLambda(lr=0.02, init=0.3, primary_tasks=["a", "c"], val_data=val)
    net, rec = LinearNet(W, V, opt).double(), _Weights()
    data = DataLoader(TensorDataset(torch.as_tensor(X), torch.as_tensor(Y)), batch_size=4)
    trainer(tmp_path, [method, rec], max_epochs=1).fit(net, data)
    # (the weights are float32, the model float64)
    np.testing.assert_allclose(np.array(rec.after), expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(net.trunk.weight.detach().numpy(), eW, rtol=1e-5)
    got_V = np.vstack([net.heads[t].weight.detach().numpy() for t in TASKS3])
    np.testing.assert_allclose(got_V, eV, rtol=1e-5)
    assert not np.allclose(expected[-1], 0.3)  # the weights did move
    # the exact hypergradient is what the authors' finite difference approximates
    for exact, approx in fd:
        np.testing.assert_allclose(approx, exact, rtol=1e-3, atol=1e-9)


def test_auto_lambda_grad_is_minus_lr_times_the_inner_products():
    G = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    d = torch.tensor([0.2, 0.1, -0.4])
    np.testing.assert_allclose(auto_lambda_grad(G, d, lr=0.5), [-0.5 * 0.4, -0.5 * -1.2])
    per_coordinate = torch.tensor([1.0, 0.0, 2.0])  # a learning rate per parameter
    np.testing.assert_allclose(auto_lambda_grad(G, d, lr=per_coordinate), [-0.2, 2.3])
    with pytest.raises(ValueError, match=r"`val_grad` should have shape \[3\]"):
        auto_lambda_grad(G, d[:2])


def test_validation_batches_from_the_val_dataloader_and_its_absence(tmp_path):
    class WithVal(TinyNet):
        def val_dataloader(self):
            return loader(n=40, batch_size=16, seed=3)

    method = AutoLambda(lr=0.01, val_data="val")
    t = trainer(tmp_path, [method], max_epochs=2)
    t.fit(WithVal(), loader(n=64, batch_size=16))
    # 4 steps per epoch from 3 validation batches: cycled, restarted every epoch
    assert method._val_position == 4 and method._val_epoch == 1
    assert not torch.allclose(method.weight_tensor(), torch.full((3,), 0.1))
    t = trainer(tmp_path, [AutoLambda(val_data="val")], max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"Define `val_dataloader\(\)`"):
        t.fit(TinyNet(), loader(n=64, batch_size=16))
    assert t.global_step == 0  # refused before the first step


def test_refusals_and_invalid_arguments():
    with pytest.raises(ValueError, match="`val_data` should be 'train', 'val' or an iterable"):
        AutoLambda(val_data="test")
    with pytest.raises(ValueError, match="`lr` should be a finite number > 0"):
        AutoLambda(lr=0.0)
    method = AutoLambda(primary_tasks=["a", "z"])
    method.tasks = list(TASKS3)
    with pytest.raises(ValueError, match=r"unknown tasks \['z'\]"):
        method.init_state(3)
    fake = types.SimpleNamespace(strategy=type("ModelParallelStrategy", (), {})())
    with pytest.raises(MisconfigurationException, match="not supported under ModelParallel"):
        AutoLambda().on_fit_start(fake, TinyNet())  # type: ignore[arg-type]


def test_fp16_gradscaler_steps_update_the_weights(tmp_path):
    """The look-ahead's gradients are unscaled under the fp16 GradScaler (scaled, they overflowed
    on every update of this run, and the weights never moved)."""
    from lightning.pytorch.plugins import MixedPrecision

    method = AutoLambda(lr=0.01, init=0.5)
    t = trainer(
        tmp_path,
        [method],
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        plugins=[MixedPrecision("16-mixed", "cpu")],
    )
    t.fit(TinyNet(optimizer={"name": "adam", "lr": 0.01}), loader(n=128, batch_size=16))
    steps = float(method._adam.step)  # Adam counts the finite hypergradients only
    assert steps == t.global_step == 8
