"""Weights that do not adapt to the losses: equal, random (RLW), and renormalisation.

:func:`renormalize` is the clamp-and-rescale the adaptive methods share to keep a documented
total. Conventions in :mod:`._vectors`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_aw.functional._vectors import _check_vector

__all__ = ["equal", "renormalize", "rlw"]

Distribution = Literal["normal", "uniform", "dirichlet"]
_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


def equal(num_tasks: int, *, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """Equal weights: ``w_i = 1`` for every task (the plain sum of the task losses).

    Args:
        num_tasks: number of tasks ``T`` (at least 1).
        dtype: dtype of the result (default: torch's default float dtype).
        device: device of the result.

    Returns:
        A tensor of ``T`` ones; the weights sum to ``T``.

    Example::

        >>> equal(3)
        tensor([1., 1., 1.])
    """
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"Parameter `num_tasks` should be a positive int. Found {num_tasks!r}.")
    return torch.ones(num_tasks, dtype=dtype, device=device)


def renormalize(weights: Tensor, total: float, *, min_value: float = 1e-6) -> Tensor:
    """Clamp weights to at least ``min_value`` and rescale them so they sum to ``total``.

    Non-finite entries are replaced by ``min_value`` first, so the result is always finite.

    Example::

        >>> renormalize(torch.tensor([1.0, 3.0]), total=2.0)
        tensor([0.5000, 1.5000])
    """
    _check_vector("weights", weights)
    w = torch.nan_to_num(weights, nan=min_value, posinf=min_value, neginf=min_value)
    w = w.clamp_min(min_value)
    return w * (total / w.sum())


def rlw(
    num_tasks: int,
    generator: torch.Generator | None = None,
    *,
    distribution: Distribution = "normal",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Random loss weights: one draw of RLW.

    Lin, Ye, Zhang, Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning", TMLR 2022, https://arxiv.org/abs/2111.10603.

    .. math::

        w = \operatorname{softmax}(\varepsilon), \qquad \varepsilon \sim \mathcal{N}(0, I_T)

    The weights are positive and **sum to 1** (the paper's convention, not ``T``: with a learning
    rate tuned for the plain sum, the update is about ``T`` times smaller).

    The draw is made on the generator's device (the CPU for ``generator=None``: torch's default
    generator) in float32, then moved to ``device``/``dtype``, so the same seeded generator gives
    the same weights on every machine and every DDP rank.

    Args:
        num_tasks: number of tasks ``T`` (at least 1).
        generator: the random generator (default: torch's global CPU generator).
        distribution: ``"normal"`` (default, the paper's main choice: softmax of standard normal
            draws), ``"uniform"`` (softmax of :math:`U(0, 1)` draws) or ``"dirichlet"`` (a flat
            Dirichlet draw, :math:`E_i/\sum_j E_j` with :math:`E_i \sim \operatorname{Exp}(1)`),
            three of the sampling distributions the paper compares.
        dtype: dtype of the result (default float32).
        device: device of the result (default: the generator's).

    Returns:
        Weights ``[T]`` summing to 1.

    Example::

        >>> w = rlw(3, torch.Generator().manual_seed(0))
        >>> eps = torch.randn(3, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(w, torch.softmax(eps, dim=0))
        True
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"Parameter `num_tasks` should be a positive int. Found {num_tasks!r}.")
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(
            f"Parameter `distribution` should be one of {list(_DISTRIBUTIONS)}. "
            f"Found {distribution!r}."
        )
    draw_device = generator.device if generator is not None else torch.device("cpu")
    kw = {"generator": generator, "dtype": torch.float32, "device": draw_device}
    if distribution == "normal":
        w = torch.softmax(torch.randn(num_tasks, **kw), dim=0)
    elif distribution == "uniform":
        w = torch.softmax(torch.rand(num_tasks, **kw), dim=0)
    else:
        e = torch.empty(num_tasks, dtype=torch.float32, device=draw_device)
        e = e.exponential_(1.0, generator=generator)
        w = e / e.sum()
    return w.to(device=device if device is not None else draw_device, dtype=dtype or w.dtype)
