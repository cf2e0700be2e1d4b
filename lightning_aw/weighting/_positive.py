"""Shared machinery of the weightings that take logarithms of the task losses."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_aw._utils import reduce_sum
from lightning_aw.weighting._base import LossWeighting


class PositiveLossWeighting(LossWeighting):
    """Base of the weightings whose maths needs positive task losses (logarithms).

    They declare a loss floor of 0 (:meth:`~lightning_aw.Weighting.loss_floor`):
    :class:`~lightning_aw.MultiTaskModule` raises a ``ValueError`` naming the task, its loss and
    the cure at the step a present loss reaches 0, within the finiteness check it runs anyway
    (no extra host synchronisation), so no NaN ever reaches the weights or the model.

    Example::

        >>> from lightning_aw import FAMO, GLS, IMTLL, STCH, ScaleInvariant
        >>> from lightning_aw.weighting import PositiveLossWeighting
        >>> methods = (FAMO, GLS, IMTLL, STCH, ScaleInvariant)
        >>> all(issubclass(m, PositiveLossWeighting) for m in methods)
        True
        >>> import torch
        >>> GLS().loss_floor(torch.ones(3))  # every present loss must be above 0
        tensor([0., 0., 0.])
    """

    requires_positive_losses: ClassVar[bool] = True

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
