"""The loss-based family: weights from the task losses and their window statistics."""

from __future__ import annotations

from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_aw._utils import all_reduce_sum
from lightning_aw.method import Interval, Weighting
from lightning_aw.step import StepRecord

__all__ = ["Interval", "LossWeighting", "Weighting"]


class LossWeighting(Weighting):
    """Base class of the loss-based weighting callbacks.

    A loss weighting turns the per-task losses of the step record into the one loss Lightning
    backpropagates (:meth:`combine`), and updates its weights from statistics of the training
    run. Subclasses override a few template methods:

    - :meth:`init_state` creates the state for ``T`` tasks (tensors on the CPU; they follow the
      module's device at fit start),
    - :meth:`weight_tensor` returns the current weights,
    - :meth:`combine` (optional) when the loss is more than ``weights @ losses``,
    - :meth:`update` recomputes the weights when the interval elapses, from the mean task losses
      of the window since the last update (summed over micro-batches and reduced over the DDP
      ranks: the mean over the micro-batches where each task was present), and anything the
      subclass gathered itself.

    Everything else (intervals, rollback of skipped steps, transforms, checkpoints) is the
    shared lifecycle of :class:`~lightning_aw.Weighting`.

    Example::

        >>> import torch
        >>> from lightning_aw.weighting import LossWeighting
        >>> class Fixed(LossWeighting):  # constant weights given by the user
        ...     def __init__(self, weights):
        ...         super().__init__()
        ...         self.fixed = torch.tensor(weights)
        ...     def init_state(self, num_tasks):
        ...         if num_tasks != len(self.fixed):
        ...             raise ValueError(f"Expected {len(self.fixed)} tasks. Found {num_tasks}.")
        ...     def weight_tensor(self):
        ...         return self.fixed
        ...
        >>> method = Fixed([2.0, 0.5])
        >>> method.combine(torch.tensor([1.0, 4.0]), torch.tensor([True, True]))  # 2 * 1 + 0.5 * 4
        tensor(4.)
    """

    #: Whether :meth:`update` reads the window-mean losses (else none are gathered: cheaper).
    uses_window_means: ClassVar[bool] = True

    def __init__(self, *, interval: Interval | None = None, frequency: int = 1) -> None:
        super().__init__(interval=interval, frequency=frequency)
        # statistics of the current update window, summed over micro-batches
        self._window_loss_sum = torch.zeros(0)
        self._window_count = torch.zeros(0)
        self._num_updates = 0

    # ------------------------------------------------------------------ template methods
    def combine(self, losses: Tensor, present: Tensor) -> Tensor:
        """The loss to backpropagate: ``sum_i w_i L_i`` over the tasks present in the batch.

        Args:
            losses: float32 task losses ``[T]`` (zero where a task is absent).
            present: boolean mask ``[T]`` of the tasks present in this batch.
        """
        return (self.weight_tensor().to(losses.dtype) * losses).sum()

    def combine_step(self, step: StepRecord) -> Tensor:
        """The loss to backpropagate for a training step: :meth:`combine` of its losses.

        The record's present losses were checked by the module (finite, above
        :meth:`~lightning_aw.Weighting.loss_floor`), so a subclass may override this with a
        cheaper form of :meth:`combine` for that case (fewer small kernels per step); it must
        return what :meth:`combine` returns.
        """
        return self.combine(step.losses, step.present)

    def update(self, trainer: pl.Trainer, window_mean: Tensor, window_present: Tensor) -> None:
        """Recompute the weights; ``window_mean`` are the rank-reduced mean losses since the last
        update, ``window_present`` tells which tasks were seen in the window."""

    def observe(self, step: StepRecord) -> None:
        """Record one training micro-batch after :meth:`combine` (the window's loss sums).

        Methods without an update interval (their weights change only through the optimizer, or
        never) keep no window statistics.
        """
        if self.interval is None or not self.uses_window_means:
            return
        mask = step.present.to(self._window_count.dtype)
        self._window_loss_sum = self._window_loss_sum + step.losses.detach() * mask
        self._window_count = self._window_count + mask

    # ------------------------------------------------------------------ the step
    @override
    def step_loss(self, step: StepRecord) -> Tensor:
        """:meth:`combine` on the step's losses, with the transforms applied to the weights the
        network sees, then :meth:`observe`.

        The method's own loss keeps its extra terms (e.g. uncertainty weighting's regulariser);
        the correction ``sum_i (w'_i - w_i) L_i`` (weights detached) replaces the weights ``w`` of
        this step by the transformed ``w'`` in the network's gradient.
        """
        losses = step.losses
        total = self.combine_step(step)
        if self.transform is not None:
            raw = self.weight_tensor().to(losses)
            applied = self._transformed(raw)
            total = total + ((applied - raw.detach()) * losses).sum()
        self.observe(step)
        return total

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        first = self._first_setup(pl_module)
        super().setup(trainer, pl_module, stage)
        if first:
            self._window_loss_sum = torch.zeros(len(self.tasks))
            self._window_count = torch.zeros(len(self.tasks))

    @override
    def on_interval(self, trainer: pl.Trainer) -> None:
        if not self.uses_window_means:
            self.update(trainer, self._window_loss_sum, self._window_count > 0)
            self._num_updates += 1
            return
        loss_sum, count = all_reduce_sum(trainer, self._window_loss_sum, self._window_count)
        present = count > 0
        mean = loss_sum / count.clamp_min(1.0)
        self.update(trainer, mean, present)
        self._num_updates += 1
        self._window_loss_sum = torch.zeros_like(self._window_loss_sum)
        self._window_count = torch.zeros_like(self._window_count)

    def _state_names(self) -> tuple[str, ...]:
        return (*super()._state_names(), "_window_loss_sum", "_window_count", "_num_updates")
