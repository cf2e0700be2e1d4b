r"""Projection methods: each task gradient is projected relative to the others, then summed.

PCGrad and GradVac visit the other tasks one by one and project (PCGrad: off a conflicting
gradient; GradVac: up to a running cosine target); every projected gradient stays a
combination of the original ones, so both run exactly in Gram space on a ``T x T`` coefficient
matrix. UPGrad projects every gradient onto the dual cone of all of them (a non-negative QP).
All are coefficient methods with ``*_from_gram`` twins; see :mod:`._gram` for the contract.
"""

from __future__ import annotations

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
from lightning_aw.functional._qp import _NonnegQP

__all__ = [
    "dual_proj",
    "dual_proj_from_gram",
    "gradvac",
    "gradvac_from_gram",
    "pcgrad",
    "pcgrad_from_gram",
    "upgrad",
    "upgrad_from_gram",
]

Reduction = Literal["sum", "mean"]

#: Largest cosine target GradVac aims for (the update divides by sqrt(1 - target^2)).
_GRADVAC_MAX_TARGET = 1.0 - 1e-6


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
# UPGrad (projections onto the dual cone)
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
# DualProj (the mean gradient projected onto the dual cone)
# --------------------------------------------------------------------------------------------


def _check_preference(preference: Tensor | None, num_tasks: int) -> None:
    if preference is None:
        return
    ok = isinstance(preference, Tensor) and preference.shape == (num_tasks,)
    if not ok or not bool((torch.isfinite(preference) & (preference >= 0)).all()):
        raise ValueError(
            f"Parameter `preference` should be a [T] = [{num_tasks}] tensor of finite, "
            f"non-negative weights. Found {preference!r}."
        )


def _dual_proj(q: Tensor, work: torch.dtype, preference: Tensor | None = None) -> Tensor:
    num_tasks = q.shape[0]
    _check_preference(preference, num_tasks)
    qn, _ = _normalised(q)
    if preference is None:
        mean = qn.new_full((num_tasks,), 1.0 / num_tasks)
    else:
        mean = preference.detach().to(device=qn.device, dtype=qn.dtype)
    # c = 1/T + u,  u = argmin_{u >= 0} 1/2 u^T K u + (K 1/T)^T u
    u = _NonnegQP(qn, work).solve((qn @ mean).unsqueeze(0))[0]
    return mean + u


def dual_proj(grads: Tensor, preference: Tensor | None = None) -> Tensor:
    r"""DualProj: the mean gradient projected onto the dual cone of the task gradients.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    https://arxiv.org/abs/2406.16232 (the DualProj aggregator of their library torchjd; the
    projection onto the dual cone follows Lopez-Paz & Ranzato, "Gradient Episodic Memory for
    Continual Learning", NeurIPS 2017, https://arxiv.org/abs/1706.08840, Eq. 10-11).

    The update is the vector closest to the mean gradient :math:`\bar g = \tfrac1T\sum_i g_i`
    that conflicts with no task,

    .. math::

        d = \operatorname*{argmin}_{x:\ G x \ge 0} \lVert x - \bar g\rVert^2, \qquad
        d = c^\top G, \quad c = \tfrac1T\mathbf 1 + u, \quad
        u = \operatorname*{argmin}_{u \ge 0}\ \tfrac12 u^\top G G^\top u
            + \bigl(G G^\top \tfrac1T\mathbf 1\bigr)^\top u

    (the dual problem, in Gram space: :math:`c = \operatorname{argmin}_{v \ge \mathbf 1/T}
    v^\top G G^\top v`). UPGrad (:func:`upgrad`) projects each :math:`g_i` and averages;
    DualProj projects their average once. With a ``preference`` vector :math:`p` (torchjd's
    ``pref_vector``) the combination :math:`p^\top G` is projected instead of the mean:
    :math:`c = p + u`, :math:`u = \operatorname{argmin}_{u\ge0} \tfrac12 u^\top GG^\top u +
    (GG^\top p)^\top u`.

    Conventions: by default the *mean* gradient is projected (multiply ``c`` by ``T`` for the
    sum); so :math:`c_i \ge p_i` and :math:`\sum_i c_i \ge \sum_i p_i` (not normalised), with
    :math:`c = p` exactly when :math:`p^\top G` conflicts with no task. The QP is
    solved exactly on the Gram matrix normalised by its largest diagonal entry, in float64, with
    no regularisation of the Gram matrix (torchjd regularises it, ``reg_eps``, normalises it,
    ``norm_eps``, and solves with ``quadprog``; arguments of its DualProj before v0.11, of its
    projector since): support enumeration for ``T <= 10`` (candidates whose objective is
    within :math:`16\,T\,\varepsilon` of the best, :math:`\varepsilon` the machine epsilon
    of the working dtype, are averaged, so the answer is permutation-equivariant), a
    Lawson-Hanson-type active-set method above (KKT tolerance ``1e-12``). ``c`` is invariant to
    multiplying ``grads`` by a constant; all-zero gradients give :math:`c = \mathbf 1/T`.

    Args:
        grads: ``[T, P]`` per-task gradients.
        preference: ``[T]`` non-negative weights of the projected combination (default
            :math:`\mathbf 1/T`, the mean).

    Returns:
        ``[T]`` coefficients, dtype and device of ``grads``.

    Raises:
        ValueError: on a malformed or non-finite ``grads``, or a malformed ``preference``.

    Example::

        >>> grads = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])  # the mean [-0.5, 0.5] conflicts
        >>> c = dual_proj(grads)
        >>> c
        tensor([1.0000, 0.5000])
        >>> grads @ (c @ grads)  # no task's loss increases to first order
        tensor([0.0000, 0.5000])
    """
    q = _gram64(grads)
    return _finish(_dual_proj(q, _work_dtype(grads.dtype), preference), grads)


def dual_proj_from_gram(gram: Tensor, preference: Tensor | None = None) -> Tensor:
    r""":func:`dual_proj` from the Gram matrix ``gram = grads @ grads.T`` (``[T, T]``).

    Example::

        >>> dual_proj_from_gram(torch.tensor([[1.0, -2.0], [-2.0, 5.0]]))
        tensor([1.0000, 0.5000])
    """
    q, work = _check_gram(gram)
    return _finish(_dual_proj(q, work, preference), gram)
