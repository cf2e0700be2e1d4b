"""`WeightFigures`: task-weight trajectories and stacked shares as TensorBoard figures."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_aw.monitor._plotting import (
    MISSING_MATPLOTLIB,
    log_figure,
    require_matplotlib,
    share_figure,
    trajectory_figure,
)

__all__ = ["WeightFigures"]


class WeightFigures(Callback):
    """Log figures of the task weights to TensorBoard: trajectories and stacked shares.

    It records :attr:`MultiTaskModule.task_weights <lightning_aw.MultiTaskModule.task_weights>`
    (the weights applied at the step, after any transform; the same values as the scalars
    ``weights/<task>``) on every step where ``trainer.global_step % every_n_steps == 0`` (default:
    the Trainer's ``log_every_n_steps``), once per optimizer step. At the end of every
    ``every_n_epochs``-th training epoch it logs to every
    :class:`~lightning.pytorch.loggers.TensorBoardLogger` two images:

    - ``weights/trajectories``: one line per task, its weight against the step so far;
    - ``weights/shares``: a stacked-area chart of each task's share
      ``max(w_i, 0) / sum_j max(w_j, 0)`` (negative coefficients count as 0).

    The history stays bounded: when it holds ``max_points`` points, every second point is dropped
    and the recording interval doubles, so a long run keeps at most ``max_points`` evenly spaced
    points. The history is saved in checkpoints (``state_dict``: plain lists), so a resumed run
    draws the whole trajectory. Reading the weights costs one host synchronisation on recording
    steps only; figures are drawn at epoch end, never in the step.

    Rank 0 only: under DDP the other ranks record nothing (the weights are identical on every
    rank anyway). Without matplotlib the callback warns once (``pip install
    'lightning-aw[plots]'``) and does nothing else. Without a TensorBoard logger it still records
    :attr:`history` (for :func:`~lightning_aw.monitor.plot_weights`) but logs no figure.

    Args:
        every_n_epochs: draw at the end of every ``every_n_epochs``-th training epoch.
        every_n_steps: record every ``every_n_steps`` optimizer steps (``None``: the Trainer's
            ``log_every_n_steps``).
        max_points: the most points kept (an even number >= 4).

    Raises:
        ValueError: an argument is out of range.

    Example::

        >>> from lightning_aw.monitor import WeightFigures, plot_weights
        >>> figures = WeightFigures(every_n_epochs=5, max_points=500)
        >>> figures
        WeightFigures(every_n_epochs=5, every_n_steps=None, max_points=500)
        >>> figures.steps, figures.history  # filled in during fit; then, for a PNG:
        ([], {})
        >>> # plot_weights(figures.history, "weights.png", steps=figures.steps)
    """

    def __init__(
        self, every_n_epochs: int = 1, every_n_steps: int | None = None, max_points: int = 1000
    ) -> None:
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is None and name == "every_n_steps":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Parameter `{name}` should be an int >= 1. Found {value!r}.")
        if (
            not isinstance(max_points, int)
            or isinstance(max_points, bool)
            or max_points < 4
            or max_points % 2
        ):
            raise ValueError(
                f"Parameter `max_points` should be an even int >= 4. Found {max_points!r}."
            )
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.max_points = max_points
        self._tasks: list[str] = []
        self._steps: list[int] = []
        self._weights: list[list[float]] = []
        #: the recording interval is ``every_n_steps * _stride`` (doubles when the history halves)
        self._stride = 1
        self._last_step = -1
        self._enabled = True
        self._warned = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(every_n_epochs={self.every_n_epochs}, "
            f"every_n_steps={self.every_n_steps}, max_points={self.max_points})"
        )

    # ------------------------------------------------------------------ public state
    @property
    def steps(self) -> list[int]:
        """The global steps of the recorded points."""
        return list(self._steps)

    @property
    def history(self) -> dict[str, list[float]]:
        """Task name -> its recorded weights (one per :attr:`steps` entry)."""
        if not self._weights:
            return {}
        return {t: [w[i] for w in self._weights] for i, t in enumerate(self._tasks)}

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if require_matplotlib() is None:
            self._enabled = False
            if not self._warned:
                self._warned = True
                rank_zero_warn(MISSING_MATPLOTLIB.format(what=type(self).__name__))
            return
        tasks = getattr(pl_module, "tasks", None)
        if tasks is None or not hasattr(pl_module, "task_weights"):
            raise TypeError(
                f"{type(self).__name__} draws the task weights of a "
                f"`lightning_aw.MultiTaskModule`, but the Trainer runs a "
                f"`{type(pl_module).__name__}`. Subclass MultiTaskModule."
            )
        if self._tasks and list(tasks) != self._tasks:
            # a reused callback (or a restored history) from another task list
            self._steps, self._weights, self._stride, self._last_step = [], [], 1, -1
        self._tasks = list(tasks)
        if not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            rank_zero_info(
                f"{type(self).__name__}: the Trainer has no TensorBoardLogger, so no figure is "
                "logged; `history` still records the weights."
            )

    def _interval(self, trainer: pl.Trainer) -> int:
        base = self.every_n_steps if self.every_n_steps is not None else trainer.log_every_n_steps
        return max(int(base), 1) * self._stride

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        # here the step's weights have been applied (gradient methods compute theirs in the step)
        if not self._enabled or not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step == self._last_step or step % self._interval(trainer) != 0:
            return
        self._last_step = step
        if len(self._steps) >= self.max_points:
            self._steps = self._steps[::2]
            self._weights = self._weights[::2]
            self._stride *= 2
            if step % self._interval(trainer) != 0:
                return
        weights = pl_module.task_weights  # type: ignore[attr-defined]
        self._steps.append(step)
        self._weights.append([float(weights[t]) for t in self._tasks])

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero or not self._steps:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            return
        series = [[w[i] for w in self._weights] for i in range(len(self._tasks))]
        xs = [float(s) for s in self._steps]
        step = trainer.global_step
        log_figure(
            trainer,
            "weights/trajectories",
            trajectory_figure(self._tasks, series, xs, "step"),
            step,
        )
        log_figure(trainer, "weights/shares", share_figure(self._tasks, series, xs, "step"), step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self._tasks),
            "steps": list(self._steps),
            "weights": [list(w) for w in self._weights],
            "stride": self._stride,
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        tasks = list(state_dict.get("tasks", []))
        if self._tasks and tasks and tasks != self._tasks:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's weight history is for tasks {tasks}, "
                f"this run has {self._tasks}; the history starts afresh."
            )
            return
        self._tasks = tasks or self._tasks
        self._steps = [int(s) for s in state_dict.get("steps", [])]
        self._weights = [[float(v) for v in w] for w in state_dict.get("weights", [])]
        self._stride = int(state_dict.get("stride", 1))
        self._last_step = int(state_dict.get("last_step", -1))
