"""Equal weighting: the plain sum of the task losses."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_aw.weighting._base import LossWeighting


class EqualWeighting(LossWeighting, name="equal", constant_weights=True):
    r"""Equal weights :math:`w_i = 1`: the loss is :math:`\sum_i L_i` (weights sum to ``T``).

    The baseline every adaptive method is compared with, and what
    :class:`~lightning_aw.MultiTaskModule` does when no weighting callback is given. Stateless.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_aw import EqualWeighting
        >>> from lightning_aw.functional import equal
        >>> trainer = pl.Trainer(callbacks=[EqualWeighting()], max_epochs=1, logger=False)
        >>> equal(3)
        tensor([1., 1., 1.])
    """

    total: ClassVar[str | float | None] = "T"

    def __init__(self) -> None:
        super().__init__()
        self._ones = torch.ones(0)

    def init_state(self, num_tasks: int) -> None:
        self._ones = torch.ones(num_tasks)

    def _move_state(self, device: torch.device) -> None:
        super()._move_state(device)
        self._ones = self._ones.to(device)

    def weight_tensor(self) -> Tensor:
        return self._ones
