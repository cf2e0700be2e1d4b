"""GPU check: every weighting under fp16 + GradScaler and bf16 on CUDA, then the overhead benchmark.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU, < 5 minutes
    python benchmarks/gpu_check.py --cpu      # the same checks on the CPU (fp16 via the CPU plugin)

For each method and precision it trains a small three-task model for 30 steps and checks: the
weights are finite (and sum to the documented total), the parameters are finite and moved, and
under fp16 the GradScaler is active. Prints one line per cell and a final `N passed, N failed`.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning_aw
from lightning_aw import MultiTaskModule, Weighting


class Net(MultiTaskModule):
    def __init__(self) -> None:
        super().__init__(tasks=["a", "b", "c"], optimizer={"name": "adam", "lr": 1e-3})
        self.trunk = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(256, 1) for t in self.tasks})

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.shared_representation(self.trunk(x))
        return {
            t: F.mse_loss(self.heads[t](h).squeeze(-1).float(), y[:, i])
            for i, t in enumerate(self.tasks)
        }


def methods() -> dict[str, type[Weighting]]:
    out = {}
    for name in lightning_aw.__all__:
        obj = getattr(lightning_aw, name)
        if inspect.isclass(obj) and issubclass(obj, Weighting) and not inspect.isabstract(obj):
            if obj.__module__.endswith("_base") or name in ("Weighting", "GradientWeighting"):
                continue
            out[name] = obj
    return out


def check(cls: type[Weighting], precision: str, accelerator: str) -> str | None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(960, 32, generator=gen)
    y = torch.randn(960, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1])
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    weighting = cls()
    kw = {"precision": precision}
    if precision == "16-mixed" and accelerator == "cpu":
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=1,
        callbacks=[weighting],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    trainer.fit(net, DataLoader(TensorDataset(x, y), batch_size=32))
    w = torch.tensor(list(weighting.weights.values()))
    if not torch.isfinite(w).all():
        return f"non-finite weights {w.tolist()}"
    tol = 1e-3 if precision == "32-true" else 1e-2  # 16-bit gradients feed some methods
    if cls.total == "T" and abs(float(w.sum()) - 3.0) > 3 * tol:
        return f"weights sum {float(w.sum())}, expected 3"
    if cls.total == 1 and abs(float(w.sum()) - 1.0) > tol:
        return f"weights sum {float(w.sum())}, expected 1"
    after = list(net.parameters())
    if not all(torch.isfinite(p).all() for p in after):
        return "non-finite parameters"
    if all(torch.equal(a.cpu(), b.detach().cpu()) for a, b in zip(before, after, strict=True)):
        return "parameters did not change"
    if precision == "16-mixed" and trainer.precision_plugin.scaler is None:
        return "no GradScaler under 16-mixed"
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--bench-rounds", type=int, default=3)
    args = parser.parse_args()
    accelerator = "cpu" if args.cpu or not torch.cuda.is_available() else "gpu"
    if accelerator == "gpu":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    passed = failed = 0
    start = time.perf_counter()
    for name, cls in methods().items():
        for precision in ("32-true", "16-mixed", "bf16-mixed"):
            try:
                problem = check(cls, precision, accelerator)
            except Exception as err:  # report every cell, do not stop at the first
                problem = f"{type(err).__name__}: {err}"
            status = "ok" if problem is None else f"FAIL {problem}"
            print(f"{name:<22}{precision:<12}{status}", flush=True)
            passed += problem is None
            failed += problem is not None
    print(f"checks took {time.perf_counter() - start:.1f}s")
    if not args.skip_bench and accelerator == "gpu":
        from bench_weighting import main as bench

        bench(["--rounds", str(args.bench_rounds), "--accelerator", "gpu"])
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
