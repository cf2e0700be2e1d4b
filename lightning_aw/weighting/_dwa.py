"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_aw.functional import dwa
from lightning_aw.weighting._base import Interval, LossWeighting


class DWA(LossWeighting, name="dwa", stateful=True):
    r"""Dynamic Weight Average: tasks whose loss falls slowly get more weight.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019,
    https://arxiv.org/abs/1803.10704, eq. 7.

    .. math::

        r_i = \frac{\bar L_i(e-1)}{\bar L_i(e-2)}, \qquad
        w_i = T\,\operatorname{softmax}(r / \tau)_i

    with :math:`\bar L` the mean training loss of an update window (an epoch by default, reduced
    over all DDP ranks and counting only the batches where the task is present). The weights are
    1 until two windows have been seen, and always sum to ``T``. A task absent from a whole window
    keeps the ratio 1. Stateful: the last two window means are saved in checkpoints.

    Args:
        temperature: :math:`\tau > 0` (default 2, the paper's).
        interval: ``"epoch"`` (paper) or ``"step"`` (windows of ``frequency`` optimizer steps, as
            some implementations do with e.g. 25 iterations).
        frequency: the window length in epochs or optimizer steps.

    Raises:
        ValueError: on a non-positive temperature; at update time, when a task's mean loss is not
            positive (DWA's ratio needs positive losses).

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import DWA
        >>> from lightning_aw.functional import dwa
        >>> method = DWA(temperature=2.0)
        >>> method
        DWA(temperature=2.0, interval='epoch', frequency=1)
        >>> trainer = pl.Trainer(callbacks=[method], max_epochs=5, logger=False)
        >>> dwa(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]))
        tensor([0.8756, 1.1244])
    """

    total: ClassVar[str | float | None] = "T"
    _state_attrs = ("_weights", "_previous", "_before_previous", "_known")

    def __init__(
        self, temperature: float = 2.0, interval: Interval = "epoch", frequency: int = 1
    ) -> None:
        super().__init__(interval=interval, frequency=frequency)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"Parameter `temperature` should be > 0. Found {temperature!r}.")
        self.temperature = float(temperature)
        self._weights = torch.ones(0)
        self._previous = torch.ones(0)
        self._before_previous = torch.ones(0)
        self._known = torch.zeros(0, dtype=torch.bool)

    def hparams_repr(self) -> dict[str, Any]:
        return {"temperature": self.temperature, **super().hparams_repr()}

    def init_state(self, num_tasks: int) -> None:
        self._weights = torch.ones(num_tasks)
        self._previous = torch.ones(num_tasks)
        self._before_previous = torch.ones(num_tasks)
        self._known = torch.zeros(num_tasks, dtype=torch.bool)

    def weight_tensor(self) -> Tensor:
        return self._weights

    def update(self, trainer: pl.Trainer, window_mean: Tensor, window_present: Tensor) -> None:
        bad = window_present & ~(window_mean > 0)
        if bool(bad.any()):  # once per window, not per step
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"DWA needs positive mean losses, but task '{self.tasks[i]}' has mean "
                f"{float(window_mean[i]):.4g} in window {self._num_updates} (epoch "
                f"{trainer.current_epoch}). Use a positive loss (e.g. add a constant) or another "
                "weighting."
            )
        # a task absent from a window keeps its last mean (ratio 1 until seen in two windows)
        current = torch.where(window_present, window_mean, self._previous)
        before_known = self._known
        self._before_previous, self._previous = self._previous, current
        self._known = self._known | window_present
        if self._num_updates < 1:
            return  # the weights stay 1 until two windows have been seen
        ones = torch.ones_like(current)
        prev = torch.where(before_known, self._previous, ones)
        before = torch.where(before_known, self._before_previous, ones)
        self._weights = dwa(prev, before, self.temperature)
