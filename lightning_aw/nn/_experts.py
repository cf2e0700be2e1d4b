"""Gated mixtures of experts for multi-task learning: MMoE, CGC and PLE."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_aw.nn._gate import Gate, GatedBlock, _check_positive, _check_top_k

__all__ = ["CGC", "PLE", "MMoE"]


def _tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"Parameter `tasks` should be a non-empty list of names. Found {tasks!r}.")
    for t in tasks:
        if not isinstance(t, str) or not t or "." in t or "/" in t:
            raise ValueError(
                f"Task name {t!r} is invalid here: a non-empty string without '.' or '/'."
            )
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"Parameter `tasks` has duplicate names: {list(tasks)}.")
    return tuple(tasks)


def _build(factory: Callable[..., nn.Module], *args: int) -> nn.Module:
    module = factory(*args)
    if not isinstance(module, nn.Module):
        raise TypeError(
            "Parameter `expert` should be a factory returning an nn.Module (a new one per call, "
            f"e.g. `lambda: nn.Linear(8, 16)`). It returned {type(module).__name__}."
        )
    return module


def _mix(gates: Tensor, outputs: Tensor) -> Tensor:
    """``Σ_e gates[:, e] · outputs[:, e]`` for expert outputs ``[B, E, ...]``."""
    shape = gates.shape + (1,) * (outputs.ndim - 2)
    return (gates.to(outputs.dtype).view(shape) * outputs).sum(1)


def _run(experts: Sequence[nn.Module], x: Tensor, what: str) -> Tensor:
    outs = [e(x) for e in experts]
    first = outs[0].shape
    for i, o in enumerate(outs):
        if o.shape != first or o.shape[0] != x.shape[0]:
            raise ValueError(
                f"The {what} experts should all map the batch of {x.shape[0]} to the same shape; "
                f"expert 0 gave {tuple(first)}, expert {i} gave {tuple(o.shape)}."
            )
    return torch.stack(outs, dim=1)


class MMoE(GatedBlock):
    r"""Multi-gate Mixture-of-Experts (Ma et al., "Modeling Task Relationships in Multi-task
    Learning with Multi-gate Mixture-of-Experts", KDD 2018, https://doi.org/10.1145/3219819.3220007).

    ``num_experts`` experts shared by all tasks and one softmax gate per task:

    .. math::

        f^k(x) = \sum_{i=1}^{n} g^k(x)_i\, f_i(x),\qquad g^k(x) = \mathrm{softmax}(W_{gk}\, x)

    The gate of each task is ``Linear(input_dim, num_experts)`` on the *flattened* input (with a
    bias; the paper's :math:`W_{gk}` plus an offset), so ``input_dim`` is the number of features
    of one sample once flattened; the experts receive the input as it is (any shape their module
    accepts) and must all return the same shape ``[B, ...]``. With ``top_k`` the gates are sparse
    (:func:`~lightning_aw.nn.route`). A one-gate mixture (OMoE, the paper's baseline) is
    ``MMoE(..., tasks=["all"])`` with every tower reading ``out["all"]``.

    The experts are shared by the tasks, the gates belong to one task each: for the gradient
    methods, return ``block.shared_parameters()`` (the experts, plus your trunk below the block,
    if any) from :meth:`MultiTaskModule.shared_parameters`, and put each task's gate with its
    tower in :meth:`MultiTaskModule.task_parameters` (``block.task_parameters(task)``).

    Args:
        input_dim: the flattened input size (the gates' input).
        expert: a zero-argument factory returning a new expert module on each call.
        num_experts: the number of experts.
        tasks: the task names (one gate each).
        top_k: ``None`` (dense gates) or the number of experts kept per sample and task.
        balance: give every gate a selection bias for
            :class:`~lightning_aw.nn.AuxFreeBalancing` (needs ``top_k``).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> block = MMoE(8, lambda: nn.Linear(8, 4), num_experts=3, tasks=["a", "b"])
        >>> out = block(torch.randn(5, 8))
        >>> {t: tuple(v.shape) for t, v in out.items()}
        {'a': (5, 4), 'b': (5, 4)}
        >>> round(float(block.gate_weights["a"].sum()), 6)  # the mean gate sums to 1
        1.0
    """

    def __init__(
        self,
        input_dim: int,
        expert: Callable[[], nn.Module],
        num_experts: int,
        tasks: Sequence[str],
        *,
        top_k: int | None = None,
        balance: bool = False,
    ) -> None:
        super().__init__()
        _check_positive("input_dim", input_dim)
        _check_positive("num_experts", num_experts)
        _check_top_k(top_k, num_experts)
        self.tasks = _tasks(tasks)
        self.input_dim = input_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.experts = nn.ModuleList(_build(expert) for _ in range(num_experts))
        self.gate = nn.ModuleDict(
            {t: Gate(input_dim, num_experts, top_k, balance) for t in self.tasks}
        )

    def gates(self) -> dict[str, Gate]:
        return {t: self.gate[t] for t in self.tasks}  # type: ignore[misc]

    def expert_names(self, key: str) -> list[str]:
        return [str(i) for i in range(self.num_experts)]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The experts' parameters (used by every task)."""
        return list(self.experts.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The parameters of ``task``'s gate."""
        return list(self.gate[task].parameters())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs = _run(self.experts, x, "MMoE")
        return {t: _mix(self.gate[t](x), outputs) for t in self.tasks}


class _Level(nn.Module):
    """One extraction level of CGC/PLE: shared and task-specific experts, a gate per task over
    (its specific + the shared) experts and, if ``shared_gate``, a gate over all experts."""

    def __init__(
        self,
        in_dim: int,
        make: Callable[[], nn.Module],
        tasks: tuple[str, ...],
        num_shared: int,
        num_specific: int,
        top_k: int | None,
        balance: bool,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.num_shared = num_shared
        self.num_specific = num_specific
        self.shared = nn.ModuleList(_build(make) for _ in range(num_shared))
        self.specific = nn.ModuleDict(
            {t: nn.ModuleList(_build(make) for _ in range(num_specific)) for t in tasks}
        )
        per_task = num_specific + num_shared
        self.gate = nn.ModuleDict({t: Gate(in_dim, per_task, top_k, balance) for t in tasks})
        all_experts = num_shared + len(tasks) * num_specific
        self.shared_gate = (
            Gate(in_dim, all_experts, min(top_k, all_experts) if top_k else None, balance)
            if shared_gate
            else None
        )

    def forward(
        self, inputs: Mapping[str, Tensor], shared: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        common = _run(self.shared, shared, "shared") if self.num_shared else None
        own = {t: _run(self.specific[t], inputs[t], f"{t!r}") for t in self.tasks}  # type: ignore[arg-type]
        out = {}
        for t in self.tasks:
            outs = own[t] if common is None else torch.cat([own[t], common], dim=1)
            out[t] = _mix(self.gate[t](inputs[t]), outs)
        if self.shared_gate is None:
            return out, None
        parts = [own[t] for t in self.tasks] + ([] if common is None else [common])
        return out, _mix(self.shared_gate(shared), torch.cat(parts, dim=1))

    def names(self, key: str) -> list[str]:
        shared = [f"shared.{j}" for j in range(self.num_shared)]
        if key == "shared":
            return [f"{t}.{i}" for t in self.tasks for i in range(self.num_specific)] + shared
        return [f"{key}.{i}" for i in range(self.num_specific)] + shared


def _check_counts(num_shared: int, num_specific: int) -> None:
    for name, value in (("num_shared", num_shared), ("num_specific", num_specific)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Parameter `{name}` should be an int >= 0. Found {value!r}.")
    if num_specific < 1 and num_shared < 1:
        raise ValueError("CGC/PLE need at least one expert: num_shared + num_specific >= 1.")


class CGC(GatedBlock):
    r"""Customized Gate Control (Tang et al., "Progressive Layered Extraction (PLE): A Novel
    Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020,
    https://doi.org/10.1145/3383313.3412236): ``num_shared`` experts used by every task,
    ``num_specific`` experts per task, and one softmax gate per task over its own specific
    experts followed by the shared ones:

    .. math::

        g^k(x) = w^k(x)\, S^k(x),\qquad w^k(x) = \mathrm{softmax}(W^k_g\, x),\quad
        S^k(x) = [E^{k}_{1}, \dots, E^{k}_{m_k}, E^{s}_{1}, \dots, E^{s}_{m_s}]^\top

    Gates are ``Linear(input_dim, num_specific + num_shared)`` on the flattened input; gate
    ``<task>``'s experts are named ``<task>.<i>`` then ``shared.<j>``. :class:`PLE` stacks
    several such levels. Shared parameters (for gradient methods): :meth:`shared_parameters`
    (the shared experts); each task's own experts and gate: :meth:`task_parameters`.

    Args:
        input_dim: the flattened input size (the gates' input).
        expert: a zero-argument factory returning a new expert module on each call.
        tasks: the task names.
        num_shared: the number of shared experts (>= 0).
        num_specific: the number of experts of each task (>= 0; together >= 1).
        top_k: ``None`` (dense gates) or the number of experts kept per sample and gate.
        balance: give every gate a selection bias for :class:`~lightning_aw.nn.AuxFreeBalancing`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> block = CGC(6, lambda: nn.Linear(6, 4), tasks=["a", "b"], num_shared=2, num_specific=1)
        >>> tuple(block(torch.randn(3, 6))["b"].shape)
        (3, 4)
        >>> block.expert_names("b")
        ['b.0', 'shared.0', 'shared.1']
    """

    def __init__(
        self,
        input_dim: int,
        expert: Callable[[], nn.Module],
        tasks: Sequence[str],
        num_shared: int,
        num_specific: int,
        *,
        top_k: int | None = None,
        balance: bool = False,
    ) -> None:
        super().__init__()
        _check_positive("input_dim", input_dim)
        _check_counts(num_shared, num_specific)
        _check_top_k(top_k, num_shared + num_specific)
        self.tasks = _tasks(tasks)
        self.input_dim = input_dim
        self.level = _Level(
            input_dim, expert, self.tasks, num_shared, num_specific, top_k, balance, False
        )

    def gates(self) -> dict[str, Gate]:
        return {t: self.level.gate[t] for t in self.tasks}  # type: ignore[misc]

    def expert_names(self, key: str) -> list[str]:
        return self.level.names(key)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared experts' parameters."""
        return list(self.level.shared.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """``task``'s own experts and gate."""
        return [*self.level.specific[task].parameters(), *self.level.gate[task].parameters()]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.level({t: x for t in self.tasks}, x)[0]


class PLE(GatedBlock):
    r"""Progressive Layered Extraction (Tang et al., RecSys 2020,
    https://doi.org/10.1145/3383313.3412236): ``num_levels`` stacked :class:`CGC` levels.

    How the inputs flow: level 1's experts and gates all read the block's input ``x``. At level
    :math:`k > 1`, task :math:`t`'s specific experts and its gate read task :math:`t`'s output of
    level :math:`k-1`; the shared experts read the *shared* output of level :math:`k-1`, which is
    the mixture of **all** experts of that level (own and every task's) under a separate shared
    gate. The last level has no shared gate (nothing reads its output), as in the paper:

    .. math::

        g^{k,t}(x) = w^{k,t}(g^{k-1,t}(x))\, S^{k,t}(x),\qquad
        g^{k,s}(x) = w^{k,s}(g^{k-1,s}(x))\, S^{k,s}(x)

    Expert factories therefore need the input size: ``expert`` is called as ``expert(in_dim)``,
    with ``in_dim = input_dim`` at level 1 and ``hidden_dim`` above it. Every expert of a level
    below the last must return ``[B, hidden_dim]`` (flat: it feeds the next level's gates);
    the last level may return any shape. Gate keys: ``level<k>/<task>`` and ``level<k>/shared``
    (``k`` from 0; no ``shared`` at the last level); a task may therefore not be called
    ``shared``. Shared parameters (for gradient methods): :meth:`shared_parameters`, the shared
    experts and shared gates of every level.

    Args:
        input_dim: the flattened input size.
        expert: a factory ``expert(in_dim) -> nn.Module``, called once per expert.
        tasks: the task names.
        num_shared: shared experts per level.
        num_specific: experts per task and level.
        num_levels: the number of levels (>= 1; 1 is a CGC).
        hidden_dim: the experts' output size at the levels below the last (needed when
            ``num_levels > 1``).
        top_k: ``None`` (dense gates) or the number of experts kept per sample and gate.
        balance: give every gate a selection bias for :class:`~lightning_aw.nn.AuxFreeBalancing`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> block = PLE(6, lambda d: nn.Linear(d, 4), tasks=["a", "b"], num_shared=1,
        ...             num_specific=1, num_levels=2, hidden_dim=4)
        >>> tuple(block(torch.randn(3, 6))["a"].shape)
        (3, 4)
        >>> sorted(block.gates())
        ['level0/a', 'level0/b', 'level0/shared', 'level1/a', 'level1/b']
    """

    def __init__(
        self,
        input_dim: int,
        expert: Callable[[int], nn.Module],
        tasks: Sequence[str],
        num_shared: int,
        num_specific: int,
        num_levels: int = 2,
        *,
        hidden_dim: int | None = None,
        top_k: int | None = None,
        balance: bool = False,
    ) -> None:
        super().__init__()
        _check_positive("input_dim", input_dim)
        _check_positive("num_levels", num_levels)
        _check_counts(num_shared, num_specific)
        _check_top_k(top_k, num_shared + num_specific)
        self.tasks = _tasks(tasks)
        if "shared" in self.tasks:
            raise ValueError(
                "PLE names its shared gates `level<k>/shared`: rename the task 'shared'."
            )
        if num_levels > 1:
            if hidden_dim is None:
                raise ValueError(
                    "Parameter `hidden_dim` is needed with num_levels > 1: the size of the "
                    "experts' outputs that feed the next level."
                )
            _check_positive("hidden_dim", hidden_dim)
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.levels = nn.ModuleList()
        for k in range(num_levels):
            in_dim = input_dim if k == 0 else int(hidden_dim)  # type: ignore[arg-type]
            self.levels.append(
                _Level(
                    in_dim,
                    lambda d=in_dim: expert(d),
                    self.tasks,
                    num_shared,
                    num_specific,
                    top_k,
                    balance,
                    shared_gate=k < num_levels - 1,
                )
            )

    def gates(self) -> dict[str, Gate]:
        out: dict[str, Gate] = {}
        for k, level in enumerate(self.levels):
            for t in self.tasks:
                out[f"level{k}/{t}"] = level.gate[t]  # type: ignore[index]
            if level.shared_gate is not None:
                out[f"level{k}/shared"] = level.shared_gate  # type: ignore[assignment]
        return out

    def expert_names(self, key: str) -> list[str]:
        level, _, name = key.partition("/")
        return self.levels[int(level[len("level") :])].names(name)  # type: ignore[operator]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared experts and shared gates of every level."""
        out: list[nn.Parameter] = []
        for level in self.levels:
            out += list(level.shared.parameters())  # type: ignore[union-attr]
            if level.shared_gate is not None:
                out += list(level.shared_gate.parameters())  # type: ignore[union-attr]
        return out

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """``task``'s own experts and gates at every level."""
        out: list[nn.Parameter] = []
        for level in self.levels:
            out += [*level.specific[task].parameters(), *level.gate[task].parameters()]  # type: ignore[index]
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        inputs: dict[str, Tensor] = {t: x for t in self.tasks}
        shared: Tensor | None = x
        for k, level in enumerate(self.levels):
            inputs, shared = level(inputs, shared)
            if k < len(self.levels) - 1 and self.hidden_dim is not None:
                for name, h in [*inputs.items(), ("shared", shared)]:
                    if h is None or h.reshape(h.shape[0], -1).shape[1] != self.hidden_dim:
                        raise ValueError(
                            f"PLE level {k}'s experts should return [B, hidden_dim="
                            f"{self.hidden_dim}] (they feed level {k + 1}); the '{name}' "
                            f"output has shape {None if h is None else tuple(h.shape)}."
                        )
        return inputs
