"""lightning_aw: adaptive multi-task loss weighting for PyTorch Lightning.

Subclass :class:`MultiTaskModule`, add one weighting callback to the Trainer, open TensorBoard.
"""

from lightning_aw.aggregation import (
    DBMTL,
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    GradDrop,
    GradientWeighting,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from lightning_aw.module import MultiTaskModule, TaskOutput
from lightning_aw.weighting import (
    DWA,
    FAMO,
    GLS,
    IMTLL,
    RLW,
    STCH,
    EqualWeighting,
    GradNorm,
    LossWeighting,
    ScaleInvariant,
    SoftAdapt,
    UncertaintyWeighting,
    Weighting,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "RLW",
    "STCH",
    "AlignedMTL",
    "CAGrad",
    "EqualWeighting",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientWeighting",
    "LossWeighting",
    "MultiTaskModule",
    "NashMTL",
    "PCGrad",
    "ScaleInvariant",
    "SoftAdapt",
    "TaskOutput",
    "UPGrad",
    "UncertaintyWeighting",
    "Weighting",
]
