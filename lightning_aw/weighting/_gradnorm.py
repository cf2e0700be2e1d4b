"""GradNorm (Chen et al., ICML 2018)."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_aw._sharding import Unsharder, check_parameter_gradients
from lightning_aw._utils import AdamState, reduce_sum
from lightning_aw.engine import TaskGradients
from lightning_aw.functional import gradnorm_weight_grad, renormalize
from lightning_aw.module import MultiTaskModule
from lightning_aw.weighting._base import Interval, LossWeighting


class GradNorm(
    LossWeighting,
    name="gradnorm",
    functional="gradnorm_weight_grad",
    stateful=True,
    needs_task_gradients=True,
):
    r"""GradNorm: balance the tasks' gradient norms on one shared layer.

    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018, https://arxiv.org/abs/1711.02257, Alg. 1.

    On the shared layer :math:`W` (by default the last shared weight matrix, see
    :meth:`MultiTaskModule.gradnorm_parameter`), with :math:`G_i = \lVert\nabla_W w_i L_i\rVert`,
    :math:`\tilde L_i = L_i(t)/L_i(0)` and :math:`r_i = \tilde L_i/\operatorname{mean}_j\tilde L_j`:

    .. math::

        L_\text{grad} = \sum_i \bigl\lvert G_i - \bar G\, r_i^{\alpha} \bigr\rvert,

    differentiated with respect to the weights :math:`w` only (the target is a constant, nothing
    flows into the network), followed by an Adam step on :math:`w` and the renormalisation
    :math:`\sum_i w_i = T`. The gradient is taken in closed form,
    :math:`\partial L_\text{grad}/\partial w_i = \operatorname{sign}(G_i - \bar G r_i^\alpha)
    \lVert\nabla_W L_i\rVert`, so each micro-batch costs one small backward per task to :math:`W`.

    Conventions:

    - :math:`w(0) = 1`; weights are clamped at ``1e-6`` before renormalising, so they stay positive.
    - :math:`L_i(0)` is the mean loss of the first update window (the first step's loss with
      ``frequency=1`` and no accumulation, as in the paper), reduced over the DDP ranks. A loss
      ratio with a non-positive loss counts as 1.
    - Within an update window (an accumulation window, ``frequency`` optimizer steps or an epoch)
      the weight gradients of the micro-batches are averaged, over all DDP ranks, then one Adam
      step is taken, so every rank holds identical weights.
    - Under fp16 mixed precision the per-task gradients are taken of the GradScaler-scaled loss and
      unscaled; a window with a non-finite gradient (overflow) leaves the weights unchanged.

    The weights are not in the user's optimizer: GradNorm owns a small Adam (``lr``, default the
    paper's 0.025) whose state is saved with the callback's.

    Args:
        alpha: the asymmetry :math:`\alpha \ge 0` (1.5 on NYUv2, 0.12 on the paper's toy).
        lr: learning rate of the weights' Adam.
        layer: name of the shared parameter :math:`W` (as in ``named_parameters()``); default
            ``MultiTaskModule.gradnorm_parameter()``.
        interval: ``"step"`` (default, the paper) or ``"epoch"``.
        frequency: update every ``frequency`` optimizer steps or epochs.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_aw import GradNorm
        >>> method = GradNorm(alpha=1.5)
        >>> trainer = pl.Trainer(callbacks=[method], max_epochs=5, logger=False)
        >>> method
        GradNorm(alpha=1.5, lr=0.025, layer=None, interval='step', frequency=1)
    """

    total: ClassVar[str | float | None] = "T"
    _state_attrs = ("_weights", "_initial", "_has_initial", "_grad_sum", "_grad_count", "_adam")
    requires_positive_losses: ClassVar[bool] = True
    loss_requirement: ClassVar[str] = "positive task losses (it compares ratios L_i(t) / L_i(0))"

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        layer: str | None = None,
        interval: Interval = "step",
        frequency: int = 1,
    ) -> None:
        super().__init__(interval=interval, frequency=frequency)
        if not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"Parameter `alpha` should be >= 0. Found {alpha!r}.")
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"Parameter `lr` should be > 0. Found {lr!r}.")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.layer = layer
        self._adam = AdamState(lr=self.lr)
        self._weights = torch.ones(0)
        self._initial = torch.ones(0)
        self._has_initial = torch.zeros(0, dtype=torch.bool)
        self._grad_sum = torch.zeros(0)
        self._grad_count = torch.zeros(())
        self._last_loss = torch.zeros(())
        self._param: Tensor | None = None
        self._unsharder: Unsharder | None = None

    def hparams_repr(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lr": self.lr, "layer": self.layer, **super().hparams_repr()}

    def init_state(self, num_tasks: int) -> None:
        self._weights = torch.ones(num_tasks)
        self._initial = torch.ones(num_tasks)
        self._has_initial = torch.zeros(num_tasks, dtype=torch.bool)
        self._grad_sum = torch.zeros(num_tasks)

    def weight_tensor(self) -> Tensor:
        return self._weights

    def log_items(self) -> dict[str, Tensor]:
        return {"gradnorm/loss": self._last_loss}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_unsharder"] = None  # holds the module (rebuilt in on_fit_start)
        return state

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        check_parameter_gradients(
            self,
            trainer,
            "one shared layer",
            "a loss-based method, or a gradient method with source='representation'",
        )
        self._unsharder = None
        if self.layer is None:
            self._param = pl_module.gradnorm_parameter()  # type: ignore[attr-defined]
            self._unsharder = Unsharder.of(pl_module, [self._param], self)
            return
        named = dict(pl_module.named_parameters())
        if self.layer not in named:
            some = ", ".join(list(named)[:8])
            raise MisconfigurationException(
                f"GradNorm(layer={self.layer!r}): no such parameter in "
                f"{type(pl_module).__name__}. Parameter names look like: {some}, ..."
            )
        self._param = named[self.layer]
        self._unsharder = Unsharder.of(pl_module, [self._param], self)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        step = pl_module.step_record if isinstance(pl_module, MultiTaskModule) else None
        if step is None or self._param is None:
            return
        losses, present = step.losses, step.present
        grad_norms = TaskGradients(step, self, self._unsharder).layer_norms(self._param)
        current = losses.detach()
        initial = torch.where(self._has_initial, self._initial, current)
        ok = (initial > 0) & (current > 0)
        ratios = torch.where(ok, current / torch.where(ok, initial, 1.0), 1.0)
        grad, self._last_loss = gradnorm_weight_grad(
            self._weights, grad_norms, ratios, self.alpha, present
        )
        self._grad_sum = self._grad_sum + grad
        self._grad_count = self._grad_count + 1

    def update(self, trainer: pl.Trainer, window_mean: Tensor, window_present: Tensor) -> None:
        stats = reduce_sum(trainer, torch.cat([self._grad_sum, self._grad_count.reshape(1)]))
        grad = stats[:-1] / stats[-1].clamp_min(1.0)
        first = window_present & ~self._has_initial
        self._initial = torch.where(first, window_mean, self._initial)
        self._has_initial = self._has_initial | window_present
        weights = self._adam.update(self._weights, grad)
        self._weights = renormalize(weights, float(self.num_tasks))
        self._grad_sum = torch.zeros_like(self._grad_sum)
        self._grad_count = torch.zeros_like(self._grad_count)
