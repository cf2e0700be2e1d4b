"""Per-step cost of each weighting method against the plain summed loss, measured in one run.

    python benchmarks/bench_weighting.py [--steps 60] [--rounds 5] [--batch-size 128]
                                         [--stat mean|median|p10] [--only NAME ...] [--threads N]
                                         [--baseline-every 3] [--json FILE]

A fixed model (the two-digit CNN `lightning_aw.models.DigitsNet`, 3 tasks) is trained for
``--steps`` optimizer steps per configuration, each in its own Trainer; a step is
``on_train_batch_start`` -> ``on_train_batch_end`` (forward, backward, optimizer, weighting), the
first 5 steps of a run left out. The configurations are interleaved over ``--rounds`` rounds, and
the reference, ``MultiTaskModule (no callback)`` (lightning_aw's module without a weighting), is
run again after every ``--baseline-every`` configurations. A configuration's **paired ratio** is
its run's step time (the mean of the run's steps; ``--stat median`` or ``p10`` for their median
or 10th percentile, which leave out the work of a method that updates every few steps) over that
of the reference runs just before and after it, the median over rounds
(with the first and third quartiles: the run-to-run spread); ``added ms`` is the same
difference. ``--batch-size 6`` (at least 3: MoDo and SDMGrad split each batch in 3) leaves the
network almost no work: the added milliseconds are then the fixed per-step cost of a method
(hooks, small kernels, host work).

Besides the methods, two baselines written by hand:

- ``plain LightningModule``: the same network and losses in an ordinary LightningModule that
  returns the sum and logs the task losses with one ``log_dict`` call per step;
- ``plain LightningModule (no logging)``: the same, returning the sum without logging;

and the script prints ``MultiTaskModule (no callback)`` against each.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_aw.datasets import make_two_digits
from lightning_aw.models import DigitsNet
from lightning_aw.registry import create_method, get_method, list_methods

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path
from _paired import adjacent_reference, quantile, schedule, spread


class PlainNet(pl.LightningModule):
    """The DigitsNet network and losses in an ordinary LightningModule."""

    def __init__(self, log_losses: bool = True) -> None:
        super().__init__()
        self.log_losses = log_losses
        ref = DigitsNet()
        self.trunk, self.heads = ref.trunk, ref.heads

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        losses = {
            "left": F.cross_entropy(self.heads["left"](h), y[:, 0]),
            "right": F.cross_entropy(self.heads["right"](h), y[:, 1]),
            "sum": F.mse_loss(self.heads["sum"](h).squeeze(-1), y[:, 2].float()),
        }
        total = sum(losses.values())
        if self.log_losses:
            self.log_dict({**{f"loss/{k}": v for k, v in losses.items()}, "loss/total": total})
        return total

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)


class _Timer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t)


class _Metricless(DigitsNet):
    def __init__(self) -> None:
        super().__init__()
        self._metric_tasks = ()


CONFIGS: dict[str, Callable[[], tuple[pl.LightningModule, list[pl.Callback]]]] = {
    "plain LightningModule": lambda: (PlainNet(), []),
    "plain LightningModule (no logging)": lambda: (PlainNet(log_losses=False), []),
    "MultiTaskModule (no callback)": lambda: (_Metricless(), []),
}
# every registered method (gradient methods with both sources); epoch-interval methods are timed
# with a step interval, so their update is part of the measurement
BENCH_KWARGS: dict[str, dict[str, Any]] = {
    "dwa": {"interval": "step", "frequency": 10},
    "softadapt": {"interval": "step", "frequency": 10},
}


def _method(name: str, **kwargs: Any) -> Callable[[], tuple[pl.LightningModule, list[pl.Callback]]]:
    return lambda: (
        _Metricless(),
        [create_method(name, **{**BENCH_KWARGS.get(name, {}), **kwargs})],
    )


for _name in list_methods():
    _info = get_method(_name)
    _label = _info.cls.__name__
    if "source" in inspect.signature(_info.cls).parameters:
        for _source in ("parameters", "representation"):
            CONFIGS[f"{_label} ({_source[:4]}.)"] = _method(_name, source=_source)
    else:
        CONFIGS[_label] = _method(_name)
CONFIGS["FAMO (frequency=4)"] = _method("famo", frequency=4)
CONFIGS["FAMO (next batch)"] = _method("famo", losses_after="next_batch")


def measure(
    name: str, steps: int, batch_size: int, data, logdir: str, accelerator: str = "cpu"
) -> list[float]:
    model, callbacks = CONFIGS[name]()
    timer = _Timer()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        callbacks=[*callbacks, timer],
        logger=TensorBoardLogger(logdir, name="bench"),
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
    trainer.fit(model, loader)
    return timer.times[5:]  # skip warm-up steps


REFERENCE = "MultiTaskModule (no callback)"


def _reference_of(name: str) -> str | None:
    return None if name == REFERENCE else REFERENCE


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--only", nargs="*", default=None, help="subset of configurations")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU: intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--baseline-every",
        type=int,
        default=3,
        help="run MultiTaskModule (no callback), the reference, again after this many "
        "configurations",
    )
    parser.add_argument(
        "--stat",
        choices=["mean", "median", "p10"],
        default="mean",
        help="the statistic of one run's step times: mean (default: what a run costs, periodic "
        "updates included), median or p10 (the 10th percentile; both leave out the work of a "
        "method that updates every few steps, e.g. DWA or FAMO(frequency=4))",
    )
    parser.add_argument(
        "--json",
        default=None,
        help="also write the ratios (methods vs MultiTaskModule) to this JSON file, e.g. "
        "docs/overhead_cpu.json, which the README's methods table shows",
    )
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(*make_two_digits(args.batch_size * args.steps))
    names = [
        n
        for n in CONFIGS
        if args.only is None or any(n.startswith(o) for o in [*args.only, "MultiTask", "plain"])
    ]
    order = schedule(names, _reference_of, args.baseline_every)
    times: dict[str, list[float]] = {n: [] for n in names}
    paired: dict[str, list[float]] = {n: [] for n in names}
    added: dict[str, list[float]] = {n: [] for n in names}

    def stat(values: list[float]) -> float:
        if args.stat == "mean":
            return statistics.fmean(values)
        return quantile(values, 0.1) if args.stat == "p10" else statistics.median(values)

    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as logdir:
        for _ in range(args.rounds):
            runs: list[float] = []
            for name in order:
                steps = measure(name, args.steps, args.batch_size, data, logdir, args.accelerator)
                times[name].extend(steps)
                runs.append(stat(steps))
            for i, name in enumerate(order):
                reference = adjacent_reference(order, runs, i, _reference_of)
                paired[name].append(runs[i] / reference)
                added[name].append(runs[i] - reference)
    elapsed = time.perf_counter() - begin
    pooled = {n: stat(t) for n, t in times.items()}
    ratio = {n: statistics.median(r) for n, r in paired.items()}
    where = (
        torch.cuda.get_device_name()
        if args.accelerator == "gpu"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\ntorch {torch.__version__}, {where}, batch {args.batch_size}, {args.steps} steps x "
        f"{args.rounds} rounds, {args.stat} of each run ({elapsed:.0f} s)"
    )
    print(f"{'configuration':<36}{'ms/step':>9}{'added ms':>10}  ratio (paired) [q25, q75]")
    for name in names:
        print(
            f"{name:<36}{1e3 * pooled[name]:>9.2f}{1e3 * statistics.median(added[name]):>+10.3f}"
            f"  {spread(paired[name])}"
        )
    for plain in ("plain LightningModule", "plain LightningModule (no logging)"):
        inverse = [1 / r for r in paired[plain]]
        print(f"MultiTaskModule (no callback) vs {plain}: {spread(inverse)}")
    print(
        "ms/step: all runs pooled; ratio (paired): a run's step time / that of the "
        "MultiTaskModule (no callback) runs just before and after it, median over rounds "
        "[first and third quartile]; added ms: the same difference of step times"
    )
    if args.json:
        shown = sys.argv[1:] if argv is None else list(argv)
        record = {
            "command": " ".join(["python benchmarks/bench_weighting.py", *shown]),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "device": where,
            "batch_size": args.batch_size,
            "stat": args.stat,
            "ratios": {
                n: round(ratio[n], 3) for n in names if not n.startswith(("plain", "Multi"))
            },
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return {"ms": pooled, "ratio": ratio, "paired": paired}


if __name__ == "__main__":
    main()
