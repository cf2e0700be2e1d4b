"""Composable weight transforms on any method: what the network sees, state, resume."""

from __future__ import annotations

import copy
import pickle

import lightning.pytorch as pl
import pytest
import torch
from _helpers import TinyNet, loader, trainer

from lightning_aw import DWA, GradNorm, UncertaintyWeighting, UPGrad
from lightning_aw.transforms import EMA, Clamp, Normalize, Warmup, chain


def test_transforms_by_hand():
    w = torch.tensor([0.1, 1.0, 5.0])
    torch.testing.assert_close(Clamp(0.5, 2.0).apply(w, 0), torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(Normalize(1.0).apply(w, 0), w / 6.1)
    torch.testing.assert_close(Normalize().apply(w, 0), 3 * w / 6.1)
    torch.testing.assert_close(Warmup(10).apply(w, 0), torch.ones(3))
    torch.testing.assert_close(Warmup(10).apply(w, 5), 0.5 + 0.5 * w)
    torch.testing.assert_close(Warmup(10).apply(w, 20), w)
    ema = EMA(0.9)
    ema.reset(3)
    torch.testing.assert_close(ema.apply(w, 0), w)  # the first step starts the average
    ema.apply(torch.ones(3), 0)  # a second micro-batch of the same window: the last one counts
    ema.commit()
    torch.testing.assert_close(ema.apply(w, 1), 0.9 * torch.ones(3) + 0.1 * w)
    t = chain(Clamp(0.5, 2.0), Normalize(1.0))
    torch.testing.assert_close(t.apply(w, 0), torch.tensor([0.5, 1.0, 2.0]) / 3.5)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: EMA(1.0), "decay"),
        (lambda: Clamp(), "min"),
        (lambda: Clamp(2.0, 1.0), "min <= max"),
        (lambda: Warmup(0), "steps"),
        (lambda: Normalize(-1.0), "total"),
        (lambda: chain(Clamp(0, 1), "x"), "WeightTransform"),
    ],
)
def test_bad_transform_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


class GradProbe(pl.Callback):
    """Checks at every step that the trunk's gradient is that of sum_i w_i L_i with the logged
    (transformed) weights."""

    def __init__(self):
        self.checked = 0
        self.weights: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch
        self.ref = copy.deepcopy(pl_module)
        self.ref.eval()  # a plain module: losses reach the trunk directly (no cut)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        w = pl_module.weighting.current_weights()
        self.weights.append(w.clone())
        out = self.ref.task_losses(self.batch, 0)
        (sum(w[i] * out[t] for i, t in enumerate(self.ref.tasks))).backward()
        for (name, p), q in zip(
            pl_module.trunk.named_parameters(), self.ref.trunk.parameters(), strict=True
        ):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        self.checked += 1


@pytest.mark.parametrize(
    "method",
    [
        UncertaintyWeighting(lr=0.1).transformed(Warmup(6)),
        GradNorm(lr=0.1).transformed(EMA(0.5), Clamp(0.5, 1.5)),
        UPGrad().transformed(Normalize(1.0)),
        DWA(interval="step", frequency=2).transformed(Clamp(0.9, 1.1)),
    ],
    ids=repr,
)
def test_network_sees_the_transformed_weights(tmp_path, method):
    probe = GradProbe()
    trainer(tmp_path, [method, probe], max_epochs=1).fit(
        TinyNet(optimizer={"name": "sgd", "lr": 0.05}), loader()
    )
    assert probe.checked == 8
    w = torch.stack(probe.weights)  # the weights applied at each step
    if isinstance(method, UncertaintyWeighting):
        torch.testing.assert_close(w[0], torch.ones(3))  # warm-up starts from equal weights
        assert not torch.allclose(method.weight_tensor(), torch.ones(3))  # the method moved
    if isinstance(method, UPGrad):
        torch.testing.assert_close(w[1:].sum(1), torch.ones(7))
    if isinstance(method, GradNorm):
        assert (w >= 0.5 - 1e-6).all() and (w <= 1.5 + 1e-6).all()


def test_repr_state_key_and_pickle():
    m = DWA().transformed(EMA(0.5), Clamp(0.2, 5.0))
    assert (
        repr(m)
        == "DWA(temperature=2.0, interval='epoch', frequency=1).transformed(chain(EMA(decay=0.5), Clamp(min=0.2, max=5.0)))"
    )
    assert m.state_key != DWA().state_key
    assert repr(pickle.loads(pickle.dumps(m))) == repr(m)
