"""Kendall, Gal & Cipolla (CVPR 2018): uncertainty weighting learns each task's noise level.

    python examples/uncertainty_noise.py --logdir runs              # noise std 1 and 10, ~30 s
    python examples/uncertainty_noise.py --noise 0.5 2 8

Regression tasks share one network; task k's target is the same kind of smooth function in its
own units plus Gaussian noise of known standard deviation sigma_k:

    y_k = sigma_k * (2 tanh(w_k . x) + e),   e ~ N(0, 1),   x ~ N(0, I_8),

so the noise std of task k is sigma_k and its loss is about sigma_k^2 times the others'. With
``UncertaintyWeighting`` (regression form ``exp(-s_k) L_k / 2 + s_k / 2``, ``s_k = log
sigma_k^2``), the optimum of ``s_k`` is ``exp(s_k) = L_k``: once the network fits the signal,
``L_k`` is the noise variance and the learnt sigma_k = exp(s_k / 2) recovers the true noise std.

Printed: learnt vs true sigma per task, with the network's residual std on held-out data (what
the learnt sigma should match exactly; it is the true sigma up to the fit's remaining error).
Saved: ``<png-dir>/uncertainty_noise.png`` (sigma over training) and TensorBoard logs under
``<logdir>/uncertainty_noise`` (``weights/<task>``, ``uncertainty/log_var/<task>``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import (
    PLOTS_HINT,
    make_trainer,
    markdown_table,
    pyplot,
    quiet,
    save_figure,
    seed_all,
    set_log_ticks,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_aw import MultiTaskModule, UncertaintyWeighting

__all__ = ["NoisyRegressor", "main", "make_noisy_data"]

IN_DIM = 8


def make_noisy_data(
    noise: Sequence[float], num: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs, noisy targets and noise-free targets of the example.

    Args:
        noise: the noise standard deviations sigma_k (one per task, positive).
        num: number of samples.
        seed: seed of the task directions ``w_k`` (fixed by ``seed``) and of the samples.

    Returns:
        ``(x [num, 8], y [num, T], clean [num, T])`` with ``y - clean`` the noise.

    Raises:
        ValueError: if a noise level is not positive.

    Example::

        >>> x, y, clean = make_noisy_data([1.0, 10.0], 20_000)
        >>> [round(v, 1) for v in (y - clean).std(0).tolist()]
        [1.0, 10.0]
    """
    if not noise or any(not s > 0 for s in noise):
        raise ValueError(f"Parameter `noise` should hold positive std devs. Found {list(noise)}.")
    weights = torch.randn(IN_DIM, len(noise), generator=torch.Generator().manual_seed(1234))
    weights = weights / weights.norm(dim=0)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num, IN_DIM, generator=gen)
    scale = torch.tensor([float(s) for s in noise])
    clean = scale * 2 * torch.tanh(x @ weights)
    return x, clean + scale * torch.randn(num, len(noise), generator=gen), clean


class NoisyRegressor(MultiTaskModule):
    """A shared 8-64-64 tanh MLP with one linear head per task (``task0``, ``task1``, ...).

    Args:
        num_tasks: number of tasks.
        lr: Adam's learning rate.

    Example::

        >>> model = NoisyRegressor(2)
        >>> x, y, _ = make_noisy_data([1.0, 2.0], 4)
        >>> sorted(model.task_losses((x, y), 0))
        ['task0', 'task1']
    """

    def __init__(self, num_tasks: int, lr: float = 3e-3) -> None:
        super().__init__(
            tasks=[f"task{i}" for i in range(num_tasks)], optimizer={"name": "adam", "lr": lr}
        )
        self.trunk = nn.Sequential(nn.Linear(IN_DIM, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(64, 1) for _ in range(num_tasks)])

    def shared_parameters(self) -> Any:
        return self.trunk.parameters()

    def predict(self, x: Tensor) -> Tensor:
        """Predictions ``[N, T]``."""
        h = self.trunk(x)
        return torch.cat([head(h) for head in self.heads], dim=1)

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        pred = self.predict(x)
        return {t: F.mse_loss(pred[:, i], y[:, i]) for i, t in enumerate(self.tasks)}


class _SigmaRecorder(pl.Callback):
    def __init__(self, weighting: UncertaintyWeighting) -> None:
        self.weighting = weighting
        self.steps: list[int] = []
        self.sigmas: list[list[float]] = []

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.steps.append(trainer.global_step)
        self.sigmas.append(list(self.weighting.sigmas.values()))


def _plot(steps: list[int], sigmas: list[list[float]], noise: Sequence[float], path: Path) -> Any:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.3))
    colors = plt.get_cmap("tab10").colors
    values = torch.tensor(sigmas)
    for i, s in enumerate(noise):
        ax.plot(steps, values[:, i], color=colors[i], label=f"task{i}: learnt σ")
        ax.axhline(s, color=colors[i], ls="--", lw=1, label=f"task{i}: true σ = {s:g}")
    ax.set_yscale("log")
    set_log_ticks(ax, min(float(values.min()), min(noise)), max(float(values.max()), max(noise)))
    ax.set(xlabel="step", ylabel="σ = exp(s/2)", title="UncertaintyWeighting recovers the noise")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; see the module docstring.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).

    Returns:
        ``{"noise": true sigmas, "learnt": learnt sigmas, "residual": held-out residual stds,
        "steps", "history" (learnt sigmas per step), "png", "table"}``.

    Example::

        >>> import contextlib, io, tempfile
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     out = main(["--steps", "5", "--num-train", "256", "--logdir", tempfile.mkdtemp()])
        >>> len(out["learnt"]), len(out["history"])
        (2, 5)
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--noise", type=float, nargs="+", default=[1.0, 10.0], help="true noise std of each task"
    )
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-test", type=int, default=8000)
    parser.add_argument("--lr", type=float, default=3e-3, help="the network's Adam lr")
    parser.add_argument(
        "--uw-lr",
        type=float,
        default=0.025,
        help="learning rate of the log-variances (the paper's 0.025)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1 suits these tiny models)",
    )
    parser.add_argument("--logdir", default="runs", help="TensorBoard root")
    parser.add_argument("--png-dir", default=None, help="default: <logdir>/uncertainty_noise")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    seed_all(args.seed)

    x, y, _ = make_noisy_data(args.noise, args.num_train, seed=args.seed)
    x_test, y_test, _ = make_noisy_data(args.noise, args.num_test, seed=args.seed + 1)
    model = NoisyRegressor(len(args.noise), lr=args.lr)
    weighting = UncertaintyWeighting(lr=args.uw_lr)
    recorder = _SigmaRecorder(weighting)
    trainer = make_trainer(
        args.logdir,
        f"uncertainty_noise/seed{args.seed}",
        callbacks=[weighting, recorder],
        max_steps=args.steps,
        log_every_n_steps=max(1, args.steps // 100),
        limit_val_batches=0,
    )
    gen = torch.Generator().manual_seed(args.seed)
    begin = time.perf_counter()
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=gen))
    seconds = time.perf_counter() - begin

    learnt = list(weighting.sigmas.values())
    with torch.no_grad():
        residual = (model.predict(x_test) - y_test).pow(2).mean(0).sqrt().tolist()
    rows = [
        [
            f"task{i}",
            f"{s:g}",
            f"{learnt[i]:.3f}",
            f"{100 * (learnt[i] / s - 1):+.1f} %",
            f"{residual[i]:.3f}",
            f"{0.5 / learnt[i] ** 2:.4g}",
        ]
        for i, s in enumerate(args.noise)
    ]
    table = markdown_table(
        ["task", "true σ", "learnt σ", "error", "held-out residual std", "weight 1/(2σ²)"], rows
    )
    print(f"\nUncertainty weighting, {args.steps} steps ({seconds:.0f} s)")
    print(table)
    png_dir = Path(args.png_dir) if args.png_dir else Path(args.logdir) / "uncertainty_noise"
    png = _plot(recorder.steps, recorder.sigmas, args.noise, png_dir / "uncertainty_noise.png")
    print(f"figure: {png}" if png is not None else f"(no figure: {PLOTS_HINT})")
    print(f"TensorBoard: tensorboard --logdir {Path(args.logdir) / 'uncertainty_noise'}")
    return {
        "noise": list(args.noise),
        "learnt": learnt,
        "residual": residual,
        "steps": recorder.steps,
        "history": recorder.sigmas,
        "png": png,
        "table": table,
    }


if __name__ == "__main__":
    main()
