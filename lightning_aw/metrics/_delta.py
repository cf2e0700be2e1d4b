"""Δm%: the average relative change of a multi-task model against single-task baselines."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MultiTaskDelta", "multitask_delta"]

Sign = Literal["improvement", "drop"]
Average = Literal["metrics", "tasks"]


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
    sign: Sign = "improvement",
    average: Average = "metrics",
) -> Tensor:
    r"""Δm% of a multi-task model against single-task baselines (Maninis et al., CVPR 2019).

    .. math::

        \Delta_m = \frac{100}{K}\sum_{k=1}^{K} (-1)^{l_k}\,\frac{M_k - M_k^{\text{STL}}}
        {M_k^{\text{STL}}}, \qquad l_k = 1 \text{ when lower is better}

    Args:
        values: the multi-task model's metrics, ``{task: {metric: value}}``.
        baselines: the single-task models' metrics, same layout (non-zero).
        higher_is_better: ``{task: {metric: bool}}``.
        sign: ``"improvement"`` (positive = better than single-task, Maninis et al.; LibMTL) or
            ``"drop"`` (the opposite sign, lower is better, as Nash-MTL and FAMO report it).
        average: ``"metrics"`` (over all K metrics, as Nash-MTL/FAMO) or ``"tasks"`` (within each
            task first, then over tasks, as LibMTL).

    Returns:
        A float64 scalar tensor, in percent.

    Example::

        >>> base = {"seg": {"miou": 40.0}, "depth": {"abs_err": 0.5}}
        >>> hib = {"seg": {"miou": True}, "depth": {"abs_err": False}}
        >>> values = {"seg": {"miou": 44.0}, "depth": {"abs_err": 0.45}}
        >>> round(float(multitask_delta(values, base, hib)), 6)  # (+10 % + 10 %) / 2
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
        sign: ``"improvement"`` (default) or ``"drop"``; see :func:`multitask_delta`.
        average: ``"metrics"`` (default) or ``"tasks"``.

    Example::

        >>> base = {"seg": {"miou": 40.0}, "depth": {"abs_err": 0.5}}
        >>> hib = {"seg": {"miou": True}, "depth": {"abs_err": False}}
        >>> metric = MultiTaskDelta(base, hib)
        >>> metric.update({"seg": {"miou": 42.0}, "depth": {"abs_err": 0.45}})
        >>> round(float(metric.compute()), 4)
        7.5
    """

    full_state_update = False
    higher_is_better = None

    def __init__(
        self,
        baselines: Mapping[str, Mapping[str, float]],
        higher_is_better: Mapping[str, Mapping[str, bool]],
        sign: Sign = "improvement",
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
