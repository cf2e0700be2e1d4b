"""`MultiTaskModule`: the LightningModule base class that collects and weighs task losses."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from lightning_aw._sharding import data_parallel_size
from lightning_aw._utils import reduce_sum
from lightning_aw.optim import build_optimizers, validate_optimizer_spec
from lightning_aw.step import StepMethod, StepRecord

__all__ = ["MultiTaskModule", "TaskOutput"]

_TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
NonFinitePolicy = Literal["raise", "skip"]


class TaskOutput(NamedTuple):
    """One task's result from :meth:`MultiTaskModule.task_losses`.

    Return a bare loss tensor when the task has no evaluation metrics; return a ``TaskOutput``
    with ``preds`` and ``target`` when it has, so validation can update its metrics.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from lightning_aw import TaskOutput
        >>> logits, y = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
        >>> out = TaskOutput(loss=F.cross_entropy(logits, y), preds=logits, target=y)
        >>> out.loss
        tensor(0.1269)
    """

    loss: Tensor
    preds: Any = None
    target: Any = None


class MultiTaskModule(pl.LightningModule):
    r"""A LightningModule for multi-task learning whose task losses a weighting callback balances.

    Subclass it, build the network in ``__init__`` and implement :meth:`task_losses`; methods that
    look at gradients also need :meth:`shared_parameters`. Then add a weighting callback
    (:class:`~lightning_aw.GradNorm`, :class:`~lightning_aw.DWA`, ...) to the Trainer. Without one
    the task losses are summed with weight 1.

    Every training step it

    1. calls :meth:`task_losses` and validates the result (a scalar tensor per task, or ``None``
       for a task absent from the batch; unknown or missing task names are an error),
    2. checks the losses are finite (``on_nonfinite``: ``"raise"`` an error naming the task and
       step, or ``"skip"`` the step, leaving weights and optimizer state untouched and counting it
       in ``skipped_steps``). The check costs one host synchronisation per step,
    3. returns the weighted loss, which Lightning backpropagates (so precision, gradient
       accumulation, clipping and DDP stay Lightning's),
    4. logs ``loss/<task>``, ``loss/total``, ``loss/objective`` and ``weights/<task>`` on
       Lightning's logging steps (``log_every_n_steps``), in one ``log_dict`` call.

    ``loss/total`` and ``val/loss/total`` mean the same: the weighted sum
    :math:`\sum_i w_i L_i` of the task losses with the weights applied at that step, so the two
    curves compare. ``loss/objective`` is what the method backpropagates, which can differ
    (uncertainty weighting adds its regulariser, FAMO and GLS take logarithms, gradient methods
    add a zero-valued surrogate); without a weighting it is not logged (it equals the sum).

    Validation and test log ``val/loss/<task>``, ``val/loss/total`` (weighted with the current
    weights) and the task metrics as ``val/<task>/<metric>`` (``test/...`` likewise).

    Args:
        tasks: the task names (letters, digits, ``_`` and ``-``), in a fixed order.
        optimizer: the optimizer spec for the default :meth:`configure_optimizers`: a plain dict
            with ``name`` (a registered optimizer such as ``"adam"``, ``"adamw"``, ``"sgd"``, see
            :func:`lightning_aw.optim.list_optimizers`, or a class path), its keyword arguments,
            optional per-group overrides ``groups`` and an optional ``scheduler``, e.g.
            ``{"name": "adamw", "lr": 1e-3, "groups": {"shared": {"lr": 5e-4}},
            "scheduler": {"name": "cosine", "interval": "step"}}`` (see :mod:`lightning_aw.optim`).
            Checked here; group names are checked against the model when the optimizer is
            built. Default ``{"name": "adam", "lr": 1e-3}``.
        metrics: per task, a torchmetrics ``Metric``, ``MetricCollection`` or mapping of name to
            ``Metric``; such tasks must return :class:`TaskOutput` with ``preds`` and ``target``.
        on_nonfinite: ``"raise"`` (default) or ``"skip"``.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_aw import DWA, MultiTaskModule
        >>> class Net(MultiTaskModule):
        ...     def __init__(self):
        ...         super().__init__(tasks=["a", "b"], optimizer={"name": "adam", "lr": 1e-3})
        ...         self.trunk = nn.Linear(4, 8)
        ...         self.heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
        ...     def shared_parameters(self):
        ...         return self.trunk.parameters()
        ...     def task_losses(self, batch, batch_idx):
        ...         x, y = batch
        ...         h = self.trunk(x).relu()
        ...         return {t: F.mse_loss(self.heads[t](h).squeeze(-1), y[:, i])
        ...                 for i, t in enumerate(self.tasks)}
        ...
        >>> data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 2)), batch_size=16)
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[DWA()], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> net = Net()
        >>> trainer.fit(net, data)
        >>> sorted(net.task_weights)
        ['a', 'b']
        >>> round(sum(net.task_weights.values()), 4)  # DWA's weights sum to T = 2
        2.0
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        optimizer: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Metric | MetricCollection | Mapping[str, Metric]] | None = None,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = _validate_tasks(tasks)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(
                f"Parameter `on_nonfinite` should be 'raise' or 'skip'. Found {on_nonfinite!r}."
            )
        self.on_nonfinite = on_nonfinite
        self.optimizer_spec: dict[str, Any] = validate_optimizer_spec(optimizer)
        self._metric_tasks: tuple[str, ...] = ()
        self.val_metrics = nn.ModuleDict()
        self.test_metrics = nn.ModuleDict()
        if metrics:
            self._init_metrics(metrics)
        #: number of training steps skipped because a task loss was not finite
        self.skipped_steps = 0
        self._step_skipped = False
        self._window_skipped = False  # a skipped micro-batch skips its accumulation window
        self._weighting: StepMethod | None = None
        self._weighting_trainer: int | None = None  # id() of the Trainer searched for it
        self._step_record: StepRecord | None = None
        # what `shared_representation` marked during the current `task_losses` call
        self._marked: Tensor | None = None
        self._marked_graph: Tensor | None = None
        self._mask_cache: dict[tuple[bool, ...], Tensor] = {}

    # ------------------------------------------------------------------ user hooks
    def task_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor | TaskOutput | None]:
        """Compute one loss per task for ``batch``. Implement this.

        Returns:
            A mapping with an entry for every task in ``self.tasks``: a scalar loss tensor, a
            :class:`TaskOutput` (loss plus predictions and targets for the task's metrics), or
            ``None`` when the batch has no label for the task (it then contributes nothing).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `task_losses(self, batch, batch_idx)` returning "
            f"a dict with one scalar loss per task {list(self.tasks)}."
        )

    def shared_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters shared by all tasks (the trunk). Needed by gradient-based methods."""
        raise MisconfigurationException(
            f"This weighting looks at gradients on the shared parameters, but "
            f"{type(self).__name__} does not define them. Add a method "
            "`def shared_parameters(self): return self.encoder.parameters()` (your shared trunk)."
        )

    def task_parameters(self) -> Mapping[str, Iterable[nn.Parameter]]:
        """The parameters that belong to one task only (its head), by task name. Optional.

        The default :meth:`configure_optimizers` puts each task's parameters in its own optimizer
        group ``task/<name>``, which the ``optimizer`` spec can address (``"groups":
        {"task/depth": {"lr": 1e-4}}`` or ``{"task/*": ...}``). A task may be left out; a
        parameter must not also be in :meth:`shared_parameters`. Default: no task groups (the
        heads go to the ``other`` group).

        Example::

            def task_parameters(self):
                return {t: self.heads[t].parameters() for t in self.tasks}
        """
        return {}

    def shared_representation(self, rep: Tensor) -> Tensor:
        """Mark ``rep`` (the shared trunk's output) as the shared representation and return it.

        Call it in :meth:`task_losses` on the tensor every task head reads,
        ``h = self.shared_representation(self.trunk(x))``; gradient methods with
        ``source="representation"`` take the per-task gradients with respect to it (MGDA-UB).
        It returns ``rep`` unchanged and costs nothing otherwise.
        """
        weighting = self.weighting
        if (
            weighting is not None
            and weighting.cuts_representation
            and self.training
            and torch.is_grad_enabled()
            and rep.requires_grad
        ):
            # gradient methods: the heads run on a leaf copy, so per-task gradients stop at the
            # representation and the trunk is traversed only as often as needed (see
            # GradientWeighting); the one backward still reaches every parameter
            self._marked_graph = rep
            rep = rep.detach().requires_grad_()
        self._marked = rep
        return rep

    def gradnorm_parameter(self) -> nn.Parameter:
        """The shared layer GradNorm measures gradient norms on.

        Default: the last parameter with at least two dimensions (a weight matrix or kernel) of
        :meth:`shared_parameters`. Override to choose another.
        """
        candidates = [p for p in self.shared_parameters() if p.ndim >= 2 and p.requires_grad]
        if not candidates:
            raise MisconfigurationException(
                f"GradNorm needs a shared weight matrix, but {type(self).__name__}."
                "shared_parameters() has no trainable parameter with 2 or more dimensions. "
                "Override `gradnorm_parameter()` or pass GradNorm(layer='name.of.weight')."
            )
        return candidates[-1]

    # ------------------------------------------------------------------ weighting
    @property
    def weighting(self) -> StepMethod | None:
        """The weighting callback of the Trainer running this module (``None``: plain sum)."""
        trainer = self._trainer
        if trainer is not None and id(trainer) != self._weighting_trainer:
            self._bind_weighting(trainer)
        return self._weighting

    def _bind_weighting(self, trainer: pl.Trainer) -> None:
        """Find the Trainer's weighting callback and attach its learnable parameters."""
        methods = [c for c in trainer.callbacks if isinstance(c, StepMethod)]  # type: ignore[attr-defined]
        self._weighting_trainer = id(trainer)
        self._weighting = methods[0] if methods else self._weighting
        if self._weighting is not None and self._weighting.module is not None:
            self.loss_weighting = self._weighting.module

    @override
    def setup(self, stage: str) -> None:
        """Find the weighting callback (Lightning runs the callbacks' ``setup`` first), so its
        learnable parameters are attached before the checkpoint is restored and the optimizer
        built. A subclass overriding ``setup`` should call ``super().setup(stage)``; the
        weighting is otherwise found at its first use."""
        if self._trainer is not None:
            self._bind_weighting(self._trainer)
        if (
            not self.automatic_optimization
            and type(self).training_step is MultiTaskModule.training_step
        ):
            raise MisconfigurationException(
                f"`{type(self).__name__}.automatic_optimization` is False, but MultiTaskModule's "
                "`training_step` relies on Lightning's automatic optimization (it returns the "
                "weighted loss and never steps an optimizer, so nothing would train). Keep "
                "automatic optimization, or override `training_step` and step the optimizers "
                "yourself."
            )

    def weighting_parameters(self) -> Iterator[nn.Parameter]:
        """Learnable parameters of the weighting method (put them in an optimizer, no decay)."""
        weighting = self.weighting
        if weighting is not None and weighting.module is not None:
            yield from weighting.module.parameters()

    @property
    def task_weights(self) -> dict[str, float]:
        """The weights currently applied, by task (1 for every task without a weighting)."""
        weighting = self.weighting
        if weighting is None:
            return dict.fromkeys(self.tasks, 1.0)
        return dict(zip(self.tasks, weighting.current_weights().float().tolist(), strict=True))

    @property
    def step_record(self) -> StepRecord | None:
        """The current training step's :class:`~lightning_aw.step.StepRecord` (read-only), from
        ``training_step`` to the end of the batch; ``None`` outside, or when the step was
        skipped."""
        return self._step_record

    @property
    def step_skipped(self) -> bool:
        """Whether the current optimizer step is skipped (a non-finite loss under
        ``on_nonfinite="skip"``, in this micro-batch or an earlier one of its window)."""
        return self._step_skipped

    def compute_losses(self, batch: Any, batch_idx: int) -> tuple[Tensor, Tensor]:
        """Call :meth:`task_losses` and validate the result, as a training step does.

        Returns:
            ``(losses, present)``: float32 losses ``[T]`` (0 for an absent task) and the boolean
            mask ``[T]`` of the tasks present. Methods that re-evaluate a batch (FAMO) use it,
            under ``torch.no_grad()``.
        """
        losses, present_list, _ = self._evaluate(batch, batch_idx)
        return losses, self._mask(present_list, losses.device)

    def compute_task_losses(
        self, batch: Any, batch_idx: int
    ) -> tuple[tuple[Tensor | None, ...], tuple[bool, ...]]:
        """Call :meth:`task_losses` and validate the result, as a training step does, one loss
        per task.

        Returns:
            ``(task_losses, present)``: one float32 scalar per task, each with its own graph
            (``None`` for an absent task), and the presence of each task on the host (known
            without a device synchronisation). Multi-batch methods (SDMGrad, MoDo) take
            per-task gradients of them.
        """
        _, present_list, values = self._evaluate(batch, batch_idx)
        return values, tuple(present_list)

    def _evaluate(
        self, batch: Any, batch_idx: int
    ) -> tuple[Tensor, list[bool], tuple[Tensor | None, ...]]:
        """:meth:`task_losses`, validated and stacked, outside ``training_step``: the
        representation it marks is not kept (the module holds no graph of it after the call)."""
        marked = self._marked, self._marked_graph
        try:
            outputs = self._call_task_losses(batch, batch_idx)
        finally:
            self._marked, self._marked_graph = marked
        return self._stack(outputs, batch_idx)

    def split_batch(self, batch: Any, parts: int) -> list[Any]:
        """Split ``batch`` into ``parts`` disjoint batches of the same structure.

        Multi-batch methods (:class:`~lightning_aw.SDMGrad`, :class:`~lightning_aw.MoDo`) need
        independent mini-batches within one step: they split the step's batch with this hook.
        The default splits every tensor along dimension 0 into contiguous parts of sizes as even
        as possible (``torch.tensor_split``: the first parts get one more row when the size is
        not a multiple of ``parts``), recursing into dicts, lists and tuples (named tuples
        included). Override it for other batch types (e.g. a dataclass, or a batch whose
        tensors are not indexed by sample along dimension 0).

        Raises:
            TypeError: a leaf of the batch is not a tensor (its type is named).
            ValueError: the tensors disagree on the batch size, or the batch has fewer rows
                than ``parts``.

        Example::

            >>> import torch
            >>> from lightning_aw import MultiTaskModule
            >>> batch = {"x": torch.arange(5.0), "y": (torch.zeros(5, 2), torch.ones(5))}
            >>> first, second = MultiTaskModule.split_batch(None, batch, 2)
            >>> first["x"], second["y"][1]
            (tensor([0., 1., 2.]), tensor([1., 1.]))
        """
        if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
            raise ValueError(f"Parameter `parts` should be an int >= 1. Found {parts!r}.")
        sizes: set[int] = set()

        def size_of(x: Any, where: str) -> None:
            if isinstance(x, Tensor):
                if x.dim() == 0:
                    raise ValueError(
                        f"The batch holds a 0-d tensor at {where}, which cannot be split by "
                        "sample. Override `MultiTaskModule.split_batch(batch, parts)`."
                    )
                sizes.add(x.shape[0])
            elif isinstance(x, Mapping):
                for k, v in x.items():
                    size_of(v, f"{where}[{k!r}]")
            elif isinstance(x, (list, tuple)):
                for i, v in enumerate(x):
                    size_of(v, f"{where}[{i}]")
            else:
                raise TypeError(
                    f"A multi-batch method splits each training batch into {parts} parts, but "
                    f"the batch holds a {type(x).__name__} at {where}; the default "
                    "`split_batch` splits tensors, dicts, lists and tuples of them along "
                    "dimension 0. Override `MultiTaskModule.split_batch(batch, parts)` for "
                    "this batch type."
                )

        size_of(batch, "batch")
        if len(sizes) != 1:
            raise ValueError(
                f"The batch's tensors have different sizes along dimension 0 ({sorted(sizes)}), "
                "so it cannot be split by sample. Override "
                "`MultiTaskModule.split_batch(batch, parts)`."
            )
        (size,) = sizes
        if size < parts:
            raise ValueError(
                f"A multi-batch method splits each training batch into {parts} disjoint parts, "
                f"but this batch has {size} row(s). Use batches of at least {parts} samples "
                "(e.g. `DataLoader(..., drop_last=True)` with a batch size that is a multiple "
                f"of {parts})."
            )

        def split(x: Any) -> list[Any]:
            if isinstance(x, Tensor):
                return list(torch.tensor_split(x, parts, dim=0))
            if isinstance(x, Mapping):
                items = {k: split(v) for k, v in x.items()}
                return [type(x)({k: v[j] for k, v in items.items()}) for j in range(parts)]
            cols = [split(v) for v in x]
            rows = [[c[j] for c in cols] for j in range(parts)]
            if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
                return [type(x)(*r) for r in rows]
            return [type(x)(r) for r in rows]

        return split(batch)

    # ------------------------------------------------------------------ steps
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        self._step_skipped = False
        self._step_record = self._marked = self._marked_graph = None
        weighting = self.weighting
        parts = 1 if weighting is None else weighting.batch_parts
        # a multi-batch method (SDMGrad, MoDo) takes its update direction from the last part
        data = batch if parts == 1 else self.split_batch(batch, parts)[-1]
        outputs = self._call_task_losses(data, batch_idx)
        losses, present_list, values = self._stack(outputs, batch_idx)
        present = self._mask(present_list, losses.device)
        if not all(present_list):
            self._check_partial_labels_allowed(present_list, batch_idx)
        if not self._finite_or_skip(losses, present, present_list, batch_idx):
            self._step_skipped = self._window_skipped = True
            return None
        step = StepRecord(
            tasks=self.tasks,
            losses=losses,
            task_losses=values,
            present=present,
            present_list=tuple(present_list),
            batch=batch,
            batch_idx=batch_idx,
            representation=self._marked,
            representation_graph=self._marked_graph,
            trainer=self._trainer,
        )
        self._step_record = step
        self._marked = self._marked_graph = None
        if weighting is None:
            total = losses.sum()
        else:
            # the weighting's maths (exp, Gram matrices, solvers) runs in float32, not autocast
            device_type = losses.device.type
            if torch.is_autocast_enabled(device_type):
                with torch.autocast(device_type, enabled=False):
                    total = weighting.step_loss(step)
            else:
                total = weighting.step_loss(step)
        if self._should_log():
            self._log_train(losses.detach(), present_list, total.detach())
        return total

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._step_record = None  # release the step's graph

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        outputs = self._call_task_losses(batch, batch_idx)
        losses, present_list, _ = self._stack(outputs, batch_idx)
        weighting = self.weighting
        weights = (
            torch.ones_like(losses) if weighting is None else weighting.current_weights().to(losses)
        )
        items = {
            f"{stage}/loss/{t}": losses[i] for i, t in enumerate(self.tasks) if present_list[i]
        }
        items[f"{stage}/loss/total"] = (weights * losses).sum()
        self.log_dict(items, on_step=False, on_epoch=True)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        for task in self._metric_tasks:
            out = outputs[task]
            if out is None:
                continue
            if not isinstance(out, TaskOutput) or out.preds is None or out.target is None:
                raise MisconfigurationException(
                    f"Task '{task}' has metrics, so `task_losses` must return "
                    "`TaskOutput(loss, preds, target)` for it; it returned a bare "
                    f"{type(out).__name__}."
                )
            collection = metrics[task]
            collection.update(out.preds, out.target)
            self.log_dict(collection, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ internals
    def _call_task_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Any]:
        outputs = self.task_losses(batch, batch_idx)
        if not isinstance(outputs, Mapping):
            raise TypeError(
                f"{type(self).__name__}.task_losses must return a dict of task name -> loss; "
                f"it returned a {type(outputs).__name__}."
            )
        if len(outputs) != len(self.tasks) or any(t not in outputs for t in self.tasks):
            unknown = sorted(set(outputs) - set(self.tasks))
            missing = [t for t in self.tasks if t not in outputs]
            detail = []
            if unknown:
                detail.append(f"unknown task(s) {unknown}")
            if missing:
                detail.append(f"missing task(s) {missing}")
            raise KeyError(
                f"{type(self).__name__}.task_losses returned {' and '.join(detail)} at batch "
                f"{batch_idx}; the tasks are {list(self.tasks)}. Return an entry for every task, "
                "with None for a task that has no label in this batch."
            )
        return outputs

    def _stack(
        self, outputs: Mapping[str, Any], batch_idx: int
    ) -> tuple[Tensor, list[bool], tuple[Tensor | None, ...]]:
        """``[T]`` float32 losses (0 where absent), the presence list, and the float32 scalar
        of each task (``None`` where absent)."""
        values: list[Tensor | None] = []
        for task in self.tasks:
            out = outputs[task]
            loss = out.loss if isinstance(out, TaskOutput) else out
            if loss is not None:
                if not isinstance(loss, Tensor):
                    raise TypeError(
                        f"The loss of task '{task}' at batch {batch_idx} is a "
                        f"{type(loss).__name__}; return a scalar torch.Tensor (or None when the "
                        "task is absent from the batch)."
                    )
                if loss.numel() != 1:
                    raise ValueError(
                        f"The loss of task '{task}' at batch {batch_idx} has shape "
                        f"{tuple(loss.shape)}; it must be a scalar. Reduce it (e.g. .mean())."
                    )
                if not loss.requires_grad and self.training and torch.is_grad_enabled():
                    raise ValueError(
                        f"The loss of task '{task}' at batch {batch_idx} has no graph "
                        "(requires_grad is False: a detached tensor, a constant or `.item()`), so "
                        "it cannot train anything and a weighting method would misjudge it. "
                        "Return the loss as computed from the model's output, or None when the "
                        "task has no label in this batch."
                    )
                if loss.dim() != 0:
                    loss = loss.reshape(())
                if loss.dtype != torch.float32:
                    loss = loss.float()
            values.append(loss)
        present_list = [v is not None for v in values]
        if not any(present_list):
            raise ValueError(
                f"{type(self).__name__}.task_losses returned None for every task at batch "
                f"{batch_idx}; at least one task needs a loss (skip such batches in the data)."
            )
        zero = next(v for v in values if v is not None).new_zeros(())
        stacked = torch.stack([zero if v is None else v for v in values])
        return stacked, present_list, tuple(values)

    def _check_partial_labels_allowed(self, present_list: list[bool], batch_idx: int) -> None:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return
        if data_parallel_size(trainer) > 1:
            # FSDP2: an absent task's head does not run its forward here, so the all-gather of
            # its `fully_shard`-ed parameters (and their reduce-scatter) is missing on this rank
            # while a rank where the task is present waits in it: a hang, or collectives paired
            # out of order. This rank cannot ask whether the task is absent everywhere (a rank
            # that has it is already blocked), so every absence is refused, here, on every rank
            # where it happens.
            absent = [t for t, here in zip(self.tasks, present_list, strict=True) if not here]
            raise MisconfigurationException(
                f"Task(s) {absent} are absent from batch {batch_idx} on rank "
                f"{trainer.global_rank}, which is not supported under ModelParallelStrategy "
                "(FSDP2): the head of an absent task does not run, so its `fully_shard` "
                "all-gather and reduce-scatter are missing on this rank while the ranks where "
                "the task is present wait for them (a hang). Run every head on every batch "
                "and, instead of None, return its loss with the unlabelled samples masked out "
                "(a zero-weighted loss, e.g. `(err * mask).sum() / mask.sum().clamp_min(1)`; the "
                "task then counts as present), or train with "
                "strategy='ddp_find_unused_parameters_true', which supports absent tasks."
            )
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
        if ddp_kwargs is not None and not ddp_kwargs.get("find_unused_parameters", False):
            absent = [t for t, here in zip(self.tasks, present_list, strict=True) if not here]
            raise MisconfigurationException(
                f"Task(s) {absent} are absent from batch {batch_idx}, so their heads get no "
                "gradient, and DDP would wait for it forever. With partial labels under DDP use "
                "`Trainer(strategy='ddp_find_unused_parameters_true')`."
            )

    def _mask(self, present_list: list[bool], device: torch.device) -> Tensor:
        key = tuple(present_list)
        mask = self._mask_cache.get(key)
        if mask is None or mask.device != device:
            mask = torch.tensor(present_list, dtype=torch.bool, device=device)
            self._mask_cache[key] = mask
        return mask

    def _finite_or_skip(
        self, losses: Tensor, present: Tensor, present_list: list[bool], batch_idx: int
    ) -> bool:
        """The step's one host synchronisation: non-finite losses (``on_nonfinite``) and losses
        at or below the weighting's floor (:meth:`StepMethod.loss_floor`: an error, whatever the
        policy), in one read."""
        weighting = self.weighting
        floor = None if weighting is None else weighting.loss_floor(losses)
        trainer = self._trainer
        # every rank must take the same decision (skip or raise), or DDP would hang
        shared = (
            trainer is not None
            and trainer.world_size > 1
            and (self.on_nonfinite == "skip" or floor is not None)
        )
        if not shared and all(present_list):
            # the usual case in two or three small kernels; only a failing check (which ends
            # in an error or a skip) looks at the details below
            values = losses.detach()
            ok = (
                torch.isfinite(values).all()
                if floor is None
                else ((values > floor) & (values < float("inf"))).all()
            )
            if bool(ok):  # the one host synchronisation per step
                return True
        bad = (~torch.isfinite(losses)) & present
        low = None if floor is None else (losses.detach() <= floor) & present & ~bad
        flags = bad.any() if low is None else torch.stack([bad.any(), low.any()])
        if shared:
            flags = reduce_sum(trainer, flags.float()) > 0
        if not bool(flags.any()):  # the one host synchronisation per step
            return True
        where = f"at epoch {self.current_epoch}, batch {batch_idx} (global step {self.global_step})"
        if low is not None and bool(flags[1]):
            assert weighting is not None and floor is not None
            names = [t for t, b in zip(self.tasks, low.tolist(), strict=True) if b]
            need, cure = weighting.loss_floor_message()
            if names:
                values = [float(losses[self.tasks.index(t)].detach()) for t in names]
                bounds = [float(floor[self.tasks.index(t)]) for t in names]
                which = f"task '{names[0]}'" if len(names) == 1 else f"tasks {names}"
                shown = values[0] if len(values) == 1 else values
                above = "" if not any(bounds) else f" (it must be above {bounds})"
                detail = f"got loss {shown:.6g}" if len(values) == 1 else f"got losses {shown}"
                detail = f"{detail} for {which}{above} {where}"
            else:
                detail = f"a task on another rank is at or below its floor {where}"
            raise ValueError(f"{need}, but {detail}. {cure}")
        names = [t for t, b in zip(self.tasks, bad.tolist(), strict=True) if b]
        if self.on_nonfinite == "raise":
            values = {t: float(losses[self.tasks.index(t)].detach()) for t in names}
            raise FloatingPointError(
                f"Non-finite loss for task(s) {values} {where}. Check the data and learning rate "
                "of those tasks, or pass `on_nonfinite='skip'` to MultiTaskModule to skip such "
                "steps."
            )
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        return False

    def _should_log(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return False
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True)) and bool(trainer.loggers)

    def _log_train(self, losses: Tensor, present_list: list[bool], total: Tensor) -> None:
        items: dict[str, Tensor] = {
            f"loss/{t}": losses[i] for i, t in enumerate(self.tasks) if present_list[i]
        }
        weighting = self.weighting
        if weighting is None:
            items["loss/total"] = total
        else:
            # loss/total means what val/loss/total means: the weighted sum of the task losses;
            # what the method backpropagates (its own objective) is loss/objective
            weights = weighting.current_weights()
            items["loss/total"] = (weights.to(losses) * losses).sum()
            items["loss/objective"] = total
            items.update({f"weights/{t}": weights[i] for i, t in enumerate(self.tasks)})
            items.update(weighting.log_items())
        self.log_dict(items, on_step=True, on_epoch=False)

    def _init_metrics(self, metrics: Mapping[str, Any]) -> None:
        unknown = sorted(set(metrics) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"Parameter `metrics` names unknown task(s) {unknown}; "
                f"tasks are {list(self.tasks)}."
            )
        for task, spec in metrics.items():
            if isinstance(spec, Metric):
                spec = {type(spec).__name__.lower(): spec}
            if isinstance(spec, Mapping):
                spec = MetricCollection(dict(spec))
            if not isinstance(spec, MetricCollection):
                raise TypeError(
                    f"Metrics of task '{task}' should be a torchmetrics Metric, MetricCollection "
                    f"or dict of Metrics; found {type(spec).__name__}."
                )
            self.val_metrics[task] = spec.clone(prefix=f"val/{task}/")
            self.test_metrics[task] = spec.clone(prefix=f"test/{task}/")
        self._metric_tasks = tuple(t for t in self.tasks if t in metrics)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def configure_optimizers(self) -> Any:
        """The optimizer (and scheduler) of the ``optimizer`` spec, over named parameter groups.

        Groups (:func:`lightning_aw.optim.named_param_groups`): ``shared``
        (:meth:`shared_parameters`, when implemented), ``task/<name>`` (:meth:`task_parameters`,
        when implemented), ``other`` (the remaining trainable parameters) and ``weighting`` (the
        weighting method's learnable parameters: learning rate ``weighting.lr`` when it sets
        one, never weight decay). Every trainable parameter is in exactly one group; empty
        groups are dropped. The spec's ``groups`` override hyperparameters per group, and its
        ``scheduler`` adds a learning-rate scheduler in Lightning's dict format. Group names
        are in ``param_groups[i]["name"]``, so checkpoints and ``LearningRateMonitor`` carry
        them.
        """
        return build_optimizers(self, self.optimizer_spec)

    @override
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self._window_skipped:
            # a micro-batch of this window was skipped: skip the whole optimizer step (torch
            # optimizers leave parameters without a gradient untouched)
            optimizer.zero_grad(set_to_none=True)
            self._step_skipped = True  # the weighting rolls its window back
        self._window_skipped = False

    @override
    def on_train_epoch_start(self) -> None:
        _set_optimizer_mode(self.trainer.optimizers, "train")

    @override
    def on_validation_epoch_start(self) -> None:
        # schedule-free optimizers evaluate the averaged weights (a no-op for the others)
        _set_optimizer_mode(self.trainer.optimizers, "eval")

    @override
    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit":
            _set_optimizer_mode(self.trainer.optimizers, "train")

    @override
    def on_fit_start(self) -> None:
        if self.weighting is None:
            rank_zero_info(
                f"lightning_aw: {type(self).__name__} has no weighting callback; the task losses "
                "are summed with weight 1."
            )
        if self.trainer.is_global_zero:
            self._add_tensorboard_layout()

    def _add_tensorboard_layout(self) -> None:
        # the chart tags are regular expressions: anchored, so task `depth` does not also draw
        # `depth_aux`
        def tags(prefix: str) -> list[str]:
            return [f"^{re.escape(f'{prefix}/{t}')}$" for t in self.tasks]

        charts = {
            "task losses": ["Multiline", tags("loss")],
            "validation task losses": ["Multiline", tags("val/loss")],
        }
        if self.weighting is not None:
            charts["task weights"] = ["Multiline", tags("weights")]
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            # monitors with their own charts (GateMonitor): one layout per run is read
            extra = getattr(callback, "tensorboard_charts", None)
            if callable(extra):
                charts.update(extra(self))
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars({"lightning_aw": charts})

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_aw"] = {
            "tasks": list(self.tasks),
            "weighting": self._weighting_name(),
        }

    def _weighting_name(self) -> str:
        weighting = self.weighting
        return "none" if weighting is None else type(weighting).__name__

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("lightning_aw", {}).get("tasks")
        if saved is not None and list(saved) != list(self.tasks):
            raise MisconfigurationException(
                f"The checkpoint was saved for tasks {list(saved)}, but this "
                f"{type(self).__name__} has tasks {list(self.tasks)}. Use the same task list "
                "(and order) to resume."
            )
        method = checkpoint.get("lightning_aw", {}).get("weighting")
        trainer = self._trainer
        resuming = trainer is not None and trainer.state.fn == "fit"
        if resuming and method is not None and method != self._weighting_name():
            raise MisconfigurationException(
                f"The checkpoint was trained with weighting {method!r}, but this run uses "
                f"{self._weighting_name()!r}. Resuming needs the same method; to switch, start a "
                "new run from the weights only: "
                f"`{type(self).__name__}.load_from_checkpoint(path)` "
                "and `trainer.fit(model)` without `ckpt_path`."
            )
        # A checkpoint written with a learnable weighting (e.g. UncertaintyWeighting) holds its
        # parameters under `loss_weighting.`; load it without that callback, and vice versa.
        state = checkpoint.get("state_dict", {})
        prefix = "loss_weighting."
        ours = dict(self.named_parameters())
        if not hasattr(self, "loss_weighting"):
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
        else:
            for name, value in ours.items():
                if name.startswith(prefix) and name not in state:
                    state[name] = value.detach().clone()


def _set_optimizer_mode(optimizers: Sequence[Any], mode: str) -> None:
    """Call ``optimizer.train()`` / ``.eval()`` on optimizers that have them (schedule-free)."""
    for opt in optimizers:
        switch = getattr(opt, mode, None)
        if callable(switch):
            switch()


def _validate_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise ValueError(
            f"Parameter `tasks` should be a non-empty list of task names. Found {tasks!r}."
        )
    for t in tasks:
        if not isinstance(t, str) or not _TASK_NAME.match(t):
            raise ValueError(
                f"Task name {t!r} is invalid: use letters, digits, '_' and '-' (it becomes part "
                "of logged metric names)."
            )
    if len(set(tasks)) != len(tasks):
        dupes = sorted({t for t in tasks if list(tasks).count(t) > 1})
        raise ValueError(f"Parameter `tasks` has duplicate names {dupes}.")
    return tuple(tasks)
