"""A registry of every weighting method: frozen metadata, lookup by name, construction.

Each method class declares its metadata once, as class attributes (``name``, ``paper``,
``total``, ``needs_task_gradients``, ``needs_representation``, ``functional``, ``stateful``,
``stochastic``); :meth:`MethodInfo.of` reads them into a frozen :class:`MethodInfo` record, and
:func:`list_methods`, :func:`get_method` and :func:`create_method` look records up by name.
The conformance suite (``tests/test_conformance.py``) is parametrized over :func:`list_methods`,
so registering a method is all it takes for it to be tested like every other one.

Example::

    >>> from lightning_aw.registry import create_method, get_method, list_methods
    >>> list_methods("*grad*")
    ['cagrad', 'fairgrad', 'graddrop', 'gradnorm', 'gradvac', 'pcgrad', 'sdmgrad', 'upgrad']
    >>> info = get_method("dwa")
    >>> info.cls.__name__, info.total, info.default_interval
    ('DWA', 'T', 'epoch')
    >>> create_method("dwa", temperature=1.5)
    DWA(temperature=1.5, interval='epoch', frequency=1)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from lightning_aw import aggregation as _grad
from lightning_aw import functional as _functional
from lightning_aw import weighting as _loss
from lightning_aw._introspect import init_args, nearest, unknown_args
from lightning_aw.method import Weighting
from lightning_aw.weighting._base import Interval

__all__ = [
    "MethodInfo",
    "create_method",
    "get_method",
    "list_methods",
    "methods_table",
    "register_method",
]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodInfo:
    """What the library knows about one weighting method (a frozen record).

    Args:
        name: the registry name, lowercase letters, digits and ``_`` (e.g. ``"nash_mtl"``).
        cls: the :class:`~lightning_aw.Weighting` subclass that implements the method.
        paper: the reference (authors, title, venue, link); ``None`` for a plain baseline.
        needs_task_gradients: whether the method takes per-task gradients each step (extra
            backward passes through the shared parameters, one layer or the representation;
            through :mod:`lightning_aw.engine`).
        stateful: whether the method carries state from step to step that decides its future
            weights (learned parameters, window statistics, an optimizer's moments, a random
            generator), saved in checkpoints.
        stochastic: whether the method draws random numbers (from its own seeded generator, so
            a run is still reproducible).
        default_interval: the ``interval`` of an instance built with the default arguments:
            ``"step"`` or ``"epoch"`` when the weights are recomputed from window statistics,
            ``None`` when they change only through an optimizer or from each step's own losses.
        total: what the weights sum to, as the class's ``total``: ``"T"`` (the number of tasks),
            ``1``, or ``None`` (not normalised).
        example_kwargs: constructor arguments of a small working example, different from the
            defaults where the method has arguments (the conformance suite builds every method
            with them, and checks that each shows in ``repr`` as ``key=value`` and changes
            ``state_key``). They must suit a three-task model with tasks ``"a"``, ``"b"`` and
            ``"c"`` trained for a few epochs of a few steps. Stored read-only.
        partial_labels: whether the method supports tasks absent from some batches (``None``
            losses from ``task_losses``).
        needs_representation: whether the method always works on the tensor marked with
            :meth:`~lightning_aw.MultiTaskModule.shared_representation` (gradient methods with
            ``source="representation"`` need it too).
        functional: the name of the method's functional twin in :mod:`lightning_aw.functional`
            (``None``: none).
        constant_weights: whether the weights are fixed by design (Equal; GradDrop, whose update
            adapts through its mask).

    Raises:
        ValueError: on an invalid name, a ``cls`` that is not a ``Weighting`` subclass, a
            ``total`` that differs from ``cls.total``, a ``functional`` twin that does not exist,
            or ``example_kwargs`` the class does not accept.

    Example::

        >>> from lightning_aw import EqualWeighting
        >>> info = MethodInfo(
        ...     name="my_equal", cls=EqualWeighting, paper=None, needs_task_gradients=False,
        ...     stateful=False, default_interval=None, total="T",
        ... )
        >>> info.cls()
        EqualWeighting()
        >>> MethodInfo.of(EqualWeighting).functional  # what the class declares
        'equal'
    """

    name: str
    cls: type[Weighting]
    paper: str | None
    needs_task_gradients: bool
    stateful: bool
    default_interval: Interval | None
    total: str | float | None
    example_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    stochastic: bool = False
    partial_labels: bool = True
    needs_representation: bool = False
    functional: str | None = None
    constant_weights: bool = False

    @classmethod
    def of(
        cls, method: type[Weighting], example_kwargs: Mapping[str, Any] | None = None
    ) -> MethodInfo:
        """The record of ``method`` from what the class declares; ``default_interval`` is the
        ``interval`` of an instance built with the default arguments."""
        name = getattr(method, "name", None)
        if not isinstance(name, str):
            raise ValueError(
                f"{method.__name__} declares no registry `name`; set the class attribute "
                '`name: ClassVar[str] = "my_method"` or build the MethodInfo by hand.'
            )
        return cls(
            name=name,
            cls=method,
            paper=method.paper,
            needs_task_gradients=method.needs_task_gradients,
            stateful=method.stateful,
            default_interval=method().interval,
            total=method.total,
            example_kwargs=dict(example_kwargs or {}),
            stochastic=method.stochastic,
            partial_labels=method.partial_labels,
            needs_representation=method.needs_representation,
            functional=method.functional,
            constant_weights=method.constant_weights,
        )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                "Parameter `name` should be lowercase letters, digits and '_', starting with a "
                f"letter. Found {self.name!r}."
            )
        if not (isinstance(self.cls, type) and issubclass(self.cls, Weighting)):
            raise ValueError(
                "Parameter `cls` should be a subclass of lightning_aw.Weighting. "
                f"Found {self.cls!r}."
            )
        if self.total != self.cls.total:
            raise ValueError(
                f"Parameter `total` should be {self.cls.__name__}.total = {self.cls.total!r}. "
                f"Found {self.total!r}."
            )
        if self.default_interval not in (None, "step", "epoch"):
            raise ValueError(
                "Parameter `default_interval` should be 'step', 'epoch' or None. "
                f"Found {self.default_interval!r}."
            )
        if self.functional is not None and self.functional not in _functional.__all__:
            raise ValueError(
                f"Parameter `functional` should name a function of lightning_aw.functional. "
                f"Found {self.functional!r}."
            )
        kwargs = dict(self.example_kwargs)
        _check_kwargs(self.name, self.cls, kwargs)
        object.__setattr__(self, "example_kwargs", MappingProxyType(kwargs))


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo, *, overwrite: bool = False) -> MethodInfo:
    """Add a method to the registry (and so to the conformance suite).

    Args:
        info: the method's record.
        overwrite: replace a method already registered under ``info.name``.

    Returns:
        ``info``, so a module can keep the record it registered.

    Raises:
        ValueError: if ``info`` is not a :class:`MethodInfo`, or its name is taken and
            ``overwrite`` is False.

    Example::

        >>> from lightning_aw import EqualWeighting
        >>> info = MethodInfo(
        ...     name="sum", cls=EqualWeighting, paper=None, needs_task_gradients=False,
        ...     stateful=False, default_interval=None, total="T",
        ... )
        >>> register_method(info).name
        'sum'
        >>> create_method("sum")
        EqualWeighting()
        >>> _ = _REGISTRY.pop("sum")  # (keep the doctest from changing the registry)
    """
    if not isinstance(info, MethodInfo):
        raise ValueError(f"Parameter `info` should be a MethodInfo. Found {info!r}.")
    if info.name in _REGISTRY and not overwrite:
        raise ValueError(
            f"A weighting method named {info.name!r} is already registered "
            f"({_REGISTRY[info.name].cls.__name__}). Choose another name, or pass "
            "`overwrite=True` to replace it."
        )
    _REGISTRY[info.name] = info
    return info


def list_methods(pattern: str | Sequence[str] | None = None) -> list[str]:
    """The sorted names of the registered methods, optionally filtered by wildcard patterns.

    Args:
        pattern: an ``fnmatch`` pattern (``"*grad*"``, ``"imtl_?"``) or a list of them (a name
            matching any is kept); ``None`` lists every method. Matching ignores case.

    Returns:
        The matching names, sorted.

    Example::

        >>> list_methods("imtl*")
        ['imtl_g', 'imtl_l']
        >>> list_methods(["dwa", "*_mtl"])
        ['aligned_mtl', 'db_mtl', 'dwa', 'excess_mtl', 'nash_mtl']
    """
    names = sorted(_REGISTRY)
    if pattern is None:
        return names
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p.lower()) for p in patterns)]


def get_method(name: str) -> MethodInfo:
    """The record of a registered method.

    Args:
        name: the registry name; case, ``-`` for ``_`` and the class name are also accepted
            (``"Nash-MTL"``, ``"NashMTL"``).

    Returns:
        The method's :class:`MethodInfo`.

    Raises:
        ValueError: for an unknown name, with the nearest registered name and the full list.

    Example::

        >>> get_method("PCGrad").name
        'pcgrad'
        >>> get_method("nash-mtl").cls.__name__
        'NashMTL'
        >>> get_method("nashmtl").needs_task_gradients
        True
    """
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        if key in _REGISTRY:
            return _REGISTRY[key]
        by_class = {i.cls.__name__.lower(): i for i in _REGISTRY.values()}
        if key in by_class:
            return by_class[key]
    known = sorted(_REGISTRY)
    near = nearest(name, known, cutoff=0.5)
    hint = f" Did you mean {near!r}?" if near else ""
    raise ValueError(
        f"Unknown weighting method {name!r}.{hint} Registered methods: {', '.join(known)}."
    )


def create_method(name: str, **kwargs: Any) -> Weighting:
    """Build a registered method's callback.

    Args:
        name: the method's name (see :func:`get_method`).
        **kwargs: the callback's constructor arguments.

    Returns:
        A new :class:`~lightning_aw.Weighting` callback, ready for ``Trainer(callbacks=[...])``.

    Raises:
        ValueError: for an unknown name or an argument the method does not take (and whatever
            the constructor raises for invalid values).

    Example::

        >>> create_method("cagrad", c=0.5)
        CAGrad(c=0.5, rescale=1, source='parameters')
        >>> create_method("uncertainty", lr=0.025)
        UncertaintyWeighting(classification=[], init=0.0, lr=0.025)
    """
    info = get_method(name)
    _check_kwargs(info.name, info.cls, kwargs)
    return info.cls(**kwargs)


def _check_kwargs(name: str, cls: type[Weighting], kwargs: Mapping[str, Any]) -> None:
    unknown = unknown_args(cls, kwargs)
    if unknown:
        accepted = init_args(cls).names
        takes = ", ".join(accepted) if accepted else "no arguments"
        raise ValueError(
            f"Weighting method {name!r} ({cls.__name__}) does not take argument(s) {unknown}. "
            f"It takes: {takes}."
        )


def methods_table(
    pattern: str | Sequence[str] | None = None,
    *,
    markdown: bool = False,
    overhead: Mapping[str, float] | None = None,
) -> str:
    """The registered methods as a table: what ``lightning-aw methods`` prints and the README's
    methods table (``markdown=True``), from the one source, the registry.

    Columns: registry name, class, what the method uses (``losses``, or per-task ``gradients``),
    what the weights sum to (``-``: not normalised), the default update interval, whether it is
    stateful, and the paper (authors, venue). With ``overhead`` (the ``ratios`` that
    ``benchmarks/bench_weighting.py --json`` writes, by configuration name: ``"DWA"``,
    ``"MGDA (para.)"``, ``"MGDA (repr.)"``), a column of each method's measured step time
    against the module without a method: ``p`` / ``r`` for gradients on the shared parameters /
    the representation, ``-`` where not measured.

    Example::

        >>> print(methods_table(["dwa", "mgda"]))
        method  class  uses       weights sum  interval  state      paper
        dwa     DWA    losses     T            epoch     stateful   Liu, Johns & Davison, CVPR 2019
        mgda    MGDA   gradients  -            step      stateless  Sener & Koltun, NeurIPS 2018
        >>> print(methods_table("dwa", markdown=True).splitlines()[2])
        | `dwa` | `DWA` | losses | T | epoch | stateful | Liu, Johns & Davison, CVPR 2019 |
    """
    head = ["method", "class", "uses", "weights sum", "interval", "state"]
    rows = [[*head, *(["step time"] if overhead is not None else []), "paper"]]
    for name in list_methods(pattern):
        info = get_method(name)
        measured = [] if overhead is None else [_overhead_cell(info.cls.__name__, overhead)]
        rows.append(
            [
                name,
                info.cls.__name__,
                "gradients" if info.needs_task_gradients else "losses",
                "-" if info.total is None else str(info.total),
                info.default_interval or "-",
                "stateful" if info.stateful else "stateless",
                *measured,
                _short_paper(info.paper),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        for r in rows[1:]:
            cells = [f"`{r[0]}`", f"`{r[1]}`", *r[2:]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
        for r in rows
    )


def _overhead_cell(cls_name: str, ratios: Mapping[str, float]) -> str:
    """``"1.07×"``, ``"p 2.16× / r 1.14×"`` (parameters / representation) or ``"-"``."""
    if cls_name in ratios:
        return f"{ratios[cls_name]:.2f}×"
    sources = [
        f"{label} {ratios[f'{cls_name} ({key}.)']:.2f}×"
        for label, key in (("p", "para"), ("r", "repr"))
        if f"{cls_name} ({key}.)" in ratios
    ]
    return " / ".join(sources) or "-"


def _short_paper(paper: str | None) -> str:
    """``'Authors, "Title", Venue, link'`` → ``'Authors, Venue'``."""
    if not paper:
        return "-"
    authors, _, rest = paper.partition(', "')
    _, _, after = rest.partition('", ')
    venue = after.split(", http")[0].strip() if after else ""
    return f"{authors}, {venue}" if venue else authors


# ---------------------------------------------------------------------------------- built-ins
#: every built-in method, with the constructor arguments of its small working example (see
#: ``MethodInfo.example_kwargs``); the rest of each record is what the class declares
_BUILTINS: dict[type[Weighting], dict[str, Any]] = {
    # loss-based
    _loss.EqualWeighting: {},
    _loss.UncertaintyWeighting: {"classification": ["b"], "init": 0.1, "lr": 0.02},
    _loss.DWA: {"temperature": 1.5},
    _loss.GradNorm: {"alpha": 1.0, "lr": 0.05},
    _loss.RLW: {"seed": 7},
    _loss.GLS: {},
    _loss.ScaleInvariant: {},
    _loss.IMTLL: {"init": 0.1, "lr": 0.02},
    _loss.FAMO: {"lr": 0.05, "gamma": 0.01},
    _loss.SoftAdapt: {"beta": 5.0},
    _loss.STCH: {"mu": 0.5, "warmup_epochs": 1},
    _loss.ReLoBRaLo: {"alpha": 0.9, "expected_rho": 0.5, "temperature": 1.0, "seed": 5},
    # loss-based, weights learned on a validation batch after a look-ahead step
    _loss.AutoLambda: {"lr": 0.01, "init": 0.5, "primary_tasks": ["a", "b"], "frequency": 2},
    # gradient-based
    _grad.MGDA: {"normalization": "l2", "source": "representation"},
    _grad.PCGrad: {"reduction": "mean", "seed": 3},
    _grad.CAGrad: {"c": 0.5, "rescale": 0, "frequency": 2},
    _grad.IMTLG: {"source": "representation", "ddp_sync": "gradients"},
    _grad.NashMTL: {"max_iter": 30, "frequency": 2},
    _grad.AlignedMTL: {"scale_mode": "median", "source": "representation"},
    _grad.UPGrad: {"source": "representation"},
    _grad.GradVac: {"beta": 0.25, "seed": 3},
    _grad.GradDrop: {"leak": 0.25, "seed": 3},
    _grad.DBMTL: {"beta": 0.5},
    _grad.FairGrad: {"alpha": 1.5, "max_iter": 40, "frequency": 2},
    _grad.ConFIG: {"source": "representation"},
    # issue 17, part A: DualProj, ExcessMTL, MoCo, learning-rate annealing
    _grad.DualProj: {"preference": {"a": 1.0, "b": 0.0, "c": 0.0}, "source": "representation"},
    _loss.ExcessMTL: {"step_size": 0.5},
    _grad.MoCo: {"beta": 0.8, "gamma": 0.5, "rho": 0.01, "normalize": True},
    _loss.LRAnnealing: {"alpha": 0.5, "reference": "b", "statistic": "mean", "weighted": False},
    # gradient-based, multi-batch (three disjoint parts of each batch)
    _grad.SDMGrad: {"lam": 0.3, "lr": 0.5, "niter": 2, "momentum": 0.0},
    _grad.MoDo: {"gamma": 0.5, "rho": 0.05},
}
for _cls, _example in _BUILTINS.items():
    register_method(MethodInfo.of(_cls, _example))
del _cls, _example
