"""The data loaders shared by the dense-prediction data modules."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


class _SplitDataModule(pl.LightningDataModule):
    """A training split shuffled by a seeded generator and a validation split, which is also the
    test split (the preprocessed NYUv2 has no separate test split). Subclasses set ``_train``
    and ``_val`` in ``setup`` and the ``batch_size``, ``seed`` and ``num_workers`` attributes."""

    _train: Dataset[Any] | None
    _val: Dataset[Any] | None
    batch_size: int
    seed: int
    num_workers: int

    def train_dataloader(self) -> DataLoader[Any]:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self._train,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(
            self._val,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader[Any]:
        """The validation split."""
        return self.val_dataloader()
