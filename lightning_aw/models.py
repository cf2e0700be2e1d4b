"""Small reference multi-task models, ready to train on :mod:`lightning_aw.datasets`.

They back the examples, the benchmarks and the example configurations
(``model.class_path: lightning_aw.models.DigitsNet``).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError
from torchmetrics.classification import MulticlassAccuracy

from lightning_aw.module import MultiTaskModule, TaskOutput

__all__ = ["DigitsNet"]


class DigitsNet(MultiTaskModule):
    """A ~55k-parameter CNN for :class:`~lightning_aw.datasets.TwoDigitsDataModule`.

    Tasks ``left`` and ``right`` (10-way classification, accuracy) and ``sum`` (regression of the
    digit sum, mean absolute error) share a two-layer convolutional trunk; each has a linear head.
    The trunk output is marked with :meth:`~MultiTaskModule.shared_representation`.

    Args:
        lr: learning rate of the default optimizer (used when ``optimizer`` is not given).
        **kwargs: passed to :class:`~lightning_aw.MultiTaskModule` (``optimizer``,
            ``on_nonfinite``).

    Example::

        >>> import torch
        >>> net = DigitsNet()
        >>> losses = net.task_losses((torch.rand(4, 1, 8, 16), torch.tensor([[1, 2, 3]] * 4)), 0)
        >>> sorted(losses)
        ['left', 'right', 'sum']
    """

    def __init__(self, lr: float = 2e-3, **kwargs: Any) -> None:
        kwargs.setdefault("optimizer", {"name": "adam", "lr": lr})
        super().__init__(
            tasks=["left", "right", "sum"],
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
        self.save_hyperparameters()  # load_from_checkpoint rebuilds the same optimizer spec

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
