"""Crash-and-resume: a resumed run continues exactly as an uninterrupted one."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import TinyNet, loader, params, trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_aw import DWA, EqualWeighting, GradNorm, UncertaintyWeighting

METHODS = [
    None,
    EqualWeighting(),
    UncertaintyWeighting(lr=0.05),
    DWA(),
    DWA(interval="step", frequency=3),
    GradNorm(alpha=1.5),
    GradNorm(alpha=0.5, interval="epoch"),
]


def _fit(tmp_path, method, max_epochs, ckpt_path=None, **kw):
    net = TinyNet(optimizer={"name": "adam", "lr": 0.01})
    cbs = [] if method is None else [copy.deepcopy(method)]
    t = trainer(tmp_path, cbs, max_epochs=max_epochs, **kw)
    t.fit(net, loader(), ckpt_path=ckpt_path)
    return t, net


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_resume_equals_uninterrupted(tmp_path, method):
    _, full = _fit(tmp_path / "full", method, 4)
    first, _ = _fit(tmp_path / "a", method, 2)
    ckpt = tmp_path / "two_epochs.ckpt"
    first.save_checkpoint(ckpt)
    resumed_trainer, resumed = _fit(tmp_path / "b", method, 4, ckpt_path=str(ckpt))
    assert resumed_trainer.global_step == 32
    for k, v in params(full).items():
        torch.testing.assert_close(params(resumed)[k], v, rtol=0, atol=0, msg=k)
    assert resumed.task_weights == full.task_weights
    if method is not None and not isinstance(method, EqualWeighting):
        assert resumed.task_weights != dict.fromkeys("abc", 1.0)  # the weights did move


def test_resume_with_other_tasks_is_a_clear_error(tmp_path):
    first, _ = _fit(tmp_path / "a", DWA(), 1)
    ckpt = tmp_path / "one.ckpt"
    first.save_checkpoint(ckpt)
    net = TinyNet(tasks=("a", "b", "x"))
    with pytest.raises(MisconfigurationException, match=r"saved for tasks \['a', 'b', 'c'\], but this TinyNet has tasks"):
        trainer(tmp_path, [DWA()], max_epochs=2).fit(net, loader(), ckpt_path=str(ckpt))


def test_module_checkpoint_loads_without_the_callback(tmp_path):
    first, net = _fit(tmp_path / "a", UncertaintyWeighting(), 1)
    ckpt = tmp_path / "uw.ckpt"
    first.save_checkpoint(ckpt)
    loaded = TinyNet.load_from_checkpoint(ckpt)
    assert not hasattr(loaded, "loss_weighting")
    for k, v in params(loaded).items():
        torch.testing.assert_close(v, params(net)[k])
    # and training goes on without it (plain sum)
    t = trainer(tmp_path, max_epochs=1)
    t.fit(loaded, loader())
    assert t.global_step == 8


def test_resume_with_another_method_is_a_clear_error(tmp_path):
    first, _ = _fit(tmp_path / "a", None, 1)
    ckpt = tmp_path / "plain.ckpt"
    first.save_checkpoint(ckpt)
    with pytest.raises(MisconfigurationException, match="trained with weighting 'none', but this run uses 'UncertaintyWeighting'"):
        _fit(tmp_path / "b", UncertaintyWeighting(), 2, ckpt_path=str(ckpt))


def test_switch_method_from_weights_only(tmp_path):
    first, _net = _fit(tmp_path / "a", None, 1)
    ckpt = tmp_path / "plain.ckpt"
    first.save_checkpoint(ckpt)
    loaded = TinyNet.load_from_checkpoint(ckpt)
    uw = UncertaintyWeighting(init=0.3)
    trainer(tmp_path, [uw], max_epochs=1).fit(loaded, loader())
    assert not torch.allclose(uw.log_vars.detach(), torch.full((3,), 0.3))
