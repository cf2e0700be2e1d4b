"""Per-step cost of every method on a realistic dense-prediction workload, measured in one run.

    python benchmarks/bench_realistic.py [--rounds 3] [--steps 20] [--batch-size 8]
                                         [--height 72 --width 96] [--device cpu|cuda]
                                         [--only UPGrad MGDA] [--sources parameters]
                                         [--threads 1] [--baseline-every 4] [--memory]

The workload is NYUv2-shaped: ``lightning_aw.models.SceneNet`` (a ResNet-style encoder-decoder,
≈108k parameters at ``--channels 16``, three dense heads: 13-class segmentation, depth, surface
normals) on ``lightning_aw.datasets.SyntheticScenes`` (rendered once before timing). Every
configuration trains for ``--steps`` optimizer steps; the configurations are interleaved over
``--rounds`` rounds, and each reports the p10 and the median of its step times
(``on_train_batch_start`` -> ``on_train_batch_end``: forward, backward, optimizer step, the
method's own work; all rounds pooled, the first steps of each run left out as warm-up) and a
paired ratio: each run's median step time over that of the reference runs just before and after
it (the reference is run again after every ``--baseline-every`` configurations, so a change of
the machine's load during a long round does not skew the ratios), the median over rounds.
The configurations:

- ``plain LightningModule``: the same network and losses in an ordinary LightningModule that
  returns the summed loss (the reference of the ratios);
- ``MultiTaskModule (no method)``: lightning_aw's module without a weighting callback;
- every registered method (``lightning_aw.registry.list_methods()``, default arguments; the
  gradient methods with each of ``--sources``);
- when torchjd is importable: a plain PyTorch loop with the summed loss and one with torchjd's
  ``mtl_backward`` + ``UPGrad`` (ratio against that loop's own sum).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during each run, minus what was
allocated before it. On the CPU, ``--memory`` runs each configuration once more in a fresh
process for a few steps and reports that process's peak resident set size
(``resource.getrusage``; one process per configuration, so allow a few seconds each). At the
default size the peak is set by importing torch and Lightning (about 0.5 GiB) and is the same
for every configuration: the per-task gradients (printed analytically) are a few MiB. Larger
``--channels`` / images make the differences visible.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, default_collate

from lightning_aw.datasets import SyntheticScenes
from lightning_aw.models import SceneNet
from lightning_aw.registry import create_method, get_method, list_methods

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path
from _paired import adjacent_reference, quantile, schedule, spread

Make = Callable[[argparse.Namespace], tuple[pl.LightningModule, list[pl.Callback]]]


class _Net(SceneNet):
    """SceneNet without validation metrics (none run in the benchmark)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels=channels)
        self._metric_tasks = ()


class PlainSceneNet(pl.LightningModule):
    """SceneNet's network and losses in an ordinary LightningModule that sums the losses."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        ref = _Net(channels)
        self.trunk, self.heads, self._heads = ref.trunk, ref.heads, ref._heads

    def training_step(self, batch, batch_idx):
        pred = self._heads(self.trunk(batch["image"]), batch["image"].shape[-2:])
        losses = SceneNet.dense_losses(pred, batch)
        total = sum(losses.values())
        self.log_dict({**{f"loss/{k}": v for k, v in losses.items()}, "loss/total": total})
        return total

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class _Timer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self.times.append(time.perf_counter() - self._t)


# methods timed with an epoch interval would never update within a short run: use steps
BENCH_KWARGS: dict[str, dict[str, Any]] = {
    "dwa": {"interval": "step", "frequency": 5},
    "softadapt": {"interval": "step", "frequency": 5},
}


def _method(name: str, **kwargs: Any) -> Make:
    return lambda args: (
        _Net(args.channels),
        [create_method(name, **{**BENCH_KWARGS.get(name, {}), **kwargs})],
    )


def lightning_configs(sources: list[str]) -> dict[str, Make]:
    configs: dict[str, Make] = {
        "plain LightningModule": lambda args: (PlainSceneNet(args.channels), []),
        "MultiTaskModule (no method)": lambda args: (_Net(args.channels), []),
    }
    for name in list_methods():
        info = get_method(name)
        label = info.cls.__name__
        if "source" in inspect.signature(info.cls).parameters:
            for source in sources:
                configs[f"{label} ({source[:4]}.)"] = _method(name, source=source)
        else:
            configs[label] = _method(name)
    configs["FAMO (next batch)"] = _method("famo", losses_after="next_batch")  # no extra forward
    return configs


def _load_torchjd() -> tuple[Any, Any, Any] | None:
    try:
        from torchjd.aggregation import UPGrad as JDUPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        JDUPGrad()  # its default projector needs optional solvers
    except ImportError:
        return None
    return mtl_backward, jac_to_grad, JDUPGrad


def _batches(data: list[dict[str, torch.Tensor]], batch_size: int, device: torch.device):
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=default_collate)
    while True:
        for batch in loader:
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def torch_loop(jd: tuple[Any, Any, Any] | None) -> Callable[..., list[float]]:
    """A plain PyTorch training loop: the summed loss, or torchjd's ``mtl_backward`` + UPGrad."""

    def run(args: argparse.Namespace, data: Any, device: torch.device) -> list[float]:
        net = _Net(args.channels).to(device)
        shared = list(net.trunk.parameters())
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        aggregator = None if jd is None else jd[2]()
        batches = _batches(data, args.batch_size, device)
        times = []
        for _ in range(args.steps):
            batch = next(batches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            h = net.trunk(batch["image"])
            outs = net._heads(h, batch["image"].shape[-2:])
            losses = list(SceneNet.dense_losses(outs, batch).values())
            if jd is None:
                sum(losses).backward()
            else:
                jd[0](losses, features=h)  # .jac on the trunk, .grad on the heads
                jd[1](shared, aggregator)  # .jac -> aggregated .grad
            optimizer.step()
            optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times

    return run


def run_lightning(
    make: Make, args: argparse.Namespace, data: Any, device: torch.device
) -> list[float]:
    model, callbacks = make(args)
    timer = _Timer()
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=args.steps,
        callbacks=[*callbacks, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    trainer.fit(model, loader)
    return timer.times


def _scenes(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    scenes = SyntheticScenes(
        max(args.batch_size * 4, 32), args.height, args.width, seed=0, cache=True
    )
    return [scenes[i] for i in range(len(scenes))]


def _peak_rss_mib() -> float:
    # ru_maxrss: kibibytes on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _memory_probe(name: str, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a fresh process that runs configuration ``name`` for a few steps."""
    command = [
        sys.executable,
        __file__,
        "--probe",
        name,
        "--steps",
        "4",
        "--batch-size",
        str(args.batch_size),
        "--height",
        str(args.height),
        "--width",
        str(args.width),
        "--channels",
        str(args.channels),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--height", type=int, default=72)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--only", nargs="*", default=None, help="configurations (prefixes)")
    parser.add_argument(
        "--sources",
        nargs="+",
        default=["parameters", "representation"],
        choices=["parameters", "representation"],
        help="sources of the gradient methods",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU: intra-op threads (default 1: on a shared machine more threads mostly wait)",
    )
    parser.add_argument(
        "--baseline-every",
        type=int,
        default=4,
        help="run the plain baseline again after this many configurations",
    )
    parser.add_argument("--memory", action="store_true", help="CPU: peak RSS per configuration")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.manual_seed(0)
    data = _scenes(args)
    configs = lightning_configs(args.sources)
    if args.probe is not None:  # child process of --memory
        run_lightning(configs[args.probe], args, data, device)
        print(_peak_rss_mib())
        return {}
    runners: dict[str, Callable[[], list[float]]] = {
        name: (lambda make=make: run_lightning(make, args, data, device))
        for name, make in configs.items()
    }
    jd = _load_torchjd()
    if jd is not None:
        runners["torch loop: plain sum"] = lambda: torch_loop(None)(args, data, device)
        runners["torch loop: torchjd UPGrad"] = lambda: torch_loop(jd)(args, data, device)
    baselines = ("plain LightningModule", "MultiTaskModule (no method)", "torch loop: plain sum")
    names = [
        n
        for n in runners
        if args.only is None or n in baselines or any(n.startswith(o) for o in args.only)
    ]
    order = schedule(names, _reference_of, args.baseline_every)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[float]] = {n: [] for n in names}
    paired: dict[str, list[float]] = {n: [] for n in names}
    skip = min(3, max(args.steps // 4, 1))  # warm-up steps
    begin = time.perf_counter()
    for _ in range(args.rounds):
        run_medians: list[float] = []
        for name in order:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            steps = runners[name]()
            times[name].extend(steps[skip:])
            run_medians.append(statistics.median(steps[skip:]))
            if device.type == "cuda":
                peaks[name].append((torch.cuda.max_memory_allocated() - before) / 2**20)
        for i, name in enumerate(order):
            reference = adjacent_reference(order, run_medians, i, _reference_of)
            paired[name].append(run_medians[i] / reference)
    elapsed = time.perf_counter() - begin
    rss = {n: _memory_probe(n, args) for n in names if n in configs} if args.memory else {}

    med = {n: statistics.median(t) for n, t in times.items()}
    p10 = {n: quantile(t, 0.1) for n, t in times.items()}
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\ntorch {torch.__version__}, {where}; SceneNet(channels={args.channels}) on "
        f"SyntheticScenes {args.height}x{args.width}, batch {args.batch_size}; {args.steps} steps "
        f"x {args.rounds} rounds ({elapsed:.0f} s)"
    )
    header = "| configuration | p10 ms/step | median ms/step | ratio (paired) [q25, q75] |"
    rule = "|---|---:|---:|---:|"
    if device.type == "cuda":
        header += " peak MiB |"
        rule += "---:|"
    if rss:
        header += " peak RSS MiB |"
        rule += "---:|"
    rows = [header, rule]
    for name in names:
        row = f"| {name} | {1e3 * p10[name]:.1f} | {1e3 * med[name]:.1f} | {spread(paired[name])} |"
        if device.type == "cuda":
            row += f" {statistics.median(peaks[name]):.0f} |"
        if rss:
            row += f" {rss[name]:.0f} |" if name in rss else " |"
        rows.append(row)
    print("\n".join(rows))
    print(
        "ratio (paired): a run's median step time / that of the plain LightningModule runs just "
        "before and after it (torch-loop rows: the torch loop's plain sum), median over rounds "
        "[first and third quartile]"
        + ("" if jd is not None else "; torchjd is not installed: its rows are left out")
    )
    probe = _Net(args.channels)
    num_shared = sum(p.numel() for p in probe.trunk.parameters())
    rep = args.batch_size * args.channels * ((args.height + 1) // 2) * ((args.width + 1) // 2)
    print(
        f"per-task gradients: T x P = 3 x {num_shared} float32 = {3 * num_shared * 4 / 2**20:.2f} "
        f"MiB on the shared parameters; 3 x {rep} = {3 * rep * 4 / 2**20:.2f} MiB on the "
        "representation (the trunk's output, 1/2 resolution)"
    )
    ratio = {n: statistics.median(r) for n, r in paired.items()}
    return {"median": med, "p10": p10, "ratio": ratio, "rss": rss, "table": "\n".join(rows)}


def _reference_of(name: str) -> str:
    return "torch loop: plain sum" if name.startswith("torch loop") else "plain LightningModule"


if __name__ == "__main__":
    main()
