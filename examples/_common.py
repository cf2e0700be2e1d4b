"""Helpers shared by the examples: quiet seeded Trainers, parallel runs, tables and figures.

Not part of the library: the examples import it as a sibling module (``python examples/x.py``
puts ``examples/`` on ``sys.path``).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

__all__ = [
    "PLOTS_HINT",
    "WeightRecorder",
    "make_trainer",
    "markdown_table",
    "mean_std",
    "pyplot",
    "quiet",
    "run_parallel",
    "save_figure",
    "seed_all",
    "set_log_ticks",
]

#: printed instead of saving figures when matplotlib is missing
PLOTS_HINT = "pip install 'lightning-aw[plots]'"

_T = TypeVar("_T")
_R = TypeVar("_R")


def quiet() -> None:
    """Silence Lightning's banners and the data-loader advice that tiny CPU examples trigger.

    Example::

        >>> quiet()
        >>> logging.getLogger("lightning.pytorch").level == logging.ERROR
        True
    """
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists.*")


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (``lightning.seed_everything`` without its log line).

    Args:
        seed: the seed.

    Example::

        >>> seed_all(3); a = torch.rand(1)
        >>> seed_all(3); bool(torch.equal(a, torch.rand(1)))
        True
    """
    pl.seed_everything(seed, verbose=False)


def make_trainer(
    logdir: str | os.PathLike[str] | None,
    name: str,
    version: str | int | None = None,
    callbacks: Iterable[pl.Callback] = (),
    **kwargs: Any,
) -> pl.Trainer:
    """A quiet CPU Trainer that writes TensorBoard logs under ``logdir/name/version_<n>``.

    Args:
        logdir: the TensorBoard root (``--logdir``); ``None``: no logger.
        name: the run, e.g. ``"pareto_toy/mgda/start0"``.
        version: default ``None``: Lightning's next free ``version_<n>``, so running an example
            again adds a run next to the previous one instead of mixing their event files.
        callbacks: the Trainer's callbacks (a weighting method, recorders).
        **kwargs: other ``pl.Trainer`` arguments (``max_epochs``, ``max_steps``, ...).

    Returns:
        The Trainer (no checkpoints, no progress bar, no model summary, no sanity check).

    Example::

        >>> quiet()
        >>> trainer = make_trainer(None, "demo", max_steps=1)
        >>> trainer.logger is None, trainer.max_steps
        (True, 1)
    """
    logger: TensorBoardLogger | bool = False
    if logdir is not None:
        logger = TensorBoardLogger(str(logdir), name=name, version=version, default_hp_metric=False)
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": logger,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


class WeightRecorder(pl.Callback):
    """Records the task weights after every optimizer step (a host read each step: examples only).

    Example::

        >>> recorder = WeightRecorder()
        >>> recorder.weights, recorder.steps
        ([], [])
    """

    def __init__(self) -> None:
        #: one ``{task: weight}`` per optimizer step
        self.weights: list[dict[str, float]] = []
        #: the global step of each record
        self.steps: list[int] = []

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.weights.append(dict(pl_module.task_weights))  # type: ignore[attr-defined]
        self.steps.append(trainer.global_step)


def _init_worker() -> None:
    torch.set_num_threads(1)
    quiet()


def run_parallel(fn: Callable[[_T], _R], items: Sequence[_T], jobs: int = 1) -> list[_R]:
    """``[fn(item) for item in items]``, in ``jobs`` spawned processes of one thread each.

    With ``jobs=1`` everything runs in this process (no start-up cost, easy to debug). ``fn``
    must be a module-level function so the worker processes can import it.

    Args:
        fn: the function to run on each item.
        items: the inputs (picklable).
        jobs: number of worker processes.

    Returns:
        The results, in the order of ``items``.

    Raises:
        ValueError: if ``jobs`` is not a positive int.

    Example::

        >>> run_parallel(abs, [-1, 2, -3])
        [1, 2, 3]
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Parameter `jobs` should be an int >= 1. Found {jobs!r}.")
    if jobs == 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(items)), mp_context=get_context("spawn"), initializer=_init_worker
    ) as pool:
        return list(pool.map(fn, items))


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± std"`` (sample std; just the value for one sample).

    Args:
        values: the samples (e.g. one per seed).
        digits: decimals shown.

    Example::

        >>> mean_std([1.0, 2.0, 3.0], 2)
        '2.00 ± 1.00'
        >>> mean_std([0.5], 1)
        '0.5'
    """
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: bool = True
) -> str:
    """A GitHub-flavoured markdown table; columns after the first are right-aligned.

    Args:
        headers: the column titles.
        rows: the cells (converted with ``str``).
        numeric: right-align every column but the first.

    Raises:
        ValueError: if a row has a different number of cells than ``headers``.

    Example::

        >>> print(markdown_table(["method", "acc"], [["none", "0.5"]]))
        | method | acc |
        |---|---:|
        | none | 0.5 |
    """
    rows = [[str(c) for c in row] for row in rows]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(
                f"Every row should have {len(headers)} cells like `headers`. Found {row!r}."
            )
    align = ["---"] + ["---:" if numeric else "---"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def delta_table(
    rows: dict[str, dict[str, Any]],
    methods: Sequence[str],
    metric_headers: Sequence[str],
    metric_cells: Callable[[dict[str, Any]], list[str]],
    seconds_digits: int,
) -> str:
    """The Markdown table of a Δm% comparison: the single-task models first, then ``methods`` by
    mean Δm% (best first).

    Args:
        rows: per method (and ``"single-task"``), its ``"delta"`` (one Δm% per seed, not read
            for the single-task row) and ``"seconds"`` (one run time per seed; summed for the
            single-task row, which trains one model per task) with the metrics.
        methods: the methods to show after the single-task row.
        metric_headers: the titles of the metric columns.
        metric_cells: the metric cells of one row.
        seconds_digits: decimals of the ``s/run`` column.

    Example::

        >>> rows = {"single-task": {"seconds": [1.0, 2.0], "acc": "0.9"},
        ...         "mgda": {"delta": [-1.0, -3.0], "seconds": [4.0], "acc": "0.95"}}
        >>> print(delta_table(rows, ["mgda"], ["acc ↑"], lambda r: [r["acc"]], 1))
        | method | acc ↑ | Δm% ↓ | s/run |
        |---|---:|---:|---:|
        | single-task | 0.9 | 0 (reference) | 3.0 (3 models) |
        | mgda | 0.95 | -2.00 ± 1.41 | 4.0 |
    """
    order = ["single-task", *sorted(methods, key=lambda m: statistics.fmean(rows[m]["delta"]))]
    cells = []
    for method in order:
        row = rows[method]
        single = method == "single-task"
        seconds = sum(row["seconds"]) if single else statistics.fmean(row["seconds"])
        cells.append(
            [
                method,
                *metric_cells(row),
                "0 (reference)" if single else mean_std(row["delta"], 2),
                f"{seconds:.{seconds_digits}f}" + (" (3 models)" if single else ""),
            ]
        )
    return markdown_table(["method", *metric_headers, "Δm% ↓", "s/run"], cells)


def pyplot() -> Any | None:
    """matplotlib's ``pyplot`` on the non-interactive Agg backend, or ``None`` (with a hint
    printed) when matplotlib is not installed.

    Example::

        >>> plt = pyplot()  # doctest: +SKIP
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no figure is saved: {PLOTS_HINT}")
        return None
    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 90) -> Path:
    """Save a matplotlib figure as PNG (creating the folder), close it, and return its path.

    Args:
        fig: a ``matplotlib.figure.Figure``.
        path: where to write the PNG.
        dpi: resolution (90 keeps the example figures well under 150 kB).

    Example::

        >>> import tempfile
        >>> plt = pyplot()
        >>> fig, ax = plt.subplots(figsize=(2, 2)); _ = ax.plot([0, 1])
        >>> save_figure(fig, Path(tempfile.mkdtemp()) / "a.png").stat().st_size > 0
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def set_log_ticks(ax: Any, low: float, high: float) -> list[float]:
    """Label a log-scaled y axis with the round values 1, 2, 5 x 10^k between ``low / 2`` and
    ``high * 2`` (matplotlib's default labels only the decades).

    Args:
        ax: a matplotlib ``Axes`` with ``set_yscale("log")``.
        low: the smallest value shown (positive).
        high: the largest value shown.

    Returns:
        The ticks set.

    Example::

        >>> plt = pyplot()
        >>> fig, ax = plt.subplots(); ax.set_yscale("log")
        >>> set_log_ticks(ax, 0.3, 4.0)
        [0.2, 0.5, 1.0, 2.0, 5.0]
        >>> plt.close(fig)
    """
    low = max(low, 1e-12)
    ticks = [
        m * 10.0**k
        for k in range(math.floor(math.log10(low / 2)), math.ceil(math.log10(high * 2)) + 1)
        for m in (1.0, 2.0, 5.0)
        if low / 2 <= m * 10.0**k <= high * 2
    ]
    ticks = [float(f"{t:.12g}") for t in ticks]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    from matplotlib.ticker import NullFormatter

    ax.yaxis.set_minor_formatter(NullFormatter())
    return ticks
