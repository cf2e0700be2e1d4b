"""Private helpers shared by the registries, the optimizer specs and the configuration.

One class import (:func:`import_class`), one keyword-argument check (:func:`init_args`,
:func:`unknown_args`) and one "did you mean" suggestion (:func:`nearest`). Callers word their own
messages around them.

Example::

    >>> nearest("alpah", ["alpha", "lr"])
    'alpha'
    >>> import torch
    >>> unknown_args(torch.optim.Adam, ["lr", "beta"])
    ['beta']
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
from collections.abc import Iterable
from typing import Any

__all__ = ["InitArgs", "import_class", "init_args", "nearest", "unknown_args"]


def nearest(name: Any, options: Iterable[Any], *, cutoff: float = 0.6) -> str | None:
    """The option closest to ``name`` (ignoring case), in its own spelling; ``None`` if none is
    close enough (``difflib`` ratio below ``cutoff``)."""
    lowered = {str(o).lower(): str(o) for o in options}
    near = difflib.get_close_matches(str(name).lower(), sorted(lowered), n=1, cutoff=cutoff)
    return lowered[near[0]] if near else None


def import_class(path: str, package: str | None = None, *, what: str = "class") -> Any:
    """Import the object at a dotted path (``"package.module.Class"``, nested classes too).

    Args:
        path: the dotted import path.
        package: the ``pip install`` name to suggest when the package is missing (default: the
            top-level module name).
        what: how messages call the object (``"optimizer 'lion'"``).

    Raises:
        ValueError: ``path`` is not a dotted path.
        ModuleNotFoundError: no module of the path can be imported (the message names what to
            ``pip install``).
        ImportError: the module exists but has no such attribute (with the nearest name), or it
            fails to import.
    """
    parts = str(path).split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"{what}: {path!r} is not a dotted import path like 'package.Class'.")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and f"{module_name}.".startswith(f"{err.name}."):
                continue  # this module does not exist: maybe a shorter path is the module
            raise  # the module exists but one of its own imports is missing
        for i, attr in enumerate(parts[cut:]):
            if not hasattr(obj, attr):
                owner = ".".join(parts[: cut + i])
                near = nearest(attr, [n for n in dir(obj) if not n.startswith("_")])
                hint = f" Did you mean {near!r}?" if near else ""
                raise ImportError(
                    f"The {what}: module {owner!r} has no attribute {attr!r} (from {path!r}).{hint}"
                )
            obj = getattr(obj, attr)
        return obj
    install = package or parts[0]
    raise ModuleNotFoundError(
        f"The {what} needs the package {install!r}, which is not installed (no module named "
        f"{parts[0]!r}). Install it with `pip install {install}`, or check the spelling "
        f"of {path!r}.",
        name=parts[0],
    )


@dataclasses.dataclass(frozen=True)
class InitArgs:
    """The keyword arguments a class accepts.

    Attributes:
        names: the parameter names, in order (``self`` left out).
        required: the names without a default.
        open: the constructor takes ``**kwargs`` that go somewhere this check cannot see, so
            any other name may be valid too.
    """

    names: tuple[str, ...]
    required: tuple[str, ...]
    open: bool


@functools.cache
def init_args(cls: type) -> InitArgs:
    """The keyword arguments of ``cls.__init__``, following ``**kwargs`` to the parent classes
    (a subclass that forwards ``**kwargs`` to ``super().__init__`` accepts its parent's too)."""
    names: list[str] = []
    required: list[str] = []
    first = True
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            # a chain of **kwargs that ends here forwards them somewhere unseen
            return InitArgs(tuple(names), tuple(required), open=not first)
        try:
            params = list(inspect.signature(init).parameters.values())[1:]  # drop self
        except (TypeError, ValueError):
            return InitArgs(tuple(names), tuple(required), open=True)
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names:
                names.append(p.name)
                if first and p.default is p.empty:
                    required.append(p.name)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
        first = False
    return InitArgs(tuple(names), tuple(required), open=False)


def unknown_args(cls: type, given: Iterable[str], skip: Iterable[str] = ()) -> list[str]:
    """The names in ``given`` that ``cls`` does not accept (sorted; ``[]`` when its
    constructor is open to anything). Names in ``skip`` count as not accepted."""
    sig = init_args(cls)
    if sig.open:
        return []
    accepted = set(sig.names) - set(skip)
    return sorted({str(n) for n in given} - accepted)
