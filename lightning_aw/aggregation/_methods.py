"""Gradient-based methods as Lightning callbacks: thin wrappers of `lightning_aw.functional`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_aw import functional as G
from lightning_aw._utils import GeneratorState
from lightning_aw.aggregation._base import DDPSync, GradientWeighting, Source
from lightning_aw.weighting._base import Interval

__all__ = [
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradVac",
    "NashMTL",
    "PCGrad",
    "UPGrad",
]


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Parameter `{name}` should be an int >= {minimum}. Found {value!r}.")


class MGDA(GradientWeighting, name="mgda"):
    r"""Multiple-gradient descent: the min-norm point of the convex hull of the task gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    https://arxiv.org/abs/1810.04650. With ``source="representation"`` this is MGDA-UB.

    .. math::

        c = \arg\min_{c \in \Delta_T} \Bigl\lVert \sum_i c_i \tilde g_i \Bigr\rVert^2

    solved exactly on the Gram matrix (:func:`lightning_aw.functional.mgda`); the gradients are
    first normalised by ``normalization`` (``"none"``, ``"l2"``: by their norm, ``"loss"``: by
    the loss, ``"loss+"``: by loss times norm), and the normalisation is folded into the returned
    coefficients so they apply to the raw gradients. Weights are the coefficients of the last step.

    Args:
        normalization: gradient normalisation, default ``"none"``.
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import MGDA
        >>> from lightning_aw.functional import mgda
        >>> trainer = pl.Trainer(callbacks=[MGDA(source="representation")], logger=False)
        >>> grads = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
        >>> c = mgda(grads)  # min-norm point of their convex hull
        >>> c
        tensor([0.5385, 0.4615])
        >>> c @ grads
        tensor([0.3077, 0.4615])
    """

    def __init__(
        self,
        normalization: Literal["none", "l2", "loss", "loss+"] = "none",
        *,
        source: Source = "parameters",
        ddp_sync: DDPSync = "gram",
        frequency: int = 1,
        interval: Interval = "step",
    ) -> None:
        super().__init__(source=source, ddp_sync=ddp_sync, frequency=frequency, interval=interval)
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(
                "Parameter `normalization` should be 'none', 'l2', 'loss' or 'loss+'. "
                f"Found {normalization!r}."
            )
        self.normalization = normalization

    def hparams_repr(self) -> dict[str, Any]:
        return {"normalization": self.normalization, **super().hparams_repr()}

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        needs_loss = self.normalization in ("loss", "loss+")
        return G.mgda_from_gram(gram, self.normalization, losses if needs_loss else None)


class PCGrad(GradientWeighting, name="pcgrad", stateful=True, stochastic=True):
    r"""Projecting conflicting gradients.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
    https://arxiv.org/abs/2001.06782.

    For each task :math:`i`, over the other tasks :math:`j` in random order, when
    :math:`g_i \cdot g_j < 0`: :math:`g_i \leftarrow g_i - \frac{g_i\cdot g_j}{\lVert g_j\rVert^2}
    g_j`; the projected gradients are summed (``reduction="sum"``, default, as the paper) or
    averaged. Computed exactly on the Gram matrix (:func:`lightning_aw.functional.pcgrad`). The
    random orders come from a CPU generator seeded with ``seed`` (identical on every DDP rank,
    saved in checkpoints).

    Args:
        reduction: ``"sum"`` or ``"mean"`` of the projected gradients.
        seed: seed of the random task orders.
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import PCGrad
        >>> from lightning_aw.functional import pcgrad
        >>> trainer = pl.Trainer(callbacks=[PCGrad(seed=0)], logger=False)
        >>> grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> gen = torch.Generator().manual_seed(0)
        >>> pcgrad(grads, generator=gen) @ grads  # conflicts projected away
        tensor([0.5000, 1.5000])
    """

    _state_attrs: ClassVar[tuple[str, ...]] = (*GradientWeighting._state_attrs, "_generator")

    def __init__(
        self,
        reduction: Literal["sum", "mean"] = "sum",
        seed: int = 0,
        *,
        source: Source = "parameters",
        ddp_sync: DDPSync = "gram",
        frequency: int = 1,
        interval: Interval = "step",
    ) -> None:
        super().__init__(source=source, ddp_sync=ddp_sync, frequency=frequency, interval=interval)
        if reduction not in ("sum", "mean"):
            raise ValueError(
                f"Parameter `reduction` should be 'sum' or 'mean'. Found {reduction!r}."
            )
        _check_int("seed", seed, minimum=0)
        self.reduction = reduction
        self.seed = seed
        self._generator = GeneratorState(seed)

    def hparams_repr(self) -> dict[str, Any]:
        return {"reduction": self.reduction, "seed": self.seed, **super().hparams_repr()}

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        return G.pcgrad_from_gram(gram, self.reduction, self._generator.generator)


class CAGrad(GradientWeighting, name="cagrad"):
    r"""Conflict-averse gradient descent.

    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, https://arxiv.org/abs/2110.14048.

    .. math::

        d = g_0 + \frac{c \lVert g_0\rVert}{\lVert g_w\rVert} g_w, \quad
        w = \arg\min_{w\in\Delta_T} g_w^\top g_0 + c\lVert g_0\rVert\lVert g_w\rVert

    with :math:`g_0` the mean gradient; ``rescale`` 0 keeps :math:`d`, 1 divides it by
    :math:`1+c^2` (default), 2 by :math:`1+c` (see :func:`lightning_aw.functional.cagrad`).

    Args:
        c: the conflict-aversion radius :math:`c \ge 0` (0.4 as in Nash-MTL and FAMO's setups;
            the paper also uses 0.5). ``c=0`` is the mean gradient.
        rescale: 0, 1 or 2.
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import CAGrad
        >>> from lightning_aw.functional import cagrad
        >>> trainer = pl.Trainer(callbacks=[CAGrad(c=0.4)], logger=False)
        >>> cagrad(torch.tensor([[1.0, 0.0], [-0.5, 1.0]]), c=0.4)
        tensor([0.6421, 0.5504])
    """

    def __init__(
        self,
        c: float = 0.4,
        rescale: int = 1,
        *,
        source: Source = "parameters",
        ddp_sync: DDPSync = "gram",
        frequency: int = 1,
        interval: Interval = "step",
    ) -> None:
        super().__init__(source=source, ddp_sync=ddp_sync, frequency=frequency, interval=interval)
        if not isinstance(c, (int, float)) or not c >= 0:
            raise ValueError(f"Parameter `c` should be >= 0. Found {c!r}.")
        if rescale not in (0, 1, 2):
            raise ValueError(f"Parameter `rescale` should be 0, 1 or 2. Found {rescale!r}.")
        self.c = float(c)
        self.rescale = rescale

    def hparams_repr(self) -> dict[str, Any]:
        return {"c": self.c, "rescale": self.rescale, **super().hparams_repr()}

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        return G.cagrad_from_gram(gram, self.c, self.rescale)


class IMTLG(GradientWeighting, name="imtl_g"):
    r"""Impartial multi-task learning, gradient part: equal projections on every unit gradient.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021,
    https://openreview.net/forum?id=IMPnRXEWpvr.

    The coefficients (summing to 1) make the aggregated gradient's projection onto every task's
    unit gradient equal; closed form on the Gram matrix, with a pseudo-inverse for
    rank-deficient gradients (:func:`lightning_aw.functional.imtl_g`). No hyperparameters.

    Args:
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import IMTLG
        >>> from lightning_aw.functional import imtl_g
        >>> trainer = pl.Trainer(callbacks=[IMTLG()], logger=False)
        >>> grads = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> d = imtl_g(grads) @ grads
        >>> d
        tensor([0.6667, 0.6667])
        >>> d @ (grads / grads.norm(dim=1, keepdim=True)).T  # equal projections on unit gradients
        tensor([0.6667, 0.6667])
    """

    total: ClassVar[str | float | None] = 1

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        return G.imtl_g_from_gram(gram)


class NashMTL(GradientWeighting, name="nash_mtl"):
    r"""Multi-task learning as a bargaining game: the Nash bargaining solution.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022,
    https://arxiv.org/abs/2202.01017.

    Solves :math:`G G^\top \alpha = 1/\alpha`, :math:`\alpha > 0` on the normalised Gram matrix
    (:func:`lightning_aw.functional.nash_mtl`). The paper recomputes :math:`\alpha` every step
    (``frequency=1``) or, cheaply, every few steps; it also clips the gradient norm at 1 — use
    ``Trainer(gradient_clip_val=1.0)``. For two tasks it equals IMTL-G up to scale.

    Args:
        max_iter: iterations of the solver (20, as the paper's CCCP).
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import NashMTL
        >>> from lightning_aw.functional import nash_mtl
        >>> trainer = pl.Trainer(callbacks=[NashMTL()], gradient_clip_val=1.0, logger=False)
        >>> grads = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> alpha = nash_mtl(grads)
        >>> alpha  # orthogonal gradients: alpha_i = 1 / |g_i|
        tensor([1.0153, 2.0305])
    """

    def __init__(
        self,
        max_iter: int = 20,
        *,
        source: Source = "parameters",
        ddp_sync: DDPSync = "gram",
        frequency: int = 1,
        interval: Interval = "step",
    ) -> None:
        super().__init__(source=source, ddp_sync=ddp_sync, frequency=frequency, interval=interval)
        _check_int("max_iter", max_iter)
        self.max_iter = max_iter

    def hparams_repr(self) -> dict[str, Any]:
        return {"max_iter": self.max_iter, **super().hparams_repr()}

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        return G.nash_mtl_from_gram(gram, max_iter=self.max_iter)


class AlignedMTL(GradientWeighting, name="aligned_mtl"):
    r"""Aligned-MTL: make the task gradients orthogonal and of equal norm (condition number 1).

    Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023, https://arxiv.org/abs/2305.19000.

    With :math:`GG^\top = V\Lambda V^\top`, :math:`B = \sqrt{\lambda}\,V\Lambda^{-1/2}V^\top` and
    :math:`c = B\mathbf 1`, :math:`\lambda` chosen by ``scale_mode`` (:func:`lightning_aw.
    functional.aligned_mtl`).

    Args:
        scale_mode: ``"min"`` (default, the paper), ``"median"`` or
            ``"rmse"``.
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import AlignedMTL
        >>> from lightning_aw.functional import aligned_mtl
        >>> trainer = pl.Trainer(callbacks=[AlignedMTL()], logger=False)
        >>> aligned_mtl(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))  # scaled to the smallest norm
        tensor([0.3333, 1.0000])
    """

    def __init__(
        self,
        scale_mode: Literal["min", "median", "rmse"] = "min",
        *,
        source: Source = "parameters",
        ddp_sync: DDPSync = "gram",
        frequency: int = 1,
        interval: Interval = "step",
    ) -> None:
        super().__init__(source=source, ddp_sync=ddp_sync, frequency=frequency, interval=interval)
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(
                f"Parameter `scale_mode` should be 'min', 'median' or 'rmse'. Found {scale_mode!r}."
            )
        self.scale_mode = scale_mode

    def hparams_repr(self) -> dict[str, Any]:
        return {"scale_mode": self.scale_mode, **super().hparams_repr()}

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        return G.aligned_mtl_from_gram(gram, self.scale_mode)


class UPGrad(GradientWeighting, name="upgrad"):
    r"""Unconflicting projection of gradients.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    https://arxiv.org/abs/2406.16232.

    Each :math:`g_i` is projected onto the dual cone :math:`\{x : Gx \ge 0\}` and the projections
    are averaged, so the update conflicts with no task; in weight space
    :math:`w_i = \arg\min_{v \ge e_i} v^\top GG^\top v`, :math:`c = \tfrac1T\sum_i w_i`
    (:func:`lightning_aw.functional.upgrad`).

    Args:
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import UPGrad
        >>> from lightning_aw.functional import upgrad
        >>> trainer = pl.Trainer(callbacks=[UPGrad()], logger=False)
        >>> grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> d = upgrad(grads) @ grads
        >>> bool((grads @ d >= -1e-6).all())  # no task's loss increases to first order
        True
    """

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        return G.upgrad_from_gram(gram)


class GradVac(GradientWeighting, name="gradvac", stateful=True, stochastic=True):
    r"""Gradient Vaccine: raise pairwise gradient cosines towards running targets.

    Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine", ICLR 2021, https://arxiv.org/abs/2010.05874.

    Like PCGrad, but each pair :math:`(i, j)` is adjusted whenever its cosine falls below an EMA
    target :math:`\hat\phi_{ij}` (updated with rate ``beta``), see
    :func:`lightning_aw.functional.gradvac`. Stateful: the ``T×T`` targets and the generator of
    the random orders are saved in checkpoints.

    Args:
        beta: EMA rate of the cosine targets (0.5).
        seed: seed of the random task orders.
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import GradVac
        >>> from lightning_aw.functional import gradvac
        >>> trainer = pl.Trainer(callbacks=[GradVac(beta=0.5)], logger=False)
        >>> grads = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> coefs, targets = gradvac(grads, targets=torch.zeros(2, 2))
        >>> coefs
        tensor([1., 1.])
    """

    _state_attrs: ClassVar[tuple[str, ...]] = (
        *GradientWeighting._state_attrs,
        "_generator",
        "_targets",
    )

    def __init__(
        self,
        beta: float = 0.5,
        seed: int = 0,
        *,
        source: Source = "parameters",
        ddp_sync: DDPSync = "gram",
        frequency: int = 1,
        interval: Interval = "step",
    ) -> None:
        super().__init__(source=source, ddp_sync=ddp_sync, frequency=frequency, interval=interval)
        if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"Parameter `beta` should be in [0, 1]. Found {beta!r}.")
        _check_int("seed", seed, minimum=0)
        self.beta = float(beta)
        self.seed = seed
        self._generator = GeneratorState(seed)
        self._targets = torch.zeros(0, 0)

    def hparams_repr(self) -> dict[str, Any]:
        return {"beta": self.beta, "seed": self.seed, **super().hparams_repr()}

    def init_state(self, num_tasks: int) -> None:
        super().init_state(num_tasks)
        self._targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        idx = self._present_idx
        targets = self._targets.to(gram.device)[idx][:, idx]
        coefs, new = G.gradvac_from_gram(gram, targets, self.beta, self._generator.generator)
        ix = torch.tensor(idx, device=gram.device)
        full = self._targets.to(gram.device).clone()
        full[ix.unsqueeze(1), ix.unsqueeze(0)] = new.to(full.dtype)
        self._targets = full
        return coefs


class FairGrad(GradientWeighting, name="fairgrad"):
    r"""FairGrad: the :math:`\alpha`-fair share of the update among the tasks.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024,
    https://arxiv.org/abs/2402.15638.

    The coefficients :math:`w > 0` solve the paper's system :math:`GG^\top w = w^{-1/\alpha}`
    (a damped Newton method in float64 on the host, :func:`lightning_aw.functional.fairgrad`).
    ``alpha=0`` is the plain sum (linear scalarization), ``alpha=1`` proportional fairness
    (Nash-MTL's system without its normalisation), ``alpha=2`` (default, as in the authors'
    experiment scripts) minimum potential-delay fairness, large ``alpha`` max-min fairness
    (MGDA's direction). The weights are not normalised and scale with the gradients as
    :math:`k^{-2\alpha/(1+\alpha)}`; a step whose solve is not finite falls back to the plain sum
    (counted in ``aggregation/fallbacks``). Stateless.

    Args:
        alpha: the fairness parameter :math:`\alpha \ge 0`, finite.
        max_iter: Newton steps at most (the last iterate is used if ``tol`` is not reached).
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import FairGrad
        >>> from lightning_aw.functional import fairgrad
        >>> trainer = pl.Trainer(callbacks=[FairGrad(alpha=2.0)], logger=False)
        >>> grads = torch.tensor([[1.0, 0.0], [0.0, 8.0]])
        >>> fairgrad(grads, alpha=2.0)  # orthogonal gradients: w_i = |g_i|^(-2 alpha/(1+alpha))
        tensor([1.0000, 0.0625])
    """

    def __init__(
        self,
        alpha: float = 2.0,
        max_iter: int = 50,
        *,
        source: Source = "parameters",
        ddp_sync: DDPSync = "gram",
        frequency: int = 1,
        interval: Interval = "step",
    ) -> None:
        super().__init__(source=source, ddp_sync=ddp_sync, frequency=frequency, interval=interval)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0.0 <= alpha < float("inf")
        ):
            raise ValueError(f"Parameter `alpha` should be a finite number >= 0. Found {alpha!r}.")
        _check_int("max_iter", max_iter)
        self.alpha = float(alpha)
        self.max_iter = max_iter

    def hparams_repr(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "max_iter": self.max_iter, **super().hparams_repr()}

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        return G.fairgrad_from_gram(gram, alpha=self.alpha, max_iter=self.max_iter)


class ConFIG(GradientWeighting, name="con_fig"):
    r"""ConFIG: the conflict-free update, at an equal angle to every task gradient.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025, https://arxiv.org/abs/2408.11104.

    The direction :math:`\tilde d = U^{+}\mathbf 1` (:math:`U` the unit task gradients) has the
    same positive projection on every unit gradient; the update is
    :math:`(\sum_i g_i^\top\hat d)\,\hat d`, :math:`\hat d = \tilde d/\lVert\tilde d\rVert`,
    expressed as coefficients on the task gradients from the Gram matrix
    (:func:`lightning_aw.functional.con_fig`), so it runs under DDP and FSDP2 like every
    gradient method. The direction is IMTL-G's; the length is the sum of the gradients'
    projections on it. Not normalised; no hyperparameters; stateless (the paper's momentum
    variant M-ConFIG is not included).

    Args:
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import ConFIG
        >>> from lightning_aw.functional import con_fig
        >>> trainer = pl.Trainer(callbacks=[ConFIG()], logger=False)
        >>> grads = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])  # conflicting
        >>> d = con_fig(grads) @ grads
        >>> d @ (grads / grads.norm(dim=1, keepdim=True)).T  # equal, positive cosines
        tensor([0.8944, 0.8944])
    """

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        return G.con_fig_from_gram(gram)


class DualProj(GradientWeighting, name="dual_proj"):
    r"""DualProj: the mean gradient projected onto the dual cone of the task gradients.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    https://arxiv.org/abs/2406.16232 (the DualProj aggregator of torchjd; the projection onto
    the dual cone is that of Lopez-Paz & Ranzato's GEM, NeurIPS 2017).

    The update is the vector closest to the mean gradient that conflicts with no task,
    :math:`d = \operatorname{argmin}_{Gx \ge 0}\lVert x - \tfrac1T\sum_i g_i\rVert^2`, as
    coefficients :math:`c = \operatorname{argmin}_{v \ge \mathbf 1/T} v^\top GG^\top v` from
    the Gram matrix (:func:`lightning_aw.functional.dual_proj`: an exact non-negative QP in
    float64, no regularisation). UPGrad projects every task gradient and averages; DualProj
    projects the average once, so it is cheaper and equals the mean gradient whenever that
    conflicts with no task. With ``preference`` :math:`p` (torchjd's ``pref_vector``) the
    combination :math:`\sum_i p_i g_i` is projected instead of the mean (a task absent from a
    step drops out with its :math:`p_i`). Not normalised (:math:`c_i \ge p_i`); stateless.

    Args:
        preference: the non-negative weight :math:`p_i` of every task (by name) in the
            projected combination (default ``None``: the mean, :math:`p_i = 1/T`).
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).
        ddp_sync: ``"gram"`` (average the ranks' Gram matrices, default) or ``"gradients"``
            (average the per-task gradients first, so the method acts on the global gradients).
        frequency: recompute the coefficients every ``frequency`` optimizer steps (or epochs).
        interval: ``"step"`` (default) or ``"epoch"``: with ``"epoch"`` the coefficients are
            computed on the first optimizer step of every ``frequency``-th epoch and reused for
            the rest of it.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import DualProj
        >>> from lightning_aw.functional import dual_proj
        >>> trainer = pl.Trainer(callbacks=[DualProj()], logger=False)
        >>> grads = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])  # the mean gradient conflicts
        >>> d = dual_proj(grads) @ grads
        >>> d, grads @ d  # the closest non-conflicting vector to the mean [-0.5, 0.5]
        (tensor([0.0000, 0.5000]), tensor([0.0000, 0.5000]))
    """

    def __init__(
        self,
        preference: Mapping[str, float] | None = None,
        *,
        source: Source = "parameters",
        ddp_sync: DDPSync = "gram",
        frequency: int = 1,
        interval: Interval = "step",
    ) -> None:
        super().__init__(source=source, ddp_sync=ddp_sync, frequency=frequency, interval=interval)
        if preference is not None:
            ok = isinstance(preference, Mapping) and len(preference) > 0
            ok = ok and all(
                isinstance(k, str)
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and 0 <= v < float("inf")
                for k, v in preference.items()
            )
            if not ok:
                raise ValueError(
                    "Parameter `preference` should map every task name to a non-negative "
                    f"weight (e.g. {{'seg': 1.0, 'depth': 0.5}}), or be None. Found {preference!r}."
                )
            preference = {k: float(v) for k, v in preference.items()}
        self.preference: dict[str, float] | None = preference
        self._pref = torch.zeros(0, dtype=torch.float64)

    def hparams_repr(self) -> dict[str, Any]:
        return {"preference": self.preference, **super().hparams_repr()}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # checked here, after a checkpoint's own checks (its task list) and before any step
        super().on_fit_start(trainer, pl_module)
        if self.preference is None:
            return
        missing = [t for t in self.tasks if t not in self.preference]
        unknown = [t for t in self.preference if t not in self.tasks]
        if missing or unknown:
            raise ValueError(
                f"{self!r}: `preference` should name exactly the module's tasks {self.tasks}; "
                f"missing {missing}, unknown {unknown}."
            )
        self._pref = torch.tensor([self.preference[t] for t in self.tasks], dtype=torch.float64)

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        pref = None
        if self.preference is not None:
            pref = self._pref.to(gram)[torch.tensor(self._present_idx, device=gram.device)]
        return G.dual_proj_from_gram(gram, pref)
