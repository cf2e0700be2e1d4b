"""YAML configurations run on LightningCLI: one file describes a run, in LightningCLI's spelling.

:func:`load_config` reads and merges files (later ones win key by key, a list is replaced as a
whole), applies ``KEY=VALUE`` overrides (``trainer.callbacks.0.init_args.alpha=2``) and ``~KEY``
deletions; ``${...}`` interpolations resolve afterwards, so they see every file and override.
:func:`validate_config` and :func:`build` hand the result to :class:`AWCLI`, a
:class:`~lightning.pytorch.cli.LightningCLI` (jsonargparse, OmegaConf mode), which checks and
builds it exactly as ``LightningCLI`` does with the same file; a short pre-check names the path
of misspelt classes and arguments ("did you mean"). That machinery lives in the private
``lightning_aw._lightning_cli`` (imported on first use). ``lightning_aw.config.build(
load_config("run.yaml")).run("fit")`` is the ``lightning-aw fit -c run.yaml`` command in Python.

Every error is one line that starts with its path in the file, e.g.
``trainer.callbacks[0].init_args.alpah: GradNorm has no argument 'alpah'; did you mean 'alpha'?``.
The top-level ``optimizer``/``lr_scheduler`` keys of LightningCLI must stay ``null``: the
optimizer spec of a :class:`~lightning_aw.MultiTaskModule` is ``model.init_args.optimizer``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

if TYPE_CHECKING:  # the LightningCLI machinery (torch, Lightning) is imported on first use
    from lightning_aw._lightning_cli import AWCLI

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
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file '{path}' should hold a mapping of keys (trainer, ...).")
    return loaded


def _override(cfg: DictConfig, item: str) -> None:
    text = item.strip().removeprefix("--")
    if text.startswith("~"):
        key = text[1:]
        if not _KEY.match(key):
            raise ConfigError(
                f"override {item!r}: expected ~KEY to delete a key, like '~trainer.logger'."
            )
        node, parts = cfg, re.sub(r"\[(\d+)\]", r".\1", key).split(".")
        for i, part in enumerate(parts):
            parent, node = node, _child(node, part)
            if node is None:  # the first missing key (its own spelling when it is the last)
                missing = key if i == len(parts) - 1 else ".".join(parts[: i + 1])
                raise ConfigError(
                    f"override {item!r}: '{missing}' does not exist, nothing to delete."
                )
        del parent[int(parts[-1]) if isinstance(parent, ListConfig) else parts[-1]]
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


def __getattr__(name: str) -> Any:
    if name == "AWCLI":  # re-exported from the private module, imported on first use
        from lightning_aw._lightning_cli import AWCLI

        return AWCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _command(command: str) -> Command:
    if command not in ("fit", "validate", "test"):
        raise ValueError(
            f"Parameter `command` should be 'fit', 'validate' or 'test'. Found {command!r}."
        )
    return command  # type: ignore[return-value]


# ------------------------------------------------------------------------------ building


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
    from lightning_aw._lightning_cli import parse_config

    return parse_config(_resolve(cfg), _command(command))


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
        command = _command(command or self.command)
        # the first folder of the log directory this run creates (removed after a failed start)
        new = log_dir = self.trainer.log_dir  # (not yet written: the loggers start at setup)
        while log_dir and not os.path.exists(log_dir):
            new, log_dir = log_dir, os.path.dirname(os.path.abspath(log_dir))
        self._created = None if new == log_dir else new
        kwargs: dict[str, Any] = {"datamodule": self.datamodule, "ckpt_path": self.ckpt_path}
        if self.config.get("weights_only") is not None:
            kwargs["weights_only"] = self.config["weights_only"]
        if command != "fit":
            kwargs["verbose"] = self.config.get("verbose", True)
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
    from lightning_aw._lightning_cli import AWCLI

    kw: dict[str, Any] = {"save_config_kwargs": {"overwrite": overwrite_config}}
    if not save_config:
        kw["save_config_callback"] = None
    args = {"subcommand": _command(command), command: _resolve(cfg)}
    return Experiment(AWCLI(args=args, mode="build", **kw), command)
