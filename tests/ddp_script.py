"""Every 2-process CPU DDP (gloo) scenario of the suite, run in ONE launch (a launch costs ~10 s,
a fit well under one): the cases run one after the other inside the same process group.

    python tests/ddp_script.py OUT [CASE ...]    # no CASE: every case, in the order below

Cases (``python tests/ddp_script.py --list`` prints them):

- ``matrix/<method>-<config>``: every registered method, built from its registry
  ``example_kwargs``, for 2 epochs in each configuration of :data:`CONFIGS` (32-true; bf16-mixed
  with ``accumulate_grad_batches=2`` and clipping);
- ``variant/<id>``: the configurations :data:`VARIANTS` adds because the example arguments do not
  reach their code path (another interval, source or ``ddp_sync``, an unseeded RLW, an unmarked
  representation);
- ``monitor``, ``step_monitor``: the monitors of ``test_monitor.py`` and ``test_step_monitor.py``
  (their tests read what these write under ``OUT/<case>/``);
- ``fusion``: SAMMEWeights and HedgeWeights of ``test_fusion.py``, ranks on different data;
- ``gate_monitor``: GateMonitor and AuxFreeBalancing of ``test_gate_monitor.py``, ranks on
  different data;
- ``dense_metrics``: SceneNet's NYUv2 metrics of ``test_dense_metrics.py`` in a 2-process
  validation.
- ``famo_next_batch``: ``FAMO(losses_after="next_batch")`` of ``test_weighting.py``, ranks on
  different data.

In the ``matrix`` and ``variant`` cases the ranks see different data (DistributedSampler), task
"c" is absent from rank 1's odd batches and each rank's global generator is seeded differently
before the callbacks' ``setup``, so anything that drives the weights and is not reduced or
broadcast over the ranks would make them differ. Each rank writes ``OUT/<case>-rank<r>.pt``
(``/`` in the case replaced by ``.``) with, for every training batch, the optimizer step and the
weights before the transforms and as applied; the weights before the first step; the method's
final weights, state (and its public views) and diagnostics; the parameters and the step count. A case that raises
writes the error text to ``OUT/<case>-rank<r>.err`` instead (the tests report it).
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import TinyNet, ddp_result_file, loader, regression_data

from lightning_aw import Weighting
from lightning_aw.registry import create_method, get_method, list_methods

#: the Trainer arguments of each matrix configuration
CONFIGS: dict[str, dict[str, Any]] = {
    "32": {"precision": "32-true", "accumulate_grad_batches": 1},
    "bf16acc2": {"precision": "bf16-mixed", "accumulate_grad_batches": 2, "gradient_clip_val": 1.0},
}


#: public attributes of some methods that expose their state (checked finite as well)
PUBLIC_STATE = ("logits", "reference_point", "log_scales")


@dataclass(frozen=True)
class Fit:
    """One DDP training run of a registered method."""

    method: str  #: registry name
    kwargs: Mapping[str, Any]  #: constructor arguments
    epochs: int
    samples: int  #: both ranks together, batches of 16
    trainer: Mapping[str, Any] = field(default_factory=dict)
    marked: bool = True  #: whether the model marks its shared representation


#: configurations beyond the registry's example arguments (3 epochs of 8 steps, unless noted)
VARIANTS: dict[str, Fit] = {
    "dwa-step": Fit("dwa", {"interval": "step", "frequency": 2}, 3, 256),
    "mgda-parameters": Fit("mgda", {}, 3, 256),
    "upgrad-gradients": Fit("upgrad", {"ddp_sync": "gradients"}, 3, 256),
    "gradvac-representation": Fit("gradvac", {"source": "representation"}, 3, 256),
    "rlw-unseeded": Fit("rlw", {}, 3, 256),  # seed=None: drawn on rank 0 and broadcast
    "softadapt-step": Fit("softadapt", {"beta": 5.0, "interval": "step", "frequency": 2}, 3, 256),
    "db_mtl-unmarked": Fit("db_mtl", {}, 1, 256, marked=False),
}


def fits() -> dict[str, Fit]:
    """Every ``matrix/...`` and ``variant/...`` case."""
    out = {
        f"matrix/{name}-{config}": Fit(
            name, get_method(name).example_kwargs, 2, 128, trainer=CONFIGS[config]
        )
        for name in list_methods()
        for config in CONFIGS
    }
    out.update({f"variant/{k}": v for k, v in VARIANTS.items()})
    return out


def _rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _absent(batch_idx: int, task: str) -> bool:
    return task == "c" and _rank() == 1 and batch_idx % 2 == 1


def _tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors and numbers of a (nested) state, as tensors by dotted key, on the CPU."""
    if isinstance(state, torch.Tensor):
        return {prefix: state.detach().cpu().clone()}
    if isinstance(state, (bool, int, float)):
        return {prefix: torch.tensor(state)}
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class _RankSeed(pl.Callback):
    """Gives each rank a different global generator just before the weighting's setup, so a
    random method draws the same numbers on every rank only if it shares rank 0's seed."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1000 + trainer.global_rank)


class _Trajectory(pl.Callback):
    """The step count and the weights (before the transforms and as applied) after every batch,
    and the weights before the first one."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.raw: list[torch.Tensor] = []
        self.applied: list[torch.Tensor] = []
        self.initial: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.initial is None:
            self.initial = pl_module.weighting.weight_tensor().detach().float().cpu().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        w: Weighting = pl_module.weighting
        self.steps.append(trainer.global_step)
        self.raw.append(w.weight_tensor().detach().float().cpu().clone())
        self.applied.append(w.current_weights().detach().float().cpu().clone())


def run_fit(out: Path, case: str, fit: Fit) -> None:
    pl.seed_everything(0, verbose=False)
    method = create_method(fit.method, **copy.deepcopy(dict(fit.kwargs)))
    trajectory = _Trajectory()
    # a method that refuses absent tasks (SDMGrad, MoDo) trains with every task present
    absent = _absent if get_method(fit.method).partial_labels else None
    net = TinyNet(
        absent=absent, mark_representation=fit.marked, optimizer={"name": "adam", "lr": 0.01}
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        max_epochs=fit.epochs,
        callbacks=[_RankSeed(), method, trajectory],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        **fit.trainer,
    )
    trainer.fit(net, loader(n=fit.samples, batch_size=16))
    result = {
        "steps": torch.tensor(trajectory.steps),
        "raw": torch.stack(trajectory.raw),
        "applied": torch.stack(trajectory.applied),
        "initial": trajectory.initial,
        "final": method.current_weights().detach().float().cpu().clone(),
        "state": _tensors(method.state_dict()),
        # the public views of the state that drives the weights (FAMO, STCH, IMTL-L)
        "public": _tensors({a: getattr(method, a) for a in PUBLIC_STATE if hasattr(method, a)}),
        "diagnostics": _tensors(method.log_items()),
        "params": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "global_step": trainer.global_step,
    }
    torch.save(result, ddp_result_file(out, case, trainer.global_rank))


def run_monitor(out: Path, case: str) -> None:
    """GradientConflictMonitor (local and global) and WeightFigures next to PCGrad; rank r trains
    on samples r, r + 2, r + 4, ... in order. Read by ``test_monitor.py``."""
    from lightning_aw import PCGrad
    from lightning_aw.monitor import GradientConflictMonitor, WeightFigures

    root = out / case
    pl.seed_everything(0, verbose=False)
    monitors = [
        GradientConflictMonitor(every_n_steps=1, prefix="local"),
        GradientConflictMonitor(every_n_steps=1, ddp_sync="global", prefix="global"),
        GradientConflictMonitor(
            every_n_steps=1, source="representation", ddp_sync="global", prefix="global_rep"
        ),
    ]
    figures = WeightFigures(every_n_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        logger=TensorBoardLogger(root, name="tb"),
        callbacks=[PCGrad(source="representation", seed=0), *monitors, figures],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        use_distributed_sampler=False,
    )
    rank = _rank()
    x, y = regression_data(64)
    trainer.fit(TinyNet(), DataLoader(TensorDataset(x[rank::2], y[rank::2]), batch_size=16))
    measured = {m.prefix: m.num_measured for m in monitors}
    torch.save({"measured": measured, "steps": figures.steps}, ddp_result_file(out, case, rank))


def run_step_monitor(out: Path, case: str) -> None:
    """AdaptiveStepMonitor under Adam with one parameter group per task head; each rank writes
    the optimizer's state. Read by ``test_step_monitor.py``."""
    from lightning_aw.optim import AdaptiveStepMonitor

    class Net(TinyNet):
        def task_parameters(self):
            return {t: self.heads[t].parameters() for t in self.tasks}

    root = out / case
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        log_every_n_steps=1,
        logger=TensorBoardLogger(root, name="tb", version=0),
        callbacks=[AdaptiveStepMonitor(every_n_steps=2)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(Net(optimizer={"name": "adam", "lr": 0.01}), loader())
    torch.save(trainer.optimizers[0].state_dict(), ddp_result_file(out, case, trainer.global_rank))


def run_fusion(out: Path, case: str) -> None:
    """SAMMEWeights on one WeightedEnsemble and HedgeWeights on another, rank r training and
    validating on samples r, r + 2, ... (so the ranks' own errors and losses differ). Read by
    ``test_fusion.py``."""
    from _fusion_helpers import MEMBERS, FusionNet, class_data

    from lightning_aw.fusion import HedgeWeights, SAMMEWeights

    rank = _rank()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        callbacks=[SAMMEWeights(3, ensemble="ensemble"), HedgeWeights(0.5, ensemble="second")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=out / case,
    )
    net = FusionNet(two=True)
    x, y = class_data(64)
    xv, yv = class_data(64, seed=1)
    train = DataLoader(TensorDataset(x[rank::2], y[rank::2]), batch_size=16)
    val = DataLoader(TensorDataset(xv[rank::2], yv[rank::2]), batch_size=16)
    trainer.fit(net, train, val)
    with torch.no_grad():
        logits = net.member_logits(xv)
    wrong = torch.stack([logits[n].argmax(1) != yv for n in MEMBERS]).double()
    result = {
        "samme": net.ensemble.fixed_weights.clone(),
        "hedge": net.second.fixed_weights.clone(),
        "global_errors": wrong.mean(1),
        "local_errors": wrong[:, rank::2].mean(1),
        "losses": net.train_losses,
    }
    torch.save(result, ddp_result_file(out, case, rank))


def run_gate_monitor(out: Path, case: str) -> None:
    """GateMonitor and AuxFreeBalancing on a top-2 MMoE; rank r trains on samples r, r + 2, ...
    (different data per rank). Each rank writes the monitor's reduced statistics of the last
    logging step, its own gate values of that step and the balancing biases. Read by
    ``test_gate_monitor.py``."""
    import torch.nn.functional as F
    from torch import nn

    from lightning_aw import MultiTaskModule
    from lightning_aw.monitor import GateMonitor
    from lightning_aw.nn import AuxFreeBalancing, MMoE

    class Net(MultiTaskModule):
        def __init__(self) -> None:
            super().__init__(tasks=("a", "b"), optimizer={"name": "sgd", "lr": 0.05})
            torch.manual_seed(0)
            self.moe = MMoE(6, lambda: nn.Linear(6, 4), 3, self.tasks, top_k=2, balance=True)
            self.towers = nn.ModuleDict({t: nn.Linear(4, 1) for t in self.tasks})

        def task_losses(self, batch, batch_idx):
            x, y = batch
            mixed = self.moe(x)
            return {
                t: F.mse_loss(self.towers[t](mixed[t]).squeeze(-1), y[:, i])
                for i, t in enumerate(self.tasks)
            }

    class Local(pl.Callback):  # before the monitor: this rank's gate values of every step
        def __init__(self) -> None:
            self.local: dict[str, torch.Tensor] = {}

        def on_before_backward(self, trainer, pl_module, loss):
            self.local = {f"moe/{k}": g.last.clone() for k, g in pl_module.moe.gates().items()}

    root = out / case
    pl.seed_everything(0, verbose=False)
    local, monitor, balancer = Local(), GateMonitor(), AuxFreeBalancing(step_size=0.1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        log_every_n_steps=1,
        logger=TensorBoardLogger(root, name="tb"),
        callbacks=[balancer, local, monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        use_distributed_sampler=False,
    )
    rank = _rank()
    x, y = regression_data(96)
    net = Net()
    trainer.fit(net, DataLoader(TensorDataset(x[rank::2], y[rank::2, :2]), batch_size=16))
    biases = {k: g.balance_bias.detach().clone() for k, g in net.moe.gates().items()}
    result = {
        "stats": monitor.last_stats,
        "local": local.local,
        "biases": biases,
        "load": dict(balancer.last_load),
    }
    torch.save(result, ddp_result_file(out, case, rank))


def run_dense_metrics(out: Path, case: str) -> None:
    """SceneNet's NYUv2 metrics in a 2-process validation: each rank sees half of 8 rendered
    scenes (DistributedSampler) and the metric states are summed across the ranks. Each rank
    writes the logged values. Read by ``test_dense_metrics.py``."""
    from lightning_aw.datasets import SyntheticScenes
    from lightning_aw.models import SceneNet

    torch.manual_seed(0)
    net = SceneNet(channels=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out / case,
    )
    data = SyntheticScenes(8, 16, 24, seed=0, split="val")
    trainer.validate(net, DataLoader(data, batch_size=2))
    values = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k.count("/") == 2 and not k.startswith("val/loss")
    }
    torch.save({"metrics": values}, ddp_result_file(out, case, _rank()))


def run_famo_next_batch(out: Path, case: str) -> None:
    """FAMO(losses_after="next_batch") for 6 steps (2 epochs), the ranks on different data
    (DistributedSampler). Each rank writes its own losses of every step and the final logits.
    Read by ``test_weighting.py``."""
    from lightning_aw import FAMO

    class Losses(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[torch.Tensor] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(pl_module.step_record.losses.detach().cpu().clone())

    pl.seed_everything(0, verbose=False)
    famo, record = FAMO(losses_after="next_batch"), Losses()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=[famo, record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out / case,
    )
    trainer.fit(TinyNet(optimizer={"name": "adam", "lr": 0.01}), loader(n=96, batch_size=16))
    result = {"losses": torch.stack(record.losses), "logits": famo.logits.detach().cpu().clone()}
    torch.save(result, ddp_result_file(out, case, trainer.global_rank))


def cases() -> dict[str, Callable[[Path, str], None]]:
    """Every case, by name, in the order a launch runs them."""
    out: dict[str, Callable[[Path, str], None]] = {
        name: (lambda o, c, fit=fit: run_fit(o, c, fit)) for name, fit in fits().items()
    }
    out["monitor"] = run_monitor
    out["step_monitor"] = run_step_monitor
    out["fusion"] = run_fusion
    out["gate_monitor"] = run_gate_monitor
    out["dense_metrics"] = run_dense_metrics
    out["famo_next_batch"] = run_famo_next_batch
    return out


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    everything = cases()
    if argv[1:] == ["--list"]:
        print("\n".join(everything))
        return
    out = Path(argv[1])
    for case in argv[2:] or list(everything):
        try:
            everything[case](out, case)
        except Exception:
            ddp_result_file(out, case, _rank(), "err").write_text(traceback.format_exc())
            raise


if __name__ == "__main__":
    main(sys.argv)
    # tear gloo down before interpreter exit (else it can abort with "terminate called ...")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
