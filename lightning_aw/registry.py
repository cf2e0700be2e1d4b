"""A registry of every weighting method: frozen metadata, lookup by name, construction.

Each method is described once by a :class:`MethodInfo` record; :func:`list_methods`,
:func:`get_method` and :func:`create_method` look it up by name. The conformance suite
(``tests/test_conformance.py``) is parametrized over :func:`list_methods`, so registering a
method is all it takes for it to be tested like every other one.

Example::

    >>> from lightning_aw.registry import create_method, get_method, list_methods
    >>> list_methods("*grad*")
    ['cagrad', 'graddrop', 'gradnorm', 'gradvac', 'pcgrad', 'upgrad']
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

from lightning_aw._introspect import init_args, nearest, unknown_args
from lightning_aw.aggregation import (
    DBMTL,
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    GradDrop,
    GradientWeighting,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from lightning_aw.weighting import (
    DWA,
    FAMO,
    GLS,
    IMTLL,
    RLW,
    STCH,
    EqualWeighting,
    GradNorm,
    ScaleInvariant,
    SoftAdapt,
    UncertaintyWeighting,
    Weighting,
)
from lightning_aw.weighting._base import Interval

__all__ = ["MethodInfo", "create_method", "get_method", "list_methods", "register_method"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodInfo:
    """What the library knows about one weighting method (a frozen record).

    Args:
        name: the registry name, lowercase letters, digits and ``_`` (e.g. ``"nash_mtl"``).
        cls: the :class:`~lightning_aw.Weighting` subclass that implements the method.
        paper: the reference (authors, title, venue, link); ``None`` for a plain baseline.
        needs_gradients: whether the method takes per-task gradients each step (extra backward
            passes through the shared parameters or representation; the module must define
            ``shared_parameters()``). Not to be confused with
            :attr:`GradientWeighting.needs_gradients <lightning_aw.GradientWeighting>`, which
            says whether a gradient method needs the gradient matrix rather than its Gram matrix.
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

    Raises:
        ValueError: on an invalid name, a ``cls`` that is not a ``Weighting`` subclass, a
            ``total`` that differs from ``cls.total``, or ``example_kwargs`` the class does not
            accept.

    Example::

        >>> from lightning_aw import EqualWeighting
        >>> info = MethodInfo(
        ...     name="my_equal", cls=EqualWeighting, paper=None, needs_gradients=False,
        ...     stateful=False, default_interval=None, total="T",
        ... )
        >>> info.cls()
        EqualWeighting()
    """

    name: str
    cls: type[Weighting]
    paper: str | None
    needs_gradients: bool
    stateful: bool
    default_interval: Interval | None
    total: str | float | None
    example_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    stochastic: bool = False
    partial_labels: bool = True

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
        ...     name="sum", cls=EqualWeighting, paper=None, needs_gradients=False,
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
        ['aligned_mtl', 'db_mtl', 'dwa', 'nash_mtl']
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
        >>> get_method("nashmtl").needs_gradients
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


# ---------------------------------------------------------------------------------- built-ins
def _gradient_method(
    name: str,
    cls: type[GradientWeighting],
    paper: str,
    *,
    stateful: bool,
    example_kwargs: Mapping[str, Any],
    total: str | float | None = None,
    stochastic: bool = False,
) -> MethodInfo:
    """A gradient-based method: per-task gradients every step, coefficients not normalised
    unless ``total`` says otherwise."""
    return MethodInfo(
        name=name,
        cls=cls,
        paper=paper,
        needs_gradients=True,
        stateful=stateful,
        default_interval="step",
        total=total,
        example_kwargs=example_kwargs,
        stochastic=stochastic,
    )


for _info in (
    # ------------------------------------------------------------------ loss-based
    MethodInfo(
        name="equal",
        cls=EqualWeighting,
        paper=None,
        needs_gradients=False,
        stateful=False,
        default_interval=None,
        total="T",
    ),
    MethodInfo(
        name="uncertainty",
        cls=UncertaintyWeighting,
        paper=(
            'Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for '
            'Scene Geometry and Semantics", CVPR 2018, https://arxiv.org/abs/1705.07115'
        ),
        needs_gradients=False,
        stateful=True,
        default_interval=None,
        total=None,
        example_kwargs={"classification": ["b"], "init": 0.1, "lr": 0.02},
    ),
    MethodInfo(
        name="dwa",
        cls=DWA,
        paper=(
            'Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, '
            "https://arxiv.org/abs/1803.10704"
        ),
        needs_gradients=False,
        stateful=True,
        default_interval="epoch",
        total="T",
        example_kwargs={"temperature": 1.5},
    ),
    MethodInfo(
        name="gradnorm",
        cls=GradNorm,
        paper=(
            'Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for '
            'Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, '
            "https://arxiv.org/abs/1711.02257"
        ),
        needs_gradients=True,
        stateful=True,
        default_interval="step",
        total="T",
        example_kwargs={"alpha": 1.0, "lr": 0.05},
    ),
    MethodInfo(
        name="rlw",
        cls=RLW,
        paper=(
            'Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus '
            'Test for Multi-Task Learning", TMLR 2022, https://arxiv.org/abs/2111.10603'
        ),
        needs_gradients=False,
        stateful=True,
        stochastic=True,
        default_interval="step",
        total=1,
        example_kwargs={"seed": 7},
    ),
    MethodInfo(
        name="gls",
        cls=GLS,
        paper=(
            'Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature '
            'Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops '
            "2019, https://arxiv.org/abs/1904.08492"
        ),
        needs_gradients=False,
        stateful=False,
        default_interval=None,
        total=None,
        example_kwargs={"check_every": 3},
    ),
    MethodInfo(
        name="scale_invariant",
        cls=ScaleInvariant,
        paper=(
            'baseline in Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, '
            "https://arxiv.org/abs/2202.01017"
        ),
        needs_gradients=False,
        stateful=False,
        default_interval=None,
        total=None,
        example_kwargs={"check_every": 3},
    ),
    MethodInfo(
        name="imtl_l",
        cls=IMTLL,
        paper=(
            'Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task '
            'Learning", ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr'
        ),
        needs_gradients=False,
        stateful=True,
        default_interval=None,
        total=None,
        example_kwargs={"init": 0.1, "lr": 0.02, "check_every": 3},
    ),
    MethodInfo(
        name="famo",
        cls=FAMO,
        paper=(
            'Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023, '
            "https://arxiv.org/abs/2306.03792"
        ),
        needs_gradients=False,
        stateful=True,
        default_interval="step",
        total=1,
        example_kwargs={"lr": 0.05, "gamma": 0.01, "check_every": 3},
    ),
    MethodInfo(
        name="softadapt",
        cls=SoftAdapt,
        paper=(
            'Heydari, Thompson & Mehmood, "SoftAdapt: Techniques for Adaptive Loss Weighting of '
            'Neural Networks with Multi-Part Loss Functions", 2019, '
            "https://arxiv.org/abs/1912.12355"
        ),
        needs_gradients=False,
        stateful=True,
        default_interval="epoch",
        total=1,
        example_kwargs={"beta": 5.0},
    ),
    MethodInfo(
        name="stch",
        cls=STCH,
        paper=(
            'Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for '
            'Multi-Objective Optimization", ICML 2024, https://arxiv.org/abs/2402.19078'
        ),
        needs_gradients=False,
        stateful=True,
        default_interval="epoch",
        total=None,
        example_kwargs={"mu": 0.5, "warmup_epochs": 1},
    ),
    # ------------------------------------------------------------------ gradient-based
    _gradient_method(
        "mgda",
        MGDA,
        (
            'Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS '
            "2018, https://arxiv.org/abs/1810.04650"
        ),
        stateful=False,
        example_kwargs={"normalization": "l2", "source": "representation"},
    ),
    _gradient_method(
        "pcgrad",
        PCGrad,
        (
            'Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task '
            'Learning", NeurIPS 2020, https://arxiv.org/abs/2001.06782'
        ),
        stateful=True,
        stochastic=True,
        example_kwargs={"reduction": "mean", "seed": 3},
    ),
    _gradient_method(
        "cagrad",
        CAGrad,
        (
            'Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task '
            'Learning", NeurIPS 2021, https://arxiv.org/abs/2110.14048'
        ),
        stateful=False,
        example_kwargs={"c": 0.5, "rescale": 0, "frequency": 2},
    ),
    _gradient_method(
        "imtl_g",
        IMTLG,
        (
            'Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task '
            'Learning", ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr'
        ),
        stateful=False,
        example_kwargs={"source": "representation", "ddp_sync": "gradients"},
        total=1,
    ),
    _gradient_method(
        "nash_mtl",
        NashMTL,
        (
            'Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning '
            'as a Bargaining Game", ICML 2022, https://arxiv.org/abs/2202.01017'
        ),
        stateful=False,
        example_kwargs={"max_iter": 30, "frequency": 2},
    ),
    _gradient_method(
        "aligned_mtl",
        AlignedMTL,
        (
            'Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for '
            'Multi-Task Learning", CVPR 2023, https://arxiv.org/abs/2305.19000'
        ),
        stateful=False,
        example_kwargs={"scale_mode": "median", "source": "representation"},
    ),
    _gradient_method(
        "upgrad",
        UPGrad,
        (
            'Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, '
            "https://arxiv.org/abs/2406.16232"
        ),
        stateful=False,
        example_kwargs={"source": "representation"},
    ),
    _gradient_method(
        "gradvac",
        GradVac,
        (
            'Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving '
            'Multi-task Optimization in Massively Multilingual Models", ICLR 2021, '
            "https://arxiv.org/abs/2010.05874"
        ),
        stateful=True,
        stochastic=True,
        example_kwargs={"beta": 0.25, "seed": 3},
    ),
    _gradient_method(
        "graddrop",
        GradDrop,
        (
            'Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: '
            'Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020, '
            "https://arxiv.org/abs/2010.06808"
        ),
        stateful=True,
        stochastic=True,
        total="T",
        example_kwargs={"leak": 0.25, "seed": 3},
    ),
    _gradient_method(
        "db_mtl",
        DBMTL,
        (
            'Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", 2023, '
            "https://arxiv.org/abs/2308.12029"
        ),
        stateful=True,
        example_kwargs={"beta": 0.5},
    ),
):
    register_method(_info)
del _info
