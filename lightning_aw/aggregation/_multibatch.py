r"""Multi-batch stochastic methods: SDMGrad and MoDo.

Both update simplex weights with an *unbiased* stochastic estimate of the gradient of
:math:`\tfrac12\lVert G\lambda\rVert^2`, the product of the per-task gradients of two independent
mini-batches, and take the update direction on a third one. Inside Lightning's loop the three
mini-batches are three disjoint parts of the step's batch
(:meth:`MultiTaskModule.split_batch <lightning_aw.MultiTaskModule.split_batch>`):

1. ``training_step`` evaluates the task losses on the last part only (the record's losses:
   logged as ``loss/<task>``, and the direction's);
2. the method evaluates the first two parts itself (:meth:`MultiTaskModule.compute_losses
   <lightning_aw.MultiTaskModule.compute_losses>`, under the precision plugin's autocast), takes
   their per-task gradients on ``shared_parameters()`` through the engine and forms the cross
   Gram matrix :math:`A = G_1 G_2^\top` (``T×T``);
3. the weights take their update on the host (float64), and the step returns
   :math:`c^\top L(\text{part } 3)`: one ordinary backward, so loss scaling, accumulation,
   clipping and DDP apply as usual, and the heads get their weighted gradients too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_aw import functional as F
from lightning_aw._sharding import strategy_name
from lightning_aw._utils import all_reduce_sum, check_number
from lightning_aw.aggregation._base import GradientWeighting
from lightning_aw.engine import TaskGradients
from lightning_aw.module import MultiTaskModule
from lightning_aw.step import StepRecord

__all__ = ["MoDo", "SDMGrad"]


class _MultiBatch(GradientWeighting):
    """The shared machinery of SDMGrad and MoDo (see the module docstring)."""

    batch_parts: ClassVar[int] = 3  # type: ignore[misc]
    #: the per-task gradients are taken on parameters of forwards of their own: no cut copy
    cuts_representation: ClassVar[bool] = False  # type: ignore[misc]
    partial_labels: ClassVar[bool] = False
    _state_attrs: ClassVar[tuple[str, ...]] = (
        *GradientWeighting._state_attrs,
        "_simplex",
        "_updated_at",
    )

    def __init__(self) -> None:
        super().__init__(source="parameters")
        self._simplex = torch.ones(0)
        self._updated_at = -1  # the optimizer step whose window updated the weights

    def hparams_repr(self) -> dict[str, Any]:
        return {}

    def init_state(self, num_tasks: int) -> None:
        self._simplex = torch.full((num_tasks,), 1.0 / num_tasks)
        self._coefs = self.coefficients_of(self._simplex)
        self._updated_at = -1

    def coefficients_of(self, simplex: Tensor) -> Tensor:
        """The coefficients of the direction's losses from the simplex weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement `coefficients_of()`.")

    def update(self, cross_gram: Tensor, simplex: Tensor) -> Tensor:
        """The new simplex weights from the cross Gram matrix (float64, on the host)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `update()`.")

    @property
    def simplex_weights(self) -> Tensor:
        r"""The weights on the simplex (:math:`\lambda` of MoDo, :math:`w` of SDMGrad), ``[T]``."""
        return self._simplex

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = strategy_name(trainer)
        if name in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"):
            raise MisconfigurationException(
                f"{self!r} evaluates each step's batch in {self.batch_parts} parts with forwards "
                f"of its own, which is not supported under {name} (sharded parameters are "
                "gathered for the step's one forward). Train with DDP or on one device."
            )
        super().on_fit_start(trainer, pl_module)

    @override
    def step_loss(self, step: StepRecord) -> Tensor:
        losses = step.losses
        if not all(step.present_list):
            self._refuse_absent(step, step.present_list, "last")
        if (
            torch.is_grad_enabled()
            and losses.requires_grad
            and self._updated_at != (self._optimizer_steps)
        ):
            # the first micro-batch of an optimizer step's window updates the weights
            self._update_weights(step)
            self._updated_at = self._optimizer_steps
        return (self._coefs.to(losses) * losses).sum()

    def _refuse_absent(self, step: StepRecord, present: Any, which: str) -> None:
        absent = [t for t, here in zip(step.tasks, present, strict=True) if not here]
        raise MisconfigurationException(
            f"{self!r} needs every task in every part of every batch (its weights are updated "
            f"from per-task gradients of independent batches), but task(s) {absent} are absent "
            f"from the {which} part of batch {step.batch_idx}. Use a method that supports "
            "partial labels, or return every task's loss (masked to its labelled samples)."
        )

    def _update_weights(self, step: StepRecord) -> None:
        trainer = step.trainer
        module = None if trainer is None else trainer.lightning_module
        if not isinstance(module, MultiTaskModule):
            raise MisconfigurationException(f"{self!r} needs a MultiTaskModule run by a Trainer.")
        parts = module.split_batch(step.batch, self.batch_parts)
        rows = []
        for j, part in enumerate(parts[:2]):
            with trainer.precision_plugin.train_step_context():
                values, present_list = module.compute_task_losses(part, step.batch_idx)
            if not all(present_list):
                self._refuse_absent(step, present_list, ("first", "second")[j])
            part_losses = torch.stack(values)  # type: ignore[arg-type]
            # unscaled, also under fp16 (a record without a Trainer: no GradScaler, no
            # accumulation): the GradScaler's scale is tuned for the step's weighted backward, and
            # scaled per-task gradients of a part overflow where that backward does not
            record = dataclasses.replace(
                step,
                losses=part_losses,
                task_losses=values,
                present=torch.ones_like(step.present),
                present_list=present_list,
                batch=part,
                representation=None,
                representation_graph=None,
                trainer=None,
            )
            engine = TaskGradients(record, self)
            rows.append(engine.on_parameters_scaled(self._params, names=self._shared_names()))
        # A_ij = <g_i(part 1), g_j(part 2)>, layer by layer (no [T, P] copy)
        first, second = rows
        cross = torch.zeros(step.num_tasks, step.num_tasks, device=step.losses.device)
        for layer in range(len(self._params)):
            b1 = torch.stack([r[layer].reshape(-1) for r in first]).float()  # type: ignore[index]
            b2 = torch.stack([r[layer].reshape(-1) for r in second]).float()  # type: ignore[index]
            cross = cross + b1 @ b2.T
        if step.world_size > 1:
            # the mean over the ranks of an unbiased estimate is one: identical weights everywhere
            cross = all_reduce_sum(trainer, cross)[0] / step.world_size
        # the small T x T update runs on the host in float64 (one device-to-host copy)
        coefs = self.coefficients(cross.to("cpu", torch.float64), step.losses.detach())
        self._coefs = self._transformed(coefs.to(step.losses.device, torch.float32)).detach()

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        """Update the simplex weights from the cross Gram matrix ``gram`` ``[T, T]`` (host,
        float64) and return the coefficients of the direction's losses. A matrix or an update
        that is not finite (an fp16 overflow, a NaN gradient) leaves the weights unchanged
        (counted in ``aggregation/fallbacks``)."""
        simplex = self._simplex.to("cpu", torch.float64)
        new = self.update(gram, simplex) if bool(torch.isfinite(gram).all()) else None
        if new is None or not bool(torch.isfinite(new).all()):
            self._fallbacks = self._fallbacks + 1.0
            new = simplex
        self._simplex = new.to(self._simplex.device, torch.float32)
        return self.coefficients_of(self._simplex)


class MoDo(_MultiBatch, name="modo", functional="modo", stateful=True):
    r"""MoDo: multi-objective gradient with double sampling.

    Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS 2023, https://arxiv.org/abs/2305.20057,
    Alg. 1. Each step draws three independent mini-batches :math:`z_1, z_2, z_3`:

    .. math::

        \lambda \leftarrow \Pi_\Delta\bigl(\lambda - \gamma\,(\nabla F_{z_1}(x)^\top
        \nabla F_{z_2}(x)\,\lambda + \rho\lambda)\bigr), \qquad
        x \leftarrow x - \alpha\,\nabla F_{z_3}(x)\,\lambda,

    i.e. a projected stochastic gradient step on :math:`\tfrac12\lVert\nabla F(x)\lambda\rVert^2`
    (MGDA's objective) whose gradient estimate is unbiased because the two gradient samples are
    independent, then the update along :math:`\sum_i\lambda_i\nabla f_i` on the third batch.

    How it runs (see :mod:`lightning_aw.aggregation._multibatch`): the step's batch is split
    into three disjoint parts with :meth:`MultiTaskModule.split_batch
    <lightning_aw.MultiTaskModule.split_batch>`; parts 1 and 2 give the per-task gradients on
    ``shared_parameters()`` of :math:`z_1, z_2`, part 3 the returned loss
    :math:`\sum_i\lambda_i L_i(z_3)` (and the logged ``loss/<task>``).

    Cost per optimizer step: three forwards on thirds of the batch (about one full forward),
    :math:`2T` per-task backward passes through the trunk on thirds, one ordinary backward on
    the last third. The update uses a third of the batch: to keep the update's noise of a plain
    run, triple the batch size.

    Conventions:

    - :math:`\lambda` starts at :math:`1/T` and sums to 1: the weights are :math:`\lambda`
      (total 1; with a plain-sum learning rate, multiply it by :math:`T`).
    - Defaults: ``gamma=0.1`` (the authors' implementation, ``gamma_modo``), ``rho=0`` (the
      algorithm as analysed; the authors' implementation defaults to ``rho_modo=0.1``). The
      authors' implementation updates the network along :math:`(\nabla F_{z_1} +
      \nabla F_{z_2})\lambda` (two samples); the paper's third sample is used here.
    - :math:`\lambda` is updated once per optimizer step, from the first micro-batch of an
      accumulation window; every micro-batch's direction uses its own last part.
    - The per-task gradients are those of the micro-batch's mean losses (not divided by
      ``accumulate_grad_batches``), taken unscaled also under the fp16 GradScaler (its scale is
      tuned for the step's weighted backward; scaled, a part's per-task gradients overflow where
      that backward does not); a step whose gradients are not finite leaves :math:`\lambda`
      unchanged (``aggregation/fallbacks``).
    - DDP: the ranks average their cross Gram matrices (one ``T×T`` all-reduce), so
      :math:`\lambda` is identical on every rank.
    - Refused: tasks absent from a part (an error naming them), FSDP/FSDP2/DeepSpeed (the extra
      forwards), batches with fewer than 3 rows or that ``split_batch`` cannot split.
    - Batch norm layers see three forwards of a third of the batch each.

    Args:
        gamma: step size :math:`\gamma > 0` of :math:`\lambda`.
        rho: regularisation :math:`\rho \ge 0` of the :math:`\lambda` subproblem.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import MoDo
        >>> from lightning_aw.functional import modo
        >>> trainer = pl.Trainer(callbacks=[MoDo(gamma=0.1)], logger=False)
        >>> modo(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), torch.tensor([0.5, 0.5]), gamma=0.1)
        tensor([0.4250, 0.5750])
    """

    total: ClassVar[str | float | None] = 1

    def __init__(self, gamma: float = 0.1, rho: float = 0.0) -> None:
        super().__init__()
        self.gamma = check_number("gamma", gamma, open_low=True)
        self.rho = check_number("rho", rho)

    def hparams_repr(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "rho": self.rho}

    def coefficients_of(self, simplex: Tensor) -> Tensor:
        return simplex.clone()

    def update(self, cross_gram: Tensor, simplex: Tensor) -> Tensor:
        return F.modo(cross_gram, simplex, gamma=self.gamma, rho=self.rho)


class SDMGrad(_MultiBatch, name="sdmgrad", functional="sdmgrad", stateful=True):
    r"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

    Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023, https://arxiv.org/abs/2305.18409, Alg. 1 (SDMGrad; the
    objective-sampling variant SDMGrad-OS is not included).

    The direction stays in a neighbourhood of the average gradient :math:`g_0 = \tfrac1T G
    \mathbf 1`: with three independent mini-batches :math:`\xi_1, \xi_2, \zeta`,

    .. math::

        w \leftarrow \Pi_\Delta\bigl(w - \beta\,[G(\xi_1)^\top(G(\xi_2)w + \lambda g_0(\xi_2))
        + \rho w]\bigr) \ (S \text{ times}), \qquad
        d = \frac{G(\zeta)w + \lambda g_0(\zeta)}{1 + \lambda},

    :math:`\lambda = 0` is a stochastic MGDA, :math:`\lambda \to \infty` the plain average. The
    inner loop is :func:`lightning_aw.functional.sdmgrad` (warm-started from the last
    :math:`w`). The network follows :math:`T\,d`, i.e. the returned loss on the third part is
    :math:`\sum_i c_i L_i(\zeta)` with :math:`c = (T w + \lambda)/(1 + \lambda)`: the weights
    sum to :math:`T` (the authors' implementation multiplies :math:`d` by :math:`T` to match the
    sum of the losses; the plain sum is :math:`c = 1`).

    How it runs, its cost and its limits are MoDo's (:class:`~lightning_aw.MoDo`): three
    disjoint parts of the step's batch (:meth:`MultiTaskModule.split_batch
    <lightning_aw.MultiTaskModule.split_batch>`), three forwards on thirds, :math:`2T` per-task
    backward passes on thirds plus one ordinary backward on the last third; :math:`w` updated once
    per optimizer step; cross Gram matrices averaged over the DDP ranks; tasks absent from a part
    and sharded strategies refused.

    Defaults, from the authors' implementation (``methods/weight_methods.py`` of
    ml-opt-lab/sdmgrad): ``lam=0.6``, ``niter=20`` inner steps of ``lr=10`` with momentum 0.5
    (a fresh heavy-ball buffer at each step) on the cross Gram matrix divided by its scale
    (``normalize=True``; a negative diagonal entry, possible for a cross Gram matrix, counts as
    0 there); ``rho=0`` (the implementation has no :math:`\rho` term). ``momentum=0``,
    ``normalize=False`` give the paper's plain projected SGD step.

    Args:
        lam: :math:`\lambda \ge 0`, the pull towards the average gradient.
        lr: step size :math:`\beta > 0` of the inner loop.
        momentum: heavy-ball momentum of the inner loop, in ``[0, 1)``.
        niter: inner steps :math:`S \ge 1`.
        rho: regularisation :math:`\rho \ge 0`.
        normalize: divide the cross Gram matrix by its scale before the inner loop.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_aw import SDMGrad
        >>> trainer = pl.Trainer(callbacks=[SDMGrad(lam=0.3)], logger=False)
        >>> SDMGrad(lam=0.3)
        SDMGrad(lam=0.3, lr=10.0, momentum=0.5, niter=20, rho=0.0, normalize=True)
    """

    total: ClassVar[str | float | None] = "T"

    def __init__(
        self,
        lam: float = 0.6,
        lr: float = 10.0,
        momentum: float = 0.5,
        niter: int = 20,
        rho: float = 0.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.lam = check_number("lam", lam)
        self.lr = check_number("lr", lr, open_low=True)
        self.momentum = check_number("momentum", momentum, high=1.0, open_high=True)
        if not isinstance(niter, int) or isinstance(niter, bool) or niter < 1:
            raise ValueError(f"Parameter `niter` should be an int >= 1. Found {niter!r}.")
        self.niter = niter
        self.rho = check_number("rho", rho)
        if not isinstance(normalize, bool):
            raise ValueError(f"Parameter `normalize` should be a bool. Found {normalize!r}.")
        self.normalize = normalize

    def hparams_repr(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "lr": self.lr,
            "momentum": self.momentum,
            "niter": self.niter,
            "rho": self.rho,
            "normalize": self.normalize,
        }

    def coefficients_of(self, simplex: Tensor) -> Tensor:
        return (simplex.numel() * simplex + self.lam) / (1.0 + self.lam)

    def update(self, cross_gram: Tensor, simplex: Tensor) -> Tensor:
        return F.sdmgrad(
            cross_gram,
            simplex,
            lam=self.lam,
            lr=self.lr,
            momentum=self.momentum,
            niter=self.niter,
            rho=self.rho,
            normalize=self.normalize,
        )
