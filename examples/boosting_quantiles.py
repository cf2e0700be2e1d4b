"""Adaptive fusion and neural boosting on scikit-learn's multi-class AdaBoost data.

    python examples/boosting_quantiles.py --out docs/results_fusion.md --png-dir docs/img
    python examples/boosting_quantiles.py --quick          # 1 seed, 5 members, ~1 min

Data: ``make_gaussian_quantiles(n_samples=2000, n_features=10, n_classes=3, random_state=1)``
(three nested shells of a 10-d Gaussian), split 70/30 with ``train_test_split(train_size=0.7,
random_state=42)`` as in scikit-learn's "Multi-class AdaBoosted Decision Trees" example. The
networks train on 80% of the 70% and keep 20% as a validation split (only SAMME fusion reads it);
scikit-learn's AdaBoostClassifier fits the whole 70%, as in its example. Everything is scored on
the same 30% test split.

Compared, with ``M`` small networks (10 -> ``hidden`` -> 3, ReLU) as members:

- **single network**: member 0 alone;
- **uniform averaging**: ``M`` members trained independently (different seeds, each on its own
  cross-entropy), their logits averaged (:class:`~lightning_aw.fusion.WeightedEnsemble`,
  ``weights="fixed"``, uniform);
- **learned fusion**: the same members, fused with softmax weights learned on the training
  loss of the fused logits (the members' outputs detached: stacking);
- **SAMME fusion**: the same members, weights ∝ SAMME's α of each member's validation error
  (:class:`~lightning_aw.fusion.SAMMEWeights`);
- **neural boosting**: :class:`~lightning_aw.fusion.Boosting`, ``M`` members trained one after
  another on the SAMME sample weights (resampled), SAMME's weighted vote;
- **scikit-learn AdaBoost** (reference): ``AdaBoostClassifier`` with 300 trees of
  ``max_leaf_nodes=8`` (scikit-learn's example) and with 300 stumps.

Printed and saved (``--out``): a markdown table of the test errors (mean ± std over seeds).
Saved (``--png-dir``): ``boosting_quantiles.png``, test error against the number of members.
Needs scikit-learn (``pip install 'lightning-aw[examples]'``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from _common import PLOTS_HINT, make_trainer, markdown_table, mean_std, pyplot, quiet, save_figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw.functional import samme_alpha
from lightning_aw.fusion import Boosting, SAMMEWeights, WeightedEnsemble

__all__ = ["Ensemble", "Small", "load_data", "main"]

NUM_CLASSES = 3
METHODS = (
    "single network",
    "uniform averaging",
    "learned fusion",
    "SAMME fusion",
    "neural boosting",
)


def load_data(seed_split: int = 42) -> dict[str, tuple[Tensor, Tensor]]:
    """The train (80% of 70%), validation (20% of 70%), full-train (70%) and test (30%) splits.

    Example::

        >>> {k: tuple(v[0].shape) for k, v in load_data().items()}
        {'train': (1120, 10), 'val': (280, 10), 'train_full': (1400, 10), 'test': (600, 10)}
    """
    from sklearn.datasets import make_gaussian_quantiles
    from sklearn.model_selection import train_test_split

    X, y = make_gaussian_quantiles(n_samples=2000, n_features=10, n_classes=3, random_state=1)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, train_size=0.7, random_state=seed_split)
    X_fit, X_val, y_fit, y_val = train_test_split(X_tr, y_tr, test_size=0.2, random_state=0)

    def t(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)

    return {
        "train": t(X_fit, y_fit),
        "val": t(X_val, y_val),
        "train_full": t(X_tr, y_tr),
        "test": t(X_te, y_te),
    }


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))


class Small(pl.LightningModule):
    """One small network (a boosting member): cross-entropy, Adam."""

    def __init__(self, hidden: int = 8, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = _mlp(hidden)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Ensemble(pl.LightningModule):
    """``M`` members, each trained on its own cross-entropy, and three ensembles over them:
    ``uniform`` (fixed uniform weights), ``learned`` (softmax weights trained on the fused loss
    of the detached member logits) and ``samme`` (weights set by :class:`SAMMEWeights`)."""

    def __init__(self, num_members: int, hidden: int = 8, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        names = [f"m{i}" for i in range(num_members)]
        members = {}
        for i, n in enumerate(names):
            torch.manual_seed(seed * 1000 + i)  # member i: the initialisation of boosting round i
            members[n] = _mlp(hidden)
        self.members = nn.ModuleDict(members)
        self.uniform = WeightedEnsemble(names, weights="fixed")
        self.learned = WeightedEnsemble(names, weights="learned")
        self.samme = WeightedEnsemble(names, weights="fixed")
        self.lr = lr

    def member_logits(self, x: Tensor) -> dict[str, Tensor]:
        return {n: m(x) for n, m in self.members.items()}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.member_logits(x)
        members = torch.stack([F.cross_entropy(z, y) for z in logits.values()]).sum()
        stacked = F.cross_entropy(self.learned({n: z.detach() for n, z in logits.items()}), y)
        self.log_dict({"train/members": members, "train/learned_fusion": stacked})
        return members + stacked

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        fused = self.samme(self.member_logits(x))  # SAMMEWeights reads the member outputs
        self.log("val/samme_error", (fused.argmax(1) != y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            [
                {"params": self.members.parameters(), "name": "members"},
                {  # the fusion logits: their own group, never decayed
                    "params": self.learned.fusion_parameters(),
                    "name": "weighting",
                    "weight_decay": 0.0,
                    "lr": 0.05,
                },
            ],
            lr=self.lr,
        )


def _error(pred: Tensor, y: Tensor) -> float:
    return float((pred != y).float().mean())


def _fused_errors(model: Ensemble, samme_errors: Sequence[float], x: Tensor, y: Tensor):
    """Test error of each fusion with the first k members, k = 1..M."""
    with torch.no_grad():
        z = torch.stack(list(model.member_logits(x).values()))  # [M, N, K]
    theta = model.learned.weight_logits.detach()
    err = torch.tensor(samme_errors, dtype=torch.float64).clamp(min=1e-3)
    alpha = samme_alpha(err, NUM_CLASSES).float()
    out: dict[str, list[float]] = {m: [] for m in METHODS[1:4]}
    for k in range(1, z.shape[0] + 1):
        uniform = z[:k].mean(0)
        learned = torch.einsum("m,mnc->nc", torch.softmax(theta[:k], 0), z[:k])
        a = alpha[:k]
        samme = torch.einsum("m,mnc->nc", a / a.sum() if a.sum() > 0 else torch.ones(k) / k, z[:k])
        out["uniform averaging"].append(_error(uniform.argmax(1), y))
        out["learned fusion"].append(_error(learned.argmax(1), y))
        out["SAMME fusion"].append(_error(samme.argmax(1), y))
    return out


def run_seed(args: argparse.Namespace, seed: int, data: dict[str, tuple[Tensor, Tensor]]):
    """Every neural method for one seed: test errors against the number of members."""
    x_te, y_te = data["test"]
    train = TensorDataset(*data["train"])
    gen = torch.Generator().manual_seed(seed)
    logdir = args.logdir

    pl.seed_everything(seed, verbose=False)
    model = Ensemble(args.members, args.hidden, seed=seed)
    samme_cb = SAMMEWeights(NUM_CLASSES, ensemble="samme")
    trainer = make_trainer(
        logdir,
        f"boosting_quantiles/fusion/seed{seed}",
        callbacks=[samme_cb],
        max_epochs=args.epochs,
        log_every_n_steps=5,
        check_val_every_n_epoch=max(1, args.epochs // 5),
    )
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=gen)
    trainer.fit(model, loader, DataLoader(TensorDataset(*data["val"]), batch_size=512))
    assert samme_cb.errors is not None
    curves = _fused_errors(model, samme_cb.errors, x_te, y_te)
    with torch.no_grad():
        single = _error(model.members["m0"](x_te).argmax(1), y_te)
    curves["single network"] = [single]

    # member i of the boosting run starts from member i's initialisation above
    def factory(i: int) -> Small:
        torch.manual_seed(seed * 1000 + i)
        return Small(args.hidden)

    boost = Boosting(
        factory,
        args.members,
        NUM_CLASSES,
        trainer_kwargs={
            "max_epochs": args.epochs,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 5,
        },
        root_dir=Path(logdir) / "boosting_quantiles" / f"boosting_seed{seed}_{time.time_ns()}",
        seed=seed,
        batch_size=args.batch_size,
    )
    boost.fit(train)
    curves["neural boosting"] = [
        _error(boost.predict(x_te, num_members=k), y_te) for k in range(1, len(boost.members) + 1)
    ]
    return curves, dict(model.samme.weights), boost.alphas


def run_sklearn(
    data: dict[str, tuple[Tensor, Tensor]], n_estimators: int
) -> dict[str, list[float]]:
    """scikit-learn's AdaBoostClassifier (trees of max_leaf_nodes=8, and stumps): staged test
    errors."""
    from sklearn.ensemble import AdaBoostClassifier
    from sklearn.tree import DecisionTreeClassifier

    x, y = (t.numpy() for t in data["train_full"])
    x_te, y_te = (t.numpy() for t in data["test"])
    out = {}
    for name, tree in (
        ("sklearn AdaBoost, trees of 8 leaves", DecisionTreeClassifier(max_leaf_nodes=8)),
        ("sklearn AdaBoost, stumps", DecisionTreeClassifier(max_depth=1)),
    ):
        ada = AdaBoostClassifier(estimator=tree, n_estimators=n_estimators, random_state=42)
        ada.fit(x, y)
        out[name] = [float((p != y_te).mean()) for p in ada.staged_predict(x_te)]
    return out


def _document(args: argparse.Namespace, table: str, notes: str, seconds: float, png: Any) -> str:
    settings = (
        f"{len(args.seeds)} seed(s) {args.seeds}, M = {args.members} members of 10 -> "
        f"{args.hidden} -> 3 (ReLU), {args.epochs} epochs each (Adam 1e-2, batch "
        f"{args.batch_size}), scikit-learn: {args.estimators} estimators"
    )
    figure = ""
    if png is not None:
        figure = f"\n![test error against the number of members](img/{Path(png).name})\n"
    return f"""# Adaptive fusion and boosting on scikit-learn's multi-class AdaBoost data

Written by `python examples/boosting_quantiles.py {" ".join(_argv_shown(args))}` in
{seconds:.0f} s on the 2-core development machine (shared; times vary). Settings: {settings}.
Data: `make_gaussian_quantiles(n_samples=2000, n_features=10, n_classes=3, random_state=1)`,
70/30 split (`train_test_split(train_size=0.7, random_state=42)`); the networks train on 80% of
the 70% (the other 20% is the validation split SAMME fusion weighs the members on);
scikit-learn's `AdaBoostClassifier` (SAMME, its defaults, `random_state=42`) fits the whole 70%.
Test error on the 30% split (mean ± std over seeds; scikit-learn is deterministic here).

{table}

{notes}
{figure}
What the methods are: see the docstring of `examples/boosting_quantiles.py` and the README
section "Adaptive fusion and boosting".
"""


def _argv_shown(args: argparse.Namespace) -> list[str]:
    shown = []
    if args.quick:
        shown.append("--quick")
    if args.out:
        shown += ["--out", args.out]
    if args.png_dir:
        shown += ["--png-dir", args.png_dir]
    return shown


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; see the module docstring.

    Returns:
        ``{"errors": {method: [final test error per seed]}, "curves": {method: [mean test
        error with k members]}, "table", "png", "seconds"}``.

    Example::

        >>> import contextlib, io, tempfile
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     out = main(["--members", "2", "--epochs", "1", "--seeds", "0", "--estimators",
        ...                 "3", "--logdir", tempfile.mkdtemp(), "--png-dir", ""])
        >>> sorted(out["errors"])[:2], len(out["curves"]["neural boosting"])
        (['SAMME fusion', 'learned fusion'], 2)
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 members, 30 epochs")
    parser.add_argument("--members", type=int, default=10, help="M, members of each ensemble")
    parser.add_argument("--hidden", type=int, default=8, help="hidden units of a member")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of each member's fit")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--estimators", type=int, default=300, help="scikit-learn's trees")
    parser.add_argument("--logdir", default="runs", help="TensorBoard root")
    parser.add_argument("--png-dir", default=None, help="default: <logdir>/boosting_quantiles")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.members, args.epochs = [0], 5, 30
    quiet()
    torch.set_num_threads(1)
    begin = time.perf_counter()
    data = load_data()
    per_seed = [run_seed(args, s, data) for s in args.seeds]
    sk = run_sklearn(data, args.estimators)
    seconds = time.perf_counter() - begin

    errors = {m: [c[m][-1] for c, _, _ in per_seed] for m in METHODS}
    curves = {m: list(np.mean([c[m] for c, _, _ in per_seed], axis=0)) for m in METHODS}
    rows = [
        [m, mean_std(errors[m]), str(args.members if m != "single network" else 1)] for m in METHODS
    ]
    for name, staged in sk.items():
        rows.append([name, f"{staged[-1]:.3f}", str(len(staged))])
        curves[name] = staged
    table = markdown_table(["method", "test error", "members"], rows)
    samme_w = per_seed[0][1]
    means = {m: float(np.mean(errors[m])) for m in METHODS}
    best = min(METHODS[1:], key=means.__getitem__)
    sk_best = min(sk, key=lambda k: sk[k][-1])
    notes = (
        f"Lowest test error of the networks' ensembles: {best} ({means[best]:.3f}, single "
        f"network {means[METHODS[0]]:.3f}); scikit-learn's best: {sk_best} "
        f"({sk[sk_best][-1]:.3f}, {len(sk[sk_best])} trees).\n\n"
        f"SAMME fusion weights (seed {args.seeds[0]}): "
        + ", ".join(f"{k}={v:.3f}" for k, v in samme_w.items())
        + f"\n\nneural boosting's α (seed {args.seeds[0]}): "
        + ", ".join(f"{a:.3f}" for a in per_seed[0][2])
    )
    print(table)
    print("\n" + notes)
    print(f"\n{seconds:.0f} s")

    png = None
    if args.png_dir != "":
        plt = pyplot()
        if plt is None:
            print(PLOTS_HINT)
        else:
            fig, ax = plt.subplots(figsize=(8, 4))
            for m in METHODS[1:]:
                ax.plot(range(1, len(curves[m]) + 1), curves[m], marker="o", ms=3, label=m)
            ax.axhline(curves["single network"][0], color="k", ls=":", label="single network")
            for name in sk:
                ax.plot(range(1, len(curves[name]) + 1), curves[name], lw=1, alpha=0.8, label=name)
            ax.set_xscale("log")
            ax.set_xlabel("number of members (log scale)")
            ax.set_ylabel("test error")
            ax.set_title("make_gaussian_quantiles (10-d, 3 classes): test error")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            ax.grid(alpha=0.3)
            png_dir = Path(args.png_dir or Path(args.logdir) / "boosting_quantiles")
            png = save_figure(fig, png_dir / "boosting_quantiles.png")
            print(f"figure: {png}")
    if args.out:
        Path(args.out).write_text(_document(args, table, notes, seconds, png))
    return {"errors": errors, "curves": curves, "table": table, "png": png, "seconds": seconds}


if __name__ == "__main__":
    main()
