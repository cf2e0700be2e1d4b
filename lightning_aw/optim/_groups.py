"""Parameter groups of a multi-task model and optimizers built from a plain-dict spec.

A spec is a plain dict, so it fits YAML and ``save_hyperparameters``::

    {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01,
     "groups": {"shared": {"lr": 5e-4}, "task/*": {"weight_decay": 0.0}},
     "scheduler": {"name": "cosine", "interval": "step"}}

``name`` is a registered optimizer (:func:`~lightning_aw.optim.list_optimizers`) or a class path;
LightningCLI's spelling ``{"class_path": "torch.optim.AdamW", "init_args": {...}}`` works too.
The other top-level keys are the optimizer's keyword arguments, the defaults of every group.
``groups`` maps group names (or ``fnmatch`` patterns such as ``"task/*"``; patterns are applied
first, exact names last) to per-group overrides. ``scheduler`` is optional
(:func:`~lightning_aw.optim.create_scheduler`).
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_aw.optim._registry import (
    OptimizerInfo,
    _nearest,
    accepted_args,
    get_optimizer,
    resolve_optimizer,
)
from lightning_aw.optim._schedulers import create_scheduler, parse_scheduler_spec

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "DEFAULT_OPTIMIZER",
    "WEIGHTING_GROUP",
    "build_optimizers",
    "create_optimizer",
    "named_param_groups",
    "validate_optimizer_spec",
]

#: The spec used when a module is given none.
DEFAULT_OPTIMIZER: Mapping[str, Any] = {"name": "adam", "lr": 1e-3}
#: The name of the group of the weighting method's learnable parameters (never decayed).
WEIGHTING_GROUP = "weighting"
_SPEC_KEYS = ("name", "class_path", "init_args", "groups", "scheduler")
_WILDCARDS = frozenset("*?[")


# ---------------------------------------------------------------------------------- spec
def _plain(value: Any) -> Any:
    """A deep copy made of dicts, lists and scalars (e.g. from an OmegaConf DictConfig)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = [_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return copy.deepcopy(value)


def _split(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], Any]:
    """(name, optimizer kwargs, group overrides, scheduler spec) of a plain spec."""
    spec = dict(spec)
    if "class_path" in spec:
        if "name" in spec:
            raise ValueError("The optimizer spec has both `name` and `class_path`; give one.")
        init_args = spec.pop("init_args", None) or {}
        if not isinstance(init_args, Mapping):
            raise TypeError(
                f"`optimizer.init_args` should be a mapping. Found {type(init_args).__name__}."
            )
        clash = sorted(set(init_args) & set(spec))
        if clash:
            raise ValueError(f"The optimizer spec gives {clash} both in `init_args` and beside it.")
        spec = {"name": spec.pop("class_path"), **spec, **init_args}
    elif "init_args" in spec:
        raise ValueError("The optimizer spec has `init_args` without `class_path`.")
    name = spec.pop("name", DEFAULT_OPTIMIZER["name"])
    groups = spec.pop("groups", None) or {}
    scheduler = spec.pop("scheduler", None)
    return name, spec, groups, scheduler


def _check_args(
    label: str, accepted: tuple[str, ...] | None, given: Iterable[str], where: str
) -> None:
    if accepted is None:
        return
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        hints = "".join(_nearest(u, accepted) for u in unknown)
        raise ValueError(
            f"Optimizer {label} does not take argument(s) {unknown} (in `{where}`).{hints} "
            f"It accepts: {', '.join(accepted)}."
        )


#: Hyperparameters torch rejects when negative (checked when a spec is validated).
_NON_NEGATIVE = ("lr", "eps", "weight_decay", "momentum")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_values(kwargs: Mapping[str, Any], where: str) -> None:
    """Types and ranges torch would reject later: ``lr``, ``eps``, ``weight_decay`` and
    ``momentum`` >= 0, ``betas`` a pair in [0, 1). Messages start with the key's path."""
    for key in _NON_NEGATIVE:
        value = kwargs.get(key)
        if value is None or isinstance(value, (Tensor, tuple, list)):
            continue  # a tensor lr; Adafactor-style eps pairs: left to the optimizer
        if not _is_number(value):
            raise TypeError(f"{where}.{key}: expected a number >= 0, got {value!r}")
        if not value >= 0:  # also NaN
            raise ValueError(f"{where}.{key}: expected a number >= 0, got {value!r}")
    betas = kwargs.get("betas")
    if betas is None:
        return
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(map(_is_number, betas))):
        raise TypeError(f"{where}.betas: expected a pair of floats, got {betas!r}")
    if not all(0 <= b < 1 for b in betas):
        raise ValueError(f"{where}.betas: expected a pair of floats in [0, 1), got {betas!r}")


def validate_optimizer_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check an optimizer spec without building anything; return it as a plain deep copy.

    Checks the optimizer name, its arguments and the values torch would reject (``lr``,
    ``eps``, ``weight_decay``, ``momentum`` >= 0, ``betas`` a pair in [0, 1); also in the
    groups), the per-group overrides' arguments, that the
    ``weighting`` group gets no weight decay, and the scheduler (name, arguments, ``interval``,
    ``monitor``). Group names are checked against the model's groups when the optimizer is built.
    An optional package that is not installed is reported then too, so a module built from such a
    spec can still be created (e.g. to load a checkpoint for inference).

    Args:
        spec: the spec (see :mod:`lightning_aw.optim`); ``None`` gives :data:`DEFAULT_OPTIMIZER`.

    Returns:
        The spec as plain dicts and lists (OmegaConf containers converted).

    Raises:
        TypeError: if the spec or a part of it is not a mapping, or a value has the wrong type
            (``optimizer.betas: expected a pair of floats, got 0.9``).
        ValueError: for an unknown optimizer, argument, scheduler, a value out of range
            (``optimizer.lr: expected a number >= 0, got -1``), or a decayed weighting group.

    Example::

        >>> validate_optimizer_spec({"name": "adam", "lr": 0.01, "groups": {"shared": {"lr": 1}}})
        {'name': 'adam', 'lr': 0.01, 'groups': {'shared': {'lr': 1}}}
        >>> validate_optimizer_spec({"name": "adam", "betas2": 0.9})
        Traceback (most recent call last):
        ...
        ValueError: Optimizer 'adam' (Adam) does not take argument(s) ['betas2'] ...
    """
    if spec is None:
        return dict(DEFAULT_OPTIMIZER)
    if not isinstance(spec, Mapping):
        raise TypeError(
            "Parameter `optimizer` should be a mapping such as {'name': 'adam', 'lr': 1e-3}. "
            f"Found {type(spec).__name__}: {spec!r}."
        )
    plain = _plain(spec)
    name, kwargs, groups, scheduler = _split(plain)
    cls: type | None
    if isinstance(name, str) and "." not in name:
        info: OptimizerInfo | None = get_optimizer(name)
        cls = info.load() if info.available else None
    else:
        info, cls = resolve_optimizer(name)
    label = f"{name!r}" + (f" ({cls.__name__})" if cls is not None else "")
    accepted = accepted_args(cls) if cls is not None else None
    _check_args(label, accepted, kwargs, "optimizer")
    _check_values(kwargs, "optimizer")
    if not isinstance(groups, Mapping):
        raise TypeError(
            "`optimizer.groups` should map group names to overrides, e.g. "
            f"{{'shared': {{'lr': 5e-4}}}}. Found {type(groups).__name__}: {groups!r}."
        )
    for group, override in groups.items():
        where = f"optimizer.groups.{group}"
        if not isinstance(override, Mapping):
            raise TypeError(
                f"`{where}` should be a mapping of hyperparameters such as {{'lr': 5e-4}}. "
                f"Found {type(override).__name__}: {override!r}."
            )
        reserved = sorted(set(override) & {"params", "name"})
        if reserved:
            raise ValueError(
                f"`{where}` sets {reserved}; a group's parameters and name come from the model."
            )
        _check_args(label, accepted, override, where)
        _check_values(override, where)
        if _matches(group, WEIGHTING_GROUP) and override.get("weight_decay", 0):
            raise ValueError(
                f"`{where}` sets weight_decay={override['weight_decay']!r}, but the weighting "
                "method's learnable parameters must not be decayed (it would pull them towards "
                "0, i.e. towards fixed weights). Remove it; the weighting group always gets "
                "weight_decay=0."
            )
    if scheduler is not None:
        parse_scheduler_spec(scheduler, "optimizer.scheduler")
    return plain


def _matches(key: str, group: str) -> bool:
    if _WILDCARDS & set(key):
        return fnmatch.fnmatchcase(group, key)
    return key == group


# ---------------------------------------------------------------------------------- groups
def _overrides(module: nn.Module, hook: str) -> bool:
    """Whether ``module`` implements ``hook`` itself (not MultiTaskModule's default)."""
    fn = getattr(type(module), hook, None)
    # MultiTaskModule's default, recognised by name: lightning_aw.module imports this package
    default = (
        getattr(fn, "__module__", None) == "lightning_aw.module"
        and getattr(fn, "__qualname__", None) == f"MultiTaskModule.{hook}"
    )
    return fn is not None and not default


def named_param_groups(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of a multi-task module, in named, disjoint groups.

    - ``shared``: :meth:`~lightning_aw.MultiTaskModule.shared_parameters`, when implemented;
    - ``task/<name>``: each task's entry of
      :meth:`~lightning_aw.MultiTaskModule.task_parameters`, when implemented;
    - ``other``: the remaining trainable parameters of the module;
    - ``weighting``: the weighting callback's learnable parameters
      (:meth:`~lightning_aw.MultiTaskModule.weighting_parameters`).

    Every trainable parameter is in exactly one group; frozen parameters
    (``requires_grad=False``) are left out, and so are empty groups.

    Args:
        module: a :class:`~lightning_aw.MultiTaskModule` (any ``nn.Module`` works: its
            parameters all go to ``other``).

    Returns:
        Group name to parameters, in the order above (tasks in ``module.tasks`` order).

    Raises:
        MisconfigurationException: when a parameter is returned by two hooks (the message names
            both groups and the parameter), or ``task_parameters`` names an unknown task.
        TypeError: when a hook returns something that is not a tensor.

    Example::

        >>> from torch import nn
        >>> from lightning_aw import MultiTaskModule
        >>> class Net(MultiTaskModule):
        ...     def __init__(self):
        ...         super().__init__(tasks=["a", "b"])
        ...         self.trunk = nn.Linear(3, 4)
        ...         self.head_a, self.head_b = nn.Linear(4, 1), nn.Linear(4, 1)
        ...         self.scale = nn.Parameter(torch.ones(()))
        ...     def shared_parameters(self):
        ...         return self.trunk.parameters()
        ...     def task_parameters(self):
        ...         return {"a": self.head_a.parameters(), "b": self.head_b.parameters()}
        >>> {name: len(ps) for name, ps in named_param_groups(Net()).items()}
        {'shared': 2, 'task/a': 2, 'task/b': 2, 'other': 1}
    """
    names = {id(p): n for n, p in module.named_parameters()}
    sources: list[tuple[str, str, Iterable[Any]]] = []
    if _overrides(module, "shared_parameters"):
        sources.append(("shared", "shared_parameters()", module.shared_parameters()))  # type: ignore[operator]
    task_hook = getattr(module, "task_parameters", None)
    if task_hook is not None:
        per_task = task_hook()
        if not isinstance(per_task, Mapping):
            raise TypeError(
                f"{type(module).__name__}.task_parameters() should return a dict of task name -> "
                f"parameters. It returned a {type(per_task).__name__}."
            )
        tasks = list(getattr(module, "tasks", ()))
        unknown = [t for t in per_task if t not in tasks]
        if unknown:
            raise MisconfigurationException(
                f"{type(module).__name__}.task_parameters() names unknown task(s) {unknown}."
                f"{_nearest(str(unknown[0]), tasks)} The tasks are {tasks}."
            )
        for t in tasks:
            if t in per_task:
                sources.append((f"task/{t}", f"task_parameters()[{t!r}]", per_task[t]))
    weighting_hook = getattr(module, "weighting_parameters", None)
    if weighting_hook is not None:
        sources.append((WEIGHTING_GROUP, "weighting_parameters()", weighting_hook()))

    owner: dict[int, tuple[str, str]] = {}
    groups: dict[str, list[nn.Parameter]] = {}
    for group, origin, params in sources:
        members: list[nn.Parameter] = []
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"{type(module).__name__}.{origin} should yield parameters; it yielded a "
                    f"{type(p).__name__}."
                )
            if not p.requires_grad:
                continue
            seen = owner.get(id(p))
            if seen is not None:
                if seen[0] == group:
                    continue  # the same hook returned it twice (e.g. tied weights)
                pname = names.get(id(p), f"<unnamed parameter of shape {tuple(p.shape)}>")
                raise MisconfigurationException(
                    f"The parameter `{pname}` is in two optimizer groups: {seen[0]!r} (from "
                    f"{seen[1]}) and {group!r} (from {origin}). Every parameter must belong to "
                    f"one group: return it from only one of {type(module).__name__}'s hooks."
                )
            owner[id(p)] = (group, origin)
            members.append(p)  # type: ignore[arg-type]
        groups[group] = members
    other = [p for p in module.parameters() if p.requires_grad and id(p) not in owner]
    ordered = {k: v for k, v in groups.items() if k != WEIGHTING_GROUP}
    ordered["other"] = other
    ordered[WEIGHTING_GROUP] = groups.get(WEIGHTING_GROUP, [])
    return {k: v for k, v in ordered.items() if v}


def _group_dicts(module: nn.Module) -> list[dict[str, Any]]:
    dicts = []
    for name, params in named_param_groups(module).items():
        group: dict[str, Any] = {"params": params, "name": name}
        if name == WEIGHTING_GROUP:
            lr = getattr(getattr(module, "weighting", None), "lr", None)
            if lr is not None:
                group["lr"] = lr
                group["_lr_from"] = f"{module.weighting!r}.lr"  # type: ignore[union-attr]
        dicts.append(group)
    return dicts


# ---------------------------------------------------------------------------------- factory
def create_optimizer(
    module_or_params: nn.Module | Iterable[Any], spec: Mapping[str, Any] | None
) -> torch.optim.Optimizer:
    """Build an optimizer from a spec, with per-group overrides.

    Args:
        module_or_params: a module (a :class:`~lightning_aw.MultiTaskModule` gets the groups of
            :func:`named_param_groups`, any other module one ``other`` group), or parameters /
            parameter-group dicts as for any torch optimizer (a group is addressed by its
            ``"name"`` key).
        spec: ``{"name": ..., <optimizer kwargs>, "groups": {...}}`` (see
            :mod:`lightning_aw.optim`; a ``scheduler`` entry is ignored here: use
            :func:`build_optimizers`). ``None``: :data:`DEFAULT_OPTIMIZER`.

    Returns:
        The optimizer, its group names in ``param_groups[i]["name"]``. Optimizers with
        train/eval modes (schedule-free) are put in train mode.

    Raises:
        ValueError: for an unknown optimizer, argument or group name (with the nearest name and
            the list), a decayed ``weighting`` group, a ``weighting`` learning rate set both by
            the callback and the spec, group learning rates for an optimizer that takes one
            (``per_group_lr=False``, e.g. Prodigy), or no trainable parameter.
        ModuleNotFoundError: when the optimizer's optional package is not installed.

    Example::

        >>> net = torch.nn.Linear(2, 1)
        >>> spec = {"name": "adamw", "lr": 0.1, "groups": {"other": {"lr": 0.2}}}
        >>> opt = create_optimizer(net, spec)
        >>> type(opt).__name__, opt.param_groups[0]["name"], opt.param_groups[0]["lr"]
        ('AdamW', 'other', 0.2)
        >>> create_optimizer(net.parameters(), {"name": "adamm"})
        Traceback (most recent call last):
        ...
        ValueError: Unknown optimizer 'adamm'. Did you mean 'adam'? ...
    """
    plain = validate_optimizer_spec(spec)
    name, kwargs, overrides, _ = _split(plain)
    info, cls = resolve_optimizer(name)
    if isinstance(module_or_params, nn.Module):
        groups = _group_dicts(module_or_params)
    elif isinstance(module_or_params, Tensor):
        raise TypeError(
            "Parameter `module_or_params` should be a module or an iterable of parameters or "
            "parameter-group dicts; found a single tensor. Pass `[tensor]`."
        )
    else:
        items = list(module_or_params)
        if all(isinstance(g, Mapping) for g in items):
            groups = []
            for i, g in enumerate(items):
                if "params" not in g:
                    raise ValueError(f"Parameter group {i} has no 'params' entry: {dict(g)!r}.")
                params = g["params"]
                groups.append(
                    {**g, "params": [params] if isinstance(params, Tensor) else list(params)}
                )
        elif all(isinstance(g, Tensor) for g in items):
            groups = [{"params": items}]
        else:
            raise TypeError(
                "Parameter `module_or_params` should be a module, parameters, or parameter-group "
                "dicts; found a mix of "
                f"{sorted({type(g).__name__ for g in items})}."
            )
    if not any(len(list(g["params"])) for g in groups):
        raise ValueError("No trainable parameter to optimize: every parameter is frozen.")
    _apply_overrides(groups, overrides)
    if info is not None and not info.per_group_lr:
        _check_one_lr(info, cls, groups, kwargs)
    accepted = accepted_args(cls)
    takes_decay = accepted is None or "weight_decay" in accepted
    for group in groups:
        group.pop("_lr_from", None)
        if group.get("name") == WEIGHTING_GROUP and takes_decay:
            if group.get("weight_decay", 0):
                raise ValueError(
                    f"The weighting group has weight_decay={group['weight_decay']!r}; the "
                    "weighting method's learnable parameters must not be decayed."
                )
            group["weight_decay"] = 0.0
    optimizer = cls(groups, **kwargs)
    if info is not None and info.train_eval_modes:
        optimizer.train()  # type: ignore[attr-defined]
    return optimizer


def _check_one_lr(
    info: OptimizerInfo, cls: type, groups: list[dict[str, Any]], kwargs: Mapping[str, Any]
) -> None:
    param = inspect.signature(cls.__init__).parameters.get("lr")
    default = kwargs.get("lr", None if param is None else param.default)
    differ = {
        g.get("name", f"group{i}"): (g["lr"], g.get("_lr_from") or "optimizer.groups")
        for i, g in enumerate(groups)
        if "lr" in g and g["lr"] != default
    }
    if differ:
        detail = ", ".join(f"{n!r}: lr={lr!r} (from {src})" for n, (lr, src) in differ.items())
        raise ValueError(
            f"Optimizer {info.name!r} takes one learning rate for all parameter groups "
            f"(lr={default!r}), but groups set others: {detail}. Remove those group learning "
            "rates (for a weighting callback: leave its `lr` unset)."
        )


def _apply_overrides(groups: list[dict[str, Any]], overrides: Mapping[str, Any]) -> None:
    names = [g.get("name") for g in groups]
    known = [n for n in names if n is not None]
    for key in overrides:
        if not any(n is not None and _matches(key, n) for n in names):
            raise ValueError(
                f"`optimizer.groups` names {key!r}, but no parameter group "
                f"{'matches it' if _WILDCARDS & set(key) else 'has that name'}."
                f"{_nearest(key, known)} The groups are: {', '.join(map(repr, known)) or 'none'}."
            )
    ordered = [k for k in overrides if _WILDCARDS & set(k)] + [
        k for k in overrides if not _WILDCARDS & set(k)
    ]
    for key in ordered:
        override = overrides[key]
        for group in groups:
            name = group.get("name")
            if name is None or not _matches(key, name):
                continue
            source = group.get("_lr_from")
            if source is not None and "lr" in override and override["lr"] != group["lr"]:
                raise ValueError(
                    f"The weighting group's learning rate is set twice: {source} = "
                    f"{group['lr']!r} and `optimizer.groups.{key}.lr` = {override['lr']!r}. "
                    "Keep one of them."
                )
            group.update(override)


def build_optimizers(module: nn.Module, spec: Mapping[str, Any] | None) -> Any:
    """What ``configure_optimizers`` returns for ``spec``: the optimizer of
    :func:`create_optimizer`, and with a ``scheduler`` entry Lightning's dict
    ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "interval": ..., ...}}``.

    Args:
        module: the LightningModule (its Trainer, when attached, gives the run's length to
            schedulers that need it).
        spec: the optimizer spec (see :mod:`lightning_aw.optim`).

    Raises:
        ValueError: see :func:`create_optimizer` and :func:`create_scheduler`.

    Example::

        >>> cfg = build_optimizers(torch.nn.Linear(2, 1), {
        ...     "name": "sgd", "lr": 0.1,
        ...     "scheduler": {"name": "exponential", "gamma": 0.9, "interval": "step"}})
        >>> type(cfg["optimizer"]).__name__, cfg["lr_scheduler"]["interval"]
        ('SGD', 'step')
    """
    plain = validate_optimizer_spec(spec)
    optimizer = create_optimizer(module, plain)
    scheduler = plain.get("scheduler")
    if scheduler is None:
        return optimizer
    trainer: pl.Trainer | None = getattr(module, "_trainer", None)
    return {"optimizer": optimizer, "lr_scheduler": create_scheduler(optimizer, scheduler, trainer)}
