"""A badly scaled multi-task problem: scikit-learn's wine data, proline in raw units (mg/L).

    python examples/stress_scales.py --logdir runs                  # every method, 3 seeds
    python examples/stress_scales.py --methods none uncertainty famo --seeds 0

Two tasks share a small MLP on the 12 standardised wine measurements other than proline
(scikit-learn's bundled ``load_wine``: 178 wines, no download): **cultivar** (3-way
classification, cross-entropy) and **proline** (regression of the raw value, 278-1680 mg/L,
squared error). The squared error starts around 6e5, the cross-entropy around 1.1.

The training recipe is an ordinary one: SGD (learning rate 0.01, momentum 0.9) with the gradient
norm clipped at 1 (``Trainer(gradient_clip_val=1.0)``), batch 16, 100 epochs. With the plain sum
the regression's gradient is ~10^5 times the classification's; after clipping the cultivar head
gets almost nothing and **stays at chance** (so do ``equal``, ``dwa`` and ``rlw``, which keep the
losses' scales). Methods that equalise the tasks' scales recover it. Two kinds of recovery show
in the table (see docs/examples.md for the numbers):

- the loss-rescaling methods (uncertainty weighting, GLS, ``ScaleInvariant``, IMTL-L, FAMO,
  STCH) and MGDA give the cultivar ~100 % but leave the raw-unit regression where it started
  (predicting ~0 mg/L): once the regression's weight is ~1/L, its head needs far more than 100
  epochs of such small steps to reach outputs of ~750;
- CAGrad, IMTL-G, Nash-MTL and Aligned-MTL recover the cultivar *and* keep the regression as good
  as the plain sum's.

The last row, the plain sum on the *standardised* target, is the real cure for the units. The
cross-entropy uses ``label_smoothing=0.05``: it keeps the loss strictly positive once the small
training set is fitted (an exact 0 in float32 otherwise), which the methods that take logarithms
of the losses require.

Printed: cultivar accuracy and proline mean absolute error on a held-out 30 % (stratified,
fixed), mean ± std over the seeds, with the chance accuracy and the mean predictor's error.
TensorBoard logs under ``<logdir>/stress_scales/<method>``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from _common import make_trainer, markdown_table, mean_std, quiet, run_parallel, seed_all
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw import MultiTaskModule, Weighting
from lightning_aw.registry import create_method, list_methods

__all__ = ["REFERENCE", "WineNet", "load_wine_tasks", "main", "make_weighting", "run_one"]

#: the reference configuration: plain sum on the standardised target
REFERENCE = "none (standardised proline)"
#: method-specific arguments for this problem
OVERRIDES: dict[str, dict[str, Any]] = {"uncertainty": {"classification": ["cultivar"]}}


def load_wine_tasks(seed: int = 0) -> dict[str, Tensor]:
    """The wine data split 70/30 (stratified by cultivar), inputs standardised on the training
    part, proline (the 13th column) held out as the regression target in raw units.

    Args:
        seed: seed of the split.

    Returns:
        ``{"x_train", "cultivar_train", "proline_train", "x_test", "cultivar_test",
        "proline_test"}``.

    Raises:
        ImportError: when scikit-learn is missing.

    Example::

        >>> data = load_wine_tasks()
        >>> data["x_train"].shape, data["x_test"].shape
        (torch.Size([124, 12]), torch.Size([54, 12]))
        >>> 278 <= float(data["proline_train"].min()) < float(data["proline_train"].max()) <= 1680
        True
    """
    try:
        from sklearn.datasets import load_wine
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "This example uses scikit-learn's bundled wine data: pip install "
            "'lightning-aw[examples]' (or scikit-learn)."
        ) from err
    wine = load_wine()
    idx_train, idx_test = train_test_split(
        list(range(len(wine.target))), test_size=0.3, stratify=wine.target, random_state=seed
    )
    x = torch.tensor(wine.data[:, :12], dtype=torch.float32)
    proline = torch.tensor(wine.data[:, 12], dtype=torch.float32)
    cultivar = torch.tensor(wine.target, dtype=torch.long)
    train, test = torch.tensor(idx_train), torch.tensor(idx_test)
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    return {
        "x_train": x[train],
        "cultivar_train": cultivar[train],
        "proline_train": proline[train],
        "x_test": x[test],
        "cultivar_test": cultivar[test],
        "proline_test": proline[test],
    }


class WineNet(MultiTaskModule):
    """A 12-32-32 ReLU trunk, a 3-way ``cultivar`` head and a ``proline`` head.

    The trunk's output is marked with ``shared_representation`` (GradDrop and the gradient
    methods with ``source="representation"`` use it).

    The proline loss is the squared error of ``(prediction - (proline - shift) / scale)``:
    ``shift=0, scale=1`` (default) is the raw target; the reference standardises it.

    Args:
        lr: SGD's learning rate (momentum 0.9).
        shift: subtracted from the proline target.
        scale: the proline target is divided by it.

    Example::

        >>> model = WineNet()
        >>> losses = model.task_losses((torch.zeros(2, 12), torch.tensor([0, 1]),
        ...                             torch.tensor([700.0, 900.0])), 0)
        >>> sorted(losses), losses["proline"].item() > 1e5
        (['cultivar', 'proline'], True)
    """

    def __init__(self, lr: float = 0.01, shift: float = 0.0, scale: float = 1.0) -> None:
        super().__init__(
            tasks=["cultivar", "proline"],
            optimizer={"name": "sgd", "lr": lr, "momentum": 0.9},
        )
        self.shift, self.scale = shift, scale
        self.trunk = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.heads = nn.ModuleDict({"cultivar": nn.Linear(32, 3), "proline": nn.Linear(32, 1)})

    def shared_parameters(self) -> Any:
        return self.trunk.parameters()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cultivar logits ``[N, 3]`` and proline predictions in mg/L ``[N]``."""
        h = self.trunk(x)
        proline = self.heads["proline"](h).squeeze(-1) * self.scale + self.shift
        return self.heads["cultivar"](h), proline

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, cultivar, proline = batch
        h = self.shared_representation(self.trunk(x))  # for source="representation" methods
        target = (proline - self.shift) / self.scale
        return {
            "cultivar": F.cross_entropy(self.heads["cultivar"](h), cultivar, label_smoothing=0.05),
            "proline": F.mse_loss(self.heads["proline"](h).squeeze(-1), target),
        }


def make_weighting(name: str) -> Weighting | None:
    """The callback of ``name`` for this problem (``"none"`` or the reference: plain sum).

    Args:
        name: ``"none"``, :data:`REFERENCE` or a registered method name.

    Raises:
        ValueError: for an unknown method name.

    Example::

        >>> make_weighting("uncertainty")
        UncertaintyWeighting(classification=['cultivar'], init=0.0, lr=None)
    """
    if name in ("none", REFERENCE):
        return None
    return create_method(name, **OVERRIDES.get(name, {}))


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method with one seed and evaluate it on the held-out part.

    A run that raises is reported (``error``), not fatal: the table shows which methods fail.

    Args:
        spec: ``method``, ``seed``, ``epochs``, ``lr``, ``logdir`` (``None``: no logs).

    Returns:
        ``spec`` plus ``accuracy``, ``mae`` (mg/L), ``seconds`` and ``error`` (``None`` or the
        message).

    Example::

        >>> out = run_one({"method": "none", "seed": 0, "epochs": 1, "lr": 0.01, "logdir": None})
        >>> out["error"] is None and 0.0 <= out["accuracy"] <= 1.0
        True
    """
    quiet()
    seed_all(spec["seed"])
    data = load_wine_tasks()
    reference = spec["method"] == REFERENCE
    target = data["proline_train"]
    model = WineNet(
        lr=spec["lr"],
        shift=float(target.mean()) if reference else 0.0,
        scale=float(target.std()) if reference else 1.0,
    )
    out: dict[str, Any] = {**spec, "accuracy": float("nan"), "mae": float("nan"), "error": None}
    begin = time.perf_counter()
    try:
        weighting = make_weighting(spec["method"])
        trainer = make_trainer(
            spec["logdir"],
            f"stress_scales/{'reference' if reference else spec['method']}/seed{spec['seed']}",
            callbacks=[] if weighting is None else [weighting],
            max_epochs=spec["epochs"],
            gradient_clip_val=1.0,
            log_every_n_steps=8,
            limit_val_batches=0,
        )
        gen = torch.Generator().manual_seed(spec["seed"])
        loader = DataLoader(
            TensorDataset(data["x_train"], data["cultivar_train"], data["proline_train"]),
            batch_size=16,
            shuffle=True,
            generator=gen,
        )
        trainer.fit(model, loader)
    except Exception as err:  # a failing method is a result of the example, shown in the table
        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        out["seconds"] = time.perf_counter() - begin
        return out
    out["seconds"] = time.perf_counter() - begin
    model.eval()
    with torch.no_grad():
        logits, proline = model(data["x_test"])
    out["accuracy"] = float((logits.argmax(-1) == data["cultivar_test"]).float().mean())
    out["mae"] = float((proline - data["proline_test"]).abs().mean())
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; see the module docstring.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).

    Returns:
        ``{"results": {method: [run dicts, one per seed]}, "chance": float, "mean_mae": float,
        "table": str}``.

    Example::

        >>> import contextlib, io, tempfile
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     out = main(["--methods", "none", "--seeds", "0", "--epochs", "1",
        ...                 "--logdir", tempfile.mkdtemp(), "--jobs", "1", "--no-reference"])
        >>> sorted(out["results"]), round(out["chance"], 3)  # 21 of the 54 held-out wines
        (['none'], 0.389)
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=["none", *list_methods()],
        metavar="METHOD",
        help="methods to compare (default: none and every registered method)",
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the plain sum on the standardised target"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--logdir", default="runs", help="TensorBoard root")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys(args.methods or ["none", *list_methods()]))
    if not args.no_reference:
        methods.append(REFERENCE)

    specs = [
        {"method": m, "seed": s, "epochs": args.epochs, "lr": args.lr, "logdir": args.logdir}
        for m in methods
        for s in args.seeds
    ]
    begin = time.perf_counter()
    runs = run_parallel(run_one, specs, jobs=args.jobs)
    elapsed = time.perf_counter() - begin
    results = {m: [r for r in runs if r["method"] == m] for m in methods}

    data = load_wine_tasks()
    counts = torch.bincount(data["cultivar_test"], minlength=3)
    chance = float(counts.max()) / len(data["cultivar_test"])
    mean_mae = float((data["proline_test"] - data["proline_train"].mean()).abs().mean())
    rows = []
    for method, mine in results.items():
        errors = [r["error"] for r in mine if r["error"]]
        ok = [r for r in mine if not r["error"]]
        seconds = statistics.fmean(r["seconds"] for r in mine)
        if errors:
            rows.append([method, f"failed ({len(errors)}/{len(mine)}): {errors[0]}", "", ""])
            continue
        rows.append(
            [
                method,
                mean_std([r["accuracy"] for r in ok]),
                mean_std([r["mae"] for r in ok], 1),
                f"{seconds:.1f}",
            ]
        )
    table = markdown_table(["method", "cultivar accuracy ↑", "proline MAE (mg/L) ↓", "s/run"], rows)
    print(
        f"\nWine, proline in raw units; SGD lr={args.lr} momentum 0.9, gradient norm clipped at "
        f"1, {args.epochs} epochs, seeds {args.seeds}  ({elapsed:.0f} s)"
    )
    print(table)
    print(
        f"chance accuracy (majority cultivar of the held-out part): {chance:.3f}; "
        f"MAE of predicting the training mean: {mean_mae:.1f} mg/L"
    )
    print(f"TensorBoard: tensorboard --logdir {args.logdir}/stress_scales")
    return {"results": results, "chance": chance, "mean_mae": mean_mae, "table": table}


if __name__ == "__main__":
    main()
