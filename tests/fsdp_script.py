"""2-process CPU FSDP2 (Lightning's ``ModelParallelStrategy``, gloo) against DDP, in ONE launch.

    python tests/fsdp_script.py OUT [CASE ...]    # no CASE: every case, in the order below

Every case trains the same :class:`ShardedNet` (``fully_shard`` on the trunk, each head and the
module in ``configure_model``) twice with the same seeds and the same global batch: under
``strategy="ddp"`` and under ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)``. Each rank writes ``OUT/<case>-rank<r>.pt`` with, per strategy, the
weights after every training batch (as applied), the weights before the first batch, the final
weights and the full (gathered) parameters; ``test_fsdp.py`` compares them. A case expected to
be refused (:data:`REFUSED`) records the error's type and message instead of the FSDP2 run. A case
that raises unexpectedly writes ``OUT/<case>-rank<r>.err``.

Cases: every registered method (built from its registry ``example_kwargs``); gradient methods
in both sources (``<name>-parameters``, ``<name>-representation``); a few unmarked-representation
variants (the parameter path without the cut representation); GradNorm; the refusals.

In the :data:`RESUMED` cases the FSDP2 run also saves a distributed checkpoint (a directory) at
the end of every epoch, and a new Trainer, model and method resume from the one of the first epoch
to the end (``resumed`` in the result). The ``mp/`` and ``bf16/`` cases train in bfloat16: under
FSDP2's ``MixedPrecisionPolicy`` or Lightning's ``precision="bf16-mixed"``, against a DDP
``bf16-mixed`` run (shared by the two).
"""

from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import TinyNet, ddp_result_file, loader

from lightning_aw._introspect import init_args
from lightning_aw.registry import create_method, get_method, list_methods

EPOCHS = 2
SAMPLES = 128  # both ranks together, batch 16 per rank: 4 steps per epoch


class ShardedNet(TinyNet):
    """TinyNet whose ``configure_model`` applies FSDP2 to the trunk, each head and the module
    (under DDP there is no device mesh and it does nothing)."""

    def __init__(
        self,
        *args: Any,
        reshard_after_forward: bool = True,
        shard_root: bool = True,
        bf16_params: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.shard_root = shard_root
        self.bf16_params = bf16_params

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        kw: dict[str, Any] = {"mesh": mesh}
        if self.bf16_params:  # FSDP2's own mixed precision: bf16 compute, fp32 reduction
            kw["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        fully_shard(self.trunk, reshard_after_forward=self.reshard_after_forward, **kw)
        for head in self.heads.values():
            fully_shard(head, reshard_after_forward=self.reshard_after_forward, **kw)
        if self.shard_root:
            fully_shard(self, **kw)


@dataclass(frozen=True)
class Case:
    method: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    marked: bool = True  #: whether the model marks its shared representation
    reshard_after_forward: bool = True
    tensor_parallel: bool = False  #: a 1 x 2 mesh (tensor parallelism) instead of 2 x 1
    shard_root: bool = True  #: whether ``configure_model`` applies ``fully_shard`` to the module
    optimizer: str = "adam"  #: SGD is not invariant to the scale of the gradients (Adam is)
    #: the FSDP2 run also saves a distributed checkpoint at the end of the first half of the
    #: epochs (``ModelCheckpoint``), and a new Trainer resumes from it to the end
    resume: bool = False
    precision: str = "32-true"  #: the Trainer's precision (both runs)
    #: ``fully_shard(..., mp_policy=MixedPrecisionPolicy(bf16 params, fp32 reduction))`` in the
    #: FSDP2 run, compared with a DDP ``bf16-mixed`` run
    bf16_params: bool = False
    #: task "c" is absent from batch 1 on every rank (refused under FSDP2: :data:`REFUSED`)
    absent: bool = False
    #: the refusal's advice: task "c" has no label in rank 1's odd batches, and instead of None
    #: its head still runs and its loss is zero-weighted (the task counts as present)
    masked: bool = False


#: cases that must be refused, before the first step (or, for an absent task, at the first step
#: that has one): (exception type name, words in the message)
REFUSED: dict[str, tuple[str, tuple[str, ...]]] = {
    "refuse/mgda-parameters-tp": (
        "MisconfigurationException",
        ("ModelParallelStrategy", "MGDA", "tensor_parallel_size=2", "source='representation'"),
    ),
    "refuse/gradnorm-tp": (
        "MisconfigurationException",
        ("ModelParallelStrategy", "GradNorm", "tensor_parallel_size=2", "loss-based method"),
    ),
    "refuse/uncertainty-unsharded-root": (
        "MisconfigurationException",
        ("ModelParallelStrategy", "UncertaintyWeighting", "log_vars", "fully_shard(self"),
    ),
    "refuse/absent-task": (
        "MisconfigurationException",
        ("ModelParallelStrategy", "['c']", "batch 1", "instead of None", "masked", "find_unused"),
    ),
    # multi-batch methods (extra forwards on parts of the batch): refused, whatever the source
    "refuse/sdmgrad": ("MisconfigurationException", ("ModelParallelStrategy", "SDMGrad", "parts")),
    "refuse/modo": ("MisconfigurationException", ("ModelParallelStrategy", "MoDo", "parts")),
    # a virtual step of the whole model (its full parameters)
    "refuse/auto_lambda": (
        "MisconfigurationException",
        ("ModelParallelStrategy", "AutoLambda", "virtual step"),
    ),
}

#: cases whose FSDP2 run is also interrupted and resumed (:attr:`Case.resume`)
RESUMED = (
    "dwa",
    "uncertainty",
    "famo",
    "gradnorm",
    "mgda-parameters",
    "pcgrad-parameters",
    "db_mtl-parameters",
    "gradvac-representation",
)

#: mixed-precision cases: a loss-based method with learnable weights, GradNorm and a gradient
#: method in both sources, each under FSDP2's ``MixedPrecisionPolicy`` (``mp/``) and under
#: Lightning's ``precision="bf16-mixed"`` (``bf16/``); the DDP run is ``bf16-mixed``
MIXED_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "uncertainty": ("uncertainty", {"init": 0.1}),
    "gradnorm": ("gradnorm", {}),
    "mgda-parameters": ("mgda", {"source": "parameters"}),
    "mgda-representation": ("mgda", {"source": "representation"}),
}


def cases() -> dict[str, Case]:
    out: dict[str, Case] = {}
    for name in list_methods():
        info = get_method(name)
        kwargs = dict(info.example_kwargs)
        # the methods that take a `source` (GradNorm, ExcessMTL, LRAnnealing and MoCo take
        # per-task gradients on parameters only)
        two_sources = "source" in init_args(info.cls).names and not info.needs_representation
        if f"refuse/{name}" in REFUSED:  # methods refused under FSDP2 whatever their arguments
            out[f"refuse/{name}"] = Case(name, kwargs)
        elif two_sources:
            for source in ("parameters", "representation"):
                out[f"{name}-{source}"] = Case(name, {**kwargs, "source": source})
        else:
            out[name] = Case(name, kwargs)
    # the parameter source without the cut representation (autograd.grad on the parameters)
    out["mgda-parameters-unmarked"] = Case("mgda", {"source": "parameters"}, marked=False)
    out["upgrad-gradients-unmarked"] = Case(
        "upgrad", {"source": "parameters", "ddp_sync": "gradients"}, marked=False
    )
    out["db_mtl-parameters-unmarked"] = Case("db_mtl", {"beta": 0.5}, marked=False)
    out["gradnorm-unmarked"] = Case(
        "gradnorm", dict(get_method("gradnorm").example_kwargs), marked=False
    )
    # learnable weighting parameters under SGD: their gradient's averaging over the ranks shows
    out["uncertainty-sgd"] = Case("uncertainty", {"init": 0.1}, optimizer="sgd")
    out["imtl_l-sgd"] = Case("imtl_l", {"init": 0.1}, optimizer="sgd")
    out["mgda-parameters-sgd"] = Case("mgda", {"source": "parameters"}, optimizer="sgd")
    # parameters kept unsharded between forward and backward
    out["pcgrad-parameters-keep"] = Case(
        "pcgrad", {"source": "parameters", "seed": 3}, reshard_after_forward=False
    )
    # refused before the first step (:data:`REFUSED`)
    out["refuse/mgda-parameters-tp"] = Case("mgda", {"source": "parameters"}, tensor_parallel=True)
    out["refuse/gradnorm-tp"] = Case("gradnorm", {}, tensor_parallel=True)
    out["refuse/uncertainty-unsharded-root"] = Case("uncertainty", {}, shard_root=False)
    # every rank skips task "c" at the same batch, so the refusal cannot hang the launch (a
    # task absent from one rank only hangs the ranks where it is present: see README)
    out["refuse/absent-task"] = Case("dwa", {}, absent=True)
    out["uncertainty-masked-task"] = Case("uncertainty", {"init": 0.1}, masked=True)
    for name in RESUMED:
        out[name] = replace(out[name], resume=True)
    for name, (method, kwargs) in MIXED_METHODS.items():
        out[f"mp/{name}"] = Case(method, kwargs, bf16_params=True)
        out[f"bf16/{name}"] = Case(method, kwargs, precision="bf16-mixed")
    return out


def _rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


class _RankSeed(pl.Callback):
    """Each rank's global generator differs, so only shared seeds give equal draws."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1000 + trainer.global_rank)


class _Trajectory(pl.Callback):
    """The weights before and after every training batch (as applied)."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.applied: list[torch.Tensor] = []
        self.compute_dtype = ""  #: the dtype of the marked representation (the trunk's output)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(pl_module.weighting.current_weights().detach().float().cpu().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.applied.append(pl_module.weighting.current_weights().detach().float().cpu().clone())
        step = pl_module.step_record
        if step is not None and step.representation is not None:
            self.compute_dtype = str(step.representation.dtype)


def _flat(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors and numbers of a (nested) method state, as tensors by dotted key."""
    if isinstance(state, torch.Tensor):
        return {prefix: state.detach().cpu().clone()}
    if isinstance(state, (bool, int, float)):
        return {prefix: torch.tensor(state)}
    if isinstance(state, Mapping):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _absent_c_at_batch_1(batch_idx: int, task: str) -> bool:
    return task == "c" and batch_idx == 1


def _zero_weighted_c(batch_idx: int, task: str, loss: torch.Tensor) -> torch.Tensor:
    return loss * 0 if task == "c" and batch_idx % 2 == 1 and _rank() == 1 else loss


def _full(v: torch.Tensor) -> torch.Tensor:
    return (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()


def fit(
    out: Path,
    case: Case,
    sharded: bool,
    checkpoints: Path | None = None,
    ckpt_path: Path | None = None,
) -> dict[str, Any]:
    """One run; with ``checkpoints``, a distributed checkpoint is saved there at the end of every
    epoch; with ``ckpt_path``, the run resumes from that checkpoint."""
    pl.seed_everything(0, verbose=False)
    method = create_method(case.method, **copy.deepcopy(dict(case.kwargs)))
    trajectory = _Trajectory()
    net = ShardedNet(
        mark_representation=case.marked,
        reshard_after_forward=case.reshard_after_forward,
        shard_root=case.shard_root,
        bf16_params=case.bf16_params and sharded,
        absent=_absent_c_at_batch_1 if case.absent else None,
        loss_hook=_zero_weighted_c if case.masked else None,
        optimizer={"name": case.optimizer, "lr": 0.01 if case.optimizer == "adam" else 0.05},
    )
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if sharded:
        dp, tp = (1, 2) if case.tensor_parallel else (2, 1)
        strategy: Any = ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp)
    else:
        strategy = "ddp"
    callbacks: list[Any] = [_RankSeed(), method, trajectory]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(checkpoints, "{epoch}", save_top_k=-1))
    precision = "bf16-mixed" if case.bf16_params and not sharded else case.precision
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        precision=precision,
        max_epochs=EPOCHS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=checkpoints is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(net, loader(n=SAMPLES, batch_size=16), ckpt_path=ckpt_path)
    return {
        "before": torch.stack(trajectory.before),
        "applied": torch.stack(trajectory.applied),
        "initial": trajectory.before[0],
        "final": method.current_weights().detach().float().cpu().clone(),
        "params": {k: _full(v) for k, v in net.state_dict().items()},
        "start": start,
        "state": _flat(method.state_dict()),
        "compute_dtype": trajectory.compute_dtype,
        "global_step": trainer.global_step,
    }


#: DDP runs by their arguments: the mixed-precision cases share one DDP bf16-mixed run
_DDP_RUNS: dict[tuple[str, str, str], dict[str, Any]] = {}


def run_pair(out: Path, name: str, case: Case) -> dict[str, Any]:
    """The DDP run and the FSDP2 run of ``case`` (and the resumed FSDP2 run)."""
    precision = "bf16-mixed" if case.bf16_params else case.precision
    key = (case.method, repr(sorted(case.kwargs.items())), precision)
    if precision == "32-true":
        ddp = fit(out, case, sharded=False)
    else:
        if key not in _DDP_RUNS:
            _DDP_RUNS[key] = fit(out, case, sharded=False)
        ddp = _DDP_RUNS[key]
    if not case.resume:
        return {"ddp": ddp, "fsdp": fit(out, case, sharded=True)}
    # the checkpoints' folder is the same on both ranks (one machine)
    folder = out / "checkpoints" / name.replace("/", ".")
    fsdp = fit(out, case, sharded=True, checkpoints=folder)
    middle = folder / f"epoch={EPOCHS // 2 - 1}.ckpt"
    resumed = fit(out, case, sharded=True, ckpt_path=middle)
    resumed["checkpoint_is_dir"] = middle.is_dir()
    return {"ddp": ddp, "fsdp": fsdp, "resumed": resumed}


def run_case(out: Path, name: str, case: Case) -> None:
    start = time.perf_counter()
    if name in REFUSED:
        try:
            fit(out, case, sharded=True)
        except Exception as err:  # the refusal, recorded for the test
            result: dict[str, Any] = {"error_type": type(err).__name__, "error": str(err)}
        else:
            result = {"error_type": "", "error": "no error"}
    else:
        result = run_pair(out, name, case)
    result["seconds"] = time.perf_counter() - start
    torch.save(result, ddp_result_file(out, name, _rank()))


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    everything = cases()
    if argv[1:] == ["--list"]:
        print("\n".join(everything))
        return
    out = Path(argv[1])
    for name in argv[2:] or list(everything):
        try:
            run_case(out, name, everything[name])
        except Exception:
            ddp_result_file(out, name, _rank(), "err").write_text(traceback.format_exc())
            raise


if __name__ == "__main__":
    main(sys.argv)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
