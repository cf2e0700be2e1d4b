"""SoftAdapt (Heydari, Thompson & Mehmood, 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_aw.functional import softadapt
from lightning_aw.weighting._base import Interval, LossWeighting


class SoftAdapt(LossWeighting, name="softadapt", stateful=True):
    r"""SoftAdapt: weights from a softmax of the recent slopes of the task losses.

    Heydari, Thompson, Mehmood, "SoftAdapt: Techniques for Adaptive Loss Weighting of Neural
    Networks with Multi-Part Loss Functions", 2019, https://arxiv.org/abs/1912.12355, Sec. 3.1.

    With :math:`\bar L_i(k)` the mean training loss of update window :math:`k` (an epoch by
    default, reduced over all DDP ranks, counting only the batches where the task is present) and
    the slopes :math:`s_i = \bar L_i(k) - \bar L_i(k-1)`:

    .. math::

        w_i = \frac{f_i\, e^{\beta s_i}}{\sum_j f_j\, e^{\beta s_j}}

    with :math:`f_i = 1` (the original variant) or, with ``loss_weighted=True``, the mean of the
    two window means :math:`f_i = (\bar L_i(k) + \bar L_i(k-1))/2` (as the reference
    implementation averages the loss points it takes the slope of). ``normalize=True`` uses the
    normalised slopes :math:`s_i/(\sum_j |s_j| + 10^{-8})`, so :math:`\beta` no longer depends on
    the losses' scale. :math:`\beta > 0` gives more weight to the tasks whose loss falls slowest
    (or rises).

    The weights **sum to 1** (the paper's convention). They are ``1/T`` until two windows have
    been seen; a task absent from a window keeps its last mean (slope 0 until seen in two
    windows). Stateful: the last window means are saved in checkpoints.

    Args:
        beta: :math:`\beta` (default 0.1, the paper's). Negative values favour the tasks that
            improve fastest.
        normalize: use normalised slopes (the paper's "normalized slopes" variant).
        loss_weighted: multiply by the loss values (the "loss weighted" variant); needs positive
            window means.
        interval: ``"epoch"`` (default) or ``"step"`` (windows of ``frequency`` optimizer steps).
        frequency: the window length in epochs or optimizer steps.

    Raises:
        ValueError: on a non-finite ``beta``; at update time with ``loss_weighted=True``, when a
            task's window mean is not positive (one host synchronisation per update).

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import SoftAdapt
        >>> from lightning_aw.functional import softadapt
        >>> method = SoftAdapt(beta=0.1, normalize=True)
        >>> trainer = pl.Trainer(callbacks=[method], max_epochs=5, logger=False)
        >>> softadapt(torch.tensor([-1.0, 2.0]), beta=1.0)  # the rising loss gets the weight
        tensor([0.0474, 0.9526])
    """

    total: ClassVar[str | float | None] = 1
    _state_attrs = ("_weights", "_previous", "_known")

    def __init__(
        self,
        beta: float = 0.1,
        normalize: bool = False,
        loss_weighted: bool = False,
        interval: Interval = "epoch",
        frequency: int = 1,
    ) -> None:
        super().__init__(interval=interval, frequency=frequency)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not abs(beta) < 1e30:
            raise ValueError(f"Parameter `beta` should be a finite number. Found {beta!r}.")
        for name, flag in (("normalize", normalize), ("loss_weighted", loss_weighted)):
            if not isinstance(flag, bool):
                raise ValueError(f"Parameter `{name}` should be a bool. Found {flag!r}.")
        self.beta = float(beta)
        self.normalize = normalize
        self.loss_weighted = loss_weighted
        self._weights = torch.ones(0)
        self._previous = torch.ones(0)
        self._known = torch.zeros(0, dtype=torch.bool)

    def hparams_repr(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "normalize": self.normalize,
            "loss_weighted": self.loss_weighted,
            **super().hparams_repr(),
        }

    def init_state(self, num_tasks: int) -> None:
        self._weights = torch.full((num_tasks,), 1.0 / num_tasks)
        self._previous = torch.ones(num_tasks)
        self._known = torch.zeros(num_tasks, dtype=torch.bool)

    def weight_tensor(self) -> Tensor:
        return self._weights

    def update(self, trainer: pl.Trainer, window_mean: Tensor, window_present: Tensor) -> None:
        if self.loss_weighted:
            bad = window_present & ~(window_mean > 0)
            if bool(bad.any()):  # once per window, not per step
                i = int(bad.nonzero()[0])
                raise ValueError(
                    f"SoftAdapt(loss_weighted=True) needs positive mean losses, but task "
                    f"'{self.tasks[i]}' has mean {float(window_mean[i]):.4g} in window "
                    f"{self._num_updates} (epoch {trainer.current_epoch}). Use a positive loss "
                    "(e.g. add a constant) or loss_weighted=False."
                )
        previous = self._previous
        current = torch.where(window_present, window_mean, previous)
        both = self._known & window_present
        seen = self._known | window_present
        self._previous, self._known = current, seen
        if self._num_updates < 1:
            return  # the weights stay 1/T until two windows have been seen
        slopes = torch.where(both, current - previous, torch.zeros_like(current))
        values = None
        if self.loss_weighted:
            values = torch.where(both, 0.5 * (current + previous), current)
            # a task never seen gets the mean of the others' values (1 if none was seen)
            count = seen.sum()
            mean_seen = torch.where(seen, values, 0.0).sum() / count.clamp_min(1)
            fill = torch.where(count > 0, mean_seen, torch.ones_like(mean_seen))
            values = torch.where(seen, values, fill)
        self._weights = softadapt(slopes, self.beta, normalize=self.normalize, loss_values=values)
