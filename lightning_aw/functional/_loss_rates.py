"""Weights from how fast each loss changes: DWA (ratio of epoch means), SoftAdapt (slopes) and
ReLoBRaLo (ratios to the last and the first window, with a random lookback).

The callbacks keep the loss history (epoch or step windows) and pass its statistics here.
Conventions in :mod:`._vectors`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_aw.functional._vectors import _check_vector

__all__ = ["dwa", "relobralo", "softadapt"]


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


def _balance(losses: Tensor, reference: Tensor, temperature: float) -> Tensor:
    return losses.numel() * torch.softmax(losses / (temperature * reference), dim=0)


def relobralo(
    losses: Tensor,
    previous_losses: Tensor,
    initial_losses: Tensor,
    previous_weights: Tensor,
    rho: float | Tensor,
    alpha: float = 0.999,
    temperature: float = 0.1,
) -> Tensor:
    r"""ReLoBRaLo weights: relative loss balancing with random lookback.

    Bischof & Kraus, "Multi-Objective Loss Balancing for Physics-Informed Deep Learning", 2021,
    https://arxiv.org/abs/2110.09813, Sec. 3 (the balancing, history and update equations).

    .. math::

        \lambda^{bal}_i(t, t') = T\,\operatorname{softmax}_i\Bigl(
            \frac{L_i(t)}{\tau\, L_i(t')}\Bigr), \qquad
        \lambda^{hist}_i(t) = \rho\,\lambda_i(t-1) + (1-\rho)\,\lambda^{bal}_i(t, 0),

        \lambda_i(t) = \alpha\,\lambda^{hist}_i(t) + (1-\alpha)\,\lambda^{bal}_i(t, t-1)

    with :math:`\rho \sim \operatorname{Bernoulli}(\mathbb{E}[\rho])` the random lookback
    ("saudade"): with :math:`\rho = 0` the history restarts from the balance against the first
    losses :math:`L(0)`. The draw is an input here (pure function); the callback draws it from
    its seeded generator. If ``previous_weights`` sum to ``T``, so do the weights.

    Args:
        losses: :math:`L(t)`, ``[T]``, positive.
        previous_losses: :math:`L(t-1)`, ``[T]``, positive.
        initial_losses: :math:`L(0)`, ``[T]``, positive.
        previous_weights: :math:`\lambda(t-1)`, ``[T]``.
        rho: the Bernoulli draw :math:`\rho` (``0`` or ``1``; any value in ``[0, 1]`` mixes).
        alpha: :math:`\alpha \in [0, 1]`, the weight of the history (default 0.999).
        temperature: :math:`\tau > 0` (default 0.1); large values give equal weights.

    Returns:
        :math:`\lambda(t)`, ``[T]``.

    Raises:
        ValueError: on mismatched shapes, ``alpha`` or ``rho`` outside ``[0, 1]``, a
            non-positive temperature, or losses that are not positive and finite.

    Example::

        >>> relobralo(torch.tensor([0.5, 1.0]), torch.ones(2), torch.ones(2), torch.ones(2),
        ...           rho=1.0, alpha=0.0, temperature=1.0)
        tensor([0.7551, 1.2449])
    """
    _check_vector("losses", losses)
    for name, x in (
        ("previous_losses", previous_losses),
        ("initial_losses", initial_losses),
        ("previous_weights", previous_weights),
    ):
        _check_vector(name, x, losses.numel())
    for name, value in (("alpha", alpha), ("rho", rho)):
        v = float(value)
        if isinstance(value, bool) or not 0.0 <= v <= 1.0:
            raise ValueError(f"Parameter `{name}` should be in [0, 1]. Found {value!r}.")
    if isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"Parameter `temperature` should be > 0. Found {temperature!r}.")
    for name, x in (
        ("losses", losses),
        ("previous_losses", previous_losses),
        ("initial_losses", initial_losses),
    ):
        bad = ~(torch.isfinite(x) & (x > 0))
        if bool(bad.any()):  # one host synchronisation per call (once per update window)
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"Parameter `{name}` should hold positive, finite losses (ReLoBRaLo divides "
                f"them). Found `{name}[{i}] = {float(x[i])}`."
            )
    if not bool(torch.isfinite(previous_weights).all()):
        raise ValueError("Parameter `previous_weights` should be finite.")
    return _relobralo(
        losses, previous_losses, initial_losses, previous_weights, rho, alpha, temperature
    )


def _relobralo(
    losses: Tensor,
    previous_losses: Tensor,
    initial_losses: Tensor,
    previous_weights: Tensor,
    rho: float | Tensor,
    alpha: float,
    temperature: float,
) -> Tensor:
    """:func:`relobralo` without the checks (no host synchronisation), for the callback, whose
    losses the module has checked positive at every step."""
    hist = rho * previous_weights + (1 - rho) * _balance(losses, initial_losses, temperature)
    return alpha * hist + (1 - alpha) * _balance(losses, previous_losses, temperature)
