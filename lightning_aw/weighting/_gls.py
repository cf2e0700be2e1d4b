"""Geometric loss strategy (Chennupati et al., CVPRW 2019) and the scale-invariant log loss."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_aw.functional import (
    gls_loss,
    gls_weights,
    scale_invariant_loss,
    scale_invariant_weights,
)
from lightning_aw.step import StepRecord
from lightning_aw.weighting._positive import PositiveLossWeighting


class GLS(PositiveLossWeighting, name="gls", functional="gls_weights"):
    r"""Geometric loss strategy: minimise the geometric mean of the task losses.

    Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019,
    https://arxiv.org/abs/1904.08492.

    .. math::

        \mathcal{L} = \Bigl(\prod_{i} L_i\Bigr)^{1/T} = \exp\Bigl(\frac1T\sum_i \log L_i\Bigr),
        \qquad w_i = \frac{\partial\mathcal{L}}{\partial L_i} = \frac{\mathcal{L}}{T L_i}

    over the tasks present in the batch (``T`` counts them), computed in the log domain. No
    hyperparameters and no learned state: the weights are the *effective* weights
    :math:`\mathcal{L}/(T L_i)` of the last training step, which favour the tasks with small
    losses. They are not normalised (``total = None``); before the first step they are ``1/T``.
    Under DDP the effective weights come from the task losses averaged over the ranks (one small
    all-reduce per step): every rank applies the same weights to its own losses.

    Needs positive losses: :class:`~lightning_aw.MultiTaskModule` raises a ``ValueError`` naming
    the task at the step a loss reaches 0 (within its per-step finiteness check).

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import GLS
        >>> from lightning_aw.functional import gls_loss, gls_weights
        >>> trainer = pl.Trainer(callbacks=[GLS()], max_epochs=5, logger=False)
        >>> losses = torch.tensor([1.0, 4.0])
        >>> gls_loss(losses)  # geometric mean (1 * 4) ** (1 / 2)
        tensor(2.)
        >>> gls_weights(losses)  # its gradient: w_i = GM / (T L_i)
        tensor([1.0000, 0.2500])
    """

    total: ClassVar[str | float | None] = None
    _state_attrs = ("_weights",)

    def __init__(self) -> None:
        super().__init__()
        self._weights = torch.ones(0)

    def hparams_repr(self) -> dict[str, Any]:
        return {}

    def init_state(self, num_tasks: int) -> None:
        super().init_state(num_tasks)
        self._weights = torch.full((num_tasks,), 1.0 / num_tasks)

    def weight_tensor(self) -> Tensor:
        return self._weights

    def combine(self, losses: Tensor, present: Tensor) -> Tensor:
        usable = present
        local = gls_weights(losses.detach(), usable)
        loss, self._weights = self._shared_weights(
            gls_loss(losses, usable), losses, usable, local, gls_weights
        )
        return loss

    def combine_step(self, step: StepRecord) -> Tensor:
        if not all(step.present_list):
            return super().combine_step(step)
        # every loss present and checked positive and finite: the geometric mean and its
        # effective weights GLS / (T L_i) directly (what `combine` computes, without its masks)
        losses = step.losses
        loss = torch.exp(torch.log(losses).mean())
        local = loss.detach() / (losses.numel() * losses.detach())
        loss, self._weights = self._shared_weights(loss, losses, step.present, local, gls_weights)
        return loss


class ScaleInvariant(
    PositiveLossWeighting, name="scale_invariant", functional="scale_invariant_weights"
):
    r"""The scale-invariant (logarithmic) loss :math:`\sum_i \log L_i`.

    Multiplying a task's loss by a constant only adds a constant to the total, so the update does
    not depend on the tasks' scales (a baseline in e.g. Navon et al., "Multi-Task Learning as a
    Bargaining Game", ICML 2022, https://arxiv.org/abs/2202.01017, and the optimum of
    :class:`IMTLL`):

    .. math::

        \mathcal{L} = \sum_i \log L_i, \qquad
        w_i = \frac{\partial\mathcal{L}}{\partial L_i} = \frac{1}{L_i}

    over the tasks present in the batch. No hyperparameters and no learned state: the weights are
    the effective weights :math:`1/L_i` of the last training step (1 before the first step); they
    are not normalised (``total = None``). Under DDP they come from the task losses averaged over
    the ranks, so every rank applies the same weights.

    Needs positive losses: :class:`~lightning_aw.MultiTaskModule` raises a ``ValueError`` naming
    the task at the step a loss reaches 0 (within its per-step finiteness check).

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import ScaleInvariant
        >>> from lightning_aw.functional import scale_invariant_loss, scale_invariant_weights
        >>> trainer = pl.Trainer(callbacks=[ScaleInvariant()], max_epochs=5, logger=False)
        >>> scale_invariant_loss(torch.tensor([1.0, 100.0]))  # log 1 + log 100
        tensor(4.6052)
        >>> scale_invariant_weights(torch.tensor([1.0, 100.0]))  # w_i = 1 / L_i
        tensor([1.0000, 0.0100])
    """

    total: ClassVar[str | float | None] = None
    _state_attrs = ("_weights",)

    def __init__(self) -> None:
        super().__init__()
        self._weights = torch.ones(0)

    def hparams_repr(self) -> dict[str, Any]:
        return {}

    def init_state(self, num_tasks: int) -> None:
        super().init_state(num_tasks)
        self._weights = torch.ones(num_tasks)

    def weight_tensor(self) -> Tensor:
        return self._weights

    def combine(self, losses: Tensor, present: Tensor) -> Tensor:
        usable = present
        local = scale_invariant_weights(losses.detach(), usable)
        loss, self._weights = self._shared_weights(
            scale_invariant_loss(losses, usable), losses, usable, local, scale_invariant_weights
        )
        return loss

    def combine_step(self, step: StepRecord) -> Tensor:
        if not all(step.present_list):
            return super().combine_step(step)
        # every loss present and checked positive and finite: sum_i log L_i and 1 / L_i directly
        losses = step.losses
        local = torch.reciprocal(losses.detach())
        loss, self._weights = self._shared_weights(
            torch.log(losses).sum(), losses, step.present, local, scale_invariant_weights
        )
        return loss
