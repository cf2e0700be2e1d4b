"""Adaptive weights inside the network: gated mixtures of experts (MMoE, CGC, PLE), cross-stitch
units and MTAN task attention, with their load-balancing terms.

Plain :class:`torch.nn.Module` blocks for any backbone. Every block exposes the weights it
applied on the last batch (``gate_weights``), which :class:`~lightning_aw.monitor.GateMonitor`
logs to TensorBoard; :class:`AuxFreeBalancing` balances top-k gates without an auxiliary loss.
"""

from lightning_aw.nn._attention import CrossStitch, TaskAttention
from lightning_aw.nn._balancing import (
    AuxFreeBalancing,
    importance_loss,
    router_z_loss,
    switch_load_balancing_loss,
)
from lightning_aw.nn._experts import CGC, PLE, MMoE
from lightning_aw.nn._gate import Gate, GatedBlock, route

__all__ = [
    "CGC",
    "PLE",
    "AuxFreeBalancing",
    "CrossStitch",
    "Gate",
    "GatedBlock",
    "MMoE",
    "TaskAttention",
    "importance_loss",
    "route",
    "router_z_loss",
    "switch_load_balancing_loss",
]
