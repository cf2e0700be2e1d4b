"""Run by tests/test_ddp.py: every registered method under 2-process CPU DDP (gloo), one launch.

Each configuration trains the tiny three-task model for 2 epochs, all methods sequentially inside
the same process group (a launch costs ~10 s, a fit well under one):

- ``32``: 32-true, ``accumulate_grad_batches=1``;
- ``bf16acc2``: bf16-mixed, ``accumulate_grad_batches=2``, gradient clipping 1.0.

The ranks see different data (DistributedSampler) and task "c" is absent from rank 1's odd
batches, so anything that drives the weights and is not reduced over the ranks would make them
differ. Each rank writes OUT/<method>-<config>-rank<r>.pt with the weights applied after every
optimizer step, the final parameters and the step count. A method that raises writes the error
text instead (the test reports it).

    python tests/ddp_matrix_script.py OUT METHOD[:CONFIG] [METHOD[:CONFIG] ...]
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import TinyNet, loader

from lightning_aw.registry import create_method, get_method

CONFIGS = {
    "32": {"precision": "32-true", "accumulate_grad_batches": 1},
    "bf16acc2": {"precision": "bf16-mixed", "accumulate_grad_batches": 2, "gradient_clip_val": 1.0},
}


def _absent(batch_idx: int, task: str) -> bool:
    return task == "c" and int(os.environ.get("LOCAL_RANK", "0")) == 1 and batch_idx % 2 == 1


class _Trajectory(pl.Callback):
    """The weights after every optimizer step (identical on every rank when reduced)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self._last = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            w = pl_module.weighting.current_weights().detach().float().cpu().clone()
            self.weights.append(w)


def run(out: Path, name: str, config: str) -> None:
    pl.seed_everything(0, verbose=False)
    info = get_method(name)
    method = create_method(name, **copy.deepcopy(dict(info.example_kwargs)))
    trajectory = _Trajectory()
    net = TinyNet(absent=_absent, optimizer={"name": "adam", "lr": 0.01})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        max_epochs=2,
        callbacks=[method, trajectory],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        **CONFIGS[config],
    )
    trainer.fit(net, loader(n=128, batch_size=16))
    state = {
        "weights": torch.stack(trajectory.weights),
        "final": method.current_weights().detach().float().cpu().clone(),
        "params": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "global_step": trainer.global_step,
    }
    torch.save(state, out / f"{name}-{config}-rank{trainer.global_rank}.pt")


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    for spec in sys.argv[2:]:
        name, _, config = spec.partition(":")
        for cfg in [config] if config else list(CONFIGS):
            try:
                run(out, name, cfg)
            except Exception:
                (out / f"{name}-{cfg}-rank{rank}.err").write_text(traceback.format_exc())
                raise


if __name__ == "__main__":
    main()
    # tear gloo down before interpreter exit (else it can abort with "terminate called ...")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
