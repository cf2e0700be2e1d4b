"""Boosting: train members one after another on SAMME's sample weights, one Trainer per round."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from lightning_aw.functional._fusion import samme

__all__ = ["Boosting"]

STATE_FILE = "boosting.pt"


class Boosting:
    r"""Discrete SAMME boosting of neural networks: one Lightning fit per member.

    Zhu, Zou, Rosset, Hastie, "Multi-class AdaBoost", Statistics and Its Interface 2009,
    https://doi.org/10.4310/SII.2009.v2.n3.a8.

    Round ``m`` builds ``member_factory(m)`` (after ``pl.seed_everything(seed + m)``), trains it
    with a fresh ``pl.Trainer(**trainer_kwargs)`` on the training set resampled by the current
    sample weights, predicts the whole training set (argmax of the member's logits), and takes
    one :func:`~lightning_aw.functional.samme` step: the member's weight ``α_m`` and the next
    sample weights. As scikit-learn's ``AdaBoostClassifier``: a member with training error 0 is
    kept with ``α = 1`` and boosting stops; a member no better than chance
    (``ε ≥ 1 - 1/K``) is discarded and boosting stops (a first such member raises).

    Sample weights reach the member through a
    :class:`~torch.utils.data.WeightedRandomSampler` (``N`` draws with replacement per epoch,
    seeded per round): boosting by resampling (Freund & Schapire 1997). The member's
    ``training_step`` stays an ordinary, unweighted loss: any LightningModule works unchanged,
    and the expected gradient is the gradient of the weighted loss ``Σ w_i ℓ_i``. Per-sample
    loss weights would need every member to read a weight from the batch.

    Prediction is SAMME's weighted vote, ``argmax_k Σ_m α_m [h_m(x) = k]``.

    Checkpoints: after each round, ``root_dir/member_<m>.ckpt`` (the member's Trainer
    checkpoint) and ``root_dir/boosting.pt`` (round, sample weights, ``α``, errors, stop flag).
    :meth:`fit` on a ``root_dir`` holding ``boosting.pt`` reloads the finished members and
    continues at the next round with the saved sample weights (a round interrupted midway is
    retrained from its start, seeded as before). TensorBoard (unless ``trainer_kwargs`` sets a
    logger): one run ``root_dir/tb``, each member's Trainer logging under
    ``member_<m>/``, and the boosting scalars ``boosting/alpha``, ``boosting/error`` and
    ``boosting/train_error`` (the weighted vote's training error) at step ``m``.

    Args:
        member_factory: ``round -> LightningModule``; the module's ``forward(x)`` returns logits
            ``[N, K]``.
        num_members: the number of rounds ``M >= 1``.
        num_classes: ``K >= 2``; targets are class indices ``0..K-1``.
        trainer_kwargs: arguments of each round's ``pl.Trainer``.
        learning_rate: SAMME's shrinkage ``η > 0``.
        root_dir: where checkpoints and TensorBoard logs go.
        seed: base seed (round ``m`` uses ``seed + m`` for the model and the sampler).
        batch_size: training batch size (default: the datamodule's, else 32).

    Example::

        >>> Boosting(lambda m: None, num_members=3, num_classes=2)
        Boosting(num_members=3, num_classes=2, learning_rate=1.0)
    """

    def __init__(
        self,
        member_factory: Callable[[int], pl.LightningModule],
        num_members: int,
        num_classes: int,
        *,
        trainer_kwargs: Mapping[str, Any] | None = None,
        learning_rate: float = 1.0,
        root_dir: str | Path = "boosting",
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        if not callable(member_factory):
            raise TypeError("Parameter `member_factory` should be a callable round -> module.")
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise ValueError(
                f"Parameter `num_members` should be an int >= 1. Found {num_members!r}."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"Parameter `num_classes` should be an int >= 2. Found {num_classes!r}."
            )
        if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
            raise ValueError(f"Parameter `learning_rate` should be > 0. Found {learning_rate!r}.")
        self.member_factory = member_factory
        self.num_members = num_members
        self.num_classes = num_classes
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.learning_rate = float(learning_rate)
        self.root_dir = Path(root_dir)
        self.seed = seed
        self.batch_size = batch_size
        self.members: list[pl.LightningModule] = []
        self.alphas: list[float] = []
        self.errors: list[float] = []
        self.sample_weight: Tensor | None = None
        self.stopped = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_members={self.num_members}, "
            f"num_classes={self.num_classes}, learning_rate={self.learning_rate})"
        )

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Round, sample weights, ``α``, errors and the stop flag (plain tensors and lists)."""
        return {
            "round": len(self.members),
            "sample_weight": self.sample_weight,
            "alphas": list(self.alphas),
            "errors": list(self.errors),
            "stopped": self.stopped,
            "num_classes": self.num_classes,
        }

    def _member_ckpt(self, m: int) -> Path:
        return self.root_dir / f"member_{m}.ckpt"

    def _restore(self) -> None:
        path = self.root_dir / STATE_FILE
        if not path.exists():
            return
        state = torch.load(path, weights_only=True)
        if state["num_classes"] != self.num_classes:
            raise ValueError(
                f"{path} was saved for num_classes={state['num_classes']}, not {self.num_classes}."
            )
        self.members = []
        for m in range(state["round"]):
            pl.seed_everything(self.seed + m, verbose=False)
            member = self.member_factory(m)
            ckpt = torch.load(self._member_ckpt(m), weights_only=True, map_location="cpu")
            member.load_state_dict(ckpt["state_dict"])
            self.members.append(member.eval())
        self.sample_weight = state["sample_weight"]
        self.alphas = [float(a) for a in state["alphas"]]
        self.errors = [float(e) for e in state["errors"]]
        self.stopped = bool(state["stopped"])

    # -- data ------------------------------------------------------------------------------

    def _train_set(self, data: Any) -> tuple[Dataset, dict[str, Any], Any]:
        """The training dataset, the loader settings to keep, and the validation loaders."""
        if isinstance(data, pl.LightningDataModule):
            data.prepare_data()
            data.setup("fit")
            train = data.train_dataloader()
            if not isinstance(train, DataLoader):
                raise TypeError(
                    "Boosting needs the datamodule's train_dataloader() to be a DataLoader."
                )
            settings = {"num_workers": train.num_workers, "collate_fn": train.collate_fn}
            batch_size = self.batch_size or train.batch_size or 32
            val = None
            if is_overridden("val_dataloader", data):
                val = data.val_dataloader()
            return train.dataset, {"batch_size": batch_size, **settings}, val
        if isinstance(data, Dataset):
            return data, {"batch_size": self.batch_size or 32}, None
        raise TypeError(
            f"Boosting.fit takes a LightningDataModule or a map-style Dataset. Found "
            f"{type(data).__name__}."
        )

    @staticmethod
    def _targets(dataset: Dataset) -> Tensor:
        loader = DataLoader(dataset, batch_size=1024, shuffle=False)
        ys = [batch[1] for batch in loader]
        return torch.cat(ys).long()

    @staticmethod
    @torch.no_grad()
    def _predict_member(member: pl.LightningModule, x: Tensor) -> Tensor:
        was_training = member.training
        member.eval()
        pred = member(x.to(member.device)).argmax(dim=1).cpu()
        member.train(was_training)
        return pred

    def _member_predictions(self, member: pl.LightningModule, dataset: Dataset) -> Tensor:
        loader = DataLoader(dataset, batch_size=1024, shuffle=False)
        return torch.cat([self._predict_member(member, batch[0]) for batch in loader])

    # -- fit / predict ---------------------------------------------------------------------

    def fit(self, data: pl.LightningDataModule | Dataset, val_dataloaders: Any = None) -> Boosting:
        """Run the remaining rounds (all of them, or those after ``root_dir/boosting.pt``).

        Args:
            data: a LightningDataModule (its ``train_dataloader()``'s dataset is resampled; its
                ``val_dataloader()`` validates each member) or a map-style dataset of
                ``(x, y)``.
            val_dataloaders: validation loaders of each member's fit (overrides the
                datamodule's).

        Returns:
            ``self``.

        Raises:
            ValueError: when the first member is no better than chance (as scikit-learn), or the
                targets are not class indices ``0..K-1``.
            MisconfigurationException: ``trainer_kwargs`` ask for several processes (DDP): each
                round runs in this process (before the first round's fit).
        """
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self._restore()
        dataset, loader_kwargs, val = self._train_set(data)
        val = val_dataloaders if val_dataloaders is not None else val
        n = len(dataset)  # type: ignore[arg-type]
        y = self._targets(dataset)
        if y.shape != (n,) or bool((y < 0).any()) or bool((y >= self.num_classes).any()):
            raise ValueError(
                f"Boosting needs class indices 0..{self.num_classes - 1} as the datasets' targets "
                f"(item[1]); found shape {tuple(y.shape)}, range [{int(y.min())}, {int(y.max())}]."
            )
        if self.sample_weight is None:
            self.sample_weight = torch.full((n,), 1.0 / n, dtype=torch.float64)
        if self.sample_weight.shape != (n,):
            raise ValueError(
                f"The saved sample weights have {self.sample_weight.shape[0]} entries, the "
                f"training set {n} samples: resume on the same data."
            )
        # SAMME's vote on the training set, Σ α_m onehot(h_m(x)), for the logged ensemble error
        votes = torch.zeros(n, self.num_classes, dtype=torch.float64)
        for member, alpha in zip(self.members, self.alphas, strict=True):
            votes += alpha * F.one_hot(self._member_predictions(member, dataset), self.num_classes)
        writer = self._writer()
        try:
            for m in range(len(self.members), self.num_members):
                if self.stopped:
                    break
                pred, alpha, err = self._round(m, dataset, loader_kwargs, val, y)
                if pred is None:
                    break
                votes += alpha * F.one_hot(pred, self.num_classes)
                if writer is not None:
                    train_error = float((votes.argmax(dim=1) != y).double().mean())
                    writer.add_scalar("boosting/alpha", alpha, m)
                    writer.add_scalar("boosting/error", err, m)
                    writer.add_scalar("boosting/train_error", train_error, m)
                    writer.flush()
        finally:
            if writer is not None:
                writer.close()
        return self

    def _round(
        self, m: int, dataset: Dataset, loader_kwargs: dict[str, Any], val: Any, y: Tensor
    ) -> tuple[Tensor | None, float, float]:
        """Train member ``m`` and take its SAMME step; ``(None, 0, error)`` when it is discarded."""
        if self.sample_weight is None:
            raise RuntimeError("Boosting._round runs inside fit, after the sample weights are set.")
        n = y.shape[0]
        pl.seed_everything(self.seed + m, verbose=False)
        member = self.member_factory(m)
        sampler = WeightedRandomSampler(
            self.sample_weight,
            num_samples=n,
            replacement=True,
            generator=torch.Generator().manual_seed(self.seed + m),
        )
        loader = DataLoader(dataset, sampler=sampler, **loader_kwargs)
        trainer = pl.Trainer(**self._trainer_kwargs(m))
        if trainer.world_size > 1:
            raise MisconfigurationException(
                f"Boosting runs each round's fit in this process, but trainer_kwargs ask for "
                f"{trainer.world_size} processes (a multi-process launcher re-executes the "
                "script). Use one device per round (devices=1)."
            )
        trainer.fit(member, train_dataloaders=loader, val_dataloaders=val)
        pred = self._member_predictions(member, dataset)
        new_w, alpha, error = samme(
            self.sample_weight, pred != y, self.num_classes, self.learning_rate
        )
        err = float(error)
        chance = 1.0 - 1.0 / self.num_classes
        if err >= chance:
            if m == 0:
                raise ValueError(
                    f"Boosting: the first member's weighted training error {err:.4g} is no "
                    f"better than chance (1 - 1/K = {chance:.4g}); the ensemble cannot be "
                    "fit. Train the member longer or make it larger."
                )
            rank_zero_warn(
                f"Boosting: member {m}'s weighted training error {err:.4g} is no better than "
                f"chance; it is discarded and boosting stops (as SAMME)."
            )
            self.stopped = True
            self._save()
            return None, 0.0, err
        trainer.save_checkpoint(self._member_ckpt(m))
        self.members.append(member.eval())
        self.alphas.append(float(alpha))
        self.errors.append(err)
        self.sample_weight = new_w
        self.stopped = err == 0.0  # a perfect member: SAMME stops
        self._save()
        return pred, float(alpha), err

    def _trainer_kwargs(self, m: int) -> dict[str, Any]:
        kwargs = copy.copy(self.trainer_kwargs)
        kwargs.setdefault("default_root_dir", str(self.root_dir / f"member_{m}"))
        if "logger" not in kwargs:
            kwargs["logger"] = TensorBoardLogger(
                self.root_dir, name="tb", version="", sub_dir=f"member_{m}"
            )
        return kwargs

    def _writer(self) -> Any:
        if "logger" in self.trainer_kwargs:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.root_dir / "tb"))

    def _save(self) -> None:
        torch.save(self.state_dict(), self.root_dir / STATE_FILE)

    def _decide(self, preds: Sequence[Tensor], k: int) -> Tensor:
        alphas = torch.tensor(self.alphas[:k], dtype=torch.float64)
        onehot = torch.stack([F.one_hot(p, self.num_classes).double() for p in preds[:k]])
        return torch.einsum("m,mnk->nk", alphas, onehot) / alphas.sum()

    def decision_function(self, x: Tensor, num_members: int | None = None) -> Tensor:
        """``Σ_m α_m [h_m(x) = k] / Σ_m α_m``, ``[N, K]`` in float64, over the first
        ``num_members`` members (default: all)."""
        if not self.members:
            raise RuntimeError("Boosting has no member yet: call fit first.")
        k = len(self.members) if num_members is None else min(num_members, len(self.members))
        if k < 1:
            raise ValueError(f"Parameter `num_members` should be >= 1. Found {num_members!r}.")
        preds = [self._predict_member(mb, x) for mb in self.members[:k]]
        return self._decide(preds, k)

    def predict(self, x: Tensor, num_members: int | None = None) -> Tensor:
        """SAMME's weighted vote ``argmax_k Σ_m α_m [h_m(x) = k]`` (class indices ``[N]``)."""
        return self.decision_function(x, num_members).argmax(dim=1)
