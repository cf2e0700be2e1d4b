"""Loss weightings whose update reads the per-task gradients on the shared parameters."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_aw._sharding import Unsharder, check_parameter_gradients
from lightning_aw.engine import TaskGradients, flatten
from lightning_aw.module import MultiTaskModule
from lightning_aw.step import StepRecord
from lightning_aw.weighting._base import LossWeighting


class SharedGradientWeighting(LossWeighting):
    """A :class:`LossWeighting` that, like GradNorm, looks at per-task gradients: on every
    training micro-batch (in ``on_before_backward``, the graph still alive) it takes the
    gradients of each present task's loss on :meth:`MultiTaskModule.shared_parameters`, through
    :class:`~lightning_aw.engine.TaskGradients` (GradScaler unscaling, sharded parameters, the
    check that every shared parameter is reached), as a float32 ``[T, P]`` matrix (zero rows for
    absent tasks), and hands them to :meth:`observe_gradients`. A micro-batch whose gradients
    are not finite (an fp16 overflow) is passed with ``finite`` False, as a 0-d tensor (no host
    synchronisation). The weights still multiply the losses (one ordinary backward); subclasses
    gather window statistics and update the weights in :meth:`update`.
    """

    needs_task_gradients: ClassVar[bool] = True

    def __init__(self, *, interval: Any = "step", frequency: int = 1) -> None:
        super().__init__(interval=interval, frequency=frequency)
        self._params: list[Tensor] = []
        self._param_names: list[str] = []
        self._checked = False
        self._unsharder: Unsharder | None = None

    def observe_gradients(self, step: StepRecord, grads: Tensor, finite: Tensor) -> None:
        """Record one micro-batch's per-task gradients ``[T, P]`` (float32, unscaled, not
        divided by ``accumulate_grad_batches``; zero rows for absent tasks, zeros where not
        finite)."""

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_params"] = []
        state["_unsharder"] = None
        return state

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        check_parameter_gradients(
            self, trainer, "shared_parameters()", "a loss-based method without task gradients"
        )
        names = {id(p): n for n, p in pl_module.named_parameters()}
        shared = pl_module.shared_parameters()  # type: ignore[operator]
        self._params = [p for p in shared if p.requires_grad]
        self._param_names = [names.get(id(p), "?") for p in self._params]
        self._checked = False
        if not self._params:
            raise MisconfigurationException(
                f"{self!r} found no trainable parameter in "
                f"{type(pl_module).__name__}.shared_parameters(); return the shared trunk's "
                "parameters there."
            )
        self._unsharder = Unsharder.of(pl_module, self._params, self)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        step = pl_module.step_record if isinstance(pl_module, MultiTaskModule) else None
        if step is None or not self._params:
            return
        engine = TaskGradients(step, self, self._unsharder)
        names = None if self._checked else self._param_names
        self._checked = True
        per_task = engine.on_parameters_scaled(self._params, names=names)
        grads = engine.unscale(flatten(per_task, self._params))
        ok = torch.isfinite(grads)
        self.observe_gradients(step, torch.where(ok, grads, 0.0), ok.all())
