"""Loss-based weightings: weights from loss statistics alone, no per-task gradients.

Every function here is pure torch: no Lightning, no state, no host synchronisation. The callbacks in
:mod:`lightning_aw.weighting` collect the statistics and call these functions.

Library-wide convention: unnormalised methods use weight 1 per task, so equal weighting sums the
task losses (total ``T``). Methods that renormalise (DWA, GradNorm) keep ``sum(w) = T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "dwa",
    "equal",
    "gradnorm_weight_grad",
    "renormalize",
    "uncertainty_loss",
    "uncertainty_weights",
]


def _check_vector(name: str, x: Tensor, num_tasks: int | None = None) -> None:
    if not isinstance(x, Tensor) or x.ndim != 1 or x.numel() == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"Parameter `{name}` should be a non-empty 1-D tensor with one entry per task. "
            f"Found `{name}` = {shape}."
        )
    if num_tasks is not None and x.numel() != num_tasks:
        raise ValueError(
            f"Parameter `{name}` should have {num_tasks} entries (one per task). "
            f"Found `{name}.shape = {tuple(x.shape)}`."
        )


def equal(num_tasks: int, *, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """Equal weights: ``w_i = 1`` for every task (the plain sum of the task losses).

    Args:
        num_tasks: number of tasks ``T`` (at least 1).
        dtype: dtype of the result (default: torch's default float dtype).
        device: device of the result.

    Returns:
        A tensor of ``T`` ones; the weights sum to ``T``.

    Example::

        >>> equal(3)
        tensor([1., 1., 1.])
    """
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"Parameter `num_tasks` should be a positive int. Found {num_tasks!r}.")
    return torch.ones(num_tasks, dtype=dtype, device=device)


def renormalize(weights: Tensor, total: float, *, min_value: float = 1e-6) -> Tensor:
    """Clamp weights to at least ``min_value`` and rescale them so they sum to ``total``.

    Non-finite entries are replaced by ``min_value`` first, so the result is always finite.

    Example::

        >>> renormalize(torch.tensor([1.0, 3.0]), total=2.0)
        tensor([0.5000, 1.5000])
    """
    _check_vector("weights", weights)
    w = torch.nan_to_num(weights, nan=min_value, posinf=min_value, neginf=min_value)
    w = w.clamp_min(min_value)
    return w * (total / w.sum())


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


def dwa(previous: Tensor, before_previous: Tensor, temperature: float = 2.0) -> Tensor:
    r"""Dynamic Weight Average weights (Liu, Johns & Davison, CVPR 2019, arXiv:1803.10704, eq. 7).

    .. math::

        r_i = \frac{\bar L_i(e-1)}{\bar L_i(e-2)}, \qquad
        w_i = T\,\frac{\exp(r_i/\tau)}{\sum_j \exp(r_j/\tau)}

    Args:
        previous: per-task mean training loss of the last epoch, :math:`\bar L(e-1)`, ``[T]``.
        before_previous: the same for the epoch before, :math:`\bar L(e-2)`, ``[T]``; must be
            positive.
        temperature: :math:`\tau > 0`; larger values give more even weights. Default 2.

    Returns:
        Weights summing to ``T``.

    Raises:
        ValueError: on mismatched shapes, a non-positive temperature, or losses that are not
            positive and finite (never NaN weights).

    Example::

        >>> dwa(torch.tensor([0.5, 1.0, 1.2]), torch.ones(3))
        tensor([0.8101, 1.0402, 1.1496])
    """
    _check_vector("previous", previous)
    _check_vector("before_previous", before_previous, previous.numel())
    if not temperature > 0:
        raise ValueError(f"Parameter `temperature` should be > 0. Found {temperature!r}.")
    for name, x in (("previous", previous), ("before_previous", before_previous)):
        bad = ~(torch.isfinite(x) & (x > 0))
        if bool(bad.any()):  # one host synchronisation per call (DWA updates once per window)
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"Parameter `{name}` should hold positive, finite mean losses (DWA divides and "
                f"compares them). Found `{name}[{i}] = {float(x[i])}`."
            )
    ratio = previous / before_previous
    return previous.numel() * torch.softmax(ratio / temperature, dim=0)


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
