"""The base class of every weighting callback."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_aw._utils import grad_scaler, reduce_sum, scaler_found_inf
from lightning_aw.transforms import WeightTransform, as_transform

Interval = Literal["step", "epoch"]


class Weighting(Callback):
    """Base class of the loss-weighting callbacks.

    A weighting turns the per-task losses that :class:`~lightning_aw.MultiTaskModule` collects into
    the one loss Lightning backpropagates (:meth:`combine`), and updates its weights from statistics
    of the training run. Subclasses override a few template methods:

    - :meth:`init_state` creates the state for ``T`` tasks (tensors on the CPU; they follow the
      module's device at fit start),
    - :meth:`weight_tensor` returns the current weights,
    - :meth:`combine` (optional) when the loss is more than ``weights @ losses``,
    - :meth:`update` recomputes the weights when the interval elapses, from the mean task losses
      of the window since the last update (and anything the subclass gathered itself).

    Intervals: ``interval="step"`` counts optimizer steps (so the weights are constant within a
    gradient-accumulation window), ``interval="epoch"`` counts training epochs; ``frequency=N``
    updates every ``N`` of them.

    All state that drives the weights is reduced over the DDP ranks before use, so every rank holds
    identical weights; the state is saved in checkpoints (``state_dict``) so a resumed run continues
    exactly as an uninterrupted one. Resuming a checkpoint whose state was saved with other
    hyperparameters (another ``state_key``) is an error, not a silent restart of the method.

    Skipped steps change nothing: an optimizer step the fp16 GradScaler skips (inf/NaN
    gradients) or that ``MultiTaskModule(on_nonfinite="skip")`` skips rolls the method's state
    back to the start of its accumulation window (a copy is kept only where steps can be skipped:
    under fp16, or ``"skip"`` with accumulation). Such steps do not count towards ``interval`` /
    ``frequency``; :attr:`scaler_skipped_steps` counts the GradScaler's. Diagnostic counters
    (``_diagnostic_attrs``, e.g. gradient methods' fallbacks) keep counting.

    Example::

        >>> import torch
        >>> from lightning_aw import Weighting
        >>> class Fixed(Weighting):  # constant weights given by the user
        ...     def __init__(self, weights):
        ...         super().__init__()
        ...         self.fixed = torch.tensor(weights)
        ...     def init_state(self, num_tasks):
        ...         if num_tasks != len(self.fixed):
        ...             raise ValueError(f"Expected {len(self.fixed)} tasks. Found {num_tasks}.")
        ...     def weight_tensor(self):
        ...         return self.fixed
        ...
        >>> method = Fixed([2.0, 0.5])
        >>> method.combine(torch.tensor([1.0, 4.0]), torch.tensor([True, True]))  # 2 * 1 + 0.5 * 4
        tensor(4.)
    """

    #: What the weights sum to: ``"T"`` (number of tasks), ``1`` or ``None`` (not normalised).
    total: ClassVar[str | float | None] = "T"
    #: Whether :meth:`update` reads the window-mean losses (else none are gathered: cheaper).
    uses_window_means: ClassVar[bool] = True
    #: Names of the attributes saved by :meth:`state_dict` (tensors, numbers, lists, dicts).
    _state_attrs: ClassVar[tuple[str, ...]] = ()
    #: State attributes that are diagnostics (counters of fallbacks, of bad losses): kept, not
    #: rolled back, when an optimizer step turns out to have been skipped.
    _diagnostic_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, interval: Interval | None = None, frequency: int = 1) -> None:
        super().__init__()
        if interval not in (None, "step", "epoch"):
            raise ValueError(
                f"Parameter `interval` should be 'step' or 'epoch'. Found {interval!r}."
            )
        if not isinstance(frequency, int) or isinstance(frequency, bool) or frequency < 1:
            raise ValueError(f"Parameter `frequency` should be an int >= 1. Found {frequency!r}.")
        self.interval = interval
        self.frequency = frequency
        self.tasks: list[str] = []
        self.module: nn.Module | None = None
        self._device = torch.device("cpu")
        # statistics of the current update window, summed over micro-batches
        self._window_loss_sum = torch.zeros(0)
        self._window_count = torch.zeros(0)
        self._num_updates = 0
        self._optimizer_steps = 0
        self._last_global_step = -1
        #: weight transforms (see :meth:`transformed`); ``None``: the method's weights as they are
        self.transform: WeightTransform | None = None
        self._applied: Tensor | None = None
        # fp16: the state at the start of the current optimizer step's window (rolled back when
        # the GradScaler skips the step), and whether the scaler found inf/NaN gradients
        self._window_snapshot: dict[str, Any] | None = None
        self._scaler_skip: bool | None = None
        self._scale_before: float | None = None
        #: number of optimizer steps the fp16 GradScaler skipped (weighting state rolled back)
        self.scaler_skipped_steps = 0

    # ------------------------------------------------------------------ template methods
    def init_state(self, num_tasks: int) -> None:
        """Create the state for ``num_tasks`` tasks. Called once, in ``setup``."""

    def weight_tensor(self) -> Tensor:
        """The weights applied at the current step, shape ``[T]`` (detached)."""
        raise NotImplementedError

    def combine(self, losses: Tensor, present: Tensor) -> Tensor:
        """The loss to backpropagate: ``sum_i w_i L_i`` over the tasks present in the batch.

        Args:
            losses: float32 task losses ``[T]`` (zero where a task is absent).
            present: boolean mask ``[T]`` of the tasks present in this batch.
        """
        return (self.weight_tensor().to(losses.dtype) * losses).sum()

    def update(self, trainer: pl.Trainer, window_mean: Tensor, window_present: Tensor) -> None:
        """Recompute the weights; ``window_mean`` are the rank-reduced mean losses since the last
        update, ``window_present`` tells which tasks were seen in the window."""

    def log_items(self) -> dict[str, Tensor]:
        """Extra diagnostics logged with the weights (tensors, no host synchronisation)."""
        return {}

    # ------------------------------------------------------------------ transforms
    def transformed(self, *transforms: WeightTransform) -> Weighting:
        """Apply weight transforms (:mod:`lightning_aw.transforms`) to this method's weights.

        Returns ``self``, so ``GradNorm().transformed(Warmup(100), EMA(0.9))`` reads naturally.
        Transforms compose left to right; their state is saved with the callback's.

        Example::

            >>> from lightning_aw import DWA
            >>> from lightning_aw.transforms import EMA, Clamp
            >>> DWA().transformed(EMA(0.5), Clamp(0.2, 5.0)).transform
            chain(EMA(decay=0.5), Clamp(min=0.2, max=5.0))
        """
        self.transform = as_transform(transforms)
        return self

    def combine_applied(self, losses: Tensor, present: Tensor) -> Tensor:
        """:meth:`combine`, with the transforms applied to the weights the network sees.

        The method's own loss keeps its extra terms (e.g. uncertainty weighting's regulariser);
        the correction ``sum_i (w'_i - w_i) L_i`` (weights detached) replaces the weights ``w`` of
        this step by the transformed ``w'`` in the network's gradient.
        """
        total = self.combine(losses, present)
        if self.transform is None:
            return total
        raw = self.weight_tensor().to(losses)
        applied = self.transform.apply(raw, self._optimizer_steps)
        self._applied = applied.detach()
        return total + ((self._applied - raw.detach()) * losses).sum()

    def current_weights(self) -> Tensor:
        """The weights applied at the current step, after the transforms, shape ``[T]``."""
        if self.transform is not None and self._applied is not None:
            return self._applied
        return self.weight_tensor()

    # ------------------------------------------------------------------ public helpers
    @property
    def weights(self) -> dict[str, float]:
        """The weights currently applied (after any transform), by task name (reads them to the
        host)."""
        if not self.tasks:
            return {}
        return dict(zip(self.tasks, self.current_weights().float().tolist(), strict=True))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def hparams_repr(self) -> dict[str, Any]:
        """The hyperparameters shown by ``repr`` and used in ``state_key``."""
        out: dict[str, Any] = {}
        if self.interval is not None:
            out["interval"] = self.interval
            out["frequency"] = self.frequency
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams_repr().items())
        base = f"{type(self).__name__}({args})"
        return base if self.transform is None else f"{base}.transformed({self.transform!r})"

    @property
    @override
    def state_key(self) -> str:
        extra = {} if self.transform is None else {"transform": repr(self.transform)}
        return self._generate_state_key(**self.hparams_repr(), **extra)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_aw.module import MultiTaskModule

        if not isinstance(pl_module, MultiTaskModule):
            raise TypeError(
                f"{type(self).__name__} is a loss weighting for `lightning_aw.MultiTaskModule`, "
                f"but the Trainer runs a `{type(pl_module).__name__}`. Subclass MultiTaskModule "
                "and implement `task_losses(batch, batch_idx)`."
            )
        others = [c for c in trainer.callbacks if isinstance(c, Weighting) and c is not self]
        if others:
            names = ", ".join(repr(c) for c in [self, *others])
            raise MisconfigurationException(
                f"Only one weighting callback may be given to a Trainer; found {names}. Keep one "
                "(weight transforms are composed inside a single weighting)."
            )
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{type(self).__name__} needs automatic optimization; "
                f"`{type(pl_module).__name__}.automatic_optimization` is False."
            )
        if pl_module.weighting is self:
            return  # setup runs again for validate/test: attach once
        self.tasks = list(pl_module.tasks)
        self.init_state(len(self.tasks))
        if self.transform is not None:
            self.transform.reset(len(self.tasks))
        self._window_loss_sum = torch.zeros(len(self.tasks))
        self._window_count = torch.zeros(len(self.tasks))
        pl_module._attach_weighting(self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device = pl_module.device
        self._move_state(pl_module.device)
        self.check_optimizers(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning moves the model back to the CPU at the end of fit: the state follows it, so
        # the weights read after training live where the model's (learnable) parameters do
        self._device = pl_module.device
        self._move_state(pl_module.device)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after a resume the loops (and global_step) are restored only now
        self._last_global_step = trainer.global_step

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning looks the callback's state up by ``state_key`` and silently skips it when
        # absent: a resume with other hyperparameters would restart the method from scratch
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        prefix = f"{type(self).__qualname__}{{"
        saved = [k for k in states if isinstance(k, str) and k.startswith(prefix)]
        if saved:
            raise MisconfigurationException(
                f"The checkpoint holds the state of {saved[0]}, but this run's weighting is "
                f"{self.state_key}: its hyperparameters differ, so the saved state would be "
                "ignored and the method would restart from scratch. Resume with the same "
                "hyperparameters, or start a new run from the model weights only "
                "(`Model.load_from_checkpoint(path)` and `trainer.fit(model)` without `ckpt_path`)."
            )

    def check_optimizers(self, trainer: pl.Trainer) -> None:
        """Learnable weighting parameters must be optimised, and never with weight decay."""
        if self.module is None:
            return
        params = {id(p): n for n, p in self.module.named_parameters() if p.requires_grad}
        found: set[int] = set()
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in params:
                        found.add(id(p))
                        if group.get("weight_decay", 0.0):
                            raise MisconfigurationException(
                                f"The parameter `{params[id(p)]}` of {self!r} is in an optimizer "
                                f"group with weight_decay={group['weight_decay']}; weighting "
                                "parameters must not be decayed. Put them in their own group "
                                "with weight_decay=0 (MultiTaskModule.configure_optimizers does)."
                            )
        missing = [n for i, n in params.items() if i not in found]
        if missing:
            raise MisconfigurationException(
                f"{self!r} learns {missing}, but no optimizer holds them. Include "
                "`self.weighting_parameters()` in your optimizer (with weight_decay=0), or use "
                "MultiTaskModule's default `configure_optimizers`."
            )

    def observe(self, trainer: pl.Trainer, losses: Tensor, present: Tensor) -> None:
        """Record one training micro-batch's detached task losses; update when the interval ends.

        Called by :class:`~lightning_aw.MultiTaskModule` after each successful training step.
        Methods without an update interval (their weights change only through the optimizer, or
        never) keep no window statistics.
        """
        if self.interval is None or not self.uses_window_means:
            return
        mask = present.to(self._window_count.dtype)
        self._window_loss_sum = self._window_loss_sum + losses.detach() * mask
        self._window_count = self._window_count + mask

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Under fp16 the GradScaler skips the optimizer steps whose gradients overflowed, and
        # with on_nonfinite="skip" a non-finite loss skips the step. The weighting state of such
        # a step must not move either: remember it at the start of the window (small tensors, a
        # clone per optimizer step, only where a step can be skipped after the window began) to
        # roll it back.
        if self._window_snapshot is None and self._steps_can_be_skipped(trainer, pl_module):
            self._window_snapshot = self._snapshot_state()

    @staticmethod
    def _steps_can_be_skipped(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if grad_scaler(trainer) is not None:
            return True
        skip = getattr(pl_module, "on_nonfinite", "raise") == "skip"
        return skip and trainer.accumulate_grad_batches > 1

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        scaler = grad_scaler(trainer)
        if scaler is None:
            return
        found = scaler_found_inf(scaler, optimizer)
        if found is not None:
            # GradScaler.step reads the same flag right after this hook: no extra stall
            self._scaler_skip = bool(found)
            self._scale_before = None
        else:  # unscaling left to the optimizer (fused): compare the scale after the step
            self._scaler_skip = None
            self._scale_before = float(scaler.get_scale())

    def _skipped_by_scaler(self, trainer: pl.Trainer) -> bool:
        """Whether the GradScaler skipped the optimizer step that just ran (fp16 only)."""
        skipped, before = self._scaler_skip, self._scale_before
        self._scaler_skip = self._scale_before = None
        if skipped is not None:
            return skipped
        scaler = grad_scaler(trainer)
        if scaler is None or before is None:
            return False
        # the scale only ever decreases (backoff) on a step with inf/NaN gradients
        return float(scaler.get_scale()) < before

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self._last_global_step:
            return  # inside an accumulation window
        self._last_global_step = trainer.global_step
        snapshot, self._window_snapshot = self._window_snapshot, None
        if self._skipped_by_scaler(trainer):
            # the parameters did not move: neither does the weighting
            if snapshot is not None:
                self._restore_state(snapshot)
            self.scaler_skipped_steps += 1
            return
        if getattr(pl_module, "_step_skipped", False):
            # a step skipped for a non-finite loss changes nothing (earlier micro-batches of
            # its accumulation window included)
            if snapshot is not None:
                self._restore_state(snapshot)
            return
        self._optimizer_steps += 1
        if self.transform is not None:
            self.transform.commit()
        self.after_optimizer_step(trainer, pl_module, batch, batch_idx)
        if self.interval == "step" and self._optimizer_steps % self.frequency == 0:
            self._run_update(trainer)

    def after_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Called once after every optimizer step (not inside accumulation windows, not after a
        skipped step), with the last micro-batch. Override to update state from it."""

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch" and (trainer.current_epoch + 1) % self.frequency == 0:
            self._run_update(trainer)

    def _run_update(self, trainer: pl.Trainer) -> None:
        if not self.uses_window_means:
            self.update(trainer, self._window_loss_sum, self._window_count > 0)
            self._num_updates += 1
            return
        stats = reduce_sum(trainer, torch.cat([self._window_loss_sum, self._window_count]))
        loss_sum, count = stats.chunk(2)
        present = count > 0
        mean = loss_sum / count.clamp_min(1.0)
        self.update(trainer, mean, present)
        self._num_updates += 1
        self._window_loss_sum = torch.zeros_like(self._window_loss_sum)
        self._window_count = torch.zeros_like(self._window_count)

    # ------------------------------------------------------------------ state
    def _state_names(self) -> tuple[str, ...]:
        base = ("_window_loss_sum", "_window_count", "_num_updates", "_optimizer_steps")
        if self.transform is not None:
            base = (*base, "transform", "_applied")
        return base + self._state_attrs

    def _snapshot_state(self) -> dict[str, Any]:
        """A copy of the state that drives the weights (diagnostic counters left out)."""
        out: dict[str, Any] = {}
        for name in self._state_names():
            if name in self._diagnostic_attrs:
                continue
            value = getattr(self, name)
            if hasattr(value, "state_dict") and not isinstance(value, (Tensor, nn.Module)):
                value = value.state_dict()
            out[name] = _clone(value)
        return out

    def _restore_state(self, snapshot: dict[str, Any]) -> None:
        """Put back a :meth:`_snapshot_state` (same process, same devices)."""
        for name, value in snapshot.items():
            current = getattr(self, name)
            if hasattr(current, "load_state_dict") and not isinstance(current, (Tensor, nn.Module)):
                current.load_state_dict(value)
            else:
                setattr(self, name, value)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tasks": list(self.tasks)}
        for name in self._state_names():
            value = getattr(self, name)
            if hasattr(value, "state_dict") and not isinstance(value, (Tensor, nn.Module)):
                value = value.state_dict()
            elif isinstance(value, Tensor):
                value = value.detach().clone()
            state[name] = value
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = list(state_dict.get("tasks", []))
        if self.tasks and saved != self.tasks:
            raise MisconfigurationException(
                f"The checkpoint's {type(self).__name__} state was saved for tasks {saved}, but "
                f"this run has tasks {self.tasks}. Resume with the same task list, or start a "
                "new run (load only the model weights)."
            )
        for name in self._state_names():
            if name not in state_dict:
                continue
            current = getattr(self, name)
            value = state_dict[name]
            if hasattr(current, "load_state_dict") and not isinstance(current, (Tensor, nn.Module)):
                current.load_state_dict(value)
            else:
                setattr(self, name, value)
        self._move_state(self._device)

    def _move_state(self, device: torch.device) -> None:
        for name in self._state_names():
            value = getattr(self, name)
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
            elif hasattr(value, "to") and not isinstance(value, nn.Module):
                value.to(device)

    # ------------------------------------------------------------------ module helpers
    def _register_module(self, module: nn.Module) -> None:
        """Declare learnable parameters; MultiTaskModule attaches them as ``loss_weighting``.

        Attached to the LightningModule, they follow Lightning's device, precision and DDP
        handling and are saved in the model checkpoint.
        """
        self.module = module


def _clone(value: Any) -> Any:
    """A copy of ``value`` whose tensors (also inside dicts, lists and tuples) are cloned."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value
