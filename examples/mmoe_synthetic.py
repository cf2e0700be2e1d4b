"""Ma et al. (KDD 2018), Sec. 4: MMoE vs shared-bottom and one-gate MoE as task correlation drops,
and a gate-collapse demonstration with GateMonitor and load balancing.

    python examples/mmoe_synthetic.py --quick          # ~1 min on 2 CPU cores
    python examples/mmoe_synthetic.py --jobs 2         # default: a few minutes

Data (the paper's synthetic generator, section 4.2): two orthogonal unit vectors u1, u2 in
R^d (d = 100), weight vectors w1 = c u1 and w2 = c (p u1 + sqrt(1 - p^2) u2), so that
cos(w1, w2) = p (the "correlation score"), inputs x ~ N(0, I_d) and two regression labels

    y_i = w_i^T x + sum_{j=1}^{m} sin(alpha_j w_i^T x + beta_j) + eps_i,

with m = 10 sinusoids whose alpha_j, beta_j are drawn from N(0, 1) (shared by both tasks),
c = 1 and eps_i ~ N(0, 0.01) (variance 0.01). One generator draw (u, alpha, beta) per seed.

Models (sizes chosen here, not the paper's): shared-bottom (one hidden ReLU layer of 128 units
shared by both towers), OMoE (8 experts of 16 ReLU units under one softmax gate,
``MMoE(tasks=["all"])``), MMoE (the same experts, one gate per task); towers of 8 ReLU units.
Adam, batch 128, the same number of steps for every model. Reported: the test MSE averaged over
both tasks, mean ± std over seeds. The paper's finding is that the advantage of MMoE over the
shared bottom grows as the tasks' correlation drops.

Gate collapse: one task (p = 0.5, task 1) through a top-2-of-6 MMoE whose router starts skewed
toward experts 0 and 1 (the logit bias +2 for them): without balancing the router keeps those two
experts; the Switch Transformer loss (as an extra term in ``task_losses``) or the
auxiliary-loss-free bias (:class:`~lightning_aw.nn.AuxFreeBalancing`) spread the load. The
numbers are what :class:`~lightning_aw.monitor.GateMonitor` logs at the last logging step
(utilisation: share of samples whose largest gate is each expert) and the share of top-2
selections per expert on the test set.

Saved: ``<out>/results_mmoe.md`` (the tables), ``<png-dir>/mmoe_synthetic.png`` (MSE vs
correlation and the collapse demo), ``<png-dir>/mmoe_gate_heatmap.png`` and
``<png-dir>/mmoe_collapse_heatmap.png`` (the heatmap images GateMonitor logged to TensorBoard
for MMoE at the lowest correlation and for the collapse demo without balancing, read back from
the event files) and TensorBoard logs under ``<logdir>/mmoe_synthetic``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    PLOTS_HINT,
    make_trainer,
    markdown_table,
    mean_std,
    pyplot,
    quiet,
    run_parallel,
    save_figure,
    seed_all,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw import MultiTaskModule
from lightning_aw.monitor import GateMonitor
from lightning_aw.nn import AuxFreeBalancing, MMoE, switch_load_balancing_loss

__all__ = ["CollapseNet", "SyntheticNet", "main", "make_data"]

DIM = 100
ARCHS = ("shared_bottom", "omoe", "mmoe")


def make_data(
    p: float, num: int, seed: int = 0, *, dim: int = DIM, c: float = 1.0, m: int = 10
) -> tuple[Tensor, Tensor]:
    """``num`` samples of the paper's two synthetic regression tasks with correlation ``p``.

    Args:
        p: the cosine of the two tasks' weight vectors, in [-1, 1].
        num: the number of samples (the generator's parameters depend on ``seed`` only, so two
            calls with the same seed and different ``num`` share them: use ``seed`` for the
            task, and slice one call into train and test).
        seed: seed of u1, u2, alpha, beta and the samples.
        dim: the input dimension d.
        c: the scale constant.
        m: the number of sinusoids.

    Returns:
        ``(x [num, dim], y [num, 2])``.

    Raises:
        ValueError: ``p`` is outside [-1, 1].

    Example::

        >>> x, y = make_data(0.5, 4)
        >>> tuple(x.shape), tuple(y.shape)
        ((4, 100), (4, 2))
    """
    if not -1.0 <= p <= 1.0:
        raise ValueError(f"Parameter `p` (a correlation) should be in [-1, 1]. Found {p!r}.")
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen))  # orthonormal columns
    w1 = c * u[:, 0]
    w2 = c * (p * u[:, 0] + math.sqrt(max(1.0 - p * p, 0.0)) * u[:, 1])
    alpha = torch.randn(m, generator=gen)
    beta = torch.randn(m, generator=gen)
    x = torch.randn(num, dim, generator=gen)
    ys = []
    for w in (w1, w2):
        s = x @ w
        waves = torch.sin(alpha * s[:, None] + beta).sum(-1)
        ys.append(s + waves + 0.1 * torch.randn(num, generator=gen))  # eps ~ N(0, 0.01)
    return x, torch.stack(ys, dim=1)


def _tower(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, 1))


class SyntheticNet(MultiTaskModule):
    """Shared-bottom, OMoE or MMoE with two towers (tasks ``y1``, ``y2``).

    Args:
        arch: ``"shared_bottom"``, ``"omoe"`` or ``"mmoe"``.
        lr: Adam's learning rate.
        experts: the number of experts (MoE) ; the shared bottom has ``experts * 16`` units.

    Example::

        >>> net = SyntheticNet("mmoe")
        >>> x, y = make_data(0.5, 8)
        >>> sorted(net.task_losses((x, y), 0))
        ['y1', 'y2']
    """

    def __init__(self, arch: str, lr: float = 3e-3, experts: int = 8) -> None:
        super().__init__(tasks=("y1", "y2"), optimizer={"name": "adam", "lr": lr})
        if arch not in ARCHS:
            raise ValueError(f"Parameter `arch` should be one of {ARCHS}. Found {arch!r}.")
        self.arch = arch
        if arch == "shared_bottom":
            self.bottom = nn.Sequential(nn.Linear(DIM, 16 * experts), nn.ReLU())
            width = 16 * experts
        else:
            gates = ["all"] if arch == "omoe" else list(self.tasks)
            self.moe = MMoE(
                DIM, lambda: nn.Sequential(nn.Linear(DIM, 16), nn.ReLU()), experts, gates
            )
            width = 16
        self.towers = nn.ModuleDict({t: _tower(width) for t in self.tasks})

    def predict(self, x: Tensor) -> Tensor:
        """Predictions ``[N, 2]``."""
        if self.arch == "shared_bottom":
            h = self.bottom(x)
            feats = {t: h for t in self.tasks}
        else:
            mixed = self.moe(x)
            feats = {t: mixed["all"] if self.arch == "omoe" else mixed[t] for t in self.tasks}
        return torch.cat([self.towers[t](feats[t]) for t in self.tasks], dim=1)

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        pred = self.predict(x)
        return {t: F.mse_loss(pred[:, i], y[:, i]) for i, t in enumerate(self.tasks)}


class CollapseNet(MultiTaskModule):
    """One regression task through a top-2-of-6 MMoE whose router starts skewed to experts 0-1.

    Args:
        balance: ``"none"``, ``"switch"`` (the Switch loss as the extra task ``balance``) or
            ``"aux_free"`` (a selection bias, moved by :class:`AuxFreeBalancing`).
        alpha: the Switch loss coefficient.
        lr: Adam's learning rate.

    Example::

        >>> net = CollapseNet("switch")
        >>> x, y = make_data(0.5, 8)
        >>> sorted(net.task_losses((x, y), 0))
        ['balance', 'y']
    """

    def __init__(self, balance: str = "none", alpha: float = 0.1, lr: float = 3e-3) -> None:
        tasks = ("y", "balance") if balance == "switch" else ("y",)
        super().__init__(tasks=tasks, optimizer={"name": "adam", "lr": lr})
        self.balance, self.alpha = balance, alpha
        self.moe = MMoE(
            DIM,
            lambda: nn.Sequential(nn.Linear(DIM, 16), nn.ReLU()),
            6,
            ["y"],
            top_k=2,
            balance=balance == "aux_free",
        )
        with torch.no_grad():
            self.moe.gate["y"].linear.bias.copy_(torch.tensor([2.0, 2.0, 0, 0, 0, 0]))
        self.tower = _tower(16)

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        loss = F.mse_loss(self.tower(self.moe(x)["y"]).squeeze(-1), y[:, 0])
        out = {"y": loss}
        if self.balance == "switch":
            out["balance"] = switch_load_balancing_loss(self.moe.gate["y"].logits, self.alpha)
        return out


def _split(p: float, seed: int, num_train: int, num_test: int):
    x, y = make_data(p, num_train + num_test, seed)
    return (x[:num_train], y[:num_train]), (x[num_train:], y[num_train:])


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one model; return its test MSE (and, for the collapse demo, its gate statistics)."""
    torch.set_num_threads(1)
    quiet()
    warnings.filterwarnings("ignore", message=".*validation_step.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    seed_all(job["seed"])
    (x, y), (xt, yt) = _split(job["p"], job["seed"], job["num_train"], job["num_test"])
    monitor = GateMonitor()
    callbacks: list[Any] = []
    if job["kind"] == "collapse":
        net: MultiTaskModule = CollapseNet(job["balance"], lr=job["lr"])
        callbacks = [monitor]
        if job["balance"] == "aux_free":
            callbacks.append(AuxFreeBalancing(step_size=job["step_size"]))
        name = f"mmoe_synthetic/collapse/{job['balance']}/seed{job['seed']}"
    else:
        net = SyntheticNet(job["arch"], lr=job["lr"])
        callbacks = [] if job["arch"] == "shared_bottom" else [monitor]
        name = f"mmoe_synthetic/p{job['p']}/{job['arch']}/seed{job['seed']}"
    trainer = make_trainer(
        job["logdir"],
        name,
        version=0,
        callbacks=callbacks,
        max_steps=job["steps"],
        log_every_n_steps=max(1, job["steps"] // 50),
        limit_val_batches=0,
    )
    gen = torch.Generator().manual_seed(job["seed"])
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, generator=gen)
    trainer.fit(net, loader)
    net.eval()
    out: dict[str, Any] = dict(job)
    with torch.no_grad():
        if isinstance(net, SyntheticNet):
            out["mse"] = F.mse_loss(net.predict(xt), yt, reduction="none").mean(0).tolist()
        else:
            gates = net.moe.gate["y"](xt)
            out["mse"] = [F.mse_loss(net.tower(net.moe(xt)["y"]).squeeze(-1), yt[:, 0]).item()]
            out["selected"] = ((gates > 0).float().mean(0) / 2).tolist()  # top-2: shares sum to 1
            stats = monitor.last_stats["moe/y"]
            out["utilisation"] = stats["utilisation"].tolist()
            out["entropy"] = float(stats["entropy"])
    out["log_dir"] = None if trainer.logger is None else trainer.logger.log_dir
    return out


def _heatmap_png(log_dir: str, path: Path) -> Path | None:
    """Write the last heatmap image GateMonitor logged in ``log_dir`` as a PNG file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"images": 0})
    acc.Reload()
    tags = [t for t in acc.Tags().get("images", []) if t.endswith("/heatmap")]
    if not tags:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(acc.Images(tags[0])[-1].encoded_image_string)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; see the module docstring.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).

    Returns:
        ``{"runs": per-run results, "collapse": collapse-demo results, "table", "collapse_table",
        "png"}``.

    Example::

        >>> import contextlib, io, tempfile
        >>> d = tempfile.mkdtemp()
        >>> with contextlib.redirect_stdout(io.StringIO()):  # doctest: +SKIP
        ...     out = main(["--steps", "4", "--collapse-steps", "4", "--num-train", "256",
        ...                 "--num-test", "64", "--correlations", "0.5", "--seeds", "1",
        ...                 "--logdir", d, "--out", d, "--png-dir", d])
        >>> len(out["runs"]), len(out["collapse"])  # doctest: +SKIP
        (3, 3)

        (Skipped in the doctests: ``tests/test_examples.py`` runs it with small sizes.)
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 min CPU budget")
    parser.add_argument("--correlations", type=float, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps per model")
    parser.add_argument("--collapse-steps", type=int, default=None)
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-test", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--step-size", type=float, default=0.01, help="aux-free bias rate u")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--logdir", default="runs", help="TensorBoard root")
    parser.add_argument("--out", default="docs", help="folder of results_mmoe.md")
    parser.add_argument("--png-dir", default="docs/img")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    quick = args.quick
    corrs = args.correlations or ([1.0, 0.5, 0.0] if quick else [1.0, 0.9, 0.5, 0.0])
    seeds = args.seeds or (2 if quick else 3)
    steps = args.steps or (200 if quick else 500)
    collapse_steps = args.collapse_steps or (200 if quick else 400)
    quiet()
    common = {
        "num_train": args.num_train,
        "num_test": args.num_test,
        "lr": args.lr,
        "logdir": args.logdir,
        "step_size": args.step_size,
    }
    jobs = [
        {**common, "kind": "mtl", "arch": a, "p": p, "seed": s, "steps": steps}
        for p in corrs
        for a in ARCHS
        for s in range(seeds)
    ]
    jobs += [
        {**common, "kind": "collapse", "balance": b, "p": 0.5, "seed": 0, "steps": collapse_steps}
        for b in ("none", "switch", "aux_free")
    ]
    begin = time.perf_counter()
    results = run_parallel(run_one, jobs, args.jobs)
    elapsed = time.perf_counter() - begin
    runs = [r for r in results if r["kind"] == "mtl"]
    collapse = [r for r in results if r["kind"] == "collapse"]

    def mse(p: float, arch: str) -> list[float]:
        return [sum(r["mse"]) / 2 for r in runs if r["p"] == p and r["arch"] == arch]

    rows = [[f"{p:g}", *[mean_std(mse(p, a), 3) for a in ARCHS]] for p in corrs]
    table = markdown_table(["correlation p", "shared-bottom", "OMoE", "MMoE"], rows)
    crows = [
        [
            r["balance"],
            " ".join(f"{u:.2f}" for u in r["utilisation"]),
            f"{r['entropy']:.3f}",
            " ".join(f"{s:.2f}" for s in r["selected"]),
            f"{r['mse'][0]:.3f}",
        ]
        for r in collapse
    ]
    collapse_table = markdown_table(
        [
            "balancing",
            "utilisation per expert (GateMonitor)",
            "gate entropy (nats)",
            "top-2 selection share (test)",
            "test MSE",
        ],
        crows,
    )
    settings = (
        f"`{' '.join(['python examples/mmoe_synthetic.py', *argv])}`: correlations "
        f"{corrs}, {seeds} seed(s), {steps} steps per model (collapse demo: {collapse_steps}), "
        f"{args.num_train} training and {args.num_test} test samples, Adam lr {args.lr}, "
        f"batch 128; {elapsed:.0f} s with {args.jobs} job(s)"
    )
    print(f"Test MSE (mean of both tasks), mean ± std over seeds:\n\n{table}\n")
    print(f"Gate collapse (one task, top-2 of 6 experts, skewed start):\n\n{collapse_table}\n")
    print(settings)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results_mmoe.md"
    md.write_text(
        "# MMoE on the synthetic tasks of Ma et al. (KDD 2018)\n\n"
        "Produced by `examples/mmoe_synthetic.py` (see its docstring for the data and the "
        "models; the generator's constants d = 100, c = 1, m = 10, α, β ~ N(0, 1), noise "
        "variance 0.01 are as we read the paper's Sec. 4.2, not re-checked against its text "
        f"here; the model sizes are ours). Settings: {settings}.\n\n"
        "## Test MSE vs task correlation\n\n"
        "Mean squared error on held-out samples, averaged over the two tasks; mean ± std over "
        f"seeds.\n\n{table}\n\n"
        "## Gate collapse and load balancing\n\n"
        "One task through a top-2-of-6 MMoE whose router starts skewed toward experts 0 and 1. "
        "Utilisation and entropy are the values GateMonitor logged at the last logging step; "
        "the selection share is the fraction of top-2 selections per expert on the test set "
        f"(uniform: 0.17 each).\n\n{collapse_table}\n\n"
        "![MSE vs correlation and the collapse demo](img/mmoe_synthetic.png)\n\n"
        "The aux-free bias acts on the *selection* only: the selection shares become uniform "
        "while the gate values of the selected experts (and so the utilisation, the share of "
        "samples whose largest gate is each expert) still follow the unbiased router logits.\n\n"
        "The heatmaps GateMonitor logs to TensorBoard at every epoch end (mean gate weight per "
        "gate and expert over the epoch's logging steps), read back from the event files: the "
        "collapse demo without balancing, and MMoE at the lowest correlation:\n\n"
        "![GateMonitor heatmap, collapse](img/mmoe_collapse_heatmap.png)\n\n"
        "![GateMonitor heatmap, MMoE](img/mmoe_gate_heatmap.png)\n"
    )
    png = None
    png_dir = Path(args.png_dir)
    plt = pyplot()
    if plt is None:
        print(PLOTS_HINT)
    else:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
        for a, label in zip(ARCHS, ("shared-bottom", "OMoE", "MMoE"), strict=True):
            means = [sum(mse(p, a)) / len(mse(p, a)) for p in corrs]
            ax.plot(corrs, means, marker="o", label=label)
        ax.set_xlabel("task correlation p")
        ax.set_ylabel("test MSE (mean of 2 tasks)")
        ax.invert_xaxis()
        ax.legend()
        ax.set_title("MMoE vs baselines")
        width = 0.27
        for i, r in enumerate(collapse):
            xs = [e + (i - 1) * width for e in range(len(r["selected"]))]
            bx.bar(xs, r["selected"], width, label=r["balance"])
        bx.axhline(1 / 6, color="grey", lw=0.8, ls="--")
        bx.set_xlabel("expert")
        bx.set_ylabel("share of top-2 selections")
        bx.set_title("gate collapse vs balancing")
        bx.legend()
        png = save_figure(fig, png_dir / "mmoe_synthetic.png")
        low = [r for r in runs if r["arch"] == "mmoe" and r["p"] == min(corrs)]
        if low and low[0]["log_dir"]:
            _heatmap_png(low[0]["log_dir"], png_dir / "mmoe_gate_heatmap.png")
        for r in collapse:
            if r["balance"] == "none" and r["log_dir"]:
                _heatmap_png(r["log_dir"], png_dir / "mmoe_collapse_heatmap.png")
    return {
        "runs": runs,
        "collapse": collapse,
        "table": table,
        "collapse_table": collapse_table,
        "png": png,
    }


if __name__ == "__main__":
    main()
