"""YAML configuration: one OmegaConf file describes a whole run, in LightningCLI's spelling.

A configuration has the keys of LightningCLI's ``fit`` subcommand, so one file works both here
(``lightning-aw fit --config run.yaml``) and with :class:`~lightning.pytorch.cli.LightningCLI`
(see :func:`lightning_aw.cli.lightning_cli`):

.. code-block:: yaml

    seed_everything: 0
    trainer:                      # pl.Trainer keyword arguments
      max_epochs: 5
      logger:
        class_path: TensorBoardLogger
        init_args: {save_dir: runs, name: digits-gradnorm}
      callbacks:
        - class_path: GradNorm    # the weighting method is a Trainer callback
          init_args: {alpha: 1.5}
    model:
      class_path: lightning_aw.models.DigitsNet
      init_args:
        optimizer: {name: adamw, lr: 0.002, weight_decay: 0.01}
    data:
      class_path: lightning_aw.datasets.TwoDigitsDataModule
      init_args: {train_pairs: 2000}
    ckpt_path: null               # resume (fit) or evaluate (validate/test) a checkpoint

:func:`load_config` reads and merges files, applies command-line overrides
(``trainer.max_epochs=3``, ``trainer.callbacks.0.init_args.alpha=2``, ``~trainer.logger`` to
delete a key) and returns an OmegaConf ``DictConfig``; ``${...}`` interpolations are resolved
afterwards, so they see every file and override. :func:`validate_config` checks the whole file
against the classes' signatures without building anything; :func:`build` checks it and then
builds the :class:`Experiment` (seed, model, data, callbacks, loggers, Trainer).

Class paths are full import paths or short names: ``GradNorm`` is found in ``lightning_aw`` (and
``lightning_aw.models``, ``lightning_aw.datasets``, ``lightning_aw.optim``,
``lightning_aw.monitor``), ``TensorBoardLogger`` or ``ModelCheckpoint`` in
``lightning.pytorch.loggers`` / ``callbacks``, and any already-imported subclass of the expected
base class by its name, as LightningCLI does.

Every error names its full path in the file, e.g.
``trainer.callbacks[0].init_args.alpah: GradNorm has no argument 'alpah'; did you mean 'alpha'?``
or ``trainer.max_epochs: expected int, got 'three'``. Arguments are checked against the type
hints of the constructors (``int``, ``float``, ``bool``, ``str``, paths, ``Literal``, sequences,
mappings, unions, and nested ``class_path`` specs); hints this module cannot interpret are not
checked. Keyword arguments a class forwards with ``**kwargs`` are checked against its parent
class's signature. Objects receive plain Python containers, never OmegaConf nodes, so
``save_hyperparameters()`` and ``weights_only`` checkpoint loading work.

Differences from LightningCLI worth knowing:

- LightningCLI (jsonargparse) resolves ``${...}`` only with ``parser_mode="omegaconf"``
  (:func:`lightning_aw.cli.lightning_cli` sets it), and then within each file before the
  command-line overrides; here interpolation is resolved after merging and overriding.
- Lightning annotates ``limit_*_batches`` as ``float | int``, so LightningCLI turns a whole
  number into a float: ``limit_val_batches: 1`` means *one batch* here but *100 %* there
  (``2`` means two batches in both). Write ``1.0`` for all batches.
- LightningCLI's top-level ``optimizer``/``lr_scheduler`` keys would replace
  :class:`~lightning_aw.MultiTaskModule`'s parameter groups: they must be ``null``; the optimizer
  spec lives in ``model.init_args.optimizer``.
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import datetime
import difflib
import enum
import importlib
import inspect
import os
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from typing_extensions import override

__all__ = [
    "ConfigError",
    "ConfigFileExistsError",
    "Experiment",
    "SaveConfig",
    "build",
    "instantiate",
    "load_config",
    "validate_config",
]

PathLike = str | os.PathLike[str]
Command = Literal["fit", "validate", "test"]

#: Top-level keys of a configuration (LightningCLI's fit/validate/test subcommands).
TOP_LEVEL_KEYS = (
    "seed_everything",
    "trainer",
    "model",
    "data",
    "ckpt_path",
    "weights_only",
    "verbose",
    "optimizer",
    "lr_scheduler",
)

#: Modules searched, in order, for a short class name such as ``GradNorm``.
SHORT_NAME_MODULES = (
    "lightning_aw",
    "lightning_aw.models",
    "lightning_aw.datasets",
    "lightning_aw.optim",
    "lightning_aw.monitor",
    "lightning_aw.metrics",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
)

_SPEC_KEYS = frozenset({"class_path", "init_args", "dict_kwargs"})
_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][\w\-]*(\[\d+\])*(\.[\w\-]+(\[\d+\])*)*$")
_NoneType = type(None)


class ConfigError(ValueError):
    """An invalid configuration: every message starts with the full path of the faulty key.

    Args:
        errors: one message per problem (``"trainer.max_epochs: expected int, got 'three'"``).

    Example::

        >>> err = ConfigError(["trainer.max_epochs: expected int, got 'three'"])
        >>> str(err)
        "trainer.max_epochs: expected int, got 'three'"
        >>> err.errors
        ["trainer.max_epochs: expected int, got 'three'"]
    """

    def __init__(self, errors: str | Sequence[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


# ================================================================================== loading
def load_config(
    paths: PathLike | Sequence[PathLike], overrides: Sequence[str] = ()
) -> DictConfig:
    """Read YAML file(s), merge them in order, then apply command-line style overrides.

    Later files override earlier ones key by key (a list is replaced as a whole). Overrides are
    ``dotted.key=value`` (the value is parsed as YAML: ``3``, ``0.5``, ``true``, ``null``,
    ``[1, 2]``, ``{a: 1}``), with list items addressed as ``callbacks.0`` or ``callbacks[0]``;
    ``~dotted.key`` deletes a key. ``${...}`` interpolations are kept unresolved here and are
    resolved by :func:`validate_config` / :func:`build`, so they see the final values.

    Args:
        paths: one path or several (merged left to right).
        overrides: dotlist overrides, applied in order after the files.

    Returns:
        The merged configuration (an OmegaConf ``DictConfig``).

    Raises:
        ConfigError: for a missing file, a file that is not valid YAML or not a mapping, or an
            override with bad syntax or a path that does not exist (a list index out of range).

    Example::

        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.yaml"
        >>> _ = path.write_text("trainer:\\n  max_epochs: 2\\n  default_root_dir: runs\\n")
        >>> cfg = load_config(path, ["trainer.max_epochs=3", "~trainer.default_root_dir"])
        >>> OmegaConf.to_container(cfg)
        {'trainer': {'max_epochs': 3}}
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(overrides, str):
        overrides = [overrides]
    if not paths:
        raise ConfigError("config: no configuration file given (pass at least one path).")
    configs: list[DictConfig] = [_load_file(p) for p in paths]
    cfg = OmegaConf.merge(*configs) if len(configs) > 1 else configs[0]
    assert isinstance(cfg, DictConfig)  # merging mappings gives a mapping
    for item in overrides:
        _apply_override(cfg, item)
    return cfg


def _load_file(path: PathLike) -> DictConfig:
    file = pathlib.Path(path)
    if not file.is_file():
        where = "is a directory" if file.is_dir() else "does not exist"
        raise ConfigError(f"config file '{file}' {where}; pass the path of a YAML file.")
    try:
        loaded = OmegaConf.load(file)
    except Exception as err:  # yaml.YAMLError, OmegaConf errors: report the file and line
        raise ConfigError(f"config file '{file}' is not valid YAML: {_one_line(err)}") from err
    if loaded is None or (isinstance(loaded, DictConfig) and loaded._is_none()):
        return OmegaConf.create({})
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"config file '{file}' should hold a mapping of keys (trainer, model, data, ...). "
            f"Found a {type(loaded).__name__}."
        )
    return loaded


def _apply_override(cfg: DictConfig, item: str) -> None:
    if not isinstance(item, str):
        raise ConfigError(f"override {item!r}: expected a string KEY=VALUE or ~KEY.")
    text = item.strip()
    if text.startswith("--"):  # LightningCLI spelling: --trainer.max_epochs=3
        text = text[2:]
    if text.startswith("~"):
        key = text[1:]
        if "=" in key or not _OVERRIDE_KEY.match(key):
            raise ConfigError(
                f"override {item!r}: expected ~KEY to delete a key, like '~trainer.logger'."
            )
        _delete_key(cfg, key, item)
        return
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.match(key):
        raise ConfigError(
            f"override {item!r}: expected KEY=VALUE with a dotted key, like "
            "'trainer.max_epochs=3' or 'trainer.callbacks.0.init_args.alpha=2'."
        )
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]  # type: ignore[index]
    except Exception as err:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML: {_one_line(err)}"
        ) from err
    try:
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    except Exception as err:
        raise ConfigError(f"override {item!r}: cannot set '{key}': {_one_line(err)}") from err


def _delete_key(cfg: DictConfig, key: str, item: str) -> None:
    parts = _split_key(key)
    parent: Any = cfg
    for i, part in enumerate(parts[:-1]):
        parent = _child(parent, part)
        if parent is None:
            raise ConfigError(
                f"override {item!r}: '{_join(parts[: i + 1])}' does not exist, nothing to delete."
            )
    last = parts[-1]
    if isinstance(parent, ListConfig) and isinstance(last, int) and 0 <= last < len(parent):
        del parent[last]
    elif isinstance(parent, DictConfig) and str(last) in parent:
        del parent[str(last)]
    else:
        raise ConfigError(f"override {item!r}: '{key}' does not exist, nothing to delete.")


def _split_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for segment in key.split("."):
        name, *indices = segment.split("[")
        parts.append(int(name) if name.isdigit() else name)
        parts.extend(int(i.rstrip("]")) for i in indices)
    return parts


def _child(node: Any, part: str | int) -> Any:
    if isinstance(node, ListConfig) and isinstance(part, int):
        return node[part] if 0 <= part < len(node) else None
    if isinstance(node, DictConfig) and str(part) in node:
        return node._get_node(str(part))
    return None


def _join(parts: Sequence[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _resolve(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The configuration as plain Python containers, interpolations resolved."""
    if not isinstance(cfg, DictConfig):
        if not isinstance(cfg, Mapping):
            raise ConfigError(
                f"config: expected a mapping (trainer, model, data, ...), got a "
                f"{type(cfg).__name__}."
            )
        cfg = OmegaConf.create(dict(cfg))
    try:
        out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {_one_line(err)}") from err
    assert isinstance(out, dict)
    return typing.cast(dict[str, Any], out)


# ================================================================================== checking
@dataclasses.dataclass(frozen=True)
class _Planned:
    """A class spec that checked out (validation mode builds nothing)."""

    cls: type


class _Invalid(Exception):
    """A value does not fit its annotation; the message says what was expected."""


class _Walker:
    """Walks a configuration, checking every value against its annotation.

    With ``construct=False`` it only records errors (all of them); with ``construct=True`` it
    builds the objects, and a constructor's exception becomes a :class:`ConfigError` at once.
    """

    def __init__(self, construct: bool) -> None:
        self.construct = construct
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    # ------------------------------------------------------------------ class specs
    def spec(self, value: Any, path: str, base: type | None) -> Any:
        """Check (and build) a ``class_path``/``init_args`` spec or a bare class name."""
        if isinstance(value, str):
            value = {"class_path": value}
        if not isinstance(value, Mapping) or "class_path" not in value:
            what = base.__name__ if base is not None else "object"
            self.error(
                path,
                f"expected a {what} given as a mapping with 'class_path' (and 'init_args'), "
                f"got {_show(value)}",
            )
            return None
        extra = sorted(set(value) - _SPEC_KEYS)
        if extra:
            near = _suggest(extra[0], _SPEC_KEYS)
            self.error(
                _key(path, extra[0]),
                "unknown key in a class spec"
                + _hint_then(
                    near,
                    "a class spec has 'class_path', 'init_args' and 'dict_kwargs' (the "
                    "constructor's arguments go under 'init_args')",
                ),
            )
        cls = self.resolve_class(value["class_path"], _key(path, "class_path"), base)
        if cls is None:
            return None
        init_args = value.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            self.error(_key(path, "init_args"), f"expected a mapping, got {_show(init_args)}")
            return None
        dict_kwargs = value.get("dict_kwargs") or {}
        if not isinstance(dict_kwargs, Mapping):
            self.error(_key(path, "dict_kwargs"), f"expected a mapping, got {_show(dict_kwargs)}")
            return None
        kwargs = self.arguments(cls, init_args, _key(path, "init_args"))
        if kwargs is None:
            return None
        kwargs.update(dict_kwargs)
        if not self.construct and not self._check_optimizer_spec(cls, kwargs, path):
            return None
        if not self.construct:
            return _Planned(cls)
        return _call(cls, kwargs, path)

    def _check_optimizer_spec(self, cls: type, kwargs: Mapping[str, Any], path: str) -> bool:
        """A MultiTaskModule's optimizer spec is checked by :mod:`lightning_aw.optim` (name,
        arguments, groups, scheduler) before anything is built."""
        from lightning_aw.module import MultiTaskModule

        if not issubclass(cls, MultiTaskModule) or kwargs.get("optimizer") is None:
            return True
        from lightning_aw import optim

        check = getattr(optim, "validate_optimizer_spec", None)
        if check is None:  # pragma: no cover - older optim module: checked when built
            return True
        try:
            check(kwargs["optimizer"])
        except (TypeError, ValueError) as err:
            self.error(_key(path, "init_args.optimizer"), _one_line(err))
            return False
        return True

    def resolve_class(self, class_path: Any, path: str, base: type | None) -> type | None:
        if not isinstance(class_path, str) or not class_path.strip():
            self.error(path, f"expected a class name or import path, got {_show(class_path)}")
            return None
        try:
            cls = _import_class(class_path.strip(), base)
        except ConfigError as err:
            self.error(path, str(err))
            return None
        if base is not None and not issubclass(cls, base):
            self.error(
                path,
                f"{_qualname(cls)} is not a {base.__name__} (expected a subclass of "
                f"{_qualname(base)})",
            )
            return None
        return cls

    def arguments(
        self, cls: type, init_args: Mapping[str, Any], path: str
    ) -> dict[str, Any] | None:
        """Check ``init_args`` against ``cls``'s signature; the converted keyword arguments."""
        sig = _signature_of(cls)
        ok = True
        kwargs: dict[str, Any] = {}
        for name, value in init_args.items():
            arg_path = _key(path, str(name))
            if name not in sig.params:
                if sig.open:
                    kwargs[str(name)] = value
                    continue
                near = _suggest(str(name), sig.params)
                takes = "" if near else f" (it takes: {', '.join(sig.params) or 'no arguments'})"
                self.error(arg_path, f"{cls.__name__} has no argument '{name}'{near}{takes}")
                ok = False
                continue
            before = len(self.errors)
            kwargs[str(name)] = self.value(value, sig.hints.get(str(name), Any), arg_path)
            ok = ok and len(self.errors) == before
        for name in sig.required:
            if name not in init_args:
                self.error(
                    path if path else cls.__name__,
                    f"{cls.__name__} needs argument '{name}' (it has no default); add "
                    f"'{name}: ...' under init_args",
                )
                ok = False
        return kwargs if ok else None

    # ------------------------------------------------------------------ values
    def value(self, value: Any, hint: Any, path: str) -> Any:
        try:
            return self.convert(value, hint, path)
        except _Invalid as err:
            self.error(path, f"expected {err}, got {_show(value)}")
            return value

    def convert(self, value: Any, hint: Any, path: str) -> Any:
        """Convert ``value`` to ``hint`` or raise :class:`_Invalid`; nested problems (inside
        lists, mappings and class specs) are recorded under their own paths."""
        if _unchecked(hint):
            return value
        origin = typing.get_origin(hint)
        if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
            return self.convert_union(value, typing.get_args(hint), path)
        if origin is Literal:
            options = typing.get_args(hint)
            if any(_same(value, o) for o in options):
                return value
            raise _Invalid(_describe(hint))
        if hint is _NoneType:
            if value is None:
                return None
            raise _Invalid("null")
        if _is_sequence_hint(hint):
            return self.convert_sequence(value, hint, path)
        if _is_mapping_hint(hint):
            return self.convert_mapping(value, hint, path)
        if inspect.isclass(hint):
            return self.convert_class(value, hint, path)
        return value  # a typing construct this module does not interpret

    def convert_union(self, value: Any, members: tuple[Any, ...], path: str) -> Any:
        # the member the value fits exactly wins (an int stays an int in `float | int`), then a
        # lenient fit (an int for a float, a string for a path, a class name for a class)
        for strict in (True, False):
            for member in members:
                if _fits(value, member, strict):
                    return self.convert(value, member, path)
        raise _Invalid(_describe_union(members))

    def convert_sequence(self, value: Any, hint: Any, path: str) -> Any:
        if not isinstance(value, (list, tuple)):
            raise _Invalid(_describe(hint))
        origin = typing.get_origin(hint) or hint
        args = typing.get_args(hint)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Invalid(_describe(hint))
            pairs = enumerate(zip(value, args, strict=True))
            items = [self.value(v, a, f"{path}[{i}]") for i, (v, a) in pairs]
        else:
            item = args[0] if args else Any
            items = [self.value(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        if origin in (tuple,):
            return tuple(items)
        if origin in (set, frozenset, cabc.Set, cabc.MutableSet):
            return set(items)
        return items

    def convert_mapping(self, value: Any, hint: Any, path: str) -> Any:
        if not isinstance(value, Mapping) or _is_spec(value):
            raise _Invalid(_describe(hint))
        args = typing.get_args(hint)
        key_hint, item_hint = (args[0], args[1]) if len(args) == 2 else (Any, Any)
        out: dict[Any, Any] = {}
        for k, v in value.items():
            item_path = _key(path, str(k))
            if not _unchecked(key_hint) and not _fits(k, key_hint, strict=False):
                self.error(item_path, f"key expected {_describe(key_hint)}, got {_show(k)}")
            out[k] = self.value(v, item_hint, item_path)
        return out

    def convert_class(self, value: Any, hint: type, path: str) -> Any:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise _Invalid("bool")
        if hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise _Invalid("int")
        if hint is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise _Invalid("float")
        if hint is str:
            if isinstance(value, str):
                return value
            raise _Invalid("str")
        if issubclass(hint, (pathlib.PurePath, os.PathLike)):
            if isinstance(value, (str, os.PathLike)):
                return value
            raise _Invalid("a path")
        if issubclass(hint, enum.Enum):
            for member in hint:
                if value == member.value or value == member.name:
                    return member
            raise _Invalid(_describe(hint))
        if isinstance(value, hint):
            return value
        if hint.__module__ in ("builtins", "datetime") or hint in (datetime.timedelta,):
            raise _Invalid(_describe(hint))
        if isinstance(value, (str, Mapping)):
            built = self.spec(value, path, hint)
            return built
        raise _Invalid(_describe(hint))


def _fits(value: Any, hint: Any, strict: bool) -> bool:
    """Whether ``value`` has the shape of ``hint`` (used to pick a union member; the chosen
    member then checks the value in depth)."""
    if _unchecked(hint):
        return not strict
    origin = typing.get_origin(hint)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return any(_fits(value, m, strict) for m in typing.get_args(hint))
    if origin is Literal:
        return any(_same(value, o) for o in typing.get_args(hint))
    if hint is _NoneType:
        return value is None
    if _is_sequence_hint(hint):
        return isinstance(value, (list, tuple))
    if _is_mapping_hint(hint):
        return isinstance(value, Mapping) and not _is_spec(value)
    if not inspect.isclass(hint):
        return not strict
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if strict:
            return isinstance(value, float)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if issubclass(hint, (pathlib.PurePath, os.PathLike)):
        return isinstance(value, hint) if strict else isinstance(value, str)
    if isinstance(value, hint):
        return True
    if issubclass(hint, enum.Enum):
        return any(value == m.value or value == m.name for m in hint)
    if hint.__module__ in ("builtins", "datetime"):
        return False
    if _is_spec(value):
        if not strict:
            return True
        try:  # with several class members, the one the class path belongs to
            return issubclass(_import_class(str(value["class_path"]), hint), hint)
        except (ConfigError, TypeError):
            return False
    return not strict and isinstance(value, str)


def _unchecked(hint: Any) -> bool:
    return (
        hint is Any
        or hint is inspect.Parameter.empty
        or isinstance(hint, (str, typing.TypeVar, typing.ForwardRef))
        or hint is object
    )


def _is_sequence_hint(hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return origin in (
        list,
        tuple,
        set,
        frozenset,
        cabc.Sequence,
        cabc.MutableSequence,
        cabc.Iterable,
        cabc.Collection,
        cabc.Set,
        cabc.MutableSet,
    )


def _is_mapping_hint(hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return origin in (dict, cabc.Mapping, cabc.MutableMapping)


def _is_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and "class_path" in value


def _same(value: Any, option: Any) -> bool:
    return type(value) is type(option) and value == option


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return _describe_union(typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(o) for o in typing.get_args(hint))
    if hint is _NoneType:
        return "null"
    if _is_sequence_hint(hint):
        args = typing.get_args(hint)
        if (typing.get_origin(hint) or hint) is tuple and args and Ellipsis not in args:
            return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0])}" if args else "a list"
    if _is_mapping_hint(hint):
        return "a mapping"
    if inspect.isclass(hint):
        if hint in (bool, int, float, str):
            return hint.__name__
        if issubclass(hint, (pathlib.PurePath, os.PathLike)):
            return "a path"
        if issubclass(hint, enum.Enum):
            return "one of " + ", ".join(repr(m.name) for m in hint)
        return f"a {hint.__name__} (class_path/init_args)"
    return str(hint)


def _describe_union(members: Sequence[Any]) -> str:
    # a union of literals reads as one list of options; null is implied ("or null")
    literals = [o for m in members if typing.get_origin(m) is Literal for o in typing.get_args(m)]
    parts: list[str] = []
    if literals:
        parts.append("one of " + ", ".join(repr(o) for o in literals))
    for member in members:
        if typing.get_origin(member) is Literal or member is _NoneType:
            continue
        text = _describe(member)
        if text not in parts:
            parts.append(text)
    if not parts:
        return "null"
    return " or ".join(parts)


# ------------------------------------------------------------------------- signatures
@dataclasses.dataclass(frozen=True)
class _Signature:
    params: dict[str, inspect.Parameter]
    hints: dict[str, Any]
    required: tuple[str, ...]
    open: bool  # accepts keyword arguments this module cannot see


def _signature_of(cls: type) -> _Signature:
    """The keyword arguments ``cls`` accepts, following ``**kwargs`` to the parent classes."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    required: list[str] = []
    open_ = False
    first = True
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            # a chain of **kwargs that ends here forwards them somewhere this module cannot see
            open_ = not first
            break
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            open_ = True
            break
        own = list(sig.parameters.values())[1:]  # drop self
        klass_hints = _hints(init)
        for p in own:
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.name in params:
                continue
            params[p.name] = p
            hints[p.name] = klass_hints.get(p.name, p.annotation)
            if first and p.default is p.empty:
                required.append(p.name)
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            break
        first = False
    return _Signature(params, hints, tuple(required), open_)


def _hints(func: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func)
    except Exception:
        pass
    # evaluate the annotations one by one; unresolvable ones stay unchecked
    out: dict[str, Any] = {}
    globalns = getattr(func, "__globals__", {})
    for name, ann in getattr(func, "__annotations__", {}).items():
        if isinstance(ann, str):
            try:
                ann = eval(ann, dict(globalns))  # the function's own annotation text
            except Exception:
                ann = Any
        out[name] = ann
    return out


# ------------------------------------------------------------------------- classes
def _import_class(class_path: str, base: type | None) -> type:
    if "." in class_path:
        return _import_dotted(class_path)
    found: list[type] = []
    for module_name in SHORT_NAME_MODULES:
        module = _try_import(module_name)
        obj = getattr(module, class_path, None) if module is not None else None
        if inspect.isclass(obj) and obj not in found and (base is None or issubclass(obj, base)):
            found.append(obj)
    if base is not None:
        for sub in _subclasses(base):
            if sub.__name__ == class_path and sub not in found:
                found.append(sub)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        paths = ", ".join(_qualname(f) for f in found)
        raise ConfigError(
            f"the short name '{class_path}' is ambiguous ({paths}); give the full import path"
        )
    if base is not None:
        other = next(
            (
                obj
                for m in SHORT_NAME_MODULES
                if (module := _try_import(m)) is not None
                and inspect.isclass(obj := getattr(module, class_path, None))
            ),
            None,
        )
        if other is not None:
            raise ConfigError(f"{_qualname(other)} is not a {base.__name__}")
    raise ConfigError(_unknown_class_message(class_path, base))


def _import_dotted(class_path: str) -> type:
    parts = class_path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                # the module exists but one of its own imports is missing
                raise ConfigError(
                    f"importing '{module_name}' for '{class_path}' failed: {exc}; install the "
                    "missing package"
                ) from exc
            continue
        except Exception as exc:
            raise ConfigError(f"importing '{module_name}' failed: {_one_line(exc)}") from exc
        for i, attr in enumerate(parts[cut:]):
            if not hasattr(obj, attr):
                names = [n for n in dir(obj) if not n.startswith("_")]
                near = _suggest(attr, names)
                owner = ".".join(parts[: cut + i])
                raise ConfigError(f"cannot import '{class_path}': '{owner}' has no '{attr}'{near}")
            obj = getattr(obj, attr)
        if not inspect.isclass(obj):
            raise ConfigError(f"'{class_path}' is a {type(obj).__name__}, not a class")
        return obj
    raise ConfigError(f"cannot import '{class_path}': no module named '{parts[0]}'")


def _try_import(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _subclasses(base: type) -> list[type]:
    seen: list[type] = []
    stack = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen


def _unknown_class_message(name: str, base: type | None) -> str:
    candidates: set[str] = set()
    for module_name in SHORT_NAME_MODULES:
        module = _try_import(module_name)
        if module is None:
            continue
        for attr in getattr(module, "__all__", dir(module)):
            obj = getattr(module, attr, None)
            if inspect.isclass(obj) and (base is None or issubclass(obj, base)):
                candidates.add(attr)
    if base is not None:
        candidates.update(c.__name__ for c in _subclasses(base) if not c.__name__.startswith("_"))
    from lightning_aw import registry

    methods = {registry.get_method(n).cls.__name__: n for n in registry.list_methods()}
    near = ""
    try:  # a registry name ('gradnorm', 'nash_mtl') names its class
        info = registry.get_method(name)
        if base is None or issubclass(info.cls, base):
            near = f"; did you mean '{info.cls.__name__}'?"
    except ValueError:
        near = _suggest(name, candidates)
    if base is None or issubclass(base, Callback) or issubclass(Callback, base):
        rest = (
            f"weighting methods: {', '.join(sorted(methods))} (`lightning-aw methods` lists "
            "them); other classes need their full import path"
        )
    else:
        rest = "other classes need their full import path (e.g. 'mypackage.module.ClassName')"
    return f"unknown class '{name}'{_hint_then(near, rest)}"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _call(cls: type, kwargs: dict[str, Any], path: str) -> Any:
    try:
        return cls(**kwargs)
    except Exception as err:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        if len(args) > 120:
            args = args[:117] + "..."
        raise ConfigError(
            f"{path or cls.__name__}: {cls.__name__}({args}) failed: "
            f"{type(err).__name__}: {_one_line(err)}"
        ) from err


# ------------------------------------------------------------------------- small helpers
def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _hint_then(near: str, rest: str) -> str:
    """A suggestion (or none) followed by more text: ``"; did you mean 'x'? More"`` or
    ``"; more"``."""
    return f"{near} {rest[:1].upper()}{rest[1:]}" if near else f"; {rest}"


def _suggest(name: str, options: Any) -> str:
    near = difflib.get_close_matches(name, sorted(map(str, options)), n=1, cutoff=0.6)
    return f"; did you mean '{near[0]}'?" if near else ""


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = repr(value)
    elif value is None:
        return "null"
    else:
        text = f"{value!r} ({type(value).__name__})"
    return text if len(text) <= 80 else text[:77] + "..."


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


# ================================================================================== top level
@dataclasses.dataclass
class _Plan:
    config: dict[str, Any]
    seed: bool | int | None


def _check_top(config: dict[str, Any], walker: _Walker) -> None:
    for key in config:
        if key not in TOP_LEVEL_KEYS:
            near = _suggest(str(key), TOP_LEVEL_KEYS)
            walker.error(
                str(key), f"unknown top-level key{near} (known: {', '.join(TOP_LEVEL_KEYS)})"
            )
    for key in ("optimizer", "lr_scheduler"):
        if config.get(key) is not None:
            walker.error(
                key,
                "LightningCLI's top-level optimizer/lr_scheduler would replace "
                "MultiTaskModule's parameter groups; set it to null and give the optimizer spec "
                "as model.init_args.optimizer (e.g. {name: adamw, lr: 0.001})",
            )
    seed = config.get("seed_everything", True)
    walker.value(seed, bool | int | None, "seed_everything")
    walker.value(config.get("ckpt_path"), str | None, "ckpt_path")
    walker.value(config.get("weights_only"), bool | None, "weights_only")
    walker.value(config.get("verbose", True), bool, "verbose")
    if config.get("model") is None:
        walker.error(
            "model",
            "missing; give the LightningModule as 'model: {class_path: ..., init_args: {...}}'",
        )
    trainer = config.get("trainer") or {}
    if not isinstance(trainer, Mapping):
        walker.error("trainer", f"expected a mapping of Trainer arguments, got {_show(trainer)}")


def _seed(value: bool | int | None) -> int | None:
    if value is False:
        return None
    return pl.seed_everything(None if value is True else value, workers=True)


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Check a whole configuration without building anything.

    Every class path is imported and every argument checked against the constructor's
    signature and type hints; all problems are reported together.

    Args:
        cfg: a configuration from :func:`load_config` (or a plain mapping).

    Returns:
        The configuration as plain Python containers, interpolations resolved.

    Raises:
        ConfigError: listing every problem, each with its full path in the file.

    Example::

        >>> cfg = {"trainer": {"max_epochs": "three"},
        ...        "model": {"class_path": "lightning_aw.models.DigitsNet"}}
        >>> try:
        ...     validate_config(cfg)
        ... except ConfigError as err:
        ...     print(err)
        trainer.max_epochs: expected int, got 'three'
    """
    config = _resolve(cfg)
    walker = _Walker(construct=False)
    _check_top(config, walker)
    trainer = config.get("trainer") or {}
    if isinstance(trainer, Mapping):
        walker.arguments(pl.Trainer, trainer, "trainer")
    if config.get("model") is not None:
        walker.spec(config["model"], "model", pl.LightningModule)
    if config.get("data") is not None:
        walker.spec(config["data"], "data", pl.LightningDataModule)
    if walker.errors:
        raise ConfigError(walker.errors)
    return config


def instantiate(spec: Mapping[str, Any] | str, base: type | None = None, path: str = "") -> Any:
    """Build one object from a ``class_path``/``init_args`` spec, with the same checks as
    :func:`build`.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}`` (or just a class name).
        base: the class the object must be an instance of (``None``: any class).
        path: where the spec sits in the configuration, for error messages.

    Returns:
        The new object.

    Raises:
        ConfigError: for an unknown class, a wrong argument name or type, or a constructor
            that fails (the message names ``path``).

    Example::

        >>> instantiate({"class_path": "GradNorm", "init_args": {"alpha": 2.0}})
        GradNorm(alpha=2.0, lr=0.025, layer=None, interval='step', frequency=1)
        >>> try:
        ...     instantiate({"class_path": "GradNorm", "init_args": {"alpah": 2.0}}, path="cb")
        ... except ConfigError as err:
        ...     print(err)
        cb.init_args.alpah: GradNorm has no argument 'alpah'; did you mean 'alpha'?
    """
    if isinstance(spec, DictConfig):
        spec = _resolve(spec)
    checker = _Walker(construct=False)
    checker.spec(spec, path, base)
    if checker.errors:
        raise ConfigError(checker.errors)
    return _Walker(construct=True).spec(spec, path, base)


# ================================================================================== building
class ConfigFileExistsError(FileExistsError):
    """:class:`SaveConfig` would overwrite the ``config.yaml`` of an earlier run.

    Example::

        >>> issubclass(ConfigFileExistsError, FileExistsError)
        True
    """


class SaveConfig(Callback):
    """Write the resolved configuration of a run as ``config.yaml`` in the Trainer's log dir.

    Like LightningCLI's ``SaveConfigCallback``: rank 0 writes it once, at the first ``setup``;
    an existing file is an error unless ``overwrite=True`` (so a run never silently replaces
    the record of another one).

    Args:
        config: the resolved configuration (plain containers).
        filename: the file name inside ``trainer.log_dir``.
        overwrite: replace an existing file.

    Raises:
        ConfigFileExistsError: at setup, when the file exists and ``overwrite`` is False.

    Example::

        >>> cb = SaveConfig({"trainer": {"max_epochs": 1}})
        >>> cb.filename
        'config.yaml'
    """

    def __init__(
        self, config: Mapping[str, Any], filename: str = "config.yaml", overwrite: bool = False
    ) -> None:
        super().__init__()
        self.config = dict(config)
        self.filename = filename
        self.overwrite = overwrite
        self._saved = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._saved:
            return
        log_dir = trainer.log_dir  # broadcast from rank 0
        if log_dir is None:
            self._saved = True
            return
        path = os.path.join(log_dir, self.filename)
        exists = bool(trainer.is_global_zero and os.path.isfile(path))
        exists = bool(trainer.strategy.broadcast(exists))
        if exists and not self.overwrite:
            raise ConfigFileExistsError(
                f"{path} exists already: it records an earlier run. Log to another directory "
                "(e.g. a new logger version or trainer.default_root_dir), delete the file, or "
                "pass --overwrite-config (SaveConfig(overwrite=True))."
            )
        if trainer.is_global_zero:
            os.makedirs(log_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(OmegaConf.to_yaml(OmegaConf.create(self.config)))
        self._saved = True


@dataclasses.dataclass
class Experiment:
    """The objects a configuration describes, ready to run.

    Args:
        trainer: the Trainer (with its callbacks and loggers).
        model: the LightningModule.
        datamodule: the LightningDataModule, or ``None`` when the model brings its own loaders.
        ckpt_path: the checkpoint to resume from (fit) or evaluate (validate/test).
        weights_only: passed to Lightning's checkpoint loading.
        verbose: print the validate/test results table.
        seed: the seed the run used (``None``: not seeded).
        config: the resolved configuration (plain containers, the seed filled in).

    Example::

        >>> exp = build({"seed_everything": 0, "trainer": {"logger": False,
        ...     "enable_progress_bar": False, "enable_checkpointing": False},
        ...     "model": {"class_path": "lightning_aw.models.DigitsNet"}})
        >>> type(exp.model).__name__, exp.datamodule, exp.seed
        ('DigitsNet', None, 0)
    """

    trainer: pl.Trainer
    model: pl.LightningModule
    datamodule: pl.LightningDataModule | None
    ckpt_path: str | None
    weights_only: bool | None
    verbose: bool
    seed: int | None
    config: dict[str, Any]

    def run(self, command: Command = "fit") -> Any:
        """Run ``trainer.fit``, ``trainer.validate`` or ``trainer.test`` on the model and data.

        Args:
            command: ``"fit"``, ``"validate"`` or ``"test"``.

        Returns:
            ``None`` for fit, the list of result dicts for validate/test.

        Raises:
            ValueError: for another command.

        Example::

            >>> exp = build({"seed_everything": 0, "trainer": {"logger": False}, "model": {
            ...     "class_path": "lightning_aw.models.DigitsNet"}})
            >>> exp.run("predict")
            Traceback (most recent call last):
            ...
            ValueError: Parameter `command` should be 'fit', 'validate' or 'test'. Found 'predict'.
        """
        common = {"datamodule": self.datamodule, "ckpt_path": self.ckpt_path}
        if self.weights_only is not None:
            common["weights_only"] = self.weights_only
        if command == "fit":
            return self.trainer.fit(self.model, **common)
        if command == "validate":
            return self.trainer.validate(self.model, verbose=self.verbose, **common)
        if command == "test":
            return self.trainer.test(self.model, verbose=self.verbose, **common)
        raise ValueError(
            f"Parameter `command` should be 'fit', 'validate' or 'test'. Found {command!r}."
        )


def build(
    cfg: DictConfig | Mapping[str, Any],
    *,
    save_config: bool = False,
    overwrite_config: bool = False,
) -> Experiment:
    """Check a configuration, then seed and build the model, data, callbacks, loggers, Trainer.

    The order is LightningCLI's: seed first, then the model, the data, the Trainer's callbacks
    and loggers, the Trainer. Nothing is built when any check fails.

    Args:
        cfg: a configuration from :func:`load_config` (or a plain mapping).
        save_config: add a :class:`SaveConfig` callback that writes the resolved configuration
            (with the seed actually used) as ``config.yaml`` into the Trainer's log dir.
        overwrite_config: let :class:`SaveConfig` replace an existing ``config.yaml``.

    Returns:
        An :class:`Experiment`; call ``.run("fit")``.

    Raises:
        ConfigError: for every problem :func:`validate_config` finds, or a constructor that
            fails (naming the path of its spec).

    Example::

        >>> exp = build({"seed_everything": 3, "trainer": {"max_epochs": 2, "logger": False},
        ...     "model": {"class_path": "lightning_aw.models.DigitsNet",
        ...               "init_args": {"optimizer": {"name": "adamw", "lr": 0.01}}}})
        >>> exp.trainer.max_epochs, exp.model.optimizer_spec
        (2, {'name': 'adamw', 'lr': 0.01})
    """
    config = validate_config(cfg)
    walker = _Walker(construct=True)
    seed = _seed(config.get("seed_everything", True))
    config["seed_everything"] = False if seed is None else seed
    model = walker.spec(config["model"], "model", pl.LightningModule)
    datamodule = None
    if config.get("data") is not None:
        datamodule = walker.spec(config["data"], "data", pl.LightningDataModule)
    trainer_args = dict(config.get("trainer") or {})
    kwargs = walker.arguments(pl.Trainer, trainer_args, "trainer")
    if kwargs is None or walker.errors:  # pragma: no cover - validate_config found these first
        raise ConfigError(walker.errors)
    if save_config:
        callbacks = kwargs.get("callbacks")
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, list):
            callbacks = [callbacks]
        kwargs["callbacks"] = [*callbacks, SaveConfig(config, overwrite=overwrite_config)]
    trainer = _call(pl.Trainer, kwargs, "trainer")
    return Experiment(
        trainer=trainer,
        model=model,
        datamodule=datamodule,
        ckpt_path=config.get("ckpt_path"),
        weights_only=config.get("weights_only"),
        verbose=bool(config.get("verbose", True)),
        seed=seed,
        config=config,
    )
