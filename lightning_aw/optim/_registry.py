"""The optimizer registry: one frozen :class:`OptimizerInfo` per optimizer, lazy optional packages.

Example::

    >>> from lightning_aw.optim import get_optimizer, list_optimizers
    >>> list_optimizers("ada*")
    ['adadelta', 'adagrad', 'adam', 'adamax', 'adamw', 'adamw_schedulefree']
    >>> info = get_optimizer("adamw")
    >>> info.load().__name__, info.adaptive, info.step_rule
    ('AdamW', True, 'adam')
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from lightning_aw._introspect import import_class, init_args, nearest

__all__ = [
    "STEP_RULES",
    "OptimizerInfo",
    "StepRule",
    "get_optimizer",
    "list_optimizers",
    "register_optimizer",
    "resolve_optimizer",
]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

#: How :class:`~lightning_aw.optim.AdaptiveStepMonitor` reads an optimizer's state.
StepRule = Literal["adam", "nadam", "radam", "adamax", "adagrad", "rmsprop", "adadelta"]

#: Per step rule, the per-parameter state keys the step-size formula reads (always present once
#: the parameter has taken a step; ``max_exp_avg_sq`` (Adam with ``amsgrad``) and ``grad_avg``
#: (centered RMSprop) are read in addition when the group asks for them).
STEP_RULES: dict[str, tuple[str, ...]] = {
    "adam": ("step", "exp_avg_sq"),
    "nadam": ("step", "mu_product", "exp_avg_sq"),
    "radam": ("step", "exp_avg_sq"),
    "adamax": ("step", "exp_inf"),
    "adagrad": ("step", "sum"),
    "rmsprop": ("square_avg",),
    "adadelta": ("square_avg", "acc_delta"),
}


@dataclass(frozen=True)
class OptimizerInfo:
    """What the library knows about one optimizer (a frozen record).

    Optional packages are named by import path (``"prodigyopt.Prodigy"``) and imported only when
    :meth:`load` is called, so the registry lists them with their metadata whether or not they
    are installed.

    Args:
        name: the registry name, lowercase letters, digits and ``_`` (e.g. ``"adamw"``).
        cls: the optimizer class, or its dotted import path (``"package.module.Class"``) for a
            lazily imported optional package.
        package: the ``pip install`` name of the package that provides ``cls`` (``None`` for
            torch's own optimizers).
        adaptive: whether the optimizer gives each parameter its own step size from its
            gradient history (Adam, AdaGrad, RMSprop, ...); ``False`` for SGD and sign methods
            such as Lion, whose per-coordinate step is the learning rate.
        step_rule: how :class:`~lightning_aw.optim.AdaptiveStepMonitor` computes the effective
            per-parameter step size from the state (one of :data:`STEP_RULES`), ``None`` when it
            cannot (the monitor warns once and skips the optimizer).
        state_keys: the state keys the step rule reads; default :data:`STEP_RULES` ``[step_rule]``.
        train_eval_modes: the optimizer has ``train()``/``eval()`` modes (schedule-free
            optimizers); :func:`~lightning_aw.optim.create_optimizer` puts it in train mode.
        per_group_lr: whether parameter groups may have different learning rates (``False``
            for Prodigy, which estimates one step size for all groups): with ``False``,
            :func:`~lightning_aw.optim.create_optimizer` rejects group learning rates that
            differ from the optimizer's.
        example_kwargs: keyword arguments of a small working example (the test suite trains a
            tiny model with each registered optimizer using them). Stored read-only.
        description: one line shown in listings.

    Raises:
        ValueError: for an invalid name, ``cls`` that is neither an optimizer class nor a dotted
            path, or an unknown ``step_rule``.

    Example::

        >>> info = OptimizerInfo(name="my_sgd", cls="torch.optim.SGD", adaptive=False)
        >>> info.load().__name__, info.available
        ('SGD', True)
        >>> "momentum" in info.accepted_args()
        True
    """

    name: str
    cls: type[torch.optim.Optimizer] | str
    package: str | None = None
    adaptive: bool = True
    step_rule: StepRule | None = None
    state_keys: tuple[str, ...] = ()
    train_eval_modes: bool = False
    per_group_lr: bool = True
    example_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                "Parameter `name` should be lowercase letters, digits and '_', starting with a "
                f"letter. Found {self.name!r}."
            )
        if isinstance(self.cls, str):
            if "." not in self.cls.strip("."):
                raise ValueError(
                    "Parameter `cls` should be an optimizer class or a dotted import path such "
                    f"as 'package.module.Class'. Found {self.cls!r}."
                )
        elif not (isinstance(self.cls, type) and issubclass(self.cls, torch.optim.Optimizer)):
            raise ValueError(
                "Parameter `cls` should be a subclass of torch.optim.Optimizer or a dotted "
                f"import path. Found {self.cls!r}."
            )
        if self.step_rule is not None and self.step_rule not in STEP_RULES:
            raise ValueError(
                f"Parameter `step_rule` should be one of {sorted(STEP_RULES)} or None. "
                f"Found {self.step_rule!r}."
            )
        if not self.state_keys and self.step_rule is not None:
            object.__setattr__(self, "state_keys", STEP_RULES[self.step_rule])
        object.__setattr__(self, "state_keys", tuple(self.state_keys))
        object.__setattr__(self, "example_kwargs", MappingProxyType(dict(self.example_kwargs)))

    @property
    def import_path(self) -> str:
        """The dotted import path of the class."""
        if isinstance(self.cls, str):
            return self.cls
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    @property
    def available(self) -> bool:
        """Whether the class can be imported (checked without importing the package)."""
        if not isinstance(self.cls, str):
            return True
        top = self.cls.split(".", 1)[0]
        try:
            return importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            return False

    def load(self) -> type[torch.optim.Optimizer]:
        """Import and return the optimizer class.

        Raises:
            ModuleNotFoundError: when the optional package is not installed (the message says
                what to ``pip install``).
            ImportError: when the module exists but has no such class.
        """
        if not isinstance(self.cls, str):
            return self.cls
        return import_class(self.cls, self.package, what=f"optimizer {self.name!r}")

    def accepted_args(self) -> tuple[str, ...] | None:
        """The keyword arguments the constructor accepts (besides ``params``), from its
        signature; ``None`` when it takes ``**kwargs`` (anything goes). Loads the class."""
        return accepted_args(self.load())


@functools.cache
def accepted_args(cls: type) -> tuple[str, ...] | None:
    """The keyword arguments of ``cls.__init__`` other than ``self``, ``params`` and
    ``optimizer`` (``None`` when it takes ``**kwargs`` it forwards out of sight)."""
    sig = init_args(cls)
    if sig.open:
        return None
    return tuple(n for n in sig.names if n not in ("params", "optimizer"))


_REGISTRY: dict[str, OptimizerInfo] = {}


def register_optimizer(
    info: OptimizerInfo | str,
    cls: type[torch.optim.Optimizer] | str | None = None,
    *,
    overwrite: bool = False,
    **fields: Any,
) -> OptimizerInfo:
    """Add an optimizer to the registry (and so to the test suite's tiny-Trainer run).

    Args:
        info: an :class:`OptimizerInfo`, or the name of a new entry built from ``cls`` and
            ``fields``.
        cls: the class or its dotted import path (only with a name).
        overwrite: replace an entry already registered under the same name.
        **fields: the other :class:`OptimizerInfo` fields (only with a name), e.g.
            ``adaptive=True, step_rule="adam", package="mypkg"``.

    Returns:
        The registered record.

    Raises:
        ValueError: if the name is taken and ``overwrite`` is False, if a name is given without
            ``cls``, or a record is given with ``cls`` or fields.

    Example::

        >>> info = register_optimizer("my_adam", "torch.optim.Adam", step_rule="adam")
        >>> get_optimizer("my_adam").load().__name__
        'Adam'
        >>> _ = _REGISTRY.pop("my_adam")  # (keep the doctest from changing the registry)
    """
    if isinstance(info, OptimizerInfo):
        if cls is not None or fields:
            raise ValueError(
                "register_optimizer takes either an OptimizerInfo, or a name with `cls` and "
                f"fields; found an OptimizerInfo together with cls={cls!r} / {sorted(fields)}."
            )
    elif isinstance(info, str):
        if cls is None:
            raise ValueError(
                f"Parameter `cls` is needed to register optimizer {info!r}: pass the class or "
                "its dotted import path."
            )
        info = OptimizerInfo(name=info, cls=cls, **fields)
    else:
        raise ValueError(f"Parameter `info` should be an OptimizerInfo or a name. Found {info!r}.")
    if info.name in _REGISTRY and not overwrite:
        raise ValueError(
            f"An optimizer named {info.name!r} is already registered "
            f"({_REGISTRY[info.name].import_path}). Choose another name, or pass "
            "`overwrite=True` to replace it."
        )
    _REGISTRY[info.name] = info
    return info


def list_optimizers(
    pattern: str | Sequence[str] | None = None, *, available: bool = False
) -> list[str]:
    """The sorted names of the registered optimizers, optionally filtered by wildcard patterns.

    Args:
        pattern: an ``fnmatch`` pattern (``"adam*"``) or a list of them (a name matching any is
            kept); ``None`` lists every optimizer. Matching ignores case.
        available: keep only the optimizers whose package is installed.

    Returns:
        The matching names, sorted.

    Example::

        >>> list_optimizers("*adam")
        ['adam', 'nadam', 'radam']
        >>> "sgd" in list_optimizers(available=True)
        True
    """
    names = sorted(_REGISTRY)
    if pattern is not None:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        names = [n for n in names if any(fnmatch.fnmatch(n, p.lower()) for p in patterns)]
    if available:
        names = [n for n in names if _REGISTRY[n].available]
    return names


def get_optimizer(name: str) -> OptimizerInfo:
    """The record of the optimizer registered as ``name`` (case-insensitive).

    Raises:
        ValueError: for an unknown name, with the nearest registered one and the full list.

    Example::

        >>> get_optimizer("RMSprop").step_rule
        'rmsprop'
    """
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown optimizer {name!r}.{_nearest(key, _REGISTRY)} "
            f"Registered: {', '.join(sorted(_REGISTRY))}; or give a class path "
            "such as 'torch.optim.SGD'."
        )
    return _REGISTRY[key]


def resolve_optimizer(name: str) -> tuple[OptimizerInfo | None, type[torch.optim.Optimizer]]:
    """The record (``None`` for a class path not in the registry) and class for a spec's name.

    Args:
        name: a registered name (``"adamw"``) or a dotted class path (``"torch.optim.AdamW"``,
            ``"mypkg.MyOptimizer"``).

    Raises:
        ValueError: for an unknown name, or a class path that is not an optimizer class.
        ModuleNotFoundError: when the package is not installed.

    Example::

        >>> info, cls = resolve_optimizer("torch.optim.AdamW")
        >>> info.name, cls.__name__
        ('adamw', 'AdamW')
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"The optimizer name should be a non-empty string. Found {name!r}.")
    if "." not in name:
        info = get_optimizer(name)
        return info, info.load()
    cls = import_class(name, what=f"optimizer class {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"The optimizer class path {name!r} names {cls!r}, which is not a subclass of "
            "torch.optim.Optimizer."
        )
    return info_for_class(cls), cls


def info_for_class(cls: type) -> OptimizerInfo | None:
    """The registered record for an optimizer class (exact class first, then its bases), without
    importing any optional package; ``None`` when it is not registered."""
    for klass in cls.__mro__:
        path = f"{klass.__module__}.{klass.__qualname__}"
        for info in _REGISTRY.values():
            if info.cls is klass or (isinstance(info.cls, str) and info.cls == path):
                return info
    return None


def _nearest(key: str, names: Any) -> str:
    """ " Did you mean 'x'?" for the closest of ``names`` (ignoring case), or ""."""
    near = nearest(key, names, cutoff=0.5)
    return f" Did you mean {near!r}?" if near else ""


# ---------------------------------------------------------------------------------- built-ins
for _info in (
    OptimizerInfo(
        "sgd",
        torch.optim.SGD,
        adaptive=False,
        example_kwargs={"lr": 0.05, "momentum": 0.9},
        description="stochastic gradient descent (momentum, Nesterov)",
    ),
    OptimizerInfo(
        "adam",
        torch.optim.Adam,
        step_rule="adam",
        example_kwargs={"lr": 0.01},
        description="Kingma & Ba, ICLR 2015, https://arxiv.org/abs/1412.6980",
    ),
    OptimizerInfo(
        "adamw",
        torch.optim.AdamW,
        step_rule="adam",
        example_kwargs={"lr": 0.01, "weight_decay": 0.01},
        description="Loshchilov & Hutter, ICLR 2019, https://arxiv.org/abs/1711.05101",
    ),
    OptimizerInfo(
        "adagrad",
        torch.optim.Adagrad,
        step_rule="adagrad",
        example_kwargs={"lr": 0.05, "lr_decay": 0.01},
        description="Duchi, Hazan & Singer, JMLR 2011",
    ),
    OptimizerInfo(
        "rmsprop",
        torch.optim.RMSprop,
        step_rule="rmsprop",
        example_kwargs={"lr": 0.005, "centered": True},
        description="Tieleman & Hinton, 2012 (lecture 6.5)",
    ),
    OptimizerInfo(
        "adadelta",
        torch.optim.Adadelta,
        step_rule="adadelta",
        example_kwargs={"lr": 1.0},
        description="Zeiler, 2012, https://arxiv.org/abs/1212.5701",
    ),
    OptimizerInfo(
        "adamax",
        torch.optim.Adamax,
        step_rule="adamax",
        example_kwargs={"lr": 0.01},
        description="Kingma & Ba, ICLR 2015 (infinity-norm Adam)",
    ),
    OptimizerInfo(
        "nadam",
        torch.optim.NAdam,
        step_rule="nadam",
        example_kwargs={"lr": 0.01},
        description="Dozat, ICLR 2016 workshop (Nesterov Adam)",
    ),
    OptimizerInfo(
        "radam",
        torch.optim.RAdam,
        step_rule="radam",
        example_kwargs={"lr": 0.01},
        description="Liu et al., ICLR 2020, https://arxiv.org/abs/1908.03265",
    ),
    # ------------------------------------------------------------------ optional packages
    OptimizerInfo(
        "adamw_schedulefree",
        "schedulefree.AdamWScheduleFree",
        package="schedulefree",
        train_eval_modes=True,
        example_kwargs={"lr": 0.01},
        description="Defazio et al., NeurIPS 2024, https://arxiv.org/abs/2405.15682",
    ),
    OptimizerInfo(
        "sgd_schedulefree",
        "schedulefree.SGDScheduleFree",
        package="schedulefree",
        adaptive=False,
        train_eval_modes=True,
        example_kwargs={"lr": 0.1},
        description="Defazio et al., NeurIPS 2024, https://arxiv.org/abs/2405.15682",
    ),
    OptimizerInfo(
        "prodigy",
        "prodigyopt.Prodigy",
        package="prodigyopt",
        per_group_lr=False,
        example_kwargs={"lr": 1.0},
        description="Mishchenko & Defazio, ICML 2024, https://arxiv.org/abs/2306.06101",
    ),
    OptimizerInfo(
        "lion",
        "lion_pytorch.Lion",
        package="lion-pytorch",
        adaptive=False,
        example_kwargs={"lr": 1e-3},
        description="Chen et al., NeurIPS 2023, https://arxiv.org/abs/2302.06675",
    ),
):
    register_optimizer(_info)
del _info
