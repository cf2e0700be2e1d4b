"""Tiny models and data shared by the tests (real Lightning Trainers, CPU, a few seconds)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw import MultiTaskModule, Weighting

TASKS = ("a", "b", "c")


def regression_data(n: int = 256, seed: int = 0, scales: Sequence[float] = (1.0, 3.0, 0.3)):
    """Three regression targets of different scales from one 6-d input."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    w = torch.randn(6, len(scales), generator=gen)
    y = torch.tanh(x @ w) * torch.tensor(scales) + 0.1 * torch.randn(n, len(scales), generator=gen)
    return x, y


def loader(n: int = 256, batch_size: int = 32, seed: int = 0, **kw: Any) -> DataLoader:
    return DataLoader(TensorDataset(*regression_data(n, seed, **kw)), batch_size=batch_size)


class TinyNet(MultiTaskModule):
    """A 6 -> 16 -> 16 trunk and one linear head per task."""

    def __init__(
        self,
        tasks: Sequence[str] = TASKS,
        absent: Callable[[int, str], bool] | None = None,
        loss_hook: Callable[[int, str, Tensor], Tensor] | None = None,
        seed: int = 0,
        mark_representation: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("optimizer", {"name": "sgd", "lr": 0.05})
        super().__init__(tasks=tasks, **kwargs)
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in tasks})
        self.absent = absent
        self.loss_hook = loss_hook
        self.mark_representation = mark_representation

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        if self.mark_representation:
            h = self.shared_representation(h)
        out: dict[str, Tensor | None] = {}
        for i, t in enumerate(self.tasks):
            if self.absent is not None and self.absent(batch_idx, t):
                out[t] = None
                continue
            loss = F.mse_loss(self.heads[t](h).squeeze(-1), y[:, i])
            if self.loss_hook is not None:
                loss = self.loss_hook(batch_idx, t, loss)
            out[t] = loss
        return out


class LinearNet(MultiTaskModule):
    """A linear model whose steps tests write out by hand: ``h = W x`` (shared, no bias), task
    ``i`` of ("a", "b", "c"): ``v_i^T h`` with a squared error; SGD with ``optimizer``'s other
    arguments (``lr``, ``momentum``, ``weight_decay``)."""

    def __init__(self, W: Any, V: Any, optimizer: dict[str, Any]) -> None:
        tasks = ("a", "b", "c")
        super().__init__(tasks=tasks, optimizer={"name": "sgd", **optimizer})
        self.trunk = nn.Linear(2, 2, bias=False)
        self.heads = nn.ModuleDict({t: nn.Linear(2, 1, bias=False) for t in tasks})
        with torch.no_grad():
            self.trunk.weight.copy_(torch.as_tensor(W))
            for i, t in enumerate(tasks):
                self.heads[t].weight.copy_(torch.as_tensor(V[i : i + 1]))

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        return {
            t: F.mse_loss(self.heads[t](h).squeeze(-1), y[:, i]) for i, t in enumerate(self.tasks)
        }


def trainer(tmp_path, callbacks: Sequence[Any] = (), **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fresh(weighting: Weighting) -> Weighting:
    return copy.deepcopy(weighting)


class WeightRecorder(pl.Callback):
    """Records the weights used at every training batch (read before the step runs)."""

    def __init__(self) -> None:
        self.weights: list[list[float]] = []
        self.losses: list[list[float]] = []
        self.epochs: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(list(pl_module.task_weights.values()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.step_record
        self.losses.append([] if step is None else step.losses.detach().tolist())
        self.epochs.append(trainer.current_epoch)


def run_ddp_script(script, out, args: Sequence[str] = (), timeout: int = 300) -> None:
    """Run a 2-process DDP script in a subprocess (the ddp launcher re-executes sys.argv), with
    no distributed variables inherited from this process; fail with its output's tail."""
    prefixes = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def ddp_result_file(out: Path, case: str, rank: int, suffix: str = "pt") -> Path:
    """Where ``ddp_script.py`` writes a case's result (``pt``) or error (``err``) for a rank."""
    return out / f"{case.replace('/', '.')}-rank{rank}.{suffix}"


@dataclass
class DDPResults:
    """The output folder of one ``ddp_script.py`` launch (the ``ddp_results`` fixture), and the
    launch's failure message, if it failed."""

    out: Path
    failure: str | None = None

    def load(self, case: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank 0's and rank 1's results of ``case``; fails with the case's error, if it raised,
        or the launch's, if it stopped before the case."""
        for rank in (0, 1):
            err = ddp_result_file(self.out, case, rank, "err")
            assert not err.exists(), err.read_text()[-3000:]
        files = [ddp_result_file(self.out, case, rank) for rank in (0, 1)]
        assert all(f.exists() for f in files), f"no result for {case!r}: {self.failure}"
        r0, r1 = (torch.load(f, weights_only=True) for f in files)
        return r0, r1
