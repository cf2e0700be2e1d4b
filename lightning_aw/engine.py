"""The per-task-gradient engine: the one place that differentiates task losses one by one.

Every method that looks at per-task gradients (GradNorm, the gradient methods, GradDrop, DB-MTL)
and :class:`~lightning_aw.monitor.GradientConflictMonitor` take them here, from the
:class:`~lightning_aw.step.StepRecord` of the current training step:

- on the marked representation (:meth:`TaskGradients.on_representation`),
- on a list of parameters, directly or chained through the marked representation's graph
  (:meth:`TaskGradients.on_parameters`, :meth:`TaskGradients.through_representation`),
- as norms on one layer (:meth:`TaskGradients.layer_norms`, GradNorm).

What is handled here once: the fp16 GradScaler (per-task gradients are taken of the scaled
losses, so they overflow exactly when Lightning's backward does, then unscaled in float32),
gradient accumulation (:attr:`TaskGradients.accumulate`), tasks absent from the batch (``None``
rows), the checks that a present task's loss really reaches what is differentiated (a clear
error instead of silently uniform coefficients), the rank reduction of per-task statistics
(:func:`present_mean`: the mean over the ranks where each task is present, one all-reduce) and
the delivery of a method's own gradient inside Lightning's one backward (:func:`inject`,
:meth:`TaskGradients.deliver`).

Sharded parameters (FSDP2 ``fully_shard`` under Lightning's ``ModelParallelStrategy``): with an
:class:`~lightning_aw._sharding.Unsharder`, every gradient on parameters is taken with respect to
the unsharded tensors the step's forward used (the full parameter, this rank's micro-batch: what
a DDP rank computes), so the Gram matrix, its one ``T×T`` all-reduce and the coefficients are
DDP's; a method's own gradient is delivered into the same tensors and FSDP2's reduce-scatter
averages it with the rest of the gradient (:meth:`TaskGradients.deliver`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_aw._sharding import Unsharder
from lightning_aw._utils import all_reduce_sum, grad_scaler
from lightning_aw.step import StepRecord

__all__ = ["TaskGradients", "inject", "present_mean"]

BatchMode = Literal["auto", "loop", "batched"]

#: per-task scalar losses (``None`` for an absent task), each with its own graph
TaskLosses = Sequence[Tensor | None]


class TaskGradients:
    """Per-task gradients of one training step's task losses.

    Args:
        step: the step record (losses with their graph, presence, marked representation).
        owner: who asks (its ``repr`` names it in error messages).
        unsharder: maps FSDP2-sharded parameters to the unsharded tensors of this step's forward
            (``None``: one device or DDP, parameters are used as they are).

    Gradients come back per task, ``None`` for a task absent from the batch. Methods named
    ``*_scaled`` return what autograd gives for the GradScaler-scaled losses (the caller
    unscales once, after combining); the others return float32 gradients of the unscaled losses.
    None of them divides by ``accumulate_grad_batches``: Lightning divides the returned loss
    itself, so only methods that compare per-task gradients with the ones Lightning applies
    divide by :attr:`accumulate`.

    Example::

        >>> import torch
        >>> from lightning_aw.engine import TaskGradients
        >>> from lightning_aw.step import StepRecord
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> losses = torch.stack([w[0] ** 2, 3 * w.sum()])  # d/dw: [2, 0] and [3, 3]
        >>> step = StepRecord(
        ...     tasks=("a", "b"), losses=losses, task_losses=tuple(losses),
        ...     present=torch.tensor([True, True]),
        ...     present_list=(True, True), batch=None, batch_idx=0, representation=None,
        ...     representation_graph=None, trainer=None,
        ... )
        >>> engine = TaskGradients(step, owner="example")
        >>> [g[0] for g in engine.on_parameters_scaled([w])]
        [tensor([2., 0.]), tensor([3., 3.])]
        >>> engine.layer_norms(w)
        tensor([2.0000, 4.2426])
    """

    #: how per-task backward passes through the shared parameters run: ``"loop"`` (one
    #: ``autograd.grad`` per task), ``"batched"`` (one ``autograd.grad(..., is_grads_batched=True)``
    #: for all tasks: a vmap over the backward) or ``"auto"`` (default: timed once, see
    #: :class:`_BatchChoice`, on CUDA devices; the loop on the CPU, where it was never slower,
    #: and when deterministic algorithms are on, e.g. under ``Trainer(deterministic=True)``,
    #: since a timed choice may differ between two runs). Set it on the class or on an instance
    #: before use.
    batching: BatchMode = "auto"

    def __init__(self, step: StepRecord, owner: object, unsharder: Unsharder | None = None) -> None:
        self.step = step
        self.owner = owner
        self.unsharder = unsharder
        trainer = step.trainer
        self.scaler = None if trainer is None else grad_scaler(trainer)
        device = step.losses.device
        #: the GradScaler's scale as a 0-d device tensor (``None`` without fp16 loss scaling)
        self.scale: Tensor | None = (
            None if self.scaler is None else self.scaler.scale(torch.ones((), device=device))
        )
        self.accumulate = step.accumulate

    # ------------------------------------------------------------------ helpers
    def forward_tensors(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The tensors this step's forward used for ``params``: the parameters themselves, or
        (FSDP2) their unsharded copies. Gradients are taken with respect to these."""
        if self.unsharder is None:
            return list(params)
        return self.unsharder.resolve(params)  # type: ignore[return-value]

    def deliver(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
        """:func:`inject` of a method's own gradients ``grads`` on the shared ``params``.

        Under FSDP2 they go into the unsharded tensors of this step's forward, and when the
        heads ran on a cut representation a zero gradient also flows back through it, so
        Lightning's backward enters the trunk's sharded modules and their reduce-scatter
        carries the delivered gradient to the shards (averaged over the ranks, as DDP does).
        """
        if self.unsharder is None:
            return inject(params, grads)
        total = inject(self.forward_tensors(params), grads)
        graph = self.step.representation_graph
        if graph is not None:
            total = total + inject([graph], [torch.zeros_like(graph)])
        return total

    def _missing(self, i: int, what: str) -> MisconfigurationException:
        """The error for a present task whose loss reaches none of ``what`` (the guard against
        silently empty per-task gradients, e.g. on sharded parameters)."""
        strategy = type(getattr(self.step.trainer, "strategy", None)).__name__
        return MisconfigurationException(
            f"{self.owner!r}: the per-task gradient of task '{self.step.tasks[i]}' on {what} is "
            f"missing: autograd finds no path from its loss to them (strategy: {strategy}). "
            "Return from `shared_parameters()` the parameters every task's forward goes "
            "through; with sharded parameters the library needs FSDP2's `fully_shard` "
            "(ModelParallelStrategy with tensor_parallel_size=1), or use "
            "source='representation'."
        )

    def scaled(self, loss: Tensor) -> Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale(self, x: Tensor, accumulate: int = 1) -> Tensor:
        """``x`` in float32, divided by the loss scale (and by ``accumulate``), in one division."""
        x = x.float()
        if self.scale is None:
            return x if accumulate == 1 else x / accumulate
        return x / self.scale if accumulate == 1 else x / (self.scale * accumulate)

    # ------------------------------------------------------------------ representation
    def representation(self) -> Tensor:
        """The tensor the heads read (a leaf copy when the method cuts the representation)."""
        rep = self.step.representation
        if rep is None:
            raise MisconfigurationException(
                f"{self.owner!r} works on the shared representation, but the module did not mark "
                "it: in `task_losses`, pass the trunk's output (the tensor every head reads) "
                "through it, `h = self.shared_representation(self.trunk(x))`."
            )
        return rep

    def on_representation_scaled(self, losses: TaskLosses | None = None) -> list[Tensor | None]:
        """Gradients of the (scaled) present ``losses`` (default: the step's
        :attr:`~lightning_aw.step.StepRecord.task_losses`, one scalar per task: differentiating
        each on its own never traverses the other tasks' heads) with respect to the marked
        representation, in its dtype; ``None`` for absent tasks.

        Raises:
            MisconfigurationException: a present task's loss does not depend on the marked
                representation (its head reads another tensor).
        """
        leaf = self.representation()
        losses = self.step.task_losses if losses is None else losses
        rows: list[Tensor | None] = []
        for i, here in enumerate(self.step.present_list):
            g = None
            if here:
                (g,) = torch.autograd.grad(
                    self.scaled(losses[i]), leaf, retain_graph=True, allow_unused=True
                )
                if g is None:
                    raise self._not_on_representation(i)
            rows.append(g)
        return rows

    def _not_on_representation(self, i: int) -> MisconfigurationException:
        return MisconfigurationException(
            f"{self.owner!r}: the loss of task '{self.step.tasks[i]}' does not depend on the "
            "tensor marked with `shared_representation()`, so its gradient there is missing. "
            "Make that task's head read the marked tensor "
            "(`h = self.shared_representation(self.trunk(x))`, then every head on `h`), or use "
            "source='parameters'."
        )

    def on_representation_and_heads_scaled(
        self, heads: Sequence[Tensor], losses: TaskLosses | None = None
    ) -> tuple[list[Tensor | None], list[list[Tensor | None] | None]]:
        """:meth:`on_representation_scaled`, and in the same backward passes each present task's
        (scaled) gradients on ``heads`` (parameters its loss reaches without going through the
        cut representation: its head; ``None`` where one is not reached).

        Combining these per-task head gradients with the coefficients replaces a second
        backward pass through the heads (the combined loss's), so a method on a cut
        representation traverses each head once per step, as the plain summed loss does.
        ``losses``: as in :meth:`on_representation_scaled`.
        """
        leaf = self.representation()
        losses = self.step.task_losses if losses is None else losses
        rows: list[Tensor | None] = []
        head_rows: list[list[Tensor | None] | None] = []
        for i, here in enumerate(self.step.present_list):
            if not here:
                rows.append(None)
                head_rows.append(None)
                continue
            g, *gh = torch.autograd.grad(
                self.scaled(losses[i]),  # type: ignore[arg-type]
                [leaf, *heads],
                retain_graph=True,
                allow_unused=True,
            )
            if g is None:
                raise self._not_on_representation(i)
            rows.append(g)
            head_rows.append(gh)
        return rows, head_rows

    def combined_on_representation_and_heads_scaled(
        self, total: Tensor, heads: Sequence[Tensor]
    ) -> tuple[Tensor, list[Tensor | None]]:
        """The gradients of one (scaled) combined loss on the marked representation (zeros when
        it does not reach it) and on ``heads`` (``None`` where not reached), in one backward."""
        leaf = self.representation()
        g, *gh = torch.autograd.grad(
            self.scaled(total), [leaf, *heads], retain_graph=True, allow_unused=True
        )
        return (torch.zeros_like(leaf) if g is None else g), gh

    def stack(self, rows: Sequence[Tensor | None], like: Tensor) -> Tensor:
        """``[T, *like.shape]`` float32, unscaled, zero rows for absent tasks."""
        zero = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        return self.unscale(torch.stack([zero if r is None else r.float() for r in rows]))

    def on_representation(self, losses: TaskLosses | None = None) -> Tensor:
        """``[T, *z.shape]`` float32 unscaled gradients on the marked representation ``z``."""
        return self.stack(self.on_representation_scaled(losses), self.representation())

    # ------------------------------------------------------------------ parameters
    def on_parameters_scaled(
        self,
        params: Sequence[Tensor],
        losses: TaskLosses | None = None,
        names: Sequence[str] | None = None,
    ) -> list[list[Tensor] | None]:
        """Per present task, the gradients of its (scaled) loss on ``params`` (zeros where a
        parameter is not reached), in the parameters' dtype; ``None`` for absent tasks.

        When the heads ran on a leaf copy of the representation, the gradient is chained through
        the trunk's graph, plus any path from the loss to ``params`` that bypasses it. With
        ``names`` (one per parameter), a parameter that no present task reaches is an error
        (:meth:`check_reached`).
        """
        step = self.step
        losses = step.task_losses if losses is None else losses
        params = self.forward_tensors(params)
        leaf, graph = step.representation, step.representation_graph
        if graph is None and names is None:
            # no cut representation, and the check of which parameter each task reaches is done
            # (it needs one backward per task): the passes may run batched
            return self._on_parameters_direct(params, losses)
        raw: list[Sequence[Tensor | None] | None] = []
        for i, here in enumerate(step.present_list):
            if not here:
                raw.append(None)
                continue
            loss = self.scaled(losses[i])
            if graph is not None and leaf is not None:
                (g_leaf,) = torch.autograd.grad(loss, leaf, retain_graph=True, allow_unused=True)
                outputs, grad_outputs = [loss], [torch.ones_like(loss)]
                if g_leaf is not None:
                    outputs.append(graph)
                    grad_outputs.append(g_leaf.to(graph.dtype))
                grads = torch.autograd.grad(
                    outputs, list(params), grad_outputs, retain_graph=True, allow_unused=True
                )
            else:
                grads = torch.autograd.grad(
                    loss, list(params), retain_graph=True, allow_unused=True
                )
            if all(g is None for g in grads):  # host-side: no path from the loss at all
                raise self._missing(i, "the shared parameters")
            raw.append(grads)
        if names is not None:
            self.check_reached(raw, names)
        return [None if r is None else _filled(r, params) for r in raw]

    def _on_parameters_direct(
        self, params: Sequence[Tensor], losses: TaskLosses
    ) -> list[list[Tensor] | None]:
        """:meth:`on_parameters_scaled` without a cut representation, one backward per task or
        one batched backward (:attr:`batching`)."""
        present = self.step.present_list
        index = [i for i, here in enumerate(present) if here]

        def loop() -> list[Sequence[Tensor | None]]:
            return [
                torch.autograd.grad(
                    self.scaled(losses[i]),  # type: ignore[arg-type]
                    list(params),
                    retain_graph=True,
                    allow_unused=True,
                )
                for i in index
            ]

        def batched() -> list[Sequence[Tensor | None]]:
            return _batched_grad(self._stacked(losses, index), params)

        raw = self._per_task(loop, batched, "parameters", len(index))
        out: list[list[Tensor] | None] = [None] * len(present)
        for k, i in enumerate(index):
            if all(g is None for g in raw[k]):  # host-side: no path from the loss at all
                raise self._missing(i, "the shared parameters")
            out[i] = _filled(raw[k], params)
        return out

    def through_representation_scaled(
        self, rows: Sequence[Tensor | None], targets: Sequence[Tensor]
    ) -> list[list[Tensor] | None]:
        """Chain per-task (scaled) representation gradients ``rows`` through the trunk's graph
        onto ``targets`` (the parameters that produce the representation).

        The ``T`` backward passes through the trunk run one by one or as one batched backward
        (:attr:`batching`); the results are the same (to float rounding).
        """
        graph = self.step.representation_graph
        if graph is None:
            raise ValueError("through_representation_scaled needs a cut representation")
        targets = self.forward_tensors(targets)
        index = [i for i, r in enumerate(rows) if r is not None]
        out: list[list[Tensor] | None] = [None] * len(rows)
        if not index:
            return out

        def loop() -> list[Sequence[Tensor | None]]:
            return [
                torch.autograd.grad(
                    graph, list(targets), grad_outputs=rows[i], retain_graph=True, allow_unused=True
                )
                for i in index
            ]

        def batched() -> list[Sequence[Tensor | None]]:
            return _batched_grad(graph, targets, torch.stack([rows[i] for i in index]))  # type: ignore[misc]

        raw = self._per_task(loop, batched, "through_representation", len(index))
        for k, i in enumerate(index):
            if all(g is None for g in raw[k]):  # host-side: no path from the loss at all
                raise self._missing(i, "the parameters that produce the representation")
            out[i] = _filled(raw[k], targets)
        return out

    def _stacked(self, losses: Sequence[Tensor | None], index: Sequence[int]) -> Tensor:
        """The (scaled) losses of the tasks in ``index`` as one vector, for a batched backward."""
        return torch.stack([self.scaled(losses[i]).reshape(()) for i in index])  # type: ignore[arg-type]

    def _per_task(
        self,
        loop: Callable[[], list[Sequence[Tensor | None]]],
        batched: Callable[[], list[Sequence[Tensor | None]]],
        kind: str,
        num: int,
    ) -> list[Sequence[Tensor | None]]:
        """Run the per-task backward passes one by one (``loop``) or batched, as chosen for this
        owner and ``kind`` (:class:`_BatchChoice`); a batched backward that fails (an operation
        without a vmap rule) falls back to the loop, for good."""
        mode = self.batching
        if num < 2 or self.unsharder is not None or mode == "loop":
            return loop()
        if mode == "batched":
            return batched()
        if (
            self.step.losses.device.type not in _TIMED_DEVICES
            or torch.are_deterministic_algorithms_enabled()
        ):
            # on the CPU the batched backward never won (docs/benchmarks.md), and a timed
            # choice could differ between two runs (the two paths round differently):
            # `Trainer(deterministic=True)` keeps the loop, bit-reproducible
            return loop()
        choice = _BatchChoice.of(self.owner, kind, self.step.trainer)
        if choice is None:
            return loop()
        return choice.run(loop, batched, self.step)

    def combined_on_representation_scaled(self, total: Tensor) -> Tensor:
        """The gradient of one (scaled) combined loss on the marked representation, in its dtype
        (zeros when it does not reach it): reused coefficients need no per-task gradients."""
        leaf = self.representation()
        (g,) = torch.autograd.grad(self.scaled(total), leaf, retain_graph=True, allow_unused=True)
        return torch.zeros_like(leaf) if g is None else g

    def check_reached(
        self, per_task: Sequence[Sequence[Tensor | None] | None], names: Sequence[str]
    ) -> None:
        """Raise when a parameter in ``names`` is not reached by every present task's loss.

        Called on raw ``autograd.grad`` results (``None`` = not reached) at the first step a
        method computes, so a parameter listed as shared that a task loss does not go through (an
        unused layer, a task's head) is an error instead of silently zero entries in the task
        gradients, which skew every coefficient.
        """
        missing: dict[str, list[str]] = {}
        for i, row in enumerate(per_task):
            if row is None:
                continue
            for j, g in enumerate(row):
                if g is None:
                    missing.setdefault(names[j], []).append(self.step.tasks[i])
        if missing:
            shown = dict(list(missing.items())[:4])
            more = f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""
            raise MisconfigurationException(
                f"{self.owner!r}: the shared parameter(s) {shown}{more} get no gradient from "
                "the task(s) listed, so their per-task gradients there are missing. Return from "
                "`shared_parameters()` only the parameters every task's loss goes through (the "
                "trunk), not unused layers or task heads."
            )

    def upstream_parameters(self, shared: Sequence[Tensor], module: Any) -> list[Tensor]:
        """``shared`` followed by the other trainable parameters of ``module`` that produce the
        marked representation (found by one probe backward through the trunk's graph).

        Raises:
            MisconfigurationException: a shared parameter does not produce the representation.
        """
        graph = self.step.representation_graph
        if graph is None:
            raise ValueError("upstream_parameters needs a cut representation")
        shared_ids = {id(p) for p in shared}
        others = [p for p in module.parameters() if p.requires_grad and id(p) not in shared_ids]
        inputs = self.forward_tensors(shared)
        if self.unsharder is None:
            inputs += others
        else:  # sharded parameters that this forward did not all-gather do not produce it
            found = self.unsharder.resolve(others, strict=False)
            others = [p for p, u in zip(others, found, strict=True) if u is not None]
            inputs += [u for u in found if u is not None]
        probe = torch.autograd.grad(graph.sum(), inputs, retain_graph=True, allow_unused=True)
        missing = [i for i, g in enumerate(probe[: len(shared)]) if g is None]
        if missing:
            names = {id(p): n for n, p in module.named_parameters()}
            raise MisconfigurationException(
                f"{self.owner!r}: shared_parameters() includes "
                f"{[names.get(id(shared[i]), '?') for i in missing]}, which do not produce the "
                "tensor passed to shared_representation(). Return only the trunk's parameters "
                "there, or mark the trunk's output."
            )
        extra = [p for p, g in zip(others, probe[len(shared) :], strict=True) if g is not None]
        return [*shared, *extra]

    # ------------------------------------------------------------------ one layer
    def layer_norms(self, param: Tensor) -> Tensor:
        """``[T]`` float32 norms of the per-task gradients on ``param``, unscaled (0 for absent
        tasks): GradNorm's :math:`G_i`.

        Raises:
            MisconfigurationException: a present task's loss does not reach ``param``.
        """
        losses = self.step.task_losses
        zero = self.step.losses.new_zeros(())
        (param,) = self.forward_tensors([param])
        index = [i for i, here in enumerate(self.step.present_list) if here]

        def loop() -> list[Sequence[Tensor | None]]:
            return [
                torch.autograd.grad(
                    self.scaled(losses[i]),  # type: ignore[arg-type]
                    param,
                    retain_graph=True,
                    allow_unused=True,
                )
                for i in index
            ]

        def batched() -> list[Sequence[Tensor | None]]:
            return _batched_grad(self._stacked(losses, index), [param])

        raw = self._per_task(loop, batched, "layer", len(index))
        norms = [zero] * len(self.step.present_list)
        for k, i in enumerate(index):
            grad = raw[k][0]
            if grad is None:
                raise MisconfigurationException(
                    f"{self.owner!r}: the loss of task '{self.step.tasks[i]}' does not reach the "
                    f"layer it measures (shape {tuple(param.shape)}), so its gradient norm there "
                    "is missing. Choose a shared layer every task goes through: override "
                    "`gradnorm_parameter()` or pass GradNorm(layer='name.of.weight')."
                )
            norms[i] = torch.linalg.vector_norm(grad.float())
        return self.unscale(torch.stack(norms))


def _batched_grad(
    output: Tensor, inputs: Sequence[Tensor], grad_outputs: Tensor | None = None
) -> list[Sequence[Tensor | None]]:
    """One backward for several cotangents (``is_grads_batched``, a vmap over the backward):
    row ``k`` holds the gradients of ``inputs`` for ``grad_outputs[k]`` (default: the identity,
    i.e. of each entry of a vector ``output``)."""
    if grad_outputs is None:
        grad_outputs = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
    grads = torch.autograd.grad(
        output,
        list(inputs),
        grad_outputs=grad_outputs,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    return [[None if g is None else g[k] for g in grads] for k in range(grad_outputs.shape[0])]


#: the devices where ``batching="auto"`` times the batched backward against the loop (on the
#: CPU the loop was never slower: 1.05-1.21x for the batched pass, docs/benchmarks.md)
_TIMED_DEVICES = frozenset({"cuda"})


class _BatchChoice:
    """Whether one owner's per-task backward passes of one kind run batched, decided once.

    ``torch.autograd.grad(..., is_grads_batched=True)`` runs the ``T`` backward passes as one
    (vmap over the backward): far fewer kernel launches and Python calls, which pays on an
    accelerator and for small models, while on a CPU a large batched convolution backward can be
    slower than ``T`` ordinary ones. So the first calls time both: the first ``warmup`` calls
    alternate the two untimed (the first call of each also checks that the batched backward
    works: an operation without a batching rule raises, and the loop is then used for good), the
    next ``2 * probes`` alternate them timed (synchronising the device around each: only then),
    and the batched one is used from then on only when it was clearly faster (its minimum over
    the probes below ``margin`` times the loop's), else the loop. Under DDP rank 0
    decides and broadcasts the choice, so every rank runs the same code (the results agree to
    float rounding either way).
    """

    warmup = 2
    probes = 3
    #: the batched backward is kept only when it is at least this much faster (timing noise on
    #: a shared machine must not trade the loop for a pass that is no faster)
    margin = 0.9
    _registry: ClassVar[weakref.WeakKeyDictionary[Any, dict[tuple[str, int], _BatchChoice]]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self) -> None:
        self.mode: str | None = None  # "loop" or "batched" once decided
        self.calls = 0
        self.times: dict[str, list[float]] = {"loop": [], "batched": []}

    @classmethod
    def of(cls, owner: object, kind: str, trainer: Any) -> _BatchChoice | None:
        """The choice of ``owner`` for ``kind`` under ``trainer``'s current module (``None`` when
        ``owner`` cannot be remembered: then the loop is used)."""
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        try:
            table = cls._registry.setdefault(owner, {})
        except TypeError:  # not weak-referenceable (e.g. a string)
            return None
        key = (kind, id(module))
        choice = table.get(key)
        if choice is None:
            choice = table[key] = cls()
        return choice

    def run(
        self,
        loop: Callable[[], list[Sequence[Tensor | None]]],
        batched: Callable[[], list[Sequence[Tensor | None]]],
        step: StepRecord,
    ) -> list[Sequence[Tensor | None]]:
        if self.mode == "loop":
            return loop()
        if self.mode == "batched":
            try:
                return batched()
            except RuntimeError:  # an operation without a vmap rule appeared later
                self._decide(step, "loop")
                return loop()
        call, self.calls = self.calls, self.calls + 1
        which = "batched" if call % 2 else "loop"
        if call < self.warmup:
            if which == "loop":
                return loop()
            try:
                return batched()
            except RuntimeError:  # no vmap rule for an operation of this graph
                self._decide(step, "loop")
                return loop()
        device = step.losses.device
        _synchronize(device)
        start = time.perf_counter()
        try:
            out = batched() if which == "batched" else loop()
        except RuntimeError:
            if which == "loop":
                raise
            self._decide(step, "loop")
            return loop()
        _synchronize(device)
        self.times[which].append(time.perf_counter() - start)
        if call + 1 >= self.warmup + 2 * self.probes:
            faster = min(self.times["batched"]) < self.margin * min(self.times["loop"])
            self._decide(step, "batched" if faster else "loop")
        return out

    def _decide(self, step: StepRecord, mode: str) -> None:
        trainer = step.trainer
        if trainer is not None and trainer.world_size > 1:
            mode = trainer.strategy.broadcast(mode, src=0)
        self.mode = mode


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _filled(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def flatten(per_task: Sequence[Sequence[Tensor] | None], params: Sequence[Tensor]) -> Tensor:
    """``[T, P]`` float32 rows (zeros for absent tasks) from per-task parameter gradients."""
    size = sum(p.numel() for p in params)
    device = params[0].device
    return torch.stack(
        [
            torch.zeros(size, device=device)
            if r is None
            else torch.cat([g.reshape(-1).float() for g in r[: len(params)]])
            for r in per_task
        ]
    )


#: :func:`gram_by_layer` joins consecutive layers into one product until a block holds this many
#: entries per task (fewer, larger products: a deep trunk has many small tensors; the extra
#: memory is at most ``T`` times this many floats)
_GRAM_BLOCK = 1 << 20


def gram_by_layer(
    per_task: Sequence[Sequence[Tensor] | None], layers: Sequence[int], num: int
) -> Tensor:
    """The ``[T, T]`` float32 Gram matrix of per-task gradients, formed layer by layer (no
    ``[T, P]`` copy: consecutive small layers share one product); zero rows and columns for
    absent tasks."""
    index = [i for i, r in enumerate(per_task) if r is not None]
    device = next(r for r in per_task if r is not None)[0].device
    gram = torch.zeros(num, num, device=device)
    if not index:
        return gram
    rows = [per_task[i] for i in index]
    sub: Tensor | None = None
    group: list[int] = []
    size = 0

    def product(group: list[int]) -> Tensor:
        if len(group) == 1:
            block = torch.stack([r[group[0]].reshape(-1) for r in rows])  # type: ignore[index]
        else:
            block = torch.stack(
                [torch.cat([r[j].reshape(-1) for j in group]) for r in rows]  # type: ignore[index]
            )
        block = block.float()
        return block @ block.T

    for j in layers:
        numel = rows[0][j].numel()  # type: ignore[index]
        if group and size + numel > _GRAM_BLOCK:
            sub = product(group) if sub is None else sub + product(group)
            group, size = [], 0
        group.append(j)
        size += numel
    if group:
        sub = product(group) if sub is None else sub + product(group)
    assert sub is not None
    if len(index) == num:
        return sub
    ix = torch.tensor(index, device=device)
    return gram.index_put_((ix[:, None], ix[None, :]), sub)


def combine_per_task(
    per_task: Sequence[Sequence[Tensor] | None], coefs: Tensor, num_tensors: int
) -> list[Tensor]:
    """``sum_t coefs[t] * per_task[t][j]`` in float32 for each of the ``num_tensors`` tensors
    (absent tasks, ``None``, left out): ``T`` fused multi-tensor operations, not ``T`` per tensor.
    """
    rows = [(t, r) for t, r in enumerate(per_task) if r is not None]
    c = coefs.float()
    if not rows:
        raise ValueError("combine_per_task needs at least one present task")
    out: list[Tensor] | None = None
    for t, r in rows:
        tensors = [g if g.dtype == torch.float32 else g.float() for g in r[:num_tensors]]
        if out is None:
            out = list(torch._foreach_mul(tensors, c[t]))
        else:
            torch._foreach_add_(out, torch._foreach_mul(tensors, c[t]))
    assert out is not None
    return out


def present_mean(
    trainer: Any, values: Tensor, mask: Tensor, *extra: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The mean of per-task ``values`` ``[T, ...]`` over the ranks where each task is present.

    One all-reduce carries ``values * mask``, ``mask`` and any ``extra`` tensors (summed). On
    one process it is the identity (``values`` where present).

    Returns:
        ``(mean, count, extra_sums)``: the per-task mean ``[T, ...]`` (0 where no rank has the
        task), the number of ranks ``[T]`` that have it, the summed ``extra`` tensors.

    Example::

        >>> import torch
        >>> from lightning_aw.engine import present_mean
        >>> values, mask = torch.tensor([[1.0, 2.0], [5.0, 5.0]]), torch.tensor([True, False])
        >>> mean, count, _ = present_mean(None, values, mask)  # one process: no reduction
        >>> mean, count
        (tensor([[1., 2.],
                [0., 0.]]), tensor([1., 0.]))
    """
    m = mask.to(values.dtype)
    shape = (-1,) + (1,) * (values.dim() - 1)
    sums = all_reduce_sum(trainer, values * m.view(shape), m, *extra)
    total, count, rest = sums[0], sums[1], sums[2:]
    return total / count.clamp_min(1.0).view(shape), count, rest


class _Inject(torch.autograd.Function):
    """A float32 zero whose gradient with respect to each ``xs[j]`` is ``gs[j]`` (times the
    incoming one), for all the tensors in one autograd node.

    The same as the surrogate ``sum_j <g_j, x_j> - <g_j, x_j>.detach()``, but its value is
    exactly 0 even when a ``g_j`` is not finite (an fp16 overflow step), and the incoming gradient
    (the loss scale divided by ``accumulate_grad_batches``) multiplies each ``g_j`` in float32
    before the cast to ``x_j``'s dtype, so a small unscaled ``g_j`` does not underflow in float16.
    Called as ``_Inject.apply(n, *xs, *gs)``; one node for any number of tensors keeps the cost
    of a step independent of how many parameter tensors the trunk has.
    """

    @staticmethod
    def forward(ctx: Any, n: int, *tensors: Tensor) -> Tensor:
        xs, gs = tensors[:n], tensors[n:]
        ctx.save_for_backward(*gs)
        ctx.x_dtypes = [x.dtype for x in xs]
        return torch.zeros((), dtype=torch.float32, device=xs[0].device)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        gs = ctx.saved_tensors
        scale = grad_out.float()
        out = [(g * scale).to(dtype) for g, dtype in zip(gs, ctx.x_dtypes, strict=True)]
        return (None, *out, *([None] * len(gs)))


def inject(tensors: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """A float32 zero scalar whose gradient with respect to ``tensors[j]`` is ``grads[j]``.

    Added to the returned loss, it hands a method's own (unscaled, undivided) gradient to the
    trunk inside Lightning's one backward: loss scaling, accumulation, clipping and DDP apply.

    Example::

        >>> import torch
        >>> from lightning_aw.engine import inject
        >>> x = torch.ones(2, requires_grad=True)
        >>> out = inject([x], [torch.tensor([0.5, -1.0])])
        >>> out.item()
        0.0
        >>> out.backward(); x.grad
        tensor([ 0.5000, -1.0000])
    """
    tensors = list(tensors)
    if len(tensors) != len(grads):
        raise ValueError(f"inject got {len(tensors)} tensors and {len(grads)} gradients")
    gs = [g.detach().float().reshape(t.shape) for t, g in zip(tensors, grads, strict=True)]
    return _Inject.apply(len(tensors), *tensors, *gs)
