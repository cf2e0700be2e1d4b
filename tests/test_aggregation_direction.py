"""GradDrop and DB-MTL in real Trainers: each parameter gets exactly the gradient the paper says.

The hand checks recompute, from a copy of the model taken at the start of each accumulation
window, the gradient every parameter should receive (per-task gradients, the mask or the EMA
direction written out here, not through lightning_aw.functional), and compare it with ``p.grad``
just before the optimizer step.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import TinyNet, loader, params, trainer
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_aw import DBMTL, GradDrop

FP16 = {"plugins": [MixedPrecision("16-mixed", "cpu")]}
PRECISION = {"32": {}, "fp16-scaler": FP16, "bf16": {"precision": "bf16-mixed"}}
# relative error of a whole gradient: 16-bit forward passes round the per-task gradients (bf16
# keeps 8 mantissa bits); a mishandled loss scale (x65536) or accumulation (x2) is far outside
RTOL = {"32": 1e-4, "fp16-scaler": 2e-2, "bf16": 0.1}


def _forward(ref, batch):
    """TinyNet's losses, with the representation as a separate leaf: (h, z, losses [T])."""
    x, y = batch
    h = ref.trunk(x)
    z = h.detach().requires_grad_()
    losses = torch.stack(
        [F.mse_loss(ref.heads[t](z).squeeze(-1), y[:, i]) for i, t in enumerate(ref.tasks)]
    )
    return h, z, losses


def _heads(ref):
    return [p for p in ref.heads.parameters()]


class _Window(pl.Callback):
    """Keeps a float32 copy of the model at the start of each accumulation window, and checks
    ``p.grad`` against ``self.expected(ref)`` (which fills the copy's ``.grad``)."""

    def __init__(self, k: int, rtol: float) -> None:
        self.k, self.rtol = k, rtol
        self.window: list = []
        self.checked = self.overflows = 0
        self.errors: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % self.k == 0:
            self.ref = copy.deepcopy(pl_module).float()
            self.ref.eval()  # a plain module: losses reach the trunk directly (no cut)
            self.window = []
        self.window.append(self.record(trainer, pl_module, batch))

    def record(self, trainer, pl_module, batch):
        return batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        ref = self.ref
        ref.zero_grad()
        carried = copy.deepcopy(getattr(self, "ema", None))
        self.expected(ref)
        if not all(torch.isfinite(p.grad).all() for p in pl_module.parameters()):
            # an fp16 overflow in Lightning's backward: the GradScaler skips this step, and the
            # weighting's state (DB-MTL's EMA) is rolled back with it
            assert trainer.precision_plugin.scaler is not None
            self.overflows += 1
            if hasattr(self, "ema"):
                self.ema = carried
            return
        for (name, p), q in zip(pl_module.named_parameters(), ref.parameters(), strict=True):
            err = float((p.grad.float() - q.grad).norm() / q.grad.norm().clamp_min(1e-12))
            self.errors.append(err)
            assert err < self.rtol, (name, err)
        self.checked += 1


class GradDropCheck(_Window):
    def __init__(self, k: int, rtol: float, leak) -> None:
        super().__init__(k, rtol)
        self.leak = torch.as_tensor(leak, dtype=torch.float32).reshape(-1, 1, 1)

    def record(self, trainer, pl_module, batch):
        return batch, pl_module.weighting._generator.generator.get_state()

    def expected(self, ref):
        for batch, state in self.window:
            h, z, losses = _forward(ref, batch)
            grads = torch.stack([torch.autograd.grad(l, z, retain_graph=True)[0] for l in losses])
            total, absolute = grads.sum(0), grads.abs().sum(0)
            purity = torch.where(absolute > 0, 0.5 * (1 + total / absolute.clamp_min(1e-30)), 0.5)
            gen = torch.Generator().set_state(state)
            u = torch.rand(purity.shape, generator=gen)
            keep = torch.where(purity > u, grads > 0, grads < 0).float()
            g_z = ((self.leak + (1 - self.leak) * keep) * grads).sum(0)
            (losses.sum() / self.k).backward()  # the heads: their plain gradients
            h.backward(g_z / self.k)  # the trunk: the GradDrop gradient


class DBMTLCheck(_Window):
    """The EMA is carried across windows by the check itself."""

    def __init__(
        self, k: int, rtol: float, source: str, beta: float = 0.9, wtol: float = 1e-3
    ) -> None:
        super().__init__(k, rtol)
        self.source, self.beta, self.wtol = source, beta, wtol
        self.ema = None
        self.weights: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.window[-1] = (*self.window[-1], pl_module.weighting.weight_tensor().clone())

    def record(self, trainer, pl_module, batch):
        return (batch,)

    def expected(self, ref):
        for batch, weights in self.window:
            h, z, losses = _forward(ref, batch)
            trunk = list(ref.trunk.parameters())
            if self.source == "parameters":
                hl = ref.heads  # the full graph: loss -> heads -> h -> trunk
                x, y = batch
                hf = ref.trunk(x)
                full = [F.mse_loss(hl[t](hf).squeeze(-1), y[:, i]) for i, t in enumerate(ref.tasks)]
                rows = [
                    torch.cat(
                        [g.reshape(-1) for g in torch.autograd.grad(l, trunk, retain_graph=True)]
                    )
                    for l in full
                ]
            else:
                rows = [torch.autograd.grad(l, z, retain_graph=True)[0].reshape(-1) for l in losses]
            log_grads = torch.stack(rows) / losses.detach()[:, None]
            self.ema = (
                log_grads
                if self.ema is None
                else self.beta * self.ema + (1 - self.beta) * log_grads
            )
            norms = self.ema.norm(dim=1)
            scales = norms.max() / norms
            direction = (scales[:, None] * self.ema).sum(0)
            torch.testing.assert_close(weights, scales / losses.detach(), rtol=self.wtol, atol=0)
            heads = _heads(ref)
            for p, g in zip(heads, torch.autograd.grad(losses.log().sum(), heads), strict=True):
                p.grad = g / self.k if p.grad is None else p.grad + g / self.k
            if self.source == "parameters":
                start = 0
                for p in trunk:
                    g = direction[start : start + p.numel()].view_as(p) / self.k
                    p.grad = g if p.grad is None else p.grad + g
                    start += p.numel()
            else:
                h.backward(direction.view_as(h) / self.k)


def _fit(tmp_path, callbacks, marked=True, epochs=1, net_kw=None, **kw):
    net = TinyNet(
        mark_representation=marked, **(net_kw or {"optimizer": {"name": "sgd", "lr": 0.05}})
    )
    t = trainer(tmp_path, callbacks, max_epochs=epochs, **kw)
    t.fit(net, loader())
    return t, net


# ---------------------------------------------------------------------------- hand checks
@pytest.mark.parametrize(
    ("leak", "precision"),
    [(0.0, "32"), ([0.0, 0.5, 1.0], "32"), (0.0, "fp16-scaler"), (0.0, "bf16")],
    ids=["leak0", "leak-per-task", "fp16-scaler", "bf16"],
)
def test_graddrop_update_equals_hand_computation(tmp_path, leak, precision):
    check = GradDropCheck(k=2, rtol=RTOL[precision], leak=leak)
    method = GradDrop(leak=leak, seed=3)
    _fit(tmp_path, [method, check], accumulate_grad_batches=2, **PRECISION[precision])
    assert check.checked + check.overflows == 4
    assert check.checked >= 3
    assert method.weights == dict.fromkeys("abc", 1.0)
    assert method._fallbacks.item() == 0


@pytest.mark.parametrize(
    ("source", "marked", "precision"),
    [
        ("parameters", True, "32"),
        ("parameters", False, "32"),
        ("representation", True, "32"),
        ("parameters", True, "fp16-scaler"),
        ("representation", True, "fp16-scaler"),
        ("parameters", False, "bf16"),
        ("representation", True, "bf16"),
    ],
    ids=[
        "params-marked",
        "params-unmarked",
        "representation",
        "params-fp16",
        "repr-fp16",
        "params-unmarked-bf16",
        "repr-bf16",
    ],
)
def test_dbmtl_update_equals_hand_computation(tmp_path, source, marked, precision):
    wtol = {"32": 1e-3, "fp16-scaler": 1e-2, "bf16": 0.1}[precision]
    check = DBMTLCheck(k=2, rtol=RTOL[precision], source=source, wtol=wtol)
    method = DBMTL(source=source)
    _fit(
        tmp_path, [method, check], marked=marked, accumulate_grad_batches=2, **PRECISION[precision]
    )
    assert check.checked + check.overflows == 4
    assert check.checked >= 2  # fp16: the first steps may overflow (log L scales gradients up)
    assert method._fallbacks.item() == 0
    assert method._seen.all()


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", [GradDrop(), DBMTL(), DBMTL(source="representation")], ids=repr)
def test_the_encoder_trains(tmp_path, method):
    net = TinyNet(optimizer={"name": "adam", "lr": 0.01})
    before = params(net)
    trainer(tmp_path, [copy.deepcopy(method)], max_epochs=2).fit(net, loader())
    after = params(net)
    for name in ("trunk.0.weight", "trunk.2.weight", "heads.a.weight", "heads.c.weight"):
        assert not torch.equal(before[name], after[name]), name
    x, y = next(iter(loader()))
    with torch.no_grad():
        fresh = TinyNet()
        err_before = F.mse_loss(torch.cat([fresh.heads[t](fresh.trunk(x)) for t in "abc"], 1), y)
        err_after = F.mse_loss(torch.cat([net.heads[t](net.trunk(x)) for t in "abc"], 1), y)
    assert err_after < 0.7 * err_before


# ---------------------------------------------------------------------------- degenerate input
def _zero_grad_task(i, t, loss):
    # task "b" carries a zero gradient (a constant positive loss that keeps its graph); "c" is
    # a billion times larger
    if t == "b":
        return loss * 0.0 + 1.0
    return loss * 1e9 if t == "c" else loss


@pytest.mark.parametrize("method", [GradDrop(), DBMTL(), DBMTL(source="representation")], ids=repr)
def test_degenerate_inputs_give_finite_updates(tmp_path, method):
    method = copy.deepcopy(method)
    absent = lambda i, t: t == "a" and i % 3 == 0  # noqa: E731
    net = TinyNet(absent=absent, loss_hook=_zero_grad_task, optimizer={"name": "sgd", "lr": 1e-12})
    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = torch.cat(
                [p.grad.reshape(-1) for p in pl_module.parameters() if p.grad is not None]
            )
            seen.append(bool(torch.isfinite(grads).all()))

    trainer(tmp_path, [method, Spy()], max_epochs=1).fit(net, loader())
    assert seen and all(seen)
    assert all(torch.isfinite(torch.tensor(v)) for v in method.weights.values())
    assert method._fallbacks.item() == 0
    if isinstance(method, DBMTL):
        assert method.weights["b"] == 0.0  # a zero gradient gets no scale-up
        assert method._seen.all()


def test_graddrop_single_task_is_the_plain_gradient(tmp_path):
    """With one task every sign is pure: GradDrop is the ordinary backward."""
    nets = []
    for cbs in ([GradDrop()], []):
        net = TinyNet(tasks=("a",), optimizer={"name": "sgd", "lr": 0.05})
        trainer(tmp_path, cbs, max_epochs=1).fit(net, loader())
        nets.append(params(net))
    for k, v in nets[1].items():
        torch.testing.assert_close(nets[0][k], v, rtol=1e-5, atol=1e-6, msg=k)


def _huge_gradient_once(i, t, loss):
    # same value, a million times the gradient, on the first batch: overflows fp16 when scaled
    return loss + (loss - loss.detach()) * 1e6 if (t == "c" and i == 0) else loss


@pytest.mark.parametrize("method", [GradDrop(), DBMTL(), DBMTL(source="representation")], ids=repr)
def test_fp16_overflow_falls_back_and_the_scaler_skips(tmp_path, method):
    method = copy.deepcopy(method)
    net = TinyNet(loss_hook=_huge_gradient_once, optimizer={"name": "sgd", "lr": 0.05})
    first = params(net)
    steps = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            scaler = trainer.precision_plugin.scaler
            seen = bool(getattr(method, "_seen", torch.zeros(1)).any())
            steps.append((scaler.get_scale(), float(method._fallbacks), params(pl_module), seen))

    trainer(tmp_path, [method, Spy()], max_epochs=1, **FP16).fit(net, loader())
    scale0, fallbacks0, after0, seen0 = steps[0]
    assert not seen0  # DB-MTL: the overflow step left the EMA untouched
    assert fallbacks0 == 1 and method._fallbacks.item() == 1
    assert scale0 < 65536.0  # the GradScaler saw the overflow and skipped the step
    for k, v in first.items():
        torch.testing.assert_close(after0[k], v, rtol=0, atol=0, msg=k)
    assert all(torch.isfinite(v).all() for v in steps[-1][2].values())
    if isinstance(method, DBMTL):
        assert method._seen.all() and torch.isfinite(method._ema).all()


# ---------------------------------------------------------------------------- clear errors
def test_graddrop_needs_the_marked_representation(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"shared_representation\(self.trunk"):
        _fit(tmp_path, [GradDrop()], marked=False)


def test_dbmtl_representation_source_needs_the_marker(tmp_path):
    with pytest.raises(MisconfigurationException, match="did not mark it"):
        _fit(tmp_path, [DBMTL(source="representation")], marked=False)


def test_dbmtl_nonpositive_loss_names_the_task(tmp_path):
    hook = lambda i, t, loss: loss * 0.0 if (t == "b" and i == 2) else loss  # noqa: E731
    net = TinyNet(loss_hook=hook)
    with pytest.raises(
        ValueError,
        match=r"DBMTL needs positive task losses \(it takes log L_i\), but got loss 0 for task 'b' at epoch 0, batch 2 \(global step 2\)",
    ):
        trainer(tmp_path, [DBMTL()], max_epochs=1).fit(net, loader())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: GradDrop(leak=1.5), "leak"),
        (lambda: GradDrop(leak="0.1"), "leak"),
        (lambda: GradDrop(seed=-1), "seed"),
        (lambda: DBMTL(beta=1.0), "beta"),
        (lambda: DBMTL(source="rep"), "source"),
    ],
)
def test_invalid_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_graddrop_leak_per_task_must_match_the_tasks(tmp_path):
    with pytest.raises(ValueError, match="2 leak values but the module has 3 tasks"):
        _fit(tmp_path, [GradDrop(leak=[0.1, 0.2])])


def test_repr_and_state_key():
    assert repr(GradDrop(leak=[0.1, 0.2], seed=4)) == "GradDrop(leak=[0.1, 0.2], seed=4)"
    assert (
        repr(DBMTL(beta=0.5, source="representation")) == "DBMTL(beta=0.5, source='representation')"
    )
    assert GradDrop(seed=1).state_key != GradDrop(seed=2).state_key
