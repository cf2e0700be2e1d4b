"""The gradient-based family: coefficients from per-task gradients (through the engine)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_aw._sharding import (
    Unsharder,
    any_sharded,
    check_parameter_gradients,
    strategy_name,
)
from lightning_aw._utils import all_reduce_sum
from lightning_aw.engine import (
    TaskGradients,
    combine_per_task,
    flatten,
    gram_by_layer,
    inject,
    present_mean,
)
from lightning_aw.method import Interval, Weighting
from lightning_aw.step import StepRecord

Source = Literal["parameters", "representation"]
DDPSync = Literal["gram", "gradients"]


#: strategies whose parameters are the tensors the forward reads (no flat or sharded parameters):
#: there a cut representation's heads get their gradients from the per-task passes
_PLAIN_STRATEGIES = frozenset({"SingleDeviceStrategy", "DDPStrategy"})
#: precisions without autocast or low-precision parameters: there the per-task head gradients
#: combined in float32 equal the combined loss's backward to float32 rounding (under bf16/fp16
#: the two round differently, and FSDP2, which keeps the combined backward, must match DDP)
_FULL_PRECISION = frozenset({"32-true", "64-true", "32", "64"})


class GradientWeighting(Weighting):
    r"""Base class of the methods that weigh the tasks from their gradients (PCGrad, MGDA, ...).

    Every step, inside ``training_step``:

    1. the per-task gradients :math:`G = [g_1; \dots; g_T]` are taken with
       ``torch.autograd.grad`` on the shared parameters (``source="parameters"``, the default:
       :meth:`MultiTaskModule.shared_parameters`) or on the shared representation
       (``source="representation"``, MGDA-UB style and much cheaper: the tensor passed to
       :meth:`MultiTaskModule.shared_representation`);
    2. the method turns them into coefficients :math:`c` (from the Gram matrix :math:`GG^\top`
       where it can);
    3. the step returns :math:`c^\top L` with :math:`c` detached, and Lightning runs ONE ordinary
       backward of it. Its precision plugin scales it, it is divided by
       ``accumulate_grad_batches``, clipped and all-reduced by DDP as any loss.

    So the network's update is exactly :math:`\sum_i c_i \nabla L_i`: the shared parameters get
    the aggregated gradient :math:`c^\top G`, and the task heads get their own gradient weighted
    by :math:`c_i` (in both sources; the encoder keeps training in representation mode too).

    Conventions:

    - Per-task gradients are taken of the GradScaler-scaled losses (fp16) and unscaled, in float32
      (bf16 and fp16 gradients are upcast), and divided by ``accumulate_grad_batches`` so they are
      the gradients of the losses Lightning backpropagates.
    - Tasks absent from the batch get coefficient 0 and are left out of the method.
    - DDP: with ``ddp_sync="gram"`` (default) the ranks average their local Gram matrices (a
      ``T×T`` all-reduce); with ``ddp_sync="gradients"`` they average the per-task gradients
      first (a ``T×P`` all-reduce), so the method acts on the global gradients. Either way every
      rank applies identical coefficients.
    - A step whose gradients or coefficients are not finite (an fp16 overflow, a NaN) falls back to
      coefficients 1 (the plain sum) and is counted in ``aggregation/fallbacks``; no host sync.
    - ``frequency=N`` recomputes the coefficients every ``N`` optimizer steps and reuses them in
      between (Nash-MTL's cheap mode); the steps in between cost no extra backward.
      ``interval="epoch"`` recomputes them on the first optimizer step of every ``N``-th epoch.

    Subclasses implement :meth:`coefficients` (from the Gram matrix) or set
    ``needs_gradient_matrix = True`` and implement :meth:`coefficients_from_gradients`. A sibling
    of :class:`~lightning_aw.weighting.LossWeighting` on the shared lifecycle
    :class:`~lightning_aw.Weighting`; per-task gradients come from :mod:`lightning_aw.engine`.

    Example::

        >>> import torch
        >>> from lightning_aw import GradientWeighting
        >>> class Normalized(GradientWeighting):  # c_i = 1 / |g_i|: unit-norm task gradients
        ...     def coefficients(self, gram, losses):
        ...         return gram.diagonal().clamp_min(1e-12).rsqrt()
        ...
        >>> gram = torch.tensor([[4.0, 0.0], [0.0, 0.25]])  # |g_1| = 2, |g_2| = 0.5
        >>> Normalized(source="representation").coefficients(gram, torch.ones(2))
        tensor([0.5000, 2.0000])
    """

    total: ClassVar[str | float | None] = None
    needs_task_gradients: ClassVar[bool] = True
    #: whether the method needs the gradient matrix itself rather than its Gram matrix
    needs_gradient_matrix: ClassVar[bool] = False
    #: ask MultiTaskModule.shared_representation to hand the heads a leaf copy (the fast path)
    cuts_representation: ClassVar[bool] = True  # type: ignore[misc]
    _state_attrs: ClassVar[tuple[str, ...]] = (
        "_coefs",
        "_fallbacks",
        "_computed_epoch",
        "_computed_step",
    )
    _diagnostic_attrs: ClassVar[tuple[str, ...]] = ("_fallbacks",)

    def __init__(
        self,
        *,
        source: Source = "parameters",
        ddp_sync: DDPSync = "gram",
        frequency: int = 1,
        interval: Interval = "step",
    ) -> None:
        super().__init__(interval=interval, frequency=frequency)
        if interval is None:
            raise ValueError("Parameter `interval` should be 'step' or 'epoch'. Found None.")
        if source not in ("parameters", "representation"):
            raise ValueError(
                f"Parameter `source` should be 'parameters' or 'representation'. Found {source!r}."
            )
        if ddp_sync not in ("gram", "gradients"):
            raise ValueError(
                f"Parameter `ddp_sync` should be 'gram' or 'gradients'. Found {ddp_sync!r}."
            )
        self.source = source
        self.ddp_sync = ddp_sync
        self._coefs = torch.ones(0)
        self._fallbacks = torch.zeros(())  # a float count, so it logs without conversion
        self._params: list[Tensor] = []
        self._param_names: list[str] = []
        self._checked = False  # the first computed step checks that every shared param is used
        # (epoch, optimizer step) at which the current coefficients were computed
        self._computed_epoch = -1
        self._computed_step = -1
        self._upstream: list[Tensor] | None = None
        # the module's parameters, listed once per fit, for the heads' per-task gradients
        self._all_params: list[Tensor] | None = None
        self._any_sharded = False
        self._num_shared = 0
        self._present_idx: list[int] = []  # the tasks the last coefficients were computed for
        #: FSDP2: maps the sharded shared parameters to this step's unsharded ones (else None)
        self._unsharder: Unsharder | None = None

    # ------------------------------------------------------------------ template methods
    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        """Coefficients ``[T']`` from the Gram matrix ``[T', T']`` of the present tasks' gradients
        (float32 or float64) and their losses ``[T']``."""
        raise NotImplementedError

    def coefficients_from_gradients(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Coefficients ``[T']`` from the gradients ``[T', P]`` of the present tasks."""
        return self.coefficients(grads @ grads.T, losses)

    # ------------------------------------------------------------------ lifecycle
    def hparams_repr(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        if self.ddp_sync != "gram":
            out["ddp_sync"] = self.ddp_sync
        if self.frequency != 1:
            out["frequency"] = self.frequency
        if self.interval != "step":
            out["interval"] = self.interval
        return out

    def init_state(self, num_tasks: int) -> None:
        # before the first step: equal coefficients with the method's documented total
        self._coefs = torch.full((num_tasks,), 1.0 / num_tasks if self.total == 1 else 1.0)

    def weight_tensor(self) -> Tensor:
        return self._coefs

    def log_items(self) -> dict[str, Tensor]:
        return {"aggregation/fallbacks": self._fallbacks}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_params"] = []
        state["_upstream"] = None
        state["_unsharder"] = None
        state["_all_params"] = None
        return state

    def engine(self, step: StepRecord) -> TaskGradients:
        """The per-task-gradient engine for ``step`` (with this fit's FSDP2 unsharder)."""
        return TaskGradients(step, self, self._unsharder)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._upstream = None
        self._checked = False
        self._unsharder = None
        self._all_params = None
        if self.source == "parameters":
            check_parameter_gradients(
                self, trainer, "shared_parameters()", "source='representation'"
            )
            names = {id(p): n for n, p in pl_module.named_parameters()}
            shared = pl_module.shared_parameters()  # type: ignore[operator]
            self._params = [p for p in shared if p.requires_grad]
            self._param_names = [names.get(id(p), "?") for p in self._params]
            if not self._params:
                raise MisconfigurationException(
                    f"{self!r} found no trainable parameter in "
                    f"{type(pl_module).__name__}.shared_parameters(); return the shared trunk's "
                    "parameters there."
                )
            self._unsharder = Unsharder.of(pl_module, self._params, self)

    # ------------------------------------------------------------------ the step
    @override
    def step_loss(self, step: StepRecord) -> Tensor:
        losses = step.losses
        if not torch.is_grad_enabled() or not losses.requires_grad:
            return (self._coefs.to(losses) * losses).sum()
        if step.representation_graph is not None:
            return self._combine_cut(step)
        if self._should_recompute(step.trainer):
            grads = self._task_gradients(step)
            coefs = self._safe_coefficients(step, grads, losses.detach())
            self._coefs = self._transformed(coefs).detach()
        return (self._coefs.to(losses) * losses).sum()

    def _should_recompute(self, trainer: pl.Trainer | None) -> bool:
        """Whether this micro-batch computes new coefficients (all micro-batches of an updating
        optimizer step do; the others reuse the last coefficients)."""
        step = self._optimizer_steps
        if self.interval == "step":
            return step % self.frequency == 0
        epoch = trainer.current_epoch if trainer is not None else 0
        if epoch % self.frequency != 0:
            return False
        if self._computed_epoch != epoch:
            self._computed_epoch, self._computed_step = epoch, step
        return step == self._computed_step

    def _shared_names(self) -> list[str] | None:
        """Parameter names to check for use at the first computed step, then ``None``."""
        if self._checked:
            return None
        self._checked = True
        return self._param_names

    def _combine_cut(self, step: StepRecord) -> Tensor:
        """The fast path, when the module marked its shared representation ``z``.

        The heads ran on a leaf copy of ``z``. The per-task backward passes through the heads
        give each task's gradient on ``z`` and on the heads' parameters at once; the trunk
        receives the aggregated gradient through the surrogate
        ``<g, theta> - <g, theta>.detach()`` (value 0, gradient ``g``), with ``g`` the aggregated
        gradient on the trunk's parameters (parameter source) or on ``z`` (representation
        source), and the heads receive ``sum_t c_t dL_t/dphi`` the same way. One ordinary
        backward still carries the whole update, so loss scaling, accumulation, clipping and DDP
        apply as usual; the trunk is traversed ``T`` times (parameter source) or once
        (representation source) instead of ``T + 1`` times, and every head once. The combined
        loss's backward runs through the heads instead under FSDP and DeepSpeed (their gradients
        need their own backward hooks) and under mixed or half precision (there the two orders
        of summation round differently, and under fp16 loss scaling one task's unweighted,
        scaled gradient may overflow float16 where the weighted sum does not).
        """
        losses, rep = step.losses, step.representation_graph
        assert rep is not None
        engine = self.engine(step)
        num = step.num_tasks
        heads = self._head_params(step)  # None: the combined backward runs through the heads
        if not self._should_recompute(step.trainer):
            # reuse the coefficients: the trunk gets c^T dL/dz through z, once
            total = (self._coefs.to(losses) * losses).sum()
            if heads is None:
                g_rep = engine.combined_on_representation_scaled(total)
                return total + inject([rep], [engine.unscale(g_rep)])
            g_rep, g_heads = engine.combined_on_representation_and_heads_scaled(total, heads)
            reached = [(p, g) for p, g in zip(heads, g_heads, strict=True) if g is not None]
            return total.detach() + inject(
                [rep, *(p for p, _ in reached)],
                [engine.unscale(g) for g in (g_rep, *(g for _, g in reached))],
            )
        # per-task gradients on z (and on the heads): through the heads only (scaled under fp16)
        if heads is None:
            rows, head_rows = engine.on_representation_scaled(), None
        else:
            rows, head_rows = engine.on_representation_and_heads_scaled(heads)
        leaf = engine.representation()
        grads_rep = torch.stack([torch.zeros_like(leaf) if r is None else r for r in rows])
        if self.source == "representation":
            G = engine.unscale(grads_rep.reshape(num, -1), step.accumulate)
            coefs = self._transformed(self._safe_coefficients(step, G, losses.detach()))
            # in float32: an fp16 representation gradient would underflow once unscaled
            g_rep = engine.unscale(torch.einsum("t,t...->...", coefs.float(), grads_rep.float()))
            surrogate = inject([rep], [g_rep])
        else:
            targets = self._upstream_params(engine, step)
            per_task = engine.through_representation_scaled(rows, targets)
            shared = targets[: self._num_shared]
            if self.needs_gradient_matrix or self.ddp_sync == "gradients":
                G = engine.unscale(flatten(per_task, shared), step.accumulate)
                coefs = self._safe_coefficients(step, G, losses.detach())
            else:
                # the Gram matrix layer by layer: no second [T, P] copy of the gradients
                divisor = (1.0 if engine.scale is None else engine.scale) * step.accumulate
                gram = gram_by_layer(per_task, range(len(shared)), num) / (divisor * divisor)
                coefs = self._safe_coefficients(step, None, losses.detach(), gram=gram)
            coefs = self._transformed(coefs)
            agg = combine_per_task(per_task, coefs, len(targets))
            if engine.scale is not None:
                agg = list(torch._foreach_div(agg, engine.scale))
            surrogate = engine.deliver(targets, agg)
        self._coefs = coefs.detach()
        total = (self._coefs.to(losses) * losses).sum()
        if heads is None or head_rows is None:
            return total + surrogate
        return total.detach() + surrogate + self._heads_surrogate(engine, heads, head_rows, coefs)

    def _head_params(self, step: StepRecord) -> list[Tensor] | None:
        """The module's trainable parameters, whose per-task gradients the passes through the
        heads also take (those the losses reach without going through the cut representation:
        the heads, and any path that bypasses it).

        ``None`` (the combined loss's backward then runs through the heads) unless the strategy's
        parameters are the tensors the forward uses (one device, DDP; not FSDP 1 or 2, not
        DeepSpeed) and the precision is full (``32-true``, ``64-true``: no autocast rounding, no
        fp16 loss scaling). The parameters are listed once per fit; which of them require a
        gradient is read at every step (a parameter unfrozen during the fit is included).
        """
        trainer = step.trainer
        if (
            self._unsharder is not None
            or strategy_name(trainer) not in _PLAIN_STRATEGIES
            or str(trainer.precision) not in _FULL_PRECISION
        ):
            return None
        if self._all_params is None:  # once per fit (walking the module tree costs ~0.1 ms)
            module = trainer.lightning_module
            if module is None:
                return None
            self._all_params = list(module.parameters())
            self._any_sharded = any_sharded(self._all_params)
        if self._any_sharded:
            return None
        return [p for p in self._all_params if p.requires_grad]

    @staticmethod
    def _heads_surrogate(
        engine: TaskGradients,
        heads: Sequence[Tensor],
        head_rows: Sequence[Sequence[Tensor | None] | None],
        coefs: Tensor,
    ) -> Tensor:
        """A zero whose gradient on each head parameter is ``sum_t c_t dL_t/dphi`` (unscaled),
        over the tasks whose loss reaches it."""
        c = coefs.float().unbind()  # one view per task, made once
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for j, p in enumerate(heads):
            g: Tensor | None = None
            for t, row in enumerate(head_rows):
                gt = None if row is None else row[j]
                if gt is not None:
                    term = c[t] * gt.float()
                    g = term if g is None else g + term
            if g is not None:
                params.append(p)
                grads.append(g if engine.scale is None else engine.unscale(g))
        if not params:
            return torch.zeros((), device=coefs.device)
        return inject(params, grads)

    def _upstream_params(self, engine: TaskGradients, step: StepRecord) -> list[Tensor]:
        """Trainable parameters that produce the representation (found once per fit), shared
        ones first."""
        if self._upstream is None:
            trainer = step.trainer
            module = trainer.lightning_module if trainer is not None else None
            self._upstream = engine.upstream_parameters(self._params, module)
            self._num_shared = len(self._params)
        return self._upstream

    def _task_gradients(self, step: StepRecord) -> Tensor:
        """``[T, P]`` float32 gradients of the losses Lightning backpropagates (zero rows for
        absent tasks)."""
        engine = self.engine(step)
        if self.source == "representation":
            rows = engine.on_representation_scaled()
            G = flatten([None if r is None else [r] for r in rows], [engine.representation()])
        else:
            per_task = engine.on_parameters_scaled(self._params, names=self._shared_names())
            G = flatten(per_task, self._params)
        return engine.unscale(G, step.accumulate)

    def _safe_coefficients(
        self, step: StepRecord, grads: Tensor | None, losses: Tensor, gram: Tensor | None = None
    ) -> Tensor:
        """Coefficients ``[T]`` (0 for absent tasks), identical on every DDP rank.

        Takes the per-task gradients ``[T, P]``, or (``ddp_sync="gram"`` only) their local Gram
        matrix ``[T, T]`` when the caller formed it without materialising ``[T, P]``.
        """
        trainer = step.trainer
        use_grads = self.needs_gradient_matrix or self.ddp_sync == "gradients"
        if grads is None:
            if gram is None or use_grads:
                raise ValueError("_safe_coefficients needs `grads` for this method or ddp_sync")
            local_gram = gram
        else:
            local_gram = None if use_grads else grads @ grads.T
        device = losses.device
        present = step.present
        mask = present.to(torch.float32)
        num = present.shape[0]
        if step.world_size > 1:
            # averaged over the ranks where each task (or pair of tasks) is present
            if use_grads:
                assert grads is not None
                grads, count, (loss_sum,) = present_mean(trainer, grads, present, losses * mask)
                gram = grads @ grads.T
            else:
                assert local_gram is not None
                total, count, loss_sum, pairs = all_reduce_sum(
                    trainer, local_gram, mask, losses * mask, torch.outer(mask, mask)
                )
                gram = total / pairs.clamp_min(1.0)
            losses = loss_sum / count.clamp_min(1.0)
            idx = (count > 0).nonzero().flatten().tolist()  # host sync, DDP only
        else:
            gram = grads @ grads.T if use_grads else local_gram
            idx = step.present_index
        assert gram is not None
        self._present_idx = idx
        if self.needs_gradient_matrix:
            assert grads is not None
            ix = torch.tensor(idx, device=device)
            sub = grads[ix]
            finite = torch.isfinite(sub).all()
            sub = torch.where(torch.isfinite(sub), sub, torch.zeros_like(sub))
            coefs = self.coefficients_from_gradients(sub, losses[ix])
        else:
            # The T x T problem is solved on the CPU in float64: one small device-to-host copy
            # (one synchronisation) instead of the many tiny kernels and convergence read-backs
            # an iterative solver costs on an accelerator.
            packed = torch.cat([gram, losses.to(gram.dtype).unsqueeze(1)], dim=1)
            packed = packed.to("cpu", torch.float64)
            gram, losses = packed[:, :-1], packed[:, -1]
            ix = torch.tensor(idx)
            finite = torch.isfinite(gram).all()
            sub_gram = torch.where(finite, gram, torch.zeros_like(gram))[ix][:, ix]
            coefs = self.coefficients(sub_gram, losses[ix])
        ok = finite & torch.isfinite(coefs).all()
        self._fallbacks = self._fallbacks.to(coefs.device) + (~ok).float()
        coefs = torch.where(ok, coefs, torch.ones_like(coefs))
        full = torch.zeros(num, dtype=torch.float32, device=coefs.device)
        full[ix] = coefs.float()
        return full.to(device, non_blocking=True)
