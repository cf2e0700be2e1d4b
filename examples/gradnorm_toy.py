"""GradNorm's synthetic toy (Chen et al., ICML 2018, Sec. 4): weights order inversely to scale.

    python examples/gradnorm_toy.py --logdir runs                 # 4 tasks, ~1 min
    python examples/gradnorm_toy.py --sigmas 1 100 --steps 3000   # the paper's 2-task case

T regression tasks share one network. Task i's target is

    f_i(x) = sigma_i * tanh((B + eps_i) x / sqrt(250 * 13.5)),   x ~ N(0, I_250),  f_i in R^100,

with the elements of B drawn from N(0, 10) and those of eps_i from N(0, 3.5) (variances), as in
the paper; the division by ``sqrt(250 * (10 + 3.5))`` keeps the pre-activations at unit scale
(the paper does not give the input distribution; without it the tanh saturates into signs). The
tasks differ only by their scale sigma_i, so their losses and gradients differ by about
sigma_i^2. The network is the paper's: a 4-layer ReLU trunk of 100 units and one affine head per
task, trained with Adam (learning rate 1e-3, batch 100) under ``GradNorm(alpha=0.12)`` and, for
comparison, with the plain sum (equal weights).

What it shows (the paper's Fig. 2): GradNorm's weights order inversely to sigma (large-scale tasks
are turned down) and sum to T at every step; with equal weights the small-scale tasks train
slower (higher test-loss ratio L_i(t)/L_i(0)), with GradNorm the ratios are lower and closer
together. Saved: ``<png-dir>/gradnorm_toy.png`` (weights and test-loss ratios over training) and
TensorBoard logs under ``<logdir>/gradnorm_toy/{gradnorm,none}/seed<k>`` (``weights/<task>``,
``test_ratio/<task>``).
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
import torch.nn.functional as F
from _common import (
    PLOTS_HINT,
    WeightRecorder,
    make_trainer,
    markdown_table,
    pyplot,
    quiet,
    run_parallel,
    save_figure,
    seed_all,
    set_log_ticks,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_aw import GradNorm, MultiTaskModule

__all__ = ["ToyRegressor", "main", "make_toy_data", "run_method"]

IN_DIM, OUT_DIM, HIDDEN = 250, 100, 100
B_VAR, EPS_VAR = 10.0, 3.5


def make_toy_data(
    sigmas: Sequence[float], num_train: int, num_test: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs and targets of the toy.

    Args:
        sigmas: the task scales sigma_i (T of them, positive).
        num_train: training samples.
        num_test: held-out samples (the test-loss ratios).
        seed: seed of B, eps_i and the inputs.

    Returns:
        ``(x_train [N, 250], y_train [N, T, 100], x_test, y_test)``.

    Raises:
        ValueError: if a sigma is not positive or fewer than 2 are given.

    Example::

        >>> x, y, xt, yt = make_toy_data([1.0, 10.0], 8, 4)
        >>> x.shape, y.shape, xt.shape
        (torch.Size([8, 250]), torch.Size([8, 2, 100]), torch.Size([4, 250]))
        >>> bool((y[:, 1].abs() <= 10).all()), bool((y[:, 1] / y[:, 0]).abs().max() > 1)
        (True, True)
    """
    if len(sigmas) < 2 or any(not s > 0 for s in sigmas):
        raise ValueError(
            f"Parameter `sigmas` should hold at least 2 positive scales. Found {list(sigmas)}."
        )
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(OUT_DIM, IN_DIM, generator=gen) * math.sqrt(B_VAR)
    mats = [b + torch.randn(OUT_DIM, IN_DIM, generator=gen) * math.sqrt(EPS_VAR) for _ in sigmas]
    norm = math.sqrt(IN_DIM * (B_VAR + EPS_VAR))

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, IN_DIM, generator=gen)
        pairs = zip(sigmas, mats, strict=True)
        y = torch.stack([s * torch.tanh(x @ m.T / norm) for s, m in pairs], dim=1)
        return x, y

    return (*draw(num_train), *draw(num_test))


class ToyRegressor(MultiTaskModule):
    """The paper's network: 4 ReLU layers of 100 units shared, one affine head per task.

    Args:
        num_tasks: T; the tasks are named ``task0``, ``task1``, ...
        lr: Adam's learning rate.

    Example::

        >>> model = ToyRegressor(2)
        >>> x, y, _, _ = make_toy_data([1.0, 2.0], 4, 1)
        >>> sorted(model.task_losses((x, y), 0))
        ['task0', 'task1']
    """

    def __init__(self, num_tasks: int, lr: float = 1e-3) -> None:
        super().__init__(
            tasks=[f"task{i}" for i in range(num_tasks)], optimizer={"name": "adam", "lr": lr}
        )
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Linear(IN_DIM if i == 0 else HIDDEN, HIDDEN), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(HIDDEN, OUT_DIM) for _ in range(num_tasks)])

    def shared_parameters(self) -> Any:
        return self.trunk.parameters()

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        h = self.trunk(x)
        pairs = enumerate(zip(self.tasks, self.heads, strict=True))
        return {t: F.mse_loss(head(h), y[:, i]) for i, (t, head) in pairs}

    @torch.no_grad()
    def test_losses(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-task mean squared error on ``(x, y)``, shape ``[T]``."""
        h = self.trunk(x)
        return torch.stack([F.mse_loss(head(h), y[:, i]) for i, head in enumerate(self.heads)])


class _TestRatios(pl.Callback):
    """Every ``every`` steps: the test-loss ratios L_i(t)/L_i(0), recorded and logged."""

    def __init__(self, x: Tensor, y: Tensor, every: int) -> None:
        self.x, self.y, self.every = x, y, every
        self.steps: list[int] = []
        self.ratios: list[list[float]] = []
        self._initial: Tensor | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._initial = pl_module.test_losses(self.x, self.y)  # type: ignore[operator]
        self.steps.append(0)
        self.ratios.append([1.0] * len(self._initial))

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        ratios = pl_module.test_losses(self.x, self.y) / self._initial  # type: ignore[operator]
        self.steps.append(step)
        self.ratios.append(ratios.tolist())
        tasks = pl_module.tasks  # type: ignore[attr-defined]
        pl_module.log_dict({f"test_ratio/{t}": ratios[i] for i, t in enumerate(tasks)})


def run_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the toy with ``GradNorm`` (``spec["method"] == "gradnorm"``) or the plain sum
    (``"none"``).

    Args:
        spec: ``method``, ``sigmas``, ``alpha``, ``steps``, ``num_train``, ``num_test``,
            ``seed``, ``logdir`` (``None``: no TensorBoard logs).

    Returns:
        ``spec`` plus ``weight_steps``, ``weights`` (``[steps][T]``), ``ratio_steps``, ``ratios``
        (``[evaluations][T]``, test-loss ratios) and ``seconds``.

    Example::

        >>> out = run_method({"method": "gradnorm", "sigmas": [1.0, 8.0], "alpha": 0.12,
        ...                   "steps": 5, "num_train": 500, "num_test": 100, "seed": 0,
        ...                   "logdir": None})
        >>> len(out["weights"]), round(sum(out["weights"][-1]), 5)
        (5, 2.0)
    """
    quiet()
    seed_all(spec["seed"])
    sigmas = spec["sigmas"]
    x, y, x_test, y_test = make_toy_data(sigmas, spec["num_train"], spec["num_test"], spec["seed"])
    model = ToyRegressor(len(sigmas))
    recorder = WeightRecorder()
    ratios = _TestRatios(x_test, y_test, every=max(1, spec["steps"] // 50))
    callbacks: list[pl.Callback] = [recorder, ratios]
    if spec["method"] == "gradnorm":
        callbacks.insert(0, GradNorm(alpha=spec["alpha"]))
    trainer = make_trainer(
        spec["logdir"],
        f"gradnorm_toy/{spec['method']}/seed{spec['seed']}",
        callbacks=callbacks,
        max_steps=spec["steps"],
        log_every_n_steps=max(1, spec["steps"] // 100),
        limit_val_batches=0,
    )
    gen = torch.Generator().manual_seed(spec["seed"])
    data = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True, generator=gen)
    begin = time.perf_counter()
    trainer.fit(model, data)
    return {
        **spec,
        "weight_steps": recorder.steps,
        "weights": [list(w.values()) for w in recorder.weights],
        "ratio_steps": ratios.steps,
        "ratios": ratios.ratios,
        "seconds": time.perf_counter() - begin,
    }


def _plot(gradnorm: dict[str, Any], plain: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    sigmas = gradnorm["sigmas"]
    colors = plt.get_cmap("viridis")([i / max(1, len(sigmas) - 1) for i in range(len(sigmas))])
    fig, (ax_w, ax_r) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    weights = torch.tensor(gradnorm["weights"])
    for i, s in enumerate(sigmas):
        ax_w.plot(gradnorm["weight_steps"], weights[:, i], color=colors[i], label=f"σ={s:g}")
    ax_w.plot(gradnorm["weight_steps"], weights.sum(1), "k:", lw=1, label="sum")
    ax_w.set_yscale("log")
    set_log_ticks(ax_w, float(weights.min()), float(weights.sum(1).max()))
    ax_w.set(xlabel="step", ylabel="weight", title=f"GradNorm(α={gradnorm['alpha']:g}) weights")
    ax_w.legend(fontsize=7, ncol=2)
    for res, style, name in ((gradnorm, "-", "GradNorm"), (plain, "--", "equal")):
        r = torch.tensor(res["ratios"])
        for i in range(len(sigmas)):
            ax_r.plot(res["ratio_steps"], r[:, i], style, color=colors[i], lw=1.2)
        ax_r.plot([], [], style, color="0.3", label=name)
    ax_r.set(xlabel="step", ylabel="test loss L(t)/L(0)", title="test-loss ratios by task")
    ax_r.legend(fontsize=7)
    for ax in (ax_w, ax_r):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; see the module docstring.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).

    Returns:
        ``{"sigmas", "weights" (GradNorm's final weights), "weight_sums" (their sum at every
        step), "ratios" ({"gradnorm": [...], "none": [...]}, final test-loss ratios), "runs",
        "png", "table"}``.

    Example::

        >>> import contextlib, io, tempfile
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     out = main(["--steps", "3", "--num-train", "300", "--logdir", tempfile.mkdtemp(),
        ...                 "--jobs", "1"])
        >>> len(out["weights"]), round(sum(out["weights"]), 5)
        (4, 4.0)
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--alpha", type=float, default=0.12, help="GradNorm's asymmetry")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--num-train", type=int, default=10_000)
    parser.add_argument("--num-test", type=int, default=2_000)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1 suits these tiny models)",
    )
    parser.add_argument("--logdir", default="runs", help="TensorBoard root")
    parser.add_argument("--png-dir", default=None, help="default: <logdir>/gradnorm_toy")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)

    base = {
        "sigmas": list(args.sigmas),
        "alpha": args.alpha,
        "steps": args.steps,
        "num_train": args.num_train,
        "num_test": args.num_test,
        "seed": args.seed,
        "logdir": args.logdir,
    }
    gradnorm, plain = run_parallel(
        run_method, [{**base, "method": "gradnorm"}, {**base, "method": "none"}], jobs=args.jobs
    )
    weights = gradnorm["weights"][-1]
    sums = [sum(w) for w in gradnorm["weights"]]
    ratios = {"gradnorm": gradnorm["ratios"][-1], "none": plain["ratios"][-1]}
    rows = [
        [
            f"task{i}",
            f"{s:g}",
            f"{weights[i]:.3f}",
            f"{ratios['none'][i]:.3f}",
            f"{ratios['gradnorm'][i]:.3f}",
        ]
        for i, s in enumerate(args.sigmas)
    ]
    table = markdown_table(
        ["task", "σ", "GradNorm weight", "test-loss ratio, equal", "test-loss ratio, GradNorm"],
        rows,
    )
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    inverse = order == sorted(range(len(args.sigmas)), key=lambda i: args.sigmas[i])
    print(
        f"\nGradNorm toy: T={len(args.sigmas)}, α={args.alpha}, {args.steps} steps "
        f"(GradNorm {gradnorm['seconds']:.0f} s, equal {plain['seconds']:.0f} s)"
    )
    print(table)
    print(
        f"weights ordered inversely to σ: {inverse}; sum of weights over all steps in "
        f"[{min(sums):.6f}, {max(sums):.6f}] (T = {len(args.sigmas)})"
    )
    for name, r in (("equal", ratios["none"]), ("GradNorm", ratios["gradnorm"])):
        print(
            f"{name:>8}: mean test-loss ratio {sum(r) / len(r):.3f}, spread max/min "
            f"{max(r) / min(r):.3f}"
        )
    png_dir = Path(args.png_dir) if args.png_dir else Path(args.logdir) / "gradnorm_toy"
    png = _plot(gradnorm, plain, png_dir / "gradnorm_toy.png")
    print(f"figure: {png}" if png is not None else f"(no figure: {PLOTS_HINT})")
    print(f"TensorBoard: tensorboard --logdir {Path(args.logdir) / 'gradnorm_toy'}")
    return {
        "sigmas": list(args.sigmas),
        "weights": weights,
        "weight_sums": sums,
        "ratios": ratios,
        "runs": {"gradnorm": gradnorm, "none": plain},
        "png": png,
        "table": table,
    }


if __name__ == "__main__":
    main()
