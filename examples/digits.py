"""Two-digit multi-task example: left class, right class and digit sum from one shared CNN.

    python examples/digits.py --method gradnorm --epochs 5 --logdir runs
    tensorboard --logdir runs

The sum is a regression whose squared error (target variance ≈ 16.5) dwarfs the two
cross-entropies: a built-in scale imbalance that the weighting methods must handle.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_aw import Weighting
from lightning_aw.datasets import TwoDigitsDataModule
from lightning_aw.models import DigitsNet
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--method",
        choices=["none", *list_methods()],
        default="gradnorm",
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
