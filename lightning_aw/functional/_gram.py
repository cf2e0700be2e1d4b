r"""The Gram matrix of the task gradients, input validation and the shared numerics.

This module holds what every gradient-based method builds on: the Gram matrix
:math:`K = G G^\top` (:func:`gram_matrix`, formed safely at extreme scales), the checks of
``grads`` / ``gram`` and the working-dtype tolerances. The methods themselves live in
:mod:`._simplex` (MGDA, CAGrad), :mod:`._projection` (PCGrad, GradVac, UPGrad),
:mod:`._balancing` (IMTL-G, Nash-MTL, Aligned-MTL, FairGrad, ConFIG) and :mod:`._direction`
(DB-MTL, GradDrop); the exact small QPs they solve in :mod:`._qp`.

Contract shared by every *coefficient method* (MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL,
Aligned-MTL, UPGrad, GradVac, FairGrad, ConFIG): ``grads`` is a ``[T, P]`` tensor whose row ``i``
is the gradient of task ``i``'s loss with respect to the shared parameters, flattened. The result
``c`` has shape ``[T]`` and the update direction is ``c @ grads``; equivalently one ordinary
backward of ``(c.detach() * losses).sum()`` produces it (and also weights the task-specific heads
by ``c``).

All of these methods only need the ``T x T`` Gram matrix :math:`K = G G^\top`, so each has a
public ``*_from_gram`` twin that takes :math:`K` directly, e.g. an all-reduced Gram matrix under
DDP, so that every rank computes identical coefficients. (A sum or a mean over ranks makes no
difference: every method here is invariant to a global rescaling of the Gram matrix, except MGDA
with ``"l2"`` / ``"loss+"`` normalisation whose coefficients scale as :math:`1/k` and FairGrad,
whose weights scale as :math:`k^{-\alpha/(1+\alpha)}` for a Gram matrix scaled by :math:`k`. Note
that the mean of per-rank Gram matrices is not the Gram matrix of the rank-averaged gradients.)
DB-MTL and GradDrop are not coefficient methods; they return an aggregated vector in their own
documented form.

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

import torch
from torch import Tensor

__all__ = ["gram_matrix"]


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
