"""Composable weight transforms, applied to the weights of any weighting method.

In the spirit of optax's ``chain``: each transform maps the method's weights to the weights that
are applied, keeps its own small state (saved in the callback's checkpoint state) and composes::

    from lightning_aw import DWA, GradNorm
    from lightning_aw.transforms import EMA, Clamp, Normalize, Warmup

    weighting = GradNorm(alpha=1.5).transformed(Warmup(200), EMA(0.9), Clamp(0.1, 10.0))

Semantics, for every method:

- The transforms run each training step on the weights the method produced for that step, in
  order; the result is what multiplies the task losses (for gradient methods: the coefficients
  applied to the task gradients) and what is logged as ``weights/<task>``.
- Stateful transforms (:class:`EMA`) advance once per optimizer step, so every micro-batch of an
  accumulation window sees the same state.
- Methods whose loss is more than a weighted sum keep their extra terms: with uncertainty
  weighting the log-variances still learn from their own regulariser, only the weights the
  network's gradient sees are transformed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_aw._utils import Stateful

__all__ = ["EMA", "Chain", "Clamp", "Normalize", "Warmup", "WeightTransform", "chain"]


class WeightTransform(Stateful):
    """Base class: ``apply(weights, step)`` returns the transformed weights.

    ``step`` is the number of optimizer steps taken so far. A stateful transform records what it
    produced in :meth:`apply` as pending and makes it its state in :meth:`commit`, which runs once
    per optimizer step (so all micro-batches of an accumulation window see the same state); it
    also implements :meth:`state_dict` / :meth:`load_state_dict`.

    Example::

        >>> import torch
        >>> from lightning_aw.transforms import WeightTransform
        >>> class Square(WeightTransform):  # a stateless transform
        ...     def apply(self, weights, step):
        ...         return weights * weights
        ...
        >>> Square().apply(torch.tensor([1.0, 3.0]), step=0)
        tensor([1., 9.])
    """

    def apply(self, weights: Tensor, step: int) -> Tensor:
        raise NotImplementedError

    def reset(self, num_tasks: int) -> None:
        """Called once, when the weighting is set up for ``num_tasks`` tasks."""

    def commit(self) -> None:
        """Called once per optimizer step: the last :meth:`apply` becomes the state."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hparams().items())
        return f"{type(self).__name__}({args})"

    def _hparams(self) -> dict[str, Any]:
        return {}


class Chain(WeightTransform):
    """Apply several transforms in order (see :func:`chain`).

    Example::

        >>> import torch
        >>> from lightning_aw.transforms import Chain, Clamp, Normalize
        >>> t = Chain(Clamp(0.5, 2.0), Normalize(total=1.0))
        >>> t.apply(torch.tensor([0.1, 1.0, 5.0]), step=0)
        tensor([0.1429, 0.2857, 0.5714])
    """

    def __init__(self, *transforms: WeightTransform) -> None:
        for t in transforms:
            if not isinstance(t, WeightTransform):
                raise TypeError(
                    f"chain() takes WeightTransform objects (EMA, Clamp, Warmup, Normalize, ...); "
                    f"got a {type(t).__name__}."
                )
        self.transforms: tuple[WeightTransform, ...] = transforms

    def apply(self, weights: Tensor, step: int) -> Tensor:
        for t in self.transforms:
            weights = t.apply(weights, step)
        return weights

    def reset(self, num_tasks: int) -> None:
        for t in self.transforms:
            t.reset(num_tasks)

    def commit(self) -> None:
        for t in self.transforms:
            t.commit()

    def state_dict(self) -> dict[str, Any]:
        return {str(i): t.state_dict() for i, t in enumerate(self.transforms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, t in enumerate(self.transforms):
            t.load_state_dict(state.get(str(i), {}))

    def to(self, device: torch.device) -> None:
        for t in self.transforms:
            t.to(device)

    def __repr__(self) -> str:
        return f"chain({', '.join(repr(t) for t in self.transforms)})"


def chain(*transforms: WeightTransform) -> Chain:
    """Compose transforms, applied left to right.

    Example::

        >>> import torch
        >>> from lightning_aw.transforms import Clamp, Warmup, chain
        >>> t = chain(Warmup(100), Clamp(0.1, 10.0))
        >>> t
        chain(Warmup(steps=100), Clamp(min=0.1, max=10.0))
        >>> t.apply(torch.tensor([0.0, 20.0]), step=50)  # halfway from 1, then clamped
        tensor([ 0.5000, 10.0000])
    """
    return Chain(*transforms)


class EMA(WeightTransform):
    r"""Exponential smoothing of the weights across optimizer steps.

    .. math:: \bar w_t = \beta\,\bar w_{t-1} + (1-\beta)\,w_t, \qquad \bar w_0 = w_0

    The smoothed weights keep the total of the inputs when every input has the same total.

    Conventions: no bias correction, the average starts at the first weights
    (:math:`\bar w_0 = w_0`); it advances once per optimizer step (with gradient accumulation
    every micro-batch is smoothed against the same average, and the last micro-batch's weights
    enter it); it is rolled back with the method's state on a step the fp16 GradScaler or
    ``on_nonfinite="skip"`` skips, and saved in checkpoints. It smooths the weights the method
    returns, after the method's own normalisation; for a gradient method those are the
    coefficients applied to the task gradients, and the smoothed ones are both applied and
    logged.

    **CR-MOGM.** Around a gradient method this is the correlation-reduced stochastic
    multi-objective gradient manipulation of Zhou, Zhang, Jiang, Zhong, Gu & Zhu, "On the
    Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022,
    https://papers.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html:
    the composite weights are the exponential
    average :math:`\lambda_t = \alpha\lambda_{t-1} + (1-\alpha)\hat\lambda_t` of the
    method's weights :math:`\hat\lambda_t`, so ``MGDA().transformed(EMA(decay=alpha))`` is
    CR-MOGM around MGDA (any method: ``PCGrad``, ``CAGrad``, ...; torchjd's
    ``CRMOGMWeighting`` wraps a weighting the same way). The test suite pins it
    against a hand-written recurrence of :math:`\lambda_t` over several steps. Two conventions
    the paper may set differently, not checked against its text: :math:`\lambda_1 =
    \hat\lambda_1` here (no separate :math:`\lambda_0`), and a constant :math:`\alpha` (no
    schedule).

    Args:
        decay: :math:`\beta \in [0, 1)` (0 = no smoothing); CR-MOGM's :math:`\alpha`.

    Example::

        >>> import torch
        >>> from lightning_aw.transforms import EMA
        >>> ema = EMA(0.9)
        >>> ema.reset(2)
        >>> ema.apply(torch.tensor([1.0, 3.0]), step=0)  # first step: the weights themselves
        tensor([1., 3.])
        >>> ema.commit()
        >>> ema.apply(torch.tensor([2.0, 2.0]), step=1)  # 0.9 * previous + 0.1 * new
        tensor([1.1000, 2.9000])
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"Parameter `decay` should be in [0, 1). Found {decay!r}.")
        self.decay = float(decay)
        self.average: Tensor | None = None
        self._pending: Tensor | None = None

    def _hparams(self) -> dict[str, Any]:
        return {"decay": self.decay}

    def reset(self, num_tasks: int) -> None:
        self.average = self._pending = None

    def apply(self, weights: Tensor, step: int) -> Tensor:
        out = weights if self.average is None else torch.lerp(weights, self.average, self.decay)
        self._pending = out.detach()
        return out

    def commit(self) -> None:
        if self._pending is not None:
            self.average = self._pending

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = state.get("average")

    def to(self, device: torch.device) -> None:
        if self.average is not None:
            self.average = self.average.to(device)
        self._pending = None


class Clamp(WeightTransform):
    """Clamp every weight to ``[min, max]``.

    Args:
        min: lower bound (``None``: none).
        max: upper bound (``None``: none).

    Example::

        >>> import torch
        >>> from lightning_aw.transforms import Clamp
        >>> Clamp(0.5, 2.0).apply(torch.tensor([0.1, 1.0, 5.0]), step=0)
        tensor([0.5000, 1.0000, 2.0000])
    """

    def __init__(self, min: float | None = None, max: float | None = None) -> None:
        if min is None and max is None:
            raise ValueError("Clamp needs `min`, `max` or both.")
        if min is not None and max is not None and not min <= max:
            raise ValueError(f"Clamp needs `min <= max`. Found min={min!r}, max={max!r}.")
        self.min, self.max = min, max

    def _hparams(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max}

    def apply(self, weights: Tensor, step: int) -> Tensor:
        return weights.clamp(self.min, self.max)


class Warmup(WeightTransform):
    r"""Start from equal weights and blend linearly into the method's weights.

    .. math:: w'_t = (1 - a_t)\,\mathbf 1 + a_t\, w_t, \qquad a_t = \min(1, t / \text{steps})

    with :math:`t` the optimizer steps taken. Equal weights are 1 per task (the library's
    convention); follow with :class:`Normalize` for methods whose weights sum to 1.

    Args:
        steps: length of the warm-up in optimizer steps (> 0).

    Example::

        >>> import torch
        >>> from lightning_aw.transforms import Warmup
        >>> Warmup(10).apply(torch.tensor([0.0, 2.0]), step=5)  # halfway between 1 and the weights
        tensor([0.5000, 1.5000])
    """

    def __init__(self, steps: int) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"Parameter `steps` should be an int >= 1. Found {steps!r}.")
        self.steps = steps

    def _hparams(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def apply(self, weights: Tensor, step: int) -> Tensor:
        a = min(1.0, step / self.steps)
        return torch.lerp(torch.ones_like(weights), weights, a)


class Normalize(WeightTransform):
    """Rescale the weights to sum to ``total`` (``"T"``: the number of tasks).

    Args:
        total: ``"T"`` or a positive number.

    Example::

        >>> import torch
        >>> from lightning_aw.transforms import Normalize
        >>> Normalize(total=1.0).apply(torch.tensor([1.0, 3.0]), step=0)
        tensor([0.2500, 0.7500])
    """

    def __init__(self, total: str | float = "T") -> None:
        if total != "T" and not (isinstance(total, (int, float)) and total > 0):
            raise ValueError(f"Parameter `total` should be 'T' or > 0. Found {total!r}.")
        self.total = total

    def _hparams(self) -> dict[str, Any]:
        return {"total": self.total}

    def apply(self, weights: Tensor, step: int) -> Tensor:
        target = float(weights.numel()) if self.total == "T" else float(self.total)
        s = weights.sum()
        ok = torch.isfinite(s) & (s.abs() > torch.finfo(weights.dtype).tiny)
        return torch.where(ok, weights * (target / torch.where(ok, s, 1.0)), weights)


def as_transform(transforms: Sequence[WeightTransform]) -> WeightTransform | None:
    """One transform from a sequence (``None`` for an empty one)."""
    if not transforms:
        return None
    if len(transforms) == 1:
        if not isinstance(transforms[0], WeightTransform):
            raise TypeError(
                f"Expected a WeightTransform (EMA, Clamp, Warmup, Normalize, chain(...)); got a "
                f"{type(transforms[0]).__name__}."
            )
        return transforms[0]
    return Chain(*transforms)
