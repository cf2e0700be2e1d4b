"""Loss-based weighting callbacks: one Lightning callback per method, on :class:`LossWeighting`."""

from lightning_aw.weighting._auto_lambda import AutoLambda
from lightning_aw.weighting._base import LossWeighting, Weighting
from lightning_aw.weighting._dwa import DWA
from lightning_aw.weighting._equal import EqualWeighting
from lightning_aw.weighting._excess_mtl import ExcessMTL
from lightning_aw.weighting._famo import FAMO
from lightning_aw.weighting._gls import GLS, ScaleInvariant
from lightning_aw.weighting._gradnorm import GradNorm
from lightning_aw.weighting._imtl_l import IMTLL
from lightning_aw.weighting._lr_annealing import LRAnnealing
from lightning_aw.weighting._positive import PositiveLossWeighting
from lightning_aw.weighting._relobralo import ReLoBRaLo
from lightning_aw.weighting._rlw import RLW
from lightning_aw.weighting._softadapt import SoftAdapt
from lightning_aw.weighting._stch import STCH
from lightning_aw.weighting._uncertainty import UncertaintyWeighting

__all__ = [
    "DWA",
    "FAMO",
    "GLS",
    "IMTLL",
    "RLW",
    "STCH",
    "AutoLambda",
    "EqualWeighting",
    "ExcessMTL",
    "GradNorm",
    "LRAnnealing",
    "LossWeighting",
    "PositiveLossWeighting",
    "ReLoBRaLo",
    "ScaleInvariant",
    "SoftAdapt",
    "UncertaintyWeighting",
    "Weighting",
]
