"""Two versions of lightning_aw timed against each other, alternating short runs on one machine.

    python benchmarks/bench_versions.py BEFORE_DIR [AFTER_DIR] [--rounds 4] [--steps 40]
        [--batch-size 128] [--clock wall|thread] [--only NAME ...]

``BEFORE_DIR`` and ``AFTER_DIR`` (default: this checkout) are directories holding a
``lightning_aw`` package, e.g. an older commit extracted with
``git archive COMMIT lightning_aw | tar -x -C /tmp/before``. Two versions of the package cannot
share one process, so each round runs every configuration of ``bench_weighting.py`` once in a
fresh process per version, the order of the versions alternating between rounds; the step times
are pooled per version and configuration. Reported: the 10th percentile of the step times (the
least disturbed steps on a shared machine) and the ratios of ``bench_weighting.py``, within each
version: the plain modules and ``MultiTaskModule`` against the plain module without logging,
every method against ``MultiTaskModule``.

``--clock thread`` times the CPU time of the main thread with one intra-op thread (insensitive to
the process being descheduled on a busy machine; a different regime from the default two threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINES = [
    "plain LightningModule (no logging)",
    "plain LightningModule",
    "MultiTaskModule (no callback)",
]


def _one_round(src: str, names: list[str], args: argparse.Namespace, out: Path) -> None:
    """Run every configuration once against the package in ``src``, appending to ``out``."""
    code = f"""
import importlib.util, json, logging, os, sys, tempfile, time
sys.path.insert(0, {src!r})
import torch
spec = importlib.util.spec_from_file_location("bench_weighting", {str(HERE / "bench_weighting.py")!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
import lightning_aw
assert lightning_aw.__file__.startswith({src!r}), lightning_aw.__file__
if {args.clock!r} == "thread":
    torch.set_num_threads(1)
    class ThreadTimer(bench._Timer):
        def on_train_batch_start(self, *a):
            self._t = time.thread_time()
        def on_train_batch_end(self, *a):
            self.times.append(time.thread_time() - self._t)
    bench._Timer = ThreadTimer
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
torch.manual_seed(0)
data = torch.utils.data.TensorDataset(*bench.make_two_digits({args.batch_size} * {args.steps}))
out = {str(out)!r}
res = json.load(open(out)) if os.path.exists(out) else {{}}
with tempfile.TemporaryDirectory() as logdir:
    for name in {names!r}:
        res.setdefault(name, []).extend(
            bench.measure(name, {args.steps}, {args.batch_size}, data, logdir)
        )
json.dump(res, open(out, "w"))
"""
    subprocess.run([sys.executable, "-c", code], check=True, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after", nargs="?", default=str(HERE.parent))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--only", nargs="*", default=[], help="configurations (exact names)")
    args = parser.parse_args(argv)
    names = BASELINES + [n for n in args.only if n not in BASELINES]
    dirs = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    with tempfile.TemporaryDirectory() as tmp:
        files = {v: Path(tmp) / f"{v}.json" for v in dirs}
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for version in order:
                _one_round(dirs[version], names, args, files[version])
        times = {v: json.loads(files[v].read_text()) for v in dirs}

    def p10(values: list[float]) -> float:
        return statistics.quantiles(values, n=10)[0]

    print(f"\n{args.clock} clock, batch {args.batch_size}, p10 of {args.rounds} rounds")
    print(f"{'configuration':<36}{'before ms':>10}{'ratio':>8}{'after ms':>10}{'ratio':>8}")
    for name in names:
        row = []
        for version in dirs:
            t = times[version]
            ref = BASELINES[0] if name in BASELINES else "MultiTaskModule (no callback)"
            row += [1e3 * p10(t[name]), p10(t[name]) / p10(t[ref])]
        print(f"{name:<36}{row[0]:>10.2f}{row[1]:>8.3f}{row[2]:>10.2f}{row[3]:>8.3f}")
    print(
        "ratios: plain modules and MultiTaskModule vs the plain module without logging; methods "
        "vs MultiTaskModule"
    )


if __name__ == "__main__":
    main()
