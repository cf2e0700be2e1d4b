"""Gradient-based methods: coefficients from per-task gradients, applied with one backward."""

from lightning_aw.aggregation._base import GradientWeighting
from lightning_aw.aggregation._methods import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)

__all__ = [
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "CAGrad",
    "GradVac",
    "GradientWeighting",
    "NashMTL",
    "PCGrad",
    "UPGrad",
]
