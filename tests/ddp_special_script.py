"""Run by tests/test_aggregation_special.py: 2-process CPU DDP (gloo) with GradDrop and DB-MTL.

Each rank writes its weights after every step, its final parameters (and DB-MTL's EMA) to
OUT/<method>-rank<r>.pt. The ranks see different data, and task "c" is absent from rank 1's odd
batches, so an EMA that is not averaged over the ranks would differ.

    python tests/ddp_special_script.py OUT METHOD [METHOD ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import TinyNet, loader

from lightning_aw import DBMTL, GradDrop

METHODS = {
    "graddrop": (lambda: GradDrop(leak=0.1), True),
    "dbmtl": (lambda: DBMTL(), True),
    "dbmtl-unmarked": (lambda: DBMTL(), False),
}


def _absent(batch_idx: int, task: str) -> bool:
    return task == "c" and int(os.environ.get("LOCAL_RANK", "0")) == 1 and batch_idx % 2 == 1


class _Trajectory(pl.Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.weighting.weight_tensor().detach().cpu().clone())


def main() -> None:
    out = Path(sys.argv[1])
    for name in sys.argv[2:]:
        pl.seed_everything(0, verbose=False)
        make, marked = METHODS[name]
        method = make()
        trajectory = _Trajectory()
        net = TinyNet(
            absent=_absent, mark_representation=marked, optimizer={"name": "adam", "lr": 0.01}
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp_find_unused_parameters_true",
            max_epochs=1,
            callbacks=[method, trajectory],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
        )
        trainer.fit(net, loader(n=256, batch_size=16))
        state = {
            "weights": torch.stack(trajectory.weights),
            "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "global_step": trainer.global_step,
            "ema": getattr(method, "_ema", torch.zeros(0)).cpu(),
            "fallbacks": float(method._fallbacks),
        }
        torch.save(state, out / f"{name}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
    # tear gloo down before interpreter exit (else it can abort with "terminate called ...")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
