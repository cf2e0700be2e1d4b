"""MoCo: multi-objective gradient correction with tracked gradients (Fernando et al., 2023)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_aw._utils import check_number
from lightning_aw.aggregation._base import GradientWeighting
from lightning_aw.aggregation._direction_methods import _split, _unscaled
from lightning_aw.engine import flatten, present_mean
from lightning_aw.functional._adaptive import _moco
from lightning_aw.step import StepRecord

__all__ = ["MoCo"]


class MoCo(GradientWeighting, name="moco", stateful=True):
    r"""MoCo: MGDA-type weights on tracked gradients, without the bias of stochastic gradients.

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023,
    https://openreview.net/forum?id=dLAYGdKTi2, Algorithm 1.

    Every training micro-batch, with :math:`g_i` the gradient of :math:`L_i` on
    ``shared_parameters()`` and :math:`t` the number of updates so far (from 1):

    .. math::

        y_i \leftarrow y_i - \beta_t (y_i - g_i), \qquad
        \lambda \leftarrow \Pi_\Delta\bigl(\lambda - \gamma_t (YY^\top + \rho I)\lambda\bigr),
        \qquad d = Y^\top\lambda,

        \beta_t = \beta / t^{\sigma_\beta}, \qquad \gamma_t = \gamma / t^{\sigma_\gamma}

    (:func:`lightning_aw.functional.moco`; :math:`\Pi_\Delta` the Euclidean projection onto the
    simplex). The shared parameters receive :math:`d`, the update built from the *tracked*
    gradients :math:`Y` (not a combination of this step's gradients), through a zero-valued
    surrogate in Lightning's one backward; each task head receives :math:`\lambda_i\nabla L_i`.

    Conventions:

    - Defaults :math:`\beta = 0.5`, :math:`\gamma = 0.1`, :math:`\rho = 0`,
      :math:`\sigma_\beta = \sigma_\gamma = 0.5`: the values of the authors' code as ported
      to LibMTL (its ``config.py``; the paper's convergence analysis uses decaying step sizes of
      this form; its per-experiment values were not checked for this release). That port
      replaces the projection :math:`\Pi_\Delta` by a softmax and always normalises the
      gradients; this class follows Algorithm 1 (the projection; ``normalize`` optional).
      :math:`Y(0) = 0` (as the authors' code), :math:`\lambda(0) = \mathbf 1/T`.
      ``normalize=True`` replaces each :math:`g_i` by :math:`L_i\,g_i/\lVert g_i\rVert`
      before tracking (the authors' experiment code); the default follows Algorithm 1 (raw
      gradients). The step on :math:`\lambda` is not invariant to the gradients' scale, as in
      the paper.
    - ``weights`` are :math:`\lambda` and **sum to 1**. Absent tasks keep their tracked row,
      which still enters :math:`YY^\top` and :math:`d`.
    - The state advances once per training micro-batch (with ``accumulate_grad_batches=k`` a
      window's update is the mean of its ``k`` micro-batch directions); :math:`g_i` are the
      gradients of the undivided, unscaled losses. DDP: the per-task gradients (and losses)
      are averaged over the ranks first (a ``T×P`` all-reduce), so :math:`Y`, :math:`\lambda`
      and :math:`d` are identical on every rank.
    - A step whose gradients are not finite (fp16 overflow) leaves :math:`Y` and
      :math:`\lambda` unchanged and sends the plain :math:`\sum_i\lambda_i g_i`, so the
      GradScaler skips it; counted in ``aggregation/fallbacks`` (:math:`t` still advances).
    - State (saved in checkpoints): :math:`Y` (float32 ``[T, P]``), :math:`\lambda`, :math:`t`.
      Parameters source only (the tracked gradients must be of the same parameters every step;
      a marked representation is used as a shortcut through the heads).

    Args:
        beta: :math:`\beta \in [0, 1]`, the tracking rate.
        gamma: :math:`\gamma \ge 0`, the step size of :math:`\lambda`.
        rho: :math:`\rho \ge 0`, the regularisation of :math:`\lambda`'s subproblem.
        beta_sigma: :math:`\sigma_\beta \ge 0`, the decay exponent of :math:`\beta_t`.
        gamma_sigma: :math:`\sigma_\gamma \ge 0`, the decay exponent of :math:`\gamma_t`.
        normalize: track :math:`L_i g_i / \lVert g_i\rVert` instead of :math:`g_i`.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_aw import MoCo
        >>> method = MoCo(beta=0.5, gamma=0.1)
        >>> method
        MoCo(beta=0.5, gamma=0.1, rho=0.0, beta_sigma=0.5, gamma_sigma=0.5, normalize=False)
        >>> trainer = pl.Trainer(callbacks=[method], logger=False)
    """

    total: ClassVar[str | float | None] = 1
    _state_attrs: ClassVar[tuple[str, ...]] = (*GradientWeighting._state_attrs, "_tracked", "_t")

    def __init__(
        self,
        beta: float = 0.5,
        gamma: float = 0.1,
        rho: float = 0.0,
        beta_sigma: float = 0.5,
        gamma_sigma: float = 0.5,
        normalize: bool = False,
    ) -> None:
        super().__init__(source="parameters")
        self.beta = check_number("beta", beta, high=1.0)
        self.gamma = check_number("gamma", gamma)
        self.rho = check_number("rho", rho)
        self.beta_sigma = check_number("beta_sigma", beta_sigma)
        self.gamma_sigma = check_number("gamma_sigma", gamma_sigma)
        if not isinstance(normalize, bool):
            raise ValueError(f"Parameter `normalize` should be True or False. Found {normalize!r}.")
        self.normalize = normalize
        self._tracked = torch.zeros(0, 0)
        self._t = 0

    def hparams_repr(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "gamma": self.gamma,
            "rho": self.rho,
            "beta_sigma": self.beta_sigma,
            "gamma_sigma": self.gamma_sigma,
            "normalize": self.normalize,
        }

    def init_state(self, num_tasks: int) -> None:
        super().init_state(num_tasks)  # lambda(0) = 1/T
        self._tracked = torch.zeros(num_tasks, 0)
        self._t = 0

    # ------------------------------------------------------------------ the step
    def step_loss(self, step: StepRecord) -> Tensor:
        losses = step.losses
        if not torch.is_grad_enabled() or not losses.requires_grad:
            return (self._coefs.to(losses) * losses).sum()
        engine = self.engine(step)
        detached = losses.detach()
        if step.representation_graph is not None:  # through the heads only, then the trunk
            targets = self._upstream_params(engine, step)
            rows = engine.on_representation_scaled()
            per_task = _unscaled(engine, engine.through_representation_scaled(rows, targets))
            n_shared = self._num_shared
            d, lam, _ = self._direction(step, flatten(per_task, targets[:n_shared]), detached)
            out = _split(d, targets[:n_shared])
            for j in range(n_shared, len(targets)):  # upstream but not declared shared
                zero = torch.zeros((), device=losses.device)
                out.append(
                    sum((lam[i] * g[j] for i, g in enumerate(per_task) if g is not None), zero)
                )
            return (lam.to(losses) * losses).sum() + engine.deliver(targets, out)
        params = self._params
        per_task = _unscaled(
            engine, engine.on_parameters_scaled(params, names=self._shared_names())
        )
        grads = flatten(per_task, params)
        d, lam, ok = self._direction(step, grads, detached)
        # the backward of sum_i lambda_i L_i brings sum_i lambda_i g_i: inject the difference
        local = lam @ torch.where(torch.isfinite(grads), grads, 0.0)
        delta = torch.where(ok, d - local, torch.zeros_like(d))
        return (lam.to(losses) * losses).sum() + engine.deliver(params, _split(delta, params))

    def _direction(
        self, step: StepRecord, grads: Tensor, losses: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Advance ``Y`` and ``lambda`` with this micro-batch's gradients ``[T, P]``; return the
        direction ``[P]``, the weights and whether the step was finite (0-d bool tensor)."""
        present = step.present
        losses = losses.to(grads.dtype)
        if step.world_size > 1:
            mask = present.to(grads.dtype)
            grads, count, (loss_sum,) = present_mean(step.trainer, grads, present, losses * mask)
            losses = loss_sum / count.clamp_min(1.0)
            present = count > 0
        finite = torch.isfinite(grads)
        safe = torch.where(finite, grads, 0.0)
        if self.normalize:
            safe = safe / (safe.norm(dim=1, keepdim=True) + 1e-8) * losses[:, None]
        tracked = self._tracked.to(safe.device)
        if tracked.shape != safe.shape:
            tracked = torch.zeros_like(safe)
        lam = self._coefs.to(safe.device)
        self._t += 1
        beta = self.beta / self._t**self.beta_sigma
        gamma = self.gamma / self._t**self.gamma_sigma
        new_y, new_lam = _moco(tracked, lam, safe, present, beta, gamma, self.rho)
        d = new_lam @ new_y
        ok = finite.all() & torch.isfinite(d).all()
        self._fallbacks = self._fallbacks.to(safe.device) + (~ok).float()
        self._tracked = torch.where(ok, new_y, tracked)
        self._coefs = torch.where(ok, new_lam, lam)
        return torch.where(ok, d, self._coefs @ safe), self._coefs, ok
