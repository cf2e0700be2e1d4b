"""`Weighting`: the lifecycle every weighting method shares, whatever statistic it reads.

The two families are siblings on this base: :class:`~lightning_aw.weighting.LossWeighting`
(weights from the task losses) and :class:`~lightning_aw.GradientWeighting` (coefficients from
per-task gradients, through :mod:`lightning_aw.engine`). The base owns what they share:
``interval``/``frequency``, the count of optimizer steps, rollback of the method's state on a
step the fp16 GradScaler or ``on_nonfinite="skip"`` skipped, weight transforms, state saving
through one protocol, and the Trainer checks.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_aw._papers import PAPERS
from lightning_aw._sharding import full_value, gathered, is_sharded, strategy_name
from lightning_aw._utils import Stateful, grad_scaler, scaler_found_inf
from lightning_aw.module import MultiTaskModule
from lightning_aw.step import StepMethod
from lightning_aw.transforms import WeightTransform, as_transform

__all__ = ["Weighting"]

Interval = Literal["step", "epoch"]


class Weighting(StepMethod, Callback):
    """Base class of every weighting callback: the shared lifecycle.

    Subclass one of the two families, :class:`~lightning_aw.weighting.LossWeighting` or
    :class:`~lightning_aw.GradientWeighting`. Each training micro-batch,
    :class:`~lightning_aw.MultiTaskModule` hands the method a
    :class:`~lightning_aw.step.StepRecord` and backpropagates what :meth:`step_loss` returns.

    Intervals: ``interval="step"`` counts optimizer steps (so the weights are constant within a
    gradient-accumulation window), ``interval="epoch"`` counts training epochs; ``frequency=N``
    acts every ``N`` of them.

    State: the attributes named in ``_state_attrs`` (tensors, numbers, lists, dicts, or
    :class:`~lightning_aw._utils.Stateful` helpers such as optimizer moments and generators) are
    saved in checkpoints (``state_dict``), so a resumed run continues exactly as an uninterrupted
    one. Resuming a checkpoint whose state was saved with other hyperparameters (another
    ``state_key``) is an error, not a silent restart of the method.

    Skipped steps change nothing: an optimizer step the fp16 GradScaler skips (inf/NaN
    gradients) or that ``MultiTaskModule(on_nonfinite="skip")`` skips rolls the method's state
    back to the start of its accumulation window (a copy is kept only where steps can be skipped:
    under fp16, or ``"skip"`` with accumulation). Such steps do not count towards ``interval`` /
    ``frequency``; :attr:`scaler_skipped_steps` counts the GradScaler's. Diagnostic counters
    (``_diagnostic_attrs``, e.g. gradient methods' fallbacks) keep counting.

    Example::

        >>> from lightning_aw import DWA, MGDA, GradientWeighting, LossWeighting, Weighting
        >>> isinstance(DWA(), LossWeighting), isinstance(MGDA(), GradientWeighting)
        (True, True)
        >>> issubclass(LossWeighting, Weighting) and issubclass(GradientWeighting, Weighting)
        True
        >>> issubclass(GradientWeighting, LossWeighting)  # siblings, not parent and child
        False
    """

    #: What the weights sum to: ``"T"`` (number of tasks), ``1`` or ``None`` (not normalised).
    total: ClassVar[str | float | None] = "T"
    # what the class declares for the registry (:class:`lightning_aw.registry.MethodInfo`), as
    # class keywords: ``class DWA(LossWeighting, name="dwa", stateful=True)`` (see
    # ``__init_subclass__``)
    #: the registry name
    name: ClassVar[str | None] = None
    #: the reference (authors, title, venue, link); ``None`` for a plain baseline
    paper: ClassVar[str | None] = None
    #: the name of the functional twin in :mod:`lightning_aw.functional`
    functional: ClassVar[str | None] = None
    #: whether state carried from step to step decides future weights (saved in checkpoints)
    stateful: ClassVar[bool] = False
    #: whether the method draws random numbers (from its own seeded generator)
    stochastic: ClassVar[bool] = False
    #: whether the method takes per-task gradients (through :mod:`lightning_aw.engine`)
    needs_task_gradients: ClassVar[bool] = False
    #: whether it always works on the tensor marked with ``shared_representation``
    needs_representation: ClassVar[bool] = False
    #: whether tasks may be absent from some batches
    partial_labels: ClassVar[bool] = True
    #: whether the weights are fixed by design (the update may still adapt, as GradDrop's mask)
    constant_weights: ClassVar[bool] = False
    #: whether every present task loss must be above 0 (logarithms, ratios): checked by the
    #: module at the step a loss reaches 0 (see :meth:`loss_floor`)
    requires_positive_losses: ClassVar[bool] = False
    #: what the method needs of the task losses, and the cure, for the error message
    loss_requirement: ClassVar[str] = "positive task losses (it takes their logarithm)"
    loss_remedy: ClassVar[str] = (
        "Make the loss positive (e.g. add a constant to it), or use a weighting that accepts any "
        "sign (EqualWeighting, RLW, UncertaintyWeighting, MGDA, ...)."
    )
    #: Names of the attributes saved by :meth:`state_dict`.
    _state_attrs: ClassVar[tuple[str, ...]] = ()
    #: State attributes that are diagnostics (counters of fallbacks, of bad losses): kept, not
    #: rolled back, when an optimizer step turns out to have been skipped.
    _diagnostic_attrs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        functional: str | None = None,
        **flags: Any,
    ) -> None:
        """Declare a method's registry metadata as class keywords, once.

        ``name`` is the registry name (the paper comes from :data:`lightning_aw._papers.PAPERS`
        by that name, and the functional twin defaults to it); ``functional``, ``stateful``,
        ``stochastic``, ``needs_task_gradients``, ``needs_representation`` and
        ``constant_weights`` set the class attributes of the same names.
        """
        known = {
            "stateful",
            "stochastic",
            "needs_task_gradients",
            "needs_representation",
            "constant_weights",
        }
        unknown = sorted(set(flags) - known)
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown class keyword(s) {unknown}")
        super().__init_subclass__()
        if name is not None:
            cls.name, cls.paper = name, PAPERS.get(name)
            cls.functional = name if functional is None else functional
        elif functional is not None:
            cls.functional = functional
        for key, value in flags.items():
            setattr(cls, key, bool(value))

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
        # weak references: a deepcopy or pickle of the callback drags neither along
        self._bound: weakref.ref[pl.LightningModule] | None = None
        self._trainer_ref: weakref.ref[pl.Trainer] | None = None
        self._optimizer_steps = 0
        self._last_global_step = -1
        #: weight transforms (see :meth:`transformed`); ``None``: the method's weights as they are
        self.transform: WeightTransform | None = None
        self._applied: Tensor | None = None
        # the state at the start of the current optimizer step's window (rolled back when the
        # step is skipped), and whether the GradScaler found inf/NaN gradients
        self._window_snapshot: dict[str, Any] | None = None
        self._scaler_skip: bool | None = None
        self._scale_before: float | None = None
        #: number of optimizer steps the fp16 GradScaler skipped (weighting state rolled back)
        self.scaler_skipped_steps = 0
        self._zero_floor: Tensor | None = None
        # FSDP2: full values of the learnable parameters that `fully_shard` sharded (by name),
        # refreshed on every rank after each optimizer step, so reading the weights never
        # communicates
        self._learned_full: dict[str, Tensor] = {}
        self._state_key_cache: str | None = None  # see `state_key`

    # ------------------------------------------------------------------ template methods
    def init_state(self, num_tasks: int) -> None:
        """Create the state for ``num_tasks`` tasks. Called once, in ``setup``."""

    def weight_tensor(self) -> Tensor:
        """The method's weights at the current step, shape ``[T]`` (detached)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement `weight_tensor()` (its current weights [T])."
        )

    def after_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Called once after every optimizer step (not inside accumulation windows, not after a
        skipped step), with the last micro-batch. Override to update state from it."""

    def on_interval(self, trainer: pl.Trainer) -> None:
        """Called when ``interval``/``frequency`` elapses (after the optimizer step or at the end
        of the epoch). Override to recompute the weights."""

    @override
    def loss_floor(self, like: Tensor) -> Tensor | None:
        """Zeros (losses must be positive) when :attr:`requires_positive_losses`, else ``None``."""
        if not self.requires_positive_losses:
            return None
        floor = self._zero_floor
        if floor is None or floor.device != like.device or floor.shape != like.shape:
            floor = self._zero_floor = torch.zeros_like(like)
        return floor

    @override
    def loss_floor_message(self) -> tuple[str, str]:
        return f"{type(self).__name__} needs {self.loss_requirement}", self.loss_remedy

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
        self._state_key_cache = None
        return self

    def _transformed(self, weights: Tensor) -> Tensor:
        """The weights after the transforms (recorded as the applied ones), or ``weights``."""
        if self.transform is None:
            return weights
        self._applied = self.transform.apply(weights, self._optimizer_steps).detach()
        return self._applied

    @override
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
        # Lightning reads it at every hook call (its profiler's label): computed once per fit
        # (from ``setup`` to ``teardown``, when the hyperparameters are fixed), else each time
        cached = self.__dict__.get("_state_key_cache")
        if cached is not None:
            return cached
        extra = {} if self.transform is None else {"transform": repr(self.transform)}
        return self._generate_state_key(**self.hparams_repr(), **extra)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_bound"] = state["_trainer_ref"] = None
        state["_state_key_cache"] = None
        return state

    @property
    def _trainer(self) -> pl.Trainer | None:
        """The Trainer this method was last set up with (``None`` before, or once it is gone)."""
        return None if self._trainer_ref is None else self._trainer_ref()

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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
        self._trainer_ref = weakref.ref(trainer)
        self._state_key_cache = None
        self._state_key_cache = self.state_key
        if not self._first_setup(pl_module):
            return  # setup runs again for validate/test: initialise once
        self._bound = weakref.ref(pl_module)
        self.tasks = list(pl_module.tasks)
        self.init_state(len(self.tasks))
        if self.transform is not None:
            self.transform.reset(len(self.tasks))
        # the module finds this callback (and attaches `self.module`) in its own `setup` hook

    def _first_setup(self, pl_module: pl.LightningModule) -> bool:
        """Whether ``setup`` meets ``pl_module`` for the first time (state to initialise)."""
        return self._bound is None or self._bound() is not pl_module

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device = pl_module.device
        self._move_state(pl_module.device)
        self.check_optimizers(trainer)
        self._check_learned_sharding(trainer)
        self._refresh_learned()

    # ------------------------------------------------------------------ learnable parameters
    def _learned(self, name: str) -> Tensor:
        """The learnable parameter ``name`` of :attr:`module`, for the step's loss: itself, or
        under FSDP2 (a ``DTensor`` that ``fully_shard`` of the module sharded) its full value,
        whose gradient is averaged over the ranks and sharded back (DDP's semantics)."""
        param = getattr(self.module, name)
        if not is_sharded(param):
            return param
        full = gathered(param)
        self._learned_full[name] = full.detach()
        return full

    def _learned_param(self, name: str) -> Tensor:
        """The learnable parameter ``name`` as users read it: the parameter itself, or under
        FSDP2 its detached full value (no communication)."""
        param = getattr(self.module, name)
        return self._learned_value(name) if is_sharded(param) else param

    def _learned_value(self, name: str) -> Tensor:
        """The detached full value of the learnable parameter ``name`` (no communication: under
        FSDP2, the value gathered after the last optimizer step)."""
        param = getattr(self.module, name)
        if not is_sharded(param):
            return param.detach()
        cached = self._learned_full.get(name)
        return full_value(param) if cached is None else cached

    def _refresh_learned(self) -> None:
        """Gather the sharded learnable parameters' full values (every rank calls it)."""
        if self.module is None:
            return
        for name, param in self.module.named_parameters():
            if is_sharded(param):
                self._learned_full[name] = full_value(param)

    def _check_learned_sharding(self, trainer: pl.Trainer) -> None:
        """Under ModelParallelStrategy, the learnable parameters must be in a ``fully_shard``-ed
        module (else nothing reduces their gradients over the ranks and the ranks diverge)."""
        if self.module is None or strategy_name(trainer) != "ModelParallelStrategy":
            return
        plain = [n for n, p in self.module.named_parameters() if not is_sharded(p)]
        if plain:
            raise MisconfigurationException(
                f"{self!r} learns {plain} (attached to the module as `loss_weighting`), but "
                "under ModelParallelStrategy they are not sharded, so nothing would average "
                "their gradients over the ranks and the ranks would diverge. Apply "
                "`fully_shard(self, mesh=...)` to the LightningModule itself last in "
                "`configure_model` (after the trunk and the heads)."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._state_key_cache = None
        # Lightning moves the model back to the CPU at the end of fit: the state follows it, so
        # the weights read after training live where the model's (learnable) parameters do
        self._device = pl_module.device
        self._move_state(pl_module.device)
        self._learned_full = {k: v.to(pl_module.device) for k, v in self._learned_full.items()}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after a resume the loops (and global_step) are restored only now
        self._last_global_step = trainer.global_step
        if self._learned_full:
            # FSDP2: ModelParallelStrategy restores a checkpoint after `on_fit_start` (after
            # the model is sharded), so the full values gathered there predate the restored
            # learnable parameters (every rank runs this hook: the all-gather is collective)
            self._refresh_learned()

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
        if self._learned_full:  # FSDP2 only: the learnable parameters after the optimizer step
            self._refresh_learned()
        snapshot, self._window_snapshot = self._window_snapshot, None
        if self._skipped_by_scaler(trainer):
            # the parameters did not move: neither does the weighting
            if snapshot is not None:
                self._restore_state(snapshot)
            self.scaler_skipped_steps += 1
            return
        if isinstance(pl_module, MultiTaskModule) and pl_module.step_skipped:
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
            self.on_interval(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch" and (trainer.current_epoch + 1) % self.frequency == 0:
            self.on_interval(trainer)

    # ------------------------------------------------------------------ state
    def _state_names(self) -> tuple[str, ...]:
        base: tuple[str, ...] = ("_optimizer_steps",)
        if self.transform is not None:
            base = (*base, "transform", "_applied")
        return base + self._state_attrs

    def _snapshot_state(self) -> dict[str, Any]:
        """A copy of the state that drives the weights (diagnostic counters left out)."""
        return {
            name: _clone(_export(getattr(self, name)))
            for name in self._state_names()
            if name not in self._diagnostic_attrs
        }

    def _restore_state(self, snapshot: dict[str, Any]) -> None:
        """Put back a :meth:`_snapshot_state` (same process, same devices)."""
        for name, value in snapshot.items():
            self._set_state(name, value)

    def _set_state(self, name: str, value: Any) -> None:
        current = getattr(self, name)
        if isinstance(current, Stateful):
            current.load_state_dict(value)
        else:
            setattr(self, name, value)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tasks": list(self.tasks)}
        for name in self._state_names():
            state[name] = _clone(_export(getattr(self, name)))
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
            if name in state_dict:
                self._set_state(name, state_dict[name])
        self._move_state(self._device)

    def _move_state(self, device: torch.device) -> None:
        for name in self._state_names():
            value = getattr(self, name)
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, Stateful):
                value.to(device)

    # ------------------------------------------------------------------ module helpers
    def _register_module(self, module: nn.Module) -> None:
        """Declare learnable parameters; MultiTaskModule attaches them as ``loss_weighting``.

        Attached to the LightningModule, they follow Lightning's device, precision and DDP
        handling and are saved in the model checkpoint.
        """
        self.module = module


def _export(value: Any) -> Any:
    """A state value as saved: a helper's ``state_dict``, anything else as it is."""
    return value.state_dict() if isinstance(value, Stateful) else value


def _clone(value: Any) -> Any:
    """A copy of ``value`` whose tensors (also inside dicts, lists and tuples) are cloned."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value
