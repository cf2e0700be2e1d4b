"""Per-step cost of each weighting method against the plain summed loss, measured in one run.

    python benchmarks/bench_weighting.py [--steps 60] [--rounds 5] [--batch-size 128]
                                         [--stat median|p10] [--only NAME ...]

A fixed model (the two-digit CNN `lightning_aw.models.DigitsNet`, 3 tasks) is trained for
``--steps`` optimizer steps per configuration; the configurations are interleaved over
``--rounds`` rounds and the median (or, with ``--stat p10``, the 10th percentile of all steps) wall
time of a training step (``on_train_batch_start`` -> ``on_train_batch_end``: forward, backward,
optimizer, weighting) is compared with the baselines measured in the same run:

- ``plain LightningModule``: the same network and losses in an ordinary LightningModule that
  returns the sum and logs the task losses with one ``log_dict`` call per step;
- ``plain LightningModule (no logging)``: the same, returning the sum without logging;
- ``MultiTaskModule (no callback)``: lightning_aw's module with no weighting callback.

Every method's ratio is against ``MultiTaskModule (no callback)``, which itself is compared with the
plain LightningModule.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--only", nargs="*", default=None, help="subset of configurations")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument(
        "--stat",
        choices=["median", "p10"],
        default="median",
        help="median: the median over rounds of each round's median step time; p10: the 10th "
        "percentile of all step times (less sensitive to other jobs on a shared machine)",
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
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(*make_two_digits(args.batch_size * args.steps))
    names = [
        n
        for n in CONFIGS
        if args.only is None or any(n.startswith(o) for o in [*args.only, "MultiTask", "plain"])
    ]
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as logdir:
        for _ in range(args.rounds):
            for name in names:
                times[name].append(
                    measure(name, args.steps, args.batch_size, data, logdir, args.accelerator)
                )
    if args.stat == "p10":
        med = {
            n: statistics.quantiles([x for r in t for x in r], n=10)[0] for n, t in times.items()
        }
    else:
        med = {n: statistics.median(statistics.median(r) for r in t) for n, t in times.items()}
    base = med["MultiTaskModule (no callback)"]
    where = (
        torch.cuda.get_device_name()
        if args.accelerator == "gpu"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"\ntorch {torch.__version__}, {where}, batch {args.batch_size}, {args.stat}")
    print(f"{'configuration':<36}{'ms/step':>10}{'ratio':>8}")
    plain, bare = med["plain LightningModule"], med["plain LightningModule (no logging)"]
    for name in names:
        ref = plain if name.startswith(("plain", "MultiTask")) else base
        ratio = med[name] / ref
        extra = f"{med[name] / bare:>8.3f} vs no logging" if name.startswith("MultiTask") else ""
        print(f"{name:<36}{1e3 * med[name]:>10.2f}{ratio:>8.3f}{extra}")
    print(
        "ratios: the plain modules and MultiTaskModule vs plain LightningModule (and "
        "MultiTaskModule vs the plain one without logging); methods vs MultiTaskModule"
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
                n: round(med[n] / base, 3) for n in names if not n.startswith(("plain", "Multi"))
            },
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
