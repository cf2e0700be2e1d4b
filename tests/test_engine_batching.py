"""The engine's batched per-task backward passes (``is_grads_batched``) equal the loop's."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _helpers import TinyNet, loader, params, trainer
from torch import Tensor, nn

from lightning_aw import DBMTL, CAGrad, GradDrop, UPGrad, engine
from lightning_aw.engine import TaskGradients, _BatchChoice
from lightning_aw.step import StepRecord


class _NoVmap(torch.autograd.Function):
    """The identity, whose backward reads a value to the host: impossible under vmap, so a
    batched backward through it raises (as an operation without a batching rule does)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad * (1.0 + 0.0 * grad.sum().item())


def _step(cut: bool, absent: int | None = None, no_vmap: bool = False, seed: int = 0):
    """A step record of a 5 -> 8 -> 8 trunk with three heads (one absent with ``absent``)."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8))
    heads = [nn.Linear(8, 1) for _ in range(3)]
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    h = trunk(x)
    if no_vmap:
        h = _NoVmap.apply(h)
    z = h.detach().requires_grad_() if cut else h
    values: list[Tensor | None] = [
        None if i == absent else ((heads[i](z).squeeze(-1) - y[:, i]) ** 2).mean() for i in range(3)
    ]
    present = [v is not None for v in values]
    zero = torch.zeros(())
    losses = torch.stack([zero if v is None else v for v in values])
    step = StepRecord(
        tasks=("a", "b", "c"),
        losses=losses,
        task_losses=tuple(values),
        present=torch.tensor(present),
        present_list=tuple(present),
        batch=None,
        batch_idx=0,
        representation=z if cut else None,
        representation_graph=h if cut else None,
        trainer=None,
    )
    return step, list(trunk.parameters())


def _grads(step: StepRecord, params: list[Tensor], mode: str, owner: object = "test"):
    engine = TaskGradients(step, owner)
    engine.batching = mode  # type: ignore[assignment]
    if step.representation_graph is None:
        return engine.on_parameters_scaled(params)
    return engine.through_representation_scaled(engine.on_representation_scaled(), params)


def _assert_same(a, b) -> None:
    assert [r is None for r in a] == [r is None for r in b]
    for ra, rb in zip(a, b, strict=True):
        if ra is not None:
            for ga, gb in zip(ra, rb, strict=True):
                torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cut", [True, False], ids=["through-representation", "parameters"])
@pytest.mark.parametrize("absent", [None, 1])
def test_batched_backward_equals_the_loop(cut, absent):
    step, trunk = _step(cut, absent)
    loop = _grads(step, trunk, "loop")
    batched = _grads(step, trunk, "batched")
    _assert_same(batched, loop)
    # and the loop equals plain autograd, one task at a time (independent of the engine)
    for i, value in enumerate(step.task_losses):
        if value is None:
            assert loop[i] is None
            continue
        if cut:  # chained by hand: into the representation, then through the trunk
            (rep_grad,) = torch.autograd.grad(value, step.representation, retain_graph=True)
            ref = torch.autograd.grad(
                step.representation_graph, trunk, grad_outputs=rep_grad, retain_graph=True
            )
        else:
            ref = torch.autograd.grad(value, trunk, retain_graph=True)
        for g, r in zip(loop[i], ref, strict=True):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("absent", [None, 1])
def test_batched_layer_norms_equal_the_loop(absent):
    step, trunk = _step(False, absent)
    norms = {}
    for mode in ("loop", "batched"):
        engine = TaskGradients(step, "test")
        engine.batching = mode  # type: ignore[assignment]
        norms[mode] = engine.layer_norms(trunk[2])
    torch.testing.assert_close(norms["batched"], norms["loop"])
    for i, value in enumerate(step.task_losses):  # independent: autograd, one task at a time
        expected = (
            0.0
            if value is None
            else torch.autograd.grad(value, trunk[2], retain_graph=True)[0].norm()
        )
        torch.testing.assert_close(norms["loop"][i], torch.as_tensor(expected))


class _Owner:
    """A method stand-in the engine can remember a choice for."""


@pytest.fixture
def nondeterministic(monkeypatch):
    """The timed choice on this CPU (by default it times only on CUDA devices), deterministic
    algorithms off (a Trainer(deterministic=True) of another test may have left them on),
    restored afterwards."""
    monkeypatch.setattr(engine, "_TIMED_DEVICES", frozenset({"cpu", "cuda"}))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.usefixtures("nondeterministic")
@pytest.mark.parametrize("cut", [True, False], ids=["through-representation", "parameters"])
def test_auto_times_both_then_keeps_one(cut):
    owner = _Owner()
    step, trunk = _step(cut)
    reference = _grads(step, trunk, "loop")
    calls = _BatchChoice.warmup + 2 * _BatchChoice.probes
    for _ in range(calls + 2):  # every call, probing or decided, gives the loop's result
        _assert_same(_grads(step, trunk, "auto", owner), reference)
    (choice,) = _BatchChoice._registry[owner].values()
    assert choice.mode in ("loop", "batched")
    assert len(choice.times["loop"]) == len(choice.times["batched"]) == _BatchChoice.probes


def test_auto_keeps_the_loop_on_the_cpu():
    """On the CPU the batched backward never won: "auto" uses the loop, without timing."""
    owner = _Owner()
    step, trunk = _step(True)
    reference = _grads(step, trunk, "loop")
    for _ in range(_BatchChoice.warmup + 2 * _BatchChoice.probes + 1):
        out = _grads(step, trunk, "auto", owner)
        for ra, rb in zip(out, reference, strict=True):  # bitwise: the same path
            assert all(torch.equal(a, b) for a, b in zip(ra, rb, strict=True))
    assert owner not in _BatchChoice._registry  # no choice was started


def test_auto_keeps_the_loop_under_deterministic_algorithms(monkeypatch):
    """A timed choice could differ between two runs: with deterministic algorithms on
    (``Trainer(deterministic=True)``) "auto" never probes the batched backward."""
    monkeypatch.setattr(engine, "_TIMED_DEVICES", frozenset({"cpu", "cuda"}))
    owner = _Owner()
    step, trunk = _step(False)
    reference = _grads(step, trunk, "loop")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(_BatchChoice.warmup + 2 * _BatchChoice.probes + 1):
            out = _grads(step, trunk, "auto", owner)
            for ra, rb in zip(out, reference, strict=True):  # bitwise: the same path
                assert all(torch.equal(a, b) for a, b in zip(ra, rb, strict=True))
    finally:
        torch.use_deterministic_algorithms(was)
    assert owner not in _BatchChoice._registry  # no choice was started


@pytest.mark.usefixtures("nondeterministic")
@pytest.mark.parametrize("cut", [True, False], ids=["through-representation", "parameters"])
def test_auto_falls_back_to_the_loop_when_the_batched_backward_fails(cut):
    step, trunk = _step(cut, no_vmap=True)
    with pytest.raises(RuntimeError):  # the premise: vmap cannot run this backward
        _grads(step, trunk, "batched")
    owner = _Owner()
    reference = _grads(step, trunk, "loop")
    for _ in range(3):
        _assert_same(_grads(step, trunk, "auto", owner), reference)
    (choice,) = _BatchChoice._registry[owner].values()
    assert choice.mode == "loop"  # remembered: the batched backward is not tried again


def test_an_owner_that_cannot_be_remembered_uses_the_loop():
    step, trunk = _step(True)
    _assert_same(_grads(step, trunk, "auto", owner="a string"), _grads(step, trunk, "loop"))


@pytest.mark.parametrize(
    "make",
    [
        lambda: CAGrad(),
        lambda: UPGrad(),
        lambda: DBMTL(),
    ],
    ids=["CAGrad", "UPGrad", "DBMTL"],
)
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_training_is_the_same_batched_or_looped(tmp_path, monkeypatch, make, marked):
    results = {}
    for mode in ("loop", "batched"):
        monkeypatch.setattr(TaskGradients, "batching", mode)
        net = TinyNet(mark_representation=marked, loss_hook=lambda i, t, loss: loss + 0.1)
        method = make()
        trainer(tmp_path, [method], max_epochs=1).fit(net, loader(n=128))
        results[mode] = (params(net), method.current_weights().clone())
    for key, value in results["loop"][0].items():
        torch.testing.assert_close(results["batched"][0][key], value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results["batched"][1], results["loop"][1], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------- multi-tensor helpers of the engine
@pytest.mark.parametrize("block", [1, 7, 1 << 20])
def test_gram_by_layer_joins_layers_and_equals_the_flat_gram(monkeypatch, block):
    """Consecutive layers share one product up to `_GRAM_BLOCK` entries (1: every layer alone,
    7: groups of several small layers and a layer larger than a block); absent tasks give zero
    rows and columns; the result is the Gram matrix of the flattened gradients."""
    monkeypatch.setattr(engine, "_GRAM_BLOCK", block)
    torch.manual_seed(0)
    shapes = [(2, 2), (3,), (1,), (4, 3), (2,)]
    per_task = [[torch.randn(s) for s in shapes] for _ in range(4)]
    per_task[2] = None  # an absent task
    got = engine.gram_by_layer(per_task, range(len(shapes)), 4)
    flat = torch.stack(
        [
            torch.zeros(sum(torch.Size(s).numel() for s in shapes), dtype=torch.float64)
            if r is None
            else torch.cat([g.double().reshape(-1) for g in r])
            for r in per_task
        ]
    )
    torch.testing.assert_close(got.double(), flat @ flat.T, rtol=1e-6, atol=1e-6)
    assert got[2].abs().sum() == 0 and got[:, 2].abs().sum() == 0
    partial = engine.gram_by_layer(per_task, [0, 3], 4)  # only some layers
    sub = torch.stack(
        [
            torch.zeros(16) if r is None else torch.cat([r[0].reshape(-1), r[3].reshape(-1)])
            for r in per_task
        ]
    )
    torch.testing.assert_close(partial, sub @ sub.T, rtol=1e-6, atol=1e-6)


def test_combine_per_task_sums_the_weighted_rows_in_float32():
    torch.manual_seed(1)
    rows = [
        [torch.randn(3), torch.randn(2, 2)],
        None,
        [torch.randn(3).half(), torch.randn(2, 2).half()],
    ]
    coefs = torch.tensor([0.5, 9.0, -2.0])
    got = engine.combine_per_task(rows, coefs, 2)
    for j in range(2):
        want = 0.5 * rows[0][j] + -2.0 * rows[2][j].float()
        assert got[j].dtype == torch.float32
        torch.testing.assert_close(got[j], want)
    with pytest.raises(ValueError, match="at least one present task"):
        engine.combine_per_task([None, None], coefs[:2], 2)


def test_inject_hands_each_tensor_its_gradient_in_one_node():
    """One autograd node for all tensors: each gets its gradient times the incoming one (the
    loss scale / accumulation), cast to its dtype after the product (no fp16 underflow); the
    value is exactly 0 even for a non-finite gradient."""
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    ga, gb = torch.tensor([0.5, -1.0]), torch.tensor([1e-8, 2.0, 3.0])  # 1e-8 underflows in fp16
    out = engine.inject([a, b], [ga, gb])
    assert out.item() == 0.0 and out.dtype == torch.float32
    assert out.grad_fn is not None and len(out.grad_fn.next_functions) >= 2
    (out * 65536.0).backward()
    torch.testing.assert_close(a.grad, ga * 65536.0)
    assert b.grad.dtype == torch.float16
    torch.testing.assert_close(b.grad, (gb * 65536.0).half())
    assert b.grad[0] != 0  # scaled before the cast
    assert engine.inject([a], [torch.tensor([float("inf"), 1.0])]).item() == 0.0
    with pytest.raises(ValueError, match="2 tensors and 1 gradients"):
        engine.inject([a, b], [ga])


# ------------------------------------------ the heads' gradients come from the per-task passes
class _BypassNet(TinyNet):
    """TinyNet whose task 'a' also reads a parameter outside the heads and the representation
    (a learned offset on the trunk's first layer output: a path that bypasses the cut)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.offset = nn.Parameter(torch.tensor(0.3))
        self.head_calls = 0
        for head in self.heads.values():
            head.register_full_backward_hook(self._count)

    def _count(self, module, grad_in, grad_out):
        self.head_calls += 1

    def task_losses(self, batch, batch_idx):
        out = super().task_losses(batch, batch_idx)
        x, _ = batch
        out["a"] = out["a"] + self.offset * self.trunk[0](x).mean() ** 2
        return out


class _Grads(pl.Callback):
    def __init__(self):
        self.seen: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


@pytest.mark.parametrize(
    "make",
    [
        lambda: UPGrad(),
        lambda: UPGrad(frequency=2),  # steps that reuse the coefficients
        lambda: UPGrad(source="representation"),
        lambda: UPGrad(source="representation", frequency=2),
        lambda: DBMTL(),
        lambda: DBMTL(source="representation"),
        lambda: GradDrop(),
    ],
    ids=["upgrad-p", "upgrad-p-f2", "upgrad-r", "upgrad-r-f2", "dbmtl-p", "dbmtl-r", "graddrop"],
)
def test_head_gradients_from_the_per_task_passes_equal_the_combined_backward(
    tmp_path, monkeypatch, make
):
    """With a cut representation the heads' gradients are the coefficient-weighted per-task
    gradients of the passes that also give the representation's: the same gradients (every
    parameter, the bypassing one included, steps that reuse the coefficients included) as a
    second backward of the combined loss through the heads, which each head now skips."""
    runs = {}
    for reuse in (True, False):
        method = make()
        if not reuse:  # the previous path: the combined loss's backward through the heads
            monkeypatch.setattr(type(method), "_head_params", lambda self, step: None)
        net, grads = _BypassNet(), _Grads()
        t = trainer(tmp_path, [method, grads], max_steps=4)
        t.fit(net, loader())
        runs[reuse] = (grads.seen, net.head_calls)
    (new, new_calls), (old, old_calls) = runs[True], runs[False]
    assert len(new) == len(old) == 4
    for step_new, step_old in zip(new, old, strict=True):
        assert step_new["offset"].abs() > 0  # the bypassing parameter gets its gradient
        for name in step_old:
            torch.testing.assert_close(step_new[name], step_old[name], rtol=1e-5, atol=1e-7)
    assert new_calls == 4 * 3  # each head once per step
    assert old_calls == 2 * new_calls  # before: per-task pass + combined backward


def test_heads_keep_the_combined_backward_outside_full_precision(tmp_path):
    """Under bf16 autocast the per-task and the combined passes round differently (and FSDP2,
    which cannot use the per-task head gradients, must match DDP): the heads then get their
    gradients from the combined loss's backward, a second traversal."""
    net = _BypassNet()
    t = trainer(tmp_path, [UPGrad()], max_steps=2, precision="bf16-mixed")
    t.fit(net, loader())
    assert net.head_calls == 2 * 3 * 2  # two traversals per head per step
    assert net.offset.grad is not None and net.offset.grad.abs() > 0
