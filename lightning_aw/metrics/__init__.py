"""Metrics for multi-task evaluation (torchmetrics): Δm% and the NYUv2 dense-prediction set."""

from lightning_aw.metrics._delta import (
    NYUV2_HIGHER_IS_BETTER,
    NYUV2_SINGLE_TASK,
    MultiTaskDelta,
    multitask_delta,
)
from lightning_aw.metrics._dense import DepthMetric, NormalMetric, SegmentationMetric, nyuv2_metrics

__all__ = [
    "NYUV2_HIGHER_IS_BETTER",
    "NYUV2_SINGLE_TASK",
    "DepthMetric",
    "MultiTaskDelta",
    "NormalMetric",
    "SegmentationMetric",
    "multitask_delta",
    "nyuv2_metrics",
]
