"""Per-task vectors of the loss-based weightings: validation, presence masks, masked numerics.

Every loss-based function is pure torch: no Lightning, no state, no host synchronisation. The
callbacks in :mod:`lightning_aw.weighting` keep the state and call them. They live in
:mod:`._baseline` (equal, RLW, renormalisation), :mod:`._loss_rates` (DWA, SoftAdapt),
:mod:`._learned` (uncertainty, GradNorm, IMTL-L, FAMO) and :mod:`._scalarization` (GLS, the
log loss, STCH).

Library-wide convention: unnormalised methods use weight 1 per task, so equal weighting sums the
task losses (total ``T``). Methods that renormalise (DWA, GradNorm) keep ``sum(w) = T``.

Conventions shared by the loss-based functions:

- ``losses`` is a 1-D tensor with one entry per task; ``present`` is an optional boolean mask of the
  tasks that have a loss in this batch (absent tasks contribute nothing and get weight 0).
- The methods that take logarithms (:func:`gls_loss`, :func:`scale_invariant_loss`,
  :func:`famo_loss`, :func:`stch_loss` with ``logarithmic=True``) need positive values. A
  non-positive or non-finite (NaN, ``inf``) entry is treated like an absent task: it adds nothing
  and gets weight 0 and no gradient, so the result is never NaN or infinite. Checking
  ``(losses > 0).all()`` costs a host synchronisation, so it is left to the caller; the callbacks
  check once per window and raise an error naming the task.
- "Effective weights" are :math:`\\partial \\mathcal{L} / \\partial L_i`, the factor each task's
  gradient gets in the update; for methods that are a weighted sum they are the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_vector(name: str, x: Tensor, num_tasks: int | None = None) -> None:
    if not isinstance(x, Tensor) or x.ndim != 1 or x.numel() == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"Parameter `{name}` should be a non-empty 1-D tensor with one entry per task. "
            f"Found `{name}` = {shape}."
        )
    if num_tasks is not None and x.numel() != num_tasks:
        raise ValueError(
            f"Parameter `{name}` should have {num_tasks} entries (one per task). "
            f"Found `{name}.shape = {tuple(x.shape)}`."
        )


def _mask(losses: Tensor, present: Tensor | None) -> Tensor:
    if present is None:
        return torch.ones_like(losses, dtype=torch.bool)
    if not isinstance(present, Tensor) or present.shape != losses.shape:
        shape = tuple(present.shape) if isinstance(present, Tensor) else type(present).__name__
        raise ValueError(
            f"Parameter `present` should be a boolean tensor of shape {tuple(losses.shape)}. "
            f"Found {shape}."
        )
    return present.to(device=losses.device, dtype=torch.bool)


def _positive(values: Tensor) -> Tensor:
    """Entries that are positive and finite (``+inf`` would make a log, a product or a ratio
    infinite; NaN and non-positive entries have no logarithm)."""
    return (values > 0) & torch.isfinite(values)


def _check_positive_number(name: str, value: float) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 < value < float("inf"):
        raise ValueError(f"Parameter `{name}` should be a finite number > 0. Found {value!r}.")


def _safe_log(values: Tensor, valid: Tensor) -> Tensor:
    """``log(values)`` where ``valid``, 0 elsewhere, with a zero (not NaN) gradient elsewhere."""
    return torch.where(valid, torch.log(torch.where(valid, values, torch.ones_like(values))), 0.0)


def _masked_softmax(x: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the ``valid`` entries; 0 elsewhere; all zeros when nothing is valid."""
    top = torch.where(valid, x, float("-inf")).max().detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.where(valid, torch.exp(torch.where(valid, x, top) - top), 0.0)
    total = e.sum()  # >= 1 when anything is valid (the largest term is exp(0))
    return e / torch.where(total > 0, total, torch.ones_like(total))


def _masked_logsumexp(x: Tensor, valid: Tensor) -> Tensor:
    """``log sum_{valid} exp(x_i)``; 0 when nothing is valid (finite value and gradient)."""
    top = torch.where(valid, x, float("-inf")).max().detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.where(valid, torch.exp(torch.where(valid, x, top) - top), 0.0)
    total = e.sum()
    return torch.where(total > 0, top + torch.log(torch.where(total > 0, total, 1.0)), 0.0)
