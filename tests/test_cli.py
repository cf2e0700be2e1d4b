"""The `lightning-aw` command line and LightningCLI, on the example configurations."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_aw import GradNorm, Weighting
from lightning_aw.cli import lightning_cli, main
from lightning_aw.config import build, load_config, validate_config
from lightning_aw.registry import list_methods

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
GRADNORM = ROOT / "examples" / "configs" / "digits_gradnorm.yaml"
TASKS = ("left", "right", "sum")
SCENE_TASKS = ("seg", "depth", "normal")
#: tiny data of each example data module: 2 training batches, 2 validation batches
TINY_DATA = {
    "TwoDigitsDataModule": ["train_pairs=256", "val_pairs=128", "batch_size=64"],
    "SyntheticScenesDataModule": [
        "num_train=8",
        "num_val=8",
        "height=24",
        "width=32",
        "batch_size=4",
    ],
}


def data_class(config: pathlib.Path) -> str:
    return yaml.safe_load(config.read_text())["data"]["class_path"].rpartition(".")[2]


def tasks_of(config: pathlib.Path) -> tuple[str, ...]:
    return SCENE_TASKS if data_class(config) == "SyntheticScenesDataModule" else TASKS


def tiny(tmp_path: pathlib.Path, config: pathlib.Path = GRADNORM) -> list[str]:
    """Overrides that make an example run take a few seconds, logging under tmp_path."""
    return [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.accelerator=cpu",
        f"trainer.default_root_dir={tmp_path}",
        f"trainer.logger.init_args.save_dir={tmp_path}",
        *(f"data.init_args.{o}" for o in TINY_DATA[data_class(config)]),
    ]


def run_dir(tmp_path: pathlib.Path, config: pathlib.Path, version: int = 0) -> pathlib.Path:
    name = yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]["name"]
    return tmp_path / name / f"version_{version}"


def scalars(log_dir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def check_weights_logged(
    log_dir: pathlib.Path, tasks: tuple[str, ...] = TASKS
) -> dict[str, list[tuple[int, float]]]:
    logged = scalars(log_dir)
    for task in tasks:
        values = logged.get(f"weights/{task}")
        assert values, f"no weights/{task} in {sorted(logged)}"
        assert [step for step, _ in values] == [0, 1]  # both steps of the tiny run
        assert all(math.isfinite(v) for _, v in values)
    assert "loss/total" in logged
    return logged


def test_the_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {
        "digits_gradnorm.yaml",
        "digits_pcgrad.yaml",
        "digits_uncertainty.yaml",
        "scenes_upgrad.yaml",
    } <= names


def test_the_console_script_is_declared():
    (entry,) = entry_points(group="console_scripts", name="lightning-aw")
    assert entry.load() is main


# ------------------------------------------------------------------------------- lightning-aw
@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.stem)
def test_examples_run_through_the_command(tmp_path, config):
    assert main(["fit", "--config", str(config), *tiny(tmp_path, config)]) == 0
    log_dir = run_dir(tmp_path, config)
    logged = check_weights_logged(log_dir, tasks_of(config))
    if config == GRADNORM:  # GradNorm renormalises its weights to sum to T = 3
        for i in range(2):
            assert sum(logged[f"weights/{t}"][i][1] for t in TASKS) == pytest.approx(3.0)
    if config.stem == "digits_uncertainty":  # the log-variances' group has the callback's lr
        assert logged["lr-AdamW/weighting"][0][1] == pytest.approx(0.025)
        assert logged["lr-AdamW/shared"][0][1] == pytest.approx(0.002)
    if config.stem == "scenes_upgrad":
        # UPGrad averages the T dual-cone projections of the tasks' gradients, each with a
        # coefficient of at least 1 on its own task: every task weight is at least 1/T
        for i in range(2):
            assert min(logged[f"weights/{t}"][i][1] for t in SCENE_TASKS) >= 1 / 3 - 1e-6
        # SceneNet validates with the NYUv2 metric set, once at the end of the epoch
        for tag in ("val/seg/miou", "val/depth/abs_err", "val/normal/mean"):
            ((_, value),) = logged[tag]
            assert math.isfinite(value)
    # the resolved configuration is saved next to the events, and runs again as it is
    saved = load_config(log_dir / "config.yaml")
    assert saved.trainer.max_epochs == 1 and saved.trainer.logger.init_args.save_dir == str(
        tmp_path
    )
    assert saved.seed_everything == yaml.safe_load(config.read_text())["seed_everything"]
    validate_config(saved)


def console_command() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "lightning-aw"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_aw.cli"]


def clean_env() -> dict[str, str]:
    prefixes = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "PL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def test_console_script_in_a_subprocess(tmp_path):
    # LightningCLI's spellings work too: --key value, --key=value, --ckpt_path
    overrides = [f"--{o.replace('=', ' ', 1)}" for o in tiny(tmp_path)]
    args = [a for o in overrides for a in o.split(" ", 1)]
    proc = subprocess.run(
        [*console_command(), "fit", "-c", str(GRADNORM), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_weights_logged(run_dir(tmp_path, GRADNORM))
    assert (run_dir(tmp_path, GRADNORM) / "checkpoints" / "last.ckpt").is_file()


def test_config_error_exits_2_with_one_line_in_a_subprocess(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_aw.cli",
            "fit",
            "-c",
            str(GRADNORM),
            "trainer.max_epochs=three",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "lightning-aw: error: trainer.max_epochs: expected int or null, got 'three'"
    ]
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.ddp
def test_console_script_under_ddp(tmp_path):
    # Lightning's DDP launcher re-executes the command line: the console script must survive it
    proc = subprocess.run(
        [
            *console_command(),
            "fit",
            "-c",
            str(GRADNORM),
            *tiny(tmp_path),
            "trainer.strategy=ddp",
            "trainer.devices=2",
            "data.init_args.train_pairs=512",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log_dir = run_dir(tmp_path, GRADNORM)
    logged = check_weights_logged(log_dir)  # 512 pairs / 64 / 2 ranks: steps 0 and 1
    for i in range(2):
        assert sum(logged[f"weights/{t}"][i][1] for t in TASKS) == pytest.approx(3.0)
    assert load_config(log_dir / "config.yaml").trainer.strategy == "ddp"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["digits-gradnorm"]


@pytest.mark.parametrize(
    ("args", "lines"),
    [
        (
            ["trainer.callbacks.0.init_args.alpah=2"],
            [
                "trainer.callbacks[0].init_args.alpah: GradNorm has no argument 'alpah'; did you "
                "mean 'alpha'?"
            ],
        ),
        (
            ["trainer.max_epochs=three", "model.class_path=DigitNet"],
            [
                "model.class_path: unknown class 'DigitNet'; did you mean 'DigitsNet'? Other "
                "classes need their full import path (e.g. 'mypackage.module.ClassName')",
                "trainer.max_epochs: expected int or null, got 'three'",
            ],
        ),
        (
            ["trainer.max_epochs"],
            [
                "override 'trainer.max_epochs': expected KEY=VALUE with a "
                "dotted key, like 'trainer.max_epochs=3' or "
                "'trainer.callbacks.0.init_args.alpha=2'."
            ],
        ),
        (
            ["-c", "missing.yaml"],
            ["config file 'missing.yaml' does not exist; pass the path of a YAML file."],
        ),
        (
            ["--ckpt-path", "a.ckpt", "--weights-from", "a.ckpt"],
            [
                "weights_from: give ckpt_path (resume the run) or weights_from (start a new run from "
                "the model weights), not both"
            ],
        ),
        (
            ["model.init_args.optimizer.betas=0.9"],
            ["model.init_args.optimizer.betas: expected a pair of floats, got 0.9"],
        ),
        (
            ["model.init_args.optimizer.betas=[0.9, 1.5]"],
            [
                "model.init_args.optimizer.betas: expected a pair of floats in [0, 1), got [0.9, 1.5]"
            ],
        ),
        (
            ["model.init_args.optimizer.lr=-0.1"],
            ["model.init_args.optimizer.lr: expected a number >= 0, got -0.1"],
        ),
        (
            ["model.init_args.optimizer.eps=-1e-8"],
            ["model.init_args.optimizer.eps: expected a number >= 0, got -1e-08"],
        ),
        (
            ["model.init_args.optimizer.weight_decay=-0.01"],
            ["model.init_args.optimizer.weight_decay: expected a number >= 0, got -0.01"],
        ),
        (
            ["model.init_args.optimizer={name: sgd, lr: 0.1, momentum: -0.9}"],
            ["model.init_args.optimizer.momentum: expected a number >= 0, got -0.9"],
        ),
    ],
)
def test_config_errors_exit_2_with_one_line_each(tmp_path, monkeypatch, capsys, args, lines):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", str(GRADNORM), *args]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"lightning-aw: error: {line}" for line in lines]
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # nothing created on disk: no runs/ folder, no config
    assert list(tmp_path.iterdir()) == []  # nothing written: no runs/, no version_N/


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit"])  # no --config
    assert info.value.code == 2
    assert "the following arguments are required: -c/--config" in capsys.readouterr().err
    assert main([]) == 2


def contains(full, part) -> bool:
    """Whether ``full`` holds every key of ``part`` with its value (class paths may be spelt
    in full in ``full``)."""
    if isinstance(part, dict):
        return isinstance(full, dict) and all(
            k in full
            and (
                contains(full[k], v)
                if k != "class_path"
                else full[k].rpartition(".")[2] == v.rpartition(".")[2]
            )
            for k, v in part.items()
        )
    if isinstance(part, list):
        return (
            isinstance(full, list)
            and len(full) == len(part)
            and all(contains(f, p) for f, p in zip(full, part, strict=True))
        )
    return full == part


def test_print_config_shows_the_resolved_configuration(capsys):
    config = ROOT / "examples" / "configs" / "digits_pcgrad.yaml"
    # overrides may come before the options; LightningCLI's "--key value" spelling works
    args = ["seed_everything=5", "-c", str(config), "--trainer.max_steps", "-1", "--print_config"]
    assert main(["fit", *args]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == -1
    assert printed["seed_everything"] == 5
    # ${seed_everything} is resolved after the override
    assert printed["trainer"]["callbacks"][0]["init_args"]["seed"] == 5
    assert printed["data"]["init_args"]["seed"] == 5
    original = yaml.safe_load(config.read_text())
    original["seed_everything"] = 5
    original["trainer"]["callbacks"][0]["init_args"]["seed"] = 5
    original["data"]["init_args"]["seed"] = 5
    # LightningCLI's complete configuration: the file's values and every default
    assert contains(printed, original)
    assert printed["trainer"]["max_epochs"] == 8 and printed["trainer"]["min_epochs"] is None
    assert printed["ckpt_path"] is None and printed["weights_from"] is None


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:2] == ["method", "class"]
    assert [r.split()[0] for r in rows[1:]] == list_methods()
    gradnorm = next(r for r in rows if r.startswith("gradnorm "))
    assert gradnorm.split()[1:3] == ["GradNorm", "gradients"]
    assert "Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018" in gradnorm
    assert main(["methods", "*grad*", "dwa"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows[1:]] == list_methods(["*grad*", "dwa"])
    assert main(["methods", "nothing*"]) == 1
    assert "no weighting method matches nothing*" in capsys.readouterr().err


TEST_DATA = '''
from lightning_aw.datasets import TwoDigitsDataModule


class DigitsWithTest(TwoDigitsDataModule):
    """The two-digit data with the validation pairs as a test set."""

    def test_dataloader(self):
        return self.val_dataloader()
'''


def test_validate_test_and_resume_from_a_checkpoint(tmp_path, monkeypatch):
    module = tmp_path / "aw_cli_testdata.py"
    module.write_text(TEST_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["-c", str(GRADNORM), *tiny(tmp_path)]
    assert main(["fit", *base]) == 0
    fitted = scalars(run_dir(tmp_path, GRADNORM, 0))
    last = run_dir(tmp_path, GRADNORM, 0) / "checkpoints" / "last.ckpt"
    assert last.is_file()

    # validate the checkpoint: the same weights on the same batches give the fit's val losses
    assert main(["validate", *base, "--ckpt_path", str(last)]) == 0
    validated = scalars(run_dir(tmp_path, GRADNORM, 1))
    for task in TASKS:
        assert validated[f"val/loss/{task}"][-1][1] == pytest.approx(
            fitted[f"val/loss/{task}"][-1][1], rel=1e-6
        )
    # nothing is written for validate: config.yaml records training runs
    assert not (run_dir(tmp_path, GRADNORM, 1) / "config.yaml").exists()

    # test the checkpoint on a data module whose test set is the validation set
    data = "data.class_path=aw_cli_testdata.DigitsWithTest"
    assert main(["test", *base, data, "--ckpt-path", str(last)]) == 0
    tested = scalars(run_dir(tmp_path, GRADNORM, 2))
    for task in TASKS:
        assert tested[f"test/loss/{task}"][-1][1] == pytest.approx(
            validated[f"val/loss/{task}"][-1][1], rel=1e-6
        )

    # resume: the second epoch continues at global step 2
    assert main(["fit", *base, "trainer.max_epochs=2", f"ckpt_path={last}"]) == 0
    resumed = scalars(run_dir(tmp_path, GRADNORM, 3))
    assert [step for step, _ in resumed["weights/left"]] == [2, 3]


def test_save_config_does_not_overwrite_an_earlier_run(tmp_path, capsys):
    args = ["fit", "-c", str(GRADNORM), *tiny(tmp_path), "trainer.logger.init_args.version=0"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lightning-aw: error: ")
    assert "config.yaml exists already" in line
    assert main([*args, "--overwrite-config"]) == 0


# ------------------------------------------------------------------------------- LightningCLI
@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.stem)
def test_examples_run_through_lightning_cli(tmp_path, monkeypatch, config):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse ([cli] extra)")
    monkeypatch.setattr(sys, "argv", ["lightning-aw"])
    overrides = [f"--{o}" for o in tiny(tmp_path, config)]
    cli = lightning_cli(["fit", "--config", str(config), *overrides])
    log_dir = run_dir(tmp_path, config)
    check_weights_logged(log_dir, tasks_of(config))
    (theirs,) = [c for c in cli.trainer.callbacks if isinstance(c, Weighting)]

    # LightningCLI's SaveConfigCallback wrote config.yaml; it loads and builds here too
    exp = build(load_config(log_dir / "config.yaml"))
    (ours,) = [c for c in exp.trainer.callbacks if isinstance(c, Weighting)]
    assert type(ours) is type(theirs) and repr(ours) == repr(theirs)
    if config.stem == "scenes_upgrad":
        assert ours.source == theirs.source == "representation"
    assert exp.model.optimizer_spec == cli.model.optimizer_spec
    assert type(exp.model) is type(cli.model)
    assert exp.seed == cli.config["fit"]["seed_everything"]


def test_lightning_cli_resolves_short_names_and_passes_the_optimizer_spec(monkeypatch):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse ([cli] extra)")
    monkeypatch.setattr(sys, "argv", ["lightning-aw"])
    cli = lightning_cli(
        [
            "--config",
            str(GRADNORM),
            "--trainer.logger=false",
            "--model.init_args.optimizer={name: adamw, lr: 0.01}",
        ],
        run=False,
    )
    (weighting,) = [c for c in cli.trainer.callbacks if isinstance(c, GradNorm)]
    assert (weighting.alpha, weighting.lr) == (1.5, 0.025)  # `class_path: GradNorm` in the file
    assert cli.model.optimizer_spec == {"name": "adamw", "lr": 0.01}


def test_resuming_with_another_method_fails_in_one_line_and_leaves_nothing(tmp_path, capsys):
    base = ["-c", str(GRADNORM), *tiny(tmp_path)]
    assert main(["fit", *base]) == 0
    last = run_dir(tmp_path, GRADNORM, 0) / "checkpoints" / "last.ckpt"
    runs = tmp_path / "digits-gradnorm"
    capsys.readouterr()
    pcgrad = ["~trainer.callbacks.0.init_args", "trainer.callbacks.0.class_path=PCGrad"]

    # another method: one line, exit 2, the command-line fix, no version_1/ left behind
    assert main(["fit", *base, *pcgrad, "trainer.max_epochs=2", "--ckpt-path", str(last)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "lightning-aw: error: ckpt_path: The checkpoint was trained with weighting 'GradNorm', "
        "but this run uses 'PCGrad'; resuming needs the same weighting method"
    )
    assert line.endswith(f"replace --ckpt-path {last} with --weights-from {last}")
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"]

    # the same method with other hyperparameters: its saved state does not fit either
    alpha = "trainer.callbacks.0.init_args.alpha=2"
    assert main(["fit", *base, alpha, "trainer.max_epochs=2", f"ckpt_path={last}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lightning-aw: error: ckpt_path: The checkpoint holds the state of ")
    assert "--weights-from" in line
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"]

    # the fix: a new run from the weights only, with the other method
    exp = build(load_config(GRADNORM, [*tiny(tmp_path), *pcgrad, f"weights_from={last}"]))
    saved = torch.load(last, weights_only=True)["state_dict"]
    for name, value in exp.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert exp.ckpt_path is None
    assert main(["fit", *base, *pcgrad, "--weights-from", str(last)]) == 0
    started = scalars(run_dir(tmp_path, GRADNORM, 1))
    assert [step for step, _ in started["weights/left"]] == [0, 1]  # a new run
    assert load_config(run_dir(tmp_path, GRADNORM, 1) / "config.yaml").weights_from == str(last)


def test_weights_from_a_checkpoint_that_does_not_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"nope.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    for path, message in [
        ("other.ckpt", "weights_from: the checkpoint 'other.ckpt' does not fit DigitsNet"),
        ("missing.ckpt", "weights_from: 'missing.ckpt' is not a checkpoint file"),
    ]:
        assert main(["fit", "-c", str(GRADNORM), "--weights-from", path]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"lightning-aw: error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.ckpt"]


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["fit", "--help"]])
def test_version_and_help_import_neither_torch_nor_lightning(args):
    # (the command's start-up time: see the README; measured, not timed here)
    code = (
        "import sys\nfrom lightning_aw.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
        "print(sorted(m for m in ('torch', 'lightning', 'jsonargparse') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=clean_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
