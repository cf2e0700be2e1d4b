"""Weighting callbacks: one Lightning callback per method, on the common :class:`Weighting` base."""

from lightning_aw.weighting._base import Weighting
from lightning_aw.weighting._dwa import DWA
from lightning_aw.weighting._equal import EqualWeighting
from lightning_aw.weighting._gradnorm import GradNorm
from lightning_aw.weighting._uncertainty import UncertaintyWeighting

__all__ = ["DWA", "EqualWeighting", "GradNorm", "UncertaintyWeighting", "Weighting"]
