"""The ``lightning-aw`` command line, and LightningCLI with lightning_aw's defaults.

.. code-block:: bash

    lightning-aw fit --config examples/configs/digits_gradnorm.yaml trainer.max_epochs=3
    lightning-aw fit -c base.yaml -c gradnorm.yaml trainer.callbacks.0.init_args.alpha=2
    lightning-aw fit -c run.yaml --print-config          # the resolved YAML, then exit
    lightning-aw validate -c run.yaml --ckpt-path runs/digits/version_0/checkpoints/last.ckpt
    lightning-aw test -c run.yaml ckpt_path=best.ckpt
    lightning-aw methods "*grad*"                        # the registered weighting methods

``fit``, ``validate`` and ``test`` run on LightningCLI (:class:`lightning_aw.config.AWCLI`,
jsonargparse in OmegaConf mode): several ``--config`` files are merged in order, then the
``KEY=VALUE`` overrides (``~KEY`` deletes; LightningCLI's ``--trainer.max_epochs=3`` spelling
works too), then ``${...}`` interpolations resolve. ``fit`` saves the resolved configuration as
``config.yaml`` in the log directory. Every error (configuration, optimizer spec, a checkpoint
trained with another weighting method) exits with status 2 before anything is written, one
line per problem on stderr, naming its path in the file. ``--weights-from PATH`` starts a new
run from a checkpoint's model weights only (e.g. to switch the weighting method), where
``--ckpt-path`` resumes the run. ``python -m lightning_aw.cli`` is the same command.

The same files run with Lightning's own :class:`~lightning.pytorch.cli.LightningCLI`;
:func:`lightning_cli` builds the one above for any :class:`~lightning_aw.MultiTaskModule`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # nothing heavy at import: --help and --version stay fast
    from lightning_aw._lightning_cli import AWCLI

__all__ = ["lightning_cli", "main"]

PROG = "lightning-aw"
_RUN_COMMANDS = ("fit", "validate", "test")
# our own options (everything else that starts with "--" is a LightningCLI-style override)
_VALUE_OPTIONS = ("--config", "-c", "--ckpt-path", "--weights-from")
_FLAG_OPTIONS = ("--print-config", "--no-save-config", "--overwrite-config", "--help", "-h")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-aw`` command line.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when ``methods`` matches nothing, 2 for a usage or
        configuration error (reported on stderr as ``lightning-aw: error: <path>: <problem>``,
        one line per problem, no traceback).

    Raises:
        SystemExit: from ``--help`` and ``--version`` (status 0), and from argparse for a
            malformed command line (status 2, with the usage).

    Example::

        >>> main(["methods", "equal", "upgrad"])
        method  class           uses       weights sum  interval  state      paper
        equal   EqualWeighting  losses     T            -         stateless  -
        upgrad  UPGrad          gradients  -            step      stateless  Quinton & Rey, 2024
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if args and args[0] in _RUN_COMMANDS:
        args = [args[0], *_normalise(args[1:])]
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return 2
    if ns.command == "methods":
        return _methods(ns.pattern)
    return _run(ns)


def _parser() -> argparse.ArgumentParser:
    from lightning_aw import __version__  # the package imports its classes lazily

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, validate or test a lightning_aw multi-task model from YAML files.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{fit,validate,test,methods}")
    helps = {
        "fit": "train (resume with ckpt_path)",
        "validate": "run the validation loop (of a checkpoint with --ckpt-path)",
        "test": "run the test loop (of a checkpoint with --ckpt-path)",
    }
    for name, text in helps.items():
        cmd = sub.add_parser(
            name,
            help=text,
            description=f"{text}. Configuration: merged --config files, then the overrides.",
            epilog=(
                "overrides: KEY=VALUE (YAML value; list items as callbacks.0 or callbacks[0]), "
                "~KEY to delete a key, or LightningCLI's --KEY=VALUE / --KEY VALUE"
            ),
        )
        cmd.add_argument(
            "-c",
            "--config",
            action="append",
            required=True,
            metavar="PATH",
            help="a YAML configuration file (repeat to merge several, later ones win)",
        )
        cmd.add_argument(
            "--ckpt-path",
            default=None,
            metavar="PATH",
            help="checkpoint to resume from (fit) or to evaluate; same as ckpt_path=PATH",
        )
        cmd.add_argument(
            "--weights-from",
            default=None,
            metavar="PATH",
            help="start a new run from a checkpoint's model weights only (no optimizer, loop or "
            "weighting state), e.g. with another weighting method; same as weights_from=PATH",
        )
        cmd.add_argument(
            "--print-config",
            action="store_true",
            help="check the configuration, print it resolved (YAML) and exit",
        )
        cmd.add_argument(
            "--no-save-config",
            action="store_true",
            help="do not write config.yaml into the log directory",
        )
        cmd.add_argument(
            "--overwrite-config",
            action="store_true",
            help="replace an existing config.yaml in the log directory",
        )
        cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides")
    methods = sub.add_parser("methods", help="list the registered weighting methods")
    methods.add_argument(
        "pattern", nargs="*", help="wildcard patterns, e.g. '*grad*' (default: all)"
    )
    return parser


def _normalise(args: Sequence[str]) -> list[str]:
    """Our options first, then the overrides (so they may come in any order), with
    LightningCLI-style ``--trainer.max_epochs=3`` / ``--trainer.max_epochs 3`` turned into
    ``trainer.max_epochs=3``; everything after ``--`` is an override."""
    options: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        has_value = i + 1 < len(args) and _is_value(args[i + 1])
        if arg == "--":
            overrides.extend(args[i + 1 :])
            break
        if name in ("--ckpt_path", "--print_config", "--weights_from"):  # LightningCLI's spelling
            arg = arg.replace("_", "-", 1)
            name = arg.split("=", 1)[0]
        if name in _VALUE_OPTIONS:
            options.append(arg)
            if "=" not in arg and i + 1 < len(args):
                options.append(args[i + 1])
                i += 1
        elif name in _FLAG_OPTIONS or not arg.startswith("-"):
            (options if arg.startswith("-") else overrides).append(arg)
        elif arg.startswith("--") and len(name) > 2:
            if "=" in arg:
                overrides.append(arg[2:])
            elif has_value:
                overrides.append(f"{arg[2:]}={args[i + 1]}")
                i += 1
            else:
                options.append(arg)  # argparse reports it
        else:
            options.append(arg)  # argparse reports it
        i += 1
    return [*options, *overrides]


def _is_value(arg: str) -> bool:
    """Whether ``arg`` is a value (not an option): negative numbers are values."""
    return not arg.startswith("-") or bool(re.match(r"^-\.?\d", arg))


def _run(ns: argparse.Namespace) -> int:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_aw.config import (
        ConfigError,
        ConfigFileExistsError,
        build,
        load_config,
        validate_config,
    )

    overrides = list(ns.overrides)
    for key in ("ckpt_path", "weights_from"):
        if getattr(ns, key) is not None:
            overrides.append(f"{key}={_quote(getattr(ns, key))}")
    try:
        cfg = load_config(ns.config, overrides)
        if ns.print_config:
            import yaml

            sys.stdout.write(yaml.safe_dump(validate_config(cfg, ns.command), sort_keys=False))
            return 0
        save = ns.command == "fit" and not ns.no_save_config
        experiment = build(cfg, ns.command, save_config=save, overwrite_config=ns.overwrite_config)
    except ConfigError as err:
        return _error(*err.errors)
    try:
        experiment.run()
    except ConfigFileExistsError as err:  # raised before training starts, nothing written
        return _error(str(err))
    except MisconfigurationException as err:
        if not str(err).startswith("The checkpoint "):
            raise
        # the checkpoint does not fit this run (restored before any step): a failed start
        experiment.remove_new_log_dir()
        return _error(_checkpoint_advice(str(err), experiment.ckpt_path))
    return 0


def _error(*lines: str) -> int:
    for line in lines:
        print(f"{PROG}: error: {' '.join(line.split())}", file=sys.stderr)
    return 2


def _checkpoint_advice(message: str, ckpt_path: str | None) -> str:
    """One line: the checkpoint's problem, then the command-line way out."""
    first = " ".join(message.split()).split(". ")[0].rstrip(".")
    if "weighting" not in first and "holds the state of" not in first:
        return f"ckpt_path: {first}"
    path = _quote(ckpt_path or "PATH").strip("'") if ckpt_path else "PATH"
    return (
        f"ckpt_path: {first}; resuming needs the same weighting method and hyperparameters. To "
        f"start a new run from these weights instead, replace --ckpt-path {path} with "
        f"--weights-from {path}"
    )


def _quote(value: str) -> str:
    # a path as a YAML string, whatever characters it holds
    return "'" + value.replace("'", "''") + "'"


def _methods(patterns: Sequence[str]) -> int:
    from lightning_aw.registry import list_methods, methods_table

    names = list_methods(list(patterns) if patterns else None)
    if not names:
        print(
            f"{PROG}: no weighting method matches {' '.join(patterns)}; registered: "
            f"{', '.join(list_methods())}",
            file=sys.stderr,
        )
        return 1
    print(methods_table(names))
    return 0


def lightning_cli(args: Sequence[str] | None = None, **kwargs: Any) -> AWCLI:
    """A :class:`~lightning.pytorch.cli.LightningCLI` for lightning_aw models and configs.

    :class:`lightning_aw.config.AWCLI`: any :class:`~lightning_aw.MultiTaskModule` subclass as
    ``model.class_path``, any LightningDataModule as ``data.class_path`` (optional),
    ``parser_mode="omegaconf"`` (``${...}`` interpolation), short class names of
    :mod:`lightning_aw` (``GradNorm``, ``DigitsNet``, ...), and ``--weights_from``. Every keyword
    argument is passed to LightningCLI and overrides the defaults.

    Args:
        args: the command line (e.g. ``["fit", "--config", "run.yaml"]``); default
            ``sys.argv[1:]``.
        **kwargs: LightningCLI arguments (``run=False``, ``save_config_kwargs=...``, ...).

    Returns:
        The LightningCLI (after running its subcommand unless ``run=False``).

    Example::

        >>> cli = lightning_cli(["--model=lightning_aw.models.DigitsNet",
        ...                      "--trainer.logger=false"], run=False)
        >>> type(cli.model).__name__
        'DigitsNet'
    """
    from lightning_aw._lightning_cli import AWCLI

    return AWCLI(args=None if args is None else list(args), **kwargs)


if __name__ == "__main__":
    sys.exit(main())
