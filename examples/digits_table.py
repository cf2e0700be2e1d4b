"""Results table on the two-digit task: every weighting method, several seeds, Δm% vs single-task.

    python examples/digits_table.py --out docs/results_digits.md     # full: 3 seeds, see docs
    python examples/digits_table.py --quick                          # under 3 min on 2 cores
    python examples/digits_table.py --methods none mgda famo --seeds 0 1

Every method of ``lightning_aw.registry.list_methods()`` and the plain sum (``none``) train
``lightning_aw.models.DigitsNet`` on ``lightning_aw.datasets.TwoDigitsDataModule`` (left digit,
right digit: 10-way classifications; their sum: a regression whose squared error dwarfs the
cross-entropies), with the arguments of ``examples/digits.py`` (``make_weighting``). Three
single-task models (the same network trained on one task each, through a one-hot weighting) give
the reference metrics. Δm% (Maninis et al., 2019) is computed with
``lightning_aw.metrics.multitask_delta`` against the single-task means, for each seed, averaged
over the three metrics, in the papers' convention (Nash-MTL, FAMO; ``sign="drop"``): the average
relative drop, lower is better, negative = better than single-task.

Runs are spread over ``--jobs`` processes (one thread each) and every run is seeded: the same
command gives the same table up to floating-point non-determinism. TensorBoard logs under
``<logdir>/digits_table/<method>/seed<k>``; the markdown table is printed and written to
``--out`` (default ``<logdir>/digits_table/results.md``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from _common import delta_table, make_trainer, mean_std, quiet, run_parallel, seed_all
from digits import make_weighting as _digits_weighting
from torch import Tensor

from lightning_aw import LossWeighting, Weighting
from lightning_aw.datasets import TwoDigitsDataModule
from lightning_aw.metrics import multitask_delta
from lightning_aw.models import DigitsNet
from lightning_aw.registry import list_methods

__all__ = ["METRICS", "SingleTask", "delta_m", "main", "make_weighting", "run_one"]

#: (task, metric, higher is better) of DigitsNet, as logged under ``val/<task>/<metric>``
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("left", "acc", True),
    ("right", "acc", True),
    ("sum", "mae", False),
)
#: full and quick settings (``--quick``)
FULL = {"epochs": 8, "train_pairs": 5000, "seeds": [0, 1, 2]}
QUICK = {"epochs": 5, "train_pairs": 2000, "seeds": [0, 1, 2]}


class SingleTask(LossWeighting):
    """Weight 1 on one task and 0 on the others: a single-task model in the multi-task network.

    The other heads get no gradient and the trunk learns from ``task`` alone, exactly as a
    single-task network (their untrained heads are simply ignored).

    Args:
        task: the task to train.

    Raises:
        ValueError: at ``setup`` if ``task`` is not one of the module's tasks.

    Example::

        >>> SingleTask("left")
        SingleTask(task='left')
    """

    total: ClassVar[str | float | None] = None
    _state_attrs: ClassVar[tuple[str, ...]] = ("_onehot",)

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task
        self._onehot = torch.zeros(0)

    def hparams_repr(self) -> dict[str, Any]:
        return {"task": self.task}

    def init_state(self, num_tasks: int) -> None:
        if self.task not in self.tasks:
            raise ValueError(
                f"Parameter `task` of SingleTask should be one of the module's tasks "
                f"{self.tasks}. Found {self.task!r}."
            )
        self._onehot = torch.tensor([float(t == self.task) for t in self.tasks])

    def weight_tensor(self) -> Tensor:
        return self._onehot


def make_weighting(name: str) -> Weighting | None:
    """The callback for a row of the table: ``stl_<task>`` (single-task), ``none`` (plain sum)
    or a registered method with the arguments of ``examples/digits.py``.

    Args:
        name: the row's name.

    Raises:
        ValueError: for an unknown method name.

    Example::

        >>> make_weighting("stl_sum"), make_weighting("none"), make_weighting("gradnorm")
        (SingleTask(task='sum'), None, GradNorm(alpha=1.5, lr=0.025, layer=None, interval='step', frequency=1))
    """  # noqa: E501
    if name.startswith("stl_"):
        return SingleTask(name[len("stl_") :])
    return _digits_weighting(name)


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``DigitsNet`` with one method and one seed; return its validation metrics.

    Args:
        spec: ``method``, ``seed``, ``epochs``, ``train_pairs``, ``val_pairs``, ``logdir``
            (``None``: no TensorBoard logs).

    Returns:
        ``spec`` plus ``metrics`` (``{task: {metric: value}}``, from the validation at the end of
        training) and ``seconds`` (the ``fit``).

    Example::

        >>> out = run_one({"method": "stl_left", "seed": 0, "epochs": 1, "train_pairs": 128,
        ...                "val_pairs": 64, "logdir": None})
        >>> sorted(out["metrics"]), 0.0 <= out["metrics"]["left"]["acc"] <= 1.0
        (['left', 'right', 'sum'], True)
    """
    quiet()
    seed_all(spec["seed"])
    weighting = make_weighting(spec["method"])
    model = DigitsNet()
    trainer = make_trainer(
        spec["logdir"],
        f"digits_table/{spec['method']}/seed{spec['seed']}",
        callbacks=[] if weighting is None else [weighting],
        max_epochs=spec["epochs"],
        check_val_every_n_epoch=spec["epochs"],  # validate once, at the end
        log_every_n_steps=10,
    )
    data = TwoDigitsDataModule(
        train_pairs=spec["train_pairs"], val_pairs=spec["val_pairs"], seed=spec["seed"]
    )
    begin = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - begin
    logged = trainer.callback_metrics
    metrics: dict[str, dict[str, float]] = {}
    for task, name, _ in METRICS:
        metrics.setdefault(task, {})[name] = float(logged[f"val/{task}/{name}"])
    return {**spec, "metrics": metrics, "seconds": seconds}


def delta_m(metrics: dict[str, dict[str, float]], baselines: dict[str, dict[str, float]]) -> float:
    """Δm% of one run against the single-task baselines, averaged over the three metrics, as the
    average drop (lower is better, negative = better than single-task).

    Args:
        metrics: the run's ``{task: {metric: value}}``.
        baselines: the single-task models' metrics, same layout.

    Example::

        >>> base = {"left": {"acc": 0.9}, "right": {"acc": 0.9}, "sum": {"mae": 1.0}}
        >>> run = {"left": {"acc": 0.99}, "right": {"acc": 0.9}, "sum": {"mae": 1.3}}
        >>> round(delta_m(run, base), 6)  # 10 % better, equal, 30 % worse: a 6.67 % drop
        6.666667
    """
    higher = {task: {name: up} for task, name, up in METRICS}
    return float(multitask_delta(metrics, baselines, higher, sign="drop"))


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; see the module docstring.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).

    Returns:
        ``{"rows": {method: {"metrics": {task: {metric: [per seed]}}, "delta": [per seed],
        "seconds": [per seed]}}, "baselines": {task: {metric: mean}}, "table": str,
        "out": Path}``.

    Example::

        >>> import contextlib, io, tempfile
        >>> d = tempfile.mkdtemp()
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     out = main(["--methods", "none", "--seeds", "0", "--epochs", "1",
        ...                 "--train-pairs", "128", "--val-pairs", "64", "--jobs", "1",
        ...                 "--logdir", d])
        >>> sorted(out["rows"]), out["out"].name
        (['none', 'single-task'], 'results.md')
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=["none", *list_methods()],
        metavar="METHOD",
        help="rows of the table (default: none and every registered method)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smaller runs: {QUICK} instead of {FULL}"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--train-pairs", type=int, default=None)
    parser.add_argument("--val-pairs", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--logdir", default="runs", help="TensorBoard root")
    parser.add_argument(
        "--out", default=None, help="markdown file (default: <logdir>/digits_table/results.md)"
    )
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    epochs = args.epochs if args.epochs is not None else preset["epochs"]
    pairs = args.train_pairs if args.train_pairs is not None else preset["train_pairs"]
    methods = list(dict.fromkeys(args.methods or ["none", *list_methods()]))
    stl = [f"stl_{task}" for task, _, _ in METRICS]

    specs = [
        {
            "method": m,
            "seed": s,
            "epochs": epochs,
            "train_pairs": pairs,
            "val_pairs": args.val_pairs,
            "logdir": args.logdir,
        }
        for s in seeds
        for m in [*stl, *methods]
    ]
    begin = time.perf_counter()
    runs = run_parallel(run_one, specs, jobs=args.jobs)
    elapsed = time.perf_counter() - begin

    def of(method: str) -> list[dict[str, Any]]:
        return [r for r in runs if r["method"] == method]

    # single-task reference: each metric from the model trained on its task
    baselines = {
        task: {name: statistics.fmean(r["metrics"][task][name] for r in of(f"stl_{task}"))}
        for task, name, _ in METRICS
    }
    rows: dict[str, dict[str, Any]] = {
        "single-task": {
            "metrics": {
                task: {name: [r["metrics"][task][name] for r in of(f"stl_{task}")]}
                for task, name, _ in METRICS
            },
            "delta": [0.0] * len(seeds),
            "seconds": [sum(r["seconds"] for r in of(m)) / len(seeds) for m in stl],
        }
    }
    for method in methods:
        mine = of(method)
        rows[method] = {
            "metrics": {
                task: {name: [r["metrics"][task][name] for r in mine]} for task, name, _ in METRICS
            },
            "delta": [delta_m(r["metrics"], baselines) for r in mine],
            "seconds": [r["seconds"] for r in mine],
        }
    table = delta_table(
        rows,
        methods,
        [f"{t} {n} {'↑' if up else '↓'}" for t, n, up in METRICS],
        lambda row: [mean_std(row["metrics"][t][n], 3 if n == "acc" else 2) for t, n, _ in METRICS],
        seconds_digits=1,
    )
    shown = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python examples/digits_table.py", *shown])
    header = (
        f"DigitsNet on TwoDigitsDataModule: {pairs} training pairs, {args.val_pairs} validation "
        f"pairs, {epochs} epochs, batch 128, Adam 2e-3; seeds {seeds}; mean ± std over seeds. "
        "Δm%: the average relative drop against the single-task models over the 3 metrics (the "
        "papers' convention, Nash-MTL/FAMO): lower is better, negative = better than single-task."
    )
    print(f"\n{header}  ({elapsed:.0f} s in {args.jobs} process(es))")
    print(table)
    out = Path(args.out) if args.out else Path(args.logdir) / "digits_table" / "results.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# Two-digit results\n\n{header}\n\nGenerated by `{command}` on "
        f"{datetime.date.today().isoformat()} in {elapsed:.0f} s ({args.jobs} processes, "
        f"{_machine()}).\n\n{table}\n"
    )
    print(f"table written to {out}")
    return {"rows": rows, "baselines": baselines, "table": table, "out": out}


if __name__ == "__main__":
    main()
