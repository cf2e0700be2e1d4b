"""More loss-based weightings: random, geometric, logarithmic, FAMO, SoftAdapt, smooth Tchebycheff.

Pure torch like :mod:`lightning_aw.functional._loss`: no Lightning, no state, no host
synchronisation. The callbacks in :mod:`lightning_aw.weighting` keep the state (generators, logits,
reference points, loss history) and call these functions.

Conventions shared by these functions:

- ``losses`` is a 1-D tensor with one entry per task; ``present`` is an optional boolean mask of the
  tasks that have a loss in this batch (absent tasks contribute nothing and get weight 0).
- The methods that take logarithms (:func:`gls_loss`, :func:`scale_invariant_loss`,
  :func:`famo_loss`, :func:`stch_loss` with ``logarithmic=True``) need positive values. A
  non-positive or non-finite (NaN, ``inf``) entry is treated like an absent task: it adds nothing
  and gets weight 0 and no gradient, so the result is never NaN or infinite. Checking
  ``(losses > 0).all()`` costs a host synchronisation, so it is left to the caller; the callbacks
  check once per window and raise an error naming the task.
- "Effective weights" are :math:`\\partial \\mathcal{L} / \\partial L_i`, the factor each task's
  gradient gets in the update; for methods that are a weighted sum they are the weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_aw.functional._loss import _check_vector

__all__ = [
    "famo_logit_grad",
    "famo_loss",
    "famo_weights",
    "gls_loss",
    "gls_weights",
    "imtl_l_loss",
    "rlw",
    "scale_invariant_loss",
    "scale_invariant_weights",
    "softadapt",
    "stch_loss",
    "stch_weights",
]

Distribution = Literal["normal", "uniform", "dirichlet"]
_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


# ---------------------------------------------------------------------------------- helpers
def _mask(losses: Tensor, present: Tensor | None) -> Tensor:
    if present is None:
        return torch.ones_like(losses, dtype=torch.bool)
    if not isinstance(present, Tensor) or present.shape != losses.shape:
        shape = tuple(present.shape) if isinstance(present, Tensor) else type(present).__name__
        raise ValueError(
            f"Parameter `present` should be a boolean tensor of shape {tuple(losses.shape)}. "
            f"Found {shape}."
        )
    return present.to(device=losses.device, dtype=torch.bool)


def _positive(values: Tensor) -> Tensor:
    """Entries that are positive and finite (``+inf`` would make a log, a product or a ratio
    infinite; NaN and non-positive entries have no logarithm)."""
    return (values > 0) & torch.isfinite(values)


def _check_positive_number(name: str, value: float) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 < value < float("inf"):
        raise ValueError(f"Parameter `{name}` should be a finite number > 0. Found {value!r}.")


def _safe_log(values: Tensor, valid: Tensor) -> Tensor:
    """``log(values)`` where ``valid``, 0 elsewhere, with a zero (not NaN) gradient elsewhere."""
    return torch.where(valid, torch.log(torch.where(valid, values, torch.ones_like(values))), 0.0)


def _masked_softmax(x: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the ``valid`` entries; 0 elsewhere; all zeros when nothing is valid."""
    top = torch.where(valid, x, float("-inf")).max().detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.where(valid, torch.exp(torch.where(valid, x, top) - top), 0.0)
    total = e.sum()  # >= 1 when anything is valid (the largest term is exp(0))
    return e / torch.where(total > 0, total, torch.ones_like(total))


def _masked_logsumexp(x: Tensor, valid: Tensor) -> Tensor:
    """``log sum_{valid} exp(x_i)``; 0 when nothing is valid (finite value and gradient)."""
    top = torch.where(valid, x, float("-inf")).max().detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.where(valid, torch.exp(torch.where(valid, x, top) - top), 0.0)
    total = e.sum()
    return torch.where(total > 0, top + torch.log(torch.where(total > 0, total, 1.0)), 0.0)


# ---------------------------------------------------------------------------------- RLW
def rlw(
    num_tasks: int,
    generator: torch.Generator | None = None,
    *,
    distribution: Distribution = "normal",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Random loss weights: one draw of RLW.

    Lin, Ye, Zhang, Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning", TMLR 2022, https://arxiv.org/abs/2111.10603.

    .. math::

        w = \operatorname{softmax}(\varepsilon), \qquad \varepsilon \sim \mathcal{N}(0, I_T)

    The weights are positive and **sum to 1** (the paper's convention, not ``T``: with a learning
    rate tuned for the plain sum, the update is about ``T`` times smaller).

    The draw is made on the generator's device (the CPU for ``generator=None``: torch's default
    generator) in float32, then moved to ``device``/``dtype``, so the same seeded generator gives
    the same weights on every machine and every DDP rank.

    Args:
        num_tasks: number of tasks ``T`` (at least 1).
        generator: the random generator (default: torch's global CPU generator).
        distribution: ``"normal"`` (default, the paper's main choice: softmax of standard normal
            draws), ``"uniform"`` (softmax of :math:`U(0, 1)` draws) or ``"dirichlet"`` (a flat
            Dirichlet draw, :math:`E_i/\sum_j E_j` with :math:`E_i \sim \operatorname{Exp}(1)`),
            three of the sampling distributions the paper compares.
        dtype: dtype of the result (default float32).
        device: device of the result (default: the generator's).

    Returns:
        Weights ``[T]`` summing to 1.

    Example::

        >>> w = rlw(3, torch.Generator().manual_seed(0))
        >>> eps = torch.randn(3, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(w, torch.softmax(eps, dim=0))
        True
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"Parameter `num_tasks` should be a positive int. Found {num_tasks!r}.")
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(
            f"Parameter `distribution` should be one of {list(_DISTRIBUTIONS)}. "
            f"Found {distribution!r}."
        )
    draw_device = generator.device if generator is not None else torch.device("cpu")
    kw = {"generator": generator, "dtype": torch.float32, "device": draw_device}
    if distribution == "normal":
        w = torch.softmax(torch.randn(num_tasks, **kw), dim=0)
    elif distribution == "uniform":
        w = torch.softmax(torch.rand(num_tasks, **kw), dim=0)
    else:
        e = torch.empty(num_tasks, dtype=torch.float32, device=draw_device)
        e = e.exponential_(1.0, generator=generator)
        w = e / e.sum()
    return w.to(device=device if device is not None else draw_device, dtype=dtype or w.dtype)


# ---------------------------------------------------------------------------------- GLS
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


# ---------------------------------------------------------------------------------- log losses
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


def imtl_l_loss(losses: Tensor, log_scales: Tensor, present: Tensor | None = None) -> Tensor:
    r"""The loss-balancing part of IMTL (IMTL-L) with learnable scales.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr.

    .. math::

        \mathcal{L} = \sum_i \bigl(e^{s_i} L_i - s_i\bigr)

    The effective weight of task ``i`` is :math:`e^{s_i}`. Minimising over :math:`s_i` gives
    :math:`e^{s_i} L_i = 1`, i.e. :math:`s_i = -\log L_i`: at the optimum every scaled loss is 1
    and the network's update equals that of :func:`scale_invariant_loss`. Needs positive losses
    (otherwise :math:`s_i` has no minimum).

    Args:
        losses: the task losses ``[T]``.
        log_scales: the learnable :math:`s_i`, ``[T]`` (init 0).
        present: optional boolean mask ``[T]``; absent tasks contribute nothing, while every
            :math:`s_i` stays in the autograd graph.

    Example::

        >>> imtl_l_loss(torch.tensor([2.0, 0.5]), torch.zeros(2))
        tensor(2.5000)
    """
    _check_vector("losses", losses)
    _check_vector("log_scales", log_scales, losses.numel())
    terms = torch.exp(log_scales) * losses - log_scales
    return torch.where(_mask(losses, present), terms, 0.0).sum()


# ---------------------------------------------------------------------------------- FAMO
def _famo_gaps(
    losses: Tensor, min_losses: Tensor | None, present: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    if min_losses is None:
        gaps = losses + eps
    else:
        _check_vector("min_losses", min_losses, losses.numel())
        gaps = losses - min_losses.to(losses) + eps
    valid = _mask(losses, present) & _positive(gaps)
    return gaps, valid


def famo_loss(
    losses: Tensor,
    logits: Tensor,
    min_losses: Tensor | None = None,
    present: Tensor | None = None,
    *,
    eps: float = 1e-8,
) -> Tensor:
    r"""FAMO's loss for one step: a weighted sum of log loss gaps.

    Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
    https://arxiv.org/abs/2306.03792, Alg. 2.

    With :math:`z = \operatorname{softmax}(\xi)` and the gaps
    :math:`D_i = L_i - L_i^{\min} + \epsilon`,

    .. math::

        \mathcal{L} = c \sum_i z_i \log D_i, \qquad
        c = \Bigl(\sum_i \frac{z_i}{D_i}\Bigr)^{-1} \text{ (held constant)},

    so the update is :math:`\sum_i w_i \nabla L_i` with effective weights
    :math:`w_i = c z_i / D_i` that **sum to 1** (:func:`famo_weights`). ``z`` is the softmax over
    the usable tasks (present, with :math:`D_i > 0`); the others contribute nothing.

    Args:
        losses: the task losses ``[T]``.
        logits: FAMO's logits :math:`\xi`, ``[T]`` (treated as constants here).
        min_losses: :math:`L^{\min}`, a lower bound of each loss, ``[T]`` (default 0). A loss at
            or below its bound gives :math:`D_i \le \epsilon`; below it the task counts as absent.
        present: optional boolean mask ``[T]`` of the tasks in the batch.
        eps: :math:`\epsilon` (default ``1e-8``, the paper's).

    Example::

        >>> famo_loss(torch.tensor([1.0, 1.0]), torch.zeros(2))
        tensor(0.)
    """
    _check_vector("losses", losses)
    _check_vector("logits", logits, losses.numel())
    gaps, valid = _famo_gaps(losses, min_losses, present, eps)
    z = _masked_softmax(logits.detach().to(losses.dtype), valid)
    safe = torch.where(valid, gaps, 1.0)
    inv = torch.where(valid, z / safe, 0.0).sum().detach()
    c = 1.0 / torch.where(inv > 0, inv, 1.0)
    return c * (z * _safe_log(gaps, valid)).sum()


def famo_weights(
    losses: Tensor,
    logits: Tensor,
    min_losses: Tensor | None = None,
    present: Tensor | None = None,
    *,
    eps: float = 1e-8,
) -> Tensor:
    r"""Effective weights of :func:`famo_loss`: :math:`c z_i / D_i`, summing to 1.

    Example::

        >>> famo_weights(torch.tensor([1.0, 3.0]), torch.zeros(2))
        tensor([0.7500, 0.2500])
    """
    _check_vector("losses", losses)
    _check_vector("logits", logits, losses.numel())
    gaps, valid = _famo_gaps(losses.detach(), min_losses, present, eps)
    z = _masked_softmax(logits.detach().to(losses.dtype), valid)
    ratio = torch.where(valid, z / torch.where(valid, gaps, 1.0), 0.0)
    total = ratio.sum()
    return ratio / torch.where(total > 0, total, 1.0)


def famo_logit_grad(
    logits: Tensor,
    losses_before: Tensor,
    losses_after: Tensor,
    min_losses: Tensor | None = None,
    present: Tensor | None = None,
    *,
    eps: float = 1e-8,
) -> Tensor:
    r"""The gradient FAMO descends on its logits after a model step (Alg. 2, arXiv:2306.03792).

    .. math::

        \delta = J_{\operatorname{softmax}}(\xi)^\top
        \bigl[\log D(t) - \log D(t+1)\bigr]
        = z \odot \bigl(\Delta - z^\top \Delta\bigr), \qquad
        \Delta_i = \log D_i(t) - \log D_i(t+1),

    with :math:`D(t)` and :math:`D(t+1)` the loss gaps on the *same* batch before and after the
    optimizer step. The logits then take a step :math:`\xi \leftarrow \xi - \beta(\delta +
    \gamma\xi)` (Adam in the paper): a task whose loss fell more than average loses weight.
    Tasks not usable before and after (absent, or :math:`D \le 0`, or not finite) are left out of
    the softmax and get :math:`\delta_i = 0`.

    Args:
        logits: :math:`\xi`, ``[T]``.
        losses_before: the task losses at :math:`\theta_t` (those the step was taken on), ``[T]``.
        losses_after: the task losses at :math:`\theta_{t+1}` on the same batch, ``[T]``.
        min_losses: :math:`L^{\min}` ``[T]`` (default 0).
        present: optional boolean mask ``[T]``.
        eps: :math:`\epsilon` of the gaps (default ``1e-8``).

    Returns:
        :math:`\delta`, ``[T]``; its entries sum to 0.

    Example::

        >>> famo_logit_grad(torch.zeros(2), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0]))
        tensor([ 0.1733, -0.1733])
    """
    _check_vector("logits", logits)
    _check_vector("losses_before", losses_before, logits.numel())
    _check_vector("losses_after", losses_after, logits.numel())
    before, valid_before = _famo_gaps(losses_before, min_losses, present, eps)
    after, valid_after = _famo_gaps(losses_after, min_losses, present, eps)
    valid = valid_before & valid_after
    delta = _safe_log(before, valid) - _safe_log(after, valid)
    z = _masked_softmax(logits.to(delta.dtype), valid)
    return z * (delta - (z * delta).sum())


# ---------------------------------------------------------------------------------- SoftAdapt
def softadapt(
    slopes: Tensor,
    beta: float = 0.1,
    *,
    normalize: bool = False,
    loss_values: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    r"""SoftAdapt weights from the recent slopes of the task losses.

    Heydari, Thompson, Mehmood, "SoftAdapt: Techniques for Adaptive Loss Weighting of Neural
    Networks with Multi-Part Loss Functions", 2019, https://arxiv.org/abs/1912.12355, Sec. 3.1.

    With the slopes :math:`s_i = L_i(k) - L_i(k-1)` (finite differences of recent loss values):

    .. math::

        \alpha_i = \frac{f_i\, e^{\beta s_i}}{\sum_j f_j\, e^{\beta s_j}}

    with :math:`f_i = 1` (original variant) or :math:`f_i` the recent loss value (loss-weighted
    variant, ``loss_values``). The normalised-slopes variant uses
    :math:`s_i / (\sum_j |s_j| + \epsilon)` instead of :math:`s_i`, which makes :math:`\beta`
    independent of the losses' scale. Both variants combine. The weights **sum to 1**. With
    :math:`\beta > 0` a task whose loss falls slowly (or rises) gets more weight; :math:`\beta <
    0` favours the tasks that improve fastest.

    Args:
        slopes: :math:`s`, ``[T]``.
        beta: :math:`\beta` (default 0.1, the paper's).
        normalize: use normalised slopes.
        loss_values: :math:`f` for the loss-weighted variant, ``[T]``, positive.
        eps: :math:`\epsilon` of the normalisation.

    Example::

        >>> softadapt(torch.tensor([0.0, 0.0]))
        tensor([0.5000, 0.5000])
    """
    _check_vector("slopes", slopes)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta != beta:
        raise ValueError(f"Parameter `beta` should be a finite number. Found {beta!r}.")
    s = slopes
    if normalize:
        s = s / (s.abs().sum() + eps)
    x = beta * s
    e = torch.exp(x - x.max())
    if loss_values is not None:
        _check_vector("loss_values", loss_values, slopes.numel())
        e = loss_values.to(e) * e
    return e / e.sum()


# ---------------------------------------------------------------------------------- STCH
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
