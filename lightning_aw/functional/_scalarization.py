"""Scalarisations other than a weighted sum: geometric mean (GLS), log loss and smooth
Tchebycheff (STCH).

Each ``*_loss`` is the total loss to backpropagate; its ``*_weights`` twin gives the effective
weights :math:`\\partial \\mathcal{L} / \\partial L_i` (for logging). Conventions in
:mod:`._vectors`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_aw.functional._vectors import (
    _check_positive_number,
    _check_vector,
    _mask,
    _masked_logsumexp,
    _masked_softmax,
    _positive,
    _safe_log,
)

__all__ = [
    "gls_loss",
    "gls_weights",
    "scale_invariant_loss",
    "scale_invariant_weights",
    "stch_loss",
    "stch_weights",
]


# --------------------------------------------------------------------------------------------
# GLS
# --------------------------------------------------------------------------------------------


def gls_loss(losses: Tensor, present: Tensor | None = None) -> Tensor:
    r"""Geometric loss strategy: the geometric mean of the task losses.

    Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019,
    https://arxiv.org/abs/1904.08492.

    .. math::

        \mathcal{L}_\text{GLS} = \Bigl(\prod_{i=1}^{T} L_i\Bigr)^{1/T}
        = \exp\Bigl(\frac1T \sum_i \log L_i\Bigr),

    computed in the log domain for stability (no overflow or underflow of the product). ``T``
    counts the tasks present. The effective weight of task ``i`` is
    :math:`\mathcal{L}_\text{GLS}/(T L_i)` (:func:`gls_weights`): tasks with small losses get
    large weights, and rescaling one loss by a constant rescales the total but not the direction.

    Args:
        losses: the task losses ``[T]``; must be positive (a non-positive entry counts as absent).
        present: optional boolean mask ``[T]`` of the tasks in the batch.

    Returns:
        The scalar loss (0 when no task is usable).

    Example::

        >>> gls_loss(torch.tensor([1.0, 4.0]))
        tensor(2.)
    """
    _check_vector("losses", losses)
    valid = _mask(losses, present) & _positive(losses)
    count = valid.sum()
    mean_log = _safe_log(losses, valid).sum() / count.clamp_min(1)
    return torch.where(count > 0, torch.exp(mean_log), 0.0)


def gls_weights(losses: Tensor, present: Tensor | None = None) -> Tensor:
    r"""Effective weights of :func:`gls_loss`: :math:`\mathcal{L}_\text{GLS} / (T L_i)`.

    They are not normalised (their sum is :math:`\mathcal{L}_\text{GLS}\,\operatorname{mean}_i
    1/L_i`, which is 1 when all losses are equal). Absent or non-positive tasks get 0.

    Example::

        >>> gls_weights(torch.tensor([1.0, 4.0]))
        tensor([1.0000, 0.2500])
    """
    _check_vector("losses", losses)
    valid = _mask(losses, present) & _positive(losses)
    count = valid.sum().clamp_min(1)
    safe = torch.where(valid, losses, 1.0)
    return torch.where(valid, gls_loss(losses, present) / (count * safe), 0.0)


# --------------------------------------------------------------------------------------------
# Log loss
# --------------------------------------------------------------------------------------------


def scale_invariant_loss(losses: Tensor, present: Tensor | None = None) -> Tensor:
    r"""The scale-invariant (logarithmic) loss :math:`\sum_i \log L_i`.

    Multiplying a task's loss by a constant adds a constant to the total, so the update does not
    depend on the tasks' scales: the effective weight is :math:`1/L_i`
    (:func:`scale_invariant_weights`). It is the optimum of IMTL-L (:func:`imtl_l_loss`) and the
    limit of GLS's direction.

    Args:
        losses: the task losses ``[T]``; must be positive (a non-positive entry counts as absent).
        present: optional boolean mask ``[T]`` of the tasks in the batch.

    Example::

        >>> scale_invariant_loss(torch.tensor([1.0, 1.0]))
        tensor(0.)
    """
    _check_vector("losses", losses)
    valid = _mask(losses, present) & _positive(losses)
    return _safe_log(losses, valid).sum()


def scale_invariant_weights(losses: Tensor, present: Tensor | None = None) -> Tensor:
    r"""Effective weights of :func:`scale_invariant_loss`: :math:`1/L_i` (0 where unusable).

    Example::

        >>> scale_invariant_weights(torch.tensor([2.0, 0.5]))
        tensor([0.5000, 2.0000])
    """
    _check_vector("losses", losses)
    valid = _mask(losses, present) & _positive(losses)
    return torch.where(valid, 1.0 / torch.where(valid, losses, 1.0), 0.0)


# --------------------------------------------------------------------------------------------
# STCH
# --------------------------------------------------------------------------------------------


def _stch_terms(
    losses: Tensor, reference: Tensor, mu: float, logarithmic: bool, present: Tensor | None
) -> tuple[Tensor, Tensor]:
    _check_vector("losses", losses)
    _check_vector("reference", reference, losses.numel())
    _check_positive_number("mu", mu)
    reference = reference.to(losses)
    valid = _mask(losses, present) & torch.isfinite(losses)
    if logarithmic:
        valid = valid & (losses > 0) & (reference > 0)
        f = _safe_log(losses, valid) - _safe_log(reference, valid)
    else:
        f = torch.where(valid, losses - reference, 0.0)
    return f / mu, valid


def stch_loss(
    losses: Tensor,
    reference: Tensor,
    mu: float = 1.0,
    *,
    logarithmic: bool = True,
    present: Tensor | None = None,
) -> Tensor:
    r"""Smooth Tchebycheff scalarisation of the task losses.

    Lin, Zhang, Yang, Liu, Wang, Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024, https://arxiv.org/abs/2402.19078.

    .. math::

        \mathcal{L} = T \mu \log \sum_{i=1}^{T} \exp\bigl(f_i / \mu\bigr), \qquad
        f_i = \log L_i - \log z_i \ (\texttt{logarithmic=True}) \quad\text{or}\quad L_i - z_i,

    a smooth version of :math:`T \max_i f_i` (the Tchebycheff scalarisation with equal
    preferences), :math:`0 \le \mathcal{L} - T\max_i f_i \le T\mu\log T`. ``z`` is the reference
    point: in the official multi-task code, the mean losses of a warm-up epoch (a nadir-like point)
    with ``logarithmic=True``, so that :math:`f_i = \log(L_i/z_i)` compares relative progress.
    The factor ``T`` (tasks present) follows that code: the gradients with respect to :math:`f`
    sum to ``T``, as for :math:`\sum_i f_i`. The effective weight of task ``i`` is
    :math:`T\operatorname{softmax}(f/\mu)_i`, divided by :math:`L_i` with ``logarithmic=True``
    (:func:`stch_weights`). Small :math:`\mu` focuses on the worst task; large :math:`\mu` tends to
    the plain sum of the :math:`f_i`.

    Args:
        losses: the task losses ``[T]`` (positive with ``logarithmic=True``; other entries
            count as absent).
        reference: the reference point :math:`z`, ``[T]`` (positive with ``logarithmic=True``).
        mu: the smoothing :math:`\mu > 0` (default 1, the official code's).
        logarithmic: compare log losses (default, the official multi-task code) or raw losses.
        present: optional boolean mask ``[T]``.

    Example::

        >>> stch_loss(torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0]))
        tensor(1.3863)
    """
    x, valid = _stch_terms(losses, reference, mu, logarithmic, present)
    return valid.sum() * mu * _masked_logsumexp(x, valid)


def stch_weights(
    losses: Tensor,
    reference: Tensor,
    mu: float = 1.0,
    *,
    logarithmic: bool = True,
    present: Tensor | None = None,
) -> Tensor:
    r"""Effective weights :math:`\partial\mathcal{L}/\partial L_i` of :func:`stch_loss`.

    :math:`T \operatorname{softmax}(f/\mu)_i`, divided by :math:`L_i` with ``logarithmic=True``;
    0 for unusable tasks.

    Example::

        >>> stch_weights(torch.tensor([1.0, 1.0]), torch.ones(2))
        tensor([1., 1.])
    """
    x, valid = _stch_terms(losses.detach(), reference, mu, logarithmic, present)
    w = valid.sum() * _masked_softmax(x, valid)
    if logarithmic:
        w = torch.where(valid, w / torch.where(valid, losses.detach(), 1.0), 0.0)
    return w
