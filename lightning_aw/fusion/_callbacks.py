"""Callbacks that set a WeightedEnsemble's weights from its members' errors or losses."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_aw._utils import all_reduce_sum
from lightning_aw.functional._fusion import hedge, samme_alpha
from lightning_aw.fusion._ensemble import WeightedEnsemble

__all__ = ["HedgeWeights", "SAMMEWeights"]

TargetsFn = Callable[[Any], Tensor]


def default_targets(batch: Any) -> Tensor:
    """The targets of an ``(inputs, targets, ...)`` batch: ``batch[1]``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    raise MisconfigurationException(
        "The fusion callback could not find the targets in the batch (expected "
        "`(inputs, targets, ...)`). Pass `targets=lambda batch: ...` to the callback."
    )


class _FusionCallback(Callback):
    """Shared by the fusion callbacks: find the ensemble, read the members' outputs, log."""

    def __init__(self, ensemble: str | None, targets: TargetsFn | None) -> None:
        if ensemble is not None and not isinstance(ensemble, str):
            raise TypeError(
                f"Parameter `ensemble` should be the attribute name of the WeightedEnsemble on the "
                f"LightningModule (or None to find it). Found {type(ensemble).__name__}."
            )
        self.ensemble_attr = ensemble
        self.targets = targets if targets is not None else default_targets
        self._ensemble: WeightedEnsemble | None = None
        self.num_updates = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ensemble=self.ensemble_attr)

    def _find(self, pl_module: pl.LightningModule) -> WeightedEnsemble:
        name = type(self).__name__
        if self.ensemble_attr is not None:
            found = getattr(pl_module, self.ensemble_attr, None)
            if not isinstance(found, WeightedEnsemble):
                raise MisconfigurationException(
                    f"{name}: `{type(pl_module).__name__}.{self.ensemble_attr}` is not a "
                    "WeightedEnsemble."
                )
        else:
            all_found = [m for m in pl_module.modules() if isinstance(m, WeightedEnsemble)]
            if len(all_found) != 1:
                raise MisconfigurationException(
                    f"{name} needs exactly one WeightedEnsemble in the LightningModule; found "
                    f"{len(all_found)}. Pass `ensemble='<attribute name>'`."
                )
            found = all_found[0]
        if found.mode != "fixed":
            raise MisconfigurationException(
                f"{name} sets the ensemble's weights, but it learns them (weights='learned'). "
                "Create the WeightedEnsemble with weights='fixed'."
            )
        return found

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._ensemble = self._find(pl_module)

    @property
    def ensemble(self) -> WeightedEnsemble:
        if self._ensemble is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer yet.")
        return self._ensemble

    def _member_outputs(self, batch: Any, hook: str) -> tuple[list[Tensor], Tensor]:
        outputs = self.ensemble.last_member_outputs
        if outputs is None:
            raise MisconfigurationException(
                f"{type(self).__name__}: the WeightedEnsemble was not called in this batch's "
                f"{hook}. Call it on the batch (its member outputs are what the weights are "
                "computed from)."
            )
        self.ensemble.last_member_outputs = None  # never read one batch's outputs twice
        targets = self.targets(batch)
        out = [outputs[n] for n in self.ensemble.names]
        if out[0].shape[0] != targets.shape[0]:
            raise MisconfigurationException(
                f"{type(self).__name__}: the members' outputs have {out[0].shape[0]} samples, the "
                f"batch's targets {targets.shape[0]}."
            )
        return out, targets.to(out[0].device)

    def _log(self, trainer: pl.Trainer, weights: Tensor, extra: dict[str, float]) -> None:
        names = self.ensemble.names
        metrics = {f"fusion/{n}": float(w) for n, w in zip(names, weights.tolist(), strict=True)}
        metrics.update(extra)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def tensorboard_charts(self, pl_module: pl.LightningModule) -> dict[str, list[Any]]:
        """The custom-scalars chart of the fusion weights (title -> ``["Multiline", [tag
        patterns]]``); a :class:`~lightning_aw.MultiTaskModule` adds it to its own layout."""
        tags = [f"^{re.escape(f'fusion/{n}')}$" for n in self.ensemble.names]
        return {"fusion weights": ["Multiline", tags]}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_aw.module import MultiTaskModule

        # TensorBoard reads one layout per run: a MultiTaskModule writes this chart in its own
        if not trainer.is_global_zero or isinstance(pl_module, MultiTaskModule):
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                layout = self.tensorboard_charts(pl_module)
                logger.experiment.add_custom_scalars({"lightning_aw fusion": layout})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])


class SAMMEWeights(_FusionCallback):
    r"""Set the fusion weights from each member's validation error, with SAMME's learner weight.

    Zhu, Zou, Rosset, Hastie, "Multi-class AdaBoost", Statistics and Its Interface 2009,
    https://doi.org/10.4310/SII.2009.v2.n3.a8.

    After every validation epoch of a fit (not the sanity check), with :math:`\varepsilon_m` the
    fraction of validation samples member ``m`` misclassifies (argmax of its logits, over all
    ranks):

    .. math::

        \alpha_m = \eta\left(\ln\frac{1 - \varepsilon_m}{\varepsilon_m} + \ln(K - 1)\right),
        \qquad w_m = \frac{\alpha_m}{\sum_j \alpha_j}

    A member no better than chance (:math:`\varepsilon_m \ge 1 - 1/K`) gets :math:`\alpha_m = 0`
    (weight 0) and a warning; SAMME would stop boosting there. If every member is that bad, the
    weights are left as they are (with a warning). :math:`\varepsilon_m` is floored at
    ``min_error``: SAMME's convention for a perfect learner (:math:`\alpha = 1`, then stop) would
    give a perfect member *less* weight than an imperfect one.

    Protocol: the LightningModule holds one :class:`WeightedEnsemble` (``weights="fixed"``;
    found among its submodules, or named by ``ensemble``) and calls it in ``validation_step`` on
    the batch; the callback reads :attr:`WeightedEnsemble.last_member_outputs` and the batch's
    targets (``targets(batch)``, default ``batch[1]``) in ``on_validation_batch_end``.
    Misclassification counts are summed over the DDP ranks in one all-reduce, so every rank sets
    identical weights. The weights are logged to every logger as ``fusion/<member>`` (one grouped
    TensorBoard chart), with ``fusion_error/<member>``. The weights themselves are the
    ensemble's buffer (in the module's checkpoint); the callback's state holds the number of
    updates and the last errors.

    Args:
        num_classes: number of classes ``K >= 2``.
        learning_rate: SAMME's shrinkage ``η > 0`` (it scales every ``α``: no effect on the
            normalised weights, kept for parity with :func:`~lightning_aw.functional.samme`).
        min_error: floor of ``ε`` (``> 0``).
        ensemble: attribute name of the ensemble on the module (default: the only one).
        targets: ``batch -> targets`` (class indices, ``[N]``).

    Example::

        >>> SAMMEWeights(num_classes=3)
        SAMMEWeights(num_classes=3, learning_rate=1.0, min_error=0.001)
    """

    def __init__(
        self,
        num_classes: int,
        *,
        learning_rate: float = 1.0,
        min_error: float = 1e-3,
        ensemble: str | None = None,
        targets: TargetsFn | None = None,
    ) -> None:
        super().__init__(ensemble, targets)
        # validate through the functional twin's checks
        samme_alpha(torch.zeros(1), num_classes, learning_rate)
        if not (isinstance(min_error, (int, float)) and 0 < min_error < 1 - 1 / num_classes):
            raise ValueError(
                f"Parameter `min_error` should lie in (0, 1 - 1/num_classes). Found {min_error!r}."
            )
        self.num_classes = num_classes
        self.learning_rate = float(learning_rate)
        self.min_error = float(min_error)
        self.errors: list[float] | None = None
        self._wrong: Tensor | None = None
        self._count: Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, "
            f"learning_rate={self.learning_rate}, min_error={self.min_error})"
        )

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = len(self.ensemble.names)  # integer counts: exact, and on every device (MPS: no f64)
        self._wrong = torch.zeros(m, dtype=torch.int64, device=pl_module.device)
        self._count = torch.zeros((), dtype=torch.int64, device=pl_module.device)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or self._wrong is None or self._count is None:
            self.ensemble.last_member_outputs = None
            return
        out, y = self._member_outputs(batch, "validation_step")
        wrong = torch.stack([(o.argmax(dim=1) != y).sum() for o in out])
        self._wrong += wrong.to(self._wrong)
        self._count += y.numel()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self._wrong is None or self._count is None:
            return
        wrong, count = all_reduce_sum(trainer, self._wrong, self._count)  # one all-reduce
        self._wrong = self._count = None
        wrong, count = wrong.cpu().double(), count.cpu().double()  # the epoch's one host read
        if float(count) == 0:
            rank_zero_warn(f"{self!r}: no validation sample seen; the weights are unchanged.")
            return
        error = (wrong / count).clamp(min=self.min_error)
        alpha = samme_alpha(error, self.num_classes, self.learning_rate)
        chance = 1.0 - 1.0 / self.num_classes
        names = self.ensemble.names
        bad = [n for n, e in zip(names, error.tolist(), strict=True) if e >= chance]
        self.errors = (wrong / count).tolist()
        if len(bad) == len(names):
            rank_zero_warn(
                f"{self!r}: every member's validation error is >= 1 - 1/K = {chance:.4g} "
                f"({dict(zip(names, self.errors, strict=True))}); the weights are unchanged."
            )
            return
        if bad:
            rank_zero_warn(
                f"{self!r}: members {bad} are no better than chance (error >= 1 - 1/K = "
                f"{chance:.4g}); they get weight 0 (SAMME would stop boosting here)."
            )
        weights = alpha / alpha.sum()
        self.ensemble.set_weights(weights)
        self.num_updates += 1
        errors = {f"fusion_error/{n}": e for n, e in zip(names, self.errors, strict=True)}
        self._log(trainer, weights, errors)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.num_updates == 0:
            rank_zero_warn(
                f"{self!r} never updated the fusion weights: no validation epoch ran in this fit "
                "(pass val_dataloaders and check limit_val_batches / check_val_every_n_epoch)."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "errors": self.errors}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        errors = state_dict.get("errors")
        self.errors = None if errors is None else [float(e) for e in errors]


class HedgeWeights(_FusionCallback):
    r"""Set the fusion weights by Hedge (multiplicative weights) from the members' training losses.

    Freund, Schapire, "A Decision-Theoretic Generalization of On-Line Learning and an Application
    to Boosting", JCSS 1997, https://doi.org/10.1006/jcss.1997.1504.

    After every training batch, with :math:`\ell_m` member ``m``'s mean loss on the batch (over
    all ranks: per-member loss sums and the sample count in one all-reduce, so every rank sets
    identical weights):

    .. math::

        w_m \leftarrow \frac{w_m\, e^{-\eta \ell_m}}{\sum_j w_j\, e^{-\eta \ell_j}}

    (:func:`~lightning_aw.functional.hedge`). The protocol is :class:`SAMMEWeights`', in
    ``training_step``: the module calls its :class:`WeightedEnsemble` (``weights="fixed"``) on
    the batch, the callback reads the detached member outputs and ``targets(batch)`` in
    ``on_train_batch_end`` (one host read of ``M`` losses per batch). Weights are logged as
    ``fusion/<member>`` every ``log_every_n_steps`` optimizer steps; they are the ensemble's
    buffer (in the module's checkpoint), so a resumed fit continues from them.

    Args:
        eta: the learning rate ``η >= 0`` of the update (per batch).
        loss_fn: ``(logits, targets) -> mean loss`` of one member (default: cross-entropy).
        ensemble: attribute name of the ensemble on the module (default: the only one).
        targets: ``batch -> targets``.

    Example::

        >>> HedgeWeights(eta=0.5)
        HedgeWeights(eta=0.5)
    """

    def __init__(
        self,
        eta: float = 0.1,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        ensemble: str | None = None,
        targets: TargetsFn | None = None,
    ) -> None:
        super().__init__(ensemble, targets)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)):
            raise ValueError(f"Parameter `eta` should be a finite number >= 0. Found {eta!r}.")
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"Parameter `eta` should be a finite number >= 0. Found {eta!r}.")
        self.eta = float(eta)
        self.loss_fn = loss_fn

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eta={self.eta})"

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        out, y = self._member_outputs(batch, "training_step")
        n = torch.tensor(float(y.shape[0]), dtype=torch.float32, device=out[0].device)
        sums = torch.stack([self.loss_fn(o, y).detach().float() for o in out]) * n
        sums, n = all_reduce_sum(trainer, sums, n)  # one all-reduce
        losses = (sums / n).cpu().double()  # the batch's one host read; Hedge in float64
        if not bool(torch.isfinite(losses).all()):
            rank_zero_warn(
                f"{self!r}: non-finite member losses "
                f"{dict(zip(self.ensemble.names, losses.tolist(), strict=True))} at step "
                f"{trainer.global_step}; the weights are unchanged."
            )
            return
        w = self.ensemble.fixed_weights.detach().cpu().double()
        weights = hedge(w, losses, self.eta)
        self.ensemble.set_weights(weights)
        self.num_updates += 1
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            losses_log = {
                f"fusion_loss/{n}": v
                for n, v in zip(self.ensemble.names, losses.tolist(), strict=True)
            }
            self._log(trainer, weights, losses_log)
