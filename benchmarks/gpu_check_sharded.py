"""GPU check of sharded training: FSDP2 and FSDP1 on CUDA, each against the same run on one device.

    python benchmarks/gpu_check_sharded.py [--strategies fsdp2,fsdp1] [--bf16] [CASE ...]

Every case of ``tests/fsdp_script.py`` that fits one data-parallel rank (every registered method,
gradient methods in both sources) trains ``ShardedNet`` on one GPU with the same seed:

- under ``strategy="ddp"`` on the one device (the same sampler), the reference;
- under FSDP2 (``ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)``,
  ``fully_shard`` in ``configure_model``): the weights after every step and the final parameters
  must equal the reference (rtol 1e-5), or with ``--bf16`` (both runs ``bf16-mixed``) be finite
  and within 2e-2;
- with ``--strategies fsdp1``, under Lightning's ``FSDPStrategy``: equal to the reference, or
  refused before the first step with a ``MisconfigurationException`` that names the strategy.

One line per cell, then ``N passed, N failed``. The 2-process CPU comparison with DDP is
``tests/test_fsdp.py``; this script covers what only a GPU can run.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _helpers import loader  # noqa: E402
from fsdp_script import REFUSED, ShardedNet, _full, _Trajectory, cases  # noqa: E402

from lightning_aw.registry import create_method  # noqa: E402


def fit(case: Any, strategy: Any, precision: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    method = create_method(case.method, **copy.deepcopy(dict(case.kwargs)))
    trajectory = _Trajectory()
    net = ShardedNet(
        mark_representation=case.marked,
        reshard_after_forward=case.reshard_after_forward,
        shard_root=case.shard_root,
        optimizer={"name": case.optimizer, "lr": 0.01 if case.optimizer == "adam" else 0.05},
    )
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        strategy=strategy,
        precision=precision,
        max_epochs=2,
        callbacks=[method, trajectory],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(net, loader(n=64, batch_size=16))
    return {
        "applied": torch.stack(trajectory.applied),
        "params": {k: _full(v) for k, v in net.state_dict().items()},
    }


def compare(got: dict[str, Any], ref: dict[str, Any], tol: float) -> str | None:
    """``None`` when ``got`` matches ``ref``, else what differs."""
    pairs = [("weights", got["applied"], ref["applied"])]
    pairs += [(k, got["params"][k], v) for k, v in ref["params"].items()]
    for name, a, b in pairs:
        if not torch.isfinite(a).all():
            return f"{name} not finite"
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol / 10):
            return f"{name} differs (max {float((a.float() - b.float()).abs().max()):.3g})"
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="*")
    parser.add_argument("--strategies", default="fsdp2", help="fsdp2 and/or fsdp1, comma-separated")
    parser.add_argument("--bf16", action="store_true", help="bf16-mixed instead of 32-true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    precision, tol = ("bf16-mixed", 2e-2) if args.bf16 else ("32-true", 1e-5)
    everything = {
        n: c
        for n, c in cases().items()
        if n not in REFUSED and c.shard_root and not c.tensor_parallel
    }
    names = args.cases or list(everything)
    known: dict[str, Any] = {
        "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        "fsdp1": lambda: FSDPStrategy(),
    }
    strategies = {k: known[k] for k in args.strategies.split(",")}
    passed = failed = 0
    for name in names:
        case = everything[name]
        start = time.perf_counter()
        try:
            ref = fit(case, "ddp", precision)  # the same DistributedSampler order
        except Exception:
            print(f"FAIL  {name:34s} reference run: {traceback.format_exc(limit=1)}")
            failed += 1
            continue
        for label, make in strategies.items():
            try:
                problem = compare(fit(case, make(), precision), ref, tol)
                verdict = "PASS" if problem is None else "FAIL"
                detail = problem or f"= one device ({time.perf_counter() - start:.1f}s)"
            except MisconfigurationException as err:  # a refusal before the first step
                named = type(make()).__name__ in str(err)
                verdict, detail = ("PASS" if named else "FAIL"), f"refused: {str(err)[:110]}"
            except Exception as err:
                verdict, detail = "FAIL", f"{type(err).__name__}: {str(err)[:140]}"
            passed += verdict == "PASS"
            failed += verdict == "FAIL"
            print(f"{verdict}  {label} {precision} {name:34s} {detail}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
