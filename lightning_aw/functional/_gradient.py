r"""Gradient-based multi-task methods: coefficients from per-task gradients, in pure torch.

Contract shared by every *coefficient method* (MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL,
Aligned-MTL, UPGrad, GradVac): ``grads`` is a ``[T, P]`` tensor whose row ``i`` is the gradient of
task ``i``'s loss with respect to the shared parameters, flattened. The result ``c`` has shape
``[T]`` and the update direction is ``c @ grads``; equivalently one ordinary backward of
``(c.detach() * losses).sum()`` produces it (and also weights the task-specific heads by ``c``).

All of these methods only need the ``T x T`` Gram matrix :math:`K = G G^\top`, so each has a
public ``*_from_gram`` twin that takes :math:`K` directly, e.g. an all-reduced Gram matrix under
DDP, so that every rank computes identical coefficients. (A sum or a mean over ranks makes no
difference: every method here is invariant to a global rescaling of the Gram matrix, except MGDA
with ``"l2"`` / ``"loss+"`` normalisation whose coefficients scale as :math:`1/k`. Note that the
mean of per-rank Gram matrices is not the Gram matrix of the rank-averaged gradients.) DB-MTL and
GradDrop are not coefficient methods; they return an aggregated vector in their own documented
form.

Numerics, common to every function:

* The ``T x T`` problems are solved in float64 whatever the input dtype; the Gram matrix of
  ``grads`` is formed in float32 (float64 for float64 input) after an exact power-of-two rescaling,
  so gradients from ``1e-12`` to ``1e12`` neither underflow nor overflow. The result has the
  dtype and device of the input.
* "Numerically zero" eigenvalues / singular values are those below
  ``1000 * eps * largest``, where ``eps`` is the machine epsilon of the working dtype (float32 for
  float32 and 16-bit inputs, float64 for float64 inputs).
* Non-finite input raises :class:`ValueError`; no function returns NaN silently.
* The exact quadratic programs (MGDA, CAGrad, UPGrad) enumerate all supports for ``T <= 10``
  (batched, one small pseudo-inverse per support, ties averaged so the result is
  permutation-equivariant) and run a primal active-set method above that.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "aligned_mtl",
    "aligned_mtl_from_gram",
    "cagrad",
    "cagrad_from_gram",
    "db_mtl",
    "graddrop",
    "gradvac",
    "gradvac_from_gram",
    "gram_matrix",
    "imtlg",
    "imtlg_from_gram",
    "mgda",
    "mgda_from_gram",
    "nash_mtl",
    "nash_mtl_from_gram",
    "pcgrad",
    "pcgrad_from_gram",
    "upgrad",
    "upgrad_from_gram",
]

Normalization = Literal["none", "l2", "loss", "loss+"]
Reduction = Literal["sum", "mean"]
ScaleMode = Literal["min", "median", "rmse"]

#: Supports are enumerated exhaustively up to this many tasks (2^T - 1 small systems).
_MAX_ENUM_TASKS = 10
#: Tolerance of the KKT checks of the active-set methods (normalised units).
_KKT_TOL = 1e-12
#: Largest cosine target GradVac aims for (the update divides by sqrt(1 - target^2)).
_GRADVAC_MAX_TARGET = 1.0 - 1e-6


# --------------------------------------------------------------------------------------------
# Validation and the Gram matrix
# --------------------------------------------------------------------------------------------


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rank_rtol(work: torch.dtype) -> float:
    return 1000.0 * torch.finfo(work).eps


def _tie_tol(work: torch.dtype, num_tasks: int) -> float:
    """Objective gap (normalised units) below which two QP candidates count as equally good.

    About the rounding error of the Gram matrix in the working dtype: differences below it say
    nothing about which candidate is better.
    """
    return 16.0 * num_tasks * torch.finfo(work).eps


def _shape_of(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else f"a {type(x).__name__}"


def _check_grads(grads: Tensor, name: str = "grads") -> None:
    if not isinstance(grads, Tensor) or grads.ndim != 2 or min(grads.shape) < 1:
        raise ValueError(
            f"Parameter `{name}` should be a 2-D tensor [T, P] (one row per task, T >= 1, "
            f"P >= 1). Found `{name}.shape = {_shape_of(grads)}`."
        )
    if not grads.is_floating_point():
        raise ValueError(
            f"Parameter `{name}` should be a floating-point tensor. Found `{name}.dtype = "
            f"{grads.dtype}`: cast it with `.float()`."
        )


def _nonfinite_error(name: str) -> ValueError:
    return ValueError(
        f"Parameter `{name}` should contain only finite values. Found NaN or infinite entries: "
        "check the task losses (a NaN loss gives NaN gradients) or skip this step."
    )


def _gram64(grads: Tensor) -> Tensor:
    """The Gram matrix in float64, formed in the working dtype after a power-of-two rescaling."""
    _check_grads(grads)
    work = _work_dtype(grads.dtype)
    g = grads.detach().to(work)
    amax = float(g.abs().amax())
    if not math.isfinite(amax):
        raise _nonfinite_error("grads")
    num_tasks = g.shape[0]
    if amax == 0.0:
        return torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=g.device)
    exponent = math.frexp(amax)[1]
    limit = 45 if work == torch.float32 else 400
    if abs(exponent) > limit:  # rescale by an exact power of two, then undo it in float64
        g = g * (2.0**-exponent)
        factor = 4.0**exponent if exponent < 512 else math.inf
    else:
        factor = 1.0
    gram = (g @ g.T).to(torch.float64) * factor
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(
            f"Parameter `grads` is too large to form its Gram matrix (max |grads| = {amax:.3g}). "
            "Rescale the task losses."
        )
    return (gram + gram.T) * 0.5


def _check_gram(gram: Tensor) -> tuple[Tensor, torch.dtype]:
    """Validate a Gram matrix; return it symmetrised in float64 and the working dtype."""
    if not isinstance(gram, Tensor) or gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(
            "Parameter `gram` should be a square 2-D tensor [T, T] (the Gram matrix "
            f"grads @ grads.T). Found `gram.shape = {_shape_of(gram)}`."
        )
    if gram.shape[0] < 1 or not gram.is_floating_point():
        raise ValueError(
            "Parameter `gram` should be a non-empty floating-point [T, T] tensor. Found "
            f"`gram.shape = {tuple(gram.shape)}`, `gram.dtype = {gram.dtype}`."
        )
    q = gram.detach().to(torch.float64)
    if not bool(torch.isfinite(q).all()):
        raise _nonfinite_error("gram")
    if bool((q.diagonal() < 0).any()):
        raise ValueError(
            "Parameter `gram` should be a Gram matrix (non-negative diagonal: squared gradient "
            f"norms). Found diagonal {q.diagonal().tolist()}."
        )
    return (q + q.T) * 0.5, _work_dtype(gram.dtype)


def _normalised(q: Tensor) -> tuple[Tensor, float]:
    """``q / rho`` with ``rho`` the largest diagonal entry (0 when every gradient is zero)."""
    rho = float(q.diagonal().max())
    return (q / rho if rho > 0 else q), rho


def gram_matrix(grads: Tensor) -> Tensor:
    r"""The Gram matrix :math:`K = G G^\top` of the task gradients, safe for extreme scales.

    The product is formed in float32 (float64 for float64 input) after rescaling ``grads`` by an
    exact power of two when its largest entry is outside :math:`[2^{-45}, 2^{45}]`, so gradients
    of any scale from ``1e-12`` to ``1e12`` give an accurate Gram matrix. This is the statistic to
    all-reduce under DDP before calling a ``*_from_gram`` function.

    Args:
        grads: ``[T, P]`` per-task gradients.

    Returns:
        ``[T, T]`` symmetric matrix, float32 for float32 and 16-bit inputs, float64 for float64.

    Raises:
        ValueError: if ``grads`` is not a finite floating-point ``[T, P]`` tensor, or if the Gram
            matrix does not fit in the working dtype.

    Example::

        >>> gram_matrix(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
        tensor([[25.,  3.],
                [ 3.,  1.]])
    """
    work = _work_dtype(grads.dtype) if isinstance(grads, Tensor) else torch.float32
    out = _gram64(grads).to(work)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"The Gram matrix of `grads` overflows {work}. Call `gram_matrix(grads.double())`."
        )
    return out


def _finish(c: Tensor, like: Tensor) -> Tensor:
    if not bool(torch.isfinite(c).all()):  # defensive: every path below is meant to be finite
        raise ValueError("Internal error: non-finite coefficients. Please report this input.")
    return c.to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------------------------
# Exact small quadratic programs
# --------------------------------------------------------------------------------------------


def _subsets(num: int, device: torch.device) -> Tensor:
    """All non-empty subsets of ``range(num)`` as a ``[2^num - 1, num]`` float64 0/1 matrix."""
    idx = torch.arange(1, 2**num, device=device)
    bits = torch.arange(num, device=device)
    return ((idx[:, None] >> bits) & 1).to(torch.float64)


def _average_ties(x: Tensor, obj: Tensor, tol: float) -> Tensor:
    """Average of the candidates ``x[k]`` whose objective is within the tie tolerance of the best.

    The set of minimisers of a convex problem is convex, so the average is a minimiser too; taking
    all of them (not the first) keeps the answer permutation-equivariant when it is not unique.
    """
    best = obj.min(dim=0, keepdim=True).values
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
# PCGrad and GradVac (sequential projections, tracked as a T x T coefficient matrix)
# --------------------------------------------------------------------------------------------


def _random_orders(
    num_tasks: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Row ``i``: a random order of the tasks ``j != i`` (``[T, T-1]``)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(num_tasks, num_tasks, generator=generator, device=gen_device)
    keys.fill_diagonal_(2.0)  # task i itself goes last and is dropped
    return keys.argsort(dim=1)[:, : num_tasks - 1].to(device)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"Parameter `reduction` should be 'sum' or 'mean'. Found {reduction!r}.")


def _pcgrad(q: Tensor, reduction: str, generator: torch.Generator | None) -> Tensor:
    _check_reduction(reduction)
    num_tasks = q.shape[0]
    qn, _ = _normalised(q)
    coef = torch.eye(num_tasks, dtype=torch.float64, device=q.device)  # row i: p_i = coef[i] @ G
    rows = torch.arange(num_tasks, device=q.device)
    diag = qn.diagonal()
    order = _random_orders(num_tasks, generator, q.device)
    for step in range(num_tasks - 1):
        j = order[:, step]
        dots = (coef @ qn)[rows, j]  # p_i . g_j, with p_i the partially projected g_i
        conflict = (dots < 0) & (diag[j] > 0)
        step_size = torch.where(conflict, dots / diag[j].clamp_min(1e-300), torch.zeros_like(dots))
        coef[rows, j] -= step_size
    total = coef.sum(0)
    return total / num_tasks if reduction == "mean" else total


def pcgrad(
    grads: Tensor, reduction: Reduction = "sum", generator: torch.Generator | None = None
) -> Tensor:
    r"""PCGrad: project each gradient off the gradients it conflicts with, then add them up.

    Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020, https://arxiv.org/abs/2001.06782, Algorithm 1.

    For each task :math:`i`, starting from :math:`p_i = g_i` and visiting the other tasks
    :math:`j \ne i` in a random order:

    .. math::

        \text{if } p_i \cdot g_j < 0: \quad
        p_i \leftarrow p_i - \frac{p_i \cdot g_j}{\lVert g_j\rVert^2}\, g_j,
        \qquad d = \sum_i p_i \ (\text{or } \tfrac1T \textstyle\sum_i p_i).

    The projections use the *original* :math:`g_j` (as in the paper), so every :math:`p_i` is a
    combination of the :math:`g_j`: the algorithm runs exactly in Gram space by tracking a
    ``T x T`` coefficient matrix, and ``c`` is its column sum.

    Conventions: each task draws its own random order (``torch.rand`` keys with ``generator``;
    pass a seeded generator for determinism). ``reduction="sum"`` (default, the paper) or
    ``"mean"`` (``c / T``). Zero gradients are never projected onto. ``c`` is invariant to
    multiplying ``grads`` by a constant. With two tasks the result never conflicts:
    :math:`d\cdot g_1 \ge 0` and :math:`d\cdot g_2 \ge 0`.

    Args:
        grads: ``[T, P]`` per-task gradients.
        reduction: ``"sum"`` or ``"mean"`` of the projected gradients.
        generator: random generator for the visiting orders (default: torch's global one).

    Returns:
        ``[T]`` coefficients, dtype and device of ``grads``.

    Raises:
        ValueError: on a malformed or non-finite ``grads`` or an unknown ``reduction``.

    Example::

        >>> pcgrad(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
        tensor([2.0000, 1.5000])
    """
    q = _gram64(grads)
    return _finish(_pcgrad(q, reduction, generator), grads)


def pcgrad_from_gram(
    gram: Tensor, reduction: Reduction = "sum", generator: torch.Generator | None = None
) -> Tensor:
    r""":func:`pcgrad` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> pcgrad_from_gram(torch.tensor([[1.0, -1.0], [-1.0, 2.0]]))
        tensor([2.0000, 1.5000])
    """
    q, _ = _check_gram(gram)
    return _finish(_pcgrad(q, reduction, generator), gram)


def _check_targets(targets: Tensor, num_tasks: int) -> Tensor:
    if not isinstance(targets, Tensor) or targets.shape != (num_tasks, num_tasks):
        raise ValueError(
            f"Parameter `targets` should be a [T, T] = [{num_tasks}, {num_tasks}] tensor of EMA "
            f"cosine targets (start from zeros). Found `targets.shape = {_shape_of(targets)}`."
        )
    t = targets.detach().to(torch.float64)
    if not bool(torch.isfinite(t).all()) or bool((t.abs() > 1).any()):
        raise ValueError(
            "Parameter `targets` should hold cosines in [-1, 1]. Found values outside that range "
            "or non-finite ones: reset the targets to zeros."
        )
    return t


def _gradvac(
    q: Tensor, targets: Tensor, beta: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"Parameter `beta` should be in [0, 1]. Found {beta!r}.")
    num_tasks = q.shape[0]
    phi_hat = _check_targets(targets, num_tasks).to(q.device).clone()
    qn, _ = _normalised(q)
    coef = torch.eye(num_tasks, dtype=torch.float64, device=q.device)
    rows = torch.arange(num_tasks, device=q.device)
    norms = qn.diagonal().clamp_min(0.0).sqrt()
    order = _random_orders(num_tasks, generator, q.device)
    for step in range(num_tasks - 1):
        j = order[:, step]
        cq = coef @ qn
        p_norm = (cq * coef).sum(1).clamp_min(0.0).sqrt()  # ||p_i||
        g_norm = norms[j]
        valid = (p_norm > 0) & (g_norm > 0)
        denom = torch.where(valid, p_norm * g_norm, torch.ones_like(p_norm))
        phi = (cq[rows, j] / denom).clamp(-1.0, 1.0)
        target = phi_hat[rows, j].clamp(max=_GRADVAC_MAX_TARGET)
        adjust = valid & (phi < target)
        sin_t = (1 - target**2).clamp_min(0.0).sqrt()
        sin_p = (1 - phi**2).clamp_min(0.0).sqrt()
        weight = p_norm * (target * sin_p - phi * sin_t) / (g_norm.clamp_min(1e-300) * sin_t)
        coef[rows, j] += torch.where(adjust, weight, torch.zeros_like(weight))
        old = phi_hat[rows, j]
        phi_hat[rows, j] = torch.where(valid, (1 - beta) * old + beta * phi, old)
    return coef.sum(0), phi_hat


def gradvac(
    grads: Tensor,
    targets: Tensor,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Gradient Vaccine: raise pairwise gradient cosines to their running (EMA) targets.

    Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021, https://arxiv.org/abs/2010.05874,
    Algorithm 1. **Stateful**: the caller keeps the ``[T, T]`` targets :math:`\hat\phi` between
    steps (start from zeros, diagonal unused).

    For each task :math:`i`, starting from :math:`p_i = g_i` and visiting :math:`j \ne i` in a
    random order, with :math:`\phi_{ij} = \cos(p_i, g_j)` measured at that moment:

    .. math::

        \text{if } \phi_{ij} < \hat\phi_{ij}: \quad
        p_i \leftarrow p_i + \frac{\lVert p_i\rVert\,\big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
        - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}{\lVert g_j\rVert\sqrt{1-\hat\phi_{ij}^2}}\, g_j,
        \qquad
        \hat\phi_{ij} \leftarrow (1-\beta)\,\hat\phi_{ij} + \beta\,\phi_{ij},

    and :math:`d = \sum_i p_i`. After the adjustment :math:`\cos(p_i, g_j) = \hat\phi_{ij}`.

    Conventions: the EMA update is applied to every ordered pair :math:`(i, j)` at every call, with
    the cosine measured just before the pair's adjustment (the paper's Algorithm 1); pairs with a
    zero gradient have no cosine and are neither adjusted nor updated. Targets above
    :math:`1 - 10^{-6}` are treated as :math:`1 - 10^{-6}` in the formula (the stored targets are
    not clipped). Each task draws its own random visiting order from ``generator``. The sum over
    tasks is returned (no ``1/T``). Computed exactly in Gram space; ``c`` is invariant to
    multiplying ``grads`` by a constant.

    Args:
        grads: ``[T, P]`` per-task gradients.
        targets: ``[T, T]`` current EMA cosine targets :math:`\hat\phi`, in ``[-1, 1]``.
        beta: EMA rate :math:`\beta \in [0, 1]` (default 0.5; 1 keeps only the last cosine).
        generator: random generator for the visiting orders.

    Returns:
        ``(c, new_targets)``: ``[T]`` coefficients (dtype/device of ``grads``) and the updated
        ``[T, T]`` targets (dtype/device of ``targets``).

    Raises:
        ValueError: on malformed or non-finite inputs, targets outside ``[-1, 1]`` or ``beta``
            outside ``[0, 1]``.

    Example::

        >>> c, phi = gradvac(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.full((2, 2), 0.5))
        >>> c
        tensor([1.5774, 1.5774])
        >>> phi
        tensor([[0.5000, 0.2500],
                [0.2500, 0.5000]])
    """
    q = _gram64(grads)
    c, phi = _gradvac(q, targets, beta, generator)
    return _finish(c, grads), phi.to(device=targets.device, dtype=targets.dtype)


def gradvac_from_gram(
    gram: Tensor,
    targets: Tensor,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r""":func:`gradvac` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> c, phi = gradvac_from_gram(torch.eye(2), torch.zeros(2, 2))
        >>> c
        tensor([1., 1.])
    """
    q, _ = _check_gram(gram)
    c, phi = _gradvac(q, targets, beta, generator)
    return _finish(c, gram), phi.to(device=targets.device, dtype=targets.dtype)


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
        _, h_lo = weights(mu_lo)
        if h_lo <= mu_lo:
            coef = _cagrad_degenerate(qn, work, mean, radius)
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


# --------------------------------------------------------------------------------------------
# IMTL-G
# --------------------------------------------------------------------------------------------


def _imtlg(q: Tensor, work: torch.dtype) -> Tensor:
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


def imtlg(grads: Tensor) -> Tensor:
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

        >>> imtlg(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
        tensor([0.7500, 0.2500])
    """
    q = _gram64(grads)
    return _finish(_imtlg(q, _work_dtype(grads.dtype)), grads)


def imtlg_from_gram(gram: Tensor) -> Tensor:
    r""":func:`imtlg` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> imtlg_from_gram(torch.tensor([[1.0, 0.0], [0.0, 9.0]]))
        tensor([0.7500, 0.2500])
    """
    q, work = _check_gram(gram)
    return _finish(_imtlg(q, work), gram)


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
# UPGrad
# --------------------------------------------------------------------------------------------


def _upgrad(q: Tensor, work: torch.dtype) -> Tensor:
    num_tasks = q.shape[0]
    qn, _ = _normalised(q)
    eye = torch.eye(num_tasks, dtype=qn.dtype, device=qn.device)
    # w_i = e_i + u_i,  u_i = argmin_{u >= 0} 1/2 u^T K u + (K e_i)^T u
    u = _NonnegQP(qn, work).solve(qn.T.contiguous())
    return (eye + u).mean(0)


def upgrad(grads: Tensor) -> Tensor:
    r"""UPGrad: average of the projections of each gradient onto the dual cone of all of them.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    https://arxiv.org/abs/2406.16232.

    The projection of :math:`g_i` onto the dual cone :math:`\{x : G x \ge 0\}` is
    :math:`w_i^\top G` with (the dual problem, in Gram space)

    .. math::

        w_i = \operatorname*{argmin}_{v \ge e_i} v^\top G G^\top v, \qquad
        c = \frac1T \sum_i w_i, \qquad d = c^\top G .

    Each :math:`w_i` satisfies :math:`G G^\top w_i \ge 0`, so :math:`d \cdot g_j \ge 0` for every
    task: the update never conflicts. Each small non-negative QP is solved exactly (support
    enumeration for ``T <= 10``, a Lawson-Hanson-type active-set method above), with no
    regularisation of the Gram matrix.

    Conventions: the projections are averaged (the paper's uniform preference vector
    :math:`1/T`); multiply by ``T`` for a sum. Because :math:`w_i \ge e_i`, every
    :math:`c_i \ge 1/T`. ``c`` is invariant to multiplying ``grads`` by a constant; all-zero
    gradients give :math:`c = 1/T`. When the minimiser is not unique (rank-deficient Gram
    matrix) the average of the optimal supports is returned.

    Args:
        grads: ``[T, P]`` per-task gradients.

    Returns:
        ``[T]`` coefficients, dtype and device of ``grads``.

    Raises:
        ValueError: on a malformed or non-finite ``grads``.

    Example::

        >>> upgrad(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
        tensor([1.0000, 0.7500])
    """
    q = _gram64(grads)
    return _finish(_upgrad(q, _work_dtype(grads.dtype)), grads)


def upgrad_from_gram(gram: Tensor) -> Tensor:
    r""":func:`upgrad` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> upgrad_from_gram(torch.tensor([[1.0, -1.0], [-1.0, 2.0]]))
        tensor([1.0000, 0.7500])
    """
    q, work = _check_gram(gram)
    return _finish(_upgrad(q, work), gram)


# --------------------------------------------------------------------------------------------
# DB-MTL and GradDrop (not coefficient methods)
# --------------------------------------------------------------------------------------------


def db_mtl(
    grads: Tensor, losses: Tensor, ema: Tensor | None = None, beta: float = 0.9
) -> tuple[Tensor, Tensor]:
    r"""DB-MTL: balance loss scales with a log transform and gradient magnitudes by the largest.

    Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", 2023,
    https://arxiv.org/abs/2308.12029. **Stateful**: the caller keeps the ``[T, P]`` EMA.

    With :math:`\nabla \log L_i = g_i / L_i`:

    .. math::

        \hat g_i \leftarrow \beta\,\hat g_i + (1-\beta)\,\frac{g_i}{L_i}, \qquad
        d = \sum_i \frac{\max_j\lVert\hat g_j\rVert}{\lVert\hat g_i\rVert}\,\hat g_i .

    The direction mixes past gradients, so it is not a combination of the current ones: this
    function returns the direction itself (to be written into the shared parameters' ``.grad``).

    Conventions: ``ema=None`` (first step) starts the EMA at the current log-gradients (no bias
    towards zero). The rescaled gradients are summed (the paper), not averaged. A zero EMA row
    contributes nothing. ``d`` is proportional to ``grads`` and inversely proportional to the
    losses (for a fixed EMA state). The paper's constant ``beta`` is used (LibMTL's optional
    ``beta / t**sigma`` schedule is not). The EMA is kept in float32 for 16-bit ``grads``. For the
    task-specific parameters the paper simply backpropagates :math:`\sum_i \log L_i`.

    Args:
        grads: ``[T, P]`` per-task gradients :math:`g_i = \nabla L_i`.
        losses: ``[T]`` positive task losses :math:`L_i`.
        ema: ``[T, P]`` previous :math:`\hat g`, or ``None`` on the first step.
        beta: EMA factor :math:`\beta \in [0, 1)` (default 0.9).

    Returns:
        ``(d, new_ema)``: the ``[P]`` direction (dtype and device of ``grads``) and the ``[T, P]``
        updated EMA.

    Raises:
        ValueError: on malformed or non-finite inputs, non-positive losses, or ``beta`` outside
            ``[0, 1)``.

    Example::

        >>> d, ema = db_mtl(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 4.0]))
        >>> d
        tensor([2., 2.])
    """
    _check_grads(grads)
    num_tasks = grads.shape[0]
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"Parameter `beta` should be in [0, 1). Found {beta!r}.")
    if not isinstance(losses, Tensor) or losses.shape != (num_tasks,):
        raise ValueError(
            f"Parameter `losses` should be a [T] = [{num_tasks}] tensor. Found "
            f"`losses.shape = {_shape_of(losses)}`."
        )
    work = _work_dtype(grads.dtype)
    lv = losses.detach().to(device=grads.device, dtype=work)
    if not bool(torch.isfinite(lv).all() & (lv > 0).all()):
        raise ValueError(
            f"Parameter `losses` should be positive and finite (DB-MTL takes log L). Found "
            f"{lv.tolist()}."
        )
    g = grads.detach().to(work)
    if not bool(torch.isfinite(g).all()):
        raise _nonfinite_error("grads")
    log_grads = g / lv[:, None]
    if ema is None:
        new_ema = log_grads
    else:
        if not isinstance(ema, Tensor) or ema.shape != grads.shape:
            raise ValueError(
                f"Parameter `ema` should have the shape of `grads` {tuple(grads.shape)}. Found "
                f"`ema.shape = {_shape_of(ema)}`: pass None on the first step."
            )
        prev = ema.detach().to(device=grads.device, dtype=work)
        if not bool(torch.isfinite(prev).all()):
            raise _nonfinite_error("ema")
        new_ema = beta * prev + (1 - beta) * log_grads
    direction = _db_mtl_direction(new_ema)
    if not bool(torch.isfinite(direction).all()):
        raise ValueError(
            "DB-MTL direction overflowed: the log-gradients g_i / L_i are too large for "
            f"{work}. Use float64 gradients or larger losses."
        )
    return direction.to(grads.dtype), new_ema


def _db_mtl_direction(ema: Tensor) -> Tensor:
    """DB-MTL's direction from the EMA of the log-gradients ``[T, P]``: every row rescaled to the
    largest row norm, then summed. No checks and no host synchronisation (the callback's path)."""
    tiny = torch.finfo(ema.dtype).tiny
    amax = ema.abs().amax(dim=1, keepdim=True)  # rescaled norms: safe for any scale
    norms = (ema / amax.clamp_min(tiny)).norm(dim=1) * amax.squeeze(1)
    scale = torch.where(norms > 0, norms.max() / norms.clamp_min(tiny), 0.0)
    return scale @ ema


def graddrop(
    grads_repr: Tensor,
    leak: float | Tensor = 0.0,
    generator: torch.Generator | None = None,
    reduce_dims: tuple[int, ...] = (),
) -> Tensor:
    r"""GradDrop: keep, per element, only the gradients of the sign drawn by sign purity.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout", NeurIPS 2020,
    https://arxiv.org/abs/2010.06808.

    With per-task gradients :math:`\nabla_i` with respect to a shared representation, and
    :math:`U \sim \mathcal U(0, 1)` drawn once per element (shared by all tasks):

    .. math::

        \mathcal P = \tfrac12\Big(1 + \frac{\sum_i \nabla_i}{\sum_i \lvert\nabla_i\rvert}\Big),
        \quad
        M_i = \mathbb 1[\mathcal P > U]\,\mathbb 1[\nabla_i > 0]
            + \mathbb 1[\mathcal P \le U]\,\mathbb 1[\nabla_i < 0],
        \quad
        \nabla = \sum_i \big(\ell_i + (1-\ell_i) M_i\big)\,\nabla_i .

    This is an element-wise mask, not coefficients: the function returns the masked, summed
    gradient with respect to the representation (shape ``grads_repr.shape[1:]``), to be
    backpropagated through the shared trunk (e.g. ``representation.backward(result)``).

    Conventions: :math:`\mathcal P = 1/2` where every task's gradient is zero. ``leak``
    :math:`\ell_i \in [0, 1]` (scalar or one per task; 0 = the paper's default, 1 = plain sum).
    ``reduce_dims``: dimensions of the per-task tensor summed before computing :math:`\mathcal P`
    (the paper sums over the batch dimension, e.g. ``reduce_dims=(0,)``); :math:`U` is then drawn
    on the reduced shape and the mask broadcast back. Invariant to multiplying ``grads_repr`` by a
    positive constant up to that same factor. Use ``generator`` for determinism.

    Args:
        grads_repr: ``[T, ...]`` per-task gradients with respect to the shared representation.
        leak: :math:`\ell`, a float or a ``[T]`` tensor in ``[0, 1]``.
        generator: random generator for :math:`U`.
        reduce_dims: dimensions (of ``grads_repr[i]``, 0-based) summed before computing
            :math:`\mathcal P`.

    Returns:
        The masked aggregated gradient, shape ``grads_repr.shape[1:]``, dtype and device of
        ``grads_repr``.

    Raises:
        ValueError: on malformed or non-finite inputs or a leak outside ``[0, 1]``.

    Example::

        >>> g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> graddrop(g)
        tensor([4., 6.])
    """
    if not isinstance(grads_repr, Tensor) or grads_repr.ndim < 2 or grads_repr.shape[0] < 1:
        raise ValueError(
            "Parameter `grads_repr` should be a [T, ...] tensor with at least 2 dimensions (one "
            f"slice per task). Found `grads_repr.shape = {_shape_of(grads_repr)}`."
        )
    if not grads_repr.is_floating_point():
        raise ValueError(
            f"Parameter `grads_repr` should be floating-point. Found {grads_repr.dtype}."
        )
    num_tasks, inner = grads_repr.shape[0], grads_repr.ndim - 1
    dims = tuple(int(d) for d in reduce_dims)
    if any(not -inner <= d < inner for d in dims):
        raise ValueError(
            f"Parameter `reduce_dims` should index the {inner} dimensions of `grads_repr[i]`. "
            f"Found {reduce_dims!r}."
        )
    work = _work_dtype(grads_repr.dtype)
    g = grads_repr.detach().to(work)
    if not bool(torch.isfinite(g).all()):
        raise _nonfinite_error("grads_repr")
    leak_t = torch.as_tensor(leak, dtype=work, device=g.device).detach()
    if leak_t.ndim > 1 or (leak_t.ndim == 1 and leak_t.numel() != num_tasks):
        raise ValueError(
            f"Parameter `leak` should be a float or a [T] = [{num_tasks}] tensor. Found "
            f"`leak.shape = {tuple(leak_t.shape)}`."
        )
    if not bool(((leak_t >= 0) & (leak_t <= 1)).all()):
        raise ValueError(f"Parameter `leak` should be in [0, 1]. Found {leak_t.tolist()}.")
    return _graddrop(g, leak_t, generator, dims).to(grads_repr.dtype)


def _graddrop(
    g: Tensor, leak_t: Tensor, generator: torch.Generator | None, dims: tuple[int, ...] = ()
) -> Tensor:
    """:func:`graddrop` on validated inputs (finite ``g`` in the working dtype, ``leak_t`` in
    ``[0, 1]``): no host synchronisation, for the callback's hot path."""
    num_tasks, inner = g.shape[0], g.ndim - 1
    work = g.dtype
    leak_t = leak_t.to(dtype=work, device=g.device)
    leak_t = leak_t.expand(num_tasks).reshape(num_tasks, *([1] * inner))
    summed = g.sum(dim=tuple(d % inner + 1 for d in dims), keepdim=True) if dims else g
    total, absolute = summed.sum(0), summed.abs().sum(0)
    purity = 0.5 * (1 + torch.where(absolute > 0, total / absolute.clamp_min(1e-300), 0.0))
    gen_device = generator.device if generator is not None else g.device
    uniform = torch.rand(purity.shape, generator=generator, device=gen_device, dtype=work)
    positive = (purity > uniform.to(g.device)).unsqueeze(0)
    mask = (positive & (g > 0)) | (~positive & (g < 0))
    return ((leak_t + (1 - leak_t) * mask.to(work)) * g).sum(0)
