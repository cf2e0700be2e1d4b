"""Optimizer construction from a small spec: ``{"name": "adam", "lr": 1e-3, ...}``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["OPTIMIZERS", "create_optimizer"]

#: Built-in optimizers by name.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adadelta": torch.optim.Adadelta,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
}


def create_optimizer(params: Iterable[Any], spec: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Build an optimizer from ``spec``: ``name`` plus the optimizer's keyword arguments.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        spec: e.g. ``{"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}``.

    Raises:
        ValueError: for an unknown name (with the nearest known one) or an unknown argument.

    Example::

        >>> opt = create_optimizer(torch.nn.Linear(2, 1).parameters(), {"name": "adam", "lr": 0.1})
        >>> type(opt).__name__
        'Adam'
    """
    spec = dict(spec)
    name = str(spec.pop("name", "adam")).lower()
    if name not in OPTIMIZERS:
        near = difflib.get_close_matches(name, OPTIMIZERS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(
            f"Unknown optimizer {name!r} in the optimizer spec.{hint} "
            f"Known: {', '.join(sorted(OPTIMIZERS))}."
        )
    cls = OPTIMIZERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(spec) - accepted)
    if unknown:
        raise ValueError(
            f"Optimizer {name!r} does not take argument(s) {unknown}. "
            f"It accepts: {', '.join(sorted(accepted))}."
        )
    return cls(params, **spec)
