r"""Direction methods: the update itself, not coefficients of the current task gradients.

DB-MTL mixes past gradients through an EMA and returns the direction for the shared
parameters; GradDrop masks per-task gradients element-wise and returns the masked sum with
respect to the shared representation. Neither has a ``*_from_gram`` twin. The private
``_db_mtl_direction`` and ``_graddrop`` are their hot paths without checks or host
synchronisation, called by the callbacks in :mod:`lightning_aw.aggregation`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_aw.functional._gram import (
    _check_grads,
    _nonfinite_error,
    _shape_of,
    _work_dtype,
)

__all__ = ["db_mtl", "graddrop"]


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
