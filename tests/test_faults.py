"""Faults, for every registered method: bad losses, missing tasks, extreme scales, fp16 overflow.

Test ids are ``<method>`` (``benchmarks/reliability_table.py`` reads them):

- ``test_nonfinite_raise``: a NaN appearing mid-run in one task raises naming the task, epoch,
  batch and global step;
- ``test_nonfinite_skip``: with ``on_nonfinite="skip"`` the steps with a NaN or an Inf leave the
  weights, the method's state, the parameters and the optimizer state exactly untouched, and the
  counter ``train/skipped_steps`` is in TensorBoard;
- ``test_absent_task``: a task absent for 12 consecutive batches (twice): weights finite with
  the documented total, no NaN in the state, the absent head untouched meanwhile, and it trains
  again when the task is back;
- ``test_zero_loss``: a task whose loss is exactly 0: finite weights and parameters, or the
  documented error naming the task (methods that take ``log L``);
- ``test_extreme_scales``: losses scaled by 1e-8, 1 and 1e8: finite weights, state and model;
- ``test_scaler_skip``: fp16 GradScaler steps skipped on overflow (forced by a huge scale)
  leave the weights and the method's state untouched (diagnostic counters excepted).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _helpers import TinyNet, loader, params, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_aw.registry import create_method, get_method, list_methods
from lightning_aw.weighting import Weighting

METHODS = list_methods()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only cost time (a lot, when other jobs share the CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make(name: str) -> Weighting:
    return create_method(name, **copy.deepcopy(dict(get_method(name).example_kwargs)))


def _total(name: str) -> float | None:
    total = get_method(name).total
    if total is None:
        return None
    return 3.0 if total == "T" else float(total)


def _flat(state: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for k, v in state.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(state, (list, tuple)):
        return _flat(dict(enumerate(state)), prefix)
    if isinstance(state, torch.Tensor):
        return {prefix: state.detach().cpu().clone()}
    return {prefix: copy.deepcopy(state)}


def _changed(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    assert a.keys() == b.keys()
    return [
        k
        for k, v in a.items()
        if (not torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v != b[k])
    ]


def _method_state(method: Weighting, diagnostics: bool = True) -> dict[str, Any]:
    state = method.state_dict()
    if not diagnostics:  # counters of fallbacks / bad losses, documented to keep counting
        for name in method._diagnostic_attrs:
            state.pop(name, None)
    return _flat(state)


class StepProbe(pl.Callback):
    """Snapshots of the weights, the method's state, the model and the optimizer around every
    training batch."""

    def __init__(self, method: Weighting, diagnostics: bool = True) -> None:
        self.method = method
        self.diagnostics = diagnostics
        self.rows: list[dict[str, Any]] = []
        self._before: dict[str, Any] = {}

    def _snapshot(self, trainer, pl_module) -> dict[str, Any]:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return {
            "weights": self.method.current_weights().detach().cpu().clone(),
            "state": _method_state(self.method, self.diagnostics),
            "model": _flat(params(pl_module)),
            "optimizer": _flat(trainer.optimizers[0].state_dict()["state"]),
            "scale": None if scaler is None else float(scaler.get_scale()),
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = self._snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = self._snapshot(trainer, pl_module)
        self.rows.append(
            {
                "batch": batch_idx,
                "skipped": pl_module._step_skipped,
                "before": self._before,
                "after": after,
            }
        )


# ---------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("name", METHODS)
def test_nonfinite_raise(tmp_path, name):
    def hook(batch_idx, task, loss):
        return loss * math.nan if (task == "b" and batch_idx == 5) else loss

    net = TinyNet(loss_hook=hook, optimizer={"name": "adam", "lr": 0.01})
    t = trainer(tmp_path, [_make(name)], max_epochs=2)
    with pytest.raises(
        FloatingPointError,
        match=r"Non-finite loss for task\(s\) \{'b': nan\} at epoch 0, batch 5 \(global step 5\)",
    ):
        t.fit(net, loader())
    assert t.global_step == 5  # it stopped at that step


@pytest.mark.parametrize("name", METHODS)
def test_nonfinite_skip(tmp_path, name):
    bad = {3: math.nan, 6: math.inf}

    def hook(batch_idx, task, loss):
        return loss * bad[batch_idx] if (task == "b" and batch_idx in bad) else loss

    method = _make(name)
    probe = StepProbe(method)
    logger = TensorBoardLogger(tmp_path, name="tb")
    net = TinyNet(loss_hook=hook, on_nonfinite="skip", optimizer={"name": "adam", "lr": 0.01})
    t = trainer(tmp_path, [method, probe], max_epochs=1, logger=logger, log_every_n_steps=1)
    t.fit(net, loader())
    assert net.skipped_steps == 2
    assert [r["batch"] for r in probe.rows if r["skipped"]] == sorted(bad)
    for row in probe.rows:
        before, after = row["before"], row["after"]
        if row["skipped"]:  # nothing moved: weights, method state, model, optimizer state
            assert torch.equal(before["weights"], after["weights"])
            assert _changed(before["state"], after["state"]) == []
            assert _changed(before["model"], after["model"]) == []
            assert _changed(before["optimizer"], after["optimizer"]) == []
        else:
            assert _changed(before["model"], after["model"]), f"batch {row['batch']} did not train"
        assert torch.isfinite(after["weights"]).all()
    # the counter, read back from TensorBoard
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/skipped_steps")
    logged = {e.step: e.value for e in events}  # the running count, from the first skip on
    assert min(logged) == 3 and logged[3] == 1.0
    assert logged[6] == 2.0 and events[-1].value == 2.0


def _skip_in_window(tmp_path, net_cls, name):
    # a non-finite loss in any micro-batch of an accumulation window skips the window's step
    def hook(batch_idx, task, loss):  # the 1st micro-batch of window 1, the 2nd of window 3
        return loss * math.nan if (task == "b" and batch_idx in (2, 7)) else loss

    method = _make(name)
    probe = StepProbe(method)
    net = net_cls(loss_hook=hook, on_nonfinite="skip", optimizer={"name": "adam", "lr": 0.01})
    trainer(tmp_path, [method, probe], max_epochs=1, accumulate_grad_batches=2).fit(net, loader())
    rows = probe.rows
    for first, last in ((2, 3), (6, 7)):  # the two windows with a NaN, from start to end
        before, after = rows[first]["before"], rows[last]["after"]
        assert torch.equal(before["weights"], after["weights"])
        assert _changed(before["state"], after["state"]) == []
        assert _changed(before["model"], after["model"]) == []
        assert _changed(before["optimizer"], after["optimizer"]) == []
    assert _changed(rows[0]["before"]["model"], rows[1]["after"]["model"])  # others trained


@pytest.mark.parametrize("name", ["equal", "gradnorm", "mgda", "dwa"])
def test_nonfinite_skip_in_accumulation_window(tmp_path, name):
    _skip_in_window(tmp_path, TinyNet, name)


# ---------------------------------------------------------------------------------- absent
def _no_nan(state: dict[str, Any]) -> bool:
    return all(
        not (v.is_floating_point() and torch.isnan(v).any())
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


@pytest.mark.parametrize("name", METHODS)
def test_absent_task(tmp_path, name):
    absent = range(2, 14)  # 12 consecutive batches of the 16 of each epoch

    method = _make(name)
    probe = StepProbe(method)
    net = TinyNet(
        absent=lambda i, t: t == "c" and i in absent, optimizer={"name": "sgd", "lr": 0.05}
    )
    t = trainer(tmp_path, [method, probe], max_epochs=2)
    if not get_method(name).partial_labels:  # refused at the first such batch, naming the task
        with pytest.raises(MisconfigurationException, match=r"task\(s\) \['c'\] are absent"):
            t.fit(net, loader(n=512, batch_size=32))
        assert t.global_step == 2
        return
    t.fit(net, loader(n=512, batch_size=32))
    assert t.global_step == 32
    total = _total(name)
    head = [k for k in probe.rows[0]["before"]["model"] if k.startswith("heads.c.")]
    for row in probe.rows:
        w = row["after"]["weights"].double()
        assert torch.isfinite(w).all(), row["batch"]
        if total is not None:
            assert float(w.sum()) == pytest.approx(total, abs=1e-5)
        assert _no_nan(row["after"]["state"]), row["batch"]
        moved = _changed(
            {k: row["before"]["model"][k] for k in head},
            {k: row["after"]["model"][k] for k in head},
        )
        if row["batch"] in absent:  # the absent task's head gets no update
            assert moved == [], row["batch"]
    # the task is back in the last two batches of each epoch: its head trains again
    last = probe.rows[-1]
    assert _changed(
        {k: probe.rows[13]["after"]["model"][k] for k in head},
        {k: last["after"]["model"][k] for k in head},
    )
    assert all(torch.isfinite(v).all() for v in params(net).values())


# ---------------------------------------------------------------------------------- zero loss
#: Methods that take log L (or a ratio of losses) document a clear error for a loss of 0: at the
#: first step (the module's per-step check against the method's loss floor), or for DWA, whose
#: ratios are of epoch means, when the first mean of 0 is used.
_FIRST_STEP = r"but got loss 0 for task 'b' at epoch 0, batch 0 \(global step 0\)"
ZERO_LOSS_ERRORS = {
    "dwa": r"DWA needs positive mean losses, but task 'b' has mean 0",
    "gls": rf"GLS needs positive task losses .*, {_FIRST_STEP}",
    "relobralo": rf"ReLoBRaLo needs positive task losses .*, {_FIRST_STEP}",
    "scale_invariant": rf"ScaleInvariant needs positive task losses .*, {_FIRST_STEP}",
    "imtl_l": rf"IMTLL needs positive task losses .*, {_FIRST_STEP}",
    "stch": rf"STCH needs positive task losses .*, {_FIRST_STEP}",
    "db_mtl": rf"DBMTL needs positive task losses \(it takes log L_i\), {_FIRST_STEP}",
    "gradnorm": rf"GradNorm needs positive task losses .*, {_FIRST_STEP}",
    "famo": rf"FAMO needs task losses above their `min_losses` .*, {_FIRST_STEP}",
}


@pytest.mark.parametrize("name", METHODS)
def test_zero_loss(tmp_path, name):
    def hook(batch_idx, task, loss):
        return loss * 0.0 if task == "b" else loss  # exactly 0, gradient 0

    method = _make(name)
    probe = StepProbe(method)
    net = TinyNet(loss_hook=hook, optimizer={"name": "adam", "lr": 0.01})
    t = trainer(tmp_path, [method, probe], max_epochs=3)
    if name in ZERO_LOSS_ERRORS:
        with pytest.raises(ValueError, match=ZERO_LOSS_ERRORS[name]):
            t.fit(net, loader())
    else:
        t.fit(net, loader())
        assert t.global_step == 24
    total = _total(name)
    for row in probe.rows:  # up to the error, if any: nothing non-finite anywhere
        w = row["after"]["weights"].double()
        assert torch.isfinite(w).all(), row["batch"]
        if total is not None:
            assert float(w.sum()) == pytest.approx(total, abs=1e-5)
        assert _no_nan(row["after"]["state"])
    assert all(torch.isfinite(v).all() for v in params(net).values())


# ---------------------------------------------------------------------------------- scales
@pytest.mark.parametrize("name", METHODS)
def test_extreme_scales(tmp_path, name):
    scales = {"a": 1e-8, "b": 1.0, "c": 1e8}

    method = _make(name)
    probe = StepProbe(method)
    net = TinyNet(
        loss_hook=lambda i, t, loss: loss * scales[t], optimizer={"name": "adam", "lr": 0.01}
    )
    t = trainer(tmp_path, [method, probe], max_epochs=3, gradient_clip_val=1.0)
    t.fit(net, loader())
    assert t.global_step == 24
    total = _total(name)
    for row in probe.rows:
        w = row["after"]["weights"].double()
        assert torch.isfinite(w).all(), row["batch"]
        if total is not None:
            assert float(w.sum()) == pytest.approx(total, rel=1e-5)
        assert _no_nan(row["after"]["state"])
    assert all(torch.isfinite(v).all() for v in params(net).values())


# ---------------------------------------------------------------------------------- fp16 skip
class ForceOverflow(pl.Callback):
    """Sets the GradScaler's scale to 2^100 before the batches in ``steps`` (the fp16 gradients
    overflow, so the scaler skips the optimizer step) and back to 2^10 after them."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.steps or batch_idx - 1 in self.steps:  # (never the first batch,
            # before which the scaler has no scale tensor yet)
            scaler = trainer.precision_plugin.scaler
            scaler.update(new_scale=2.0**100 if batch_idx in self.steps else 2.0**10)


@pytest.mark.parametrize("name", METHODS)
def test_scaler_skip(tmp_path, name):
    forced = {2, 5}
    method = _make(name)
    probe = StepProbe(method, diagnostics=False)
    net = TinyNet(optimizer={"name": "adam", "lr": 0.01})
    plugin = MixedPrecision(
        "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10)
    )
    # the probe's snapshot runs after ForceOverflow set this batch's scale
    t = trainer(tmp_path, [method, ForceOverflow(forced), probe], max_epochs=1, plugins=[plugin])
    t.fit(net, loader())
    skipped = [r["batch"] for r in probe.rows if r["after"]["scale"] < r["before"]["scale"]]
    assert skipped == sorted(forced)  # exactly the forced steps overflowed
    assert method.scaler_skipped_steps == len(forced)
    for row in probe.rows:
        before, after = row["before"], row["after"]
        if row["batch"] in forced:  # the scaler skipped the step: nothing of the method moved
            assert _changed(before["model"], after["model"]) == []
            assert torch.equal(before["weights"], after["weights"])
            assert _changed(before["state"], after["state"]) == []
        else:
            assert _changed(before["model"], after["model"])
        assert torch.isfinite(after["weights"]).all()
    # the skipped steps do not count: the method saw 6 optimizer steps of the 8
    assert method._optimizer_steps == 8 - len(forced)


def test_scaler_skip_logs_nothing_wrong(tmp_path):
    """A forced overflow under fp16 still writes finite weights to TensorBoard."""
    logger = TensorBoardLogger(tmp_path, name="tb")
    plugin = MixedPrecision(
        "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10)
    )
    method = _make("gradnorm")
    t = trainer(
        tmp_path,
        [method, ForceOverflow({2})],
        max_epochs=1,
        plugins=[plugin],
        logger=logger,
        log_every_n_steps=1,
    )
    t.fit(TinyNet(), loader())
    acc = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    values = [e.value for t_ in "abc" for e in acc.Scalars(f"weights/{t_}")]
    assert len(values) == 3 * 8 and all(math.isfinite(v) for v in values)
