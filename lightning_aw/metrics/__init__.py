"""Metrics for multi-task evaluation (torchmetrics)."""

from lightning_aw.metrics._delta import MultiTaskDelta, multitask_delta

__all__ = ["MultiTaskDelta", "multitask_delta"]
