"""Each weighting method in a real (tiny) Trainer: the behaviour its paper promises."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import TinyNet, WeightRecorder, loader, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw import DWA, GradNorm, MultiTaskModule, UncertaintyWeighting
from lightning_aw.functional import dwa as dwa_fn


def test_dwa_weights_one_for_two_epochs_then_eq7(tmp_path):
    rec = WeightRecorder()
    dwa = DWA(temperature=2.0)
    trainer(tmp_path, [dwa, rec], max_epochs=4).fit(TinyNet(), loader())
    per_epoch_w: dict[int, list[list[float]]] = {}
    per_epoch_l: dict[int, list[list[float]]] = {}
    for e, w, l in zip(rec.epochs, rec.weights, rec.losses, strict=True):
        per_epoch_w.setdefault(e, []).append(w)
        per_epoch_l.setdefault(e, []).append(l)
    for e in (0, 1):
        assert torch.tensor(per_epoch_w[e]).eq(1.0).all()
    means = {e: torch.tensor(v).mean(0) for e, v in per_epoch_l.items()}
    for e in (2, 3):
        w = torch.tensor(per_epoch_w[e])
        assert (w == w[0]).all()  # constant within the epoch
        torch.testing.assert_close(w[0], dwa_fn(means[e - 1], means[e - 2]), rtol=1e-5, atol=1e-6)
        assert w[0].sum().item() == pytest.approx(3.0, abs=1e-5)


def test_dwa_step_interval_windows(tmp_path):
    rec = WeightRecorder()
    trainer(tmp_path, [DWA(interval="step", frequency=2), rec], max_epochs=1).fit(
        TinyNet(), loader()
    )
    w = torch.tensor(rec.weights)
    assert w[:4].eq(1.0).all()  # two windows of two steps
    assert not w[4].eq(1.0).all()
    l = torch.tensor(rec.losses)
    torch.testing.assert_close(w[4], dwa_fn(l[2:4].mean(0), l[0:2].mean(0)), rtol=1e-5, atol=1e-6)


class NoisyRegression(MultiTaskModule):
    """Kendall & Gal's setup: two regression tasks with known noise std."""

    def __init__(self):
        super().__init__(tasks=["noisy", "clean"], optimizer={"name": "adam", "lr": 0.01})
        self.trunk = nn.Sequential(nn.Linear(1, 32), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(32, 1) for t in self.tasks})

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        return {t: F.mse_loss(self.heads[t](h).squeeze(-1), y[:, i]) for i, t in enumerate(self.tasks)}


def test_uncertainty_recovers_noise(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2048, 1, generator=gen) * 2 - 1
    signal = torch.cat([3 * x, -2 * x], dim=1)
    noise = torch.randn(2048, 2, generator=gen) * torch.tensor([10.0, 1.0])
    data = DataLoader(TensorDataset(x, signal + noise), batch_size=128, shuffle=False)
    uw = UncertaintyWeighting(lr=0.05)
    torch.manual_seed(0)
    trainer(tmp_path, [uw], max_epochs=30).fit(NoisyRegression(), data)
    # regression form: at the optimum sigma^2 = MSE = noise variance
    assert uw.sigmas["noisy"] == pytest.approx(10.0, rel=0.25)
    assert uw.sigmas["clean"] == pytest.approx(1.0, rel=0.25)
    w = uw.weights
    assert w["clean"] > 10 * w["noisy"]


class GradNormToy(MultiTaskModule):
    """GradNorm's toy (Sec. 4): f_i(x) = sigma_i tanh((B + eps_i) x), 4-layer ReLU MLP."""

    def __init__(self, sigmas):
        tasks = [f"t{i}" for i in range(len(sigmas))]
        super().__init__(tasks=tasks, optimizer={"name": "adam", "lr": 1e-3})
        self.trunk = nn.Sequential(
            nn.Linear(250, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
            nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({t: nn.Linear(100, 100) for t in tasks})

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        return {t: F.mse_loss(self.heads[t](h), y[:, i]) for i, t in enumerate(self.tasks)}


def gradnorm_toy_data(sigmas, n=2000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(100, 250, generator=gen) * 10**0.5
    x = torch.randn(n, 250, generator=gen)
    ys = []
    for s in sigmas:
        eps = torch.randn(100, 250, generator=gen) * 3.5**0.5
        ys.append(s * torch.tanh(x @ (B + eps).T / 250**0.5))
    return x, torch.stack(ys, dim=1)


def test_gradnorm_toy_orders_weights_inversely_to_scale(tmp_path):
    sigmas = [1.0, 4.0, 12.0]
    data = DataLoader(TensorDataset(*gradnorm_toy_data(sigmas)), batch_size=100, shuffle=False)
    gn = GradNorm(alpha=0.12)
    torch.manual_seed(0)
    trainer(tmp_path, [gn], max_epochs=6).fit(GradNormToy(sigmas), data)
    w = list(gn.weights.values())
    assert w[0] > w[1] > w[2], w
    assert sum(w) == pytest.approx(3.0, abs=1e-4)


def test_gradnorm_does_not_leak_into_network_gradients(tmp_path):
    """With GradNorm attached, the network's gradients are exactly those of sum_i w_i L_i."""

    class Check(pl.Callback):
        def __init__(self):
            self.checked = 0

        def on_after_backward(self, trainer, pl_module):
            if self.checked >= 3:
                return
            w = self.w_before
            ref = TinyNet()
            ref.load_state_dict(self.state_before, strict=False)
            out = ref.task_losses(self.batch, 0)
            (sum(w[i] * out[t] for i, t in enumerate(ref.tasks))).backward()
            for (name, p), (_, q) in zip(pl_module.named_parameters(), ref.named_parameters(), strict=False):
                torch.testing.assert_close(p.grad, q.grad, msg=name)
            self.checked += 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch
            self.w_before = list(pl_module.task_weights.values())
            self.state_before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    check = Check()
    trainer(tmp_path, [GradNorm(alpha=1.5, lr=0.1), check], max_epochs=1).fit(TinyNet(), loader())
    assert check.checked == 3


def test_gradnorm_first_step_is_the_paper_update(tmp_path):
    """One step by hand: norms on the last shared weight, ratio 1, Adam's first step = lr * sign."""
    net = TinyNet()
    batch = next(iter(loader()))
    out = net.task_losses(batch, 0)
    W = net.trunk[2].weight
    norms = torch.stack([torch.autograd.grad(out[t], W, retain_graph=True)[0].norm() for t in net.tasks])
    target = norms.mean()
    grad = torch.sign(norms - target) * norms
    w = torch.ones(3) - 0.025 * torch.sign(grad)  # Adam's first step moves by lr * sign(grad)
    expected = 3 * w / w.sum()
    gn = GradNorm(alpha=1.5)
    trainer(tmp_path, [gn], max_steps=1).fit(TinyNet(), loader())
    torch.testing.assert_close(torch.tensor(list(gn.weights.values())), expected, rtol=1e-5, atol=1e-6)


def test_uncertainty_callback_matches_functional():
    from lightning_aw.functional import uncertainty_loss, uncertainty_weights

    uw = UncertaintyWeighting(classification=["b"])
    uw.tasks = ["a", "b", "c"]
    uw.init_state(3)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.7, 1.1]))
    losses = torch.tensor([1.5, 0.2, 3.0])
    present = torch.tensor([True, True, False])
    flags = [False, True, False]
    torch.testing.assert_close(uw.combine(losses, present), uncertainty_loss(losses, uw.log_vars, flags, present))
    torch.testing.assert_close(uw.weight_tensor(), uncertainty_weights(uw.log_vars.detach(), flags))
