"""Gradient-based methods: coefficients from per-task gradients, applied with one backward."""

from lightning_aw.aggregation._base import GradientWeighting
from lightning_aw.aggregation._direction_methods import DBMTL, GradDrop
from lightning_aw.aggregation._methods import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    FairGrad,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from lightning_aw.aggregation._moco import MoCo
from lightning_aw.aggregation._multibatch import MoDo, SDMGrad

__all__ = [
    "DBMTL",
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "GradientWeighting",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "SDMGrad",
    "UPGrad",
]
