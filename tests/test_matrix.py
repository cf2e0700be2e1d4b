"""The reliability matrix: every registered method under what Lightning users switch on.

Generated from :func:`lightning_aw.registry.list_methods` (plus ``none``, the plain sum), so a
newly registered method is in every cell. Test ids are ``<method>-<condition>``;
``benchmarks/reliability_table.py`` turns them into the table of ``docs/reliability.md``.

1. ``test_precision_accumulation_clipping``: 32-true / bf16-mixed / fp16 with a real GradScaler
   (``MixedPrecision("16-mixed", "cpu")``) × ``accumulate_grad_batches`` 1 and 2, with gradient
   clipping on. Checked on every step: the weights are finite and sum to the documented total,
   the loss Lightning backpropagates is the step's loss divided by the accumulation and (fp16
   only) multiplied by the GradScaler's scale, the gradients after clipping are within the clip
   value (and clipping did act), state-driven weights are constant within an accumulation
   window; at the end the parameters moved and are finite.
2. ``test_resume_mid_epoch``: a run that saves a checkpoint in the middle of an epoch and
   crashes, resumed with ``ckpt_path`` (``weights_only=True``), ends bit-identical to the
   uninterrupted run: parameters, weights and the method's state; also under accumulation 2.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _helpers import TinyNet, loader, params, trainer
from lightning.pytorch.plugins import MixedPrecision

from lightning_aw import GradientWeighting
from lightning_aw.registry import create_method, get_method, list_methods
from lightning_aw.weighting import Weighting

METHODS = list_methods()
PRECISIONS = {
    "32": {"precision": "32-true"},
    "bf16": {"precision": "bf16-mixed"},
    "fp16": {},  # a real GradScaler on the CPU: plugins=[MixedPrecision("16-mixed", "cpu")]
}
CLIP = 0.05
#: Methods whose reported weights are the *effective* weights of each micro-batch (they follow
#: that micro-batch's losses or gradients), so they may differ within an accumulation window.
PER_MICRO_BATCH = {"gls", "scale_invariant", "stch", "famo"}
#: Methods that update their weights inside the first micro-batch's step (before its loss, like
#: the gradient methods' coefficients): constant from there to the next window's first one.
UPDATED_IN_STEP = {"auto_lambda"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only cost time (a lot, when other jobs share the CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make(name: str) -> Weighting | None:
    if name == "none":
        return None
    return create_method(name, **copy.deepcopy(dict(get_method(name).example_kwargs)))


def _precision_kwargs(precision: str) -> dict[str, Any]:
    if precision == "fp16":
        return {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    return dict(PRECISIONS[precision])


def _total(name: str) -> float | None:
    if name == "none":
        return 3.0
    total = get_method(name).total
    if total is None:
        return None
    return 3.0 if total == "T" else float(total)


class ProbeNet(TinyNet):
    """TinyNet that keeps the loss its last training step returned."""

    last_total: torch.Tensor | None = None

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.last_total = None if out is None else out.detach().clone()
        return out


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


class Probe(pl.Callback):
    """What each step did: weights, the backpropagated loss, the scale, gradient norms."""

    def __init__(self) -> None:
        self.weights: list[list[float]] = []
        self.backward_ratio: list[tuple[float, float]] = []  # (loss / expected, scale)
        self.pre_clip: list[float] = []
        self.post_clip: list[float] = []
        self._scale = 1.0
        self._stepped = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(list(pl_module.task_weights.values()))

    def on_before_backward(self, trainer, pl_module, loss):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = 1.0 if scaler is None else float(scaler.get_scale())
        expected = pl_module.last_total / trainer.accumulate_grad_batches
        self.backward_ratio.append((float(loss.detach()) / float(expected), scale))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # after the GradScaler unscaled the gradients, before Lightning clips them
        self.pre_clip.append(_grad_norm(pl_module))
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._stepped:  # the gradients as the optimizer used them (clipped)
            self.post_clip.append(_grad_norm(pl_module))
            self._stepped = False


CELLS = [
    pytest.param(name, precision, accumulate, id=f"{name}-{precision}-acc{accumulate}")
    for name in ["none", *METHODS]
    for precision in PRECISIONS
    for accumulate in (1, 2)
]


@pytest.mark.parametrize(("name", "precision", "accumulate"), CELLS)
def test_precision_accumulation_clipping(tmp_path, name, precision, accumulate):
    method = _make(name)
    net = ProbeNet(optimizer={"name": "adam", "lr": 0.01})
    before = params(net)
    probe = Probe()
    callbacks = [probe] if method is None else [method, probe]
    t = trainer(
        tmp_path,
        callbacks,
        max_epochs=3,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=CLIP,
        **_precision_kwargs(precision),
    )
    t.fit(net, loader(n=128, batch_size=16))
    assert t.global_step == 3 * 8 // accumulate

    # the weights: finite on every step, with the documented total
    weights = torch.tensor(probe.weights, dtype=torch.float64)
    assert weights.shape == (3 * 8, 3)
    assert torch.isfinite(weights).all()
    total = _total(name)
    if total is not None:
        torch.testing.assert_close(
            weights.sum(1),
            torch.full((len(weights),), total, dtype=torch.float64),
            rtol=0,
            atol=1e-5,
        )
    if accumulate == 2 and name in UPDATED_IN_STEP:
        torch.testing.assert_close(weights[1:-1:2], weights[2::2], rtol=0, atol=0)
        assert not torch.equal(weights[0::2], weights[1::2])  # and they did move in the step
    elif (
        accumulate == 2
        and name not in PER_MICRO_BATCH
        and not (name != "none" and issubclass(get_method(name).cls, GradientWeighting))
    ):
        # updated per optimizer step: constant within an accumulation window
        torch.testing.assert_close(weights[0::2], weights[1::2], rtol=0, atol=0)

    # the loss Lightning backpropagates: the step's loss / accumulation (x the scale in fp16)
    ratios = torch.tensor(probe.backward_ratio, dtype=torch.float64)
    assert len(ratios) == 3 * 8
    scaler = getattr(t.precision_plugin, "scaler", None)
    if precision == "fp16":
        assert scaler is not None and scaler.is_enabled()
        assert (ratios[:, 1] >= 2.0**8).all()  # it did scale, by a large power of two
        torch.testing.assert_close(ratios[:, 0], ratios[:, 1], rtol=1e-6, atol=0)
    else:
        assert scaler is None
        torch.testing.assert_close(ratios[:, 0], torch.ones(len(ratios), dtype=torch.float64))

    # clipping: it acted, and every finite step's gradients are within the clip value
    assert len(probe.pre_clip) == len(probe.post_clip) == t.global_step
    finite = [
        (a, b) for a, b in zip(probe.pre_clip, probe.post_clip, strict=True) if math.isfinite(a)
    ]
    assert any(a > CLIP * 1.01 for a, _ in finite), "the test never clipped: lower CLIP"
    for a, b in finite:
        assert b <= CLIP * (1 + 1e-3) + 1e-7
        if a <= CLIP:  # below the threshold: untouched
            assert b == pytest.approx(a, rel=1e-5)

    # the model trained: parameters moved and are finite
    after = params(net)
    assert any(not torch.equal(before[k], after[k]) for k in before), "nothing trained"
    assert all(torch.isfinite(v).all() for v in after.values())


# ---------------------------------------------------------------------------------- resume
class ResumableLoader:
    """A DataLoader wrapper Lightning can checkpoint (``state_dict``/``load_state_dict``): on
    resume it skips the batches the interrupted epoch already consumed, so a mid-epoch resume
    sees exactly the data the uninterrupted run saw."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.consumed = 0
        self._skip = 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        start, self._skip = self._skip, 0
        self.consumed = start
        for batch in itertools.islice(self.data, start, None):
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["consumed"])


class Crash(Exception):
    """The simulated crash."""


class SaveThenCrash(pl.Callback):
    """Saves a checkpoint right after optimizer step ``step`` (mid-epoch), then crashes."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (
            trainer.global_step == self.step
            and not trainer.fit_loop.epoch_loop._should_accumulate()
        ):
            trainer.save_checkpoint(self.path)
            raise Crash


def _flat(state: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for k, v in state.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(state, (list, tuple)):
        return _flat(dict(enumerate(state)), prefix)
    return {prefix: state}


def assert_same_state(a: dict, b: dict) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k, v in fa.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v.cpu(), fb[k].cpu()), k
        else:
            assert v == fb[k], k


def _fit_resumable(path, name, accumulate, callbacks=(), ckpt=None):
    method = _make(name)
    if name == "auto_lambda":  # its default copies a plain DataLoader: give it one
        kwargs = {**get_method(name).example_kwargs, "val_data": loader(n=64, batch_size=32)}
        method = create_method(name, **kwargs)
    net = TinyNet(optimizer={"name": "adam", "lr": 0.01})
    cbs = [*([] if method is None else [method]), *callbacks]
    t = trainer(path, cbs, max_epochs=2, accumulate_grad_batches=accumulate)
    with contextlib.suppress(Crash):  # the crashed run: checked by its global_step
        t.fit(net, ResumableLoader(loader(n=192, batch_size=32)), ckpt_path=ckpt, weights_only=True)
    return t, net, method


@pytest.mark.parametrize(
    ("name", "accumulate"),
    [pytest.param(n, a, id=f"{n}-acc{a}") for n in ["none", *METHODS] for a in (1, 2)],
)
def test_resume_mid_epoch(tmp_path, name, accumulate):
    steps_per_epoch = 6 // accumulate
    crash_at = steps_per_epoch + steps_per_epoch // 2  # in the middle of the second epoch
    full_trainer, full, full_method = _fit_resumable(tmp_path / "full", name, accumulate)
    ckpt = str(tmp_path / "mid.ckpt")
    crashed, _, _ = _fit_resumable(
        tmp_path / "a", name, accumulate, [SaveThenCrash(crash_at, ckpt)]
    )
    assert crashed.global_step == crash_at and crash_at % steps_per_epoch != 0  # mid-epoch
    resumed_trainer, resumed, resumed_method = _fit_resumable(
        tmp_path / "b", name, accumulate, ckpt=ckpt
    )
    assert resumed_trainer.global_step == full_trainer.global_step == 2 * steps_per_epoch
    for k, v in params(full).items():
        torch.testing.assert_close(params(resumed)[k], v, rtol=0, atol=0, msg=k)
    assert resumed.task_weights == full.task_weights
    if full_method is not None:
        assert_same_state(resumed_method.state_dict(), full_method.state_dict())
