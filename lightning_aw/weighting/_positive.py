"""Shared machinery of the weightings that take logarithms of the task losses."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_aw._utils import Stateful, reduce_sum
from lightning_aw.weighting._base import Interval, LossWeighting


class _NonPositiveCounter(Stateful):
    """Counts, per task, the training steps whose checked value was not positive.

    Pure tensor arithmetic, so recording costs no host synchronisation; the owner reads the counts
    once per check window. The state is plain tensors (``weights_only`` checkpoints).
    """

    def __init__(self) -> None:
        self.count = torch.zeros(0)
        self.lowest = torch.zeros(0)

    def reset(self, num_tasks: int) -> None:
        self.count = torch.zeros(num_tasks)
        self.lowest = torch.full((num_tasks,), float("inf"))

    def record(self, values: Tensor, present: Tensor, reported: Tensor | None = None) -> Tensor:
        """Count the present tasks whose ``values`` are not positive (NaN included).

        Returns:
            The mask of the present tasks whose value is positive (the usable ones).
        """
        ok = values > 0
        bad = present & ~ok
        shown = values if reported is None else reported
        self.count = self.count + bad.to(self.count.dtype)
        self.lowest = torch.where(bad, torch.minimum(self.lowest, shown.detach()), self.lowest)
        return present & ok

    def to(self, device: torch.device) -> None:
        self.count = self.count.to(device)
        self.lowest = self.lowest.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "lowest": self.lowest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.lowest = state["lowest"]


class PositiveLossWeighting(LossWeighting):
    """Base of the weightings whose maths needs positive task losses (logarithms).

    A task whose loss is not positive in a step is left out of that step (it contributes nothing
    and gets weight 0, so no NaN reaches the weights or the model), and counted without a host
    synchronisation. Every ``check_every`` optimizer steps and at every epoch end the counts are
    summed over the DDP ranks and read once: if any task had a non-positive loss, a ``ValueError``
    names it, with the number of steps, the lowest value and the cure.

    Example::

        >>> from lightning_aw import FAMO, GLS, IMTLL, STCH, ScaleInvariant
        >>> from lightning_aw.weighting import PositiveLossWeighting
        >>> methods = (FAMO, GLS, IMTLL, STCH, ScaleInvariant)
        >>> all(issubclass(m, PositiveLossWeighting) for m in methods)
        True
        >>> GLS(check_every=50)  # checks for non-positive losses every 50 optimizer steps
        GLS(check_every=50)
    """

    #: what the method needs, for the error message
    _needs: ClassVar[str] = "positive task losses (it takes their logarithm)"
    #: how to fix it, for the error message
    _cure: ClassVar[str] = (
        "Make the loss positive (e.g. add a constant to it), or use a weighting that accepts any "
        "sign (EqualWeighting, RLW, DWA with positive means, ...)."
    )

    def __init__(
        self, *, check_every: int = 100, interval: Interval | None = None, frequency: int = 1
    ) -> None:
        super().__init__(interval=interval, frequency=frequency)
        if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
            raise ValueError(
                f"Parameter `check_every` should be an int >= 1. Found {check_every!r}."
            )
        self.check_every = check_every
        self._nonpositive = _NonPositiveCounter()

    @property
    def _requires_positive(self) -> bool:
        return True

    def init_state(self, num_tasks: int) -> None:
        self._nonpositive.reset(num_tasks)

    #: the count of non-positive losses is kept when a skipped step is rolled back: the loss was
    #: still bad, and the check must still report it
    _diagnostic_attrs: ClassVar[tuple[str, ...]] = ("_nonpositive",)

    def _state_names(self) -> tuple[str, ...]:
        return (*super()._state_names(), "_nonpositive")

    def after_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._optimizer_steps % self.check_every == 0:
            self.check_losses(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_losses(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def _shared_weights(
        self,
        loss: Tensor,
        losses: Tensor,
        usable: Tensor,
        local: Tensor,
        weights_fn: Callable[[Tensor, Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Make the effective weights identical on every DDP rank.

        ``local`` are the weights of this rank's losses. Under DDP the weights are recomputed by
        ``weights_fn(mean_losses, usable_anywhere)`` from the losses averaged over the ranks where
        each task is usable (one small all-reduce), and the returned loss gets the zero-valued
        correction ``sum_i (w_i - local_i) L_i`` (weights detached): the network's gradient is
        ``sum_i w_i grad L_i`` with the same ``w`` on every rank, the loss value stays the
        method's. On one process: ``(loss, local)`` unchanged.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return loss, local
        current = losses.detach()
        mask = usable.to(current.dtype)
        stats = reduce_sum(trainer, torch.cat([torch.where(usable, current, 0.0), mask]))
        total, count = stats.chunk(2)
        anywhere = count > 0
        mean = torch.where(anywhere, total / count.clamp_min(1.0), 1.0)
        shared = weights_fn(mean, anywhere).to(current.dtype)
        correction = ((shared - local).detach() * torch.where(usable, losses, 0.0)).sum()
        return loss + correction - correction.detach(), shared

    def check_losses(self, trainer: pl.Trainer) -> None:
        """Raise if a task had a non-positive loss since the start (one host synchronisation).

        Raises:
            ValueError: naming the tasks, the number of steps and the lowest value seen.
        """
        if not self._requires_positive or not self.tasks:
            return
        count = reduce_sum(trainer, self._nonpositive.count)
        if not bool((count > 0).any()):  # the one host synchronisation per check
            return
        counts = count.tolist()
        lowest = self._nonpositive.lowest.tolist()
        found = ", ".join(
            f"'{t}' in {int(c)} step(s) (lowest {low:.4g})"
            for t, c, low in zip(self.tasks, counts, lowest, strict=True)
            if c > 0
        )
        raise ValueError(
            f"{type(self).__name__} needs {self._needs}, but got non-positive values for task "
            f"{found}, up to global step {trainer.global_step} (epoch {trainer.current_epoch}). "
            f"Those steps left the task out; no NaN reached the weights or the model. "
            f"{self._cure}"
        )


def _validate_per_task(
    values: Sequence[float] | Mapping[str, float] | None, name: str
) -> list[float] | dict[str, float] | None:
    """Check a per-task number argument: ``None``, a list (task order) or a dict by task name."""
    if values is None:
        return None
    if isinstance(values, Mapping):
        numbers = list(values.values())
    elif isinstance(values, Sequence) and not isinstance(values, str):
        numbers = list(values)
    else:
        raise ValueError(
            f"Parameter `{name}` should be a list of numbers (one per task) or a dict of task "
            f"name to number. Found {values!r}."
        )
    for v in numbers:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) < float("inf"):
            raise ValueError(f"Parameter `{name}` should hold finite numbers. Found {values!r}.")
    if isinstance(values, Mapping):
        return {str(k): float(v) for k, v in values.items()}
    return [float(v) for v in numbers]


def _per_task_tensor(
    values: list[float] | dict[str, float] | None,
    tasks: Sequence[str],
    name: str,
    default: float = 0.0,
) -> Tensor:
    """The ``[T]`` tensor of a validated per-task argument, in the module's task order."""
    if values is None:
        return torch.full((len(tasks),), default)
    if isinstance(values, dict):
        unknown = sorted(set(values) - set(tasks))
        if unknown:
            raise ValueError(
                f"Parameter `{name}` names unknown task(s) {unknown}; the module's tasks are "
                f"{list(tasks)}."
            )
        return torch.tensor([values.get(t, default) for t in tasks])
    if len(values) != len(tasks):
        raise ValueError(
            f"Parameter `{name}` should have one number per task ({len(tasks)}: {list(tasks)}). "
            f"Found {len(values)} numbers."
        )
    return torch.tensor(values)
