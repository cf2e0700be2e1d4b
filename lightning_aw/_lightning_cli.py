"""LightningCLI for lightning_aw (:class:`AWCLI`), and its errors as one line each with the path.

:mod:`lightning_aw.config` is the Python API over this module. A configuration is checked in
two passes, and every problem of both is reported (:class:`~lightning_aw.config.ConfigError`):

1. :func:`_check` names what jsonargparse reports without a path or a suggestion (or not at all):
   unknown top-level keys, Trainer arguments, class paths and the arguments of class specs
   (through :mod:`lightning_aw._introspect`, "did you mean"), and the optimizer spec.
2. jsonargparse parses (types, literals, interpolation); :func:`_condense` turns each of its
   errors into ``path: expected ..., got ...``, drops the faulty key and parses again.

A constructor that refuses its arguments is reported at the path of its class spec
(:func:`_failed_at`); ``weights_from`` loads a checkpoint's model weights (:func:`_load_weights`).
"""

from __future__ import annotations

import contextlib
import os
import re
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger

from lightning_aw._introspect import import_class, init_args, nearest, unknown_args
from lightning_aw.config import ConfigError, ConfigFileExistsError, _line
from lightning_aw.module import MultiTaskModule
from lightning_aw.optim import validate_optimizer_spec

__all__ = ["AWCLI", "parse_config"]


class _SaveConfig(SaveConfigCallback):
    """LightningCLI's SaveConfigCallback, refusing with :class:`ConfigFileExistsError`."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            super().setup(trainer, pl_module, stage)
        except RuntimeError as err:
            if "to NOT exist" not in str(err):
                raise
            path = os.path.join(str(trainer.log_dir), self.config_filename)
            raise ConfigFileExistsError(
                f"{path} exists already: it records an earlier run. Log to another directory "
                "(a new logger version or trainer.default_root_dir), delete the file, or pass "
                "--overwrite-config."
            ) from None


class _Parsed(Exception):
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


class AWCLI(LightningCLI):
    """LightningCLI for lightning_aw: any :class:`~lightning_aw.MultiTaskModule` as ``model``,
    OmegaConf parser mode, lightning_aw's classes by short name, errors as :class:`ConfigError`
    (one line each, with the path), and ``weights_from``: a checkpoint whose model weights (only)
    are loaded before the run, to start a new run, e.g. with another weighting method.

    Args:
        *args: LightningCLI's positional arguments.
        mode: ``"run"`` (LightningCLI's behaviour), ``"build"`` (build, run nothing) or
            ``"parse"`` (check, build nothing).
        **kwargs: LightningCLI's keyword arguments.

    Example::

        >>> from lightning_aw.config import AWCLI
        >>> trainer = {"max_epochs": 1, "logger": False, "callbacks": [{"class_path": "DWA"}]}
        >>> config = {"model": {"class_path": "lightning_aw.models.DigitsNet"}, "trainer": trainer}
        >>> cli = AWCLI(args={"subcommand": "fit", "fit": config}, mode="build")
        >>> type(cli.model).__name__, cli.trainer.max_epochs
        ('DigitsNet', 1)
        >>> type(cli.trainer.callbacks[0]).__name__
        'DWA'
    """

    def __init__(self, *args: Any, mode: str = "run", **kwargs: Any) -> None:
        import lightning_aw.aggregation
        import lightning_aw.datasets
        import lightning_aw.models
        import lightning_aw.monitor
        import lightning_aw.weighting  # noqa: F401  (their classes by short name)

        self._mode = mode
        if not args and "model_class" not in kwargs:
            kwargs.setdefault("model_class", MultiTaskModule)
            kwargs.setdefault("subclass_mode_model", True)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("parser_mode", "omegaconf")
        parser_kwargs.setdefault("exit_on_error", mode == "run")
        kwargs.setdefault("save_config_callback", _SaveConfig)
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--weights_from",
            type=str | None,
            default=None,
            help="a checkpoint whose model weights (only) start this run (not with ckpt_path)",
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if self._mode == "run" and not isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        args = dict(args)
        command = args.get("subcommand")
        config = args
        if command:  # (the same dict: a faulty key dropped from config is dropped from args)
            config = args[command] = dict(args.get(command) or {})
        sub = self._subcommand_parsers[command] if command else parser
        self.config = _parse(parser, args, config, _check(config, sub))
        if self._mode == "parse":
            ns = self.config[command] if command else self.config
            raise _Parsed(yaml.safe_load(sub.dump(ns, skip_none=False)))
        return None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as err:  # a constructor refused its arguments
            if self._mode == "run":
                raise
            config = self.config.get(str(self.subcommand), self.config)
            raise ConfigError(_failed_at(err, config.as_dict())) from err
        path = self._get(self.config, "weights_from")
        if path:
            _load_weights(self.model, str(path))

    def _run_subcommand(self, subcommand: str) -> None:
        if self._mode == "run":
            super()._run_subcommand(subcommand)


def parse_config(config: dict[str, Any], command: str) -> dict[str, Any]:
    """The complete ``config`` of LightningCLI's ``command`` (plain containers), building and
    seeding nothing; :class:`ConfigError` with every problem."""
    try:
        AWCLI(args={"subcommand": command, command: config}, mode="parse")
    except _Parsed as parsed:
        return parsed.config
    raise AssertionError("unreachable")  # pragma: no cover


def _load_weights(model: pl.LightningModule, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"weights_from: '{path}' is not a checkpoint file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    # a learnable weighting's parameters belong to the method, not to the weights
    state = {k: v for k, v in state.items() if not k.startswith("loss_weighting.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"weights_from: the checkpoint '{path}' does not fit {type(model).__name__} "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def _failed_at(err: BaseException, config: dict[str, Any]) -> str:
    """``path: Class(...) failed: message`` for the innermost constructor that raised."""
    while err.__cause__ or err.__context__:  # jsonargparse re-raises in its own words
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    for frame, _ in reversed(list(traceback.walk_tb(err.__traceback__))):
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            name = type(frame.f_locals["self"]).__name__
            path = _find(config, name, "")
            if path:
                return f"{path}: {name}(...) failed: {type(err).__name__}: {_line(err)}"
    return f"config: {type(err).__name__}: {_line(err)}"


def _find(node: Any, name: str, path: str) -> str | None:
    """The path of the first class spec whose class_path names ``name``."""
    if isinstance(node, Mapping):
        if str(node.get("class_path", "")).rpartition(".")[2] == name:
            return path
        items: Any = ((f"{path}.{k}" if path else str(k), v) for k, v in node.items())
    elif isinstance(node, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(node))
    else:
        return None
    return next((p for k, v in items if (p := _find(v, name, k))), None)


# ------------------------------------------------------------------------------ pre-check
def _check(config: dict[str, Any], parser: Any) -> list[str]:
    """What jsonargparse reports without its path or a suggestion, or not at all: top-level keys,
    Trainer arguments, class paths and arguments of class specs, the optimizer spec."""
    errors: list[str] = []
    known = sorted({a.dest.split(".")[0] for a in parser._actions} - {"help", "config"})
    known = [k for k in known if not k.startswith("print")]
    for key in config:
        if key not in known:
            hint = _dym(key, known)
            errors.append(f"{key}: unknown top-level key{hint} (known: {', '.join(known)})")
    for key in ("optimizer", "lr_scheduler"):
        if config.get(key) is not None:
            errors.append(
                f"{key}: LightningCLI's top-level optimizer/lr_scheduler would replace "
                "MultiTaskModule's parameter groups; set it to null and give the optimizer spec "
                "as model.init_args.optimizer (e.g. {name: adamw, lr: 0.001})"
            )
    if config.get("ckpt_path") and config.get("weights_from"):
        errors.append(
            "weights_from: give ckpt_path (resume the run) or weights_from (start a new run "
            "from the model weights), not both"
        )
    if config.get("model") is None:
        errors.append("model: missing; give it as 'model: {class_path: ..., init_args: {...}}'")
    trainer = config.get("trainer")
    if isinstance(trainer, Mapping):
        for name in unknown_args(pl.Trainer, trainer):
            hint = _dym(name, init_args(pl.Trainer).names)
            errors.append(f"trainer.{name}: Trainer has no argument '{name}'{hint}")
        _specs(trainer.get("logger"), "trainer.logger", Logger, errors)
        _specs(trainer.get("callbacks"), "trainer.callbacks", pl.Callback, errors)
    _specs(config.get("model"), "model", pl.LightningModule, errors)
    _specs(config.get("data"), "data", pl.LightningDataModule, errors)
    return errors


def _specs(value: Any, path: str, base: type | None, errors: list[str]) -> None:
    """Check the class specs in ``value`` (of ``base``, when given) and their arguments."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _specs(item, f"{path}[{i}]", base, errors)
        return
    if isinstance(value, str) and base is not None:
        value = {"class_path": value}
    if not isinstance(value, Mapping):
        if base is not None and value is not None and not isinstance(value, bool):
            errors.append(
                f"{path}: expected a {base.__name__} (class_path/init_args), got {value!r}"
            )
        return
    if "class_path" not in value:  # a plain mapping: class specs may lie inside
        for key, item in value.items():
            _specs(item, f"{path}.{key}", None, errors)
        return
    for key in sorted(set(value) - {"class_path", "init_args", "dict_kwargs"}):
        errors.append(
            f"{path}.{key}: unknown key in a class spec{_dym(key, ['init_args'])} A class spec "
            "has 'class_path', 'init_args' and 'dict_kwargs' (the arguments go under 'init_args')"
        )
    cls = _class(value["class_path"], base, f"{path}.class_path", errors)
    kwargs = value.get("init_args") or {}
    if cls is None or not isinstance(kwargs, Mapping):
        return
    names = init_args(cls).names
    for name in unknown_args(cls, kwargs):
        hint = _dym(name, names) or f" (it takes: {', '.join(names)})"
        errors.append(f"{path}.init_args.{name}: {cls.__name__} has no argument '{name}'{hint}")
    for name in (n for n in init_args(cls).required if n not in kwargs):
        errors.append(f"{path}.init_args: {cls.__name__} needs argument '{name}'")
    for key, item in kwargs.items():
        if issubclass(cls, MultiTaskModule) and key == "optimizer" and item is not None:
            try:
                validate_optimizer_spec(item)
            except (TypeError, ValueError, ImportError) as err:
                text = _line(err)
                where = "." if text.startswith("optimizer.") else ".optimizer: "
                errors.append(f"{path}.init_args{where}{text}")
        else:
            _specs(item, f"{path}.init_args.{key}", None, errors)


def _class(name: Any, base: type | None, path: str, errors: list[str]) -> type | None:
    """The class a class_path names (short names: among subclasses of ``base``), or None."""
    if not isinstance(name, str) or not name:
        errors.append(f"{path}: expected a class name or import path, got {name!r}")
        return None
    if "." not in name:  # a short name, resolved as LightningCLI does
        found = [c for c in _subclasses(base) if c.__name__ == name] if base else []
        if not found and base is not None:
            errors.append(f"{path}: {_unknown_class(name, base)}")
        return found[0] if len(found) == 1 else None  # (ambiguous: left to jsonargparse)
    try:
        cls = import_class(name, what="class")
    except (ImportError, ValueError) as err:
        errors.append(f"{path}: cannot import '{name}': {_line(err)}")
        return None
    if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
        what = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
        errors.append(f"{path}: {what} is not a {base.__name__ if base else 'class'}")
        return None
    return cls


def _subclasses(base: type) -> set[type]:
    return {s for sub in base.__subclasses__() for s in (sub, *_subclasses(sub))}


def _unknown_class(name: str, base: type) -> str:
    from lightning_aw import registry

    bases = (pl.Callback, pl.LightningModule, pl.LightningDataModule, Logger)
    for other in (c for b in bases for c in _subclasses(b) if c.__name__ == name):
        return f"{other.__module__}.{other.__qualname__} is not a {base.__name__}"
    try:  # a registry name ('gradnorm', 'nash_mtl') names its class
        hint = f"; did you mean '{registry.get_method(name).cls.__name__}'?"
    except ValueError:
        hint = _dym(name, {c.__name__ for c in _subclasses(base) if not c.__name__.startswith("_")})
    rest = "other classes need their full import path (e.g. 'mypackage.module.ClassName')"
    if issubclass(base, pl.Callback):
        methods = sorted(registry.get_method(n).cls.__name__ for n in registry.list_methods())
        rest = f"weighting methods: {', '.join(methods)} (`lightning-aw methods`); {rest}"
    return f"unknown class '{name}'" + (
        f"{hint} {rest[0].upper()}{rest[1:]}" if hint else f"; {rest}"
    )


def _dym(name: str, options: Any) -> str:
    near = nearest(name, options)
    return f"; did you mean '{near}'?" if near else ""


# ------------------------------------------------------------------------------ jsonargparse
def _parse(parser: Any, args: dict[str, Any], config: dict[str, Any], errors: list[str]) -> Any:
    """jsonargparse's parse after the pre-check's ``errors``; its errors condensed to one line
    with the path, all of them (a faulty key is dropped from ``config`` and ``args`` parsed
    again)."""
    # jsonargparse registers its omegaconf loader at the first string it loads; parse_object
    # may look up the loader's exceptions before that (KeyError 'omegaconf')
    with contextlib.suppress(ImportError, AttributeError):
        from jsonargparse._loaders_dumpers import set_omegaconf_loader

        set_omegaconf_loader(parser.parser_mode)
    known = [e.split(":")[0] for e in errors]
    for _ in range(20):
        try:
            result = parser.parse_object(args)
        except Exception as err:  # argparse.ArgumentError and jsonargparse's own
            message, parts = _condense(str(err), config)
            if not any(k.startswith(message.split(":")[0]) for k in known):
                errors.append(message)  # (else the pre-check said it better)
            parent = _get(config, parts[:-1]) if parts else None
            if not isinstance(parent, dict) or parts[-1] not in parent:
                break
            del parent[parts[-1]]
            continue
        if not errors:
            return result
        break
    raise ConfigError(errors)


_TYPES = {
    "NoneType": "null",
    "collections.abc.Mapping": "a mapping",
    "collections.abc.Sequence": "a list",
}


def _condense(text: str, config: dict[str, Any]) -> tuple[str, list[Any]]:
    """One line ``path: problem`` from a jsonargparse error, and the path of the faulty key in
    ``config`` as a list (empty when there is none to drop)."""
    found = re.match(r"Subcommand '\w+' does not accept option '([^']+)'", text)
    if found:
        return f"{found[1]}: unknown key", []
    found = re.match(r"the following arguments are required: (.*)", text)
    if found:
        keys = [k.strip().split(".", 1)[-1] for k in found[1].split(",")]
        return "; ".join(f"{k}: missing (required)" for k in keys), []
    keys = re.findall(r'Parser key "([^"]+)"', text)
    if not keys:
        return " ".join(text.split()), []
    parts: list[Any] = keys[0].split(".")
    value = _get(config, parts)
    if len(keys) > 1:  # inside a class spec: the item of a list whose init_args has the key
        items = value if isinstance(value, list) else [value]
        owner = next(
            (
                i
                for i, item in enumerate(items)
                if isinstance(item, Mapping) and keys[1] in (item.get("init_args") or {})
            ),
            None,
        )
        if isinstance(value, list) and owner is not None:
            parts.append(owner)
        parts += ["init_args", *keys[1:]]
        value = _get(config, parts)
    lines = text.splitlines()
    at = max(i for i, line in enumerate(lines) if f'Parser key "{keys[-1]}"' in line)
    indent = len(lines[at]) - len(lines[at].lstrip())
    inner = [ln for ln in lines[at + 1 :] if ln.strip()]
    cut = next((i for i, ln in enumerate(inner) if len(ln) - len(ln.lstrip()) <= indent), None)
    block = "\n".join([lines[at].split(":", 1)[1], *inner[:cut]])
    names, options = [], []
    for cls, literal in re.findall(
        r"Expected a (?:<class '([\w.]+)'>|typing\.Literal\[(.*)\])", block
    ):
        options += [literal] if literal else []
        name = _TYPES.get(cls, cls.rpartition(".")[2]) if cls else ""
        if name and name not in names:
            names.append(name)
    names = ([f"one of {', '.join(options)}"] if options else []) + names
    first = " ".join(block.split()).split(". Got value")[0].split(" Given value")[0]
    problem = f"expected {' or '.join(names)}" if names else first[:1].lower() + first[1:]
    shown = repr(value)
    if value is not None and not isinstance(value, str):
        shown += f" ({type(value).__name__})"
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)[1:]
    return f"{path}: {problem}, got {shown}", parts


def _get(node: Any, parts: Sequence[Any]) -> Any:
    for part in parts:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node
