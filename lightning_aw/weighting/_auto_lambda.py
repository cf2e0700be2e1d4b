"""Auto-Lambda: task weights learned by a one-step look-ahead on a validation batch."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.utils.data
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_aw._sharding import strategy_name
from lightning_aw._utils import AdamState
from lightning_aw.engine import TaskGradients, present_mean
from lightning_aw.functional import auto_lambda_grad
from lightning_aw.module import MultiTaskModule
from lightning_aw.step import StepRecord
from lightning_aw.weighting._base import LossWeighting


class _TaskLossesOf(nn.Module):
    """Calls ``module.compute_task_losses`` as its forward (for ``torch.func.functional_call``)."""

    def __init__(self, module: MultiTaskModule) -> None:
        super().__init__()
        self.m = module

    def forward(self, batch: Any, batch_idx: int) -> Any:
        return self.m.compute_task_losses(batch, batch_idx)


class AutoLambda(LossWeighting, name="auto_lambda", functional="auto_lambda_grad", stateful=True):
    r"""Auto-Lambda: task weights that minimise the validation loss after a look-ahead step.

    Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR
    2022, https://arxiv.org/abs/2202.03091.

    The network minimises :math:`\sum_i \lambda_i L_i`. Before each training step the weights
    take an optimizer step on the validation loss of the primary tasks after a *virtual* SGD step
    of the network on the weighted training loss:

    .. math::

        \theta' = \theta - \alpha\bigl(m + \textstyle\sum_i \lambda_i \nabla_\theta
        L_i^{\text{train}}(\theta) + \omega\theta\bigr), \qquad
        \lambda \leftarrow \operatorname{Adam}\Bigl(\lambda;\
        \nabla_\lambda \sum_{j \in P} L_j^{\text{val}}(\theta')\Bigr),

    with :math:`\alpha` the optimizer's current learning rate (per parameter group), :math:`m`
    SGD's momentum buffer times its momentum and :math:`\omega` the weight decay (both as the
    authors' implementation; 0 for other optimizers' momentum). The hypergradient is computed
    **exactly**: :math:`\theta'` is linear in :math:`\lambda`, so
    :math:`\partial L^{\text{val}}(\theta')/\partial\lambda_i = -\alpha\langle\nabla_\theta
    L_i^{\text{train}}(\theta), \nabla_{\theta'}L^{\text{val}}(\theta')\rangle`
    (:func:`lightning_aw.functional.auto_lambda_grad`). This is the quantity the paper's
    implementation approximates by a central finite difference (DARTS' approximation, two extra
    forward and backward passes at :math:`\theta \pm \epsilon\nabla L^{\text{val}}`); no second
    derivative is needed and no approximation is made.

    How it runs, per update (every ``frequency`` optimizer steps, at the first micro-batch of
    the window):

    - the per-task gradients of the step's own losses on every trainable parameter of the module
      (:class:`~lightning_aw.engine.TaskGradients`, T backward passes through the model);
    - one validation batch (see ``val_data``), evaluated with
      :meth:`MultiTaskModule.compute_task_losses <lightning_aw.MultiTaskModule.compute_task_losses>`
      at the virtual parameters through ``torch.func.functional_call`` (one forward and one
      backward; the module's buffers, e.g. batch-norm statistics, are copies there, so the
      virtual forward leaves the model untouched), in training mode and under the precision
      plugin's autocast;
    - one Adam step of the weights, then the step's loss :math:`\sum_i\lambda_i L_i` with the new
      weights (one ordinary backward).

    Extra memory: one copy of the trainable parameters (:math:`\theta'`) and the T per-task
    gradients of the model.

    Conventions:

    - ``val_data="train"`` (default, the authors' implementation: "a copy of train_loader with
      different data order"): a copy of the training ``DataLoader`` (same dataset, batch size,
      collate function, workers), reshuffled every epoch with a generator seeded by the epoch
      number, so reproducible and, under DDP, the same batches on every rank (the copy is not
      sharded). The training loader itself is not iterated a second time.
      ``val_data="val"``: the Trainer's (first) validation dataloader, cycled (under DDP
      Lightning's distributed sampler gives each rank its own shard). A ``DataLoader`` (any
      re-iterable): cycled as given, on every rank (shard it yourself if you want the ranks to
      see different batches). The iterator restarts every epoch; batches go through
      ``trainer.strategy.batch_to_device``.
    - Under DDP every rank computes the hypergradient on its own batches and the ranks average
      it (per task, over the ranks where the task is in the training batch; one all-reduce) before
      the Adam step, so the weights are identical on every rank.
    - On resume the validation iterator restarts at the epoch's beginning and skips the batches
      the interrupted run drew in that epoch (exact with a deterministic loader order).
    - Under the fp16 GradScaler the look-ahead's gradients are taken unscaled (the scale is
      tuned for the real, weighted backward; scaled, the per-task ones would overflow where it
      does not); a non-finite hypergradient leaves the weights and Adam's moments unchanged.
    - With ``accumulate_grad_batches=k`` the weights move once per optimizer step, from the
      window's first micro-batch (its gradients, not divided by ``k``).
    - The weights are not normalised nor constrained (``total = None``), as in the paper; they
      start at ``init``. Tasks absent from the training batch get a zero hypergradient there.
    - Refused before the first step: FSDP, FSDP2, DeepSpeed (the virtual parameters are the full
      model's), and a missing validation dataloader for ``val_data="val"``.

    Defaults, from the authors' implementation (``trainer_dense.py``): ``init=0.1``
    (``--autol_init``), Adam with ``lr=1e-4`` (``--autol_lr``), an update every step
    (``frequency=1``), every task primary (multi-task learning; name the primary tasks for
    auxiliary learning).

    Args:
        lr: learning rate of the weights' Adam.
        init: initial weight of every task.
        primary_tasks: the tasks whose validation loss is minimised (default: all).
        val_data: ``"train"``, ``"val"`` or an iterable of batches (e.g. a ``DataLoader``).
        frequency: update the weights every ``frequency`` optimizer steps.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_aw import AutoLambda
        >>> method = AutoLambda(primary_tasks=["seg"], val_data="val")
        >>> trainer = pl.Trainer(callbacks=[method], logger=False)
        >>> method
        AutoLambda(lr=0.0001, init=0.1, primary_tasks=['seg'], val_data='val', frequency=1)
    """

    total: ClassVar[str | float | None] = None
    needs_task_gradients: ClassVar[bool] = True
    uses_window_means = False
    _state_attrs = ("_weights", "_adam", "_updated_at", "_val_epoch", "_val_position")
    #: draws from the validation iterator are counted, not rolled back with a skipped step
    _diagnostic_attrs = ("_val_position",)

    def __init__(
        self,
        lr: float = 1e-4,
        init: float = 0.1,
        primary_tasks: Sequence[str] | None = None,
        val_data: str | Iterable[Any] = "train",
        frequency: int = 1,
    ) -> None:
        super().__init__(frequency=frequency)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise ValueError(f"Parameter `lr` should be a finite number > 0. Found {lr!r}.")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or init != init:
            raise ValueError(f"Parameter `init` should be a finite number. Found {init!r}.")
        if isinstance(primary_tasks, str):
            primary_tasks = [primary_tasks]
        if primary_tasks is not None and not list(primary_tasks):
            raise ValueError("Parameter `primary_tasks` should name at least one task or be None.")
        if isinstance(val_data, str):
            if val_data not in ("train", "val"):
                raise ValueError(
                    "Parameter `val_data` should be 'train', 'val' or an iterable of batches "
                    f"(e.g. a DataLoader). Found {val_data!r}."
                )
        elif not isinstance(val_data, Iterable):
            raise ValueError(
                "Parameter `val_data` should be 'train', 'val' or an iterable of batches "
                f"(e.g. a DataLoader). Found a {type(val_data).__name__}."
            )
        self.lr = float(lr)
        self.init = float(init)
        self.primary_tasks = None if primary_tasks is None else list(primary_tasks)
        self.val_data = val_data
        self._adam = AdamState(lr=self.lr)
        self._weights = torch.ones(0)
        self._primary_list: list[bool] = []
        self._updated_at = -1
        self._val_epoch = -1
        self._val_position = 0
        self._val_iter: Iterator[Any] | None = None

    def hparams_repr(self) -> dict[str, Any]:
        data = self.val_data if isinstance(self.val_data, str) else type(self.val_data).__name__
        return {
            "lr": self.lr,
            "init": self.init,
            "primary_tasks": self.primary_tasks,
            "val_data": data,
            "frequency": self.frequency,
        }

    def init_state(self, num_tasks: int) -> None:
        primary = self.tasks if self.primary_tasks is None else self.primary_tasks
        unknown = sorted(set(primary) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"AutoLambda(primary_tasks=...) names unknown tasks {unknown}; the module's tasks "
                f"are {self.tasks}."
            )
        self._primary_list = [t in primary for t in self.tasks]
        self._weights = torch.full((num_tasks,), self.init)
        self._adam = AdamState(lr=self.lr)
        self._updated_at = -1
        self._val_epoch, self._val_position = -1, 0

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_val_iter"] = None  # a live iterator (worker processes) does not travel
        return state

    def weight_tensor(self) -> Tensor:
        return self._weights

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = strategy_name(trainer)
        if name in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"):
            raise MisconfigurationException(
                f"{self!r} takes a virtual step of the whole model (its full parameters), which "
                f"is not supported under {name}. Train with DDP or on one device."
            )
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._val_iter = None
        self._loader(trainer)  # a missing validation dataloader is an error before the first step

    def _loader(self, trainer: pl.Trainer) -> Iterable[Any]:
        if not isinstance(self.val_data, str):
            return self.val_data
        if self.val_data == "train":
            return self._shuffled_copy(trainer)
        else:
            loader = trainer.val_dataloaders
            if loader is None:  # set up lazily by Lightning: do it now
                with contextlib.suppress(MisconfigurationException):  # no hook: said below
                    trainer.fit_loop.epoch_loop.val_loop.setup_data()
                loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        elif isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
        if loader is None:
            raise MisconfigurationException(
                f"{self!r} draws its validation batches from the Trainer's "
                f"{'validation' if self.val_data == 'val' else 'training'} dataloader, but there "
                "is none. Define `val_dataloader()` (module or datamodule), or pass "
                "AutoLambda(val_data=DataLoader(...)) or val_data='train'."
            )
        return loader

    def _shuffled_copy(self, trainer: pl.Trainer) -> Iterable[Any]:
        """A copy of the training DataLoader over the same dataset, reshuffled every epoch with
        a generator seeded by the epoch number (the training loader itself is left alone: a
        second iterator over a stateful or distributed loader would disturb its order)."""
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple)) and len(loader) == 1:
            loader = loader[0]
        dataset = getattr(loader, "dataset", None)
        batch_size = getattr(loader, "batch_size", None)
        if dataset is None or batch_size is None or not hasattr(dataset, "__getitem__"):
            raise MisconfigurationException(
                f"{self!r} draws its validation batches from a shuffled copy of the training "
                "DataLoader (val_data='train'), which needs a single DataLoader over a map-style "
                f"dataset with a batch size; the Trainer trains on a {type(loader).__name__}. "
                "Pass AutoLambda(val_data=DataLoader(...)) or val_data='val'."
            )
        generator = torch.Generator().manual_seed(int(trainer.current_epoch))
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=loader.collate_fn,
            drop_last=loader.drop_last,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )

    def _next_val_batch(self, trainer: pl.Trainer) -> tuple[Any, int]:
        epoch = trainer.current_epoch
        if self._val_iter is None or self._val_epoch != epoch:
            self._val_iter = iter(self._loader(trainer))
            if self._val_epoch == epoch:  # resumed inside this epoch: skip what was drawn
                for _ in range(self._val_position):
                    self._draw(trainer)
            else:
                self._val_epoch, self._val_position = epoch, 0
        batch = self._draw(trainer)
        index = self._val_position
        self._val_position += 1
        return trainer.strategy.batch_to_device(batch), index

    def _draw(self, trainer: pl.Trainer) -> Any:
        assert self._val_iter is not None
        try:
            return next(self._val_iter)
        except StopIteration:  # cycled
            self._val_iter = iter(self._loader(trainer))
            try:
                return next(self._val_iter)
            except StopIteration:
                raise MisconfigurationException(
                    f"{self!r}: the validation data is empty."
                ) from None

    # ------------------------------------------------------------------ the step
    @override
    def step_loss(self, step: StepRecord) -> Tensor:
        losses = step.losses
        if (
            torch.is_grad_enabled()
            and losses.requires_grad
            and self._updated_at != self._optimizer_steps
            and self._optimizer_steps % self.frequency == 0
        ):
            self._meta_update(step)
            self._updated_at = self._optimizer_steps
        weights = self._weights.to(losses)
        if self.transform is not None:
            weights = self._transformed(weights).to(losses)
        return (weights * losses).sum()

    def _meta_update(self, step: StepRecord) -> None:
        trainer = step.trainer
        module = None if trainer is None else trainer.lightning_module
        if trainer is None or not isinstance(module, MultiTaskModule):
            raise MisconfigurationException(f"{self!r} needs a MultiTaskModule run by a Trainer.")
        named = [
            (n, p)
            for n, p in module.named_parameters()
            if p.requires_grad and not n.startswith("loss_weighting.")
        ]
        params = [p for _, p in named]
        # unscaled, also under fp16: the GradScaler's scale is tuned for the real (weighted,
        # divided) backward, and scaled per-task look-ahead gradients would overflow where it
        # does not (a record without a Trainer has no scaler and no accumulation)
        engine = TaskGradients(dataclasses.replace(step, trainer=None), self)
        rows = engine.on_parameters_scaled(params)
        grads = [None if r is None else [g.float() for g in r] for r in rows]
        # the virtual SGD step on the weighted training loss (the weights before this update)
        rates, virtual = self._virtual_step(trainer, named, grads)
        # the validation loss of the primary tasks at the virtual parameters
        batch, index = self._next_val_batch(trainer)
        leaves = {n: v.requires_grad_() for n, v in virtual.items()}
        buffers = {f"m.{n}": b.clone() for n, b in module.named_buffers()}
        inputs = {f"m.{n}": v for n, v in leaves.items()}
        with trainer.precision_plugin.train_step_context():
            values, present = torch.func.functional_call(
                _TaskLossesOf(module), {**inputs, **buffers}, (batch, index)
            )
        terms = [
            v for v, here, p in zip(values, present, self._primary_list, strict=True) if here and p
        ]
        meta = torch.zeros(step.num_tasks, device=step.losses.device)
        if terms:
            val_loss = torch.stack(terms).sum()
            d = torch.autograd.grad(val_loss, list(leaves.values()), allow_unused=True)
            for (_, p), rate, dj, j in zip(named, rates, d, range(len(named)), strict=True):
                if dj is None or rate == 0.0:
                    continue
                block = torch.stack(
                    [
                        torch.zeros(p.numel(), device=p.device)
                        if g is None
                        else g[j].reshape(-1).float()
                        for g in grads
                    ]
                )
                meta = meta + auto_lambda_grad(block, dj.reshape(-1).float(), rate)
        meta, _, _ = present_mean(trainer, meta, step.present)
        self._weights = self._adam.update(self._weights, meta)

    def _virtual_step(
        self,
        trainer: pl.Trainer,
        named: list[tuple[str, Tensor]],
        grads: list[list[Tensor] | None],
    ) -> tuple[list[float], dict[str, Tensor]]:
        """The learning rate of each parameter and its value after one SGD step on the
        weighted training loss (with SGD's momentum buffer and the group's weight decay)."""
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        groups: dict[int, dict[str, Any]] = {}
        if optimizer is not None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    groups[id(p)] = group
        sgd = isinstance(optimizer, torch.optim.SGD)
        weights = self._weights.float()
        rates: list[float] = []
        virtual: dict[str, Tensor] = {}
        for j, (name, p) in enumerate(named):
            group = groups.get(id(p))
            rate = 0.0 if group is None else float(group["lr"])
            direction = torch.zeros(p.shape, device=p.device)
            for i, g in enumerate(grads):
                if g is not None:
                    direction = direction + weights[i] * g[j].float()
            if group is not None:
                decay = float(group.get("weight_decay") or 0.0)
                if decay:
                    direction = direction + decay * p.detach().float()
                momentum = float(group.get("momentum") or 0.0) if sgd else 0.0
                buf = optimizer.state.get(p, {}).get("momentum_buffer") if sgd else None
                if momentum and buf is not None:
                    direction = direction + momentum * buf.float()
            virtual[name] = (p.detach().float() - rate * direction).to(p.dtype)
            rates.append(rate)
        return rates, virtual
