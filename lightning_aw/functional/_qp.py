r"""Exact solvers of the small ``T x T`` quadratic programs of the gradient-based methods.

:class:`_SimplexQP` minimises a convex quadratic over the probability simplex (MGDA's min-norm
point, CAGrad's inner problem), :class:`_NonnegQP` over the non-negative orthant (UPGrad's
dual-cone projections, CAGrad's degenerate case). Both enumerate every support for
``T <= _MAX_ENUM_TASKS`` (batched, one small pseudo-inverse per support, ties averaged so the
answer is permutation-equivariant) and run a primal active-set method above that. Inputs are
normalised float64 Gram matrices (see :mod:`._gram`); nothing here validates them.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lightning_aw.functional._gram import _normalised, _rank_rtol, _tie_tol

#: Supports are enumerated exhaustively up to this many tasks (2^T - 1 small systems).
_MAX_ENUM_TASKS = 10
#: Tolerance of the KKT checks of the active-set methods (normalised units).
_KKT_TOL = 1e-12


@functools.lru_cache(maxsize=64)
def _subsets(num: int, device: torch.device) -> Tensor:
    """All non-empty subsets of ``range(num)`` as a ``[2^num - 1, num]`` float64 0/1 matrix
    (made once per size and device; callers only read it)."""
    with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, whoever asks first
        idx = torch.arange(1, 2**num, device=device)
        bits = torch.arange(num, device=device)
        return ((idx[:, None] >> bits) & 1).to(torch.float64)


def _average_ties(x: Tensor, obj: Tensor, tol: float) -> Tensor:
    """Average of the candidates ``x[k]`` whose objective is within the tie tolerance of the best.

    The set of minimisers of a convex problem is convex, so the average is a minimiser too; taking
    all of them (not the first) keeps the answer permutation-equivariant when it is not unique.
    """
    best = obj.amin(dim=0, keepdim=True)
    tie = (obj <= best + tol * best.abs().clamp_min(1.0)).to(x.dtype)
    return (x * tie.unsqueeze(-1)).sum(0) / tie.sum(0).unsqueeze(-1)


class _SimplexQP:
    r"""Exact solver of :math:`\min_x \tfrac12 x^\top Q x + q^\top x` over the probability simplex.

    ``Q`` must be symmetric positive semi-definite, normalised (largest diagonal entry 1).
    """

    def __init__(self, q_mat: Tensor, work: torch.dtype) -> None:
        self.q_mat, self.rtol = q_mat, _rank_rtol(work)
        self.n = q_mat.shape[0]
        self.tie = _tie_tol(work, self.n)
        self.enum: tuple[Tensor, Tensor] | None = None  # (supports, pseudo-inverse KKT matrices)
        self.warm: Tensor | None = None
        if 1 < self.n <= _MAX_ENUM_TASKS:
            n, m = self.n, _subsets(self.n, q_mat.device)
            kkt = q_mat.new_zeros(m.shape[0], n + 1, n + 1)
            kkt[:, :n, :n] = q_mat * m[:, :, None] * m[:, None, :]
            kkt[:, :n, n] = m
            kkt[:, n, :n] = m
            self.enum = (m, torch.linalg.pinv(kkt, hermitian=True, rtol=self.rtol))

    def objective(self, x: Tensor, lin: Tensor) -> Tensor:
        return 0.5 * ((x @ self.q_mat) * x).sum(-1) + (x * lin).sum(-1)

    def solve(self, lin: Tensor | None = None) -> Tensor:
        n = self.n
        lin = self.q_mat.new_zeros(n) if lin is None else lin
        if n == 1:
            return self.q_mat.new_ones(1)
        if self.enum is not None:
            return self._enumerate(lin, *self.enum)
        return self._active_set(lin)

    def _enumerate(self, lin: Tensor, m: Tensor, kkt_pinv: Tensor) -> Tensor:
        rhs = torch.cat([-lin * m, m.new_ones(m.shape[0], 1)], dim=1)
        sol = (kkt_pinv @ rhs.unsqueeze(-1)).squeeze(-1)[:, : self.n] * m
        # Every clamped and renormalised candidate is a point of the simplex, so its true
        # objective bounds the optimum from above; the optimal support is among the candidates.
        x = sol.clamp_min(0.0)
        total = x.sum(1, keepdim=True)
        x = torch.where(total > 1e-9, x / total.clamp_min(1e-300), m / m.sum(1, keepdim=True))
        obj = self.objective(x, lin).unsqueeze(1)
        return _average_ties(x.unsqueeze(1), obj, self.tie).squeeze(0)

    def solve_many(self, lin: Tensor) -> Tensor:
        """:meth:`solve` for each row of ``lin`` (``[K, n]``), batched over the rows when the
        supports are enumerated (one set of small kernels for all of them)."""
        if self.enum is None or self.n == 1:
            return torch.stack([self.solve(row) for row in lin])
        m, kkt_pinv = self.enum
        num = lin.shape[0]
        rhs = torch.cat(
            [-lin.unsqueeze(1) * m, m.new_ones(num, m.shape[0], 1)], dim=2
        )  # [K, M, n + 1]
        sol = (kkt_pinv @ rhs.unsqueeze(-1)).squeeze(-1)[..., : self.n] * m
        x = sol.clamp_min(0.0)
        total = x.sum(-1, keepdim=True)
        x = torch.where(total > 1e-9, x / total.clamp_min(1e-300), m / m.sum(1, keepdim=True))
        obj = self.objective(x, lin.unsqueeze(1))  # [K, M]
        return _average_ties(x.transpose(0, 1), obj.T, self.tie)

    def _solve_on(self, support: Tensor, lin: Tensor) -> Tensor:
        idx = support.nonzero().squeeze(1)
        k = idx.numel()
        kkt = self.q_mat.new_zeros(k + 1, k + 1)
        kkt[:k, :k] = self.q_mat[idx][:, idx]
        kkt[:k, k] = 1.0
        kkt[k, :k] = 1.0
        rhs = torch.cat([-lin[idx], lin.new_ones(1)])
        y = torch.zeros_like(lin)
        y[idx] = (torch.linalg.pinv(kkt, hermitian=True, rtol=self.rtol) @ rhs)[:k]
        return y

    def _active_set(self, lin: Tensor) -> Tensor:
        """Primal active-set method (Wolfe's min-norm-point scheme generalised to ``lin``)."""
        n = self.n
        if self.warm is not None:
            x = self.warm.clone()
        else:
            x = torch.zeros_like(lin)
            x[int(torch.argmin(0.5 * self.q_mat.diagonal() + lin))] = 1.0
        support = x > 0
        for _ in range(20 * n + 50):
            y = self._solve_on(support, lin)
            if bool((y[support] >= -1e-14).all()):
                y = y.clamp_min(0.0)
                x = y / y.sum()
                grad = self.q_mat @ x + lin
                level = (grad * x).sum()
                outside = torch.where(support, torch.full_like(grad, math.inf), grad)
                j = int(torch.argmin(outside))
                if support.all() or bool(outside[j] >= level - _KKT_TOL * (1 + level.abs())):
                    break
                support[j] = True
            else:  # move towards y until a weight reaches zero, and drop it
                d = y - x
                neg = support & (y < 0)
                ratio = torch.where(neg, x / (x - y).clamp_min(1e-300), torch.full_like(x, 2.0))
                x = (x + ratio.min().clamp(0.0, 1.0) * d).clamp_min(0.0)
                x = x / x.sum()
                support = support & (x > 1e-15)
                if not bool(support.any()):
                    support[int(torch.argmax(x))] = True
        self.warm = x
        return x


class _NonnegQP:
    r"""Exact solver of :math:`\min_{u \ge 0} \tfrac12 u^\top Q u + q_b^\top u` for a batch of
    linear terms ``q_b`` (rows of ``lin``); ``Q`` PSD, normalised (largest diagonal entry 1)."""

    def __init__(self, q_mat: Tensor, work: torch.dtype) -> None:
        self.q_mat, self.rtol = q_mat, _rank_rtol(work)
        self.n = q_mat.shape[0]
        self.tie = _tie_tol(work, self.n)
        self.enum: tuple[Tensor, Tensor] | None = None  # (supports, pseudo-inverse sub-blocks)
        if self.n <= _MAX_ENUM_TASKS:
            m = _subsets(self.n, q_mat.device)
            sub = q_mat * m[:, :, None] * m[:, None, :]
            self.enum = (m, torch.linalg.pinv(sub, hermitian=True, rtol=self.rtol))

    def objective(self, u: Tensor, lin: Tensor) -> Tensor:
        return 0.5 * ((u @ self.q_mat) * u).sum(-1) + (u * lin).sum(-1)

    def solve(self, lin: Tensor) -> Tensor:
        if self.enum is not None:
            return self._enumerate(lin, *self.enum)
        return torch.stack([self._active_set(row) for row in lin])

    def _enumerate(self, lin: Tensor, m: Tensor, sub_pinv: Tensor) -> Tensor:
        rhs = lin.unsqueeze(0) * m.unsqueeze(1)  # [M, B, n]
        u = -(rhs @ sub_pinv.mT) * m.unsqueeze(1)  # each candidate solves Q_SS u_S = -q_S
        u = u.clamp_min(0.0)  # feasible points: their objective bounds the optimum from above
        u = torch.cat([torch.zeros_like(u[:1]), u])  # the empty support
        return _average_ties(u, self.objective(u, lin.unsqueeze(0)), self.tie)

    def _active_set(self, lin: Tensor) -> Tensor:
        """Lawson-Hanson-type primal active-set method for a convex QP on the orthant."""
        n = self.n
        x = torch.zeros_like(lin)
        support = torch.zeros(n, dtype=torch.bool, device=lin.device)
        for _ in range(20 * n + 50):
            grad = self.q_mat @ x + lin
            outside = torch.where(support, torch.full_like(grad, math.inf), grad)
            j = int(torch.argmin(outside))
            if support.all() or bool(outside[j] >= -_KKT_TOL * (1 + grad.abs().max())):
                break
            support[j] = True
            for _ in range(n + 1):
                idx = support.nonzero().squeeze(1)
                sub = self.q_mat[idx][:, idx]
                y = torch.zeros_like(lin)
                y[idx] = -(torch.linalg.pinv(sub, hermitian=True, rtol=self.rtol) @ lin[idx])
                if bool((y[idx] > 0).all()):
                    x = y
                    break
                neg = support & (y <= 0)
                ratio = torch.where(neg, x / (x - y).clamp_min(1e-300), torch.full_like(x, 2.0))
                x = (x + ratio.min().clamp(0.0, 1.0) * (y - x)).clamp_min(0.0)
                support = support & (x > 0)
                if not bool(support.any()):
                    break
        return x


def _min_norm_weights(q: Tensor, work: torch.dtype) -> Tensor:
    """argmin over the simplex of c^T q c (exact); ``q`` need not be normalised."""
    num_tasks = q.shape[0]
    qn, _ = _normalised(q)
    if num_tasks == 2:
        denom = qn[0, 0] + qn[1, 1] - 2 * qn[0, 1]
        if float(denom) <= 0.0:  # identical gradients: every point of the segment is optimal
            return qn.new_full((2,), 0.5)
        c1 = ((qn[1, 1] - qn[0, 1]) / denom).clamp(0.0, 1.0)
        return torch.stack([c1, 1 - c1])
    return _SimplexQP(qn, work).solve()
