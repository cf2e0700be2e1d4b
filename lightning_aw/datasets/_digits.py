"""The two-digit dataset: pairs of scikit-learn's 8×8 digits, two classifications and a sum."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["TwoDigitsDataModule", "make_two_digits"]


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The two-digit dataset is built from scikit-learn's bundled digits: "
            "pip install 'lightning-aw[examples]' (or scikit-learn)."
        ) from err
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    return images, torch.tensor(data.target, dtype=torch.long)


def make_two_digits(
    num_pairs: int, *, split: str = "train", seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Pairs of scikit-learn's 8×8 digits side by side, with three tasks.

    Each image is 1×8×16 (left digit, right digit). The targets are ``[left class, right class,
    left + right]``: two 10-way classifications and a regression whose target variance (≈ 16.5)
    makes its squared error dwarf the cross-entropies, a built-in scale imbalance.

    The 1,797 digits are split once (80 % / 20 %, fixed seed) so ``"train"`` and ``"val"`` pairs
    never share a digit image.

    Args:
        num_pairs: number of pairs to draw.
        split: ``"train"`` or ``"val"``.
        seed: seed of the pairing.

    Returns:
        ``(images [N, 1, 8, 16], targets [N, 3])`` (targets as long).

    Example::

        >>> from lightning_aw.datasets import make_two_digits
        >>> x, y = make_two_digits(4)
        >>> x.shape, y.shape
        (torch.Size([4, 1, 8, 16]), torch.Size([4, 3]))
        >>> bool((y[:, 2] == y[:, 0] + y[:, 1]).all())  # the third target is the digit sum
        True
    """
    if split not in ("train", "val"):
        raise ValueError(f"Parameter `split` should be 'train' or 'val'. Found {split!r}.")
    if num_pairs < 1:
        raise ValueError(f"Parameter `num_pairs` should be >= 1. Found {num_pairs!r}.")
    images, labels = _load_digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(labels))
    pool = order[:cut] if split == "train" else order[cut:]
    gen = torch.Generator().manual_seed(seed + (0 if split == "train" else 10_000))
    left = pool[torch.randint(len(pool), (num_pairs,), generator=gen)]
    right = pool[torch.randint(len(pool), (num_pairs,), generator=gen)]
    x = torch.cat([images[left], images[right]], dim=2).unsqueeze(1)
    y = torch.stack([labels[left], labels[right], labels[left] + labels[right]], dim=1)
    return x, y


class TwoDigitsDataModule(pl.LightningDataModule):
    """A LightningDataModule over :func:`make_two_digits` (tasks ``left``, ``right``, ``sum``).

    Args:
        train_pairs: number of training pairs.
        val_pairs: number of validation pairs.
        batch_size: batch size of both loaders.
        seed: seed of the pairing.

    Example::

        >>> from lightning_aw.datasets import TwoDigitsDataModule
        >>> dm = TwoDigitsDataModule(train_pairs=256, val_pairs=64, batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape
        (torch.Size([32, 1, 8, 16]), torch.Size([32, 3]))
    """

    tasks = ("left", "right", "sum")

    def __init__(
        self,
        train_pairs: int = 10_000,
        val_pairs: int = 2_000,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.batch_size, self.seed = batch_size, seed
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = TensorDataset(*make_two_digits(self.train_pairs, seed=self.seed))
            self._val = TensorDataset(*make_two_digits(self.val_pairs, split="val", seed=self.seed))

    def train_dataloader(self) -> DataLoader[Any]:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self._val, batch_size=512)

    def test_dataloader(self) -> DataLoader[Any]:
        """The validation pairs (the two-digit data has no separate test split)."""
        return self.val_dataloader()
