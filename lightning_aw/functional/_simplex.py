r"""Common-descent methods whose task weights solve a QP over the probability simplex.

MGDA (the minimum-norm point of the convex hull of the gradients) and CAGrad (the best
worst-case improvement in a ball around the mean gradient, whose dual is a sequence of simplex
QPs). Both are coefficient methods with ``*_from_gram`` twins; the shared contract and numerics
are described in :mod:`._gram`.
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
    _shape_of,
    _work_dtype,
)
from lightning_aw.functional._qp import _min_norm_weights, _NonnegQP, _SimplexQP

__all__ = ["cagrad", "cagrad_from_gram", "mgda", "mgda_from_gram"]

Normalization = Literal["none", "l2", "loss", "loss+"]


# --------------------------------------------------------------------------------------------
# MGDA
# --------------------------------------------------------------------------------------------


def _mgda_scaling(
    q: Tensor, normalization: str, losses: Tensor | None, num_tasks: int
) -> Tensor | None:
    if normalization not in ("none", "l2", "loss", "loss+"):
        raise ValueError(
            "Parameter `normalization` should be one of 'none', 'l2', 'loss', 'loss+'. "
            f"Found {normalization!r}."
        )
    if normalization == "none":
        return None
    norms = q.diagonal().clamp_min(0.0).sqrt()
    safe_norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    if normalization == "l2":
        return 1.0 / safe_norms
    if not isinstance(losses, Tensor) or losses.shape != (num_tasks,):
        raise ValueError(
            f"Parameter `losses` should be a [T] = [{num_tasks}] tensor of task losses when "
            f"`normalization={normalization!r}`. Found `losses` = {_shape_of(losses)}."
        )
    lv = losses.detach().to(device=q.device, dtype=torch.float64)
    if not bool(torch.isfinite(lv).all() & (lv > 0).all()):
        raise ValueError(
            "Parameter `losses` should be positive and finite for the loss-based "
            f"normalisations. Found {lv.tolist()}: use normalization='l2' or 'none' instead."
        )
    return 1.0 / lv if normalization == "loss" else 1.0 / (lv * safe_norms)


def _mgda(q: Tensor, work: torch.dtype, normalization: str, losses: Tensor | None) -> Tensor:
    scale = _mgda_scaling(q, normalization, losses, q.shape[0])
    if scale is None:
        return _min_norm_weights(q, work)
    return scale * _min_norm_weights(scale[:, None] * q * scale[None, :], work)


def mgda(
    grads: Tensor, normalization: Normalization = "none", losses: Tensor | None = None
) -> Tensor:
    r"""MGDA: the exact minimum-norm point of the convex hull of the (normalised) gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    https://arxiv.org/abs/1810.04650.

    With :math:`\hat g_i = g_i / s_i` (see ``normalization``) and :math:`\hat K` their Gram matrix:

    .. math::

        \hat c = \operatorname*{argmin}_{\hat c \in \Delta_T} \hat c^\top \hat K \hat c,
        \qquad c_i = \hat c_i / s_i, \qquad d = \sum_i c_i g_i = \sum_i \hat c_i \hat g_i.

    For ``T = 2`` the closed form
    :math:`\hat c_1 = \operatorname{clip}\big(\tfrac{(\hat g_2-\hat g_1)\cdot\hat g_2}
    {\lVert\hat g_1-\hat g_2\rVert^2}, 0, 1\big)` is used (``0.5`` for identical gradients); for
    ``T > 2`` the problem is solved exactly (support enumeration for ``T <= 10``, an active-set
    method above), not with a fixed number of Frank-Wolfe steps. When the minimiser is not unique
    (e.g. identical gradients) the average of the optimal supports is returned.

    Conventions:

    * The returned coefficients apply to the *original* gradients: the normalisation is folded
      into ``c``. So :math:`\sum_i \hat c_i = 1`, and :math:`\sum_i c_i = 1` only for ``"none"``.
    * ``normalization``: ``"none"`` (:math:`s_i = 1`), ``"l2"`` (:math:`s_i = \lVert g_i\rVert`),
      ``"loss"`` (:math:`s_i = L_i`), ``"loss+"`` (:math:`s_i = L_i\lVert g_i\rVert`), as in the
      paper's code. A zero gradient is left as is (its :math:`\lVert g_i\rVert` factor is
      replaced by 1).
    * Scale: multiplying ``grads`` by :math:`k > 0` leaves ``c`` unchanged for ``"none"`` and
      ``"loss"`` and divides it by :math:`k` for ``"l2"`` and ``"loss+"``.

    Args:
        grads: ``[T, P]`` per-task gradients (or gradients w.r.t. a shared representation, for
            the paper's MGDA-UB).
        normalization: one of ``"none"`` (default), ``"l2"``, ``"loss"``, ``"loss+"``.
        losses: ``[T]`` positive task losses, required by ``"loss"`` and ``"loss+"``.

    Returns:
        ``[T]`` coefficients, dtype and device of ``grads``.

    Raises:
        ValueError: on a malformed or non-finite ``grads``, an unknown ``normalization``, or
            missing / non-positive ``losses`` for a loss-based normalisation.

    Example::

        >>> mgda(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor([0.8000, 0.2000])
    """
    q = _gram64(grads)
    return _finish(_mgda(q, _work_dtype(grads.dtype), normalization, losses), grads)


def mgda_from_gram(
    gram: Tensor, normalization: Normalization = "none", losses: Tensor | None = None
) -> Tensor:
    r""":func:`mgda` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> mgda_from_gram(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        tensor([0.8000, 0.2000])
    """
    q, work = _check_gram(gram)
    return _finish(_mgda(q, work, normalization, losses), gram)


# --------------------------------------------------------------------------------------------
# CAGrad
# --------------------------------------------------------------------------------------------


def _cagrad(q: Tensor, work: torch.dtype, c: float, rescale: int) -> Tensor:
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
        raise ValueError(f"Parameter `c` should be a finite number >= 0. Found {c!r}.")
    if rescale not in (0, 1, 2):
        raise ValueError(f"Parameter `rescale` should be 0, 1 or 2. Found {rescale!r}.")
    num_tasks = q.shape[0]
    qn, _ = _normalised(q)  # largest gradient norm is now 1
    mean = qn.new_full((num_tasks,), 1.0 / num_tasks)
    radius = c * float(qn.mean().clamp_min(0.0).sqrt())  # c ||g0||
    coef = mean
    if radius > 0:
        lin = qn @ mean  # g_i . g0
        qp = _SimplexQP(qn, work)

        def weights(mu: float) -> tuple[Tensor, float]:
            # argmin_w  w.g0 + radius/(2 mu) ||g_w||^2, scaled by mu/radius
            w = qp.solve(lin * (mu / radius))
            return w, float((w @ qn @ w).clamp_min(0.0).sqrt())

        mu_lo, mu_hi = math.sqrt(torch.finfo(work).eps), 1.0
        direct = _cagrad_root(qp, qn, lin, radius, mu_lo)
        if direct is not None:
            h_lo, root = direct
        else:
            _, h_lo = weights(mu_lo)
            root = None
        if h_lo <= mu_lo:
            coef = _cagrad_degenerate(qn, work, mean, radius)
        elif root is not None:
            best_w, best_h = root
            coef = mean + (radius / max(best_h, mu_lo)) * best_w
        else:
            # V(mu) = min_w [w.g0 + radius (||g_w||^2/(2 mu) + mu/2)] is convex in mu and
            # V'(mu) has the sign of mu - ||g_w(mu)||, so f(s) = log ||g_w(e^s)|| - s is
            # non-increasing: find its root by the Illinois (safeguarded regula falsi) method.
            s_lo, f_lo = math.log(mu_lo), math.log(h_lo / mu_lo)
            w_hi, h_hi = weights(mu_hi)
            s_hi, f_hi = 0.0, math.log(max(h_hi, 1e-300))
            best_f, best_w, best_h = abs(f_hi), w_hi, h_hi
            side = 0
            for _ in range(200):
                if best_f <= 1e-14 or s_hi - s_lo <= 1e-14:
                    break
                s_new = s_hi - f_hi * (s_hi - s_lo) / (f_hi - f_lo)
                if not s_lo < s_new < s_hi:
                    s_new = 0.5 * (s_lo + s_hi)
                w_new, h_new = weights(math.exp(s_new))
                f_new = math.log(max(h_new, 1e-300)) - s_new
                if abs(f_new) < best_f:
                    best_f, best_w, best_h = abs(f_new), w_new, h_new
                if f_new > 0:
                    s_lo, f_lo = s_new, f_new
                    f_hi = f_hi * 0.5 if side == 1 else f_hi
                    side = 1
                else:
                    s_hi, f_hi = s_new, f_new
                    f_lo = f_lo * 0.5 if side == -1 else f_lo
                    side = -1
            coef = mean + (radius / max(best_h, mu_lo)) * best_w
    return coef / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]


#: tasks up to which CAGrad's root is found in closed form (one candidate per support)
_CAGRAD_DIRECT_TASKS = 6


def _cagrad_root(
    qp: _SimplexQP, qn: Tensor, lin: Tensor, radius: float, mu_lo: float
) -> tuple[float, tuple[Tensor, float] | None] | None:
    r"""The root :math:`\mu = \lVert g_{w(\mu)}\rVert` of CAGrad's optimality condition in
    closed form, verified; ``None`` when it does not apply (then the caller searches for it).

    On a fixed support :math:`S` the simplex QP's KKT system is linear in its right-hand side, so
    :math:`w_S(\mu) = x_0 + \mu x_1` is affine in :math:`\mu` and
    :math:`\lVert g_{w_S(\mu)}\rVert^2 = \mu^2` is a quadratic equation. Its roots for every
    support (the enumerated KKT pseudo-inverses of ``qp``) are the candidates; the exact QP is
    then solved at all of them and at ``mu_lo`` in one batch, and the candidate whose solution
    satisfies the condition to rounding (:math:`|\log\lVert g_w\rVert - \log\mu| \le
    10^{-10}`) is the root: the same point the bracketing search converges to, without its
    sequence of solves.

    Returns:
        ``(h_lo, root)``: :math:`\lVert g_{w(\mu_{lo})}\rVert` and ``(w, ||g_w||)`` at the
        root (``None`` when no candidate passes the check).
    """
    if qp.enum is None or not 1 < qp.n <= _CAGRAD_DIRECT_TASKS:
        return None
    m, kkt_pinv = qp.enum
    n = qp.n
    x0 = kkt_pinv[:, :n, n] * m  # the solution's constant part (right-hand side [0, 1])
    x1 = (kkt_pinv[:, :n, :n] @ (-(lin / radius) * m).unsqueeze(-1)).squeeze(-1) * m
    a = ((x1 @ qn) * x1).sum(-1) - 1.0
    b = ((x0 @ qn) * x1).sum(-1)
    c = ((x0 @ qn) * x0).sum(-1)
    disc = (b * b - a * c).clamp_min(0.0).sqrt()
    safe_a = torch.where(a.abs() > 1e-300, a, torch.ones_like(a))
    roots = torch.cat([(-b + disc) / safe_a, (-b - disc) / safe_a])
    roots = roots[torch.isfinite(roots) & (roots > mu_lo) & (roots <= 1.0)]
    mus = torch.cat([roots.new_full((1,), mu_lo), roots])
    w = qp.solve_many(lin.unsqueeze(0) * (mus / radius).unsqueeze(1))
    h = ((w @ qn) * w).sum(-1).clamp_min(0.0).sqrt()
    h_lo = float(h[0])
    if mus.numel() == 1:
        return h_lo, None
    err = (h[1:].clamp_min(1e-300).log() - mus[1:].log()).abs()
    best = int(torch.argmin(err))
    if float(err[best]) > 1e-10:
        return h_lo, None
    return h_lo, (w[1 + best], float(h[1 + best]))


def _cagrad_degenerate(qn: Tensor, work: torch.dtype, mean: Tensor, radius: float) -> Tensor:
    """CAGrad when the dual optimum has g_w = 0 (0 in the hull and no better w).

    Then the best worst-case improvement is 0 and every d in the ball with G d >= 0 is optimal;
    take the one closest to g0: the projection of g0 onto the dual cone {x : G x >= 0}, shrunk
    into the ball if rounding put it outside.
    """
    u = _NonnegQP(qn, work).solve((qn @ mean).unsqueeze(0))[0]
    shift = float((u @ qn @ u).clamp_min(0.0).sqrt())
    if shift > radius:
        u = u * (radius / shift)
    return mean + u


def cagrad(grads: Tensor, c: float = 0.4, rescale: int = 1) -> Tensor:
    r"""CAGrad: the update that maximises the worst task improvement near the mean gradient.

    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, https://arxiv.org/abs/2110.14048.

    With :math:`g_0 = \tfrac1T\sum_i g_i` and :math:`g_w = \sum_i w_i g_i`, the dual problem

    .. math::

        w^\star = \operatorname*{argmin}_{w \in \Delta_T}\ g_w^\top g_0
        + c\,\lVert g_0\rVert\,\lVert g_w\rVert, \qquad
        d = g_0 + \frac{c\,\lVert g_0\rVert}{\lVert g_{w^\star}\rVert}\, g_{w^\star},

    so :math:`c_i = 1/T + \lambda w^\star_i` with :math:`\lambda = c\lVert g_0\rVert /
    \lVert g_{w^\star}\rVert`. The inner problem is solved to machine precision: for a fixed
    :math:`\mu` the problem :math:`\min_w g_w^\top g_0 + c\lVert g_0\rVert\lVert g_w\rVert^2/(2\mu)`
    is an exact simplex QP, and :math:`\mu = \lVert g_{w^\star}\rVert` is the root of a monotone
    optimality condition, found by safeguarded regula falsi (Illinois). If the optimum has
    :math:`g_{w^\star} = 0` (then every direction in the ball is at best non-conflicting),
    :math:`d` is the projection of
    :math:`g_0` onto the dual cone :math:`\{x: g_i\cdot x \ge 0\}` (within the ball).

    Conventions: ``rescale=0`` returns :math:`d`; ``rescale=1`` (default, the authors' code)
    :math:`d/(1+c^2)`; ``rescale=2`` :math:`d/(1+c)`. ``c = 0`` gives the mean gradient (all
    coefficients :math:`1/T`, then rescaled). ``c`` is invariant to multiplying ``grads`` by a
    constant. The paper (and Nash-MTL, FAMO) use ``c = 0.4``; 0.5 is also common.

    Args:
        grads: ``[T, P]`` per-task gradients.
        c: radius of the trust region around :math:`g_0`, relative to :math:`\lVert g_0\rVert`.
        rescale: 0, 1 or 2, see above.

    Returns:
        ``[T]`` coefficients, dtype and device of ``grads``.

    Raises:
        ValueError: on a malformed or non-finite ``grads``, a negative ``c`` or an unknown
            ``rescale``.

    Example::

        >>> cagrad(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), c=0.5, rescale=0)
        tensor([0.7500, 0.7500])
    """
    q = _gram64(grads)
    work = _work_dtype(grads.dtype)
    return _finish(_cagrad(q, work, c, rescale), grads)


def cagrad_from_gram(gram: Tensor, c: float = 0.4, rescale: int = 1) -> Tensor:
    r""":func:`cagrad` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> cagrad_from_gram(torch.eye(2), c=0.5, rescale=0)
        tensor([0.7500, 0.7500])
    """
    q, work = _check_gram(gram)
    return _finish(_cagrad(q, work, c, rescale), gram)
