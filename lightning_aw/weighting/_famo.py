"""FAMO: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_aw._utils import AdamState, reduce_sum
from lightning_aw.functional import famo_logit_grad, famo_loss, famo_weights
from lightning_aw.module import MultiTaskModule
from lightning_aw.step import StepRecord
from lightning_aw.weighting._base import Interval
from lightning_aw.weighting._positive import (
    PositiveLossWeighting,
    _per_task_tensor,
    _validate_per_task,
)

LossesAfter = Literal["same_batch", "next_batch"]
_LOSSES_AFTER = ("same_batch", "next_batch")


class FAMO(PositiveLossWeighting, name="famo", functional="famo_weights", stateful=True):
    r"""FAMO: balance the tasks' rates of improvement with one extra forward pass per step (or none,
    ``losses_after="next_batch"``).

    Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
    https://arxiv.org/abs/2306.03792, Alg. 2.

    With logits :math:`\xi` (:math:`\xi_0 = 0`), :math:`z = \operatorname{softmax}(\xi)` and the
    gaps :math:`D_i = L_i - L_i^{\min} + \epsilon`, the network minimises

    .. math::

        \mathcal{L} = c \sum_i z_i \log D_i, \qquad
        c = \Bigl(\sum_i z_i / D_i\Bigr)^{-1} \text{ (held constant)},

    i.e. the update :math:`\sum_i w_i\nabla L_i` with effective weights :math:`w_i = c z_i/D_i`,
    which **sum to 1**. After each optimizer step the task losses are recomputed on the *same*
    batch without gradients, and the logits take an Adam step on

    .. math::

        \delta = J_{\operatorname{softmax}}(\xi)^\top\bigl[\log D(t) - \log D(t+1)\bigr],
        \qquad \xi \leftarrow \operatorname{Adam}(\xi;\ \delta + \gamma\xi),

    so a task whose loss fell faster than the others loses weight.

    Conventions:

    - The logits are *not* in the user's optimizer: FAMO owns a small Adam (``lr``, default the
      paper's 0.025; L2 decay ``gamma``, default ``1e-3``) whose state is saved with the
      callback's. The paper also clips the network's gradient norm at 1.0: pass
      ``gradient_clip_val=1.0`` to the Trainer to do the same.
    - The recomputation (``losses_after="same_batch"``, the default) calls
      ``pl_module.task_losses(batch, batch_idx)`` under ``torch.no_grad()`` and the precision
      plugin's autocast, in training mode (as the official code does: batch-norm running
      statistics see the batch twice and dropout draws new masks). It costs one forward pass per
      optimizer step; keep ``task_losses`` free of side effects (logging, metric updates), since
      it runs twice per step.
    - With ``accumulate_grad_batches=k`` the logits are updated once per optimizer step, from the
      last micro-batch of the window (its losses before and after the step).
    - Under DDP the losses before and after are averaged over the ranks (per task, over the ranks
      where it is present) before :math:`\delta` is formed, so every rank holds the same logits.
      The effective weights :math:`c z_i/D_i` use the rank-averaged losses too, so every rank
      applies the same weights to its own losses.
    - A step skipped by ``MultiTaskModule(on_nonfinite="skip")`` or by the fp16 GradScaler leaves
      the logits unchanged; a non-finite :math:`\delta` (e.g. a loss that overflowed) skips the
      Adam step.
    - Every loss must stay above its ``min_losses`` bound (default 0): a loss at its bound would
      take all the weight (:math:`D_i = \epsilon`), so :class:`~lightning_aw.MultiTaskModule`
      raises a ``ValueError`` naming the task at the step it happens. Losses that can be 0 or
      negative need a lower ``min_losses``. A loss re-evaluated after the step at or below its
      bound leaves that task out of that logit update.

    ``losses_after="next_batch"`` (our approximation, **not** the paper's algorithm): no
    re-evaluation at all. The losses before a step (:math:`L_t(\theta_t)`, the last micro-batch of
    its window) are kept as a pending update, and the next optimizer step's first training
    micro-batch supplies :math:`L_{t+1}(\theta_{t+1})`, the losses it computes anyway for its own
    training step: the logits take the same Adam step on :math:`\delta` (same DDP averaging, same
    presence masks, same ``frequency``/``interval`` rule) *before* that step's weights are formed,
    so every step's weights come from the same logits as with ``"same_batch"``. It costs no
    extra forward pass (``task_losses`` runs once per micro-batch), but :math:`\delta` then also
    holds the difference between two batches' losses: noise that averages out over steps, on top
    of the step's effect. Use it when the forward pass is a large part of the step (convolutional
    trunks, large inputs: on our CPU benchmark CNN the re-evaluation makes ``"same_batch"`` cost
    1.3-1.5x the plain step). Details:

    - The logits between two steps (:attr:`logits` read after a step, e.g. by a monitor) lag one
      update behind; the update of the last step of a run is never applied.
    - Pending updates follow the rule of skipped steps: a step that was not taken (the GradScaler
      or ``on_nonfinite="skip"`` skipped it) leaves no pending update, and a pending update
      consumed by a step that is then skipped is rolled back with the rest of the state and
      applied at the next step that is taken (its losses are still at :math:`\theta_{t+1}`).
    - The pending losses and their presence mask are checkpointed: a resumed run continues
      exactly.

    The weights reported (``weights/<task>``) are the effective weights of the last training step
    (``1/T`` before the first); ``famo/z/<task>`` logs :math:`z`. :attr:`logits` gives
    :math:`\xi`.

    Args:
        lr: learning rate of the logits' Adam (default 0.025, the paper's).
        gamma: L2 decay :math:`\gamma \ge 0` of the logits (default ``1e-3``).
        min_losses: :math:`L^{\min}`, lower bounds of the task losses: one number per task (in the
            module's task order) or a mapping of task name to bound (missing tasks: 0).
            Default: 0 for every task.
        eps: :math:`\epsilon` added to the gaps (default ``1e-8``, the paper's).
        frequency: update the logits every ``frequency`` optimizer steps (default 1, the paper)
            or epochs; with ``losses_after="same_batch"`` each update costs one extra no-grad
            forward of the step's last batch, so ``frequency=N`` divides that overhead by N.
        interval: ``"step"`` (default) or ``"epoch"`` (update on the first optimizer step of
            every ``frequency``-th epoch).
        losses_after: where :math:`L(\theta_{t+1})` comes from: ``"same_batch"`` (default, the
            paper: a no-grad re-evaluation of the step's batch) or ``"next_batch"`` (the next
            optimizer step's own training losses, no extra forward; see above).

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import FAMO
        >>> from lightning_aw.functional import famo_weights
        >>> method = FAMO(gamma=1e-3)
        >>> trainer = pl.Trainer(callbacks=[method], gradient_clip_val=1.0, logger=False)
        >>> famo_weights(torch.tensor([1.0, 4.0]), logits=torch.zeros(2))  # w_i ∝ 1 / L_i
        tensor([0.8000, 0.2000])
    """

    total: ClassVar[str | float | None] = 1
    _state_attrs = ("_logits", "_adam", "_weights", "_update_epoch")
    uses_window_means = False  # it updates from the step's own before/after losses
    loss_requirement = "task losses above their `min_losses` (it takes the logarithm of the gap)"
    loss_remedy = (
        "Pass FAMO(min_losses=...) with a lower bound below every value the loss can take "
        "(e.g. its known minimum, or a negative number for losses that can be negative)."
    )

    def __init__(
        self,
        lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: Sequence[float] | Mapping[str, float] | None = None,
        eps: float = 1e-8,
        frequency: int = 1,
        interval: Interval = "step",
        losses_after: LossesAfter = "same_batch",
    ) -> None:
        if interval is None:
            raise ValueError("Parameter `interval` should be 'step' or 'epoch'. Found None.")
        if losses_after not in _LOSSES_AFTER:
            raise ValueError(
                "Parameter `losses_after` should be 'same_batch' (re-evaluate the step's batch, "
                "the paper) or 'next_batch' (the next step's own losses, no extra forward). "
                f"Found {losses_after!r}."
            )
        super().__init__(interval=interval, frequency=frequency)
        self._update_epoch = -1
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise ValueError(f"Parameter `lr` should be a finite number > 0. Found {lr!r}.")
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, (int, float))
            or not 0 <= gamma < float("inf")
        ):
            raise ValueError(f"Parameter `gamma` should be a finite number >= 0. Found {gamma!r}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise ValueError(f"Parameter `eps` should be a number in [0, 1). Found {eps!r}.")
        self.lr = float(lr)
        self.gamma = float(gamma)
        self.eps = float(eps)
        self.min_losses = _validate_per_task(min_losses, "min_losses")
        self.losses_after: LossesAfter = losses_after
        self._adam = AdamState(lr=self.lr, weight_decay=self.gamma)
        self._logits = torch.zeros(0)
        self._weights = torch.ones(0)
        self._min = torch.zeros(0)
        self._before: Tensor | None = None
        self._before_present: Tensor | None = None
        # "next_batch": the losses (and mask) before the last update step, awaiting the next
        # step's losses (checkpointed, rolled back with a skipped step)
        self._pending: Tensor | None = None
        self._pending_present: Tensor | None = None
        self._before_all = self._pending_all = False  # host-side hints of the fast path

    def hparams_repr(self) -> dict[str, Any]:
        out = {
            "lr": self.lr,
            "gamma": self.gamma,
            "min_losses": self.min_losses,
            "eps": self.eps,
            "frequency": self.frequency,
            "interval": self.interval,
        }
        if self.losses_after != "same_batch":
            # only when set: the default's repr and state key (checkpoints) stay as they were
            out["losses_after"] = self.losses_after
        return out

    def _state_names(self) -> tuple[str, ...]:
        names = super()._state_names()
        if self.losses_after == "next_batch":
            names = (*names, "_pending", "_pending_present")
        return names

    def init_state(self, num_tasks: int) -> None:
        super().init_state(num_tasks)
        self._logits = torch.zeros(num_tasks)
        self._weights = torch.full((num_tasks,), 1.0 / num_tasks)
        self._min = _per_task_tensor(self.min_losses, self.tasks, "min_losses")

    def _move_state(self, device: torch.device) -> None:
        super()._move_state(device)
        self._min = self._min.to(device)

    def loss_floor(self, like: Tensor) -> Tensor | None:
        """``min_losses``: a loss at (or below) its minimum would get all the weight (the gap
        ``L - L_min + eps`` is then ``eps``), so it is an error at the step it happens."""
        return self._min.to(like)

    @property
    def logits(self) -> Tensor:
        r"""FAMO's logits :math:`\xi`, shape ``[T]`` (:math:`z = \operatorname{softmax}(\xi)`)."""
        return self._logits

    def weight_tensor(self) -> Tensor:
        return self._weights

    def log_items(self) -> dict[str, Tensor]:
        z = torch.softmax(self._logits, dim=0)
        return {f"famo/z/{t}": z[i] for i, t in enumerate(self.tasks)}

    def combine(self, losses: Tensor, present: Tensor) -> Tensor:
        current = losses.detach()
        usable = present  # the module checked that every present loss is above its bound
        local = famo_weights(current, self._logits, self._min, usable, eps=self.eps)
        loss, self._weights = self._shared_weights(
            famo_loss(losses, self._logits, self._min, usable, eps=self.eps),
            losses,
            usable,
            local,
            lambda mean, anywhere: famo_weights(
                mean, self._logits, self._min, anywhere, eps=self.eps
            ),
        )
        return loss

    def combine_step(self, step: StepRecord) -> Tensor:
        if not all(step.present_list):
            return super().combine_step(step)
        # every loss present and checked above its minimum: every gap D_i = L_i - L_min + eps
        # is positive, so `combine` without its masks (z the plain softmax of the logits)
        losses = step.losses
        gaps = losses - self._min.to(losses) + self.eps
        z = torch.softmax(self._logits.to(losses.dtype), dim=0)
        ratio = z / gaps.detach()
        inv = ratio.sum()
        loss = (z * torch.log(gaps)).sum() / inv
        local = ratio / inv
        loss, self._weights = self._shared_weights(
            loss,
            losses,
            step.present,
            local,
            lambda mean, anywhere: famo_weights(
                mean, self._logits, self._min, anywhere, eps=self.eps
            ),
        )
        return loss

    def _updates_now(self, trainer: pl.Trainer) -> bool:
        if self.interval == "step":
            return self._optimizer_steps % self.frequency == 0
        epoch = trainer.current_epoch  # "epoch": the first optimizer step of every N-th epoch
        if epoch % self.frequency != 0 or epoch == self._update_epoch:
            return False
        self._update_epoch = epoch
        return True

    def observe(self, step: StepRecord) -> None:
        super().observe(step)
        # the losses the coming optimizer step is taken on (the last micro-batch's)
        self._before = step.losses.detach()
        self._before_present = step.present
        self._before_all = all(step.present_list)  # known on the host: no synchronisation

    def step_loss(self, step: StepRecord) -> Tensor:
        if self._pending is not None:
            # "next_batch": the first micro-batch after an update step closes its update (before
            # this step's weights are formed), with its own losses as L(theta_{t+1})
            before, present = self._pending, self._pending_present
            checked, self._pending_all = self._pending_all and all(step.present_list), False
            self._pending = self._pending_present = None
            if present is not None:
                self._apply_logit_update(
                    step.trainer, before, present, step.losses, step.present, checked=checked
                )
        return super().step_loss(step)

    def after_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().after_optimizer_step(trainer, pl_module, batch, batch_idx)
        before, present = self._before, self._before_present
        before_all, self._before_all = self._before_all, False
        self._before = self._before_present = None
        if not self._updates_now(trainer):
            return  # between updates: no re-evaluation, the logits stay
        if before is None or present is None:
            return
        if self.losses_after == "next_batch":
            self._pending, self._pending_present = before, present
            # a host-side hint for the fast path (not state: after a resume or a rollback the
            # general path runs, which gives the same update)
            self._pending_all = before_all
        else:
            self._update_logits(trainer, pl_module, batch, batch_idx, before, present)

    def _update_logits(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        before: Tensor,
        present: Tensor,
    ) -> None:
        """``"same_batch"``: re-evaluate the step's batch at the new parameters, then update."""
        if not isinstance(pl_module, MultiTaskModule):
            return
        with torch.no_grad(), trainer.precision_plugin.train_step_context():
            after, after_present = pl_module.compute_losses(batch, batch_idx)
        self._apply_logit_update(trainer, before, present, after, after_present)

    def _apply_logit_update(
        self,
        trainer: pl.Trainer | None,
        before: Tensor,
        present: Tensor,
        after: Tensor,
        after_present: Tensor,
        checked: bool = False,
    ) -> None:
        """One Adam step of the logits on delta from the losses before and after a step (tasks
        present in both; averaged over the DDP ranks where present).

        ``checked``: every task is present in both and both sets of losses passed the module's
        check (above ``min_losses``), so every gap is positive: on one process delta is then
        formed without the masks (the same values, a few kernels instead of a hundred).
        """
        after = after.detach().float()
        if checked and (trainer is None or trainer.world_size == 1):
            floor = self._min.to(after)
            delta = torch.log(before - floor + self.eps) - torch.log(after - floor + self.eps)
            z = torch.softmax(self._logits.to(delta.dtype), dim=0)
            self._logits = self._adam.update(self._logits, z * (delta - (z * delta).sum()))
            return
        present = present & after_present
        if trainer is not None and trainer.world_size > 1:
            zero = torch.zeros_like(before)
            stats = torch.cat(
                [
                    torch.where(present, before, zero),
                    torch.where(present, after, zero),
                    present.to(before.dtype),
                ]
            )
            before_sum, after_sum, count = reduce_sum(trainer, stats).chunk(3)
            present = count > 0
            before = before_sum / count.clamp_min(1.0)
            after = after_sum / count.clamp_min(1.0)
        grad = famo_logit_grad(self._logits, before, after, self._min, present, eps=self.eps)
        self._logits = self._adam.update(self._logits, grad)
