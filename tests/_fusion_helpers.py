"""Tiny classification data and a three-member fusion module for the fusion tests (and the DDP
case in ``ddp_script.py``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw.fusion import WeightedEnsemble

MEMBERS = ("m1", "m2", "m4")  # member m<k> sees the first k features: different errors


def class_data(n: int = 192, seed: int = 0, num_classes: int = 3) -> tuple[Tensor, Tensor]:
    """4-d inputs, 3 classes: the argmax of a fixed linear map, 10% labels flipped."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    w = torch.tensor([[2.0, -1.0, 0.0], [0.0, 1.5, -1.5], [1.0, 0.0, -1.0], [-1.0, 1.0, 1.0]])
    y = (x @ w[:, :num_classes]).argmax(dim=1)
    flip = torch.rand(n, generator=gen) < 0.1
    y = torch.where(flip, torch.randint(0, num_classes, (n,), generator=gen), y)
    return x, y


def class_loader(n: int = 192, seed: int = 0, batch_size: int = 32) -> DataLoader:
    return DataLoader(TensorDataset(*class_data(n, seed)), batch_size=batch_size)


class Member(nn.Module):
    """A linear classifier on the first ``k`` features."""

    def __init__(self, k: int, num_classes: int = 3) -> None:
        super().__init__()
        self.k = k
        self.linear = nn.Linear(k, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x[:, : self.k])


class FusionNet(pl.LightningModule):
    """Three members trained on their own cross-entropies; ensembles with callback-set weights
    (``ensemble``, and ``second`` when ``two`` is set) fuse them. Records, per training batch,
    each member's cross-entropy (host floats, computed here, independently of the callbacks)."""

    def __init__(self, seed: int = 0, combine: str = "logits", two: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.members = nn.ModuleDict({n: Member(int(n[1:])) for n in MEMBERS})
        self.ensemble = WeightedEnsemble(list(MEMBERS), combine=combine, weights="fixed")  # type: ignore[arg-type]
        self.second = WeightedEnsemble(list(MEMBERS), weights="fixed") if two else None
        self.train_losses: list[list[float]] = []

    def member_logits(self, x: Tensor) -> dict[str, Tensor]:
        return {n: m(x) for n, m in self.members.items()}

    def forward(self, x: Tensor) -> Tensor:
        return self.ensemble(self.member_logits(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.member_logits(x)
        self.ensemble(logits)
        if self.second is not None:
            self.second(logits)
        losses = [F.cross_entropy(z, y) for z in logits.values()]
        self.train_losses.append([v.item() for v in torch.stack(losses).detach()])
        return torch.stack(losses).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])  # the callbacks read the members' outputs

    def configure_optimizers(self):
        return torch.optim.SGD(self.members.parameters(), lr=0.2)
