"""The step record: what one training step hands from the module to the weighting method.

:class:`~lightning_aw.MultiTaskModule` builds one frozen :class:`StepRecord` per training
micro-batch, after validating the task losses, and passes it to the method
(:meth:`StepMethod.step_loss`). Hooks that run later in the same step (``on_before_backward``:
GradNorm, the gradient-conflict monitor) read the same object from
:attr:`MultiTaskModule.step_record <lightning_aw.MultiTaskModule.step_record>`. Data flows one way:
module → record → method → (one backward) → method state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["StepMethod", "StepRecord"]


@dataclass(frozen=True, eq=False)
class StepRecord:
    """One training micro-batch, as the weighting method sees it.

    Attributes:
        tasks: the task names, in the module's order.
        losses: float32 task losses ``[T]`` with their graph (0 where a task is absent).
        task_losses: the same losses one scalar per task (``None`` where absent), each with its
            own graph: per-task gradients are taken of these, so a task's backward never
            traverses another task's head, and a task whose loss does not reach what is
            differentiated is seen (``autograd.grad`` returns ``None``).
        present: boolean mask ``[T]`` on the losses' device.
        present_list: the same mask on the host (known without a device synchronisation).
        batch: the batch, as ``training_step`` received it.
        batch_idx: its index in the epoch.
        representation: the tensor the task heads read, marked with
            :meth:`~lightning_aw.MultiTaskModule.shared_representation` (``None`` when the
            module marked none). When the method cuts the representation
            (:attr:`StepMethod.cuts_representation`) it is a leaf copy of the trunk's output.
        representation_graph: the trunk's output with its graph when the heads ran on a leaf
            copy (``representation``), else ``None``.
        trainer: the Trainer running the step (precision plugin, strategy, accumulation).

    Example::

        >>> import torch
        >>> from lightning_aw.step import StepRecord
        >>> losses = torch.tensor([0.5, 0.0, 2.0], requires_grad=True)
        >>> step = StepRecord(
        ...     tasks=("seg", "depth", "normal"), losses=losses,
        ...     task_losses=(losses[0], None, losses[2]),
        ...     present=torch.tensor([True, False, True]), present_list=(True, False, True),
        ...     batch=None, batch_idx=0, representation=None, representation_graph=None,
        ...     trainer=None,
        ... )
        >>> step.present_index, step.accumulate, step.world_size
        ([0, 2], 1, 1)
    """

    tasks: tuple[str, ...]
    losses: Tensor
    task_losses: tuple[Tensor | None, ...]
    present: Tensor
    present_list: tuple[bool, ...]
    batch: Any
    batch_idx: int
    representation: Tensor | None
    representation_graph: Tensor | None
    trainer: pl.Trainer | None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def present_index(self) -> list[int]:
        """Indices of the tasks present in this batch (host-side)."""
        return [i for i, here in enumerate(self.present_list) if here]

    @property
    def accumulate(self) -> int:
        """``accumulate_grad_batches`` of the Trainer (1 without one)."""
        return 1 if self.trainer is None else int(self.trainer.accumulate_grad_batches)

    @property
    def world_size(self) -> int:
        return 1 if self.trainer is None else int(self.trainer.world_size)


class StepMethod(ABC):
    """What :class:`~lightning_aw.MultiTaskModule` needs from a weighting method.

    :class:`~lightning_aw.Weighting` implements it; the module finds the Trainer callback that
    does in its ``setup`` hook, so the module depends on this interface only, never on the
    callback packages.

    Example::

        >>> from lightning_aw import DWA, MGDA
        >>> from lightning_aw.step import StepMethod
        >>> isinstance(DWA(), StepMethod), MGDA.cuts_representation, DWA.cuts_representation
        (True, True, False)
    """

    #: ask :meth:`MultiTaskModule.shared_representation` to hand the heads a leaf copy of the
    #: representation (per-task gradients then stop there; gradient methods)
    cuts_representation: bool = False
    #: learnable parameters of the method (attached to the module as ``loss_weighting``)
    module: nn.Module | None = None
    #: how many disjoint parts the method needs the step's batch split into (SDMGrad, MoDo: 3,
    #: independent samples). With more than 1, ``training_step`` evaluates the task losses of the
    #: record on the *last* part only (:meth:`MultiTaskModule.split_batch
    #: <lightning_aw.MultiTaskModule.split_batch>`), and the method evaluates the others itself.
    batch_parts: int = 1

    @abstractmethod
    def step_loss(self, step: StepRecord) -> Tensor:
        """The loss Lightning backpropagates for ``step`` (and record what the method needs)."""

    @abstractmethod
    def current_weights(self) -> Tensor:
        """The weights applied at the current step, shape ``[T]``."""

    def log_items(self) -> dict[str, Tensor]:
        """Extra diagnostics logged with the weights (tensors, no host synchronisation)."""
        return {}

    def loss_floor(self, like: Tensor) -> Tensor | None:
        """The bound ``[T]`` every present task loss must exceed (``like``'s device and dtype),
        or ``None`` for a method that takes losses of any sign. The module checks it at every
        step, within its finiteness check (no extra host synchronisation)."""
        return None

    def loss_floor_message(self) -> tuple[str, str]:
        """``(need, cure)`` for the floor's error: what the method needs of the losses (e.g.
        ``"GLS needs positive task losses"``) and how to fix them."""
        return f"{type(self).__name__} needs task losses above their floor", ""
