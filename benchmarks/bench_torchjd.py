"""lightning_aw's UPGrad callback side by side with torchjd's ``mtl_backward`` + ``UPGrad``.

    python benchmarks/bench_torchjd.py [--steps 40] [--rounds 3] [--batch-size 128]
                                       [--accelerator cpu|gpu] [--model cnn|mlp] [--threads N]

The same model (``--model cnn``: the two-digit CNN `lightning_aw.models.DigitsNet`, 3 tasks, a
~54k-parameter shared trunk; ``--model mlp``: a 128-256-256 MLP trunk, ~99k parameters, on the
same pixels) and data are trained, interleaved over ``--rounds`` rounds of ``--steps`` optimizer
steps each:

- in a Lightning Trainer (``MultiTaskModule``, automatic optimization): the plain summed loss
  (no callback), our ``UPGrad()`` (parameter and representation source), and GradDrop / DB-MTL
  for reference;
- in a Lightning Trainer, manual optimization (what a torchjd user writes in Lightning: a bare
  ``LightningModule`` with ``automatic_optimization = False``): ``training_step`` calls torchjd's
  ``mtl_backward`` + ``jac_to_grad(..., UPGrad())``, then ``opt.step()``, ``opt.zero_grad()``;
  its baseline is the same module with ``self.manual_backward(sum(losses))``;
- in a plain PyTorch loop: the summed loss, and torchjd's ``mtl_backward`` (per-task Jacobian of
  the shared parameters, heads get their own gradients) followed by ``jac_to_grad(..., UPGrad())``.

All Trainers have the same settings (no logger, no checkpointing, no progress bar, the same
timing callback) and every configuration uses Adam (lr 2e-3). It reports the median time of a
training step (forward, backward, aggregation, optimizer step), its ratio to the plain sum of the
same framework ("vs plain": automatic Lightning, manual Lightning or the torch loop), and our
UPGrad against torchjd's twice: torchjd in a plain loop, and torchjd inside a Trainer (the
like-for-like comparison for a Lightning user: both pay Lightning's per-step cost). It also
prints the two plain sums against each other (Lightning automatic / manual optimization /
plain loop), the cost of the framework alone. Memory: the per-task gradient matrix is
``T x P`` floats (given analytically); on CUDA the peak allocated memory of each configuration
is measured too. On any device the script checks that no ``T x P`` tensor outlives a step: on
our callbacks (DB-MTL keeps its ``T x P`` EMA by design) and, for torchjd, no ``.jac`` field left
on the parameters; and that every configuration trains (each trunk parameter changes), or it
stops with an error.

First it checks, on one batch, that both UPGrads give the same shared-parameter gradient: with
torchjd's default projector (which normalises and regularises the Gramian, ``reg_eps=1e-4``) and
with ``reg_eps=0`` (the exact problem our UPGrad solves). Heads differ by design: torchjd gives
each head its plain gradient, our callback weighs it with the task's coefficient. It also checks
that torchjd inside the Trainer gives the plain loop's torchjd gradient (the same calls on the
same batch and weights: equal up to rounding).

torchjd is optional and not a dependency of lightning_aw: ``pip install "torchjd[quadprog-
projector]"`` (its UPGrad needs quadprog). Without it the script says so and exits.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_aw import DBMTL, GradDrop, UPGrad
from lightning_aw.datasets import make_two_digits
from lightning_aw.models import DigitsNet

TASKS = ("left", "right", "sum")


def _load_torchjd() -> tuple[Any, Any, Any, Any] | str:
    """torchjd's ``mtl_backward``, ``jac_to_grad``, ``UPGrad`` and ``QuadprogProjector``, or why
    they cannot be used."""
    try:
        from torchjd.aggregation import UPGrad as JDUPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward
        from torchjd.linalg import QuadprogProjector
    except ImportError as err:
        return f"torchjd is not installed ({err})"
    try:
        JDUPGrad()
    except ImportError as err:  # its default projector needs quadprog and qpsolvers
        return f"torchjd's UPGrad cannot be built: {err}"
    return mtl_backward, jac_to_grad, JDUPGrad, QuadprogProjector


#: ``--model``: "cnn" (DigitsNet's trunk) or "mlp" (a 128-256-256 MLP trunk on the same pixels)
MODEL = "cnn"


class _Metricless(DigitsNet):
    def __init__(self) -> None:
        super().__init__()
        self._metric_tasks = ()
        if MODEL == "mlp":  # what a launch-bound step looks like: few, small matmuls
            self.trunk = nn.Sequential(
                nn.Flatten(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()
            )
            self.heads = nn.ModuleDict(
                {"left": nn.Linear(256, 10), "right": nn.Linear(256, 10), "sum": nn.Linear(256, 1)}
            )


def _losses(net: nn.Module, h: Tensor, y: Tensor) -> list[Tensor]:
    return [
        F.cross_entropy(net.heads["left"](h), y[:, 0]),
        F.cross_entropy(net.heads["right"](h), y[:, 1]),
        F.mse_loss(net.heads["sum"](h).squeeze(-1), y[:, 2].float()),
    ]


class _ManualModule(pl.LightningModule):
    """What a torchjd user writes in Lightning: manual optimization around ``mtl_backward``.

    The same trunk, heads, losses and optimizer (Adam, lr 2e-3) as the other rows, in a bare
    ``LightningModule`` with ``automatic_optimization = False``. ``training_step`` runs the
    network, then with ``jd`` torchjd's ``mtl_backward(losses, features=h)`` and
    ``jac_to_grad(trunk parameters, UPGrad())`` (the plain loop's calls; torchjd runs autograd
    itself, so Lightning's ``manual_backward`` hooks are not called), without ``jd``
    ``self.manual_backward(sum(losses))`` (this row's plain-sum baseline); then ``opt.step()``
    and ``opt.zero_grad()``.
    """

    def __init__(self, jd: tuple[Any, ...] | None, net: nn.Module | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        net = _Metricless() if net is None else net
        self.trunk, self.heads = net.trunk, net.heads
        self.jd = jd
        self.aggregator = None if jd is None else jd[2]()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        h = self.trunk(x)
        losses = _losses(self, h, y)
        if self.jd is None:
            self.manual_backward(sum(losses))
        else:
            self.jd[0](losses, features=h)  # .jac on the trunk, .grad on the heads
            self.jd[1](list(self.trunk.parameters()), self.aggregator)  # .jac -> .grad
        opt.step()
        opt.zero_grad()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def _task_matrices(obj: Any, threshold: int) -> list[str]:
    """Tensors (not parameters) of at least ``threshold`` elements held by ``obj``'s attributes."""
    found: list[str] = []

    def visit(name: str, value: Any, depth: int) -> None:
        if isinstance(value, nn.Parameter) or depth > 3:
            return
        if isinstance(value, Tensor):
            if value.numel() >= threshold:
                found.append(f"{name}{list(value.shape)}")
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{name}[{k!r}]", v, depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{name}[{i}]", v, depth + 1)

    for key, value in vars(obj).items():
        visit(key, value, 0)
    return found


class _Timer(pl.Callback):
    def __init__(self, threshold: int) -> None:
        self.times: list[float] = []
        self.threshold = threshold
        self.kept: list[str] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.accelerator.__class__.__name__ == "CUDAAccelerator":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)
        self.kept = [
            f"{type(cb).__name__}.{name}"
            for cb in trainer.callbacks
            if cb is not self
            for name in _task_matrices(cb, self.threshold)
        ]
        self.kept += [
            f"param.jac{list(p.jac.shape)}"
            for p in trainer.lightning_module.parameters()
            if getattr(p, "jac", None) is not None
        ]


def _trained(before: list[Tensor], net: nn.Module) -> bool:
    """Whether every trunk parameter moved away from its ``before`` copy."""
    after = [p.detach().cpu() for p in net.trunk.parameters()]
    return all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def _lightning(
    make: Callable[[], list[pl.Callback]],
    module: Callable[[], pl.LightningModule] = _Metricless,
) -> Callable[..., dict[str, Any]]:
    def run(steps: int, batch_size: int, data: Any, device: torch.device, threshold: int):
        timer = _Timer(threshold)
        model = module()
        before = [p.detach().cpu().clone() for p in model.trunk.parameters()]
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_steps=steps,
            callbacks=[*make(), timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
        trainer.fit(model, loader)
        return {"times": timer.times, "kept": timer.kept, "trained": _trained(before, model)}

    return run


def _torch_loop(jd: tuple[Any, ...] | None) -> Callable[..., dict[str, Any]]:
    def run(steps: int, batch_size: int, data: Any, device: torch.device, threshold: int):
        net = _Metricless().to(device)
        before = [p.detach().cpu().clone() for p in net.trunk.parameters()]
        shared = list(net.trunk.parameters())
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
        aggregator = None if jd is None else jd[2]()
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
        times: list[float] = []
        kept: list[str] = []
        it = iter(loader)
        for _ in range(steps):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            start = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            h = net.trunk(x)
            losses = _losses(net, h, y)
            if jd is None:
                sum(losses).backward()
            else:
                jd[0](losses, features=h)  # .jac on the trunk, .grad on the heads
                jd[1](shared, aggregator)  # .jac -> aggregated .grad, .jac released
            optimizer.step()
            optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            kept = [
                f"param.jac{list(p.jac.shape)}"
                for p in shared
                if getattr(p, "jac", None) is not None
            ]
        return {"times": times, "kept": kept, "trained": _trained(before, net)}

    return run


def agreement(jd: tuple[Any, ...], batch_size: int, device: torch.device) -> list[str]:
    """Shared-parameter gradients of one step: our UPGrad (in a Trainer) against torchjd's (in a
    plain loop), and torchjd in a Trainer (manual optimization) against torchjd in the loop."""
    torch.manual_seed(0)
    start = _Metricless()
    x, y = make_two_digits(batch_size, seed=1)
    grads: dict[str, Tensor] = {}

    class Capture(pl.Callback):
        def __init__(self, key: str) -> None:
            self.key = key

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads[self.key] = torch.cat([p.grad.reshape(-1) for p in pl_module.trunk.parameters()])
            if self.key == "ours":
                grads["coefs"] = pl_module.weighting.weight_tensor().clone()

    def one_step(module: pl.LightningModule, callbacks: list[pl.Callback]) -> None:
        pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_steps=1,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(
            module,
            torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(x, y), batch_size=batch_size
            ),
        )

    one_step(copy.deepcopy(start), [UPGrad(), Capture("ours")])
    one_step(_ManualModule(jd, copy.deepcopy(start)), [Capture("jd in Lightning")])
    mtl_backward, jac_to_grad, JDUPGrad, QuadprogProjector = jd
    lines = [f"our UPGrad coefficients {[round(c, 4) for c in grads['coefs'].cpu().tolist()]}"]
    for label, make in (
        ("torchjd UPGrad() (default, reg_eps=1e-4)", lambda: JDUPGrad()),
        ("torchjd UPGrad(reg_eps=0)", lambda: JDUPGrad(projector=QuadprogProjector(reg_eps=0.0))),
    ):
        net = copy.deepcopy(start).to(device)
        shared = list(net.trunk.parameters())
        h = net.trunk(x.to(device))
        mtl_backward(_losses(net, h, y.to(device)), features=h)
        weights = jac_to_grad(shared, make())
        theirs = torch.cat([p.grad.reshape(-1) for p in shared])
        grads.setdefault("jd in a loop", theirs)  # the default UPGrad, as in the timed rows
        diff = float((theirs - grads["ours"]).norm() / theirs.norm())
        w = [round(v, 4) for v in weights.cpu().tolist()]
        lines.append(f"{label}: weights {w}, relative difference {diff:.2e}")
    loop, inside = grads["jd in a loop"], grads["jd in Lightning"]
    diff = float((inside - loop).norm() / loop.norm())
    if not diff <= 1e-5:  # the same calls on the same batch and weights
        raise RuntimeError(
            f"torchjd inside the Trainer gives another shared gradient than in the plain loop "
            f"(relative difference {diff:.2e}): the Lightning row does not compute what the "
            "loop row computes, so its step time cannot be compared"
        )
    lines.append(
        f"torchjd UPGrad() in a Trainer (manual optimization) against in the loop: relative "
        f"difference {diff:.2e}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU: intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--model",
        choices=["cnn", "mlp"],
        default="cnn",
        help="the shared trunk: DigitsNet's CNN or a 128-256-256 MLP",
    )
    args = parser.parse_args(argv)
    global MODEL
    MODEL = args.model
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    jd = _load_torchjd()
    if isinstance(jd, str):
        print(
            f"{jd}; nothing to compare. Install it with: pip install 'torchjd[quadprog-projector]'"
        )
        return 0
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*validation_step.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(*make_two_digits(args.batch_size * args.steps))
    probe = _Metricless()
    num_tasks, num_shared = len(TASKS), sum(p.numel() for p in probe.trunk.parameters())
    rep_size = args.batch_size * probe.heads["left"].in_features
    configs: dict[str, Callable[..., dict[str, Any]]] = {
        "Lightning: plain sum": _lightning(lambda: []),
        "Lightning: UPGrad (param.)": _lightning(lambda: [UPGrad()]),
        "Lightning: UPGrad (repr.)": _lightning(lambda: [UPGrad(source="representation")]),
        "Lightning: GradDrop": _lightning(lambda: [GradDrop()]),
        "Lightning: DBMTL (param.)": _lightning(lambda: [DBMTL()]),
        "Lightning manual: plain sum": _lightning(lambda: [], lambda: _ManualModule(None)),
        "Lightning manual: torchjd UPGrad": _lightning(lambda: [], lambda: _ManualModule(jd)),
        "torch loop: plain sum": _torch_loop(None),
        "torch loop: torchjd UPGrad": _torch_loop(jd),
    }
    # each row's "vs plain": the plain summed loss of the same framework
    baseline = {name: f"{name.partition(':')[0]}: plain sum" for name in configs}
    agreed = agreement(jd, args.batch_size, device)  # before timing: it may stop the run
    times: dict[str, list[float]] = {n: [] for n in configs}
    peaks: dict[str, list[float]] = {n: [] for n in configs}
    kept: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, run in configs.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            out = run(args.steps, args.batch_size, data, device, num_tasks * num_shared)
            times[name].append(statistics.median(out["times"][5:]))  # skip warm-up steps
            kept[name] = out["kept"]
            if not out["trained"]:
                raise RuntimeError(
                    f"{name}: a trunk parameter did not change in {args.steps} steps; this "
                    "configuration does not train, its step time means nothing"
                )
            if device.type == "cuda":
                peaks[name].append((torch.cuda.max_memory_allocated() - base) / 2**20)
    med = {n: statistics.median(t) for n, t in times.items()}

    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else (f"CPU, {torch.get_num_threads()} threads")
    )
    import torchjd

    version = getattr(torchjd, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("torchjd")
    print(
        f"\ntorch {torch.__version__}, torchjd {version}, {where}, batch {args.batch_size}, "
        f"{args.steps} steps x {args.rounds} rounds (median)"
    )
    print("\nOne-batch agreement of the shared-parameter gradient:")
    for line in agreed:
        print(f"  {line}")
    header = f"{'configuration':<34}{'ms/step':>9}{'vs plain':>10}"
    if device.type == "cuda":
        header += f"{'peak MiB':>10}"
    print(f"\n{header}{'  T x P tensors kept after a step'}")
    for name in configs:
        plain = med[baseline[name]]
        row = f"{name:<34}{1e3 * med[name]:>9.2f}{med[name] / plain:>10.2f}"
        if device.type == "cuda":
            row += f"{statistics.median(peaks[name]):>10.1f}"
        print(f"{row}  {', '.join(kept[name]) or 'none'}")
    ours, ours_repr = med["Lightning: UPGrad (param.)"], med["Lightning: UPGrad (repr.)"]
    print("\nour UPGrad step time / torchjd UPGrad's, param. source (repr. source):")
    for where_jd, row in (
        ("in a plain PyTorch loop", "torch loop: torchjd UPGrad"),
        ("in a Trainer (manual optimization)", "Lightning manual: torchjd UPGrad"),
    ):
        print(f"  torchjd {where_jd:<36}{ours / med[row]:.2f} ({ours_repr / med[row]:.2f})")
    auto, manual = med["Lightning: plain sum"], med["Lightning manual: plain sum"]
    print(
        f"plain sums: Lightning automatic / manual optimization {auto / manual:.2f}, "
        f"Lightning automatic / plain loop {auto / med['torch loop: plain sum']:.2f}"
    )
    mb = num_tasks * num_shared * 4 / 2**20
    print(
        f"per-task gradient matrix: T x P = {num_tasks} x {num_shared} float32 = {mb:.2f} MiB "
        f"(parameter source, and torchjd's Jacobian); representation source: T x B x D = "
        f"{num_tasks} x {rep_size} = {num_tasks * rep_size * 4 / 2**20:.2f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
