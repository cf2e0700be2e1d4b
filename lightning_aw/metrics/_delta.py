"""Δm%: the average relative change of a multi-task model against single-task baselines."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["NYUV2_HIGHER_IS_BETTER", "NYUV2_SINGLE_TASK", "MultiTaskDelta", "multitask_delta"]

Sign = Literal["improvement", "drop"]
Average = Literal["metrics", "tasks"]

#: Direction of each metric of the NYUv2 protocol (MTAN; Nash-MTL, FAMO), named as
#: :func:`lightning_aw.metrics.nyuv2_metrics` logs them.
NYUV2_HIGHER_IS_BETTER: dict[str, dict[str, bool]] = {
    "seg": {"miou": True, "pix_acc": True},
    "depth": {"abs_err": False, "rel_err": False},
    "normal": {
        "mean": False,
        "median": False,
        "within_11": True,
        "within_22": True,
        "within_30": True,
    },
}

#: The published single-task baseline on NYUv2 (one MTAN network per task, 200 epochs) that
#: Nash-MTL and FAMO compute their Δm% against (from CAGrad, Liu et al., NeurIPS 2021): mIoU,
#: pixel accuracy and the within-threshold shares as fractions, depth errors in metres, angles in
#: degrees, the scale of :func:`lightning_aw.metrics.nyuv2_metrics`.
NYUV2_SINGLE_TASK: dict[str, dict[str, float]] = {
    "seg": {"miou": 0.3830, "pix_acc": 0.6376},
    "depth": {"abs_err": 0.6754, "rel_err": 0.2780},
    "normal": {
        "mean": 25.01,
        "median": 19.21,
        "within_11": 0.3014,
        "within_22": 0.5720,
        "within_30": 0.6915,
    },
}


def _flatten(
    baselines: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, Mapping[str, bool]]
) -> tuple[list[tuple[str, str]], Tensor, Tensor]:
    keys: list[tuple[str, str]] = []
    for task, metrics in baselines.items():
        if not metrics:
            raise ValueError(f"Task '{task}' in `baselines` has no metric.")
        for name in metrics:
            if task not in higher_is_better or name not in higher_is_better[task]:
                raise ValueError(
                    f"Parameter `higher_is_better` has no entry for metric '{name}' of task "
                    f"'{task}': give `higher_is_better['{task}']['{name}'] = True or False`."
                )
            keys.append((task, name))
    base = torch.tensor([float(baselines[t][m]) for t, m in keys], dtype=torch.float64)
    if not torch.isfinite(base).all() or (base == 0).any():
        bad = [f"{t}/{m}" for (t, m), b in zip(keys, base.tolist(), strict=True) if not b or b != b]
        raise ValueError(
            f"Baselines must be finite and non-zero (they divide); found {bad or 'non-finite'}."
        )
    higher = torch.tensor([bool(higher_is_better[t][m]) for t, m in keys])
    return keys, base, higher


def _delta(
    values: Tensor,
    base: Tensor,
    higher: Tensor,
    keys: list[tuple[str, str]],
    sign: Sign,
    average: Average,
) -> Tensor:
    rel = (values - base) / base
    rel = torch.where(higher, rel, -rel)  # positive: better than the single-task model
    if average == "metrics":
        delta = rel.mean()
    else:
        tasks = list(dict.fromkeys(t for t, _ in keys))
        per_task = [rel[[i for i, (t, _) in enumerate(keys) if t == task]].mean() for task in tasks]
        delta = torch.stack(per_task).mean()
    delta = 100.0 * delta
    return delta if sign == "improvement" else -delta


def _check_options(sign: str, average: str) -> None:
    if sign not in ("improvement", "drop"):
        raise ValueError(f"Parameter `sign` should be 'improvement' or 'drop'. Found {sign!r}.")
    if average not in ("metrics", "tasks"):
        raise ValueError(f"Parameter `average` should be 'metrics' or 'tasks'. Found {average!r}.")


def _values(values: Mapping[str, Mapping[str, Any]], keys: list[tuple[str, str]]) -> Tensor:
    out = []
    for task, name in keys:
        if task not in values or name not in values[task]:
            raise KeyError(f"No value for metric '{name}' of task '{task}'.")
        out.append(float(values[task][name]))
    return torch.tensor(out, dtype=torch.float64)


def multitask_delta(
    values: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
    sign: Sign = "drop",
    average: Average = "metrics",
) -> Tensor:
    r"""Δm% of a multi-task model against single-task baselines (Maninis et al., CVPR 2019).

    .. math::

        \Delta_m = \frac{100}{K}\sum_{k=1}^{K} (-1)^{h_k}\,\frac{M_k - M_k^{\text{STL}}}
        {M_k^{\text{STL}}}, \qquad h_k = 1 \text{ when higher is better}

    with the default ``sign="drop"``: lower is better, negative when the multi-task model beats
    the single-task models on average (the papers' convention: Nash-MTL, FAMO).

    Args:
        values: the multi-task model's metrics, ``{task: {metric: value}}``.
        baselines: the single-task models' metrics, same layout (non-zero).
        higher_is_better: ``{task: {metric: bool}}``.
        sign: ``"drop"`` (default: the average relative drop, lower is better, negative = better
            than single-task, as Nash-MTL and FAMO report it) or ``"improvement"`` (the
            opposite sign, positive = better, as Maninis et al. and LibMTL write it).
        average: ``"metrics"`` (over all K metrics, as Nash-MTL/FAMO) or ``"tasks"`` (within each
            task first, then over tasks, as LibMTL).

    Returns:
        A float64 scalar tensor, in percent.

    Example::

        >>> base = {"seg": {"miou": 40.0}, "depth": {"abs_err": 0.5}}
        >>> hib = {"seg": {"miou": True}, "depth": {"abs_err": False}}
        >>> values = {"seg": {"miou": 44.0}, "depth": {"abs_err": 0.45}}
        >>> round(float(multitask_delta(values, base, hib)), 6)  # 10 % better on both: a -10 % drop
        -10.0
        >>> round(float(multitask_delta(values, base, hib, sign="improvement")), 6)
        10.0
    """
    _check_options(sign, average)
    keys, base, higher = _flatten(baselines, higher_is_better)
    return _delta(_values(values, keys), base, higher, keys, sign, average)


class MultiTaskDelta(Metric):
    r"""Δm% as a torchmetrics ``Metric``: :func:`multitask_delta` of the averaged metric values.

    Each ``update`` takes one set of the multi-task model's metric values (one evaluation, e.g.
    one seed); ``compute`` averages them (over updates and, under DDP, over ranks: the states
    are sums reduced with ``sum``) and returns Δm% against the baselines.

    Args:
        baselines: single-task metrics, ``{task: {metric: value}}``.
        higher_is_better: ``{task: {metric: bool}}``.
        sign: ``"drop"`` (default, lower is better) or ``"improvement"``; see
            :func:`multitask_delta`.
        average: ``"metrics"`` (default) or ``"tasks"``.

    Example::

        >>> base = {"seg": {"miou": 40.0}, "depth": {"abs_err": 0.5}}
        >>> hib = {"seg": {"miou": True}, "depth": {"abs_err": False}}
        >>> metric = MultiTaskDelta(base, hib)
        >>> metric.update({"seg": {"miou": 42.0}, "depth": {"abs_err": 0.45}})
        >>> round(float(metric.compute()), 4)  # (+5 % + 10 %) / 2 better: a -7.5 % drop
        -7.5
    """

    full_state_update = False
    higher_is_better = None

    def __init__(
        self,
        baselines: Mapping[str, Mapping[str, float]],
        higher_is_better: Mapping[str, Mapping[str, bool]],
        sign: Sign = "drop",
        average: Average = "metrics",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_options(sign, average)
        self._keys, base, higher = _flatten(baselines, higher_is_better)
        self.sign, self.average = sign, average
        self.register_buffer("_base", base, persistent=False)
        self.register_buffer("_higher", higher, persistent=False)
        self.add_state(
            "value_sum", torch.zeros(len(self._keys), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @classmethod
    def nyuv2(
        cls,
        baselines: Mapping[str, Mapping[str, float]] | None = None,
        sign: Sign = "drop",
        average: Average = "metrics",
        **kwargs: Any,
    ) -> MultiTaskDelta:
        """Δm% over the 9 NYUv2 metrics (:data:`NYUV2_HIGHER_IS_BETTER`), as Nash-MTL and FAMO.

        Args:
            baselines: your single-task models' metrics in the layout of
                :data:`NYUV2_HIGHER_IS_BETTER` (e.g. the ``val/<task>/<name>`` values that
                :func:`~lightning_aw.metrics.nyuv2_metrics` logs). Default: the published
                :data:`NYUV2_SINGLE_TASK` (only meaningful for the real NYUv2 protocol).
            sign: ``"drop"`` (default) or ``"improvement"``.
            average: ``"metrics"`` (default, over all 9 as the papers) or ``"tasks"``.
            **kwargs: passed to ``Metric``.

        Example::

            >>> famo = {"seg": {"miou": 0.3888, "pix_acc": 0.6490},
            ...         "depth": {"abs_err": 0.5474, "rel_err": 0.2194},
            ...         "normal": {"mean": 25.06, "median": 19.57, "within_11": 0.2921,
            ...                    "within_22": 0.5661, "within_30": 0.6898}}
            >>> metric = MultiTaskDelta.nyuv2()
            >>> metric.update(famo)
            >>> round(float(metric.compute()), 2)  # FAMO's published Δm% on NYUv2
            -4.1
        """
        base = NYUV2_SINGLE_TASK if baselines is None else baselines
        return cls(base, NYUV2_HIGHER_IS_BETTER, sign=sign, average=average, **kwargs)

    def update(self, values: Mapping[str, Mapping[str, Any]]) -> None:  # type: ignore[override]
        v = _values(values, self._keys).to(self.value_sum.device)
        self.value_sum = self.value_sum + v
        self.count = self.count + 1

    def compute(self) -> Tensor:
        if float(self.count) == 0:
            raise RuntimeError("MultiTaskDelta.compute() before any update().")
        mean = self.value_sum / self.count
        return _delta(
            mean,
            self._base.to(mean.device),
            self._higher.to(mean.device),
            self._keys,
            self.sign,
            self.average,
        )
