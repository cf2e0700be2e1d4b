"""`Gate` (a softmax router with optional top-k and balancing bias) and `GatedBlock` (what every
block with gates or attention exposes to the monitors)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Gate", "GatedBlock", "route"]


def _check_top_k(top_k: int | None, num_experts: int, what: str = "top_k") -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"Parameter `{what}` should be None or an int in [1, {num_experts}] (the number of "
            f"experts the gate spans). Found {top_k!r}."
        )


def route(logits: Tensor, top_k: int | None = None, bias: Tensor | None = None) -> Tensor:
    r"""Softmax gate values from router logits ``[..., E]``, optionally sparse.

    With ``top_k=None`` this is ``softmax(logits)``. With ``top_k=k`` only the ``k`` largest
    logits are kept and the softmax is taken over them (the others are exactly 0), as in the
    sparsely-gated mixture of experts (Shazeer et al., ICLR 2017, without the noise):

    .. math::

        G(x) = \mathrm{softmax}(\mathrm{KeepTopK}(h(x), k)),\qquad
        \mathrm{KeepTopK}(v, k)_i = v_i \text{ if } v_i \text{ is among the top } k
        \text{ of } v + b, \text{ else } -\infty.

    ``bias`` (``[E]``) shifts the logits for the *selection* only, never the values: the
    auxiliary-loss-free balancing of Wang et al. 2024 (:class:`~lightning_aw.nn.AuxFreeBalancing`).

    Example::

        >>> import torch
        >>> route(torch.tensor([[2.0, 1.0, 0.0]]), top_k=2)
        tensor([[0.7311, 0.2689, 0.0000]])
    """
    if top_k is None or top_k >= logits.shape[-1]:
        return torch.softmax(logits, dim=-1)
    select = logits if bias is None else logits + bias.to(logits.dtype)
    index = select.topk(top_k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, index, True)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


class Gate(nn.Module):
    r"""A softmax router: ``Linear(in_dim, num_experts)`` on the flattened input, then
    :func:`route` (dense softmax, or top-k).

    It keeps what the monitors and the balancing terms read, at no cost when nobody reads it:

    - :attr:`last`: the detached gate values ``[B, E]`` of the last forward (a reference, no copy,
      no host synchronisation), only while :attr:`record` is true (default; the
      :class:`~lightning_aw.monitor.GateMonitor` switches it on for Lightning's logging steps
      only and off between them);
    - :attr:`logits`: the router logits ``[B, E]`` of the last forward, *with* their graph, for
      the auxiliary losses (:func:`~lightning_aw.nn.router_z_loss`,
      :func:`~lightning_aw.nn.switch_load_balancing_loss`) added in ``task_losses``;
    - with ``balance=True`` (needs ``top_k``): the buffer ``balance_bias`` ``[E]`` (saved in the
      module's ``state_dict``, so checkpoints carry it) added to the logits for the top-k
      selection only, and the number of selections per expert since the last optimizer step
      (training mode only), which :class:`~lightning_aw.nn.AuxFreeBalancing` reads and resets.

    Args:
        in_dim: the flattened input size.
        num_experts: the number of experts the gate spans.
        top_k: ``None`` (dense softmax) or the number of experts kept per sample.
        balance: keep a selection bias for auxiliary-loss-free balancing.

    Raises:
        ValueError: an argument is out of range, or ``balance`` without ``top_k``.

    Example::

        >>> import torch
        >>> gate = Gate(4, num_experts=3, top_k=2, balance=True)
        >>> g = gate(torch.randn(5, 4))
        >>> (g > 0).sum(-1).tolist(), gate.last.shape, gate.balance_bias.tolist()
        ([2, 2, 2, 2, 2], torch.Size([5, 3]), [0.0, 0.0, 0.0])
    """

    def __init__(
        self, in_dim: int, num_experts: int, top_k: int | None = None, balance: bool = False
    ) -> None:
        super().__init__()
        _check_positive("in_dim", in_dim)
        _check_positive("num_experts", num_experts)
        _check_top_k(top_k, num_experts)
        if balance and (top_k is None or top_k >= num_experts):
            raise ValueError(
                "Parameter `balance=True` needs sparse gating: the bias only changes which "
                f"experts are selected. Set `top_k` below num_experts={num_experts} "
                f"(found top_k={top_k!r})."
            )
        self.in_dim = in_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.linear = nn.Linear(in_dim, num_experts)
        self.balance_bias: Tensor | None
        if balance:
            self.register_buffer("balance_bias", torch.zeros(num_experts))
        else:
            self.balance_bias = None
        #: whether the forward keeps the detached gate values in :attr:`last`
        self.record = True
        #: the detached gate values ``[B, E]`` of the last recorded forward (``None``: none)
        self.last: Tensor | None = None
        #: the router logits of the last forward, with their graph (``None`` before it)
        self.logits: Tensor | None = None
        self._load: Tensor | None = None  # selections per expert since the last reset

    def extra_repr(self) -> str:
        out = f"in_dim={self.in_dim}, num_experts={self.num_experts}"
        if self.top_k is not None:
            out += f", top_k={self.top_k}"
        if self.balance_bias is not None:
            out += ", balance=True"
        return out

    def __getstate__(self) -> dict[str, Any]:
        # the logits hold a graph (not deep-copyable); the rest is per-step scratch
        state = self.__dict__.copy()
        state["logits"] = state["last"] = state["_load"] = None
        return state

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.in_dim:
            raise ValueError(
                f"The gate expects inputs of {self.in_dim} features once flattened, but got "
                f"shape {tuple(x.shape)} ({flat.shape[1]} features). Pass the block's "
                "`input_dim` (or `hidden_dim`) matching its input."
            )
        logits = self.linear(flat)
        self.logits = logits
        gates = route(logits, self.top_k, self.balance_bias)
        self.last = gates.detach() if self.record else None
        if self.balance_bias is not None and self.training:
            load = (gates.detach() > 0).sum(0).to(self.balance_bias.dtype)
            self._load = load if self._load is None else self._load + load
        return gates

    def take_load(self) -> Tensor:
        """The selections per expert since the last call (``[E]``, zeros if none), and reset."""
        load = self._load
        self._load = None
        if load is None:
            ref = self.linear.weight
            return torch.zeros(self.num_experts, device=ref.device, dtype=torch.float32)
        return load


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Parameter `{name}` should be an int >= 1. Found {value!r}.")


class GatedBlock(nn.Module):
    """What every block with softmax gates exposes (:class:`~lightning_aw.nn.MMoE`,
    :class:`~lightning_aw.nn.CGC`, :class:`~lightning_aw.nn.PLE`); the
    :class:`~lightning_aw.monitor.GateMonitor` finds these blocks among the named modules.

    Subclasses fill :meth:`gates` (gate key -> :class:`Gate`) and :meth:`expert_names`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> class OneGate(GatedBlock):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.experts = nn.ModuleList(nn.Linear(3, 2) for _ in range(2))
        ...         self.gate = Gate(3, 2)
        ...     def gates(self):
        ...         return {"y": self.gate}
        ...     def expert_names(self, key):
        ...         return ["left", "right"]
        ...     def forward(self, x):
        ...         g = self.gate(x)
        ...         return {"y": g[:, :1] * self.experts[0](x) + g[:, 1:] * self.experts[1](x)}
        >>> block = OneGate()
        >>> _ = block(torch.randn(4, 3))
        >>> round(float(block.gate_weights["y"].sum()), 6)
        1.0
    """

    def gates(self) -> dict[str, Gate]:
        """The block's gates by key (a task name, or ``level<k>/<task>`` in PLE)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `gates()`.")

    def expert_names(self, key: str) -> list[str]:
        """The names of the experts gate ``key`` spans, in the order of its outputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement `expert_names()`.")

    @property
    def gate_weights(self) -> dict[str, Tensor]:
        """Per gate key, the mean gate value of every expert over the last recorded batch
        (``[E]``, float32; each sums to 1). Computed on access from the stored gates; empty
        before the first recorded forward."""
        return {k: g.last.float().mean(0) for k, g in self.gates().items() if g.last is not None}

    def record_gates(self, on: bool) -> None:
        """Switch recording of the gate values (:attr:`Gate.last`) on or off for every gate."""
        for g in self.gates().values():
            g.record = bool(on)
            if not on:
                g.last = None
