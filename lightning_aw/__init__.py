"""lightning_aw: adaptive multi-task loss weighting for PyTorch Lightning.

Subclass :class:`MultiTaskModule`, add one weighting callback to the Trainer, open TensorBoard.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on first use (`lightning-aw --version` needs no torch)
    from lightning_aw.aggregation import (
        DBMTL,
        IMTLG,
        MGDA,
        AlignedMTL,
        CAGrad,
        ConFIG,
        DualProj,
        FairGrad,
        GradDrop,
        GradientWeighting,
        GradVac,
        MoCo,
        MoDo,
        NashMTL,
        PCGrad,
        SDMGrad,
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
        AutoLambda,
        EqualWeighting,
        ExcessMTL,
        GradNorm,
        LossWeighting,
        LRAnnealing,
        ReLoBRaLo,
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
    "AutoLambda",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "EqualWeighting",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientWeighting",
    "LRAnnealing",
    "LossWeighting",
    "MoCo",
    "MoDo",
    "MultiTaskModule",
    "NashMTL",
    "PCGrad",
    "ReLoBRaLo",
    "SDMGrad",
    "ScaleInvariant",
    "SoftAdapt",
    "TaskOutput",
    "UPGrad",
    "UncertaintyWeighting",
    "Weighting",
]

_MODULES = {"MultiTaskModule": "module", "TaskOutput": "module", "Weighting": "weighting"}


def __getattr__(name: str) -> Any:
    """Import the public classes (and submodules) on first use."""
    if name in __all__:
        module = _MODULES.get(name)
        if module is None:  # the methods: weighting (loss-based) or aggregation (gradients)
            weighting = importlib.import_module("lightning_aw.weighting")
            module = "weighting" if hasattr(weighting, name) else "aggregation"
        value = getattr(importlib.import_module(f"lightning_aw.{module}"), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"lightning_aw.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'lightning_aw' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
