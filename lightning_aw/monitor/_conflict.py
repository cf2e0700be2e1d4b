"""`GradientConflictMonitor`: pairwise cosines of the task gradients, every N steps."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_aw._sharding import Unsharder, check_parameter_gradients
from lightning_aw._utils import all_reduce_sum
from lightning_aw.engine import TaskGradients, flatten, gram_by_layer, present_mean
from lightning_aw.module import MultiTaskModule
from lightning_aw.monitor._plotting import (
    MISSING_MATPLOTLIB,
    cosine_heatmap,
    log_figure,
    require_matplotlib,
)
from lightning_aw.step import StepRecord

__all__ = ["GradientConflictMonitor"]

log = logging.getLogger(__name__)

Source = Literal["parameters", "representation"]
DDPSync = Literal["local", "global"]


class GradientConflictMonitor(Callback):
    r"""Log how much the tasks' gradients conflict: pairwise cosines, every ``every_n_steps`` steps.

    On its steps it takes each task's gradient :math:`g_i = \nabla L_i` on the shared parameters
    (:meth:`~lightning_aw.MultiTaskModule.shared_parameters`, the default) or on the shared
    representation (``source="representation"``: the tensor the module passes through
    :meth:`~lightning_aw.MultiTaskModule.shared_representation`, much cheaper), and logs

    .. math::

        \cos(g_i, g_j) = \frac{\langle g_i, g_j \rangle}{\lVert g_i\rVert\,\lVert g_j\rVert}

    to every logger as ``<prefix>/cos/<a>/<b>`` (for every pair ``a`` before ``b`` in the task
    order), the fraction of conflicting pairs (:math:`\cos < 0`, Yu et al., "Gradient Surgery for
    Multi-Task Learning", NeurIPS 2020, https://arxiv.org/abs/2001.06782) as
    ``<prefix>/fraction``, the smallest cosine as ``<prefix>/min_cos``, optionally every task's
    gradient norm ``<prefix>/grad_norm/<task>``. The scalars are written at step
    ``trainer.global_step``. At the end of every training epoch it also logs a heatmap of the
    cosine matrix, averaged over the epoch's measurements (each pair over the measurements where
    it is defined), as the image ``<prefix>/heatmap`` on every
    :class:`~lightning.pytorch.loggers.TensorBoardLogger` (when matplotlib is installed): figures
    are drawn at epoch end, never inside a step.

    It works with any weighting callback (or none): the gradients are taken in
    ``on_before_backward``, while the step's graph is alive, with ``torch.autograd.grad(...,
    retain_graph=True)``; Lightning's one backward then runs as usual. Between its steps the
    callback returns at once (no gradient, no host synchronisation). One measurement costs ``T``
    extra backward passes through the trunk (``source="parameters"``) or through the heads only
    (``"representation"``), a ``T×P`` float32 copy of the gradients (``P``: shared parameters)
    and one host synchronisation.

    Details:

    - Gradient methods with a marked representation run the heads on a leaf copy of it; the
      monitor then chains each task's gradient through the trunk's graph itself, so parameter
      cosines are the same as without the cut.
    - The cosines are those of one micro-batch's task losses (the first of the optimizer step
      under gradient accumulation); the norms are the gradients of those losses, not divided by
      ``accumulate_grad_batches``.
    - Precision: the maths runs outside autocast in float32; under fp16 with a GradScaler each
      task loss is scaled before its backward (no underflow) and the gradients are unscaled.
      A measurement whose gradients are not finite is skipped with a debug message on the
      ``lightning_aw.monitor._conflict`` logger and counted in :attr:`num_skipped`.
    - Tasks absent from the batch, and tasks whose gradient is exactly zero, have no cosine: their
      pairs are not logged and do not count in the fraction.
    - DDP: ``ddp_sync="local"`` (default) logs the cosines of rank 0's micro-batch, with no
      communication (the other ranks do nothing). ``"global"`` makes every rank average the
      per-task gradients (parameters: a ``T×P`` all-reduce) or sum the Gram matrices
      (representation: a ``T×T`` all-reduce, the Gram of the concatenated global batch), so the
      cosines are those of the global batch's gradients. All ranks then reduce on the same steps
      and decide identically whether to skip, so nothing can hang.

    Args:
        every_n_steps: measure when ``trainer.global_step % every_n_steps == 0`` (optimizer
            steps; once per step under gradient accumulation).
        source: ``"parameters"`` (the shared parameters) or ``"representation"`` (the marked
            shared representation; per-batch gradients with respect to it, as MGDA-UB).
        log_norms: also log every task's gradient norm.
        heatmap: also log the epoch's mean cosine matrix as a heatmap image at epoch end
            (skipped with one warning without matplotlib).
        ddp_sync: ``"local"`` or ``"global"`` (see above).
        prefix: the first part of every logged name (two monitors, e.g. one per source, need
            different prefixes).

    Raises:
        ValueError: an argument is out of range.
        TypeError: (at ``setup``) the module is not a :class:`~lightning_aw.MultiTaskModule`.
        MisconfigurationException: (at ``setup`` / the first measurement) manual optimization,
            no trainable shared parameter, or no marked representation with
            ``source="representation"``.

    Example::

        >>> from lightning_aw.monitor import GradientConflictMonitor
        >>> monitor = GradientConflictMonitor(every_n_steps=100, source="representation")
        >>> monitor
        GradientConflictMonitor(every_n_steps=100, source='representation')
        >>> monitor.last_cosines is None  # filled in by the first measurement of a fit
        True
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        *,
        source: Source = "parameters",
        log_norms: bool = True,
        heatmap: bool = True,
        ddp_sync: DDPSync = "local",
        prefix: str = "conflict",
    ) -> None:
        super().__init__()
        n = every_n_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"Parameter `every_n_steps` should be an int >= 1. Found {every_n_steps!r}."
            )
        if source not in ("parameters", "representation"):
            raise ValueError(
                f"Parameter `source` should be 'parameters' or 'representation'. Found {source!r}."
            )
        if ddp_sync not in ("local", "global"):
            raise ValueError(
                f"Parameter `ddp_sync` should be 'local' or 'global'. Found {ddp_sync!r}."
            )
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(
                "Parameter `prefix` should be a non-empty string without a trailing '/'. "
                f"Found {prefix!r}."
            )
        self.every_n_steps = every_n_steps
        self.source = source
        self.log_norms = bool(log_norms)
        self.heatmap = bool(heatmap)
        self.ddp_sync = ddp_sync
        self.prefix = prefix
        #: the cosine matrix ``[T, T]`` (float64, NaN where undefined) of the last measurement
        self.last_cosines: Tensor | None = None
        #: the gradient norms ``[T]`` (float64, NaN for absent tasks) of the last measurement
        self.last_norms: Tensor | None = None
        #: the ``global_step`` of the last measurement (``-1``: none yet)
        self.last_step = -1
        #: number of measurements made, and skipped for non-finite gradients
        self.num_measured = 0
        self.num_skipped = 0
        self._tasks: list[str] = []
        self._params: list[Tensor] = []
        self._unsharder: Unsharder | None = None  # FSDP2: sharded -> unsharded parameters
        self._draw = False
        self._warned_matplotlib = False
        # the sum and count of the cosines measured since the last heatmap (CPU float64)
        self._cos_sum: Tensor | None = None
        self._cos_count: Tensor | None = None
        self._first_step = -1

    def __repr__(self) -> str:
        args = [f"every_n_steps={self.every_n_steps}"]
        defaults: dict[str, Any] = {
            "source": "parameters",
            "log_norms": True,
            "heatmap": True,
            "ddp_sync": "local",
            "prefix": "conflict",
        }
        args += [f"{k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v]
        return f"{type(self).__name__}({', '.join(args)})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_params"] = []  # references into the model: re-collected at fit start
        state["_unsharder"] = None
        return state

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # it only acts in training steps
        if not isinstance(pl_module, MultiTaskModule):
            raise TypeError(
                f"{type(self).__name__} reads the task losses of a "
                f"`lightning_aw.MultiTaskModule`, but the Trainer runs a "
                f"`{type(pl_module).__name__}`. Subclass MultiTaskModule."
            )
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{type(self).__name__} needs automatic optimization; "
                f"`{type(pl_module).__name__}.automatic_optimization` is False."
            )
        self._tasks = list(pl_module.tasks)
        if len(self._tasks) < 2:
            rank_zero_warn(
                f"{self!r}: the module has one task, so there is no pair to compare; only the "
                "gradient norm is logged."
            )
        has_tensorboard = any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
        self._draw = self.heatmap and len(self._tasks) >= 2 and has_tensorboard
        if self._draw and require_matplotlib() is None:
            self._draw = False
            if not self._warned_matplotlib:
                self._warned_matplotlib = True
                rank_zero_warn(MISSING_MATPLOTLIB.format(what=f"{type(self).__name__}'s heatmap"))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = []
        self._unsharder = None
        self._cos_sum = self._cos_count = None
        if self.source == "parameters":
            self._params = [p for p in pl_module.shared_parameters() if p.requires_grad]  # type: ignore[operator]
            if not self._params:
                raise MisconfigurationException(
                    f"{self!r} found no trainable parameter in "
                    f"{type(pl_module).__name__}.shared_parameters(); return the shared trunk's "
                    "parameters there, or use source='representation'."
                )
            check_parameter_gradients(
                self, trainer, "shared_parameters()", "source='representation'"
            )
            self._unsharder = Unsharder.of(pl_module, self._params, self)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or step == self.last_step:
            return  # not a monitoring step, or a later micro-batch of the same optimizer step
        if self.ddp_sync == "local" and not trainer.is_global_zero:
            return
        record = pl_module.step_record if isinstance(pl_module, MultiTaskModule) else None
        if record is None or not record.losses.requires_grad:
            return
        self.last_step = step
        with torch.autocast(record.losses.device.type, enabled=False):
            gram, present = self._gram(trainer, record)
        self._report(trainer, gram, present, step)

    # ------------------------------------------------------------------ internals
    def _gram(self, trainer: pl.Trainer, step: StepRecord) -> tuple[Tensor, Tensor]:
        """The ``[T, T]`` float64 CPU Gram matrix of the unscaled task gradients and the ``[T]``
        presence mask (reduced over the ranks with ``ddp_sync="global"``)."""
        engine = TaskGradients(step, self, self._unsharder)
        if self.source == "representation":
            rows = engine.on_representation_scaled()
            leaf = engine.representation()
            per_task = [None if r is None else [r] for r in rows]
            inputs = [leaf]
        else:
            # through the trunk's graph when the heads ran on a leaf copy of the representation
            per_task = engine.on_parameters_scaled(self._params)
            inputs = self._params
        num = step.num_tasks
        if self.ddp_sync == "global" and trainer.world_size > 1:
            G = engine.unscale(flatten(per_task, inputs))  # [T, P]
            if self.source == "representation":
                # the samples differ across ranks: the global batch's Gram is the sum of the
                # local ones (the cosines do not depend on the 1/world_size of the global mean)
                gram, count = all_reduce_sum(trainer, G @ G.T, step.present.float())
            else:
                # the global gradient is the mean of the ranks' gradients (over the ranks where
                # the task is present)
                G, count, _ = present_mean(trainer, G, step.present)
                gram = G @ G.T
            return gram.to("cpu", torch.float64), (count > 0).cpu()
        gram = engine.unscale(engine.unscale(gram_by_layer(per_task, range(len(inputs)), num)))
        return gram.to("cpu", torch.float64), step.present.cpu()

    def _report(self, trainer: pl.Trainer, gram: Tensor, present: Tensor, step: int) -> None:
        sub = gram[present][:, present]
        if not bool(torch.isfinite(sub).all()):
            self.num_skipped += 1
            log.debug(
                "%r: the task gradients at step %d are not finite (an fp16 overflow or a NaN); "
                "the measurement is skipped.",
                self,
                step,
            )
            return
        norms = gram.diagonal().clamp_min(0.0).sqrt()
        norms = torch.where(present, norms, torch.full_like(norms, math.nan))
        valid = present & (norms > 0)
        denom = torch.outer(norms, norms)
        cos = torch.where(
            valid[:, None] & valid[None, :],
            (gram / torch.where(denom > 0, denom, 1.0)).clamp(-1.0, 1.0),
            torch.full_like(gram, math.nan),
        )
        cos.diagonal().copy_(torch.where(valid, 1.0, math.nan))
        self.last_cosines, self.last_norms = cos, norms
        self.num_measured += 1
        if not trainer.is_global_zero:
            return
        metrics: dict[str, float] = {}
        pairs: list[float] = []
        tasks = self._tasks
        for a in range(len(tasks)):
            for b in range(a + 1, len(tasks)):
                value = float(cos[a, b])
                if math.isfinite(value):
                    metrics[f"{self.prefix}/cos/{tasks[a]}/{tasks[b]}"] = value
                    pairs.append(value)
        if pairs:
            metrics[f"{self.prefix}/fraction"] = sum(v < 0 for v in pairs) / len(pairs)
            metrics[f"{self.prefix}/min_cos"] = min(pairs)
        if self.log_norms:
            for t, value in zip(tasks, norms.tolist(), strict=True):
                if math.isfinite(value):
                    metrics[f"{self.prefix}/grad_norm/{t}"] = value
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self._draw and pairs:
            defined = torch.isfinite(cos)
            if self._cos_sum is None or self._cos_count is None:
                self._cos_sum, self._cos_count = torch.zeros_like(cos), torch.zeros_like(cos)
                self._first_step = step
            self._cos_sum += torch.where(defined, cos, 0.0)
            self._cos_count += defined.double()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total, count = self._cos_sum, self._cos_count
        if total is None or count is None:
            return
        self._cos_sum = self._cos_count = None
        mean = torch.where(count > 0, total / count.clamp_min(1.0), math.nan)
        first, last = self._first_step, self.last_step
        span = f"step {first}" if first == last else f"steps {first}-{last}"
        fig = cosine_heatmap(mean.tolist(), self._tasks, f"mean gradient cosines, {span}")
        log_figure(trainer, f"{self.prefix}/heatmap", fig, trainer.global_step)
