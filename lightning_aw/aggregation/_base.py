"""The base class of the gradient-based methods: coefficients from per-task gradients."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_aw._utils import grad_scaler
from lightning_aw.weighting._base import Interval, Weighting

Source = Literal["parameters", "representation"]
DDPSync = Literal["gram", "gradients"]


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
    ``needs_gradients = True`` and implement :meth:`coefficients_from_gradients`.

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
    uses_window_means: ClassVar[bool] = False
    #: whether the method needs the gradient matrix itself rather than its Gram matrix
    needs_gradients: ClassVar[bool] = False
    _state_attrs: ClassVar[tuple[str, ...]] = (
        "_coefs", "_fallbacks", "_computed_epoch", "_computed_step",
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
        self._trainer_ref: weakref.ref[pl.Trainer] | None = None
        self._module_ref: weakref.ref[Any] | None = None
        self._params: list[Tensor] = []
        self._present_idx: list[int] = []
        # (epoch, optimizer step) at which the current coefficients were computed
        self._computed_epoch = -1
        self._computed_step = -1
        self._upstream: list[Tensor] | None = None
        self._shared_index: list[int] = []

    # ------------------------------------------------------------------ template methods
    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        """Coefficients ``[T']`` from the Gram matrix ``[T', T']`` of the present tasks' gradients
        (float32 or float64) and their losses ``[T']``."""
        raise NotImplementedError

    def coefficients_from_gradients(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Coefficients ``[T']`` from the gradients ``[T', P]`` of the present tasks."""
        return self.coefficients(grads @ grads.T, losses)

    # ------------------------------------------------------------------ Weighting API
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

    def combine_applied(self, losses: Tensor, present: Tensor) -> Tensor:
        # the transforms act on the coefficients before they are applied (see _transformed)
        return self.combine(losses, present)

    def _transformed(self, coefs: Tensor) -> Tensor:
        if self.transform is None:
            return coefs
        applied = self.transform.apply(coefs, self._optimizer_steps)
        self._applied = applied.detach()
        return applied

    def log_items(self) -> dict[str, Tensor]:
        return {"aggregation/fallbacks": self._fallbacks}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # weak references: a deepcopy or pickle of the module must not drag the Trainer along
        self._trainer_ref, self._module_ref = weakref.ref(trainer), weakref.ref(pl_module)

    @property
    def _trainer(self) -> pl.Trainer | None:
        return None if self._trainer_ref is None else self._trainer_ref()

    @property
    def _pl_module(self) -> Any:
        return None if self._module_ref is None else self._module_ref()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_trainer_ref"] = state["_module_ref"] = None
        state["_params"] = []
        state["_upstream"] = None
        return state

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._upstream = None
        if self.source == "parameters":
            self._params = [p for p in pl_module.shared_parameters() if p.requires_grad]
            if not self._params:
                raise MisconfigurationException(
                    f"{self!r} found no trainable parameter in "
                    f"{type(pl_module).__name__}.shared_parameters(); return the shared trunk's "
                    "parameters there."
                )

    #: ask MultiTaskModule.shared_representation to hand the heads a leaf copy (the fast path)
    cuts_representation: ClassVar[bool] = True

    def combine(self, losses: Tensor, present: Tensor) -> Tensor:
        module = self._pl_module
        if module is None or not torch.is_grad_enabled() or not losses.requires_grad:
            return (self._coefs.to(losses) * losses).sum()
        if module._shared_rep_graph is not None:
            return self._combine_cut(module, losses, present)
        if self._should_recompute():
            grads = self._task_gradients(module, losses, module._present_list)
            coefs = self._safe_coefficients(grads, losses.detach(), present)
            self._coefs = self._transformed(coefs).detach()
        return (self._coefs.to(losses) * losses).sum()

    def _should_recompute(self) -> bool:
        """Whether this micro-batch computes new coefficients (all micro-batches of an updating
        optimizer step do; the others reuse the last coefficients)."""
        step = self._optimizer_steps
        if self.interval == "step":
            return step % self.frequency == 0
        trainer = self._trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        if epoch % self.frequency != 0:
            return False
        if self._computed_epoch != epoch:
            self._computed_epoch, self._computed_step = epoch, step
        return step == self._computed_step

    def _combine_cut(self, module: Any, losses: Tensor, present: Tensor) -> Tensor:
        """The fast path, when the module marked its shared representation ``z``.

        The heads ran on a leaf copy of ``z``, so ``c^T L`` backpropagates into the heads only;
        the trunk receives the aggregated gradient through the surrogate
        ``<g, theta> - <g, theta>.detach()`` (value 0, gradient ``g``), with ``g`` the aggregated
        gradient on the trunk's parameters (parameter source) or on ``z`` (representation
        source). One ordinary backward still carries the whole update, so loss scaling,
        accumulation, clipping and DDP apply as usual, and the trunk is traversed ``T`` times
        (parameter source) or once (representation source) instead of ``T + 1`` times.
        """
        leaf, rep = module._shared_rep, module._shared_rep_graph
        trainer = self._trainer
        scaler = grad_scaler(trainer) if trainer is not None else None
        scale = 1.0 if scaler is None else scaler.scale(torch.ones((), device=losses.device))
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        present_list = module._present_list
        update = self._should_recompute()
        if not update:  # reuse the coefficients: the trunk gets c^T dL/dz through z, once
            total = (self._coefs.to(losses) * losses).sum()
            (g_rep,) = torch.autograd.grad(
                total if scaler is None else scaler.scale(total),
                leaf,
                retain_graph=True,
                allow_unused=True,
            )
            g_rep = torch.zeros_like(rep) if g_rep is None else g_rep
            return total + _inject([rep], [g_rep.float() / scale])
        # per-task gradients on z: through the heads only (scaled under fp16)
        rows = []
        for i, here in enumerate(present_list):
            g = None
            if here:
                out = losses[i] if scaler is None else scaler.scale(losses[i])
                (g,) = torch.autograd.grad(out, leaf, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(leaf) if g is None else g)
        grads_rep = torch.stack(rows)  # [T, *z.shape], scaled
        if self.source == "representation":
            G = grads_rep.reshape(len(rows), -1).float() / (scale * accumulate)
            coefs = self._transformed(self._safe_coefficients(G, losses.detach(), present))
            # in float32: an fp16 representation gradient would underflow once unscaled
            g_rep = torch.einsum("t,t...->...", coefs.float(), grads_rep.float()) / scale
            surrogate = _inject([rep], [g_rep])
        else:
            targets = self._upstream_params(module, rep)
            per_task = []
            for i, here in enumerate(present_list):
                if not here:
                    per_task.append([torch.zeros_like(p) for p in targets])
                    continue
                gs = torch.autograd.grad(
                    rep, targets, grad_outputs=grads_rep[i], retain_graph=True, allow_unused=True
                )
                per_task.append(
                    [
                        torch.zeros_like(p) if g is None else g
                        for g, p in zip(gs, targets, strict=False)
                    ]
                )
            shared = self._shared_index
            divisor = scale * accumulate
            if self.needs_gradients or self.ddp_sync == "gradients":
                G = torch.stack(
                    [torch.cat([g[j].reshape(-1).float() for j in shared]) for g in per_task]
                )
                coefs = self._safe_coefficients(G / divisor, losses.detach(), present)
            else:
                # the Gram matrix layer by layer: no second [T, P] copy of the gradients
                gram = torch.zeros(len(rows), len(rows), device=losses.device)
                for j in shared:
                    block = torch.stack([g[j].reshape(-1) for g in per_task]).float()
                    gram = gram + block @ block.T
                gram = gram / (divisor * divisor)
                coefs = self._safe_coefficients(None, losses.detach(), present, gram=gram)
            coefs = self._transformed(coefs)
            agg = [
                sum(coefs[t].float() * per_task[t][j].float() for t in range(len(rows))) / scale
                for j in range(len(targets))
            ]
            surrogate = _inject(targets, agg)
        self._coefs = coefs.detach()
        return (self._coefs.to(losses) * losses).sum() + surrogate

    def _upstream_params(self, module: Any, rep: Tensor) -> list[Tensor]:
        """Trainable parameters that produce ``rep`` (found once per fit), shared ones first."""
        if self._upstream is None:
            shared_ids = {id(p) for p in self._params}
            others = [p for p in module.parameters() if p.requires_grad and id(p) not in shared_ids]
            probe = torch.autograd.grad(
                rep.sum(), self._params + others, retain_graph=True, allow_unused=True
            )
            missing = [i for i, g in enumerate(probe[: len(self._params)]) if g is None]
            if missing:
                names = {id(p): n for n, p in module.named_parameters()}
                raise MisconfigurationException(
                    f"{self!r}: shared_parameters() includes "
                    f"{[names.get(id(self._params[i]), '?') for i in missing]}, which do not "
                    "produce the tensor passed to shared_representation(). Return only the "
                    "trunk's parameters there, or mark the trunk's output."
                )
            extra = [
                p for p, g in zip(others, probe[len(self._params) :], strict=False) if g is not None
            ]
            self._upstream = self._params + extra
            self._shared_index = list(range(len(self._params)))
        return self._upstream

    # ------------------------------------------------------------------ internals
    def _task_gradients(self, module: Any, losses: Tensor, present_list: list[bool]) -> Tensor:
        """``[T, P]`` float32 gradients of the losses Lightning backpropagates (zero rows for
        absent tasks)."""
        trainer = self._trainer
        if self.source == "representation":
            rep = module._shared_rep
            if rep is None:
                raise MisconfigurationException(
                    f"{self!r} needs the shared representation: in `task_losses`, pass the "
                    "trunk's output through it, `h = self.shared_representation(self.trunk(x))`."
                )
            inputs: list[Tensor] = [rep]
        else:
            inputs = self._params
        scaler = grad_scaler(trainer) if trainer is not None else None
        size = sum(x.numel() for x in inputs)
        rows = []
        for i, here in enumerate(present_list):
            if not here:
                rows.append(losses.new_zeros(size))
                continue
            out = losses[i] if scaler is None else scaler.scale(losses[i])
            grads = torch.autograd.grad(out, inputs, retain_graph=True, allow_unused=True)
            flat = [
                torch.zeros(x.numel(), device=losses.device) if g is None else g.reshape(-1).float()
                for g, x in zip(grads, inputs, strict=True)
            ]
            rows.append(torch.cat(flat))
        G = torch.stack(rows)
        divisor = 1.0
        if scaler is not None:
            divisor = scaler.scale(torch.ones((), device=G.device))
        if trainer is not None and trainer.accumulate_grad_batches > 1:
            divisor = divisor * trainer.accumulate_grad_batches
        return G / divisor

    def _safe_coefficients(
        self, grads: Tensor | None, losses: Tensor, present: Tensor, gram: Tensor | None = None
    ) -> Tensor:
        """Coefficients ``[T]`` (0 for absent tasks), identical on every DDP rank.

        Takes the per-task gradients ``[T, P]``, or (``ddp_sync="gram"`` only) their local Gram
        matrix ``[T, T]`` when the caller formed it without materialising ``[T, P]``.
        """
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        use_grads = self.needs_gradients or self.ddp_sync == "gradients"
        if grads is None:
            if gram is None or use_grads:
                raise ValueError("_safe_coefficients needs `grads` for this method or ddp_sync")
            local_gram = gram
        else:
            local_gram = None if use_grads else grads @ grads.T
        device = losses.device
        mask = present.to(torch.float32)
        num = present.shape[0]
        if world > 1:
            # sums over the ranks, with counts so that a task (or pair) absent on some ranks is
            # averaged over the ranks where it is present
            local = grads if use_grads else local_gram
            stats = torch.cat(
                [local.reshape(-1), losses * mask, mask, torch.outer(mask, mask).reshape(-1)]
            )
            stats = trainer.strategy.reduce(stats, reduce_op="sum")  # type: ignore[union-attr]
            n = local.numel()
            total = stats[:n].view_as(local)
            count = stats[n + num : n + 2 * num]
            pairs = stats[n + 2 * num :].view(num, num)
            losses = stats[n : n + num] / count.clamp_min(1.0)
            if use_grads:
                grads = total / count.clamp_min(1.0).unsqueeze(1)
                gram = grads @ grads.T
            else:
                gram = total / pairs.clamp_min(1.0)
            idx = (count > 0).nonzero().flatten().tolist()  # host sync, DDP only
        else:
            gram = grads @ grads.T if use_grads else local_gram
            idx = [i for i, here in enumerate(self._pl_module._present_list) if here]
        self._present_idx = idx
        if self.needs_gradients:
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



class _Inject(torch.autograd.Function):
    """A float32 zero whose gradient with respect to ``x`` is ``g`` (times the incoming one).

    The same as the surrogate ``<g, x> - <g, x>.detach()``, but its value is exactly 0 even when
    ``g`` is not finite (an fp16 overflow step), and the incoming gradient (the loss scale divided
    by ``accumulate_grad_batches``) multiplies ``g`` in float32 before the cast to ``x``'s dtype,
    so a small unscaled ``g`` does not underflow in float16.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, g: Tensor) -> Tensor:
        ctx.save_for_backward(g)
        ctx.x_dtype = x.dtype
        return torch.zeros((), dtype=torch.float32, device=x.device)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        (g,) = ctx.saved_tensors
        return (g * grad_out.float()).to(ctx.x_dtype), None


def _inject(tensors: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """A float32 zero scalar whose gradient with respect to ``tensors[j]`` is ``grads[j]``."""
    total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for t, g in zip(tensors, grads, strict=True):
        total = total + _Inject.apply(t, g.detach().float().reshape(t.shape))
    return total
