"""A dense-prediction results table: SceneNet on SyntheticScenes, Δm% in the NYUv2 metric set.

    python examples/scenes.py --out docs/results_scenes.md          # full: a few minutes
    python examples/scenes.py --quick --out docs/results_scenes.md  # about a minute
    python examples/scenes.py --methods none famo --seeds 0 1

``lightning_aw.models.SceneNet`` (a small ResNet-style encoder-decoder, three dense heads) is
trained on ``lightning_aw.datasets.SyntheticScenesDataModule`` (procedurally rendered rooms:
13-class segmentation, depth, surface normals; no download) with a few weighting methods and as
three single-task models (the same network trained on one task each, through a one-hot
weighting). Every run is validated once, at the end, with the NYUv2 metric set
(``lightning_aw.metrics.nyuv2_metrics``: mIoU, pixel accuracy, absolute and relative depth error,
mean and median angular error, shares within 11.25°/22.5°/30°), and Δm% is
``MultiTaskDelta.nyuv2`` against the single-task models of the same seed: the papers' convention
(Nash-MTL, FAMO), the average relative drop over the 9 metrics, lower is better, negative =
better than single-task.

TensorBoard logs under ``<logdir>/scenes/<method>/seed<k>``; the markdown table is printed and
written to ``--out`` (default ``<logdir>/scenes/results.md``).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _common import delta_table, make_trainer, mean_std, quiet, run_parallel, seed_all
from digits_table import SingleTask

from lightning_aw import Weighting
from lightning_aw.datasets import SyntheticScenesDataModule
from lightning_aw.metrics import NYUV2_HIGHER_IS_BETTER, MultiTaskDelta
from lightning_aw.models import SceneNet
from lightning_aw.registry import create_method, list_methods

__all__ = ["METHOD_KWARGS", "main", "make_weighting", "run_one"]

TASKS = ("seg", "depth", "normal")
#: arguments of the methods in this example (the others: registry defaults)
METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "uncertainty": {"classification": ["seg"]},  # the paper's classification form for seg
    "upgrad": {"source": "representation"},  # per-task gradients on the trunk's output
    "mgda": {"source": "representation"},  # MGDA-UB
    "imtl_g": {"source": "representation"},
    "aligned_mtl": {"source": "representation"},
}
DEFAULT_METHODS = ("none", "uncertainty", "dwa", "famo", "upgrad")
FULL = {"num_train": 400, "num_val": 100, "height": 72, "width": 96, "epochs": 5}
QUICK = {"num_train": 160, "num_val": 64, "height": 48, "width": 64, "epochs": 3}
COLUMNS = (
    ("seg", "miou", "mIoU"),
    ("seg", "pix_acc", "pix acc"),
    ("depth", "abs_err", "abs err"),
    ("depth", "rel_err", "rel err"),
    ("normal", "mean", "angle mean"),
    ("normal", "median", "angle median"),
    ("normal", "within_11", "<11.25°"),
    ("normal", "within_22", "<22.5°"),
    ("normal", "within_30", "<30°"),
)


def make_weighting(name: str) -> Weighting | None:
    """The callback of a row: ``stl_<task>`` (single-task), ``none`` (plain sum) or a method.

    Args:
        name: the row's name.

    Example::

        >>> make_weighting("stl_depth"), make_weighting("none")
        (SingleTask(task='depth'), None)
        >>> make_weighting("upgrad").source
        'representation'
    """
    if name.startswith("stl_"):
        return SingleTask(name[len("stl_") :])
    if name == "none":
        return None
    return create_method(name, **METHOD_KWARGS.get(name, {}))


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train SceneNet with one method and one seed; return its validation metrics.

    Args:
        spec: ``method``, ``seed``, ``epochs``, ``num_train``, ``num_val``, ``height``,
            ``width``, ``batch_size``, ``logdir`` (``None``: no TensorBoard logs).

    Returns:
        ``spec`` plus ``metrics`` (``{task: {metric: value}}``) and ``seconds`` (the ``fit``).

    Example::

        >>> out = run_one({"method": "none", "seed": 0, "epochs": 1, "num_train": 8,
        ...                "num_val": 4, "height": 16, "width": 24, "batch_size": 4,
        ...                "logdir": None})
        >>> sorted(out["metrics"]), 0.0 <= out["metrics"]["seg"]["pix_acc"] <= 1.0
        (['depth', 'normal', 'seg'], True)
    """
    quiet()
    seed_all(spec["seed"])
    weighting = make_weighting(spec["method"])
    model = SceneNet()
    trainer = make_trainer(
        spec["logdir"],
        f"scenes/{spec['method']}/seed{spec['seed']}",
        callbacks=[] if weighting is None else [weighting],
        max_epochs=spec["epochs"],
        check_val_every_n_epoch=spec["epochs"],  # validate once, at the end
        log_every_n_steps=10,
    )
    data = SyntheticScenesDataModule(
        num_train=spec["num_train"],
        num_val=spec["num_val"],
        height=spec["height"],
        width=spec["width"],
        batch_size=spec["batch_size"],
        seed=spec["seed"],
    )
    begin = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - begin
    logged = trainer.callback_metrics
    metrics: dict[str, dict[str, float]] = {}
    for task, name, _ in COLUMNS:
        metrics.setdefault(task, {})[name] = float(logged[f"val/{task}/{name}"])
    return {**spec, "metrics": metrics, "seconds": seconds}


def _fmt(name: str, values: Sequence[float]) -> str:
    # fractions as percentages (as the papers print them), depth errors and angles as they are
    if name in ("miou", "pix_acc", "within_11", "within_22", "within_30"):
        return mean_std([100 * v for v in values], 1)
    return mean_std(list(values), 3 if name in ("abs_err", "rel_err") else 2)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; see the module docstring.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).

    Returns:
        ``{"rows": {method: {"metrics": {task: {metric: [per seed]}}, "delta": [per seed],
        "seconds": [per seed]}}, "table": str, "out": Path}``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=["none", *list_methods()],
        metavar="METHOD",
        help=f"rows of the table (default: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK} instead of {FULL}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--logdir", default="runs", help="TensorBoard root")
    parser.add_argument("--out", default=None, help="markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("epochs", "num_train", "num_val", "height", "width"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    stl = [f"stl_{t}" for t in TASKS]
    specs = [
        {**settings, "method": m, "seed": s, "batch_size": args.batch_size, "logdir": args.logdir}
        for s in args.seeds
        for m in [*stl, *args.methods]
    ]
    begin = time.perf_counter()
    results = run_parallel(run_one, specs, jobs=args.jobs)
    elapsed = time.perf_counter() - begin

    def of(method: str) -> list[dict[str, Any]]:
        return [r for r in results if r["method"] == method]

    # per seed: each task's metrics from its own single-task model
    baselines = {
        seed: {t: next(r for r in of(f"stl_{t}") if r["seed"] == seed)["metrics"][t] for t in TASKS}
        for seed in args.seeds
    }

    def delta(run: dict[str, Any]) -> float:
        try:
            metric = MultiTaskDelta.nyuv2(baselines[run["seed"]])
        except ValueError as err:  # a zero baseline (e.g. no pixel within 11.25° after a tiny run)
            print(f"Δm% undefined for seed {run['seed']}: {err}")
            return float("nan")
        metric.update(run["metrics"])
        return float(metric.compute())

    rows: dict[str, dict[str, Any]] = {
        "single-task": {
            "metrics": {
                t: {
                    n: [baselines[s][t][n] for s in args.seeds] for n in baselines[args.seeds[0]][t]
                }
                for t in TASKS
            },
            "delta": [0.0] * len(args.seeds),
            "seconds": [sum(r["seconds"] for r in of(m)) / len(args.seeds) for m in stl],
        }
    }
    for method in args.methods:
        mine = of(method)
        rows[method] = {
            "metrics": {
                t: {n: [r["metrics"][t][n] for r in mine] for n in mine[0]["metrics"][t]}
                for t in TASKS
            },
            "delta": [delta(r) for r in mine],
            "seconds": [r["seconds"] for r in mine],
        }
    arrows = {True: "↑", False: "↓"}
    table = delta_table(
        rows,
        args.methods,
        [f"{label} {arrows[NYUV2_HIGHER_IS_BETTER[t][n]]}" for t, n, label in COLUMNS],
        lambda row: [_fmt(n, row["metrics"][t][n]) for t, n, _ in COLUMNS],
        seconds_digits=0,
    )
    shown = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python examples/scenes.py", *shown])
    header = (
        f"SceneNet on SyntheticScenes: {settings['num_train']} training and {settings['num_val']} "
        f"validation scenes of {settings['height']}×{settings['width']}, {settings['epochs']} "
        f"epochs, batch {args.batch_size}, Adam 1e-3; seeds {args.seeds}"
        f"{' (mean ± std over seeds)' if len(args.seeds) > 1 else ''}. mIoU, pixel accuracy and "
        "the within-angle shares in %, depth errors in metres, angles in degrees. Δm%: "
        "`MultiTaskDelta.nyuv2` against the single-task models of the same seed, the papers' "
        "convention (Nash-MTL/FAMO): the average relative drop over the 9 metrics, lower is "
        "better, negative = better than single-task. Method arguments: registry defaults, "
        "except `uncertainty` (classification form for seg) and `upgrad` "
        '(`source="representation"`).'
    )
    print(f"\n{header}  ({elapsed:.0f} s)")
    print(table)
    out = Path(args.out) if args.out else Path(args.logdir) / "scenes" / "results.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = (
        f"{platform.system()} {platform.machine()}, torch {torch.__version__}, "
        f"{args.jobs} process(es) of {args.threads} thread(s)"
    )
    out.write_text(
        f"# Synthetic-scenes results\n\n{header}\n\nGenerated by `{command}` on "
        f"{datetime.date.today().isoformat()} in {elapsed:.0f} s ({machine}).\n\n{table}\n"
    )
    print(f"table written to {out}")
    return {"rows": rows, "table": table, "out": out}


if __name__ == "__main__":
    main()
