"""Small internal helpers shared by the callbacks (no public API)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


def check_number(
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a float when it is a finite real number (not a bool) in the interval from
    ``low`` to ``high`` (closed ends unless ``open_low`` / ``open_high``); else a ``ValueError``
    naming the parameter and the interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if open_low else low <= value)
    ok = ok and (value < high if open_high else value <= high)
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}"
        if high != math.inf:
            bound += f" and {'<' if open_high else '<='} {high}"
        raise ValueError(f"Parameter `{name}` should be a finite number {bound}. Found {value!r}.")
    return float(value)


def all_reduce_sum(trainer: pl.Trainer | None, *tensors: Tensor) -> list[Tensor]:
    """Sum each tensor over the ranks in ONE all-reduce (identity on one process).

    The tensors are packed into one flat buffer (of the first one's dtype and device), reduced,
    and unpacked into new tensors of the original shapes.
    """
    if trainer is None or trainer.world_size <= 1:
        return list(tensors)
    first = tensors[0]
    flat = torch.cat([t.reshape(-1).to(first) for t in tensors])
    flat = trainer.strategy.reduce(flat, reduce_op="sum")
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


def reduce_sum(trainer: pl.Trainer | None, x: Tensor) -> Tensor:
    """All-reduce ``x`` by sum over the ranks (identity on one process)."""
    return all_reduce_sum(trainer, x)[0]


class Stateful:
    """The one state protocol of the helpers a method keeps as state (optimizer moments, random
    generators, weight transforms, counters): ``state_dict`` / ``load_state_dict`` of plain
    tensors and numbers (a ``weights_only`` checkpoint loads them) and ``to(device)``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def to(self, device: torch.device) -> None:
        """Move tensors to ``device`` (in place)."""


def grad_scaler(trainer: pl.Trainer) -> Any | None:
    """The GradScaler of Lightning's fp16 mixed precision plugin, or ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def scaler_found_inf(scaler: Any, optimizer: Any) -> Tensor | None:
    """The GradScaler's inf/NaN flag for ``optimizer`` after ``unscale_`` (a 0-d tensor, > 0 when
    the coming ``scaler.step`` will skip the optimizer step), or ``None`` when the scaler has not
    unscaled this optimizer's gradients (an optimizer that unscales itself, or a torch version
    whose GradScaler keeps the flag elsewhere)."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict) or id(optimizer) not in states:
        return None
    found = states[id(optimizer)].get("found_inf_per_device", {})
    if not found:
        return None
    flags = [f.to(torch.float32).reshape(()) for f in found.values()]
    first = flags[0]
    return sum((f.to(first.device) for f in flags[1:]), first)


class AdamState(Stateful):
    """Bias-corrected Adam (Kingma & Ba, 2015) for a small tensor owned by a callback.

    Used for weighting parameters that must not live in the user's optimizer (GradNorm's weights,
    FAMO's logits). The state is plain tensors so it round-trips through a ``weights_only``
    checkpoint.
    """

    def __init__(
        self,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avg: Tensor | None = None
        self.exp_avg_sq: Tensor | None = None
        self.step: Tensor | None = None

    def update(self, param: Tensor, grad: Tensor) -> Tensor:
        """Return the parameter after one Adam step; non-finite gradients leave it unchanged."""
        finite = torch.isfinite(grad).all()
        grad = torch.where(finite, grad, torch.zeros_like(grad))
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if self.exp_avg is None or self.exp_avg_sq is None or self.step is None:
            self.exp_avg = torch.zeros_like(param)
            self.exp_avg_sq = torch.zeros_like(param)
            self.step = torch.zeros((), dtype=param.dtype, device=param.device)
        b1, b2 = self.betas
        new_avg = torch.lerp(self.exp_avg, grad, 1 - b1)
        new_sq = torch.lerp(self.exp_avg_sq, grad * grad, 1 - b2)
        # a skipped (non-finite) step leaves the moments untouched as well
        self.exp_avg = torch.where(finite, new_avg, self.exp_avg)
        self.exp_avg_sq = torch.where(finite, new_sq, self.exp_avg_sq)
        self.step = self.step + finite.to(self.step.dtype)
        step = self.step.clamp_min(1.0)
        bias1 = 1 - b1**step
        bias2 = 1 - b2**step
        delta = self.lr * (self.exp_avg / bias1) / ((self.exp_avg_sq / bias2).sqrt() + self.eps)
        return torch.where(finite, param - delta, param)

    def to(self, device: torch.device) -> None:
        if self.exp_avg is not None and self.exp_avg_sq is not None and self.step is not None:
            self.exp_avg = self.exp_avg.to(device)
            self.exp_avg_sq = self.exp_avg_sq.to(device)
            self.step = self.step.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exp_avg = state["exp_avg"]
        self.exp_avg_sq = state["exp_avg_sq"]
        self.step = state["step"]


class GeneratorState(Stateful):
    """A seeded CPU ``torch.Generator`` whose state goes through ``state_dict`` (a ByteTensor).

    Seeded identically on every DDP rank, it draws identical numbers everywhere; saved in the
    callback's checkpoint state, a resumed run draws what the uninterrupted run would have.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator(device="cpu")
        if seed is not None:
            self.generator.manual_seed(seed)

    def manual_seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def to(self, device: torch.device) -> None:
        """The generator stays on the CPU; draws are moved to the device that needs them."""

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"].cpu())
