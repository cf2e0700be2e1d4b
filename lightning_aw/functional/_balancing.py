r"""Balancing methods: the combination that treats every task alike, by linear algebra on K.

IMTL-G (equal projections on every unit task gradient: a linear system), Nash-MTL (the Nash
bargaining solution :math:`K\alpha = 1/\alpha`: a Newton method), Aligned-MTL (aligned task
gradients of equal norms: an eigendecomposition), FairGrad (the :math:`\alpha`-fair allocation
:math:`Kw = w^{-1/\alpha}`, which contains Nash-MTL's system: a Newton method) and ConFIG
(IMTL-G's equal-angle direction with the length of the summed projections). All are coefficient
methods with ``*_from_gram`` twins; see :mod:`._gram` for the contract.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_aw.functional._gram import (
    _check_gram,
    _finish,
    _gram64,
    _normalised,
    _rank_rtol,
    _work_dtype,
)

__all__ = [
    "aligned_mtl",
    "aligned_mtl_from_gram",
    "con_fig",
    "con_fig_from_gram",
    "fairgrad",
    "fairgrad_from_gram",
    "imtl_g",
    "imtl_g_from_gram",
    "nash_mtl",
    "nash_mtl_from_gram",
]

ScaleMode = Literal["min", "median", "rmse"]


# --------------------------------------------------------------------------------------------
# IMTL-G
# --------------------------------------------------------------------------------------------


def _imtl_g(q: Tensor, work: torch.dtype) -> Tensor:
    num_tasks = q.shape[0]
    qn, _ = _normalised(q)
    norms = qn.diagonal().clamp_min(0.0).sqrt()
    nonzero = norms > 0
    alpha = qn.new_zeros(num_tasks)
    if not bool(nonzero.any()):
        return alpha + 1.0 / num_tasks
    idx = nonzero.nonzero().squeeze(1)
    k = idx.numel()
    # unknowns (alpha, gamma):  K alpha - gamma n = 0  (equal projections gamma on unit grads),
    #                           1^T alpha = 1;  minimum-norm least-squares solution.
    system = qn.new_zeros(k + 1, k + 1)
    system[:k, :k] = qn[idx][:, idx]
    system[:k, k] = -norms[idx]
    system[k, :k] = 1.0
    rhs = qn.new_zeros(k + 1)
    rhs[k] = 1.0
    alpha[idx] = (torch.linalg.pinv(system, rtol=_rank_rtol(work)) @ rhs)[:k]
    return alpha


def imtl_g(grads: Tensor) -> Tensor:
    r"""IMTL-G: the combination whose projections on every unit task gradient are equal.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr.

    With :math:`u_i = g_i/\lVert g_i\rVert`, find :math:`\alpha` with :math:`\sum_i\alpha_i = 1`
    and :math:`d = \sum_i \alpha_i g_i` such that :math:`d\cdot u_i` is the same for all
    :math:`i`. In Gram space (:math:`K = GG^\top`, :math:`n_i = \lVert g_i\rVert`):

    .. math::

        K\alpha = \gamma\, n,\quad \mathbf 1^\top\alpha = 1
        \quad\Longrightarrow\quad
        \alpha = \frac{K^{-1} n}{\mathbf 1^\top K^{-1} n}\ \text{(full rank)},

    equivalent to the paper's closed form :math:`\alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}`.

    Conventions: coefficients sum to 1 (the paper's constraint). Rank deficiency is handled by the
    minimum-norm least-squares solution of the bordered ``(T+1) x (T+1)`` system above (a
    pseudo-inverse, singular values below ``1000 * eps`` relative dropped), which keeps the
    result permutation-equivariant; e.g. identical gradients give :math:`1/T` each and opposite
    ones :math:`d = 0`. Tasks with an exactly zero gradient have no direction: they get
    :math:`\alpha_i = 0`, and if all gradients are zero :math:`\alpha_i = 1/T`. ``alpha`` is
    invariant to multiplying ``grads`` by a constant.

    Args:
        grads: ``[T, P]`` per-task gradients.

    Returns:
        ``[T]`` coefficients summing to 1, dtype and device of ``grads``.

    Raises:
        ValueError: on a malformed or non-finite ``grads``.

    Example::

        >>> imtl_g(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
        tensor([0.7500, 0.2500])
    """
    q = _gram64(grads)
    return _finish(_imtl_g(q, _work_dtype(grads.dtype)), grads)


def imtl_g_from_gram(gram: Tensor) -> Tensor:
    r""":func:`imtl_g` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> imtl_g_from_gram(torch.tensor([[1.0, 0.0], [0.0, 9.0]]))
        tensor([0.7500, 0.2500])
    """
    q, work = _check_gram(gram)
    return _finish(_imtl_g(q, work), gram)


# --------------------------------------------------------------------------------------------
# Nash-MTL
# --------------------------------------------------------------------------------------------


def _nash(q: Tensor, max_iter: int, tol: float, ridge: float) -> Tensor:
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Parameter `max_iter` should be a positive int. Found {max_iter!r}.")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"Parameter `tol` should be a positive number. Found {tol!r}.")
    if not (math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"Parameter `ridge` should be a positive number. Found {ridge!r}.")
    num_tasks = q.shape[0]
    # A Gram matrix computed in float32 is slightly indefinite when two gradients (nearly)
    # cancel, e.g. on the Pareto set of a 2-task problem: project it onto the PSD cone first, or
    # the quadratic form below can be negative.
    evals, evecs = torch.linalg.eigh(q)
    q = (evecs * evals.clamp_min(0.0)) @ evecs.T
    fro = float(torch.linalg.matrix_norm(q))
    if fro == 0.0:
        return q.new_ones(num_tasks)
    a = q / fro + ridge * torch.eye(num_tasks, dtype=q.dtype, device=q.device)

    def objective(x: Tensor) -> float:  # convex; its gradient is A x - 1/x
        return float(0.5 * x @ a @ x - torch.log(x).sum())

    alpha = a.diagonal().rsqrt()
    alpha = alpha * math.sqrt(num_tasks / float(alpha @ a @ alpha))  # best multiple of the start
    for _ in range(max_iter):
        a_alpha = a @ alpha
        if float((alpha * a_alpha - 1).abs().max()) <= tol:
            break
        grad = a_alpha - 1 / alpha
        hess = a + torch.diag(1 / alpha**2)
        step = -torch.linalg.solve(hess, grad)
        decrease = float(grad @ step)  # < 0
        shrink = torch.where(step < 0, -alpha / step, torch.full_like(alpha, math.inf))
        t = min(1.0, 0.99 * float(shrink.min()))
        f0 = objective(alpha)
        while t > 1e-12 and objective(alpha + t * step) > f0 + 0.25 * t * decrease:
            t *= 0.5
        alpha = alpha + t * step
        if t * float(step.abs().max()) <= 1e-15 * float(alpha.max()):
            break  # no more progress in floating point
    return alpha


def nash_mtl(grads: Tensor, max_iter: int = 20, tol: float = 1e-10, ridge: float = 1e-8) -> Tensor:
    r"""Nash-MTL: the Nash bargaining solution, :math:`K\alpha = 1/\alpha` with :math:`\alpha>0`.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022, https://arxiv.org/abs/2202.01017.

    .. math::

        \bar K = \frac{G G^\top}{\lVert G G^\top\rVert_F} + \epsilon I, \qquad
        \bar K \alpha = 1/\alpha \ (\text{elementwise}), \qquad d = \sum_i \alpha_i g_i .

    The system is the stationarity condition of the strictly convex
    :math:`f(\alpha) = \tfrac12\alpha^\top\bar K\alpha - \sum_i\log\alpha_i`; it is solved by a
    damped Newton method on the positive orthant (backtracking line search, steps kept inside
    :math:`\alpha > 0`), instead of the paper's CCCP + cvxpy, until
    :math:`\max_i\lvert\alpha_i(\bar K\alpha)_i - 1\rvert \le` ``tol`` or ``max_iter`` steps.

    Conventions: as in the authors' implementation the Gram matrix is divided by its Frobenius
    norm, so :math:`\alpha` is invariant to multiplying ``grads`` by a constant (and ``d`` scales
    with it); the weights are used as they are (no sum-to-1). The ridge :math:`\epsilon` keeps the
    problem solvable when a gradient is zero or gradients cancel (:math:`0` in their cone), and
    bounds :math:`\lVert\alpha\rVert_2 \le \sqrt{T/\epsilon}`; it is negligible unless a task's
    squared gradient norm is below about :math:`\epsilon` times the Frobenius norm. All-zero
    gradients give :math:`\alpha = 1`. For two tasks Nash-MTL equals IMTL-G up to scale. The
    paper also clips the update norm at 1 and may refresh the weights every few steps: that is
    the caller's business.

    Args:
        grads: ``[T, P]`` per-task gradients.
        max_iter: maximum number of Newton steps (default 20, like the paper's CCCP steps;
            Newton converges quadratically, usually in under 10).
        tol: tolerance on :math:`\max_i\lvert\alpha_i(\bar K\alpha)_i - 1\rvert`.
        ridge: :math:`\epsilon` above.

    Returns:
        ``[T]`` positive weights, dtype and device of ``grads``.

    Raises:
        ValueError: on a malformed or non-finite ``grads`` or invalid solver settings.

    Example::

        >>> nash_mtl(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor([1.1892, 1.1892])
    """
    q = _gram64(grads)
    return _finish(_nash(q, max_iter, tol, ridge), grads)


def nash_mtl_from_gram(
    gram: Tensor, max_iter: int = 20, tol: float = 1e-10, ridge: float = 1e-8
) -> Tensor:
    r""":func:`nash_mtl` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> nash_mtl_from_gram(torch.eye(2))
        tensor([1.1892, 1.1892])
    """
    q, _ = _check_gram(gram)
    return _finish(_nash(q, max_iter, tol, ridge), gram)


# --------------------------------------------------------------------------------------------
# Aligned-MTL
# --------------------------------------------------------------------------------------------


def _aligned(q: Tensor, work: torch.dtype, scale_mode: str) -> Tensor:
    if scale_mode not in ("min", "median", "rmse"):
        raise ValueError(
            f"Parameter `scale_mode` should be 'min', 'median' or 'rmse'. Found {scale_mode!r}."
        )
    qn, _ = _normalised(q)
    eigvals, eigvecs = torch.linalg.eigh(qn)
    keep = eigvals > _rank_rtol(work) * eigvals.max().clamp_min(0.0)
    if not bool(keep.any()):  # every gradient is zero
        return qn.new_zeros(q.shape[0])
    lam, vec = eigvals[keep], eigvecs[:, keep]
    if scale_mode == "min":
        scale = lam.min()
    elif scale_mode == "median":
        scale = lam.median()
    else:
        scale = lam.mean()
    basis = (vec * (scale / lam).sqrt()) @ vec.T  # B = sqrt(scale) V diag(lam^-1/2) V^T
    return basis.sum(1)


def aligned_mtl(grads: Tensor, scale_mode: ScaleMode = "min") -> Tensor:
    r"""Aligned-MTL: align the principal components of the task gradients, keep a common scale.

    Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023, https://arxiv.org/abs/2305.19000, Algorithm 1.

    .. math::

        G G^\top = V \Lambda V^\top, \qquad
        B = \sqrt{\lambda_\text{s}}\; V \Lambda^{-1/2} V^\top, \qquad
        c = B\,\mathbf 1, \qquad d = c^\top G = \mathbf 1^\top (B G),

    where the rows of :math:`BG` are the aligned task gradients, whose Gram matrix is
    :math:`\lambda_\text{s} I` (full rank): they are orthogonal with equal norms.

    Conventions:

    * ``scale_mode``: :math:`\lambda_\text{s}` is the smallest kept eigenvalue (``"min"``,
      default), their median (``"median"``, torch's lower median) or their mean (``"rmse"``: the
      aligned gradients then have the RMS norm of the original singular values).
    * Task weights :math:`\omega = \mathbf 1` as in the authors' code: the aligned gradients are
      summed (the library-wide sum convention), not averaged.
    * Eigenvalues below ``1000 * eps * max eigenvalue`` (``eps`` of the working dtype) are
      dropped (rank-deficient gradients): :math:`\Lambda^{-1/2}` is a pseudo-inverse square root
      and the aligned Gram matrix is :math:`\lambda_\text{s}` times the projector on the range.
      All-zero gradients give ``c = 0``.
    * ``c`` is invariant to multiplying ``grads`` by a constant.

    Args:
        grads: ``[T, P]`` per-task gradients.
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.

    Returns:
        ``[T]`` coefficients, dtype and device of ``grads``.

    Raises:
        ValueError: on a malformed or non-finite ``grads`` or an unknown ``scale_mode``.

    Example::

        >>> aligned_mtl(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor([1.0000, 0.5000])
    """
    q = _gram64(grads)
    return _finish(_aligned(q, _work_dtype(grads.dtype), scale_mode), grads)


def aligned_mtl_from_gram(gram: Tensor, scale_mode: ScaleMode = "min") -> Tensor:
    r""":func:`aligned_mtl` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> aligned_mtl_from_gram(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        tensor([1.0000, 0.5000])
    """
    q, work = _check_gram(gram)
    return _finish(_aligned(q, work, scale_mode), gram)


# --------------------------------------------------------------------------------------------
# FairGrad
# --------------------------------------------------------------------------------------------


def _check_fairgrad_options(alpha: float, max_iter: int, tol: float, ridge: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"Parameter `alpha` should be a number >= 0. Found {alpha!r}.")
    if not math.isfinite(alpha):
        raise ValueError(
            f"Parameter `alpha` should be finite (a large value approaches max-min fairness). "
            f"Found {alpha!r}."
        )
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"Parameter `max_iter` should be a positive int. Found {max_iter!r}.")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"Parameter `tol` should be a positive number. Found {tol!r}.")
    if not (math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"Parameter `ridge` should be a positive number. Found {ridge!r}.")


def _fairgrad(q: Tensor, alpha: float, max_iter: int, tol: float, ridge: float) -> Tensor:
    _check_fairgrad_options(alpha, max_iter, tol, ridge)
    num_tasks = q.shape[0]
    if alpha == 0:  # linear scalarization: the utility sum_i g_i.d, weights 1
        return q.new_ones(num_tasks)
    # project onto the PSD cone (a float32 Gram of cancelling gradients is slightly indefinite)
    evals, evecs = torch.linalg.eigh(q)
    q = (evecs * evals.clamp_min(0.0)) @ evecs.T
    rho = float(q.diagonal().max())
    if rho <= 0.0:
        return q.new_ones(num_tasks)
    a = q / rho + ridge * torch.eye(num_tasks, dtype=q.dtype, device=q.device)
    p = 1.0 / alpha

    def utility(x: Tensor) -> Tensor:  # sum_i h(x_i) with h' = x^(-1/alpha), concave
        return torch.log(x).sum() if alpha == 1 else (x ** (1.0 - p)).sum() / (1.0 - p)

    def objective(x: Tensor) -> float:  # strictly convex on x > 0; gradient A x - x^(-1/alpha)
        return float(0.5 * x @ a @ x - utility(x))

    w = a.diagonal().rsqrt()
    # the best multiple s w of the start: s^(1 + p) = sum_i w_i^(1 - p) / (w^T A w)
    w = w * (float((w ** (1.0 - p)).sum()) / float(w @ a @ w)) ** (1.0 / (1.0 + p))
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(max_iter):
        a_w = a @ w
        if float((w**p * a_w - 1).abs().max()) <= tol:
            break
        grad = a_w - w ** (-p)
        hess = a + torch.diag(p * w ** (-p - 1.0))
        step = -torch.linalg.solve(hess, grad)  # the Newton step in w
        # taken in log w (w_i <- w_i exp(t step_i / w_i)): the same step to first order, so
        # still quadratic near the solution, a descent direction (grad . step < 0), and w stays
        # positive without shortening the step, so weights that tend to 0 (tasks the update
        # serves more than enough, at large alpha) get there in a few steps
        dv = step / w
        decrease = float(grad @ step)  # < 0
        t = 1.0
        f0 = objective(w)
        # Near the solution the decrease is below the rounding of f: take the step as it is,
        # quadratic convergence needs no line search there. Otherwise backtrack (written so that
        # a NaN or infinite trial value is rejected).
        if -decrease > 1e-10 * max(1.0, abs(f0)):
            while t > 1e-12 and not objective(w * torch.exp(t * dv)) <= f0 + 0.25 * t * decrease:
                t *= 0.5
        w_next = (w * torch.exp(t * dv)).clamp_min(tiny)
        if not bool(torch.isfinite(w_next).all()):
            break
        moved = float((w_next - w).abs().max())
        w = w_next
        if moved <= 1e-15 * float(w.max()):
            break  # no more progress in floating point
    # undo the normalisation: if A w = w^(-p) then (rho A)(s w) = (s w)^(-p) for
    # s = rho^(-alpha / (1 + alpha))
    return w * rho ** (-alpha / (1.0 + alpha))


def fairgrad(
    grads: Tensor,
    alpha: float = 2.0,
    max_iter: int = 50,
    tol: float = 1e-10,
    ridge: float = 1e-8,
) -> Tensor:
    r"""FairGrad: the :math:`\alpha`-fair allocation of the update among the tasks.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024,
    https://arxiv.org/abs/2402.15638.

    The update :math:`d` maximises :math:`\sum_i u_\alpha(g_i^\top d)` over a ball, with the
    :math:`\alpha`-fair utility :math:`u_\alpha(x) = x^{1-\alpha}/(1-\alpha)`
    (:math:`\log x` for :math:`\alpha = 1`). Its stationarity condition with
    :math:`d = \sum_i w_i g_i` is the paper's system

    .. math::

        G G^\top w = w^{-1/\alpha}\ (\text{elementwise}), \qquad w > 0, \qquad
        d = \sum_i w_i g_i .

    Special cases (the :math:`\alpha`-fair utilities the paper builds on):

    * :math:`\alpha = 0`: the utility is :math:`\sum_i g_i^\top d`, linear scalarization:
      ``w = 1`` exactly (the plain sum);
    * :math:`\alpha = 1`: proportional fairness, :math:`GG^\top w = 1/w`, Nash-MTL's
      bargaining system (without Nash-MTL's division of :math:`GG^\top` by its Frobenius norm:
      ``fairgrad(g, 1) = nash_mtl(g) / ||GG^T||_F ** 0.5`` up to the ridges);
    * :math:`\alpha = 2`: minimum potential-delay fairness (the default, as in the authors'
      experiment scripts);
    * :math:`\alpha \to \infty`: max-min fairness, :math:`\max_d \min_i g_i^\top d` on the
      ball: the direction of MGDA's min-norm point, with :math:`GG^\top w \to \mathbf 1` when
      MGDA uses every task (``alpha`` must be finite; at ``alpha=100`` the cosine with MGDA's
      direction is above 0.9999 in the tests).

    Solver: the system is the stationarity condition of the strictly convex
    :math:`f(w) = \tfrac12 w^\top \bar K w - \sum_i h(w_i)`, :math:`h' = w^{-1/\alpha}`, on the
    normalised :math:`\bar K = GG^\top/\rho + \epsilon I` (:math:`\rho` the largest squared
    gradient norm, :math:`\epsilon` = ``ridge``). A damped Newton method in float64 (the Newton
    step :math:`\Delta w` taken multiplicatively, :math:`w_i \leftarrow w_i
    e^{t\Delta w_i/w_i}`, which keeps :math:`w > 0`, with a backtracking line search on
    :math:`f`) runs until :math:`\max_i \lvert w_i^{1/\alpha}(\bar K w)_i - 1\rvert \le`
    ``tol`` or ``max_iter`` steps; the result is then rescaled exactly by
    :math:`\rho^{-\alpha/(1+\alpha)}`, so it solves :math:`(GG^\top + \epsilon\rho I) w =
    w^{-1/\alpha}`: the paper's system with a relative ridge (the authors solve it with
    ``scipy.optimize.least_squares``; the solution is the same, as it is unique). If ``max_iter``
    is reached first the last iterate is returned: positive, finite, with a lower :math:`f` than
    the start. Measured on random gradients: at most 11 steps for :math:`0.1 \le \alpha \le 20`.
    At large :math:`\alpha` the weight of a task the update serves more than the others tends to
    0 as :math:`(g_i^\top d)^{-\alpha}` and may fall below float64's range: it is floored at the
    smallest normal float64 (the update is unaffected), and ``tol`` is then not reached.

    Conventions: the weights are used as they are (no sum-to-1), as in the paper, so they scale
    with the gradients: ``fairgrad(k * g) = k ** (-2 alpha / (1 + alpha)) * fairgrad(g)``
    (``d`` scales as :math:`k^{(1-\alpha)/(1+\alpha)}`). The ridge keeps the system solvable
    when a gradient is zero or gradients cancel (:math:`0` in their cone), where the weights
    grow large (about :math:`(\epsilon\rho)^{-\alpha/(1+\alpha)}`); it is negligible otherwise.
    All-zero gradients give ``w = 1``. A Gram matrix is first projected onto the PSD cone.

    Args:
        grads: ``[T, P]`` per-task gradients.
        alpha: the fairness parameter :math:`\alpha \ge 0`, finite (default 2).
        max_iter: maximum number of Newton steps.
        tol: tolerance on :math:`\max_i\lvert w_i^{1/\alpha}(\bar K w)_i - 1\rvert`.
        ridge: :math:`\epsilon` above, relative to the largest squared gradient norm.

    Returns:
        ``[T]`` positive weights, dtype and device of ``grads``.

    Raises:
        ValueError: on a malformed or non-finite ``grads`` or invalid options.

    Example::

        >>> fairgrad(torch.tensor([[1.0, 0.0], [0.0, 8.0]]), alpha=2.0)  # w_i = |g_i|^(-4/3)
        tensor([1.0000, 0.0625])
        >>> fairgrad(torch.tensor([[1.0, 0.0], [0.0, 8.0]]), alpha=1.0)  # w_i = 1 / |g_i|
        tensor([1.0000, 0.1250])
    """
    q = _gram64(grads)
    return _finish(_fairgrad(q, alpha, max_iter, tol, ridge), grads)


def fairgrad_from_gram(
    gram: Tensor,
    alpha: float = 2.0,
    max_iter: int = 50,
    tol: float = 1e-10,
    ridge: float = 1e-8,
) -> Tensor:
    r""":func:`fairgrad` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> fairgrad_from_gram(torch.tensor([[1.0, 0.0], [0.0, 64.0]]))
        tensor([1.0000, 0.0625])
    """
    q, _ = _check_gram(gram)
    return _finish(_fairgrad(q, alpha, max_iter, tol, ridge), gram)


# --------------------------------------------------------------------------------------------
# ConFIG
# --------------------------------------------------------------------------------------------


def _con_fig(q: Tensor, work: torch.dtype) -> Tensor:
    num_tasks = q.shape[0]
    norms = q.diagonal().clamp_min(0.0).sqrt()
    nonzero = norms > 0
    c = q.new_ones(num_tasks)
    if not bool(nonzero.any()):
        return c
    idx = nonzero.nonzero().squeeze(1)
    n = norms[idx]
    cos = q[idx][:, idx] / torch.outer(n, n)  # U U^T, U the unit gradients
    ones = q.new_ones(idx.numel())
    y = torch.linalg.pinv(cos, rtol=_rank_rtol(work), hermitian=True) @ ones
    v = y / n  # d_u = U^T y = G^T v
    du_sq = float(y @ cos @ y)  # |d_u|^2
    if not du_sq > idx.numel() * torch.finfo(work).eps:
        c[idx] = 0.0  # the unit gradients cancel: no direction (d = 0)
        return c
    projections = float((q[:, idx] @ v).sum())  # sum_i g_i . d_u
    c[idx] = v * (projections / du_sq)
    return c


def con_fig(grads: Tensor) -> Tensor:
    r"""ConFIG: the conflict-free update, at an equal angle to every task gradient.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025, https://arxiv.org/abs/2408.11104.

    With the unit gradients :math:`u_i = g_i/\lVert g_i\rVert` (rows of :math:`U`), the paper's
    direction solves :math:`u_i^\top \tilde d = 1` for every task by a pseudo-inverse, and its
    length is the sum of the gradients' projections on it:

    .. math::

        \tilde d = U^{+}\mathbf 1, \qquad \hat d = \tilde d/\lVert\tilde d\rVert, \qquad
        d = \Bigl(\sum_i g_i^\top \hat d\Bigr)\,\hat d .

    As coefficients on :math:`G` (:math:`d = c^\top G`): with :math:`N = \mathrm{diag}(1/\lVert
    g_i\rVert)`, :math:`C = UU^\top = N GG^\top N` (the cosines) and :math:`y = C^{+}\mathbf 1`,
    :math:`\tilde d = U^\top y = G^\top N y`, :math:`\lVert\tilde d\rVert^2 = y^\top C y` and
    :math:`\sum_i g_i^\top\tilde d = \mathbf 1^\top GG^\top N y`, so

    .. math::

        c = N y\;\frac{\mathbf 1^\top GG^\top N y}{y^\top C y},

    computed from the Gram matrix alone (the minimum-norm least-squares :math:`\tilde d` lies in
    the span of the gradients, so nothing is lost).

    Properties: when the gradients are linearly independent, :math:`u_i^\top d` is the same for
    every task (equal cosines) and positive, so :math:`d` conflicts with no task; its direction is
    IMTL-G's (``c / c.sum() == imtl_g(grads)``), with the magnitude :math:`\sum_i g_i^\top\hat
    d` instead of IMTL-G's sum-to-1 constraint. ``c`` is invariant to multiplying ``grads`` by a
    constant (``d`` scales with it). Identical gradients give ``c = 1`` (the plain sum), a
    single task ``c = 1``. The paper's momentum variant (M-ConFIG) is not included.

    Conventions for degenerate input: the pseudo-inverse drops singular values of :math:`C`
    below ``1000 * eps`` relative (``eps`` of the working dtype); with linearly dependent
    gradients :math:`C y` is the projection of :math:`\mathbf 1` onto the range of :math:`C`, so
    the cosines are equal only in the least-squares sense. When the unit gradients cancel
    (:math:`\mathbf 1` orthogonal to that range, e.g. two opposite gradients) there is no
    direction and the tasks get ``c = 0``. A task with an exactly zero gradient has no
    direction: it is left out and keeps ``c_i = 1`` (its zero gradient adds nothing to ``d``; its
    own head, weighted by ``c_i`` in :class:`~lightning_aw.ConFIG`, trains as with the plain
    sum); all-zero gradients give ``c = 1``. The coefficients may be negative when the
    gradients are nearly dependent (as IMTL-G's), while ``d`` still conflicts with no task.

    Args:
        grads: ``[T, P]`` per-task gradients.

    Returns:
        ``[T]`` coefficients (not normalised), dtype and device of ``grads``.

    Raises:
        ValueError: on a malformed or non-finite ``grads``.

    Example::

        >>> grads = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> c = con_fig(grads)
        >>> c
        tensor([1.5000, 0.7500])
        >>> d = c @ grads
        >>> d @ (grads / grads.norm(dim=1, keepdim=True)).T  # equal projections on unit gradients
        tensor([1.5000, 1.5000])
    """
    q = _gram64(grads)
    return _finish(_con_fig(q, _work_dtype(grads.dtype)), grads)


def con_fig_from_gram(gram: Tensor) -> Tensor:
    r""":func:`con_fig` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> con_fig_from_gram(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        tensor([1.5000, 0.7500])
    """
    q, work = _check_gram(gram)
    return _finish(_con_fig(q, work), gram)
