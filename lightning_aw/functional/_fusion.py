r"""Weights over several learners from their errors: SAMME boosting and Hedge.

Both are pure torch: the edge cases of SAMME are selected with :func:`torch.where` (no branch on
a value), so the functions run unchanged on any device and in float64; only the argument checks
read values on the host.
:class:`lightning_aw.fusion.SAMMEWeights`, :class:`lightning_aw.fusion.HedgeWeights` and
:class:`lightning_aw.fusion.Boosting` are their Lightning wrappers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["hedge", "samme", "samme_alpha"]


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"Parameter `num_classes` should be an int >= 2 (SAMME's K). Found {num_classes!r}."
        )


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Parameter `{name}` should be a number. Found {type(value).__name__}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Parameter `{name}` should be finite and > 0. Found {value!r}.")


def _check_weights(name: str, weights: Tensor) -> None:
    if not isinstance(weights, Tensor):
        raise TypeError(f"Parameter `{name}` should be a Tensor. Found {type(weights).__name__}.")
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(
            f"Parameter `{name}` should be a non-empty 1-D tensor. "
            f"Found `{name}.shape = {tuple(weights.shape)}`."
        )
    if not weights.is_floating_point():
        raise TypeError(f"Parameter `{name}` should be floating point. Found {weights.dtype}.")
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bool(bad.any()):
        raise ValueError(
            f"Parameter `{name}` should hold finite, non-negative weights. Found "
            f"{weights[bad][:3].tolist()} at indices {bad.nonzero().flatten()[:3].tolist()}."
        )
    if not bool(weights.sum() > 0):
        raise ValueError(f"Parameter `{name}` should have a positive sum. Found all zeros.")


def samme_alpha(error: Tensor, num_classes: int, learning_rate: float = 1.0) -> Tensor:
    r"""The SAMME learner weight of a weighted error (elementwise, branch-free).

    Zhu, Zou, Rosset, Hastie, "Multi-class AdaBoost", Statistics and Its Interface 2009,
    https://doi.org/10.4310/SII.2009.v2.n3.a8.

    .. math::

        \alpha = \eta \left(\ln\frac{1 - \varepsilon}{\varepsilon} + \ln(K - 1)\right)

    with scikit-learn's (``AdaBoostClassifier``) conventions at the edges: ``ε = 0`` (a perfect
    learner; boosting stops after it) gives ``α = 1``; ``ε ≥ 1 - 1/K`` (no better than chance;
    scikit-learn discards the learner and stops) gives ``α = 0``, i.e. no vote.

    Args:
        error: weighted error rates in ``[0, 1]`` (any shape; one per learner).
        num_classes: number of classes ``K >= 2``.
        learning_rate: the shrinkage ``η > 0``.

    Returns:
        ``α``, same shape, dtype and device as ``error``; always finite and ``>= 0``.

    Example::

        >>> samme_alpha(torch.tensor([0.0, 0.25, 0.7]), num_classes=3)
        tensor([1.0000, 1.7918, 0.0000])
    """
    _check_num_classes(num_classes)
    _check_positive("learning_rate", learning_rate)
    if not isinstance(error, Tensor) or not error.is_floating_point():
        raise TypeError("Parameter `error` should be a floating point Tensor.")
    if bool(((error < 0) | (error > 1) | ~torch.isfinite(error)).any()):
        raise ValueError(f"Parameter `error` should lie in [0, 1]. Found {error.tolist()}.")
    chance = 1.0 - 1.0 / num_classes
    safe = error.clamp(min=torch.finfo(error.dtype).tiny, max=chance)  # finite logs
    alpha = learning_rate * (torch.log((1.0 - safe) / safe) + math.log(num_classes - 1.0))
    alpha = torch.where(error >= chance, torch.zeros_like(alpha), alpha)
    return torch.where(error <= 0, torch.ones_like(alpha), alpha)


def samme(
    sample_weight: Tensor,
    incorrect: Tensor,
    num_classes: int,
    learning_rate: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One discrete SAMME boosting step, exactly as scikit-learn's ``AdaBoostClassifier`` does.

    Zhu, Zou, Rosset, Hastie, "Multi-class AdaBoost", Statistics and Its Interface 2009,
    https://doi.org/10.4310/SII.2009.v2.n3.a8.

    With ``w`` the sample weights normalised to sum 1 and every positive weight raised to at
    least the dtype's machine epsilon (scikit-learn's guard against vanishing weights; zero
    weights stay zero), and ``I_i = 1`` where the learner misclassified sample ``i``:

    .. math::

        \varepsilon = \frac{\sum_i w_i I_i}{\sum_i w_i}, \qquad
        \alpha = \eta \left(\ln\frac{1 - \varepsilon}{\varepsilon} + \ln(K - 1)\right), \qquad
        w_i \leftarrow \frac{w_i\, e^{\alpha I_i [w_i > 0]}}{\sum_j w_j\, e^{\alpha I_j [w_j > 0]}}

    Edge cases, as scikit-learn: ``ε = 0`` returns ``α = 1`` and the weights unchanged
    (scikit-learn keeps the perfect learner and stops boosting); ``ε ≥ 1 - 1/K`` returns
    ``α = 0`` and the weights unchanged (scikit-learn discards the learner and stops; with
    ``α = 0`` it has no vote). The returned ``error`` is the measured ``ε`` in both cases. The
    caller decides whether to stop (scikit-learn's ``AdaBoostClassifier`` does).

    scikit-learn skips the weight update after its last learner; this function always updates.

    Args:
        sample_weight: ``[N]`` non-negative weights with a positive sum (need not be normalised).
        incorrect: ``[N]`` bool (or 0/1) mask of the misclassified samples.
        num_classes: number of classes ``K >= 2``.
        learning_rate: the shrinkage ``η > 0`` (scikit-learn's ``learning_rate``).

    Returns:
        ``(new_sample_weight, alpha, error)``: the ``[N]`` weights (sum 1) and two 0-d tensors, all
        in ``sample_weight``'s dtype and device.

    Raises:
        ValueError: shapes differ, weights negative/non-finite/all zero, ``incorrect`` not 0/1,
            ``num_classes < 2`` or ``learning_rate <= 0``.

    Example::

        >>> w, alpha, err = samme(torch.ones(4, dtype=torch.float64),
        ...                       torch.tensor([True, False, False, False]), num_classes=2)
        >>> err.item(), round(alpha.item(), 4), w
        (0.25, 1.0986, tensor([0.5000, 0.1667, 0.1667, 0.1667], dtype=torch.float64))
    """
    _check_weights("sample_weight", sample_weight)
    _check_num_classes(num_classes)
    _check_positive("learning_rate", learning_rate)
    if not isinstance(incorrect, Tensor):
        raise TypeError(f"Parameter `incorrect` should be a Tensor. Found {type(incorrect)}.")
    if incorrect.shape != sample_weight.shape:
        raise ValueError(
            "Parameters `incorrect` and `sample_weight` should have the same shape [N]. Found "
            f"`incorrect.shape = {tuple(incorrect.shape)}` and "
            f"`sample_weight.shape = {tuple(sample_weight.shape)}`."
        )
    if incorrect.dtype != torch.bool and bool(((incorrect != 0) & (incorrect != 1)).any()):
        raise ValueError("Parameter `incorrect` should be a bool or 0/1 tensor.")
    inc = incorrect.to(device=sample_weight.device, dtype=sample_weight.dtype)
    positive = sample_weight > 0
    w = sample_weight / sample_weight.sum()
    w = torch.where(positive, w.clamp_min(torch.finfo(w.dtype).eps), torch.zeros_like(w))
    error = (w * inc).sum() / w.sum()
    alpha = samme_alpha(error, num_classes, learning_rate)
    chance = 1.0 - 1.0 / num_classes
    boosting = (error > 0) & (error < chance)
    # exp(α) can overflow only for a huge learning rate; zero weights stay exactly zero
    boosted = torch.where(positive, w * torch.exp(alpha * inc), torch.zeros_like(w))
    new = torch.where(boosting, boosted, w)
    return new / new.sum(), alpha, error


def hedge(weights: Tensor, losses: Tensor, eta: float) -> Tensor:
    r"""One multiplicative-weights (Hedge) update over learners from their losses.

    Freund, Schapire, "A Decision-Theoretic Generalization of On-Line Learning and an Application
    to Boosting", JCSS 1997, https://doi.org/10.1006/jcss.1997.1504.

    .. math::

        w_m \leftarrow \frac{w_m\, e^{-\eta \ell_m}}{\sum_j w_j\, e^{-\eta \ell_j}}

    which is the paper's ``Hedge(β)`` update ``w ← w·β^ℓ`` with ``β = e^{-η}``. Computed in log
    space (a softmax of ``ln w - ηℓ``), so large losses or long runs do not underflow every
    weight to 0; a zero weight stays zero.

    Args:
        weights: ``[M]`` non-negative weights with a positive sum.
        losses: ``[M]`` finite losses (the paper assumes ``[0, 1]``; any finite value works).
        eta: the learning rate ``η >= 0`` (0: no change but the renormalisation).

    Returns:
        ``[M]`` weights summing to 1, in ``weights``' dtype and device.

    Example::

        >>> hedge(torch.tensor([0.5, 0.5], dtype=torch.float64),
        ...       torch.tensor([0.0, 1.0], dtype=torch.float64), eta=math.log(2.0))
        tensor([0.6667, 0.3333], dtype=torch.float64)
    """
    _check_weights("weights", weights)
    if not isinstance(losses, Tensor) or losses.shape != weights.shape:
        raise ValueError(
            "Parameter `losses` should be a tensor of the shape of `weights` "
            f"({tuple(weights.shape)}). Found "
            f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}."
        )
    if not bool(torch.isfinite(losses).all()):
        raise ValueError(f"Parameter `losses` should be finite. Found {losses.tolist()}.")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
        raise ValueError(f"Parameter `eta` should be a finite number >= 0. Found {eta!r}.")
    if eta < 0:
        raise ValueError(f"Parameter `eta` should be >= 0. Found {eta!r}.")
    logits = torch.log(weights) - eta * losses.to(weights)
    return torch.softmax(logits, dim=0)
