"""Gradient-based methods in real Trainers: the update is exactly sum_i c_i grad L_i."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from _helpers import TinyNet, loader, params, trainer
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_aw import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    FairGrad,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from lightning_aw import functional as AF
from lightning_aw.step import StepRecord

METHODS = [
    MGDA(),
    MGDA(normalization="loss+"),
    PCGrad(),
    CAGrad(),
    IMTLG(),
    NashMTL(),
    NashMTL(frequency=3),
    AlignedMTL(),
    UPGrad(),
    GradVac(),
    FairGrad(),
    ConFIG(),
    MGDA(source="representation"),
    UPGrad(source="representation"),
]


class HandCheck(pl.Callback):
    """At each optimizer step, recompute the window's update by hand from a copy of the model."""

    def __init__(self, accumulate: int, rtol: float, coef_fn=None) -> None:
        self.k, self.rtol, self.coef_fn = accumulate, rtol, coef_fn
        self.window: list = []
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % self.k == 0:
            self.ref = copy.deepcopy(pl_module).float()
            # eval: shared_representation cuts only in training, so its losses reach the trunk
            # directly (TinyNet has no dropout or batch norm: the same numbers as in training)
            self.ref.eval()
            self.window = []
        self._batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        self.window.append((self._batch, pl_module.weighting.weight_tensor().clone()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        ref = self.ref
        ref.zero_grad()
        for batch, coefs in self.window:
            out = ref.task_losses(batch, 0)
            losses = torch.stack([out[t] for t in ref.tasks])
            if self.coef_fn is not None:
                shared = [p for p in ref.trunk.parameters()]
                rows = [
                    torch.cat(
                        [g.reshape(-1) for g in torch.autograd.grad(l, shared, retain_graph=True)]
                    )
                    for l in losses
                ]
                G = torch.stack(rows) / self.k
                # the callback solves the T x T problem in float64, so does the reference
                ref_coefs = self.coef_fn(G.double(), losses.detach().double()).float()
                torch.testing.assert_close(coefs, ref_coefs, rtol=1e-4, atol=1e-5)
            (coefs @ losses / self.k).backward()
        for (name, p), q in zip(pl_module.named_parameters(), ref.parameters(), strict=True):
            # relative error of the whole gradient: low precision rounds single entries more
            err = (p.grad.float() - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
            assert err < self.rtol, (name, float(err))
        self.checked += 1


COEF_FNS = {
    "MGDA": lambda G, L: AF.mgda(G),
    "UPGrad": lambda G, L: AF.upgrad(G),
    "IMTLG": lambda G, L: AF.imtl_g(G),
    "CAGrad": lambda G, L: AF.cagrad(G, 0.4, 1),
    "AlignedMTL": lambda G, L: AF.aligned_mtl(G),
    "NashMTL": lambda G, L: AF.nash_mtl(G),
    "FairGrad": lambda G, L: AF.fairgrad(G),
    "ConFIG": lambda G, L: AF.con_fig(G),
}


def _with_marking(methods):
    """(method, marked) pairs: parameter-source methods with and without a marked representation
    (fast and general path); representation-source methods need the marker."""
    return [
        pytest.param(m, marked, id=f"{m!r}-{'marked' if marked else 'unmarked'}")
        for m in methods
        for marked in (True, False)
        if marked or m.source == "parameters"
    ]


@pytest.mark.parametrize(("method", "marked"), _with_marking(METHODS))
def test_update_equals_hand_computation_with_accumulation(tmp_path, method, marked):
    """The update is sum_i c_i grad L_i / k, both on the fast path (the module marks its shared
    representation) and on the general path (it does not)."""
    method = copy.deepcopy(method)
    plain_mgda = isinstance(method, MGDA) and method.normalization == "none"
    check_coefs = method.source == "parameters" and method.frequency == 1
    fn = (
        COEF_FNS.get(type(method).__name__)
        if check_coefs and (plain_mgda or not isinstance(method, MGDA))
        else None
    )
    check = HandCheck(accumulate=2, rtol=1e-4, coef_fn=fn)
    t = trainer(tmp_path, [method, check], max_epochs=1, accumulate_grad_batches=2)
    t.fit(TinyNet(optimizer={"name": "sgd", "lr": 0.05}, mark_representation=marked), loader())
    assert check.checked == 4
    assert t.callbacks[0]._fallbacks.item() == 0  # no overflow fell back to the plain sum
    assert torch.isfinite(torch.tensor(list(method.weights.values()))).all()


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-scaler"])
@pytest.mark.parametrize(
    ("method", "marked"), _with_marking([MGDA(), UPGrad(), PCGrad(), MGDA(source="representation")])
)
def test_update_under_mixed_precision(tmp_path, method, precision, marked):
    kw = (
        {"plugins": [MixedPrecision("16-mixed", "cpu")]}
        if precision == "fp16-scaler"
        else {"precision": precision}
    )
    # bf16 keeps 8 mantissa bits: a mishandled loss scale (x65536) or accumulation (x2) is still
    # far outside these tolerances
    check = HandCheck(accumulate=2, rtol=0.1 if precision == "bf16-mixed" else 1e-2)
    t = trainer(
        tmp_path, [copy.deepcopy(method), check], max_epochs=1, accumulate_grad_batches=2, **kw
    )
    t.fit(TinyNet(optimizer={"name": "sgd", "lr": 0.05}, mark_representation=marked), loader())
    assert check.checked == 4
    assert t.callbacks[0]._fallbacks.item() == 0  # no overflow fell back to the plain sum


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_representation_mode_trains_the_encoder(tmp_path, method):
    method = copy.deepcopy(method)
    method.source = "representation"
    net = TinyNet(optimizer={"name": "adam", "lr": 0.01})
    before = params(net)
    trainer(tmp_path, [method], max_epochs=1).fit(net, loader())
    after = params(net)
    for name in ("trunk.0.weight", "trunk.2.weight", "heads.a.weight"):
        assert not torch.equal(before[name], after[name]), name
    assert method._fallbacks.item() == 0


def test_representation_mode_needs_the_marker(tmp_path):
    with pytest.raises(MisconfigurationException, match="shared_representation"):
        trainer(tmp_path, [MGDA(source="representation")], max_epochs=1).fit(
            TinyNet(mark_representation=False), loader()
        )


def test_absent_task_gets_zero_coefficient(tmp_path):
    seen = []

    class Spy(pl.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            seen.append(pl_module.weighting.weight_tensor().clone())

    absent = lambda i, t: t == "b" and i % 2 == 0  # noqa: E731
    trainer(tmp_path, [UPGrad(), Spy()], max_epochs=1).fit(TinyNet(absent=absent), loader())
    seen_t = torch.stack(seen)
    assert (seen_t[0::2, 1] == 0).all()
    assert (seen_t[1::2, 1] > 0).all()


def test_nonfinite_gradients_fall_back_to_plain_sum():
    mgda = MGDA()
    mgda.tasks = ["a", "b"]
    mgda.init_state(2)
    both = torch.ones(2, dtype=torch.bool)
    step = StepRecord(
        tasks=("a", "b"),
        losses=torch.ones(2),
        task_losses=(None, None),
        present=both,
        present_list=(True, True),
        batch=None,
        batch_idx=0,
        representation=None,
        representation_graph=None,
        trainer=None,
    )
    grads = torch.tensor([[float("nan"), 1.0], [0.0, 1.0]])
    torch.testing.assert_close(mgda._safe_coefficients(step, grads, torch.ones(2)), torch.ones(2))
    assert mgda._fallbacks.item() == 1
    finite = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(
        mgda._safe_coefficients(step, finite, torch.ones(2)), torch.full((2,), 0.5)
    )
    assert mgda._fallbacks.item() == 1


def _tensors(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, pl.Trainer, type)):
        yield from _tensors(vars(obj), seen)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_per_task_gradients_are_released_after_the_step(tmp_path, method):
    """Nothing of the size of the shared parameters is kept between steps."""
    method = copy.deepcopy(method)
    net = TinyNet()
    trainer(tmp_path, [method], max_epochs=1).fit(net, loader())
    shared = sum(p.numel() for p in net.shared_parameters())
    kept = [t.numel() for t in _tensors(method)]
    assert kept and max(kept) < shared, (max(kept), shared)


@pytest.mark.parametrize("marked", [True, False], ids=["marked-representation", "unmarked"])
def test_epoch_interval_recomputes_once_per_epoch(tmp_path, marked):
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.weighting.weight_tensor().clone())

    method = MGDA(interval="epoch")
    assert "interval='epoch'" in repr(method)
    trainer(tmp_path, [method, Spy()], max_epochs=3).fit(
        TinyNet(mark_representation=marked), loader()
    )
    w = torch.stack(seen).view(3, 8, 3)  # epochs x steps x tasks
    for e in range(3):
        assert torch.equal(w[e], w[e, :1].expand(8, 3))  # constant within the epoch
    assert not torch.equal(w[0, 0], w[1, 0]) and not torch.equal(w[1, 0], w[2, 0])  # recomputed
    with pytest.raises(ValueError, match="interval"):
        MGDA(interval=None)
