"""Run by tests/test_methods_loss_extra.py: 2-process CPU DDP (gloo) for the extra loss weightings.

Each rank writes its final weights, the method's state and the parameters to
OUT/<method>-rank<r>.pt. The data differ between ranks (DistributedSampler), and task "c" is absent
from rank 1's odd batches, so state that is not reduced over the ranks would differ.

    python tests/ddp_loss_extra_script.py OUT METHOD [METHOD ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import TinyNet, loader

from lightning_aw.weighting._famo import FAMO
from lightning_aw.weighting._gls import GLS, ScaleInvariant
from lightning_aw.weighting._imtl_l import IMTLL
from lightning_aw.weighting._rlw import RLW
from lightning_aw.weighting._softadapt import SoftAdapt
from lightning_aw.weighting._stch import STCH

METHODS = {
    "rlw": lambda: RLW(),  # seed=None: drawn on rank 0 and broadcast
    "famo": lambda: FAMO(),
    "softadapt-step": lambda: SoftAdapt(beta=5.0, interval="step", frequency=2),
    "imtl_l": lambda: IMTLL(lr=0.05),
    "stch": lambda: STCH(warmup_epochs=1),
    "gls": lambda: GLS(),
    "scale_invariant": lambda: ScaleInvariant(),
}


class _Trajectory(pl.Callback):
    """The effective weights applied at every step (identical on every rank when they come from
    rank-reduced losses)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.weighting.current_weights().detach().clone())


def _absent(batch_idx: int, task: str) -> bool:
    return task == "c" and int(os.environ.get("LOCAL_RANK", "0")) == 1 and batch_idx % 2 == 1


class _RankSeed(pl.Callback):
    """Gives each rank a different global generator just before the weighting's setup, so
    RLW(seed=None) draws the same weights only if it shares rank 0's seed."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1000 + trainer.global_rank)


def _state(method) -> dict[str, torch.Tensor]:
    """The tensors that drive the weights (the same on every rank when reduced correctly)."""
    if isinstance(method, FAMO):
        return {"logits": method.logits, "trajectory": torch.stack(_TRAJ.weights)}
    if isinstance(method, IMTLL):
        return {"log_scales": method.log_scales.detach()}
    if isinstance(method, STCH):
        return {"reference": method.reference_point, "trajectory": torch.stack(_TRAJ.weights)}
    if isinstance(method, (GLS, ScaleInvariant)):
        return {"trajectory": torch.stack(_TRAJ.weights)}
    return {"weights": method.weight_tensor()}


def main() -> None:
    out = Path(sys.argv[1])
    for name in sys.argv[2:]:
        pl.seed_everything(0, verbose=False)
        method = METHODS[name]()
        global _TRAJ
        _TRAJ = _Trajectory()
        net = TinyNet(absent=_absent, optimizer={"name": "adam", "lr": 0.01})
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true",
            max_epochs=3, callbacks=[_RankSeed(), method, _TRAJ],
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=out,
        )
        trainer.fit(net, loader(n=256, batch_size=16))
        state = {
            "weights": method.weight_tensor().detach().clone(),
            "state": {k: v.detach().clone() for k, v in _state(method).items()},
            "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "global_step": trainer.global_step,
        }
        torch.save(state, out / f"{name}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
    # tear gloo down before interpreter exit (else it can abort with "terminate called ...")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
