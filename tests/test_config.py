"""lightning_aw.config: loading, merging, overrides, interpolation, checks and building (on
LightningCLI)."""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_aw import GradNorm, UncertaintyWeighting
from lightning_aw.config import ConfigError, build, load_config, validate_config
from lightning_aw.datasets import TwoDigitsDataModule
from lightning_aw.models import DigitsNet
from lightning_aw.registry import get_method, list_methods


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


BASE = """\
seed_everything: 0
trainer:
  max_epochs: 5
  default_root_dir: runs
  logger:
    class_path: TensorBoardLogger
    init_args:
      save_dir: ${trainer.default_root_dir}/tb
      name: base
  callbacks:
    - class_path: GradNorm
      init_args:
        alpha: 1.5
model:
  class_path: lightning_aw.models.DigitsNet
data:
  class_path: lightning_aw.datasets.TwoDigitsDataModule
  init_args:
    batch_size: 32
"""

SECOND = """\
trainer:
  max_epochs: 2
  accelerator: cpu
model:
  init_args:
    optimizer: {name: adamw, lr: 1.0e-3, weight_decay: 0.01, betas: [0.9, 0.99]}
"""


def valid_config() -> dict[str, Any]:
    """A small, valid configuration as plain containers (tests mutate a copy)."""
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [{"class_path": "GradNorm", "init_args": {"alpha": 1.5}}],
        },
        "model": {"class_path": "lightning_aw.models.DigitsNet"},
        "data": {
            "class_path": "TwoDigitsDataModule",
            "init_args": {"train_pairs": 64, "val_pairs": 32, "batch_size": 32},
        },
    }


def errors_of(cfg: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    return info.value.errors


# ------------------------------------------------------------------------------- loading
def test_files_merge_in_order_then_overrides_apply(tmp_path):
    base = write(tmp_path / "base.yaml", BASE)
    second = write(tmp_path / "second.yaml", SECOND)
    cfg = load_config(
        [base, second],
        [
            "trainer.callbacks.0.init_args.alpha=2",
            "trainer.callbacks[0].init_args.lr=0.05",
            "--trainer.log_every_n_steps=1",  # LightningCLI's spelling
            "data.init_args.batch_size=16",
            "~trainer.logger.init_args.name",
            "model.init_args.optimizer.betas=[0.8, 0.9]",
            "ckpt_path=null",
        ],
    )
    assert OmegaConf.to_container(cfg) == {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "default_root_dir": "runs",
            "logger": {
                "class_path": "TensorBoardLogger",
                "init_args": {"save_dir": "${trainer.default_root_dir}/tb"},
            },
            "callbacks": [{"class_path": "GradNorm", "init_args": {"alpha": 2, "lr": 0.05}}],
            "accelerator": "cpu",
            "log_every_n_steps": 1,
        },
        "model": {
            "class_path": "lightning_aw.models.DigitsNet",
            "init_args": {
                "optimizer": {
                    "name": "adamw",
                    "lr": 0.001,
                    "weight_decay": 0.01,
                    "betas": [0.8, 0.9],
                },
            },
        },
        "data": {
            "class_path": "lightning_aw.datasets.TwoDigitsDataModule",
            "init_args": {"batch_size": 16},
        },
        "ckpt_path": None,
    }


def test_interpolation_is_resolved_after_the_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", BASE)
    cfg = load_config(base, ["trainer.default_root_dir=/elsewhere"])
    config = validate_config(cfg)
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "/elsewhere/tb"
    # and the values handed on are plain Python containers
    assert type(config["trainer"]["callbacks"]) is list
    assert type(config["trainer"]["callbacks"][0]["init_args"]) is dict


def test_an_empty_file_merges_as_nothing(tmp_path):
    base = write(tmp_path / "base.yaml", BASE)
    empty = write(tmp_path / "empty.yaml", "# nothing yet\n")
    assert OmegaConf.to_container(load_config([base, empty])) == OmegaConf.to_container(
        load_config(base)
    )


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = write(tmp_path / "bad.yaml", "trainer:\n  max_epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"'.*bad\.yaml' is not valid YAML: .*line 3"):
        load_config(bad)
    listing = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="should hold a mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config([])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("trainer..max_epochs=3", "expected KEY=VALUE"),
        ("trainer.max epochs=3", "expected KEY=VALUE"),
        ("trainer.callbacks.3.init_args.alpha=2", "cannot set 'trainer.callbacks.3.init_args"),
        ("~trainer.nope", "'trainer.nope' does not exist"),
        ("~model.init_args.x", "'model.init_args' does not exist"),
        ("~trainer.max_epochs=3", "expected ~KEY"),
        ("trainer.max_epochs=[1, 2", "the value is not valid YAML"),
    ],
)
def test_bad_overrides_name_the_override(tmp_path, override, message):
    base = write(tmp_path / "base.yaml", BASE)
    with pytest.raises(ConfigError) as info:
        load_config(base, [override])
    text = str(info.value)
    assert text.startswith(f"override {override!r}: ")
    assert message in text


# ------------------------------------------------------------------------------- checks
def mutate(path: Sequence[str | int], value: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(valid_config())
    node: Any = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


CB = ("trainer", "callbacks")


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            mutate([*CB, 0, "init_args"], {"alpah": 2.0}),
            "trainer.callbacks[0].init_args.alpah: GradNorm has no argument 'alpah'; "
            "did you mean 'alpha'?",
        ),
        (
            mutate(["trainer", "max_epochs"], "three"),
            "trainer.max_epochs: expected int or null, got 'three'",
        ),
        (
            mutate(["trainer", "max_epoch"], 3),
            "trainer.max_epoch: Trainer has no argument 'max_epoch'; did you mean 'max_epochs'?",
        ),
        (
            mutate(["trainer", "enable_progress_bar"], "maybe"),
            "trainer.enable_progress_bar: expected bool or null, got 'maybe'",
        ),
        (
            mutate(["trainer", "accumulate_grad_batches"], 2.5),
            "trainer.accumulate_grad_batches: expected int, got 2.5 (float)",
        ),
        (
            mutate(["trainer", "gradient_clip_val"], True),
            "trainer.gradient_clip_val: expected float or int or null, got True (bool)",
        ),
        (
            mutate(["trainer", "precision"], "bf17"),
            "trainer.precision: expected one of 'transformer-engine', "
            "'transformer-engine-float16', '16-true', '16-mixed', 'bf16-true', 'bf16-mixed', "
            "'32-true', '64-true', '64', '32', '16', 'bf16' or int or null, got 'bf17'",
        ),
        (
            mutate(["trainer", "devices"], [0, "one"]),
            "trainer.devices: expected int or str, got [0, 'one'] (list)",
        ),
        (
            mutate([*CB, 0, "init_args"], {"interval": "stepp"}),
            "trainer.callbacks[0].init_args.interval: expected one of 'step', 'epoch', got 'stepp'",
        ),
        (
            mutate([*CB, 0, "init_args"], {"lr": "fast"}),
            "trainer.callbacks[0].init_args.lr: expected float, got 'fast'",
        ),
        (
            mutate(
                [*CB, 0],
                {"class_path": "UncertaintyWeighting", "init_args": {"classification": "left"}},
            ),
            "trainer.callbacks[0].init_args.classification: expected a list, got 'left'",
        ),
        (
            mutate(
                [*CB, 0],
                {
                    "class_path": "UncertaintyWeighting",
                    "init_args": {"classification": ["left", 3]},
                },
            ),
            "trainer.callbacks[0].init_args.classification: expected str, got ['left', 3] (list)",
        ),
        (
            mutate([*CB, 0], {"class_path": "GradNorm", "init_arg": {"alpha": 2.0}}),
            "trainer.callbacks[0].init_arg: unknown key in a class spec; did you mean "
            "'init_args'? A class spec has 'class_path', 'init_args' and 'dict_kwargs' (the "
            "arguments go under 'init_args')",
        ),
        (
            mutate([*CB, 0], 5),
            "trainer.callbacks[0]: expected a Callback (class_path/init_args), got 5",
        ),
        (
            mutate(["trainer", "logger"], {"class_path": "ModelCheckpoint"}),
            "trainer.logger.class_path: "
            "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint is not a Logger",
        ),
        (
            mutate(["model", "class_path"], "lightning_aw.models.DigitNet"),
            "model.class_path: cannot import 'lightning_aw.models.DigitNet': The class: module "
            "'lightning_aw.models' has no attribute 'DigitNet' (from "
            "'lightning_aw.models.DigitNet'). Did you mean 'DigitsNet'?",
        ),
        (
            mutate(["model", "class_path"], "no_such_package.models.Net"),
            "model.class_path: cannot import 'no_such_package.models.Net': The class needs the "
            "package 'no_such_package', which is not installed (no module named "
            "'no_such_package'). Install it with `pip install no_such_package`, or check the "
            "spelling of 'no_such_package.models.Net'.",
        ),
        (
            mutate(["model", "class_path"], "lightning_aw.GradNorm"),
            "model.class_path: lightning_aw.weighting._gradnorm.GradNorm is not a LightningModule",
        ),
        (
            # DigitsNet forwards **kwargs to MultiTaskModule: checked against its signature
            mutate(["model", "init_args"], {"on_nonfinte": "skip"}),
            "model.init_args.on_nonfinte: DigitsNet has no argument 'on_nonfinte'; did you "
            "mean 'on_nonfinite'?",
        ),
        (
            mutate(["model", "init_args"], {"on_nonfinite": "ignore"}),
            "model.init_args.on_nonfinite: expected one of 'raise', 'skip', got 'ignore'",
        ),
        (
            mutate(["model", "init_args"], {"optimizer": ["adam"]}),
            "model.init_args.optimizer: Parameter `optimizer` should be a mapping such as "
            "{'name': 'adam', 'lr': 1e-3}. Found list: ['adam'].",
        ),
        (
            mutate(["data", "init_args"], {"train_pair": 10}),
            "data.init_args.train_pair: TwoDigitsDataModule has no argument 'train_pair'; did "
            "you mean 'train_pairs'?",
        ),
        (
            mutate(["trainr"], {}),
            "trainr: unknown top-level key; did you mean 'trainer'? (known: ckpt_path, data, "
            "lr_scheduler, model, optimizer, seed_everything, trainer, weights_from, weights_only)",
        ),
        (
            mutate(["seed_everything"], "forty-two"),
            "seed_everything: expected bool or int, got 'forty-two'",
        ),
        (
            mutate(["ckpt_path"], 3),
            "ckpt_path: expected str or null, got 3 (int)",
        ),
        (
            mutate(["optimizer"], {"class_path": "torch.optim.Adam"}),
            "optimizer: LightningCLI's top-level optimizer/lr_scheduler would replace "
            "MultiTaskModule's parameter groups; set it to null and give the optimizer spec as "
            "model.init_args.optimizer (e.g. {name: adamw, lr: 0.001})",
        ),
        (
            mutate(["model"], None),
            "model: missing; give it as 'model: {class_path: ..., init_args: {...}}'",
        ),
    ],
)
def test_each_error_names_its_full_path(cfg, message):
    assert errors_of(cfg) == [message]


def test_the_optimizer_spec_is_checked_before_anything_is_built():
    cfg = mutate(["model", "init_args"], {"optimizer": {"name": "adamm", "lr": 0.1}})
    (message,) = errors_of(cfg)
    assert message.startswith("model.init_args.optimizer: ")
    assert "'adamm'" in message and "adam" in message.split("'adamm'", 1)[1]
    cfg = mutate(["model", "init_args"], {"optimizer": {"name": "adam", "betas2": 0.9}})
    (message,) = errors_of(cfg)
    assert message.startswith("model.init_args.optimizer: ") and "betas2" in message


def test_unknown_class_lists_the_methods_and_suggests_the_nearest():
    (message,) = errors_of(mutate([*CB, 0, "class_path"], "GradNrom"))
    assert message.startswith(
        "trainer.callbacks[0].class_path: unknown class 'GradNrom'; did you mean 'GradNorm'? "
        "Weighting methods: "
    )
    for name in list_methods():
        assert get_method(name).cls.__name__ in message
    # a registry name points at its class (LightningCLI needs the class name too)
    (message,) = errors_of(mutate([*CB, 0, "class_path"], "nash_mtl"))
    assert message.startswith(
        "trainer.callbacks[0].class_path: unknown class 'nash_mtl'; did you mean 'NashMTL'?"
    )


def test_every_problem_is_reported_at_once():
    cfg = valid_config()
    cfg["trainer"]["max_epochs"] = "three"
    cfg["trainer"]["callbacks"][0]["init_args"] = {"alpah": 1.0}
    cfg["data"]["init_args"]["batch_size"] = "big"
    errors = errors_of(cfg)  # the pre-check's (names) and jsonargparse's (types)
    assert sorted(e.split(":")[0] for e in errors) == [
        "data.init_args.batch_size",
        "trainer.callbacks[0].init_args.alpah",
        "trainer.max_epochs",
    ]


def test_interpolation_and_mandatory_value_errors_name_the_key():
    cfg = OmegaConf.create(valid_config())
    cfg.trainer.default_root_dir = "${paths.root}"
    (message,) = errors_of(cfg)
    assert message.startswith("trainer.default_root_dir: ")
    assert "paths.root" in message
    cfg = OmegaConf.create(valid_config())
    cfg.data.init_args.train_pairs = "???"
    (message,) = errors_of(cfg)
    assert message.startswith("data.init_args.train_pairs: ")
    assert "Missing mandatory value" in message


def test_a_failing_constructor_is_reported_at_its_path():
    cfg = mutate([*CB, 0, "init_args"], {"alpha": -1})
    with pytest.raises(ConfigError) as info:
        build(cfg)
    (message,) = info.value.errors
    assert message.startswith("trainer.callbacks[0]: GradNorm(...) failed: ValueError: ")
    assert "Parameter `alpha` should be >= 0" in message


def test_nothing_is_built_when_a_check_fails(monkeypatch):
    built: list[str] = []
    monkeypatch.setattr(DigitsNet, "__init__", lambda self, **kw: built.append("model"))
    cfg = mutate(["trainer", "max_epochs"], "three")
    with pytest.raises(ConfigError):
        build(cfg)
    assert built == []


# ------------------------------------------------------------------------------- building
def test_build_makes_the_objects_the_file_describes(tmp_path):
    base = write(tmp_path / "base.yaml", BASE)
    second = write(tmp_path / "second.yaml", SECOND)
    cfg = load_config(
        [base, second],
        [
            f"trainer.default_root_dir={tmp_path}",
            "trainer.callbacks.0.init_args.alpha=2",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
        ],
    )
    exp = build(cfg)
    trainer = exp.trainer
    assert trainer.max_epochs == 2
    # LightningCLI's reading (jsonargparse, `float | int`): a whole 1 is 1.0, all batches
    assert trainer.limit_val_batches == 1.0 and type(trainer.limit_val_batches) is float
    (weighting,) = [c for c in trainer.callbacks if isinstance(c, GradNorm)]
    assert (weighting.alpha, weighting.lr) == (2.0, 0.025)
    (logger,) = trainer.loggers
    assert isinstance(logger, TensorBoardLogger)
    assert pathlib.Path(logger.save_dir) == tmp_path / "tb"
    assert isinstance(exp.model, DigitsNet)
    spec = exp.model.optimizer_spec
    assert spec == {"name": "adamw", "lr": 0.001, "weight_decay": 0.01, "betas": [0.9, 0.99]}
    assert type(spec) is dict and type(spec["betas"]) is list  # no OmegaConf nodes
    assert isinstance(exp.datamodule, TwoDigitsDataModule)
    assert exp.datamodule.batch_size == 32
    assert exp.ckpt_path is None


def test_seed_everything_seeds_before_the_model_is_built():
    exp = build(mutate(["seed_everything"], 7))
    pl.seed_everything(7, workers=True)
    reference = DigitsNet()
    for (name, a), (_, b) in zip(
        exp.model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert exp.seed == 7 and exp.config["seed_everything"] == 7


def test_seed_true_draws_a_seed_and_records_it():
    exp = build(mutate(["seed_everything"], True))
    assert isinstance(exp.seed, int)
    assert exp.config["seed_everything"] == exp.seed
    pl.seed_everything(exp.seed, workers=True)
    reference = DigitsNet()
    assert torch.equal(exp.model.trunk[0].weight, reference.trunk[0].weight)
    assert build(mutate(["seed_everything"], False)).seed is None


class RecordingCallback(Callback):
    """Any imported Callback subclass resolves by its name."""

    def __init__(self, tag: str = "x") -> None:
        self.tag = tag


def test_short_names_resolve_like_lightning_cli():
    cfg = valid_config()
    cfg["trainer"]["callbacks"] = [
        "EqualWeighting",
        {"class_path": "ModelCheckpoint", "init_args": {"save_last": True}},
        {"class_path": "RecordingCallback", "init_args": {"tag": "y"}},
    ]
    cfg["trainer"]["enable_checkpointing"] = True
    cfg["model"] = "DigitsNet"
    exp = build(cfg)
    names = [type(c).__name__ for c in exp.trainer.callbacks]
    assert {"EqualWeighting", "ModelCheckpoint", "RecordingCallback"} <= set(names)
    (recorder,) = [c for c in exp.trainer.callbacks if isinstance(c, RecordingCallback)]
    assert recorder.tag == "y"
    (ckpt,) = [c for c in exp.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert ckpt.save_last is True
    assert isinstance(exp.model, DigitsNet)


class HolderNet(DigitsNet):
    """A model with assorted annotations, built from nested specs."""

    def __init__(
        self,
        metric: Metric,
        sizes: tuple[int, int] = (1, 2),
        mode: Literal["a", "b"] = "a",
        path: pathlib.Path | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.metric, self.sizes, self.mode, self.path, self.scale = metric, sizes, mode, path, scale


def test_nested_specs_are_built_and_values_converted():
    cfg = valid_config()
    cfg["model"] = {
        "class_path": f"{__name__}.HolderNet",
        "init_args": {
            "metric": {
                "class_path": "torchmetrics.classification.MulticlassAccuracy",
                "init_args": {"num_classes": 4},
            },
            "sizes": [3, 4],
            "mode": "b",
            "path": "some/dir",
            "scale": 2,
        },
    }
    model = build(cfg).model
    assert isinstance(model.metric, MulticlassAccuracy) and model.metric.num_classes == 4
    assert model.sizes == (3, 4) and model.mode == "b" and str(model.path) == "some/dir"
    assert model.scale == 2.0 and type(model.scale) is float
    cfg["model"]["init_args"]["sizes"] = [1, 2, 3]
    assert errors_of(cfg) == [
        "model.init_args.sizes: expected a tuple with 2 elements, got [1, 2, 3] (list)"
    ]
    del cfg["model"]["init_args"]["metric"]
    assert sorted(errors_of(cfg)) == [
        "model.init_args.sizes: expected a tuple with 2 elements, got [1, 2, 3] (list)",
        "model.init_args: HolderNet needs argument 'metric'",
    ]
    cfg["model"] = {"class_path": f"{__name__}.HolderNet"}
    cfg["trainer"]["callbacks"] = [{"class_path": f"{__name__}.HolderNet"}]
    assert errors_of(cfg)[0].startswith(
        "trainer.callbacks[0].class_path: test_config.HolderNet is not a Callback"
    )


class SavingNet(DigitsNet):
    """DigitsNet that records its constructor arguments as hyperparameters."""

    def __init__(self, lr: float = 2e-3, optimizer: dict[str, Any] | None = None) -> None:
        super().__init__(lr=lr, optimizer=optimizer)
        self.save_hyperparameters()


def test_save_hyperparameters_and_checkpoints_hold_plain_values(tmp_path):
    cfg = valid_config()
    cfg["model"] = {
        "class_path": f"{__name__}.SavingNet",
        "init_args": {"optimizer": {"name": "adamw", "lr": 0.003, "betas": [0.8, 0.9]}},
    }
    cfg["trainer"].update(
        enable_checkpointing=True,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=str(tmp_path),
        log_every_n_steps=1,
        logger={"class_path": "TensorBoardLogger", "init_args": {"save_dir": str(tmp_path)}},
        callbacks=[
            {"class_path": "ModelCheckpoint", "init_args": {"save_last": True}},
            {"class_path": "GradNorm", "init_args": {"alpha": 1.0}},
        ],
    )
    exp = build(OmegaConf.create(cfg), save_config=True)
    exp.run("fit")
    ckpt = next(tmp_path.rglob("last.ckpt"))
    state = torch.load(ckpt, weights_only=True)  # no OmegaConf objects inside
    expected = {"name": "adamw", "lr": 0.003, "betas": [0.8, 0.9]}
    assert state["hyper_parameters"]["optimizer"] == expected
    assert SavingNet.load_from_checkpoint(ckpt).optimizer_spec == expected
    # the resolved configuration lies next to the events, with the seed actually used
    saved = OmegaConf.to_container(
        OmegaConf.load(pathlib.Path(exp.trainer.log_dir) / "config.yaml")
    )
    assert saved["seed_everything"] == 0
    assert saved["model"]["init_args"]["optimizer"] == expected
    events = EventAccumulator(exp.trainer.log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"weights/left", "weights/right", "weights/sum"} <= set(tags)
    totals = [
        sum(events.Scalars(f"weights/{t}")[i].value for t in ("left", "right", "sum"))
        for i in range(2)
    ]
    assert totals == pytest.approx([3.0, 3.0], abs=1e-5)  # GradNorm keeps the sum at T
    # a second run in the same directory must not overwrite the record
    again = copy.deepcopy(cfg)
    again["trainer"]["logger"]["init_args"]["version"] = 0  # the first run's directory
    with pytest.raises(FileExistsError, match=r"config\.yaml exists already"):
        build(again, save_config=True).run("fit")
    build(again, save_config=True, overwrite_config=True).run("fit")


def test_uncertainty_weighting_gets_its_own_group_from_a_config(tmp_path):
    cfg = valid_config()
    cfg["trainer"].update(
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[
            {
                "class_path": "UncertaintyWeighting",
                "init_args": {"classification": ["left", "right"], "lr": 0.05},
            }
        ],
    )
    cfg["model"]["init_args"] = {"optimizer": {"name": "adamw", "lr": 0.002, "weight_decay": 0.01}}
    exp = build(cfg)
    exp.run("fit")
    (weighting,) = [c for c in exp.trainer.callbacks if isinstance(c, UncertaintyWeighting)]
    (optimizer,) = exp.trainer.optimizers
    own = {id(p) for p in weighting.module.parameters()}
    groups = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} & own]
    assert len(groups) == 1
    assert groups[0]["lr"] == 0.05 and groups[0]["weight_decay"] == 0.0
