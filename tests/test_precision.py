"""What Lightning manages stays correct: precision, gradient accumulation, clipping."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _helpers import TinyNet, WeightRecorder, loader, params, trainer
from lightning.pytorch.plugins import MixedPrecision

from lightning_aw import DWA, EqualWeighting, GradNorm, UncertaintyWeighting

METHODS = [None, EqualWeighting(), UncertaintyWeighting(), DWA(), GradNorm()]


def _precision_kwargs(precision: str) -> dict:
    if precision == "fp16-scaler":
        return {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    return {"precision": precision}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "fp16-scaler"])
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_trains_under_precision_accumulation_and_clipping(tmp_path, method, precision, accumulate):
    net = TinyNet(optimizer={"name": "adam", "lr": 0.01})
    before = params(net)
    rec = WeightRecorder()
    cbs = [rec] if method is None else [copy.deepcopy(method), rec]
    t = trainer(
        tmp_path, cbs, max_epochs=3, accumulate_grad_batches=accumulate,
        gradient_clip_val=0.5, **_precision_kwargs(precision),
    )
    t.fit(net, loader())
    if precision == "fp16-scaler":
        assert t.precision_plugin.scaler is not None
    assert t.global_step == 3 * 8 // accumulate
    after = params(net)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "nothing trained"
    assert all(torch.isfinite(v).all() for v in after.values())
    weights = torch.tensor(rec.weights)
    assert torch.isfinite(weights).all() and (weights > 0).all()
    if method is not None and method.total == "T":
        torch.testing.assert_close(weights.sum(1), torch.full((len(weights),), 3.0))
    # within an accumulation window the weights do not change
    if accumulate == 2:
        torch.testing.assert_close(weights[0::2], weights[1::2])


@pytest.mark.parametrize("method", [None, EqualWeighting(), UncertaintyWeighting(), DWA()], ids=repr)
def test_accumulation_equals_the_big_batch(tmp_path, method):
    """Mean losses over two half batches with accumulate_grad_batches=2 == the full batch."""
    runs = []
    for batch_size, accumulate in ((32, 1), (16, 2)):
        net = TinyNet(optimizer={"name": "sgd", "lr": 0.05})
        cbs = [] if method is None else [copy.deepcopy(method)]
        trainer(tmp_path, cbs, max_epochs=3, accumulate_grad_batches=accumulate).fit(
            net, loader(batch_size=batch_size)
        )
        runs.append(net)
    for k, v in params(runs[0]).items():
        torch.testing.assert_close(params(runs[1])[k], v, rtol=1e-4, atol=1e-6, msg=k)
    a, b = runs[0].task_weights, runs[1].task_weights
    assert all(math.isclose(a[t], b[t], rel_tol=1e-4) for t in a)


def test_gradnorm_fp16_matches_fp32_weights(tmp_path):
    """Per-task gradients are taken of the scaled loss and unscaled: fp16 ~ fp32 weights."""
    weights = {}
    for name, kw in (("fp32", {}), ("fp16", _precision_kwargs("fp16-scaler"))):
        gn = GradNorm(alpha=1.5, lr=0.01)
        trainer(tmp_path, [gn], max_epochs=1, **kw).fit(TinyNet(), loader())
        weights[name] = torch.tensor(list(gn.weights.values()))
    assert not torch.allclose(weights["fp32"], torch.ones(3))
    torch.testing.assert_close(weights["fp16"], weights["fp32"], rtol=0.02, atol=0.02)


class _AutocastProbe(EqualWeighting):
    def __init__(self):
        super().__init__()
        self.autocast_seen: list[bool] = []

    def combine(self, losses, present):
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return super().combine(losses, present)


def test_weighting_maths_runs_outside_autocast(tmp_path):
    """training_step runs under autocast; the weighting's maths (Gram matrices, exp) must not."""
    probe = _AutocastProbe()
    trainer(tmp_path, [probe], max_epochs=1, precision="bf16-mixed").fit(TinyNet(), loader())
    assert probe.autocast_seen
    assert not any(probe.autocast_seen)
