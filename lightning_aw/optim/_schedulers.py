"""Learning-rate schedulers from a spec, returned in Lightning's ``lr_scheduler`` dict format.

Example::

    >>> import torch
    >>> from lightning_aw.optim import create_scheduler
    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    >>> config = create_scheduler(opt, {"name": "step", "step_size": 2, "gamma": 0.5})
    >>> type(config["scheduler"]).__name__, config["interval"], config["frequency"]
    ('StepLR', 'epoch', 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lightning_aw._introspect import init_args as signature_args
from lightning_aw.optim._registry import _nearest, accepted_args, import_class

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["SCHEDULERS", "SchedulerInfo", "create_scheduler", "list_schedulers"]

#: Keys of a scheduler spec that configure Lightning, not the scheduler's constructor.
_LIGHTNING_KEYS = ("interval", "frequency", "monitor", "strict")


@dataclass(frozen=True)
class SchedulerInfo:
    """A learning-rate scheduler known by a short name.

    Args:
        name: the short name used in specs (``"cosine"``).
        path: the dotted import path of the class.
        interval: the default ``interval`` (``"epoch"`` or ``"step"``).
        length_arg: the constructor argument for the schedule's length, filled in from the
            Trainer when the spec leaves it out (``trainer.estimated_stepping_batches`` for
            ``interval="step"``, ``trainer.max_epochs`` for ``"epoch"``, divided by
            ``frequency``).
        needs_monitor: whether the spec must name the metric to watch (``monitor``).

    Example::

        >>> SCHEDULERS["cosine"].length_arg
        'T_max'
    """

    name: str
    path: str
    interval: str = "epoch"
    length_arg: str | None = None
    needs_monitor: bool = False


_S = "torch.optim.lr_scheduler."
#: The schedulers known by short name.
SCHEDULERS: dict[str, SchedulerInfo] = {
    info.name: info
    for info in (
        SchedulerInfo("step", _S + "StepLR"),
        SchedulerInfo("multistep", _S + "MultiStepLR"),
        SchedulerInfo("exponential", _S + "ExponentialLR"),
        SchedulerInfo("cosine", _S + "CosineAnnealingLR", length_arg="T_max"),
        SchedulerInfo("cosine_restarts", _S + "CosineAnnealingWarmRestarts"),
        SchedulerInfo("onecycle", _S + "OneCycleLR", interval="step", length_arg="total_steps"),
        SchedulerInfo("cyclic", _S + "CyclicLR", interval="step"),
        SchedulerInfo("linear", _S + "LinearLR"),
        SchedulerInfo("constant", _S + "ConstantLR"),
        SchedulerInfo("polynomial", _S + "PolynomialLR"),
        SchedulerInfo("plateau", _S + "ReduceLROnPlateau", needs_monitor=True),
    )
}


def list_schedulers() -> list[str]:
    """The short names of the known schedulers, sorted.

    Example::

        >>> list_schedulers()[:3]
        ['constant', 'cosine', 'cosine_restarts']
    """
    return sorted(SCHEDULERS)


@dataclass(frozen=True)
class _ParsedScheduler:
    info: SchedulerInfo | None
    cls: type
    kwargs: dict[str, Any]
    interval: str
    frequency: int
    monitor: str | None
    strict: bool


def parse_scheduler_spec(spec: Mapping[str, Any], where: str = "scheduler") -> _ParsedScheduler:
    """Check a scheduler spec and split it; errors name ``where`` (the spec's path)."""
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"`{where}` should be a mapping such as {{'name': 'cosine', 'T_max': 100}}. "
            f"Found {type(spec).__name__}: {spec!r}."
        )
    spec = dict(spec)
    if "class_path" in spec:
        if "name" in spec:
            raise ValueError(f"`{where}` has both `name` and `class_path`; give one of them.")
        init_args = spec.pop("init_args", None) or {}
        if not isinstance(init_args, Mapping):
            raise TypeError(f"`{where}.init_args` should be a mapping. Found {init_args!r}.")
        clash = sorted(set(init_args) & set(spec))
        if clash:
            raise ValueError(f"`{where}` gives {clash} both in `init_args` and beside it.")
        spec = {"name": spec.pop("class_path"), **spec, **init_args}
    if "name" not in spec:
        raise ValueError(
            f"`{where}` has no `name`: give a short name ({', '.join(list_schedulers())}) or a "
            "class path such as 'torch.optim.lr_scheduler.StepLR'."
        )
    name = spec.pop("name")
    info: SchedulerInfo | None
    if not isinstance(name, str) or not name:
        raise ValueError(f"`{where}.name` should be a non-empty string. Found {name!r}.")
    if "." in name:
        info = next((i for i in SCHEDULERS.values() if i.path == name), None)
        cls = import_class(name, what=f"scheduler class {name!r} (`{where}.name`)")
        if not isinstance(cls, type):
            raise ValueError(f"`{where}.name` = {name!r} is not a class. Found {cls!r}.")
    else:
        info = SCHEDULERS.get(name.lower())
        if info is None:
            raise ValueError(
                f"Unknown scheduler {name!r} in `{where}.name`.{_nearest(name.lower(), SCHEDULERS)}"
                f" Known: {', '.join(list_schedulers())}; or give a class path such as "
                "'torch.optim.lr_scheduler.StepLR'."
            )
        cls = import_class(info.path, what=f"scheduler {info.name!r}")
    interval = spec.pop("interval", info.interval if info else "epoch")
    if interval not in ("step", "epoch"):
        raise ValueError(f"`{where}.interval` should be 'step' or 'epoch'. Found {interval!r}.")
    frequency = spec.pop("frequency", 1)
    if not isinstance(frequency, int) or isinstance(frequency, bool) or frequency < 1:
        raise ValueError(f"`{where}.frequency` should be an int >= 1. Found {frequency!r}.")
    monitor = spec.pop("monitor", None)
    if monitor is not None and not isinstance(monitor, str):
        raise ValueError(f"`{where}.monitor` should be a metric name. Found {monitor!r}.")
    needs_monitor = (info.needs_monitor if info else False) or issubclass(
        cls, torch.optim.lr_scheduler.ReduceLROnPlateau
    )
    if needs_monitor and not monitor:
        raise ValueError(
            f"The scheduler in `{where}` ({cls.__name__}) watches a metric: add `monitor`, the "
            "name of a logged metric such as 'val/loss/total'."
        )
    strict = spec.pop("strict", True)
    if not isinstance(strict, bool):
        raise ValueError(f"`{where}.strict` should be true or false. Found {strict!r}.")
    accepted = accepted_args(cls)
    if accepted is not None:
        unknown = sorted(set(spec) - set(accepted))
        if unknown:
            hints = "".join(_nearest(u, accepted) for u in unknown)
            raise ValueError(
                f"Scheduler {cls.__name__} (`{where}`) does not take argument(s) {unknown}.{hints}"
                f" It accepts: {', '.join(accepted)}; and Lightning's "
                f"{', '.join(_LIGHTNING_KEYS)}."
            )
        required = [
            n
            for n in signature_args(cls).required
            if n in accepted and n not in spec and not (info is not None and n == info.length_arg)
        ]
        if required:
            raise ValueError(
                f"Scheduler {cls.__name__} (`{where}`) needs argument(s) {required}; add them."
            )
    return _ParsedScheduler(info, cls, spec, interval, frequency, monitor, strict)


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    spec: Mapping[str, Any],
    trainer: pl.Trainer | None = None,
) -> dict[str, Any]:
    """Build a learning-rate scheduler from ``spec``, in Lightning's ``lr_scheduler`` format.

    ``spec`` holds ``name`` (a short name from :func:`list_schedulers` or a class path, or
    ``class_path`` with ``init_args``), the constructor's keyword arguments, and Lightning's
    ``interval`` (``"step"`` or ``"epoch"``; default ``"epoch"``, ``"step"`` for ``onecycle`` and
    ``cyclic``), ``frequency``, ``monitor`` (needed by ``plateau``) and ``strict``. Short names:
    ``step``, ``multistep``, ``exponential``, ``cosine``, ``cosine_restarts``, ``onecycle``,
    ``cyclic``, ``linear``, ``constant``, ``polynomial``, ``plateau``. ``cosine``'s ``T_max`` and
    ``onecycle``'s ``total_steps`` default to the run's length from ``trainer``.

    Args:
        optimizer: the optimizer to schedule.
        spec: the scheduler spec, e.g. ``{"name": "cosine", "T_max": 100, "interval": "step"}``.
        trainer: the Trainer, to fill in the schedule's length when the spec leaves it out.

    Returns:
        ``{"scheduler": ..., "interval": ..., "frequency": ..., "strict": ...}`` plus
        ``"monitor"`` when given.

    Raises:
        ValueError: for an unknown name or argument, a missing required argument or
            ``monitor``, a bad ``interval``/``frequency``, or a length that cannot be inferred.

    Example::

        >>> opt = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> cfg = create_scheduler(opt, {"name": "plateau", "monitor": "val/loss/total"})
        >>> cfg["monitor"], type(cfg["scheduler"]).__name__
        ('val/loss/total', 'ReduceLROnPlateau')
    """
    parsed = parse_scheduler_spec(spec)
    kwargs = dict(parsed.kwargs)
    info = parsed.info
    length_arg = info.length_arg if info is not None else None
    if (
        length_arg is not None
        and kwargs.get(length_arg) is None
        and not (length_arg == "total_steps" and kwargs.get("epochs") is not None)
    ):
        kwargs[length_arg] = _run_length(trainer, parsed, length_arg)
    config: dict[str, Any] = {
        "scheduler": parsed.cls(optimizer, **kwargs),
        "interval": parsed.interval,
        "frequency": parsed.frequency,
        "strict": parsed.strict,
    }
    if parsed.monitor is not None:
        config["monitor"] = parsed.monitor
    return config


def _run_length(trainer: pl.Trainer | None, parsed: _ParsedScheduler, arg: str) -> int:
    name = parsed.info.name if parsed.info is not None else parsed.cls.__name__
    cure = f"Give `{arg}` in the scheduler spec."
    if trainer is None:
        raise ValueError(
            f"Scheduler {name!r} needs `{arg}`, and there is no Trainer to infer "
            f"the run's length from. {cure}"
        )
    if parsed.interval == "step":
        total = float(trainer.estimated_stepping_batches)
    else:
        total = float(trainer.max_epochs if trainer.max_epochs is not None else -1)
    if not math.isfinite(total) or total <= 0:
        raise ValueError(
            f"Scheduler {name!r} needs `{arg}`, and the run's length is unknown (no max_steps / "
            f"max_epochs on the Trainer). {cure}"
        )
    return max(1, math.ceil(total / parsed.frequency))
