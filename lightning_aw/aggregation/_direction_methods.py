"""GradDrop and DB-MTL: gradient methods whose update is not a combination ``c^T G``.

Both deliver their update inside the ONE ordinary backward Lightning runs: the heads get the
gradient of the returned loss, and the shared trunk receives the method's own gradient through a
zero-valued surrogate (see :class:`~lightning_aw.aggregation.GradientWeighting`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_aw._utils import GeneratorState
from lightning_aw.aggregation._base import GradientWeighting, Source
from lightning_aw.engine import TaskGradients, flatten, inject, present_mean
from lightning_aw.functional import _direction as G
from lightning_aw.step import StepRecord

__all__ = ["DBMTL", "GradDrop"]


class GradDrop(
    GradientWeighting,
    name="graddrop",
    stateful=True,
    stochastic=True,
    needs_representation=True,
    constant_weights=True,
):
    r"""Gradient sign dropout on the shared representation.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout", NeurIPS 2020, https://arxiv.org/abs/2010.06808.

    With :math:`\nabla_i` the gradient of :math:`L_i` with respect to the shared representation
    :math:`z` (through task ``i``'s head only), the trunk receives the sign-dropout mixture
    :math:`g_z = \sum_i \big(\ell_i + (1-\ell_i) M_i\big)\,\nabla_i` of
    :func:`lightning_aw.functional.graddrop` (the sign purity :math:`\mathcal P` and the masks
    :math:`M_i` are defined there), with :math:`U \sim \mathcal U(0, 1)` drawn per element, and
    :math:`g_z` is backpropagated through the trunk. The module must mark its
    representation with :meth:`MultiTaskModule.shared_representation
    <lightning_aw.MultiTaskModule.shared_representation>`.

    One training step costs ``T`` backward passes through the heads and one ordinary backward:
    the step returns :math:`\sum_i L_i + \langle g_z, z\rangle - \langle g_z, z\rangle|_{\text{
    detached}}`, so Lightning's single backward gives

    - every head the plain gradient of its own loss :math:`\nabla L_i` (as in the paper, where
      GradDrop is a layer below the heads),
    - the trunk the GradDrop gradient :math:`g_z` (the surrogate has value 0).

    Conventions:

    - Sign purity is computed per element of :math:`z` (no batch summation); multiplying by
      :math:`\operatorname{sgn}(z)` first (the paper's Algorithm 1) does not change the
      distribution of the per-element mask, since :math:`1 - U` is uniform as well.
    - :math:`g_z` is formed from the gradients of the undivided, unscaled losses (per-task
      gradients of the GradScaler-scaled losses, unscaled, in float32); Lightning scales the
      returned loss and divides it by ``accumulate_grad_batches`` itself, so with accumulation
      each micro-batch contributes :math:`g_z / k` and draws its own mask.
    - ``weights`` are 1 for every task (the heads' effective weight; the update is a mask, not
      coefficients), so they sum to ``T``. Absent tasks contribute nothing.
    - Randomness: :math:`U` is drawn from a CPU generator seeded with ``seed`` (identical on every
      DDP rank, saved in checkpoints so a resumed run draws what the uninterrupted run would)
      and moved to the device. Exactly one draw per training micro-batch, whatever happens.
    - DDP: each rank masks its own micro-batch's representation gradients (the representation
      of another rank holds other samples); DDP averages the resulting parameter gradients.
    - A step whose per-task gradients are not finite (an fp16 overflow) sends the plain sum
      :math:`\sum_i \nabla_i` to the trunk, so the GradScaler sees the overflow and skips the step;
      it is counted in ``aggregation/fallbacks``.

    Args:
        leak: :math:`\ell`: a float in ``[0, 1]`` for every task, or one per task (in task order).
            0 (default, the paper) drops every gradient of the minority sign; 1 is the plain sum.
        seed: seed of the random draws.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_aw import GradDrop, MultiTaskModule
        >>> class Net(MultiTaskModule):
        ...     def __init__(self):
        ...         super().__init__(tasks=["a", "b"])
        ...         self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        ...         self.heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
        ...     def shared_parameters(self):
        ...         return self.trunk.parameters()
        ...     def task_losses(self, batch, batch_idx):
        ...         x, y = batch
        ...         h = self.shared_representation(self.trunk(x))  # GradDrop acts here
        ...         return {t: F.mse_loss(self.heads[t](h).squeeze(-1), y[:, i])
        ...                 for i, t in enumerate(self.tasks)}
        ...
        >>> data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 2)), batch_size=8)
        >>> trainer = pl.Trainer(callbacks=[GradDrop(leak=0.0, seed=0)], max_epochs=1, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(Net(), data)
        >>> trainer.global_step
        4
    """

    total: ClassVar[str | float | None] = "T"
    _state_attrs: ClassVar[tuple[str, ...]] = (*GradientWeighting._state_attrs, "_generator")

    def __init__(self, leak: float | Sequence[float] = 0.0, seed: int = 0) -> None:
        super().__init__(source="representation")
        if isinstance(leak, (int, float)) and not isinstance(leak, bool):
            values = [float(leak)]
            self.leak: float | tuple[float, ...] = float(leak)
        elif isinstance(leak, Sequence) and not isinstance(leak, str) and len(leak) > 0:
            values = [float(v) for v in leak]
            self.leak = tuple(values)
        else:
            raise ValueError(
                f"Parameter `leak` should be a float in [0, 1] or a list of them (one per task). "
                f"Found {leak!r}."
            )
        if not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"Parameter `leak` should be in [0, 1]. Found {leak!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"Parameter `seed` should be an int >= 0. Found {seed!r}.")
        self.seed = seed
        self._generator = GeneratorState(seed)

    def hparams_repr(self) -> dict[str, Any]:
        leak = list(self.leak) if isinstance(self.leak, tuple) else self.leak
        return {"leak": leak, "seed": self.seed}

    def init_state(self, num_tasks: int) -> None:
        super().init_state(num_tasks)
        if isinstance(self.leak, tuple) and len(self.leak) != num_tasks:
            raise ValueError(
                f"{self!r} has {len(self.leak)} leak values but the module has {num_tasks} tasks "
                f"{self.tasks}; give one per task, in task order, or a single float."
            )

    def _leak_on(self, device: torch.device) -> Tensor:
        """The leak as a tensor on ``device``, copied there once (no per-step host copy)."""
        cached = getattr(self, "_leak_tensor", None)
        if cached is None or cached.device != device:
            cached = torch.tensor(self.leak, dtype=torch.float32, device=device)
            self._leak_tensor = cached
        return cached

    def step_loss(self, step: StepRecord) -> Tensor:
        losses = step.losses
        plain = losses.sum()  # absent tasks are constant zeros
        if not torch.is_grad_enabled() or not losses.requires_grad:
            return plain
        engine = self.engine(step)
        engine.representation()  # a clear error when the module marked none
        rep = step.representation_graph
        if rep is None:  # nothing trainable produces the representation
            return plain
        heads = self._head_params(step)
        if heads is None:
            grads = engine.on_representation()
        else:  # the heads' gradients from the same passes: one traversal of the heads
            rows, head_rows = engine.on_representation_and_heads_scaled(heads)
            grads = engine.stack(rows, engine.representation())
        ok = torch.isfinite(grads)
        finite = ok.all()
        leak = self._leak_on(grads.device)
        # always one draw per micro-batch, so the generator stays in step on every rank
        # the unchecked variant: the leak was validated in __init__ and the gradients are made
        # finite here, so the step costs no host synchronisation
        work = torch.float64 if grads.dtype == torch.float64 else torch.float32
        dropped = G._graddrop(
            torch.where(ok, grads, 0.0).to(work), leak, self._generator.generator
        ).to(grads.dtype)
        g_z = torch.where(finite, dropped, grads.sum(0))
        self._fallbacks = self._fallbacks.to(grads.device) + (~finite).float()
        if heads is None:
            return plain + inject([rep], [g_z])
        ones = torch.ones(step.num_tasks, device=grads.device)  # the heads train on the sum
        return (
            plain.detach()
            + inject([rep], [g_z])
            + self._heads_surrogate(engine, heads, head_rows, ones)
        )


class DBMTL(GradientWeighting, name="db_mtl", stateful=True):
    r"""Dual-balancing multi-task learning: log losses, and gradients scaled to the largest norm.

    Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", 2023,
    https://arxiv.org/abs/2308.12029.

    Loss-scale balancing: every task is trained on :math:`\log L_i`. Gradient-magnitude balancing
    on the shared part: with :math:`g_i` the gradient of :math:`L_i`, an exponential moving
    average of the log-gradients and the direction

    .. math::

        \hat g_i \leftarrow \beta\,\hat g_i + (1-\beta)\,\frac{g_i}{L_i}, \qquad
        d = \sum_i \frac{\max_j\lVert\hat g_j\rVert}{\lVert\hat g_i\rVert}\,\hat g_i

    (:func:`lightning_aw.functional.db_mtl`), taken on ``shared_parameters()`` (default) or on
    the shared representation (``source="representation"``).

    One ordinary backward carries the update: the step returns :math:`\sum_i \log L_i` plus a
    zero-valued surrogate that hands the trunk :math:`d`. So

    - every head gets :math:`\nabla \log L_i = \nabla L_i / L_i` (the paper: task-specific
      parameters follow the log loss),
    - the shared parameters get :math:`d` (``source="parameters"``), or the representation
      gets :math:`d` and the trunk its backpropagation (``source="representation"``),
    - parameters that produce the marked representation but are not in ``shared_parameters()``
      get :math:`\sum_i \nabla \log L_i`.

    Cost per step: ``T`` extra backward passes through the heads when the module marks its
    representation (plus ``T`` through the trunk for the parameter source), else ``T`` full
    extra backward passes to the shared parameters; then Lightning's one backward.

    Conventions:

    - The EMA starts at the first log-gradients (no bias towards zero), advances once per
      training micro-batch (so with ``accumulate_grad_batches=k`` a window's update is the mean of
      its ``k`` micro-batch directions), and is kept, float32 ``[T, P]``, on the module's device
      and in checkpoints (for exact resume). :math:`g_i` are the gradients of the undivided,
      unscaled losses (GradScaler-scaled, then unscaled); Lightning divides the returned loss by
      ``accumulate_grad_batches`` itself.
    - ``loss/total`` logs :math:`\sum_i \log L_i`. ``weights`` are
      :math:`w_i = s_i / L_i`, :math:`s_i = \max_j\lVert\hat g_j\rVert / \lVert\hat g_i\rVert`:
      the coefficient of :math:`g_i` in :math:`d` when :math:`\beta = 0` (not normalised; 1
      before the first step, 0 for a task absent from the step). :math:`s_i` is logged as
      ``aggregation/scale/<task>``.
    - Tasks absent from a step keep their EMA row and do not contribute to that step's :math:`d`.
    - DDP, parameter source: the per-task gradients and losses are averaged over the ranks
      before the EMA (a ``T×P`` all-reduce), so the EMA, :math:`d` and the weights are identical
      on every rank. Representation source: each rank keeps the EMA of its own representation
      gradients (other ranks' representations hold other samples; DDP averages the resulting
      parameter gradients), so the weights may differ between ranks. The EMA over the
      representation assumes a fixed batch shape: a batch of another shape (e.g. a smaller last
      batch) restarts it.
    - Every present task loss must be positive (:math:`\log L_i`): the module checks it at every
      step, within its finiteness check, and a clear error names the task.
    - A step whose per-task gradients are not finite (an fp16 overflow) leaves the EMA untouched
      and sends the trunk :math:`\sum_i g_i / L_i`, so the GradScaler skips the step; it is
      counted in ``aggregation/fallbacks``.

    Args:
        beta: EMA factor :math:`\beta \in [0, 1)` (0.9, the paper).
        source: ``"parameters"`` (gradients on ``shared_parameters()``, default) or
            ``"representation"`` (on the tensor passed to ``shared_representation()``).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_aw import DBMTL
        >>> method = DBMTL(beta=0.9)  # every task loss must be positive: DB-MTL takes log L_i
        >>> method
        DBMTL(beta=0.9, source='parameters')
        >>> trainer = pl.Trainer(callbacks=[method], logger=False)
    """

    _state_attrs: ClassVar[tuple[str, ...]] = (*GradientWeighting._state_attrs, "_ema", "_seen")
    requires_positive_losses: ClassVar[bool] = True
    loss_requirement: ClassVar[str] = "positive task losses (it takes log L_i)"

    def __init__(self, beta: float = 0.9, *, source: Source = "parameters") -> None:
        super().__init__(source=source)
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Parameter `beta` should be in [0, 1). Found {beta!r}.")
        self.beta = float(beta)
        self._ema = torch.zeros(0, 0)
        self._seen = torch.zeros(0, dtype=torch.bool)
        self._scales = torch.zeros(0)
        self._last_ok = torch.ones((), dtype=torch.bool)
        self._index_cache: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def hparams_repr(self) -> dict[str, Any]:
        return {"beta": self.beta, "source": self.source}

    def init_state(self, num_tasks: int) -> None:
        super().init_state(num_tasks)
        self._ema = torch.zeros(num_tasks, 0)
        self._seen = torch.zeros(num_tasks, dtype=torch.bool)
        self._scales = torch.ones(num_tasks)

    def log_items(self) -> dict[str, Tensor]:
        items = super().log_items()
        if self._scales.numel() == len(self.tasks):
            items.update(
                {f"aggregation/scale/{t}": self._scales[i] for i, t in enumerate(self.tasks)}
            )
        return items

    # ------------------------------------------------------------------ the step
    def step_loss(self, step: StepRecord) -> Tensor:
        losses, present = step.losses, step.present
        if not torch.is_grad_enabled() or not losses.requires_grad:
            return (self._coefs.to(losses) * losses).sum()
        # per-task gradients are taken of (the scaled) log L_i: the magnitude Lightning's
        # backward of sum_i log L_i has, so they overflow in fp16 exactly when it does
        logs = torch.log(torch.where(present, losses, torch.ones_like(losses)))
        log_loss = logs.sum()
        # per task, each with its own graph (the engine differentiates them one by one)
        task_logs = [None if loss is None else torch.log(loss) for loss in step.task_losses]
        detached = losses.detach()
        engine = self.engine(step)
        rep = step.representation_graph
        if self.source == "representation":
            engine.representation()  # a clear error when the module marked none
            if rep is None:
                return log_loss
            heads = self._head_params(step)
            if heads is None:
                log_grads = engine.on_representation(task_logs).reshape(step.num_tasks, -1)
            else:  # the heads' gradients from the same passes: one traversal of the heads
                rows, head_rows = engine.on_representation_and_heads_scaled(heads, task_logs)
                log_grads = engine.stack(rows, engine.representation())
                log_grads = log_grads.reshape(step.num_tasks, -1)
            d = self._direction(step, log_grads, detached, reduce=False)
            if heads is None:
                return log_loss + inject([rep], [d])
            return (
                log_loss.detach()
                + inject([rep], [d])
                + self._heads_surrogate(engine, heads, head_rows, torch.ones_like(detached))
            )
        if rep is not None:  # marked representation: through the heads only, then the trunk
            targets = self._upstream_params(engine, step)
            heads = self._head_params(step)
            if heads is None:
                rows = engine.on_representation_scaled(task_logs)
            else:
                rows, head_rows = engine.on_representation_and_heads_scaled(heads, task_logs)
            per_task = _unscaled(engine, engine.through_representation_scaled(rows, targets))
            n_shared = self._num_shared
            d = self._direction(step, flatten(per_task, targets[:n_shared]), detached, reduce=True)
            out = _split(d, targets[:n_shared])
            for j in range(n_shared, len(targets)):  # upstream but not declared shared
                out.append(sum((g[j] for g in per_task if g is not None), torch.zeros(())))
            if heads is None:
                return log_loss + engine.deliver(targets, out)
            return (
                log_loss.detach()
                + engine.deliver(targets, out)
                + self._heads_surrogate(engine, heads, head_rows, torch.ones_like(detached))
            )
        # no marked representation: gradients on the shared parameters; the backward of
        # sum_i log L_i already brings them sum_i g_i / L_i, so inject only the difference
        params = self._params
        per_task = _unscaled(
            engine, engine.on_parameters_scaled(params, task_logs, names=self._shared_names())
        )
        log_grads = flatten(per_task, params)
        local = log_grads.sum(0)
        d = self._direction(step, log_grads, detached, reduce=True)
        delta = torch.where(self._last_ok, d - local, torch.zeros_like(d))
        return log_loss + engine.deliver(params, _split(delta, params))

    # ------------------------------------------------------------------ internals
    def _direction(
        self, step: StepRecord, log_grads: Tensor, losses: Tensor, reduce: bool
    ) -> Tensor:
        """Advance the EMA with the log-gradients ``[T, P]`` and return the direction ``[P]``.

        ``reduce``: average the gradients ``g_i = L_i * log_grads_i`` and the losses over the DDP
        ranks (per task, over the ranks where it is present), then divide: the log-gradients of
        the global batch. Sets ``self._last_ok`` (a 0-d bool tensor): False when the gradients
        were not finite (then the direction is the plain sum of the log-gradients and the EMA
        is left untouched).
        """
        num, size = log_grads.shape
        losses = losses.to(log_grads.dtype)
        if reduce and step.world_size > 1:
            mask = step.present.to(log_grads.dtype)
            grads, count, (loss_sum,) = present_mean(
                step.trainer, log_grads * losses[:, None], step.present, losses * mask
            )
            losses = loss_sum / count.clamp_min(1.0)
            log_grads = grads / losses.clamp_min(1e-30)[:, None]
            idx = (count > 0).nonzero().flatten().tolist()  # host sync, DDP only
        else:
            idx = step.present_index
        ix = self._index(idx, log_grads.device)
        everyone = len(idx) == num  # the usual case: no gathers and scatters of [T, P] rows
        sub, sub_losses = (log_grads, losses) if everyone else (log_grads[ix], losses[ix])
        ema, seen = self._ema, self._seen.to(sub.device)
        if ema.shape != log_grads.shape:  # first step (or a representation of another shape)
            ema = torch.zeros(num, size, device=sub.device)
            seen = torch.zeros(num, dtype=torch.bool, device=sub.device)
        ema = ema.to(sub.device)
        # a task seen before continues its EMA, beta * ema + (1 - beta) * g; a new one starts
        # from its log-gradient (weight 0: its EMA row is zero, and finite: it only ever takes
        # finite values). One pass over [T', P].
        seen_sub = seen if everyone else seen[ix]
        weight = (seen_sub.to(sub.dtype) * self.beta)[:, None]
        new = torch.lerp(sub, ema if everyone else ema[ix], weight)
        # rows rescaled to the largest norm (norms computed safe from overflow), summed
        tiny = torch.finfo(new.dtype).tiny
        amax = new.abs().amax(dim=1)
        norms = (new / amax.clamp_min(tiny)[:, None]).norm(dim=1) * amax
        scales = torch.where(norms > 0, norms.max() / norms.clamp_min(tiny), 0.0)
        d = scales @ new
        # not finite (an fp16 overflow, or an overflowing direction): keep the EMA and the
        # coefficients, use the plain sum and let the scaler skip the step; no host sync. A
        # non-finite entry of the gradients makes its column sum non-finite, so the sum (the
        # fallback direction) doubles as the check; what the non-finite values reach below is
        # discarded by the `where`s.
        plain = sub.sum(0)
        ok = torch.isfinite(plain).all() & torch.isfinite(d).all()
        self._last_ok = ok
        self._fallbacks = self._fallbacks.to(sub.device) + (~ok).float()
        if everyone:
            self._ema = torch.where(ok, new.to(ema.dtype), ema)
            self._seen = ok | seen
        else:
            updated = ema.clone()
            updated[ix] = new.to(ema.dtype)
            seen_now = seen.clone().index_fill_(0, ix, True)  # (indexing with `= True` copies)
            self._ema = torch.where(ok, updated, ema)
            self._seen = torch.where(ok, seen_now, seen)
        coefs = (scales / sub_losses).float()
        scales_all = scales.float()
        if not everyone:
            coefs = torch.zeros(num, device=sub.device).index_copy(0, ix, coefs)
            scales_all = torch.zeros(num, device=sub.device).index_copy(0, ix, scales_all)
        if self._coefs.shape == coefs.shape:
            coefs = torch.where(ok, coefs, self._coefs.to(coefs.device))
        if self._scales.shape == scales_all.shape:
            scales_all = torch.where(ok, scales_all, self._scales.to(coefs.device))
        self._coefs, self._scales = coefs, scales_all
        return torch.where(ok, d, plain)

    def _index(self, idx: list[int], device: torch.device) -> Tensor:
        """The present tasks' indices as a tensor on ``device``, copied there once per pattern."""
        key = (tuple(idx), device)
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(idx, device=device, dtype=torch.long)
        return self._index_cache[key]


def _unscaled(
    engine: TaskGradients, per_task: list[list[Tensor] | None]
) -> list[list[Tensor] | None]:
    return [None if g is None else [engine.unscale(x) for x in g] for g in per_task]


def _split(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].view(p.shape))
        start += p.numel()
    return out
