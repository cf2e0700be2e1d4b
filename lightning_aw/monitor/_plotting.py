"""Matplotlib figures (optional extra ``plots``) and their way into TensorBoard.

Everything here draws on :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas
directly, never through ``pyplot``: the user's global backend and pyplot's figure registry are left
alone, and a figure is freed as soon as the last reference to it goes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_weights"]

#: the message shown (once per callback) when matplotlib is not installed
MISSING_MATPLOTLIB = (
    "matplotlib is not installed, so {what} draws no figure. Install the plotting extra: "
    "pip install 'lightning-aw[plots]'."
)


def require_matplotlib() -> ModuleType | None:
    """The ``matplotlib.figure`` module, or ``None`` when matplotlib cannot be imported."""
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure
    except ImportError:
        return None
    return matplotlib.figure


def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: Agg, whatever pyplot's backend is
    return fig


def figure_to_rgb(fig: Figure) -> Any:
    """Render ``fig`` with Agg and return an ``H×W×3`` uint8 numpy array."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def log_figure(trainer: pl.Trainer, tag: str, fig: Figure, step: int) -> int:
    """Log ``fig`` as an image to every :class:`TensorBoardLogger` of ``trainer`` (rank 0 only).

    The figure is rendered once, then released (its artists are cleared). Returns the number of
    loggers written to.
    """
    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not loggers or not trainer.is_global_zero:
        fig.clear()
        return 0
    image = figure_to_rgb(fig)
    fig.clear()
    for logger in loggers:
        logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
    return len(loggers)


def _validate_history(
    history: Mapping[str, Sequence[float]], steps: Sequence[int] | None
) -> tuple[list[str], list[list[float]], list[float]]:
    if not isinstance(history, Mapping) or not history:
        raise ValueError(
            "Parameter `history` should be a non-empty mapping of task name -> list of weights. "
            f"Found {history!r}."
        )
    tasks = [str(t) for t in history]
    series = [[float(v) for v in history[t]] for t in history]
    n = len(series[0])
    for task, values in zip(tasks, series, strict=True):
        if len(values) != n:
            raise ValueError(
                f"Every task in `history` needs the same number of points; task {task!r} has "
                f"{len(values)}, task {tasks[0]!r} has {n}."
            )
    if n == 0:
        raise ValueError("Parameter `history` has no points yet; record some weights first.")
    if steps is None:
        xs = [float(i) for i in range(n)]
    else:
        xs = [float(s) for s in steps]
        if len(xs) != n:
            raise ValueError(
                f"Parameter `steps` should have one entry per point ({n}). Found {len(xs)}."
            )
    return tasks, series, xs


def weight_shares(series: Sequence[Sequence[float]]) -> list[list[float]]:
    """Per point, each task's share ``max(w_i, 0) / sum_j max(w_j, 0)``.

    Negative weights (possible for some gradient methods' coefficients) count as 0 in the shares;
    a point whose clipped weights sum to 0 gets equal shares.
    """
    num_tasks = len(series)
    out: list[list[float]] = [[] for _ in range(num_tasks)]
    for point in zip(*series, strict=True):
        clipped = [max(v, 0.0) if math.isfinite(v) else 0.0 for v in point]
        total = sum(clipped)
        for i, v in enumerate(clipped):
            out[i].append(v / total if total > 0 else 1.0 / num_tasks)
    return out


def trajectory_figure(
    tasks: Sequence[str], series: Sequence[Sequence[float]], xs: Sequence[float], xlabel: str
) -> Figure:
    """One line per task: its weight against the step."""
    fig = _new_figure((6.4, 3.6))
    ax = fig.add_subplot()
    marker = "o" if len(xs) <= 30 else None
    for task, values in zip(tasks, series, strict=True):
        ax.plot(xs, values, label=task, marker=marker, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("weight")
    ax.set_title("task weights")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def share_figure(
    tasks: Sequence[str], series: Sequence[Sequence[float]], xs: Sequence[float], xlabel: str
) -> Figure:
    """A stacked-area chart of each task's share of the total weight."""
    fig = _new_figure((6.4, 3.6))
    ax = fig.add_subplot()
    _draw_shares(ax, tasks, series, xs, xlabel)
    return fig


def _draw_shares(
    ax: Any,
    tasks: Sequence[str],
    series: Sequence[Sequence[float]],
    xs: Sequence[float],
    xlabel: str,
) -> None:
    shares = weight_shares(series)
    if len(xs) == 1:  # a stack needs two points to have an area
        xs = [xs[0], xs[0] + 1.0]
        shares = [[s[0], s[0]] for s in shares]
    ax.stackplot(xs, *shares, labels=list(tasks), alpha=0.85)
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of total weight")
    ax.set_title("task weight shares")
    ax.legend(loc="upper left", fontsize="small")


def cosine_heatmap(cosines: Sequence[Sequence[float]], tasks: Sequence[str], title: str) -> Figure:
    """A ``T×T`` heatmap of gradient cosine similarities (NaN cells: undefined, shown blank)."""
    size = 1.2 + 0.6 * len(tasks)
    fig = _new_figure((size + 1.2, size))
    ax = fig.add_subplot()
    image = ax.imshow(cosines, vmin=-1.0, vmax=1.0, cmap="RdBu")
    ax.set_xticks(range(len(tasks)), labels=list(tasks), rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), labels=list(tasks))
    if len(tasks) <= 12:
        for i, row in enumerate(cosines):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    color = "white" if abs(v) > 0.6 else "black"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def plot_weights(
    history: Mapping[str, Sequence[float]],
    path: str | Path | None = None,
    *,
    steps: Sequence[int] | None = None,
    xlabel: str = "step",
    title: str | None = None,
) -> Figure:
    """Draw task-weight trajectories and their stacked shares side by side.

    The left panel has one line per task (its weight against the step), the right one a stacked
    area chart of each task's share ``max(w_i, 0) / sum_j max(w_j, 0)`` (negative coefficients of
    some gradient methods count as 0; a point whose weights sum to 0 is drawn as equal shares).

    The figure is a :class:`matplotlib.figure.Figure` drawn on the Agg canvas directly, so the
    user's pyplot backend is left alone and nothing needs ``plt.close``.

    Args:
        history: task name -> its weights, one value per point (e.g.
            :attr:`WeightFigures.history <lightning_aw.monitor.WeightFigures.history>`).
        path: when given, the figure is also saved there (PNG for a ``.png`` name; any format
            matplotlib knows from the suffix). Missing parent folders are created.
        steps: the x value of every point (default ``0, 1, 2, ...``), e.g.
            :attr:`WeightFigures.steps <lightning_aw.monitor.WeightFigures.steps>`.
        xlabel: the x-axis label.
        title: an optional title over both panels.

    Returns:
        The figure (two axes: trajectories, shares).

    Raises:
        ImportError: matplotlib is not installed (``pip install 'lightning-aw[plots]'``).
        ValueError: ``history`` is empty, its tasks have different lengths, or ``steps`` does not
            have one entry per point.

    Example::

        >>> from lightning_aw.monitor import plot_weights
        >>> fig = plot_weights({"a": [1.0, 1.4, 1.8], "b": [1.0, 0.6, 0.2]}, steps=[0, 50, 100])
        >>> len(fig.axes)
        2
        >>> [round(float(v), 2) for v in fig.axes[0].lines[1].get_ydata()]
        [1.0, 0.6, 0.2]
    """
    if require_matplotlib() is None:
        raise ImportError(MISSING_MATPLOTLIB.format(what="plot_weights"))
    tasks, series, xs = _validate_history(history, steps)
    fig = _new_figure((11.0, 3.8))
    left, right = fig.subplots(1, 2)
    marker = "o" if len(xs) <= 30 else None
    for task, values in zip(tasks, series, strict=True):
        left.plot(xs, values, label=task, marker=marker, markersize=3)
    left.set_xlabel(xlabel)
    left.set_ylabel("weight")
    left.set_title("task weights")
    left.grid(alpha=0.3)
    left.legend(loc="best", fontsize="small")
    _draw_shares(right, tasks, series, xs, xlabel)
    if title:
        fig.suptitle(title)
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target)
    return fig
