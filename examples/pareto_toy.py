"""The 2-D two-objective toy of CAGrad / Nash-MTL / FAMO: optimisation paths in the loss plane.

    python examples/pareto_toy.py --logdir runs            # 7 methods x 5 starts, ~2 min
    python examples/pareto_toy.py --methods none famo --num-starts 3 --steps 1000

A ``MultiTaskModule`` whose whole "network" is the point ``x = (x1, x2)`` is trained by a real
Lightning Trainer with each weighting callback (the library's callbacks, not their functional
twins), from the five starting points of the papers. The two losses (Liu et al., NeurIPS 2021,
Sec. 5 and App.; the same function in Navon et al. 2022 and Liu et al. 2023) are

    f1 = log(max(|0.5(-x1-7) - tanh(-x2)|, 5e-6)) + 6
    f2 = log(max(|0.5(-x1+3) + tanh(-x2) + 2|, 5e-6)) + 6
    g1 = ((-x1+7)^2 + 0.1(-x2-8)^2)/10 - 20,   g2 = ((-x1-7)^2 + 0.1(-x2-8)^2)/10 - 20
    c1 = max(tanh(x2/2), 0),                     c2 = max(tanh(-x2/2), 0)
    L1 = 0.1 (c1 f1 + c2 g1),                    L2 = c1 f2 + c2 g2

Its Pareto set is approximately ``x2 = -8.3552, x1 in [-7, 7]``. The papers use Adam with
learning rate 1e-3 for tens of thousands of steps; to fit every method and start into a couple of
minutes this example uses Adam with learning rate 2e-2 for 2,000 steps: Adam moves each
coordinate by about the learning rate per step, so the paths have the same length, only coarser.

Printed: each path's final distance to the Pareto front (in the loss plane, ``L1`` scaled by
10) and how many of the starts reach it. Saved: ``<png-dir>/pareto_toy.png`` (paths in the loss
plane, one panel per method, with the Pareto front) and TensorBoard logs under
``<logdir>/pareto_toy/<method>/start<k>``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import (
    PLOTS_HINT,
    make_trainer,
    markdown_table,
    pyplot,
    quiet,
    run_parallel,
    save_figure,
    seed_all,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_aw import FAMO, MultiTaskModule, Weighting
from lightning_aw.registry import create_method, list_methods

__all__ = [
    "DEFAULT_METHODS",
    "PARETO_X2",
    "STARTS",
    "ToyProblem",
    "distance_to_front",
    "main",
    "make_weighting",
    "pareto_front",
    "run_trajectory",
    "toy_losses",
]

#: the second coordinate of the (approximate) Pareto set, for ``x1`` in ``[-7, 7]``
PARETO_X2 = -8.3552
#: the papers' starting points
STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
DEFAULT_METHODS = ("none", "mgda", "pcgrad", "cagrad", "nash_mtl", "famo", "upgrad")
#: lower bounds of the two losses (``L1 > -2``, ``L2 > -20``): FAMO takes log(L - bound)
LOSS_BOUNDS = (-2.0, -20.0)
TASKS = ("L1", "L2")


def toy_losses(x: Tensor) -> Tensor:
    """The two losses of the toy at ``x`` (shape ``[..., 2]``), stacked on the last dimension.

    Args:
        x: points ``(x1, x2)``, any leading shape.

    Returns:
        ``[..., 2]``: ``(L1, L2)``.

    Raises:
        ValueError: if the last dimension of ``x`` is not 2.

    Example::

        On the Pareto set (``c1 = 0``, ``c2 = tanh(4.1776)``, ``g1 = g2 = 4.9013 - 20``):

        >>> toy_losses(torch.tensor([0.0, PARETO_X2])).round(decimals=3)
        tensor([ -1.5090, -15.0920])
    """
    if x.shape[-1] != 2:
        raise ValueError(f"Parameter `x` should have shape [..., 2]. Found {tuple(x.shape)}.")
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.log(torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=5e-6)) + 6
    f2 = torch.log(torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=5e-6)) + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c1 = torch.clamp(torch.tanh(0.5 * x2), min=0)
    c2 = torch.clamp(torch.tanh(-0.5 * x2), min=0)
    return torch.stack([0.1 * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2], dim=-1)


def pareto_front(num: int = 200) -> Tensor:
    """Points of the Pareto front in the loss plane: ``toy_losses`` on the Pareto set.

    Args:
        num: number of points (``x1`` evenly spaced in ``[-7, 7]``).

    Returns:
        ``[num, 2]`` float64 losses ``(L1, L2)``.

    Example::

        >>> front = pareto_front(3)
        >>> front.shape, bool((front[1:, 0] < front[:-1, 0]).all())  # L1 falls as L2 rises
        (torch.Size([3, 2]), True)
    """
    x1 = torch.linspace(-7.0, 7.0, num, dtype=torch.float64)
    return toy_losses(torch.stack([x1, torch.full_like(x1, PARETO_X2)], dim=-1))


def distance_to_front(x: Sequence[float], num: int = 2001) -> float:
    """Distance of the losses at the point ``x`` to the Pareto front, in the loss plane with
    ``L1`` scaled by 10 (undoing the toy's factor 0.1, so both axes are in the same units).

    The loss plane is what the papers draw, and the right place to measure: ``L1`` and ``L2``
    hardly depend on ``x2`` near the front (``c2 = tanh(-x2/2)`` is almost 1), so a path can reach
    the front while ``x2`` is still far from ``PARETO_X2``.

    Args:
        x: a point ``(x1, x2)``.
        num: number of front points searched (a distance accurate to about ``14 / num``).

    Example::

        >>> round(distance_to_front((0.0, PARETO_X2)), 6)  # on the Pareto set
        0.0

        At ``(0, 0)`` both losses are 0; the nearest front points are its ends, ``10 L1 = -0.4``,
        ``L2 = -20`` (``x1 = -7``) and the mirror image:

        >>> round(distance_to_front((0.0, 0.0)), 2)
        19.99
    """
    point = toy_losses(torch.tensor([float(v) for v in x], dtype=torch.float64))
    scale = torch.tensor([10.0, 1.0], dtype=torch.float64)
    return float(((pareto_front(num) - point) * scale).norm(dim=-1).min())


class ToyProblem(MultiTaskModule):
    """The toy as a ``MultiTaskModule``: the only parameter is the point ``x`` (shared by both
    tasks), the batch is ignored.

    Args:
        start: the starting point ``(x1, x2)``.
        lr: Adam's learning rate.

    Example::

        At ``(9, 9)``: ``c1 = tanh(4.5)``, ``c2 = 0``, ``f1 = log 7 + 6``, ``f2 = log 2 + 6``:

        >>> model = ToyProblem((9.0, 9.0))
        >>> {k: round(v.item(), 4) for k, v in model.task_losses(None, 0).items()}
        {'L1': 0.7944, 'L2': 6.6915}
    """

    def __init__(self, start: Sequence[float], lr: float = 2e-2) -> None:
        super().__init__(tasks=TASKS, optimizer={"name": "adam", "lr": lr})
        self.x = nn.Parameter(torch.tensor([float(v) for v in start]))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.x]

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        losses = toy_losses(self.x)
        return {"L1": losses[0], "L2": losses[1]}


def make_weighting(name: str) -> Weighting | None:
    """The weighting callback of ``name`` set up for this toy (``"none"``: the plain sum).

    FAMO gets the losses' lower bounds (it takes ``log(L - bound)``; the toy's losses are
    negative); every other method its defaults.

    Args:
        name: ``"none"`` or a registered method name.

    Raises:
        ValueError: for an unknown method name.

    Example::

        >>> make_weighting("none") is None, type(make_weighting("famo")).__name__
        (True, 'FAMO')
    """
    if name == "none":
        return None
    if name == "famo":
        return FAMO(min_losses=LOSS_BOUNDS)
    return create_method(name)


class _PathRecorder(pl.Callback):
    """Records the point every ``every`` optimizer steps (and the first and last)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.path: list[list[float]] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path.append(pl_module.x.detach().tolist())  # type: ignore[union-attr]

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            self.path.append(pl_module.x.detach().tolist())  # type: ignore[union-attr]


def run_trajectory(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the toy from one start with one method; return its path.

    Args:
        spec: ``method``, ``start`` (index into :data:`STARTS`), ``steps``, ``lr``, ``logdir``
            (``None``: no TensorBoard logs), ``seed``.

    Returns:
        The ``spec`` plus ``path`` (``[[x1, x2], ...]``), ``final_distance``,
        ``start_distance`` and ``seconds``.

    Example::

        >>> out = run_trajectory({"method": "mgda", "start": 1, "steps": 20, "lr": 0.01,
        ...                       "logdir": None, "seed": 0})
        >>> out["final_distance"] < out["start_distance"]
        True
    """
    quiet()
    seed_all(spec["seed"])
    model = ToyProblem(STARTS[spec["start"]], lr=spec["lr"])
    weighting = make_weighting(spec["method"])
    recorder = _PathRecorder(every=max(1, spec["steps"] // 400))
    callbacks: list[pl.Callback] = [recorder] if weighting is None else [weighting, recorder]
    trainer = make_trainer(
        spec["logdir"],
        f"pareto_toy/{spec['method']}/start{spec['start']}",
        callbacks=callbacks,
        max_steps=spec["steps"],
        log_every_n_steps=max(1, spec["steps"] // 200),
        limit_val_batches=0,
    )
    data = DataLoader(TensorDataset(torch.zeros(spec["steps"], 1)), batch_size=1)
    begin = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - begin
    path = recorder.path
    return {
        **spec,
        "path": path,
        "start_distance": distance_to_front(path[0]),
        "final_distance": distance_to_front(path[-1]),
        "seconds": seconds,
    }


def _plot(results: list[dict[str, Any]], methods: Sequence[str], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.0 * cols, 2.8 * rows), sharex=True, sharey=True, squeeze=False
    )
    front = pareto_front().numpy()
    colors = plt.get_cmap("tab10").colors
    for ax, method in zip(axes.flat, methods, strict=False):
        ax.plot(front[:, 0], front[:, 1], color="0.5", lw=4, alpha=0.5, label="Pareto front")
        for res in (r for r in results if r["method"] == method):
            losses = toy_losses(torch.tensor(res["path"], dtype=torch.float64)).numpy()
            color = colors[res["start"] % len(colors)]
            ax.plot(losses[:, 0], losses[:, 1], color=color, lw=1.2)
            ax.plot(losses[0, 0], losses[0, 1], "o", color=color, ms=4)
            ax.plot(losses[-1, 0], losses[-1, 1], "*", color="k", ms=7)
        ax.set_title(method, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("L1")
    for ax in axes[:, 0]:
        ax.set_ylabel("L2")
    axes.flat[0].legend(fontsize=7, loc="upper right")
    fig.suptitle("Paths in the loss plane (o: start, *: end)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; see the module docstring.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).

    Returns:
        ``{"results": [one dict per path, see run_trajectory], "summary": {method: {"reached":
        int, "starts": int, "mean_distance": float}}, "png": Path | None, "table": str}``.

    Example::

        >>> import contextlib, io, tempfile
        >>> d = tempfile.mkdtemp()
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     out = main(["--methods", "mgda", "--num-starts", "1", "--steps", "10",
        ...                 "--logdir", d, "--jobs", "1"])
        >>> out["summary"]["mgda"]["starts"]
        1
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=["none", *list_methods()],
        metavar="METHOD",
        help=f"weighting methods (none: plain sum); default {DEFAULT_METHODS}",
    )
    parser.add_argument("--num-starts", type=int, default=len(STARTS), choices=range(1, 6))
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps per path")
    parser.add_argument("--lr", type=float, default=2e-2, help="Adam learning rate")
    parser.add_argument(
        "--reach",
        type=float,
        default=0.5,
        help="a path reaches the front when it ends closer than this",
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1 suits these tiny models)",
    )
    parser.add_argument("--logdir", default="runs", help="TensorBoard root")
    parser.add_argument("--png-dir", default=None, help="default: <logdir>/pareto_toy")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    args.methods = list(dict.fromkeys(args.methods))

    specs = [
        {
            "method": m,
            "start": s,
            "steps": args.steps,
            "lr": args.lr,
            "logdir": args.logdir,
            "seed": args.seed,
        }
        for m in args.methods
        for s in range(args.num_starts)
    ]
    begin = time.perf_counter()
    results = run_parallel(run_trajectory, specs, jobs=args.jobs)
    elapsed = time.perf_counter() - begin

    rows, summary = [], {}
    for method in args.methods:
        mine = [r for r in results if r["method"] == method]
        reached = sum(r["final_distance"] < args.reach for r in mine)
        mean_dist = sum(r["final_distance"] for r in mine) / len(mine)
        summary[method] = {"reached": reached, "starts": len(mine), "mean_distance": mean_dist}
        dists = " ".join(f"{r['final_distance']:.2f}" for r in mine)
        rows.append([method, f"{reached}/{len(mine)}", f"{mean_dist:.3f}", dists])
    table = markdown_table(["method", "reached", "mean distance", "final distance per start"], rows)
    starts = ", ".join(str(STARTS[s]) for s in range(args.num_starts))
    print(
        f"\nPareto toy: Adam lr={args.lr}, {args.steps} steps from {starts}; "
        f"reached = ends within {args.reach} of the Pareto front.  ({elapsed:.0f} s)"
    )
    print(table)
    png_dir = Path(args.png_dir) if args.png_dir else Path(args.logdir) / "pareto_toy"
    png = _plot(results, args.methods, png_dir / "pareto_toy.png")
    if png is not None:
        print(f"figure: {png}")
    else:
        print(f"(no figure: {PLOTS_HINT})")
    print(f"TensorBoard: tensorboard --logdir {Path(args.logdir) / 'pareto_toy'}")
    return {"results": results, "summary": summary, "png": png, "table": table}


if __name__ == "__main__":
    main()
