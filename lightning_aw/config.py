"""YAML configurations run on LightningCLI: one file describes a run, in LightningCLI's spelling.

:func:`load_config` reads and merges files (later ones win key by key, a list is replaced as a
whole), applies ``KEY=VALUE`` overrides (``trainer.callbacks.0.init_args.alpha=2``) and ``~KEY``
deletions; ``${...}`` interpolations resolve afterwards, so they see every file and override.
:func:`validate_config` and :func:`build` hand the result to :class:`AWCLI`, a
:class:`~lightning.pytorch.cli.LightningCLI` (jsonargparse, OmegaConf mode), which checks and
builds it exactly as ``LightningCLI`` does with the same file; a short pre-check names the path
of misspelt classes and arguments ("did you mean"). ``lightning_aw.config.build(
load_config("run.yaml")).run("fit")`` is the ``lightning-aw fit -c run.yaml`` command in Python.

Every error is one line that starts with its path in the file, e.g.
``trainer.callbacks[0].init_args.alpah: GradNorm has no argument 'alpah'; did you mean 'alpha'?``.
The top-level ``optimizer``/``lr_scheduler`` keys of LightningCLI must stay ``null``: the
optimizer spec of a :class:`~lightning_aw.MultiTaskModule` is ``model.init_args.optimizer``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_aw._introspect import import_class, init_args, nearest, unknown_args
from lightning_aw.module import MultiTaskModule

__all__ = ["AWCLI", "ConfigError", "ConfigFileExistsError", "Experiment", "build"]
__all__ += ["load_config", "validate_config"]

PathLike = str | os.PathLike[str]
Command = Literal["fit", "validate", "test"]
_KEY = re.compile(r"^[A-Za-z_][\w\-]*(\[\d+\])*(\.[\w\-]+(\[\d+\])*)*$")


class ConfigError(ValueError):
    """An invalid configuration: one message per problem, each starting with its path.

    Example::

        >>> ConfigError(["trainer.max_epochs: expected int or null, got 'three'"]).errors
        ["trainer.max_epochs: expected int or null, got 'three'"]
    """

    def __init__(self, errors: str | Sequence[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


class ConfigFileExistsError(FileExistsError):
    """The ``config.yaml`` to save exists already: it records an earlier run.

    Example::

        >>> from lightning_aw.config import ConfigFileExistsError
        >>> issubclass(ConfigFileExistsError, FileExistsError)  # `except FileExistsError` works
        True
    """


# ------------------------------------------------------------------------------ loading
def load_config(paths: PathLike | Sequence[PathLike], overrides: Sequence[str] = ()) -> DictConfig:
    """Read YAML file(s), merge them in order, then apply ``KEY=VALUE`` / ``~KEY`` overrides.

    Values are parsed as YAML (``3``, ``0.5``, ``null``, ``[1, 2]``); list items are
    ``callbacks.0`` or ``callbacks[0]``; ``--KEY=VALUE`` (LightningCLI's spelling) works too.
    Interpolations stay unresolved until :func:`validate_config` / :func:`build`.

    Raises:
        ConfigError: a missing or invalid file, or a malformed override.

    Example::

        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.yaml"
        >>> _ = path.write_text("trainer:\\n  max_epochs: 2\\n  default_root_dir: runs\\n")
        >>> cfg = load_config(path, ["trainer.max_epochs=3", "~trainer.default_root_dir"])
        >>> OmegaConf.to_container(cfg)
        {'trainer': {'max_epochs': 3}}
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ConfigError("config: no configuration file given (pass at least one path).")
    configs = [_load_file(os.fspath(p)) for p in paths]
    cfg = OmegaConf.merge(*configs)
    assert isinstance(cfg, DictConfig)
    for item in [overrides] if isinstance(overrides, str) else overrides:
        _override(cfg, str(item))
    return cfg


def _load_file(path: str) -> DictConfig:
    if not os.path.isfile(path):
        where = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"config file '{path}' {where}; pass the path of a YAML file.")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml and OmegaConf errors name the line
        raise ConfigError(f"config file '{path}' is not valid YAML: {_line(err)}") from err
    if isinstance(loaded, DictConfig) and loaded._is_none():
        return OmegaConf.create({})
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file '{path}' should hold a mapping of keys (trainer, ...).")
    return loaded


def _override(cfg: DictConfig, item: str) -> None:
    text = item.strip().removeprefix("--")
    if text.startswith("~"):
        key = text[1:]
        if "=" in key or not _KEY.match(key):
            raise ConfigError(
                f"override {item!r}: expected ~KEY to delete a key, like '~trainer.logger'."
            )
        parent: Any = cfg
        *parents, last = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
        for i, part in enumerate(parents):
            parent = _child(parent, part)
            if parent is None:
                missing = ".".join(parents[: i + 1])
                raise ConfigError(
                    f"override {item!r}: '{missing}' does not exist, nothing to delete."
                )
        if _child(parent, last) is None and not (isinstance(parent, DictConfig) and last in parent):
            raise ConfigError(f"override {item!r}: '{key}' does not exist, nothing to delete.")
        del parent[int(last) if isinstance(parent, ListConfig) else last]
        return
    key, sep, raw = text.partition("=")
    if not sep or not _KEY.match(key.strip()):
        raise ConfigError(
            f"override {item!r}: expected KEY=VALUE with a dotted key, like "
            "'trainer.max_epochs=3' or 'trainer.callbacks.0.init_args.alpha=2'."
        )
    try:  # OmegaConf's YAML reading (1e-3 is a float)
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]  # type: ignore[index]
    except Exception as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {_line(err)}") from err
    try:
        OmegaConf.update(cfg, key.strip(), value, merge=True, force_add=True)
    except Exception as err:
        raise ConfigError(f"override {item!r}: cannot set '{key.strip()}': {_line(err)}") from err


def _child(node: Any, part: str) -> Any:
    if isinstance(node, ListConfig) and part.isdigit():
        return node._get_node(int(part)) if int(part) < len(node) else None
    return node._get_node(part) if isinstance(node, DictConfig) and part in node else None


def _line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _resolve(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Plain containers with the interpolations resolved."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except Exception as err:
        raise ConfigError(f"{getattr(err, 'full_key', None) or 'config'}: {_line(err)}") from err


# ------------------------------------------------------------------------------ LightningCLI
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
        import lightning_aw.weighting  # noqa: F401

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
        config = dict(args.get(command) or {}) if command else args
        sub = self._subcommand_parsers[command] if command else parser
        args[command or ""] = config
        self.config = _parse(parser, args, config, _check(config, sub))
        if self._mode == "parse":
            ns = self.config[command] if command else self.config
            raise _Parsed(yaml.safe_load(sub.dump(ns, skip_none=False)))
        return None

    def instantiate_classes(self) -> None:
        if self._mode == "run":
            super().instantiate_classes()
        else:
            try:
                super().instantiate_classes()
            except (TypeError, ValueError) as err:  # a constructor refused its arguments
                config = self.config.get(str(self.subcommand), self.config)
                raise ConfigError(_failed_at(err, config)) from err
        path = self._get(self.config, "weights_from")
        if path:
            _load_weights(self.model, str(path))

    def _run_subcommand(self, subcommand: str) -> None:
        if self._mode == "run":
            super()._run_subcommand(subcommand)


def _parse(parser: Any, args: dict[str, Any], config: dict[str, Any], errors: list[str]) -> Any:
    """jsonargparse's parse after the pre-check's ``errors``; its errors condensed to one line
    with the path, all of them (a faulty key is dropped and the rest parsed again)."""
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
            message, drop = _condense(str(err), config)
            path = message.split(":")[0]
            if not any(k.startswith(path) for k in known):
                errors.append(message)  # (the pre-check said it better)
            if drop is None or not drop():
                break
            continue
        if not errors:
            return result
        break
    raise ConfigError(errors)


def _failed_at(err: BaseException, config: Any) -> str:
    """``path: Class(...) failed: message`` for the innermost constructor that raised."""
    import traceback

    while err.__cause__ or err.__context__:  # jsonargparse re-raises in its own words
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    for frame, _ in reversed(list(traceback.walk_tb(err.__traceback__))):
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            name = type(frame.f_locals["self"]).__name__
            path = _find(config.as_dict(), name, "")
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


# ------------------------------------------------------------------------------ checks
def _check(config: dict[str, Any], parser: Any) -> list[str]:
    """Names jsonargparse would report without their path or a suggestion: top-level keys,
    Trainer arguments, class paths and arguments of class specs, the optimizer spec."""
    from lightning.pytorch.loggers import Logger

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
    if "class_path" not in value:
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
    for name in unknown_args(cls, kwargs):
        hint = _dym(name, init_args(cls).names) or f" (it takes: {', '.join(init_args(cls).names)})"
        errors.append(f"{path}.init_args.{name}: {cls.__name__} has no argument '{name}'{hint}")
    for name in init_args(cls).required:
        if name not in kwargs:
            errors.append(f"{path}.init_args: {cls.__name__} needs argument '{name}'")
    for key, item in kwargs.items():
        if issubclass(cls, MultiTaskModule) and key == "optimizer" and item is not None:
            from lightning_aw.optim import validate_optimizer_spec

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
    if "." in name:
        try:
            cls = import_class(name, what="class")
        except (ImportError, ValueError) as err:
            errors.append(f"{path}: cannot import '{name}': {_line(err)}")
            return None
    else:
        found = {c for c in _subclasses(base) if c.__name__ == name} if base else set()
        if not found and base is not None:
            errors.append(f"{path}: {_unknown_class(name, base)}")
        if len(found) != 1:
            return None  # ambiguous or not checkable here: left to jsonargparse
        cls = found.pop()
    if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
        what = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
        errors.append(f"{path}: {what} is not a {base.__name__ if base else 'class'}")
        return None
    return cls


def _subclasses(base: type) -> set[type]:
    found, stack = set(), [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


def _unknown_class(name: str, base: type) -> str:
    from lightning_aw import registry

    try:  # a registry name ('gradnorm', 'nash_mtl') names its class
        hint = f"; did you mean '{registry.get_method(name).cls.__name__}'?"
    except ValueError:
        hint = _dym(name, {c.__name__ for c in _subclasses(base) if not c.__name__.startswith("_")})
    bases = (pl.Callback, pl.LightningModule, pl.LightningDataModule, pl.loggers.Logger)
    for other in (c for b in bases for c in _subclasses(b) if c.__name__ == name):
        return f"{other.__module__}.{other.__qualname__} is not a {base.__name__}"
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


_TYPES = {
    "NoneType": "null",
    "collections.abc.Mapping": "a mapping",
    "collections.abc.Sequence": "a list",
}


def _condense(text: str, config: dict[str, Any]) -> tuple[str, Any]:
    """One line ``path: problem`` from a jsonargparse error, and a function dropping the
    faulty key (to look for more errors), or None."""
    found = re.match(r"Subcommand '\w+' does not accept option '([^']+)'", text)
    if found:
        return f"{found[1]}: unknown key", None
    found = re.match(r"the following arguments are required: (.*)", text)
    if found:
        keys = [k.strip().split(".", 1)[-1] for k in found[1].split(",")]
        return "; ".join(f"{k}: missing (required)" for k in keys), None
    keys = re.findall(r'Parser key "([^"]+)"', text)
    if not keys:
        return " ".join(text.split()), None
    parts: list[Any] = keys[0].split(".")
    owner, value = None, _get(config, parts)
    if len(keys) > 1:  # inside a class spec: the item of a list whose init_args has the key
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, Mapping) and keys[1] in (item.get("init_args") or {}):
                owner = i if isinstance(value, list) else None
                break
        parts = [*parts, *([] if owner is None else [owner]), "init_args", *keys[1:]]
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
    shown = (
        repr(value)
        if isinstance(value, str) or value is None
        else f"{value!r} ({type(value).__name__})"
    )
    path = ".".join(str(p) for p in parts).replace(f".{owner}.", f"[{owner}].")

    def drop() -> bool:
        parent = _get(config, parts[:-1]) if len(parts) > 1 else config
        if not isinstance(parent, dict) or parts[-1] not in parent:
            return False
        del parent[parts[-1]]
        return True

    return f"{path}: {problem}, got {shown}", drop


def _get(node: Any, parts: Sequence[Any]) -> Any:
    for part in parts:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


# ------------------------------------------------------------------------------ building
def _cli(cfg: DictConfig | Mapping[str, Any], command: Command, mode: str, **kw: Any) -> AWCLI:
    if command not in ("fit", "validate", "test"):
        raise ValueError(
            f"Parameter `command` should be 'fit', 'validate' or 'test'. Found {command!r}."
        )
    return AWCLI(args={"subcommand": command, command: _resolve(cfg)}, mode=mode, **kw)


def validate_config(
    cfg: DictConfig | Mapping[str, Any], command: Command = "fit"
) -> dict[str, Any]:
    """Check a configuration as LightningCLI's ``command`` would, building nothing.

    Returns:
        The complete configuration (every default filled in) as plain containers.

    Raises:
        ConfigError: every problem, one line each, starting with its path.

    Example::

        >>> cfg = {"trainer": {"max_epochs": "three"},
        ...        "model": {"class_path": "lightning_aw.models.DigitsNet"}}
        >>> try:
        ...     validate_config(cfg)
        ... except ConfigError as err:
        ...     print(err)
        trainer.max_epochs: expected int or null, got 'three'
    """
    try:
        _cli(cfg, command, "parse")
    except _Parsed as parsed:
        return parsed.config
    raise AssertionError("unreachable")  # pragma: no cover


class Experiment:
    """The objects a configuration describes, built by :class:`AWCLI`, ready to run.

    Attributes:
        cli: the LightningCLI (``cli.config``, ``cli.parser``, ...).
        command: the subcommand it was parsed for.

    Example::

        >>> from lightning_aw.config import build
        >>> exp = build({"trainer": {"max_epochs": 1, "logger": False},
        ...     "model": {"class_path": "lightning_aw.models.DigitsNet"}}, "validate")
        >>> exp.command, type(exp.model).__name__, exp.ckpt_path
        ('validate', 'DigitsNet', None)
    """

    def __init__(self, cli: AWCLI, command: Command) -> None:
        self.cli, self.command = cli, command
        self.trainer, self.model, self.datamodule = cli.trainer, cli.model, cli.datamodule
        self.config: dict[str, Any] = cli.config[command].as_dict()
        seed = self.config.get("seed_everything")
        self.seed: int | None = None if seed is False or seed is None else int(seed)
        self.ckpt_path: str | None = self.config.get("ckpt_path")

    def run(self, command: Command | None = None) -> Any:
        """Run ``trainer.fit``, ``validate`` or ``test`` (default: the command built for)."""
        command = command or self.command
        # the first folder of the log directory this run creates (removed after a failed start)
        new = log_dir = self.trainer.log_dir  # (not yet written: the loggers start at setup)
        while log_dir and not os.path.exists(log_dir):
            new, log_dir = log_dir, os.path.dirname(os.path.abspath(log_dir))
        self._created = None if new == log_dir else new
        kwargs: dict[str, Any] = {"datamodule": self.datamodule, "ckpt_path": self.ckpt_path}
        if self.config.get("weights_only") is not None:
            kwargs["weights_only"] = self.config["weights_only"]
        if command in ("validate", "test"):
            kwargs["verbose"] = self.config.get("verbose", True)
        elif command != "fit":
            raise ValueError(
                f"Parameter `command` should be 'fit', 'validate' or 'test'. Found {command!r}."
            )
        return getattr(self.trainer, command)(self.model, **kwargs)

    def remove_new_log_dir(self) -> None:
        """After a failed start: remove the log directory :meth:`run` created (rank 0)."""
        if getattr(self, "_created", None) and self.trainer.is_global_zero:
            shutil.rmtree(self._created, ignore_errors=True)


def build(
    cfg: DictConfig | Mapping[str, Any],
    command: Command = "fit",
    *,
    save_config: bool = False,
    overwrite_config: bool = False,
) -> Experiment:
    """Check a configuration, then seed and build model, data and Trainer (LightningCLI's order).

    Args:
        cfg: from :func:`load_config`, or a plain mapping.
        command: the LightningCLI subcommand whose arguments the configuration has.
        save_config: save the resolved configuration as ``config.yaml`` in the log directory.
        overwrite_config: replace an existing ``config.yaml`` (else ConfigFileExistsError).

    Raises:
        ConfigError: every problem :func:`validate_config` finds.

    Example::

        >>> exp = build({"seed_everything": 3, "trainer": {"max_epochs": 2, "logger": False},
        ...     "model": {"class_path": "lightning_aw.models.DigitsNet",
        ...               "init_args": {"optimizer": {"name": "adamw", "lr": 0.01}}}})
        >>> exp.trainer.max_epochs, exp.model.optimizer_spec, exp.seed
        (2, {'name': 'adamw', 'lr': 0.01}, 3)
    """
    kw: dict[str, Any] = {"save_config_kwargs": {"overwrite": overwrite_config}}
    if not save_config:
        kw["save_config_callback"] = None
    return Experiment(_cli(cfg, command, "build", **kw), command)
