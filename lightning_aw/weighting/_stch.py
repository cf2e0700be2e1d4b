"""Smooth Tchebycheff scalarisation (Lin et al., ICML 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_aw.functional import (
    scale_invariant_loss,
    scale_invariant_weights,
    stch_loss,
    stch_weights,
)
from lightning_aw.step import StepRecord
from lightning_aw.weighting._positive import (
    PositiveLossWeighting,
    _per_task_tensor,
    _validate_per_task,
)


class STCH(PositiveLossWeighting, name="stch", functional="stch_weights", stateful=True):
    r"""Smooth Tchebycheff scalarisation: a smooth minimisation of the worst relative task loss.

    Lin, Zhang, Yang, Liu, Wang, Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024, https://arxiv.org/abs/2402.19078.

    After a warm-up, with the reference point :math:`z` (by default the mean training losses of
    the last warm-up epoch, reduced over the DDP ranks):

    .. math::

        \mathcal{L} = T\mu \log\sum_i \exp\bigl(f_i/\mu\bigr), \qquad
        f_i = \log\frac{L_i}{z_i}\ \text{(default)} \quad\text{or}\quad L_i - z_i,

    a smooth upper bound of :math:`T\max_i f_i` (within :math:`T\mu\log T`): the update goes
    mostly to the task that improved least relative to the reference. The effective weights are
    :math:`w_i = \partial\mathcal{L}/\partial L_i = T\operatorname{softmax}(f/\mu)_i`, divided by
    :math:`L_i` with ``logarithmic=True``; they are not normalised (``total = None``).

    Choices (following the official multi-task code, github.com/Xi-L/STCH, ``STCH_MTL``):

    - Warm-up: the first ``warmup_epochs`` epochs train with :math:`\sum_i \log L_i`
      (``logarithmic=True``) or :math:`\sum_i L_i` (``logarithmic=False``); :math:`z` is the
      mean loss of the last of them. The default 5 reproduces the official schedule (its
      ``STCH_warmup_epoch=4``: four epochs, then a fifth that still trains with the log sum while
      averaging the losses). With a given ``reference`` the warm-up defaults to 0 (STCH from the
      first step).
    - The factor ``T`` (number of tasks present) is the official code's: the gradient with respect
      to :math:`f` sums to ``T`` as in the warm-up's :math:`\sum_i f_i`, so the update's scale does
      not jump when STCH starts. Equal preferences (:math:`\lambda_i = 1`) as in that code.
    - ``T`` counts the tasks present in the batch; absent tasks are left out.

    With ``logarithmic=True`` the losses must be positive: :class:`~lightning_aw.MultiTaskModule`
    raises a ``ValueError`` naming the task at the step a loss reaches 0.
    Stateful: :math:`z` and whether STCH has started are saved in checkpoints. The weights
    reported are those of the last training step (1 before the first); under DDP they come from
    the rank-averaged losses, identical on every rank.

    Args:
        mu: the smoothing :math:`\mu > 0` (default 1, the official code's). Smaller values are
            closer to the (non-smooth) Tchebycheff scalarisation.
        warmup_epochs: epochs trained with the (log) sum before STCH starts (default 5, or 0 when
            ``reference`` is given).
        reference: a fixed reference point :math:`z` instead of the warm-up means: one number per
            task (module order) or a mapping of task name to number (missing tasks: 1 with
            ``logarithmic=True``, else 0).
        logarithmic: compare log losses :math:`f_i = \log(L_i/z_i)` (default) or raw losses
            :math:`f_i = L_i - z_i`.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import STCH
        >>> from lightning_aw.functional import stch_weights
        >>> method = STCH(mu=1.0, warmup_epochs=5)
        >>> trainer = pl.Trainer(callbacks=[method], max_epochs=20, logger=False)
        >>> w = stch_weights(torch.tensor([1.0, 2.0]), reference=torch.ones(2), mu=0.1)
        >>> w  # the task furthest from its reference dominates
        tensor([0.0020, 0.9990])
    """

    total: ClassVar[str | float | None] = None
    _state_attrs = ("_weights", "_reference", "_active")

    def __init__(
        self,
        mu: float = 1.0,
        warmup_epochs: int | None = None,
        reference: Sequence[float] | Mapping[str, float] | None = None,
        logarithmic: bool = True,
    ) -> None:
        super().__init__(interval="epoch", frequency=1)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 < mu < float("inf"):
            raise ValueError(f"Parameter `mu` should be a finite number > 0. Found {mu!r}.")
        if warmup_epochs is None:
            warmup_epochs = 5 if reference is None else 0
        if (
            isinstance(warmup_epochs, bool)
            or not isinstance(warmup_epochs, int)
            or warmup_epochs < 0
        ):
            raise ValueError(
                f"Parameter `warmup_epochs` should be an int >= 0. Found {warmup_epochs!r}."
            )
        if reference is None and warmup_epochs == 0:
            raise ValueError(
                "Parameter `warmup_epochs` should be >= 1 when no `reference` is given: STCH "
                "measures its reference point in the last warm-up epoch. Found 0."
            )
        if not isinstance(logarithmic, bool):
            raise ValueError(f"Parameter `logarithmic` should be a bool. Found {logarithmic!r}.")
        self.mu = float(mu)
        self.warmup_epochs = warmup_epochs
        self.reference = _validate_per_task(reference, "reference")
        self.logarithmic = logarithmic
        if logarithmic and self.reference is not None:
            values = self.reference.values() if isinstance(self.reference, dict) else self.reference
            if any(v <= 0 for v in values):
                raise ValueError(
                    "Parameter `reference` should be positive with logarithmic=True (it compares "
                    f"log L / z). Found {reference!r}."
                )
        self._weights = torch.ones(0)
        self._reference = torch.ones(0)
        self._active = False

    def loss_floor(self, like: Tensor) -> Tensor | None:
        # raw losses (logarithmic=False) may have any sign
        return super().loss_floor(like) if self.logarithmic else None

    def hparams_repr(self) -> dict[str, Any]:
        return {
            "mu": self.mu,
            "warmup_epochs": self.warmup_epochs,
            "reference": self.reference,
            "logarithmic": self.logarithmic,
        }

    def init_state(self, num_tasks: int) -> None:
        super().init_state(num_tasks)
        self._weights = torch.ones(num_tasks)
        default = 1.0 if self.logarithmic else 0.0
        self._reference = _per_task_tensor(self.reference, self.tasks, "reference", default)
        self._active = self.reference is not None and self.warmup_epochs == 0

    @property
    def reference_point(self) -> Tensor:
        """The reference point :math:`z` in use (meaningful once STCH has started), ``[T]``."""
        return self._reference

    @property
    def active(self) -> bool:
        """Whether the warm-up is over and the loss is the smooth Tchebycheff one."""
        return self._active

    def weight_tensor(self) -> Tensor:
        return self._weights

    def combine(self, losses: Tensor, present: Tensor) -> Tensor:
        current = losses.detach()
        usable = present
        if self._active:

            def weights_fn(values: Tensor, mask: Tensor) -> Tensor:
                return stch_weights(
                    values, self._reference, self.mu, logarithmic=self.logarithmic, present=mask
                )

            loss = stch_loss(
                losses, self._reference, self.mu, logarithmic=self.logarithmic, present=usable
            )
            loss, self._weights = self._shared_weights(
                loss, losses, usable, weights_fn(current, usable), weights_fn
            )
            return loss
        if self.logarithmic:
            loss, self._weights = self._shared_weights(
                scale_invariant_loss(losses, usable),
                losses,
                usable,
                scale_invariant_weights(current, usable),
                scale_invariant_weights,
            )
            return loss
        self._weights = usable.to(current.dtype)
        return torch.where(usable, losses, 0.0).sum()

    def combine_step(self, step: StepRecord) -> Tensor:
        if not all(step.present_list):
            return super().combine_step(step)
        # every loss present and checked by the module (finite; positive with logarithmic=True,
        # and so is the reference point): what `combine` computes, without its masks
        losses = step.losses
        current = losses.detach()
        num = losses.numel()
        if self._active:
            reference = self._reference.to(losses)
            if self.logarithmic:
                x = (torch.log(losses) - torch.log(reference)) / self.mu
            else:
                x = (losses - reference) / self.mu
            local = num * torch.softmax(x.detach(), 0)
            if self.logarithmic:
                local = local / current

            def weights_fn(values: Tensor, mask: Tensor) -> Tensor:
                return stch_weights(
                    values, self._reference, self.mu, logarithmic=self.logarithmic, present=mask
                )

            loss = num * self.mu * torch.logsumexp(x, 0)
            loss, self._weights = self._shared_weights(
                loss, losses, step.present, local, weights_fn
            )
            return loss
        if self.logarithmic:
            loss, self._weights = self._shared_weights(
                torch.log(losses).sum(),
                losses,
                step.present,
                torch.reciprocal(current),
                scale_invariant_weights,
            )
            return loss
        self._weights = torch.ones_like(current)
        return losses.sum()

    def update(self, trainer: pl.Trainer, window_mean: Tensor, window_present: Tensor) -> None:
        if self._active or trainer.current_epoch + 1 < self.warmup_epochs:
            return
        if self.reference is None:
            default = torch.full_like(window_mean, 1.0 if self.logarithmic else 0.0)
            if not bool(window_present.all()):  # once, at the end of the warm-up
                missing = [
                    t for t, p in zip(self.tasks, window_present.tolist(), strict=True) if not p
                ]
                rank_zero_warn(
                    f"STCH: task(s) {missing} had no loss in the last warm-up epoch; their "
                    f"reference point is {float(default[0])}."
                )
            self._reference = torch.where(window_present, window_mean, default)
        self._active = True
