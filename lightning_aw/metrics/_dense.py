"""The dense-prediction metrics of the NYUv2 protocol (segmentation, depth, surface normals).

The metric set of Liu, Johns & Davison (MTAN, CVPR 2019), used by Nash-MTL, FAMO and LibMTL:
mIoU and pixel accuracy for 13-class segmentation, absolute and relative depth error, and the
mean / median angular error of surface normals with the share of pixels within 11.25°, 22.5° and
30°. Each metric here is a torchmetrics ``Metric`` whose states are sums (``dist_reduce_fx="sum"``),
so DDP evaluation on any split of the data gives the same numbers as one process.

Conventions (and where they differ from the reference code of MTAN / Nash-MTL):

- Segmentation is accumulated in a confusion matrix over the whole evaluation set (as their
  ``ConfMatrix``). Pixels whose target is ``ignore_index`` (−1) are left out.
- Depth and normals: ``reduction="pixel"`` (default) averages over every valid pixel of the
  evaluation set; ``reduction="batch"`` averages per-batch values with equal weight per batch, as
  MTAN / Nash-MTL's evaluation loops do (their numbers then depend on the batch size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "DepthMetric",
    "NormalMetric",
    "SegmentationMetric",
    "nyuv2_metrics",
]

Reduction = Literal["pixel", "batch"]

_SEG_OUTPUTS = ("miou", "pix_acc")
_DEPTH_OUTPUTS = ("abs_err", "rel_err")
_NORMAL_OUTPUTS = ("mean", "median", "within_11", "within_22", "within_30")
_THRESHOLDS = (11.25, 22.5, 30.0)


def _check_output(output: str | None, allowed: tuple[str, ...], cls: str) -> None:
    if output is not None and output not in allowed:
        raise ValueError(
            f"{cls}: parameter `output` should be None (all values, as a dict) or one of "
            f"{list(allowed)}. Found {output!r}."
        )


def _check_reduction(reduction: str, cls: str) -> None:
    if reduction not in ("pixel", "batch"):
        raise ValueError(
            f"{cls}: parameter `reduction` should be 'pixel' or 'batch'. Found {reduction!r}."
        )


def _select(values: dict[str, Tensor], output: str | None) -> Tensor | dict[str, Tensor]:
    return values if output is None else values[output]


class SegmentationMetric(Metric):
    r"""Mean intersection over union and pixel accuracy from a confusion matrix.

    The confusion matrix :math:`C` (rows: target class, columns: predicted class) is summed over
    every ``update`` (and over the ranks under DDP), then

    .. math::

        \mathrm{IoU}_c = \frac{C_{cc}}{\sum_j C_{cj} + \sum_i C_{ic} - C_{cc}}, \qquad
        \mathrm{pix\_acc} = \frac{\sum_c C_{cc}}{\sum_{ij} C_{ij}}

    as in MTAN's evaluation (Liu, Johns & Davison, CVPR 2019, arXiv:1803.10704) and the
    ``ConfMatrix`` of Nash-MTL / FAMO. ``miou`` averages :math:`\mathrm{IoU}_c` over the classes
    that occur in the target or the prediction; a class absent from both has no IoU and is left
    out of the mean. (Nash-MTL's code divides 0 by 0 there and its mean becomes NaN; on NYUv2's
    validation set every class occurs, so the two agree.) Both values are fractions in [0, 1].

    Args:
        num_classes: number of classes (13 for the NYUv2 13-class protocol).
        ignore_index: target value of pixels without a label (NYUv2: −1); they are not counted.
        output: ``"miou"`` or ``"pix_acc"`` to compute that scalar (what Lightning's
            ``log_dict`` and :class:`~lightning_aw.MultiTaskModule`'s ``metrics`` need), or
            ``None`` (default) for a dict of both.

    ``update(preds, target)`` takes ``preds`` as logits / scores ``[B, C, H, W]`` (argmax over
    dimension 1) or class indices ``[B, H, W]``, and ``target`` as class indices ``[B, H, W]``
    (``ignore_index`` allowed).

    Example::

        >>> import torch
        >>> metric = SegmentationMetric(num_classes=3)
        >>> target = torch.tensor([[[0, 0, 1], [2, -1, 1]]])
        >>> preds = torch.tensor([[[0, 1, 1], [2, 2, 1]]])
        >>> metric.update(preds, target)  # IoU 1/2, 2/3, 1/1 over 5 labelled pixels, 4 right
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'miou': 0.7222, 'pix_acc': 0.8}
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = -1,
        output: Literal["miou", "pix_acc"] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"SegmentationMetric: parameter `num_classes` should be an int >= 2. "
                f"Found {num_classes!r}."
            )
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"SegmentationMetric: `ignore_index` ({ignore_index}) is a valid class index "
                f"(0..{num_classes - 1}); use a value outside that range, e.g. -1."
            )
        _check_output(output, _SEG_OUTPUTS, "SegmentationMetric")
        self.num_classes, self.ignore_index, self.output = num_classes, ignore_index, output
        self.add_state(
            "confmat",
            torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        n = self.num_classes
        if preds.is_floating_point():
            if preds.ndim != target.ndim + 1 or preds.shape[1] != n:
                raise ValueError(
                    f"SegmentationMetric: floating `preds` should be scores [B, {n}, H, W] for "
                    f"`target` {list(target.shape)}. Found {list(preds.shape)}."
                )
            preds = preds.argmax(1)
        if preds.shape != target.shape:
            raise ValueError(
                f"SegmentationMetric: `preds` (class indices) and `target` should have the same "
                f"shape. Found {list(preds.shape)} and {list(target.shape)}."
            )
        target = target.long()
        preds = preds.long()
        valid = target != self.ignore_index
        t, p = target[valid], preds[valid]
        bad = (t < 0) | (t >= n) | (p < 0) | (p >= n)
        if bool(bad.any()):
            raise ValueError(
                f"SegmentationMetric: class indices should lie in [0, {n - 1}] (targets may also "
                f"be ignore_index={self.ignore_index}). Found targets in "
                f"[{int(t.min())}, {int(t.max())}] and predictions in "
                f"[{int(p.min())}, {int(p.max())}]."
            )
        counts = torch.bincount(t * n + p, minlength=n * n).reshape(n, n)
        self.confmat = self.confmat + counts

    def compute(self) -> Tensor | dict[str, Tensor]:
        c = self.confmat.double()
        tp = c.diagonal()
        union = c.sum(0) + c.sum(1) - tp
        seen = union > 0
        iou = tp[seen] / union[seen]
        total = c.sum()
        values = {
            "miou": iou.mean() if bool(seen.any()) else total.new_tensor(math.nan),
            "pix_acc": tp.sum() / total if total > 0 else total.new_tensor(math.nan),
        }
        return _select(values, self.output)


class DepthMetric(Metric):
    r"""Absolute and relative depth error over the valid pixels (target ≠ 0).

    .. math::

        \mathrm{abs\_err} = \frac{1}{|V|}\sum_{p\in V} |\hat d_p - d_p|, \qquad
        \mathrm{rel\_err} = \frac{1}{|V|}\sum_{p\in V} \frac{|\hat d_p - d_p|}{d_p}

    with :math:`V` the pixels whose target depth is not 0 (missing depth), the NYUv2 metric of
    MTAN (Liu, Johns & Davison, CVPR 2019, arXiv:1803.10704).

    With ``reduction="pixel"`` (default) :math:`V` is every valid pixel of the evaluation set:
    the value does not depend on the batch size nor on how DDP splits the data. With
    ``reduction="batch"`` the errors are averaged within each ``update`` (batch) and the batch
    values averaged with equal weight, as MTAN / Nash-MTL's evaluation loops do (a batch with no
    valid pixel is left out; theirs would give NaN). The two differ when batches hold different
    numbers of valid pixels.

    Args:
        output: ``"abs_err"`` or ``"rel_err"`` for that scalar, or ``None`` (default) for both.
        reduction: ``"pixel"`` (default) or ``"batch"``.

    ``update(preds, target)`` takes two tensors of the same shape (``[B, 1, H, W]`` or
    ``[B, H, W]``), in the same unit (NYUv2: metres).

    Example::

        >>> import torch
        >>> metric = DepthMetric()
        >>> metric.update(torch.tensor([[1.5, 2.0, 9.0]]), torch.tensor([[1.0, 4.0, 0.0]]))
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}  # 0.0 is invalid
        {'abs_err': 1.25, 'rel_err': 0.5}
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(
        self,
        output: Literal["abs_err", "rel_err"] | None = None,
        reduction: Reduction = "pixel",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_output(output, _DEPTH_OUTPUTS, "DepthMetric")
        _check_reduction(reduction, "DepthMetric")
        self.output, self.reduction = output, reduction
        # pixel: sums over pixels and the pixel count; batch: sums of batch means and the count
        self.add_state("abs_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rel_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        if preds.shape != target.shape:
            raise ValueError(
                f"DepthMetric: `preds` and `target` should have the same shape. Found "
                f"{list(preds.shape)} and {list(target.shape)}."
            )
        valid = target != 0
        target = target.double()
        err = (preds.double() - target).abs()
        abs_err = torch.where(valid, err, 0.0).sum()
        rel_err = torch.where(valid, err / torch.where(valid, target, 1.0).abs(), 0.0).sum()
        n = valid.sum()
        if self.reduction == "pixel":
            self.abs_sum = self.abs_sum + abs_err
            self.rel_sum = self.rel_sum + rel_err
            self.count = self.count + n
        else:
            has = n > 0
            denom = n.clamp(min=1)
            self.abs_sum = self.abs_sum + torch.where(has, abs_err / denom, 0.0)
            self.rel_sum = self.rel_sum + torch.where(has, rel_err / denom, 0.0)
            self.count = self.count + has.long()

    def compute(self) -> Tensor | dict[str, Tensor]:
        count = self.count.double()
        nan = torch.full_like(count, math.nan)
        values = {
            "abs_err": torch.where(count > 0, self.abs_sum / count.clamp(min=1), nan),
            "rel_err": torch.where(count > 0, self.rel_sum / count.clamp(min=1), nan),
        }
        return _select(values, self.output)


class NormalMetric(Metric):
    r"""Angular error of predicted surface normals: mean, median, share within 11.25°/22.5°/30°.

    Per valid pixel (a target normal that is not the zero vector) the error is
    :math:`\theta_p = \arccos\big(\mathrm{clamp}(\hat n_p\cdot n_p, -1, 1)\big)` in degrees, with
    the prediction normalised to unit length first (a head that already outputs unit vectors is
    unaffected). The values are the NYUv2 metrics of MTAN (Liu, Johns & Davison, CVPR 2019,
    arXiv:1803.10704): ``mean`` and ``median`` in degrees, ``within_11`` / ``within_22`` /
    ``within_30`` the fraction of valid pixels with :math:`\theta < 11.25°, 22.5°, 30°`.

    ``reduction="pixel"`` (default): over every valid pixel of the evaluation set. The mean and
    the shares are exact; the median comes from a histogram of the errors (``bins`` bins over
    [0°, 180°], default 18,000: 0.01° wide): each of the two middle errors is placed inside its
    bin by its rank there, so the result is within one bin width (0.01°) of the exact median
    (``numpy.median`` of all errors) while the state stays fixed-size and sums across ranks.
    ``reduction="batch"``: every value is computed per ``update`` (the median exactly, as
    ``numpy.median``) and the batch values averaged with equal weight, as MTAN / Nash-MTL's
    evaluation loops do (their numbers depend on the batch size).

    Nash-MTL's code marks a target valid when its components do not sum to 0; here when it is not
    the zero vector (the same on real data).

    Args:
        output: one of ``"mean"``, ``"median"``, ``"within_11"``, ``"within_22"``,
            ``"within_30"`` for that scalar, or ``None`` (default) for a dict of all five.
        reduction: ``"pixel"`` (default) or ``"batch"``.
        bins: histogram bins over [0°, 180°] for the median with ``reduction="pixel"``.

    ``update(preds, target)`` takes two tensors ``[B, 3, H, W]`` (vectors along dimension 1).

    Example::

        >>> import math, torch
        >>> metric = NormalMetric()
        >>> c, s = math.cos(math.radians(20.0)), math.sin(math.radians(20.0))
        >>> target = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
        >>> preds = torch.tensor([[0.0, 0.0, 2.0], [s, 0.0, c], [1.0, 0.0, 0.0]])
        >>> metric.update(preds.T[None, :, :, None], target.T[None, :, :, None])
        >>> {k: round(float(v), 1) for k, v in metric.compute().items()}  # errors 0° and 20°
        {'mean': 10.0, 'median': 10.0, 'within_11': 0.5, 'within_22': 1.0, 'within_30': 1.0}
    """

    full_state_update = False
    higher_is_better = None  # the angles are lower-is-better, the shares higher-is-better
    is_differentiable = False

    def __init__(
        self,
        output: Literal["mean", "median", "within_11", "within_22", "within_30"] | None = None,
        reduction: Reduction = "pixel",
        bins: int = 18_000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_output(output, _NORMAL_OUTPUTS, "NormalMetric")
        _check_reduction(reduction, "NormalMetric")
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(
                f"NormalMetric: parameter `bins` should be an int >= 1. Found {bins!r}."
            )
        self.output, self.reduction, self.bins = output, reduction, bins
        # pixel: sums over pixels and the pixel count; batch: sums of batch values and the count
        self.add_state("angle_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("median_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "within", torch.zeros(len(_THRESHOLDS), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        hist = bins if reduction == "pixel" else 1
        self.add_state("hist", torch.zeros(hist, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        if preds.shape != target.shape or preds.ndim < 2 or preds.shape[1] != 3:
            raise ValueError(
                "NormalMetric: `preds` and `target` should both be [B, 3, ...] (vectors along "
                f"dimension 1). Found {list(preds.shape)} and {list(target.shape)}."
            )
        valid = (target != 0).any(1)
        cos = (F.normalize(preds.double(), dim=1) * F.normalize(target.double(), dim=1)).sum(1)
        err = torch.rad2deg(torch.acos(cos[valid].clamp(-1.0, 1.0)))
        n = err.numel()
        within = torch.stack([(err < t).sum() for t in _THRESHOLDS]).double()
        if self.reduction == "pixel":
            self.angle_sum = self.angle_sum + err.sum()
            self.within = self.within + within
            self.count = self.count + n
            idx = (err * (self.bins / 180.0)).long().clamp_(0, self.bins - 1)
            self.hist = self.hist + torch.bincount(idx, minlength=self.bins)
        elif n > 0:  # a batch without a valid pixel is left out
            ordered = err.sort().values
            median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
            self.angle_sum = self.angle_sum + err.mean()
            self.median_sum = self.median_sum + median
            self.within = self.within + within / n
            self.count = self.count + 1

    def _hist_median(self) -> Tensor:
        # the two middle order statistics (0-based ranks (N-1)//2 and N//2), each placed inside
        # its bin by its rank among the bin's errors, then averaged as numpy.median does
        hist = self.hist
        cum = hist.cumsum(0)
        total = int(cum[-1])
        width = 180.0 / self.bins
        values = []
        for rank in ((total - 1) // 2, total // 2):
            k = int(torch.searchsorted(cum, torch.tensor(rank + 1, device=cum.device)))
            before = int(cum[k - 1]) if k > 0 else 0
            values.append((k + (rank - before + 0.5) / int(hist[k])) * width)
        return self.angle_sum.new_tensor(sum(values) / 2)

    def compute(self) -> Tensor | dict[str, Tensor]:
        count = self.count.double()
        if float(count) == 0:
            nan = torch.full_like(count, math.nan)
            values = dict.fromkeys(_NORMAL_OUTPUTS, nan)
        else:
            share = self.within / count
            median = self._hist_median() if self.reduction == "pixel" else self.median_sum / count
            values = {
                "mean": self.angle_sum / count,
                "median": median,
                "within_11": share[0],
                "within_22": share[1],
                "within_30": share[2],
            }
        return _select(values, self.output)


def nyuv2_metrics(
    num_classes: int = 13,
    ignore_index: int = -1,
    reduction: Reduction = "pixel",
    tasks: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Metric]]:
    """The NYUv2 metric set as :class:`~lightning_aw.MultiTaskModule`'s ``metrics`` argument.

    One scalar metric per name, ``{"seg": {"miou", "pix_acc"}, "depth": {"abs_err", "rel_err"},
    "normal": {"mean", "median", "within_11", "within_22", "within_30"}}``: the names of
    :data:`~lightning_aw.metrics.NYUV2_HIGHER_IS_BETTER`, so the logged ``val/<task>/<name>``
    values feed :meth:`MultiTaskDelta.nyuv2 <lightning_aw.metrics.MultiTaskDelta.nyuv2>`
    directly. The metrics of one task share their state (torchmetrics' compute groups).

    Args:
        num_classes: segmentation classes.
        ignore_index: the segmentation target's ignore value.
        reduction: ``"pixel"`` or ``"batch"`` for depth and normals (see :class:`DepthMetric`).
        tasks: the model's names of the three tasks, default
            ``{"seg": "seg", "depth": "depth", "normal": "normal"}``.

    Example::

        >>> metrics = nyuv2_metrics()
        >>> {task: sorted(m) for task, m in metrics.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'seg': ['miou', 'pix_acc'], 'depth': ['abs_err', 'rel_err'],
         'normal': ['mean', 'median', 'within_11', 'within_22', 'within_30']}
    """
    names = {"seg": "seg", "depth": "depth", "normal": "normal", **(tasks or {})}
    unknown = sorted(set(names) - {"seg", "depth", "normal"})
    if unknown:
        raise ValueError(
            f"Parameter `tasks` maps 'seg', 'depth' and 'normal' to your task names; found "
            f"unknown key(s) {unknown}."
        )
    return {
        names["seg"]: {
            o: SegmentationMetric(num_classes, ignore_index, output=o)  # type: ignore[arg-type]
            for o in _SEG_OUTPUTS
        },
        names["depth"]: {
            o: DepthMetric(output=o, reduction=reduction)  # type: ignore[arg-type]
            for o in _DEPTH_OUTPUTS
        },
        names["normal"]: {
            o: NormalMetric(output=o, reduction=reduction)  # type: ignore[arg-type]
            for o in _NORMAL_OUTPUTS
        },
    }
