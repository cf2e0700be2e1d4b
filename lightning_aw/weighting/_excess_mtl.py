"""ExcessMTL (He et al., ICML 2024)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_aw._utils import all_reduce_sum
from lightning_aw.functional._adaptive import _excess_mtl
from lightning_aw.step import StepRecord
from lightning_aw.weighting._base import Interval
from lightning_aw.weighting._shared import SharedGradientWeighting


class ExcessMTL(SharedGradientWeighting, name="excess_mtl", stateful=True):
    r"""ExcessMTL: weigh the tasks by their estimated excess risks (robust multi-task learning).

    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess
    Risks", ICML 2024, https://openreview.net/forum?id=JzWFmMySpn, Algorithm 1.

    A task's excess risk (its loss minus the unknown Bayes risk, i.e. what training can still
    remove) is estimated by :math:`\tfrac12 g_i^\top H_i^{-1} g_i`, with the Hessian's diagonal
    estimated AdaGrad-style from the accumulated squared gradients; the weights follow an
    exponentiated-gradient step on the estimates, each normalised by the task's first estimate
    (:func:`lightning_aw.functional.excess_mtl`):

    .. math::

        A_i \leftarrow A_i + g_i\odot g_i, \quad
        e_i = \sum_p \frac{g_{ip}^2}{\sqrt{A_{ip}+\epsilon}}, \quad
        \lambda_i \leftarrow T\,\frac{\lambda_i\, e^{\eta e_i/e^{(0)}_i}}
            {\sum_j \lambda_j\, e^{\eta e_j/e^{(0)}_j}} .

    Tasks far from their optimum (large excess risk) gain weight; tasks whose loss is mostly
    irreducible noise (small gradient relative to its history) do not, which is the method's
    robustness to label noise.

    Conventions:

    - :math:`g_i` is the gradient of :math:`L_i` on ``shared_parameters()`` (per-task gradients
      through :mod:`lightning_aw.engine`, one extra backward per task and micro-batch), averaged
      over the micro-batches of the update window where the task is present and over the DDP
      ranks (a ``T×P`` all-reduce per update), so the accumulator :math:`A` and the weights are
      identical on every rank. The update runs after the optimizer step (``interval="step"``,
      ``frequency=1``: every step, as the paper), so the weights computed from step
      :math:`t`'s gradients weight step :math:`t+1`'s losses (the authors' code applies them to
      step :math:`t` already).
    - :math:`\lambda(0) = 1`; the weights **sum to T**. The first update of each task only
      records :math:`e^{(0)}_i` (its exponent is 0 then); a task absent from a window keeps
      its accumulator row and takes exponent 0.
    - :math:`\eta` = ``step_size`` (default 0.01, LibMTL's default ``robust_step_size``; not
      checked against the paper's experiments), :math:`\epsilon = 10^{-7}` under the root (as
      the authors' code as ported to LibMTL, in squared gradient units). The factor
      :math:`\tfrac12` cancels. The accumulation, the estimate, the normalisation by the first
      estimate, the exponentiated step and the total ``T`` were checked against that port.
    - A micro-batch with non-finite gradients (fp16 overflow) is left out of the window; a
      window with none left changes nothing.
    - State (saved in checkpoints): the weights, :math:`e^{(0)}` and the accumulator
      :math:`A` (float32 ``[T, P]``, the size of the shared parameters per task).

    Args:
        step_size: :math:`\eta \ge 0`, the exponentiated-gradient step size.
        interval: ``"step"`` (default) or ``"epoch"``.
        frequency: update every ``frequency`` optimizer steps or epochs.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_aw import ExcessMTL
        >>> method = ExcessMTL(step_size=0.01)
        >>> method
        ExcessMTL(step_size=0.01, interval='step', frequency=1)
        >>> trainer = pl.Trainer(callbacks=[method], max_epochs=5, logger=False)
    """

    total: ClassVar[str | float | None] = "T"
    uses_window_means: ClassVar[bool] = False
    _state_attrs = ("_weights", "_initial", "_accumulator", "_grad_sum", "_grad_count")
    #: :math:`\epsilon` under the root of the accumulator
    eps: ClassVar[float] = 1e-7

    def __init__(
        self, step_size: float = 1e-2, interval: Interval = "step", frequency: int = 1
    ) -> None:
        super().__init__(interval=interval, frequency=frequency)
        if (
            isinstance(step_size, bool)
            or not isinstance(step_size, (int, float))
            or not (math.isfinite(step_size) and step_size >= 0)
        ):
            raise ValueError(
                f"Parameter `step_size` should be a finite number >= 0. Found {step_size!r}."
            )
        self.step_size = float(step_size)
        self._weights = torch.ones(0)
        self._initial = torch.zeros(0)
        self._accumulator = torch.zeros(0, 0)
        self._grad_sum = torch.zeros(0, 0)
        self._grad_count = torch.zeros(0)

    def hparams_repr(self) -> dict[str, Any]:
        return {"step_size": self.step_size, **super().hparams_repr()}

    def init_state(self, num_tasks: int) -> None:
        self._weights = torch.ones(num_tasks)
        self._initial = torch.zeros(num_tasks)
        self._accumulator = torch.zeros(num_tasks, 0)
        self._grad_sum = torch.zeros(num_tasks, 0)
        self._grad_count = torch.zeros(num_tasks)

    def weight_tensor(self) -> Tensor:
        return self._weights

    def observe_gradients(self, step: StepRecord, grads: Tensor, finite: Tensor) -> None:
        mask = (step.present & finite).to(grads.dtype)
        total = self._grad_sum.to(grads.device)
        if total.shape != grads.shape:
            total = torch.zeros_like(grads)
        self._grad_sum = total + grads * mask[:, None]
        self._grad_count = self._grad_count.to(grads.device) + mask

    def update(self, trainer: pl.Trainer, window_mean: Tensor, window_present: Tensor) -> None:
        if self._grad_sum.numel() == 0:
            return  # no gradient seen (no training step in the window)
        total, count = all_reduce_sum(trainer, self._grad_sum, self._grad_count)
        present = count > 0
        grads = total / count.clamp_min(1.0)[:, None]
        acc = self._accumulator.to(grads.device)
        if acc.shape != grads.shape:
            acc = torch.zeros_like(grads)
        self._weights, self._accumulator, self._initial = _excess_mtl(
            self._weights.to(grads.device),
            grads,
            acc,
            self._initial.to(grads.device),
            present,
            self.step_size,
            self.eps,
        )
        self._grad_sum = torch.zeros_like(self._grad_sum)
        self._grad_count = torch.zeros_like(self._grad_count)
