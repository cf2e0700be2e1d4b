"""Crash-and-resume: clear errors on mismatched checkpoints, and old checkpoints.

That a resumed run continues exactly as an uninterrupted one is checked for every registered
method (and variants) in ``test_conformance.py`` (f), and mid-epoch in ``test_matrix.py``.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _helpers import TinyNet, loader, params, trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_aw import DWA, UncertaintyWeighting
from lightning_aw.registry import create_method, get_method, list_methods


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only cost time (a lot, when other jobs share the CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(tmp_path, method, max_epochs, ckpt_path=None, **kw):
    net = TinyNet(optimizer={"name": "adam", "lr": 0.01})
    cbs = [] if method is None else [copy.deepcopy(method)]
    t = trainer(tmp_path, cbs, max_epochs=max_epochs, **kw)
    t.fit(net, loader(), ckpt_path=ckpt_path)
    return t, net


def test_resume_with_other_tasks_is_a_clear_error(tmp_path):
    first, _ = _fit(tmp_path / "a", DWA(), 1)
    ckpt = tmp_path / "one.ckpt"
    first.save_checkpoint(ckpt)
    net = TinyNet(tasks=("a", "b", "x"))
    with pytest.raises(
        MisconfigurationException,
        match=r"saved for tasks \['a', 'b', 'c'\], but this TinyNet has tasks",
    ):
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
    with pytest.raises(
        MisconfigurationException,
        match="trained with weighting 'none', but this run uses 'UncertaintyWeighting'",
    ):
        _fit(tmp_path / "b", UncertaintyWeighting(), 2, ckpt_path=str(ckpt))


def test_switch_method_from_weights_only(tmp_path):
    first, _net = _fit(tmp_path / "a", None, 1)
    ckpt = tmp_path / "plain.ckpt"
    first.save_checkpoint(ckpt)
    loaded = TinyNet.load_from_checkpoint(ckpt)
    uw = UncertaintyWeighting(init=0.3)
    trainer(tmp_path, [uw], max_epochs=1).fit(loaded, loader())
    assert not torch.allclose(uw.log_vars.detach(), torch.full((3,), 0.3))


# ---------------------------------------------------------------------------------- old configs
# A checkpoint saved by another configuration, resumed into this one, is a clear error for every
# registered method (test ids: the method saved in the checkpoint).
REGISTERED = list_methods()


def _registered(name: str):
    return create_method(name, **copy.deepcopy(dict(get_method(name).example_kwargs)))


def _checkpoint(tmp_path, name: str, method=None) -> str:
    t = trainer(tmp_path / "saved", [method or _registered(name)], max_epochs=1)
    t.fit(TinyNet(optimizer={"name": "adam", "lr": 0.01}), loader(n=64))
    path = str(tmp_path / f"{name}.ckpt")
    t.save_checkpoint(path)
    return path


@pytest.mark.parametrize("name", REGISTERED)
def test_old_checkpoint_other_task_list(tmp_path, name):
    ckpt = _checkpoint(tmp_path, name)
    net = TinyNet(tasks=("a", "b", "x"))
    with pytest.raises(
        MisconfigurationException,
        match=r"saved for tasks \['a', 'b', 'c'\], but this TinyNet has tasks \['a', 'b', 'x'\]",
    ):
        trainer(tmp_path, [_registered(name)], max_epochs=2).fit(net, loader(n=64), ckpt_path=ckpt)


@pytest.mark.parametrize("name", REGISTERED)
def test_old_checkpoint_other_method(tmp_path, name):
    ckpt = _checkpoint(tmp_path, name)
    other = REGISTERED[(REGISTERED.index(name) + 1) % len(REGISTERED)]
    saved_cls, new_cls = get_method(name).cls.__name__, get_method(other).cls.__name__
    with pytest.raises(
        MisconfigurationException,
        match=rf"trained with weighting '{saved_cls}', but this run uses '{new_cls}'",
    ):
        trainer(tmp_path, [_registered(other)], max_epochs=2).fit(
            TinyNet(optimizer={"name": "adam", "lr": 0.01}), loader(n=64), ckpt_path=ckpt
        )


@pytest.mark.parametrize("name", REGISTERED)
def test_old_checkpoint_other_hyperparameters(tmp_path, name):
    """Lightning finds a callback's state by ``state_key`` and would silently drop it."""
    info = get_method(name)
    if not info.example_kwargs:
        pytest.skip(f"{info.cls.__name__} has no hyperparameters")
    saved, new = _registered(name), info.cls()  # example arguments vs the defaults
    assert saved.state_key != new.state_key
    ckpt = _checkpoint(tmp_path, name, saved)
    with pytest.raises(
        MisconfigurationException,
        match=rf"holds the state of {re.escape(saved.state_key)}, but this run's weighting is "
        rf"{re.escape(new.state_key)}: its hyperparameters differ",
    ):
        trainer(tmp_path, [new], max_epochs=2).fit(
            TinyNet(optimizer={"name": "adam", "lr": 0.01}), loader(n=64), ckpt_path=ckpt
        )


@pytest.mark.parametrize("name", ["dwa", "mgda"])
def test_same_hyperparameters_resume_without_error(tmp_path, name):
    """The check above does not fire for an identical configuration (or for validate/test)."""
    ckpt = _checkpoint(tmp_path, name)
    t = trainer(tmp_path, [_registered(name)], max_epochs=2)
    t.fit(TinyNet(optimizer={"name": "adam", "lr": 0.01}), loader(n=64), ckpt_path=ckpt)
    assert t.global_step == 4
    t.validate(TinyNet(), loader(n=64), ckpt_path=ckpt)
