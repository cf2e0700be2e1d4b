"""GPU checks beyond gpu_check.py: host syncs per step, monitors and optimizers on CUDA.

    python benchmarks/gpu_check_syncs_monitors_optim.py  # on a CUDA machine, ~1-2 minutes
    python benchmarks/gpu_check_syncs_monitors_optim.py --cpu  # the monitor/optimizer cells on the CPU

1. Host-device synchronisations per training step that come from lightning_aw's own code, for
   every registered method: ``torch.cuda.set_sync_debug_mode("warn")`` is switched on for the
   non-logging steps after a warm-up, and every sync warning whose Python frame lies in the
   ``lightning_aw`` package is counted (Lightning's own syncs are not ours to count) against the
   documented budget (``SYNC_BUDGET``).
2. ``GradientConflictMonitor``, ``WeightFigures`` and ``AdaptiveStepMonitor`` in one run under
   each precision (32-true, 16-mixed with a GradScaler, bf16-mixed): logged values finite.
3. Every installed registered optimizer builds its groups and trains on the device.

Prints one line per cell and a final ``N passed, N failed``; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_aw import MultiTaskModule
from lightning_aw.monitor import GradientConflictMonitor, WeightFigures
from lightning_aw.optim import AdaptiveStepMonitor, get_optimizer, list_optimizers
from lightning_aw.registry import create_method, get_method, list_methods

PACKAGE = str(Path(__file__).resolve().parents[1] / "lightning_aw")


class Net(MultiTaskModule):
    def __init__(self, optimizer: dict | None = None) -> None:
        super().__init__(tasks=["a", "b", "c"], optimizer=optimizer or {"name": "adam", "lr": 1e-3})
        self.trunk = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(256, 1) for t in self.tasks})

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_parameters(self):
        return {t: self.heads[t].parameters() for t in self.tasks}

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.shared_representation(self.trunk(x))
        return {
            t: F.mse_loss(self.heads[t](h).squeeze(-1).float(), y[:, i]) + 0.01
            for i, t in enumerate(self.tasks)
        }


def data(n: int = 1280) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=gen)
    y = torch.randn(n, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1])
    return DataLoader(TensorDataset(x, y), batch_size=64)


def trainer(accelerator: str, callbacks, **kw) -> pl.Trainer:
    kw.setdefault("max_epochs", 1)
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


class SyncAudit(pl.Callback):
    """Counts sync warnings raised from lightning_aw frames on non-logging steps after warm-up."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self.ours = 0
        self.steps = 0
        self.where: dict[str, int] = {}
        self._ctx = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx >= self.warmup:
            self._ctx = warnings.catch_warnings(record=True)
            self._records = self._ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._ctx is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._ctx.__exit__(None, None, None)
        self._ctx = None
        self.steps += 1
        for w in self._records:
            if "synchroniz" in str(w.message) and w.filename.startswith(PACKAGE):
                self.ours += 1
                key = f"{Path(w.filename).name}:{w.lineno}"
                self.where[key] = self.where.get(key, 0) + 1


# Documented host synchronisations per step from lightning_aw frames: the module's one finiteness
# check (``on_nonfinite``); gradient methods copy their T x T problem to the host once; GradDrop
# draws from its seeded CPU generator; DB-MTL checks its losses are positive (it takes log L).
SYNC_BUDGET = {"none": 1, "loss": 1, "gradient": 2, "graddrop": 2, "db_mtl": 2}
GRADIENT = {
    n for n in list_methods() if get_method(n).cls.__module__.startswith("lightning_aw.aggregation")
}


def sync_cells(results: list[tuple[str, bool, str]]) -> None:
    for name in ["none", *list_methods()]:
        audit = SyncAudit()
        kwargs = dict(get_method(name).example_kwargs) if name != "none" else {}
        cbs = [audit] if name == "none" else [create_method(name, **kwargs), audit]
        t0 = time.perf_counter()
        trainer("cuda", cbs, logger=False, log_every_n_steps=1000).fit(Net(), data())
        per_step = audit.ours / max(audit.steps, 1)
        where = ", ".join(f"{k}x{v}" for k, v in sorted(audit.where.items()))
        budget = SYNC_BUDGET.get(
            name, SYNC_BUDGET["gradient"] if name in GRADIENT else SYNC_BUDGET["loss"]
        )
        ok = per_step <= budget
        results.append(
            (
                f"sync {name}",
                ok,
                f"{per_step:.2f} syncs/step (budget {budget}) "
                f"{time.perf_counter() - t0:.1f}s {where}",
            )
        )


def logged_scalars(log_dir: Path) -> dict:
    """Last value of every scalar tag in the run's event files, and the image tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    out: dict = {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]}
    out["_images"] = list(acc.Tags()["images"])
    return out


def monitor_cells(results, accelerator: str, root: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.plugins import MixedPrecision

    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        for method in ("gradnorm", "pcgrad"):
            kw: dict = {"precision": precision}
            if precision == "16-mixed" and accelerator == "cpu":
                kw = {"plugins": [MixedPrecision("16-mixed", "cpu")]}
            conflict = GradientConflictMonitor(every_n_steps=5)
            figures = WeightFigures()
            steps = AdaptiveStepMonitor(every_n_steps=5)
            logger = TensorBoardLogger(root, name=f"{method}-{precision}")
            net = Net()
            before = [p.detach().clone() for p in net.parameters()]
            try:
                trainer(
                    accelerator,
                    [create_method(method), conflict, figures, steps],
                    logger=logger,
                    log_every_n_steps=5,
                    max_epochs=2,
                    **kw,
                ).fit(net, data(640))
                cos = conflict.last_cosines
                cos_ok = cos is not None and bool(torch.isfinite(cos).all())
                moved = any(
                    not torch.equal(a, b.cpu())
                    for a, b in zip(before, net.parameters(), strict=True)
                )
                tags = logged_scalars(Path(logger.log_dir))
                step_tags = [t for t in tags if t.startswith("step_size/")]
                steps_ok = bool(step_tags) and all(math.isfinite(tags[t]) for t in step_tags)
                ok = (
                    conflict.num_measured > 0
                    and cos_ok
                    and moved
                    and steps_ok
                    and len(figures.steps) > 0
                    and "weights/trajectories" in tags["_images"]
                )
                msg = (
                    f"measured={conflict.num_measured} skipped={conflict.num_skipped} "
                    f"cos finite={cos_ok} step_size tags={len(step_tags)} finite={steps_ok} "
                    f"figure points={len(figures.steps)} moved={moved}"
                )
            except Exception as err:  # a failing cell is reported, the others still run
                ok, msg = False, f"{type(err).__name__}: {err}"
            results.append((f"monitors {method} {precision}", ok, msg))


def optimizer_cells(results, accelerator: str) -> None:
    for name in list_optimizers():
        info = get_optimizer(name)
        if not info.available:
            results.append((f"optimizer {name}", True, "skipped: package not installed"))
            continue
        spec = {"name": name, **dict(info.example_kwargs)}
        net = Net(optimizer=spec)
        before = [p.detach().clone() for p in net.parameters()]
        try:
            trainer(
                accelerator,
                [create_method("dwa")],
                logger=False,
                max_epochs=1,
                limit_train_batches=5,
            ).fit(net, data())
            moved = any(
                not torch.equal(a, b.cpu()) for a, b in zip(before, net.parameters(), strict=True)
            )
            finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
            results.append(
                (f"optimizer {name}", moved and finite, f"moved={moved} finite={finite}")
            )
        except Exception as err:
            results.append((f"optimizer {name}", False, f"{type(err).__name__}: {err}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="monitor/optimizer cells on the CPU")
    parser.add_argument("--out", default="runs/gpu_check_syncs_monitors_optim")
    args = parser.parse_args(argv)
    accelerator = "cpu" if args.cpu else "cuda"
    if accelerator == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --cpu")
        return 2
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    results: list[tuple[str, bool, str]] = []
    if accelerator == "cuda":
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
        sync_cells(results)
    monitor_cells(results, accelerator, Path(args.out))
    optimizer_cells(results, accelerator)
    for name, ok, msg in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<36} {msg}", flush=True)
    failed = sum(not ok for _, ok, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
