"""Learning-rate annealing of the loss weights (Wang, Teng & Perdikaris, 2021)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_aw._utils import all_reduce_sum
from lightning_aw.functional._adaptive import _lr_annealing, _lr_annealing_statistics
from lightning_aw.step import StepRecord
from lightning_aw.weighting._base import Interval
from lightning_aw.weighting._shared import SharedGradientWeighting


class LRAnnealing(SharedGradientWeighting, name="lr_annealing", stateful=True):
    r"""Learning-rate annealing: weights from gradient-magnitude ratios against a reference task.

    Wang, Teng & Perdikaris, "Understanding and mitigating gradient pathologies in
    physics-informed neural networks", SIAM J. Sci. Comput. 43(5), 2021,
    https://arxiv.org/abs/2001.04536, Algorithm 1.

    With :math:`r` the reference task (the PDE residual in the paper; its weight stays 1) and
    the statistics taken over the entries of the gradients on ``shared_parameters()``
    (:func:`lightning_aw.functional.lr_annealing`):

    .. math::

        \hat\lambda_i = \frac{\max_\theta \lvert\nabla_\theta L_r\rvert}
            {\overline{\lvert\nabla_\theta \lambda_i L_i\rvert}}, \qquad
        \lambda_i \leftarrow (1-\alpha)\,\lambda_i + \alpha\,\hat\lambda_i \quad (i \ne r).

    Conventions:

    - ``alpha`` :math:`= \alpha`, the weight of the *new* estimate (default 0.9, see
      below); ``statistic="max"`` (the paper) or ``"mean"`` (mean/mean: the form of
      Bischof & Kraus's re-implementation); ``weighted=True`` divides by the gradient of
      :math:`\lambda_i L_i` with the current :math:`\lambda_i`, as Algorithm 1 is written,
      ``weighted=False`` by the gradient of :math:`L_i` (the fixed points differ:
      :math:`\lambda_i^2 = \max\lvert\nabla L_r\rvert/\overline{\lvert\nabla L_i\rvert}` against
      :math:`\lambda_i = \max\lvert\nabla L_r\rvert/\overline{\lvert\nabla L_i\rvert}`).
      ``layerwise=False`` (default) takes the statistics over every entry of the shared
      parameters, as Algorithm 1 reads; ``layerwise=True`` over the weight matrices only
      (parameters of 2+ dimensions, no biases), the mean being the mean of the per-matrix means.
    - Checked against the authors' code (``PredictiveIntelligenceLab/GradientPathologiesPINNs``,
      ``Helmholtz2D_model_tf.py``): it divides by the gradient of :math:`\lambda_i L_i`
      (``weighted=True``), uses the weight matrices and the mean of the per-layer means
      (``layerwise=True``), updates every 10 iterations (``frequency=10``) and weighs the *old*
      value by 0.9, i.e. ``alpha=0.1`` here. ``alpha=0.9`` (the default, weighing the new
      estimate) was not checked against the paper's text: to reproduce the
      authors' runs, use ``LRAnnealing(alpha=0.1, layerwise=True, frequency=10)``. NVIDIA
      Modulus/PhysicsNeMo's ``LRAnnealing`` aggregator is configured with ``update_freq=1``,
      ``alpha=0.01``, ``eps=1e-8`` and a ``ref_key`` (its documented config); its statistics
      were not checked here.
    - The statistics (:math:`\max\lvert\nabla L_r\rvert` or its mean, and
      :math:`\overline{\lvert\nabla L_i\rvert}`) are taken per micro-batch and averaged over the
      micro-batches of the update window where the task is present and over the DDP ranks (one
      small all-reduce), so every rank holds identical weights; they are the statistics of each
      micro-batch's gradient, not of the averaged gradient. Per-task gradients come from
      :mod:`lightning_aw.engine` (one extra backward per task and micro-batch).
    - The update runs after the optimizer step (``interval="step"``, ``frequency=1``: every
      step, as Algorithm 1; ``frequency=k`` updates every ``k`` steps), so the
      weights computed from step :math:`t`'s gradients weight step :math:`t+1`'s losses
      (Algorithm 1 applies them to step :math:`t` already). :math:`\lambda(0) = 1`.
    - Not normalised. A task with a zero gradient, or a window without the reference task,
      keeps its weight; a micro-batch with non-finite gradients (fp16 overflow) is left out.

    Args:
        alpha: :math:`\alpha \in [0, 1]`, the weight of the new estimate.
        reference: the name of the reference task (default: the first task).
        statistic: ``"max"`` or ``"mean"`` of :math:`\lvert\nabla L_r\rvert` in the numerator.
        weighted: whether the denominator is the gradient of :math:`\lambda_i L_i`.
        layerwise: statistics over the weight matrices, averaging their means (the authors'
            code), instead of over every entry.
        interval: ``"step"`` (default) or ``"epoch"``.
        frequency: update every ``frequency`` optimizer steps or epochs.

    Raises:
        ValueError: on arguments out of range; at setup, a ``reference`` that is not a task.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_aw import LRAnnealing
        >>> method = LRAnnealing(alpha=0.9, reference="pde")
        >>> method
        LRAnnealing(alpha=0.9, reference='pde', statistic='max', weighted=True, layerwise=False, interval='step', frequency=1)
        >>> trainer = pl.Trainer(callbacks=[method], max_epochs=5, logger=False)
    """  # noqa: E501

    total: ClassVar[str | float | None] = None
    uses_window_means: ClassVar[bool] = False
    _state_attrs = ("_weights", "_num_sum", "_mean_sum", "_count")

    def __init__(
        self,
        alpha: float = 0.9,
        reference: str | None = None,
        statistic: Literal["max", "mean"] = "max",
        weighted: bool = True,
        layerwise: bool = False,
        interval: Interval = "step",
        frequency: int = 1,
    ) -> None:
        super().__init__(interval=interval, frequency=frequency)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0)
        ):
            raise ValueError(f"Parameter `alpha` should be in [0, 1]. Found {alpha!r}.")
        if reference is not None and not isinstance(reference, str):
            raise ValueError(
                f"Parameter `reference` should be a task name or None. Found {reference!r}."
            )
        if statistic not in ("max", "mean"):
            raise ValueError(
                f"Parameter `statistic` should be 'max' or 'mean'. Found {statistic!r}."
            )
        if not isinstance(weighted, bool):
            raise ValueError(f"Parameter `weighted` should be True or False. Found {weighted!r}.")
        self.alpha = float(alpha)
        self.reference = reference
        self.statistic = statistic
        self.weighted = weighted
        if not isinstance(layerwise, bool):
            raise ValueError(f"Parameter `layerwise` should be True or False. Found {layerwise!r}.")
        self.layerwise = layerwise
        self._columns: Tensor | None = None  # layerwise: the columns of the weight matrices
        self._blocks: list[int] | None = None
        self._ref = 0
        self._weights = torch.ones(0)
        self._num_sum = torch.zeros(())
        self._mean_sum = torch.zeros(0)
        self._count = torch.zeros(0)

    def hparams_repr(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "reference": self.reference,
            "statistic": self.statistic,
            "weighted": self.weighted,
            "layerwise": self.layerwise,
            **super().hparams_repr(),
        }

    def init_state(self, num_tasks: int) -> None:
        if self.reference is None:
            self._ref = 0
        elif self.reference in self.tasks:
            self._ref = self.tasks.index(self.reference)
        else:
            raise ValueError(
                f"{self!r}: the reference task {self.reference!r} is not one of the module's "
                f"tasks {self.tasks}. Pass one of them, or None for the first."
            )
        self._weights = torch.ones(num_tasks)
        self._num_sum = torch.zeros(())
        self._mean_sum = torch.zeros(num_tasks)
        self._count = torch.zeros(num_tasks)

    def weight_tensor(self) -> Tensor:
        return self._weights

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._columns = self._blocks = None
        if not self.layerwise:
            return
        sizes = [p.numel() for p in self._params]
        keep = [p.ndim >= 2 for p in self._params]
        if not any(keep):
            raise MisconfigurationException(
                f"{self!r}: layerwise statistics use the weight matrices of "
                "`shared_parameters()` (parameters of 2 or more dimensions), and there are none. "
                "Use layerwise=False."
            )
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        self._columns = torch.cat(
            [torch.arange(a, a + n) for a, n, k in zip(starts, sizes, keep, strict=True) if k]
        ).to(pl_module.device)
        self._blocks = [n for n, k in zip(sizes, keep, strict=True) if k]

    def observe_gradients(self, step: StepRecord, grads: Tensor, finite: Tensor) -> None:
        absolute = grads.abs()
        if self._columns is not None:
            absolute = absolute.index_select(1, self._columns.to(grads.device))
        numerator, mean_abs = _lr_annealing_statistics(
            absolute, self._ref, self.statistic, self._blocks
        )
        mask = (step.present & finite).to(grads.dtype)
        self._num_sum = self._num_sum.to(grads.device) + numerator * mask[self._ref]
        self._mean_sum = self._mean_sum.to(grads.device) + mean_abs * mask
        self._count = self._count.to(grads.device) + mask

    def update(self, trainer: pl.Trainer, window_mean: Tensor, window_present: Tensor) -> None:
        num_sum, mean_sum, count = all_reduce_sum(
            trainer, self._num_sum.reshape(1), self._mean_sum, self._count
        )
        present = count > 0
        scale = count.clamp_min(1.0)
        numerator = num_sum[0] / scale[self._ref]
        self._weights = _lr_annealing(
            self._weights.to(count.device),
            numerator,
            mean_sum / scale,
            present,
            self._ref,
            self.alpha,
            self.weighted,
        )
        self._num_sum = torch.zeros_like(self._num_sum)
        self._mean_sum = torch.zeros_like(self._mean_sum)
        self._count = torch.zeros_like(self._count)
