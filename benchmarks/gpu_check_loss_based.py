"""GPU check of RLW, GLS, ScaleInvariant, IMTLL, FAMO, SoftAdapt and STCH on CUDA.

    python benchmarks/gpu_check_loss_based.py          # on a machine with a CUDA GPU, < 2 minutes
    python benchmarks/gpu_check_loss_based.py --cpu    # the same checks on the CPU

For each method and precision (fp32, fp16 + GradScaler, bf16) it trains a small three-task model
for one epoch of 60 steps and checks: finite weights with the documented total, finite parameters
that moved. On CUDA it also counts the host synchronisations during training with
``torch.cuda.set_sync_debug_mode("warn")`` and reports them relative to EqualWeighting (the
methods promise no extra synchronisation per step: at most one per check window and epoch), and
the mean step time. Prints one line per cell and a final `N passed, N failed`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_aw import EqualWeighting, MultiTaskModule, Weighting
from lightning_aw.weighting._famo import FAMO
from lightning_aw.weighting._gls import GLS, ScaleInvariant
from lightning_aw.weighting._imtl_l import IMTLL
from lightning_aw.weighting._rlw import RLW
from lightning_aw.weighting._softadapt import SoftAdapt
from lightning_aw.weighting._stch import STCH

STEPS = 60
METHODS = {
    "EqualWeighting": lambda: EqualWeighting(),
    "RLW": lambda: RLW(seed=0),
    "GLS": lambda: GLS(),
    "ScaleInvariant": lambda: ScaleInvariant(),
    "IMTLL": lambda: IMTLL(),
    "FAMO": lambda: FAMO(),
    "SoftAdapt-step": lambda: SoftAdapt(interval="step", frequency=10),
    "STCH": lambda: STCH(reference=[1.0, 100.0, 0.01]),
}


class Net(MultiTaskModule):
    def __init__(self) -> None:
        super().__init__(tasks=["a", "b", "c"], optimizer={"name": "adam", "lr": 1e-3})
        self.trunk = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(256, 1) for t in self.tasks})

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        return {
            t: F.mse_loss(self.heads[t](h).squeeze(-1).float(), y[:, i])
            for i, t in enumerate(self.tasks)
        }


class _Clock(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)


def run(make: object, precision: str, accelerator: str) -> tuple[str | None, int, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 32, 32, generator=gen)
    y = (torch.randn(STEPS * 32, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1])) ** 2
    torch.manual_seed(0)
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    weighting: Weighting = make()  # type: ignore[operator]
    kw: dict = {"precision": precision}
    if precision == "16-mixed" and accelerator == "cpu":
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    clock = _Clock()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=1,
        callbacks=[weighting, clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    syncs = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if accelerator == "gpu":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(net, loader)
        finally:
            if accelerator == "gpu":
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    step_ms = 1e3 * sum(clock.times[5:]) / max(1, len(clock.times) - 5)
    w = torch.tensor(list(weighting.weights.values()))
    if not torch.isfinite(w).all():
        return f"non-finite weights {w.tolist()}", syncs, step_ms
    if weighting.total == 1 and abs(float(w.sum()) - 1.0) > 1e-3:
        return f"weights sum {float(w.sum())}, expected 1", syncs, step_ms
    if weighting.total == "T" and abs(float(w.sum()) - 3.0) > 1e-3:
        return f"weights sum {float(w.sum())}, expected 3", syncs, step_ms
    after = list(net.parameters())
    if not all(torch.isfinite(p).all() for p in after):
        return "non-finite parameters", syncs, step_ms
    if all(torch.equal(a.cpu(), b.detach().cpu()) for a, b in zip(before, after, strict=True)):
        return "parameters did not change", syncs, step_ms
    if precision == "16-mixed" and trainer.precision_plugin.scaler is None:
        return "no GradScaler under 16-mixed", syncs, step_ms
    if isinstance(weighting, FAMO) and not torch.isfinite(weighting.logits).all():
        return "non-finite FAMO logits", syncs, step_ms
    return None, syncs, step_ms


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    accelerator = "cpu" if args.cpu or not torch.cuda.is_available() else "gpu"
    if accelerator == "gpu":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    passed = failed = 0
    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        baseline = None
        for name, make in METHODS.items():
            try:
                problem, syncs, step_ms = run(make, precision, accelerator)
            except Exception as err:  # report every cell, do not stop at the first
                problem, syncs, step_ms = f"{type(err).__name__}: {err}", -1, float("nan")
            if name == "EqualWeighting":
                baseline = syncs
            extra = "" if baseline is None or syncs < 0 else f"{syncs - baseline:+d}"
            status = "ok" if problem is None else f"FAIL {problem}"
            print(
                f"{name:<16}{precision:<12}syncs {syncs:>4} ({extra:>4} vs equal)  "
                f"{step_ms:6.2f} ms/step  {status}",
                flush=True,
            )
            passed += problem is None
            failed += problem is not None
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
