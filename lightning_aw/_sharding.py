"""Sharded parameters (FSDP2 ``fully_shard``, Lightning's ``ModelParallelStrategy``): internal.

Between two forward passes FSDP2 keeps every parameter as a sharded ``DTensor``; a forward
all-gathers each ``fully_shard``-ed module's parameters into plain unsharded tensors, runs on
those, and the backward reduce-scatters their ``.grad`` into the shards (averaged over the data
parallel ranks, as DDP averages). ``torch.autograd.grad`` with respect to the sharded
parameters therefore finds no path from any loss (their per-task gradients come back empty).

What the library does instead, once, here and in :mod:`lightning_aw.engine`:

- :class:`Unsharder` maps a sharded parameter to the unsharded tensor the current step's
  forward used; per-task gradients are taken with respect to those (each rank: the gradient of
  its own micro-batch on the full parameter, exactly what a DDP rank computes), and a method's own
  gradient is delivered into them, so FSDP2's reduce-scatter averages it like any gradient.
- :func:`gathered` reads a learnable weighting parameter (UncertaintyWeighting's log σ²) that
  ``fully_shard`` of the root module turned into a ``DTensor`` that no forward ever all-gathers:
  its full value, whose gradient is averaged over the ranks and resharded (DDP's semantics).

Single-device and DDP runs never reach this module's code on their hot path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated distributed parameter)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def any_sharded(params: Sequence[Tensor]) -> bool:
    return any(is_sharded(p) for p in params)


def strategy_name(trainer: Any) -> str:
    return type(getattr(trainer, "strategy", None)).__name__


def tensor_parallel_size(trainer: Any) -> int:
    """The tensor parallel size of a ``ModelParallelStrategy`` (1 for any other strategy)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or type(strategy).__name__ != "ModelParallelStrategy":
        return 1
    mesh = getattr(strategy, "_device_mesh", None)
    if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()):
        return int(mesh["tensor_parallel"].size())
    size = getattr(strategy, "_tensor_parallel_size", 1)
    return int(size) if isinstance(size, int) else 1


def data_parallel_size(trainer: Any) -> int:
    """The data parallel size of a ``ModelParallelStrategy`` (its world size when the mesh does
    not name it; 1 for any other strategy)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or type(strategy).__name__ != "ModelParallelStrategy":
        return 1
    mesh = getattr(strategy, "_device_mesh", None)
    if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
        return int(mesh["data_parallel"].size())
    return int(getattr(trainer, "world_size", 1)) // tensor_parallel_size(trainer)


def check_parameter_gradients(owner: Any, trainer: Any, what: str, instead: str) -> None:
    """Refuse, before the first step, the strategies under which per-task gradients on
    parameters are not supported: FSDP1 (``FSDPStrategy``: flat parameters) and tensor
    parallelism (``ModelParallelStrategy(tensor_parallel_size > 1)``: DTensor parameters that
    stay sharded inside the forward)."""
    name = strategy_name(trainer)
    problem = None
    if name == "FSDPStrategy":
        problem = (
            "FSDP1 flattens the parameters into flat buffers, so per-task gradients on them are "
            "not available"
        )
    elif tensor_parallel_size(trainer) > 1:
        problem = (
            f"with tensor parallelism (tensor_parallel_size={tensor_parallel_size(trainer)}) the "
            "parameters stay sharded DTensors inside the forward, so per-task gradients on them "
            "would hold only this rank's part"
        )
    if problem is not None:
        raise MisconfigurationException(
            f"{owner!r} takes per-task gradients on {what}, which is not supported under "
            f"{name}: {problem}. Instead: {instead} (or train with "
            "ModelParallelStrategy(tensor_parallel_size=1), i.e. FSDP2 `fully_shard`, or DDP)."
        )


class Unsharder:
    """Maps parameters sharded by FSDP2 to the unsharded tensors the current forward used.

    Built once per fit from the module's ``fully_shard`` states (after ``configure_model``);
    :meth:`resolve` is called per step. Parameters that ``fully_shard`` does not manage are
    returned as they are.
    """

    def __init__(self, module: nn.Module, owner: Any) -> None:
        self.owner = owner
        self._by_id: dict[int, Any] = {}
        for sub in module.modules():
            get_state = getattr(sub, "_get_fsdp_state", None)
            if get_state is None:
                continue
            state = get_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch before 2.12: one parameter group per state
                group = getattr(state, "_fsdp_param_group", None)
                groups = [] if group is None else [group]
            for group in groups:
                for fsdp_param in group.fsdp_params:
                    self._by_id[id(fsdp_param.sharded_param)] = fsdp_param
        self._names = {id(p): n for n, p in module.named_parameters()}

    @classmethod
    def of(cls, module: nn.Module, params: Sequence[Tensor], owner: Any) -> Unsharder | None:
        """An :class:`Unsharder` when one of ``params`` is sharded, else ``None`` (DDP and one
        device: nothing to resolve)."""
        return cls(module, owner) if any_sharded(params) else None

    def resolve(self, params: Sequence[Tensor], strict: bool = True) -> list[Tensor | None]:
        """The unsharded tensor of each parameter in this step's forward, or the parameter itself
        when FSDP2 does not manage it. A parameter whose unsharded tensor does not exist (not
        all-gathered yet) is an error with ``strict``, else ``None``."""
        out: list[Tensor | None] = []
        for p in params:
            fsdp_param = self._by_id.get(id(p))
            if fsdp_param is None:
                if strict and is_sharded(p):
                    self._refuse(p, "is a DTensor that `fully_shard` does not manage")
                out.append(p)
                continue
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is None or is_sharded(unsharded):
                if strict:
                    self._refuse(
                        p,
                        "has no unsharded copy in this step (its module's forward did not run)"
                        if unsharded is None
                        else "stays a DTensor inside the forward (tensor parallelism)",
                    )
                out.append(None)
                continue
            out.append(unsharded)
        return out

    def _refuse(self, p: Tensor, why: str) -> None:
        raise MisconfigurationException(
            f"{self.owner!r}: the shared parameter `{self._names.get(id(p), '?')}` {why}, so its "
            "per-task gradients are not available under this sharding. Apply `fully_shard` to "
            "whole modules whose forward runs in `task_losses` (the trunk, each head, then the "
            "module), or use source='representation'."
        )


def gathered(param: Tensor) -> Tensor:
    """``param``, or for a ``DTensor`` its full (replicated) value whose gradient is averaged
    over the ranks of its mesh and then sharded back like ``param``: what DDP does for a
    replicated parameter, one all-gather forward and one reduce-scatter backward (``T`` floats)."""
    if not is_sharded(param):
        return param
    from torch.distributed.tensor import Partial, Replicate

    ndim = param.device_mesh.ndim
    full = param.redistribute(placements=[Replicate()] * ndim).to_local(
        grad_placements=[Partial("sum")] * ndim
    )
    size = param.device_mesh.size()
    if full.requires_grad:
        full.register_hook(lambda g: g / size)
    return full


def full_value(param: Tensor) -> Tensor:
    """The detached full value of ``param`` (an all-gather for a ``DTensor``: call it on every
    rank)."""
    if not is_sharded(param):
        return param.detach()
    with torch.no_grad():
        return param.full_tensor().detach()
