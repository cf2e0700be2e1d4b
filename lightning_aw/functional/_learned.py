"""Weights learned alongside the network: uncertainty, GradNorm, IMTL-L and FAMO.

Each method has parameters of its own (log-variances, weights, log-scales, logits) that the
callback keeps and updates: through the total loss (:func:`uncertainty_loss`,
:func:`imtl_l_loss`), or by a closed-form gradient (:func:`gradnorm_weight_grad`,
:func:`famo_logit_grad`). Conventions in :mod:`._vectors`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_aw.functional._vectors import (
    _check_vector,
    _mask,
    _masked_softmax,
    _positive,
    _safe_log,
)

__all__ = [
    "auto_lambda_grad",
    "famo_logit_grad",
    "famo_loss",
    "famo_weights",
    "gradnorm_weight_grad",
    "imtl_l_loss",
    "uncertainty_loss",
    "uncertainty_weights",
]


# --------------------------------------------------------------------------------------------
# Uncertainty weighting
# --------------------------------------------------------------------------------------------


def uncertainty_weights(log_vars: Tensor, classification: Sequence[bool] | None = None) -> Tensor:
    r"""Effective loss weights of homoscedastic uncertainty weighting.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018, https://arxiv.org/abs/1705.07115.

    With :math:`s_i = \log \sigma_i^2`, the regression form weights a task by
    :math:`\tfrac12 e^{-s_i}` and the classification form by :math:`e^{-s_i}`.

    Args:
        log_vars: the learned :math:`s_i`, shape ``[T]``.
        classification: per task, ``True`` for the classification form; default all regression.

    Returns:
        The weights, shape ``[T]``, same dtype and device as ``log_vars``.

    Example::

        >>> uncertainty_weights(torch.zeros(2), classification=[False, True])
        tensor([0.5000, 1.0000])
    """
    _check_vector("log_vars", log_vars)
    return _uncertainty_coef(log_vars, classification) * torch.exp(-log_vars)


def _uncertainty_coef(log_vars: Tensor, classification: Sequence[bool] | None) -> Tensor:
    if classification is None:
        return torch.full_like(log_vars, 0.5)
    if len(classification) != log_vars.numel():
        raise ValueError(
            f"Parameter `classification` should have one flag per task ({log_vars.numel()}). "
            f"Found {len(classification)} flags."
        )
    coef = [1.0 if c else 0.5 for c in classification]
    return torch.tensor(coef, dtype=log_vars.dtype, device=log_vars.device)


def uncertainty_loss(
    losses: Tensor,
    log_vars: Tensor,
    classification: Sequence[bool] | None = None,
    present: Tensor | None = None,
) -> Tensor:
    r"""Total loss of uncertainty weighting (Kendall et al., CVPR 2018, arXiv:1705.07115).

    .. math::

        \mathcal{L} = \sum_i c_i e^{-s_i} L_i + \tfrac12 s_i,
        \qquad c_i = \tfrac12 \text{ (regression)},\ 1 \text{ (classification)}

    At the optimum of the regression form :math:`e^{s_i} = L_i`: for a well-specified Gaussian
    regression, :math:`\sigma_i^2` converges to the noise variance.

    Args:
        losses: the task losses, shape ``[T]``.
        log_vars: the learned :math:`s_i = \log\sigma_i^2`, shape ``[T]``.
        classification: per task, ``True`` for the classification form; default all regression.
        present: optional boolean mask ``[T]``; absent tasks contribute nothing (neither their
            loss nor their regulariser), while keeping every ``s_i`` in the autograd graph.

    Example::

        >>> uncertainty_loss(torch.tensor([2.0, 4.0]), torch.zeros(2))
        tensor(3.)
    """
    _check_vector("losses", losses)
    _check_vector("log_vars", log_vars, losses.numel())
    terms = _uncertainty_coef(log_vars, classification) * torch.exp(-log_vars) * losses
    terms = terms + 0.5 * log_vars
    if present is not None:
        terms = terms * present.to(terms.dtype)
    return terms.sum()


# --------------------------------------------------------------------------------------------
# GradNorm
# --------------------------------------------------------------------------------------------


def gradnorm_weight_grad(
    weights: Tensor,
    grad_norms: Tensor,
    loss_ratios: Tensor,
    alpha: float,
    present: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Gradient of GradNorm's loss with respect to the task weights, in closed form.

    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018, https://arxiv.org/abs/1711.02257, Alg. 1.

    With :math:`n_i = \lVert\nabla_W L_i\rVert` on the chosen shared layer :math:`W`,
    :math:`G_i = w_i n_i`, :math:`\bar G = \operatorname{mean}_i G_i`, the relative inverse training
    rate :math:`r_i = \tilde L_i / \operatorname{mean}_j \tilde L_j` with
    :math:`\tilde L_i = L_i(t)/L_i(0)`, and the target :math:`\bar G r_i^\alpha` held constant:

    .. math::

        L_\text{grad} = \sum_i \lvert G_i - \bar G r_i^\alpha \rvert, \qquad
        \frac{\partial L_\text{grad}}{\partial w_i} = \operatorname{sign}(G_i - \bar G r_i^\alpha)\,
        n_i

    No double backward is needed and nothing flows into the network.

    Args:
        weights: current weights :math:`w`, ``[T]``.
        grad_norms: :math:`n_i`, norms of the *unweighted* task gradients on :math:`W`, ``[T]``.
        loss_ratios: :math:`\tilde L_i = L_i(t)/L_i(0)`, ``[T]``.
        alpha: the asymmetry :math:`\alpha \ge 0` (1.5 on NYUv2, 0.12 on the paper's toy).
        present: optional boolean mask ``[T]``; absent tasks are left out of the means and get a
            zero gradient.

    Returns:
        ``(grad, loss)``: :math:`\partial L_\text{grad}/\partial w` (``[T]``) and
        :math:`L_\text{grad}` (a scalar, for logging).

    Example::

        >>> norms = torch.tensor([1.0, 3.0])
        >>> g, loss = gradnorm_weight_grad(torch.ones(2), norms, torch.ones(2), alpha=1.5)
        >>> g
        tensor([-1.,  3.])
    """
    _check_vector("weights", weights)
    num_tasks = weights.numel()
    _check_vector("grad_norms", grad_norms, num_tasks)
    _check_vector("loss_ratios", loss_ratios, num_tasks)
    if not alpha >= 0:
        raise ValueError(f"Parameter `alpha` should be >= 0. Found {alpha!r}.")
    mask = torch.ones_like(weights) if present is None else present.to(dtype=weights.dtype)
    count = mask.sum().clamp_min(1.0)
    g = weights * grad_norms * mask
    g_mean = g.sum() / count
    ratios = loss_ratios * mask
    rel = ratios / (ratios.sum() / count).clamp_min(torch.finfo(weights.dtype).tiny)
    target = (g_mean * rel.clamp_min(0.0) ** alpha).detach()
    diff = (g - target) * mask
    return torch.sign(diff) * grad_norms * mask, diff.abs().sum()


# --------------------------------------------------------------------------------------------
# IMTL-L
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# FAMO
# --------------------------------------------------------------------------------------------


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


def auto_lambda_grad(train_grads: Tensor, val_grad: Tensor, lr: float | Tensor = 1.0) -> Tensor:
    r"""Auto-Lambda's hypergradient of the task weights (Liu, James, Davison & Johns, TMLR 2022,
    https://arxiv.org/abs/2202.03091).

    After the virtual step :math:`\theta' = \theta - \alpha\,(\sum_i \lambda_i g_i + \dots)` on
    the weighted training loss (:math:`g_i = \nabla_\theta L_i^{\text{train}}`; momentum and
    weight decay do not depend on :math:`\lambda`), the gradient of the validation loss at
    :math:`\theta'` with respect to the weights is, exactly,

    .. math::

        \frac{\partial L^{\text{val}}(\theta')}{\partial\lambda_i}
        = -\alpha\,\bigl\langle g_i,\ \nabla_{\theta'} L^{\text{val}}(\theta')\bigr\rangle,

    the mixed second derivative :math:`\nabla^2_{\lambda,\theta} L^{\text{train}} = G` being
    the per-task gradients themselves (the authors' code approximates this inner product by a
    central finite difference of the training losses along :math:`\nabla L^{\text{val}}`).

    Args:
        train_grads: per-task training gradients ``[T, P]`` at :math:`\theta` (zero rows for
            tasks absent from the batch).
        val_grad: the validation loss's gradient ``[P]`` at :math:`\theta'`.
        lr: the virtual step size :math:`\alpha`: a number, or one per coordinate ``[P]``.

    Returns:
        The hypergradient ``[T]`` (an optimizer step on the weights descends it).

    Example::

        >>> import torch
        >>> from lightning_aw.functional import auto_lambda_grad
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> auto_lambda_grad(G, torch.tensor([0.5, -1.0]), lr=0.1)  # task 1 helps: its weight grows
        tensor([-0.0500,  0.2000])
    """
    if train_grads.dim() != 2:
        raise ValueError(
            "Parameter `train_grads` should be a [T, P] matrix. "
            f"Found `train_grads.shape = {tuple(train_grads.shape)}`."
        )
    if val_grad.shape != (train_grads.shape[1],):
        raise ValueError(
            f"Parameter `val_grad` should have shape [{train_grads.shape[1]}]. "
            f"Found `val_grad.shape = {tuple(val_grad.shape)}`."
        )
    return -(train_grads * lr) @ val_grad
