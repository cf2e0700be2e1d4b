r"""Weights that adapt from running statistics of the per-task gradients.

ExcessMTL (exponentiated-gradient weights on estimated excess risks), MoCo (tracked gradients
and a projected-gradient step on the simplex) and the learning-rate annealing of physics-informed
networks (gradient-magnitude ratios against a reference task). Each function is one update of
the method's state; the callbacks keep that state, gather the gradients and reduce them over
micro-batches and DDP ranks. ``grads`` are ``[T, P]`` per-task gradients (one row per task, as
in :mod:`._gram`); ``present`` masks tasks absent from the update (their rows are ignored and
their state is kept).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_aw.functional._gram import _check_grads, _shape_of
from lightning_aw.functional._vectors import _check_vector

__all__ = ["excess_mtl", "lr_annealing", "moco", "project_simplex"]

Statistic = Literal["max", "mean"]


def _check_rate(name: str, value: float, *, low: float = 0.0, high: float | None = 1.0) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value >= low and (high is None or value <= high)
    if not ok:
        where = f"in [{low}, {high}]" if high is not None else f">= {low} and finite"
        raise ValueError(f"Parameter `{name}` should be {where}. Found {value!r}.")


def _check_matrix(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor) or tuple(x.shape) != shape:
        raise ValueError(
            f"Parameter `{name}` should be a tensor of shape {list(shape)}. "
            f"Found `{name}.shape = {_shape_of(x)}`."
        )


def _present(present: Tensor | None, num_tasks: int, device: torch.device) -> Tensor:
    if present is None:
        return torch.ones(num_tasks, dtype=torch.bool, device=device)
    if not isinstance(present, Tensor) or present.shape != (num_tasks,):
        raise ValueError(
            f"Parameter `present` should be a boolean [T] = [{num_tasks}] mask. "
            f"Found `present.shape = {_shape_of(present)}`."
        )
    return present.to(device=device, dtype=torch.bool)


def _check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"Parameter `{name}` should contain only finite values. Found NaN or infinite "
            "entries: check the task losses (a NaN loss gives NaN gradients) or skip this step."
        )


# --------------------------------------------------------------------------------------------
# ExcessMTL
# --------------------------------------------------------------------------------------------


def _excess_mtl(
    weights: Tensor,
    grads: Tensor,
    accumulator: Tensor,
    initial: Tensor,
    present: Tensor,
    step_size: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    rows = present[:, None]
    sq = grads * grads
    accumulator = torch.where(rows, accumulator + sq, accumulator)
    risk = (sq / torch.sqrt(accumulator + eps)).sum(1)
    first = present & (initial <= 0) & (risk > 0)
    ratio = torch.where(present & (initial > 0), risk / torch.where(initial > 0, initial, 1.0), 0.0)
    initial = torch.where(first, risk, initial)
    logits = torch.log(weights) + step_size * ratio
    weights = weights.numel() * torch.softmax(logits, dim=0)
    return weights, accumulator, initial


def excess_mtl(
    weights: Tensor,
    grads: Tensor,
    accumulator: Tensor,
    initial: Tensor,
    step_size: float = 1e-2,
    present: Tensor | None = None,
    eps: float = 1e-7,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One ExcessMTL update: exponentiated-gradient weights on the estimated excess risks.

    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess
    Risks", ICML 2024, https://openreview.net/forum?id=JzWFmMySpn, Algorithm 1.

    The excess risk of task :math:`i` (its loss minus the Bayes risk, unknown) is estimated by
    the second-order expansion :math:`\tfrac12 g_i^\top H_i^{-1} g_i`, with the Hessian's
    diagonal estimated AdaGrad-style by the root of the accumulated squared gradients; the
    weights follow an exponentiated-gradient (mirror ascent) step on the estimates, each
    normalised by the task's first estimate:

    .. math::

        A_i \leftarrow A_i + g_i \odot g_i, \qquad
        e_i = \sum_p \frac{g_{ip}^2}{\sqrt{A_{ip} + \epsilon}}, \qquad
        \lambda_i \leftarrow \frac{T\,\lambda_i\,e^{\eta\, e_i / e_i^{(0)}}}
            {\sum_j \lambda_j\,e^{\eta\, e_j / e_j^{(0)}}} .

    Conventions: the factor :math:`\tfrac12` cancels in the normalisation by
    :math:`e_i^{(0)}`, the task's first positive estimate; the update that sets
    :math:`e_i^{(0)}` (and every update before it, e.g. while the task's gradient is 0) leaves
    that task's exponent at 0. The weights **sum to T** (the input's total, from
    :math:`\lambda = \mathbf 1`); the step is taken in log space (a softmax of
    :math:`\log\lambda + \eta e/e^{(0)}`), so large exponents cannot overflow. Absent tasks
    (``present`` False) keep their accumulator row and take exponent 0. :math:`\epsilon`
    (``1e-7``, as the authors' code) is added under the root, in the gradients' squared units.

    Args:
        weights: :math:`\lambda`, ``[T]``, positive, summing to ``T``.
        grads: ``[T, P]`` per-task gradients of this update.
        accumulator: :math:`A`, ``[T, P]``, the squared gradients accumulated so far (zeros at
            the start).
        initial: :math:`e^{(0)}`, ``[T]`` (zeros: not seen yet).
        step_size: :math:`\eta \ge 0` (0.01).
        present: ``[T]`` mask of the tasks in this update (default: all).
        eps: :math:`\epsilon > 0`.

    Returns:
        ``(weights, accumulator, initial)`` after the update.

    Raises:
        ValueError: on mismatched shapes, non-finite inputs or a negative step size.

    Example::

        >>> w, acc, e0 = excess_mtl(torch.ones(2), torch.tensor([[1.0], [2.0]]),
        ...                         torch.zeros(2, 1), torch.zeros(2))
        >>> w, e0  # the first update only records each task's first estimate
        (tensor([1., 1.]), tensor([1., 2.]))
        >>> w, acc, e0 = excess_mtl(w, torch.tensor([[1.0], [0.0]]), acc, e0, step_size=1.0)
        >>> w  # task 0 kept a larger excess risk relative to its start: its weight grows
        tensor([1.3395, 0.6605])
    """
    _check_grads(grads)
    num, size = grads.shape
    _check_vector("weights", weights, num)
    _check_vector("initial", initial, num)
    _check_matrix("accumulator", accumulator, (num, size))
    _check_rate("step_size", step_size, high=None)
    _check_rate("eps", eps, high=None)
    if not eps > 0:
        raise ValueError(f"Parameter `eps` should be > 0. Found {eps!r}.")
    for name, x in (("weights", weights), ("grads", grads), ("accumulator", accumulator)):
        _check_finite(name, x)
    if bool((weights < 0).any()):
        raise ValueError(f"Parameter `weights` should be non-negative. Found {weights.tolist()}.")
    mask = _present(present, num, grads.device)
    return _excess_mtl(weights, grads, accumulator, initial, mask, float(step_size), float(eps))


# --------------------------------------------------------------------------------------------
# MoCo
# --------------------------------------------------------------------------------------------


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` [T] onto the probability simplex (no host sync)."""
    v = v - v.max()  # translation-invariant; keeps the threshold exact for huge entries
    u, _ = torch.sort(v, descending=True)
    css = u.cumsum(0) - 1.0
    k = torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype)
    count = (u - css / k > 0).sum().clamp_min(1)  # the condition holds on a prefix
    theta = css.gather(0, (count - 1).reshape(1)) / count.to(v.dtype)
    return (v - theta).clamp_min(0.0)


def project_simplex(v: Tensor) -> Tensor:
    r"""The Euclidean projection of ``v`` onto the probability simplex,
    :math:`\operatorname{argmin}_{x \ge 0,\ \sum x = 1} \lVert x - v\rVert`.

    The sort-based algorithm (Held, Wolfe & Crowder 1974; Duchi, Shalev-Shwartz, Singer &
    Chandra, ICML 2008): :math:`x = \max(v - \theta, 0)` with the threshold :math:`\theta`
    found from the sorted entries, without a host synchronisation.

    Args:
        v: ``[T]`` finite floating-point vector.

    Returns:
        ``[T]``, non-negative, summing to 1.

    Example::

        >>> project_simplex(torch.tensor([0.6, 0.6, -0.2]))
        tensor([0.5000, 0.5000, 0.0000])
    """
    _check_vector("v", v)
    _check_finite("v", v)
    return _project_simplex(v)


def _moco(
    tracked: Tensor,
    weights: Tensor,
    grads: Tensor,
    present: Tensor,
    beta: float,
    gamma: float,
    rho: float,
) -> tuple[Tensor, Tensor]:
    tracked = torch.where(present[:, None], tracked - beta * (tracked - grads), tracked)
    y = tracked.double()
    gram = y @ y.T
    lam = weights.double()
    step = gram @ lam + rho * lam
    return tracked, _project_simplex(lam - gamma * step).to(weights.dtype)


def moco(
    tracked: Tensor,
    weights: Tensor,
    grads: Tensor,
    beta: float = 0.5,
    gamma: float = 0.1,
    rho: float = 0.0,
    present: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""One MoCo update: track the task gradients, then a projected step on the weights.

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023,
    https://openreview.net/forum?id=dLAYGdKTi2, Algorithm 1.

    .. math::

        y_i \leftarrow y_i - \beta\,(y_i - g_i), \qquad
        \lambda \leftarrow \Pi_{\Delta}\bigl(\lambda - \gamma\,(Y Y^\top + \rho I)\,\lambda\bigr),
        \qquad d = Y^\top \lambda

    with :math:`Y = [y_1; \dots; y_T]` the tracked gradients (``[T, P]``) and
    :math:`\Pi_\Delta` the Euclidean projection onto the probability simplex
    (:func:`project_simplex`). The update direction :math:`d` uses the new :math:`Y` and
    :math:`\lambda`; the tracking removes the bias of MGDA-type weights computed from stochastic
    gradients.

    Conventions: ``beta`` and ``gamma`` are the step sizes of *this* update (the callback
    decays them as :math:`\beta/t^{\sigma}`). The weights stay on the simplex (**sum to 1**).
    The step is not invariant to the gradients' scale (:math:`YY^\top` is not normalised, as in
    the paper). Absent tasks keep their tracked row (it still enters :math:`YY^\top`).
    :math:`YY^\top\lambda` is formed in float64.

    Args:
        tracked: :math:`Y`, ``[T, P]`` (zeros at the start, as the authors' code).
        weights: :math:`\lambda`, ``[T]`` on the simplex (:math:`1/T` at the start).
        grads: ``[T, P]`` per-task gradients of this update.
        beta: tracking rate :math:`\beta \in [0, 1]`.
        gamma: step size :math:`\gamma \ge 0` of the weights.
        rho: regularisation :math:`\rho \ge 0`.
        present: ``[T]`` mask of the tasks in this update (default: all).

    Returns:
        ``(tracked, weights)`` after the update; the direction is ``weights @ tracked``.

    Raises:
        ValueError: on mismatched shapes, non-finite inputs or rates out of range.

    Example::

        >>> grads = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> y, lam = moco(torch.zeros(2, 2), torch.full((2,), 0.5), grads, beta=1.0, gamma=0.5)
        >>> y  # beta = 1: the tracked gradients are this step's
        tensor([[1., 0.],
                [0., 2.]])
        >>> lam  # a step towards the smaller gradient, projected onto the simplex
        tensor([0.8750, 0.1250])
    """
    _check_grads(grads)
    num, size = grads.shape
    _check_matrix("tracked", tracked, (num, size))
    _check_vector("weights", weights, num)
    _check_rate("beta", beta)
    _check_rate("gamma", gamma, high=None)
    _check_rate("rho", rho, high=None)
    for name, x in (("tracked", tracked), ("weights", weights), ("grads", grads)):
        _check_finite(name, x)
    mask = _present(present, num, grads.device)
    return _moco(tracked, weights, grads, mask, float(beta), float(gamma), float(rho))


# --------------------------------------------------------------------------------------------
# Learning-rate annealing (Wang, Teng & Perdikaris)
# --------------------------------------------------------------------------------------------


def _lr_annealing_statistics(
    absolute: Tensor, reference: int, statistic: str, blocks: list[int] | None
) -> tuple[Tensor, Tensor]:
    """``(numerator, mean_abs)`` from ``|grads|`` ``[T, P]``: the max (or mean) of the
    reference's row and every row's mean, over all entries or (``blocks``) as the mean of the
    block means."""
    ref = absolute[reference]
    if blocks is None:
        return (ref.amax() if statistic == "max" else ref.mean()), absolute.mean(1)
    means = torch.stack([part.mean(1) for part in absolute.split(blocks, dim=1)], dim=1)
    return (ref.amax() if statistic == "max" else means[reference].mean()), means.mean(1)


def _lr_annealing(
    weights: Tensor,
    numerator: Tensor,
    mean_abs: Tensor,
    present: Tensor,
    reference: int,
    alpha: float,
    weighted: bool,
) -> Tensor:
    denom = mean_abs * weights if weighted else mean_abs
    ok = present & (denom > 0) & present[reference]
    target = numerator / torch.where(ok, denom, 1.0)
    updated = torch.where(ok, (1.0 - alpha) * weights + alpha * target, weights)
    return updated.index_fill(0, torch.tensor([reference], device=weights.device), 1.0)


def lr_annealing(
    weights: Tensor,
    grads: Tensor,
    reference: int = 0,
    alpha: float = 0.9,
    statistic: Statistic = "max",
    weighted: bool = True,
    present: Tensor | None = None,
    blocks: list[int] | None = None,
) -> Tensor:
    r"""One learning-rate-annealing update of the loss weights of physics-informed networks.

    Wang, Teng & Perdikaris, "Understanding and mitigating gradient pathologies in
    physics-informed neural networks", SIAM J. Sci. Comput. 43(5), 2021,
    https://arxiv.org/abs/2001.04536, Algorithm 1.

    With :math:`r` the reference task (the PDE residual in the paper, weight fixed at 1):

    .. math::

        \hat\lambda_i = \frac{\max_\theta \lvert\nabla_\theta L_r\rvert}
            {\overline{\lvert\nabla_\theta \lambda_i L_i\rvert}}, \qquad
        \lambda_i \leftarrow (1-\alpha)\,\lambda_i + \alpha\,\hat\lambda_i \quad (i \ne r),

    the maximum and the mean :math:`\overline{\,\cdot\,}` taken over the entries of the
    gradient with respect to the shared parameters.

    Conventions: ``weighted=True`` (default) divides by the mean of
    :math:`\lvert\nabla(\lambda_i L_i)\rvert = \lambda_i\,\overline{\lvert\nabla L_i\rvert}` with
    the current :math:`\lambda_i`, as Algorithm 1 is written; ``weighted=False`` by
    :math:`\overline{\lvert\nabla L_i\rvert}` (the gradient of the unweighted loss, the form of
    the re-implementation of Bischof & Kraus, arXiv:2110.09813). ``statistic="max"`` (default,
    the paper) takes :math:`\max\lvert\nabla L_r\rvert` in the numerator, ``"mean"`` its mean
    (the mean/mean variant of Bischof & Kraus's re-implementation). :math:`\alpha = 0.9` weighs
    the new estimate (the library's default, not checked against the paper's text); the
    authors' code (``GradientPathologiesPINNs``) weighs the *old* value by 0.9, i.e.
    :math:`\alpha = 0.1` here, takes the gradient of
    :math:`\lambda_i L_i` (``weighted=True``), the weight matrices only (no biases), the mean
    of the per-layer means (``blocks``), and updates every 10 iterations.
    A task with a zero gradient (or absent, or with the reference
    absent) keeps its weight. The weights are not normalised; the reference's is 1.

    Args:
        weights: :math:`\lambda`, ``[T]`` (ones at the start).
        grads: ``[T, P]`` per-task gradients of the unweighted losses.
        reference: the index of the reference task.
        alpha: :math:`\alpha \in [0, 1]`, the weight of the new estimate.
        statistic: ``"max"`` or ``"mean"`` of :math:`\lvert\nabla L_r\rvert`.
        weighted: whether the denominator is the gradient of :math:`\lambda_i L_i`.
        present: ``[T]`` mask of the tasks in this update (default: all).
        blocks: sizes of consecutive column blocks of ``grads`` (one per layer, summing to
            ``P``): the means are then the mean of the per-block means, as the authors' code
            averages its per-layer means (default ``None``: the mean over all entries).

    Returns:
        The new weights ``[T]``.

    Raises:
        ValueError: on mismatched shapes, non-finite inputs or out-of-range arguments.

    Example::

        >>> grads = torch.tensor([[4.0, -2.0], [0.5, 0.5]])  # max |g_0| = 4, mean |g_1| = 0.5
        >>> lr_annealing(torch.ones(2), grads, alpha=1.0)
        tensor([1., 8.])
        >>> lr_annealing(torch.ones(2), grads, alpha=0.5, statistic="mean")  # 3 / 0.5 = 6
        tensor([1.0000, 3.5000])
    """
    _check_grads(grads)
    num = grads.shape[0]
    _check_vector("weights", weights, num)
    _check_rate("alpha", alpha)
    if statistic not in ("max", "mean"):
        raise ValueError(f"Parameter `statistic` should be 'max' or 'mean'. Found {statistic!r}.")
    if isinstance(reference, bool) or not isinstance(reference, int) or not 0 <= reference < num:
        raise ValueError(
            f"Parameter `reference` should be a task index in [0, {num - 1}]. Found {reference!r}."
        )
    _check_finite("grads", grads)
    _check_finite("weights", weights)
    if blocks is not None and (
        not all(isinstance(b, int) and b > 0 for b in blocks) or sum(blocks) != grads.shape[1]
    ):
        raise ValueError(
            f"Parameter `blocks` should be positive block sizes summing to P = {grads.shape[1]}. "
            f"Found {blocks!r}."
        )
    mask = _present(present, num, grads.device)
    numerator, mean_abs = _lr_annealing_statistics(
        grads.abs(), reference, statistic, None if blocks is None else list(blocks)
    )
    return _lr_annealing(
        weights, numerator, mean_abs, mask, reference, float(alpha), bool(weighted)
    )
