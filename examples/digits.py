"""Two-digit multi-task example: left class, right class and digit sum from one shared CNN.

    python examples/digits.py --method gradnorm --epochs 5 --logdir runs
    tensorboard --logdir runs

The sum is a regression whose squared error (target variance ≈ 16.5) dwarfs the two
cross-entropies: a built-in scale imbalance that the weighting methods must handle.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MeanAbsoluteError
from torchmetrics.classification import MulticlassAccuracy

from lightning_aw import MultiTaskModule, TaskOutput, Weighting
from lightning_aw.datasets import TwoDigitsDataModule
from lightning_aw.registry import create_method, list_methods

# every registered method can be chosen; a few get example-specific arguments
OVERRIDES = {
    "uncertainty": {"classification": ["left", "right"], "lr": 0.025},
    "gradnorm": {"alpha": 1.5},
}


def make_weighting(name: str) -> Weighting | None:
    if name == "none":
        return None
    return create_method(name, **OVERRIDES.get(name, {}))


class DigitsNet(MultiTaskModule):
    """A ~55k-parameter CNN trunk with one head per task."""

    def __init__(self, lr: float = 2e-3, **kwargs: Any) -> None:
        super().__init__(
            tasks=["left", "right", "sum"],
            optimizer={"name": "adam", "lr": lr},
            metrics={
                "left": {"acc": MulticlassAccuracy(num_classes=10)},
                "right": {"acc": MulticlassAccuracy(num_classes=10)},
                "sum": {"mae": MeanAbsoluteError()},
            },
            **kwargs,
        )
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 8, 48),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict(
            {"left": nn.Linear(48, 10), "right": nn.Linear(48, 10), "sum": nn.Linear(48, 1)}
        )

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.shared_representation(self.trunk(x))  # for source="representation" methods
        left, right = self.heads["left"](h), self.heads["right"](h)
        total = self.heads["sum"](h).squeeze(-1)
        target_sum = y[:, 2].float()
        return {
            "left": TaskOutput(F.cross_entropy(left, y[:, 0]), left, y[:, 0]),
            "right": TaskOutput(F.cross_entropy(right, y[:, 1]), right, y[:, 1]),
            "sum": TaskOutput(F.mse_loss(total, target_sum), total, target_sum),
        }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--method", choices=["none", *list_methods()], default="gradnorm",
        help="weighting method (none: plain sum)",
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-pairs", type=int, default=10_000)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pl.seed_everything(args.seed, verbose=False)
    weighting = make_weighting(args.method)
    model = DigitsNet()
    logger = TensorBoardLogger(args.logdir, name=f"digits-{args.method}")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[weighting] if weighting is not None else [],
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, TwoDigitsDataModule(train_pairs=args.train_pairs, seed=args.seed))
    elapsed = time.perf_counter() - start

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    weights = model.task_weights
    print(f"\nmethod={args.method}  epochs={args.epochs}  time={elapsed:.1f}s")
    print(f"{'task':<8}{'weight':>10}  metric")
    for task, name in (("left", "acc"), ("right", "acc"), ("sum", "mae")):
        key = f"val/{task}/{name}"
        print(f"{task:<8}{weights[task]:>10.4f}  {name}={metrics.get(key, float('nan')):.4f}")
    print(f"TensorBoard logs: {logger.log_dir}  (tensorboard --logdir {args.logdir})")
    return metrics


if __name__ == "__main__":
    main()
