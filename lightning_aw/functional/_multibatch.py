r"""Multi-batch stochastic methods: weights updated from two independent gradient samples.

SDMGrad and MoDo update their simplex weights with an *unbiased* estimate of the gradient of
:math:`\tfrac12\lVert G\lambda\rVert^2`: the per-task gradients of one mini-batch times those of
another, independent one. Everything here works on that cross Gram matrix

.. math::

    A = G_1 G_2^\top, \qquad A_{ij} = \langle g_i(\xi_1), g_j(\xi_2)\rangle,

``[T, T]``, not symmetric (the callbacks form it from two disjoint parts of the step's batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_aw.functional._adaptive import _project_simplex

__all__ = ["modo", "sdmgrad"]


def _check(cross_gram: Tensor, weights: Tensor) -> None:
    if cross_gram.dim() != 2 or cross_gram.shape[0] != cross_gram.shape[1]:
        raise ValueError(
            "Parameter `cross_gram` should be a square [T, T] matrix. "
            f"Found `cross_gram.shape = {tuple(cross_gram.shape)}`."
        )
    if weights.shape != (cross_gram.shape[0],):
        raise ValueError(
            f"Parameter `weights` should have shape [{cross_gram.shape[0]}] (one per task). "
            f"Found `weights.shape = {tuple(weights.shape)}`."
        )
    if not bool(torch.isfinite(cross_gram).all()):
        raise ValueError("Parameter `cross_gram` should be finite. Found NaN or inf entries.")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(
            f"Parameter `weights` should be finite and non-negative. Found {weights.tolist()}."
        )


def modo(cross_gram: Tensor, weights: Tensor, gamma: float = 0.1, rho: float = 0.0) -> Tensor:
    r"""One MoDo update of the simplex weights (Chen, Fernando, Ying & Chen, NeurIPS 2023,
    https://arxiv.org/abs/2305.20057, Alg. 1):

    .. math::

        \lambda \leftarrow \Pi_\Delta\bigl(\lambda - \gamma\,(G_1 G_2^\top \lambda
        + \rho\,\lambda)\bigr),

    with ``cross_gram`` :math:`= G_1 G_2^\top` from two independent mini-batches (an unbiased
    estimate of the gradient of :math:`\tfrac12\lVert G\lambda\rVert^2`), ``rho`` the
    regularisation of the authors' implementation (0: the algorithm as analysed).

    Args:
        cross_gram: ``[T, T]`` matrix :math:`A_{ij} = \langle g_i(\xi_1), g_j(\xi_2)\rangle`.
        weights: the current :math:`\lambda` ``[T]`` on the simplex.
        gamma: step size :math:`\gamma > 0` of the weights.
        rho: regularisation :math:`\rho \ge 0`.

    Returns:
        The new :math:`\lambda` ``[T]`` (non-negative, sums to 1), in ``weights``' dtype.

    Raises:
        ValueError: ``cross_gram`` is not a finite ``[T, T]`` matrix, or ``weights`` not a
            finite non-negative ``[T]`` vector.

    Example::

        >>> import torch
        >>> from lightning_aw.functional import modo
        >>> A = torch.tensor([[4.0, 0.0], [0.0, 1.0]])  # orthogonal tasks, |g_1| = 2, |g_2| = 1
        >>> modo(A, torch.tensor([0.5, 0.5]), gamma=0.1)  # weight moves to the smaller gradient
        tensor([0.4250, 0.5750])
    """
    _check(cross_gram, weights)
    a = cross_gram.to(weights.dtype)
    return _project_simplex(weights - gamma * (a @ weights + rho * weights))


def sdmgrad(
    cross_gram: Tensor,
    weights: Tensor,
    lam: float = 0.6,
    lr: float = 10.0,
    momentum: float = 0.5,
    niter: int = 20,
    rho: float = 0.0,
    normalize: bool = True,
) -> Tensor:
    r"""SDMGrad's update of the simplex weights (Xiao, Ban & Ji, NeurIPS 2023,
    https://arxiv.org/abs/2305.18409, Alg. 1): ``niter`` projected stochastic gradient steps on

    .. math::

        \min_{w \in \Delta}\ \tfrac12\lVert G w + \lambda g_0\rVert^2 + \tfrac{\rho}{2}\lVert w
        \rVert^2, \qquad g_0 = \tfrac1T G\mathbf 1,

    with the unbiased gradient estimate :math:`G_1^\top(G_2 w + \lambda g_{0,2}) + \rho w =
    A w + \tfrac{\lambda}{T} A\mathbf 1 + \rho w` from two independent mini-batches
    (:math:`A = G_1 G_2^\top`), heavy-ball momentum ``momentum`` (restarted at every call) and
    step ``lr``. With ``normalize`` the matrix is first divided by the squared mean of
    :math:`\sqrt{\max(A_{ii}, 0) + 10^{-4}}` (the authors' implementation: a scale-free step).

    Args:
        cross_gram: ``[T, T]`` matrix :math:`A_{ij} = \langle g_i(\xi_1), g_j(\xi_2)\rangle`.
        weights: the current :math:`w` ``[T]`` on the simplex (the warm start).
        lam: :math:`\lambda \ge 0`, the pull towards the average gradient :math:`g_0`.
        lr: step size of the inner loop.
        momentum: heavy-ball momentum of the inner loop in ``[0, 1)`` (0: plain projected SGD).
        niter: number of inner steps (:math:`S`).
        rho: regularisation :math:`\rho \ge 0`.
        normalize: divide ``cross_gram`` by its scale first.

    Returns:
        The new :math:`w` ``[T]`` (non-negative, sums to 1), in ``weights``' dtype. The update
        direction is :math:`(G_3 w + \lambda g_{0,3}) / (1 + \lambda)` on a third batch.

    Raises:
        ValueError: ``cross_gram`` is not a finite ``[T, T]`` matrix, or ``weights`` not a
            finite non-negative ``[T]`` vector.

    Example::

        >>> import torch
        >>> from lightning_aw.functional import sdmgrad
        >>> A = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
        >>> w = sdmgrad(A, torch.tensor([0.5, 0.5]), lam=0.0, niter=200, momentum=0.0, lr=0.1)
        >>> w  # lam = 0: MGDA's min-norm weights, 1/|g_i|^2 normalised
        tensor([0.2000, 0.8000])
    """
    _check(cross_gram, weights)
    a = cross_gram.to(weights.dtype)
    if normalize:
        scale = torch.sqrt(a.diagonal().clamp_min(0.0) + 1e-4).mean()
        a = a / scale.square()
    pull = lam * a.mean(dim=1)  # lambda * G_1^T g_0(xi_2), with g_0 the mean task gradient
    w = weights
    buf = torch.zeros_like(w)
    for s in range(niter):
        grad = a @ w + pull + rho * w
        buf = grad if s == 0 else momentum * buf + grad
        w = _project_simplex(w - lr * buf)
    return w
