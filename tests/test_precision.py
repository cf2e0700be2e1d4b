"""What Lightning manages stays correct: precision, gradient accumulation, clipping.

Every registered method under every precision x accumulation with clipping is in
``test_matrix.py``; here are the finer checks: accumulation equals the big batch, GradNorm's
fp16 weights equal its fp32 ones, the weighting's maths runs outside autocast.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _helpers import TinyNet, loader, params, trainer
from lightning.pytorch.plugins import MixedPrecision

from lightning_aw import DWA, EqualWeighting, GradNorm, UncertaintyWeighting


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only cost time (a lot, when other jobs share the CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _precision_kwargs(precision: str) -> dict:
    if precision == "fp16-scaler":
        return {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    return {"precision": precision}


@pytest.mark.parametrize(
    "method", [None, EqualWeighting(), UncertaintyWeighting(), DWA()], ids=repr
)
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
