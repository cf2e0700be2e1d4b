"""lightning_aw.optim: optimizer registry, named parameter groups, spec overrides, schedulers."""

from __future__ import annotations

import math
import re

import lightning.pytorch as pl
import pytest
import torch
from _helpers import TASKS, TinyNet, loader, params, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from torch import nn

from lightning_aw import MultiTaskModule, UncertaintyWeighting
from lightning_aw.optim import (
    OptimizerInfo,
    _registry,
    build_optimizers,
    create_optimizer,
    create_scheduler,
    get_optimizer,
    list_optimizers,
    list_schedulers,
    named_param_groups,
    register_optimizer,
    validate_optimizer_spec,
)

BUILTIN = ["sgd", "adam", "adamw", "adagrad", "rmsprop", "adadelta", "adamax", "nadam", "radam"]


class GroupedNet(TinyNet):
    """TinyNet with per-task head groups, one extra trainable scalar (-> "other") and a frozen
    layer (-> no group)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gain = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(2, 2).requires_grad_(False)

    def task_parameters(self):
        return {t: self.heads[t].parameters() for t in self.tasks}

    def task_losses(self, batch, batch_idx):
        out = super().task_losses(batch, batch_idx)
        return {t: None if v is None else v * self.gain for t, v in out.items()}


def expected_groups(net: GroupedNet, weighting=None) -> dict[str, set[int]]:
    """Group membership by hand, from the module's attributes."""
    groups = {"shared": {id(p) for p in net.trunk.parameters()}}
    groups.update({f"task/{t}": {id(p) for p in net.heads[t].parameters()} for t in net.tasks})
    groups["other"] = {id(net.gain)}
    if weighting is not None:
        groups["weighting"] = {id(p) for p in weighting.module.parameters()}
    return groups


def by_name(opt: torch.optim.Optimizer) -> dict[str, dict]:
    names = [g["name"] for g in opt.param_groups]
    assert len(names) == len(set(names)), names
    return {g["name"]: g for g in opt.param_groups}


class LrRecorder(pl.Callback):
    """The learning rate of every group at the start of each training batch."""

    def __init__(self):
        self.lrs: list[dict[str, float]] = []
        self.epochs: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append({g["name"]: float(g["lr"]) for g in trainer.optimizers[0].param_groups})
        self.epochs.append(trainer.current_epoch)


# ---------------------------------------------------------------------------------- registry
def test_registry_has_builtins_and_lazy_optional_entries():
    names = list_optimizers()
    assert set(BUILTIN) <= set(names)
    for name in BUILTIN:
        info = get_optimizer(name)
        assert info.package is None and info.available
        assert info.load().__module__.startswith("torch.optim")
    assert get_optimizer("sgd").adaptive is False and get_optimizer("sgd").step_rule is None
    assert get_optimizer("adamw").step_rule == "adam"
    assert get_optimizer("adamw").state_keys == ("step", "exp_avg_sq")
    optional = {n: get_optimizer(n) for n in ("adamw_schedulefree", "prodigy", "lion")}
    assert {n: i.package for n, i in optional.items()} == {
        "adamw_schedulefree": "schedulefree",
        "prodigy": "prodigyopt",
        "lion": "lion-pytorch",
    }
    assert all(isinstance(i.cls, str) for i in optional.values())  # not imported to be listed
    assert optional["lion"].adaptive is False and optional["adamw_schedulefree"].train_eval_modes
    assert list_optimizers("*adam") == ["adam", "nadam", "radam"]
    assert list_optimizers(["sgd*", "LION"]) == ["lion", "sgd", "sgd_schedulefree"]
    assert "momentum" in get_optimizer("sgd").accepted_args()


def test_register_optimizer_by_name_and_record(monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    info = register_optimizer("plain_adam", "torch.optim.Adam", step_rule="adam")
    assert get_optimizer("plain_adam") is info and info.load() is torch.optim.Adam
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer(OptimizerInfo("plain_adam", torch.optim.SGD))
    register_optimizer(OptimizerInfo("plain_adam", torch.optim.SGD), overwrite=True)
    assert get_optimizer("plain_adam").load() is torch.optim.SGD
    with pytest.raises(ValueError, match="Parameter `cls` is needed"):
        register_optimizer("nocls")
    with pytest.raises(ValueError, match="Parameter `name`"):
        OptimizerInfo("Bad-Name", torch.optim.SGD)
    with pytest.raises(ValueError, match="Parameter `step_rule`"):
        OptimizerInfo("x", torch.optim.SGD, step_rule="lamb")
    with pytest.raises(ValueError, match="Parameter `cls`"):
        OptimizerInfo("x", nn.Linear)


@pytest.mark.parametrize("name", list_optimizers())
def test_every_registered_optimizer_trains_with_exact_groups(tmp_path, name):
    info = get_optimizer(name)
    if not info.available:
        pytest.skip(f"optional package {info.package!r} is not installed")
    base_lr = info.example_kwargs["lr"]
    task_lr, uw_lr = (base_lr / 2, 0.05) if info.per_group_lr else (base_lr, None)
    spec = {"name": name, **info.example_kwargs, "groups": {"task/*": {"lr": task_lr}}}
    net = GroupedNet(optimizer=spec)
    before = params(net)
    uw = UncertaintyWeighting(lr=uw_lr)
    t = trainer(tmp_path, [uw], max_epochs=1)
    t.fit(net, loader())
    (opt,) = t.optimizers
    assert type(opt) is info.load()
    groups = by_name(opt)
    got = {n: {id(p) for p in g["params"]} for n, g in groups.items()}
    assert got == expected_groups(net, uw)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(len(s) for s in got.values())
    assert id(net.frozen.weight) not in set().union(*got.values())
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert set().union(*got.values()) == trainable
    assert groups["shared"]["lr"] == base_lr and groups["other"]["lr"] == base_lr
    assert all(groups[f"task/{k}"]["lr"] == task_lr for k in TASKS)
    assert groups["weighting"]["lr"] == (uw_lr or base_lr)
    assert groups["weighting"]["weight_decay"] == 0.0
    after = params(net)
    for key in ("trunk.0.weight", "heads.a.weight", "gain"):
        assert not torch.equal(before[key], after[key]), (name, key)
        assert torch.isfinite(after[key]).all()
    torch.testing.assert_close(after["frozen.weight"], before["frozen.weight"], rtol=0, atol=0)
    if info.adaptive and info.step_rule is not None:
        state = opt.state[net.trunk[0].weight]
        assert all(k in state for k in info.state_keys)


def test_groups_without_hooks_are_other_and_weighting(tmp_path):
    net = TinyNet()  # shared_parameters only: the heads go to "other"
    groups = named_param_groups(net)
    assert list(groups) == ["shared", "other"]
    assert [id(p) for p in groups["other"]] == [id(p) for p in net.heads.parameters()]

    class NoHooks(TinyNet):
        shared_parameters = MultiTaskModule.shared_parameters  # the default: not implemented

    net = NoHooks()
    trainer(tmp_path, [UncertaintyWeighting()], max_epochs=1).fit(net, loader(64))
    opt = net.trainer.optimizers[0]
    assert [g["name"] for g in opt.param_groups] == ["other", "weighting"]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [
        id(p) for n, p in net.named_parameters() if not n.startswith("loss_weighting")
    ]


def test_overrides_patterns_then_exact_names(tmp_path):
    spec = {
        "name": "adamw",
        "lr": 0.01,
        "weight_decay": 0.1,
        "groups": {
            "task/b": {"lr": 0.03},
            "task/*": {"lr": 0.02, "weight_decay": 0.0},
            "shared": {"lr": 0.005, "betas": (0.8, 0.99)},
        },
    }
    net = GroupedNet(optimizer=spec)
    trainer(tmp_path, max_epochs=1).fit(net, loader(64))
    g = by_name(net.trainer.optimizers[0])
    assert (g["shared"]["lr"], g["shared"]["weight_decay"], g["shared"]["betas"]) == (
        0.005,
        0.1,
        (0.8, 0.99),
    )
    assert (g["task/a"]["lr"], g["task/a"]["weight_decay"]) == (0.02, 0.0)
    assert (g["task/b"]["lr"], g["task/b"]["weight_decay"]) == (0.03, 0.0)  # exact name wins
    assert (g["other"]["lr"], g["other"]["weight_decay"]) == (0.01, 0.1)


def test_weighting_group_lr_from_callback_or_spec(tmp_path):
    spec = {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "groups": {"weighting": {"lr": 0.2}}}
    net = GroupedNet(optimizer=spec)
    uw = UncertaintyWeighting()  # lr None: the spec's group lr applies
    trainer(tmp_path, [uw], max_epochs=1).fit(net, loader(64))
    g = by_name(net.trainer.optimizers[0])["weighting"]
    assert (g["lr"], g["weight_decay"]) == (0.2, 0.0)
    net = GroupedNet(optimizer=spec)
    with pytest.raises(
        ValueError, match=r"learning rate is set twice: UncertaintyWeighting.*0\.05"
    ):
        trainer(tmp_path, [UncertaintyWeighting(lr=0.05)], max_epochs=1).fit(net, loader(64))


def test_omegaconf_and_class_path_specs(tmp_path):
    spec = OmegaConf.create(
        {
            "class_path": "torch.optim.AdamW",
            "init_args": {"lr": 0.01, "betas": [0.85, 0.99]},
            "groups": {"shared": {"lr": "${init_args.lr}"}},
            "scheduler": {
                "class_path": "torch.optim.lr_scheduler.StepLR",
                "init_args": {"step_size": 3},
            },
        }
    )
    net = GroupedNet(optimizer=spec)
    assert net.optimizer_spec == {
        "class_path": "torch.optim.AdamW",
        "init_args": {"lr": 0.01, "betas": [0.85, 0.99]},
        "groups": {"shared": {"lr": 0.01}},
        "scheduler": {
            "class_path": "torch.optim.lr_scheduler.StepLR",
            "init_args": {"step_size": 3},
        },
    }
    assert type(net.optimizer_spec["groups"]) is dict
    trainer(tmp_path, max_epochs=1).fit(net, loader(64))
    assert type(net.trainer.optimizers[0]) is torch.optim.AdamW
    assert type(net.trainer.lr_scheduler_configs[0].scheduler).__name__ == "StepLR"
    net = GroupedNet(optimizer={"name": "torch.optim.SGD", "lr": 0.1})
    trainer(tmp_path, max_epochs=1).fit(net, loader(64))
    assert type(net.trainer.optimizers[0]) is torch.optim.SGD


def test_create_optimizer_from_params_and_dicts():
    lin = nn.Linear(3, 2)
    opt = create_optimizer(lin.parameters(), {"name": "rmsprop", "lr": 0.1})
    assert len(opt.param_groups) == 1 and "name" not in opt.param_groups[0]
    groups = [{"params": iter([lin.weight]), "name": "w"}, {"params": lin.bias, "name": "b"}]
    opt = create_optimizer(groups, {"name": "sgd", "lr": 0.1, "groups": {"b": {"lr": 0.5}}})
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("w", 0.1), ("b", 0.5)]
    assert groups[1].get("lr") is None  # the caller's dicts are not changed
    opt = create_optimizer(lin, None)
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 1e-3
    assert [p for g in opt.param_groups for p in g["params"]] == [lin.weight, lin.bias]
    with pytest.raises(TypeError, match="found a single tensor"):
        create_optimizer(lin.weight, {"name": "sgd", "lr": 0.1})
    with pytest.raises(ValueError, match="Parameter group 0 has no 'params'"):
        create_optimizer([{"lr": 0.1}], {"name": "sgd", "lr": 0.1})
    with pytest.raises(ValueError, match="every parameter is frozen"):
        create_optimizer(nn.Linear(2, 2).requires_grad_(False), {"name": "sgd", "lr": 0.1})


# ---------------------------------------------------------------------------------- errors
def test_unknown_optimizer_name_lists_and_suggests():
    with pytest.raises(
        ValueError,
        match=r"Unknown optimizer 'adamm'\. Did you mean 'adam'\?.*"
        r"Registered: adadelta, adagrad, adam,",
    ):
        GroupedNet(optimizer={"name": "adamm", "lr": 0.1})


def test_unknown_argument_is_named_with_accepted_ones():
    with pytest.raises(
        ValueError,
        match=r"'adam' \(Adam\) does not take argument\(s\) \['beta'\] "
        r"\(in `optimizer`\)\. Did you mean 'betas'\?.*accepts: lr, betas, eps",
    ):
        GroupedNet(optimizer={"name": "adam", "beta": 0.9})
    with pytest.raises(ValueError, match=r"\['momentum'\] \(in `optimizer.groups.shared`\)"):
        GroupedNet(optimizer={"name": "adam", "groups": {"shared": {"momentum": 0.9}}})
    with pytest.raises(ValueError, match=r"`optimizer.groups.shared` sets \['params'\]"):
        GroupedNet(optimizer={"name": "adam", "groups": {"shared": {"params": []}}})


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("adam", TypeError, "should be a mapping"),
        ({"name": "adam", "groups": ["shared"]}, TypeError, r"`optimizer.groups` should map"),
        (
            {"name": "adam", "groups": {"shared": 0.1}},
            TypeError,
            r"`optimizer.groups.shared` should",
        ),
        ({"name": "adam", "class_path": "torch.optim.Adam"}, ValueError, "both `name` and"),
        (
            {"name": "collections.OrderedDict"},
            ValueError,
            "not a subclass of torch.optim.Optimizer",
        ),
        ({"name": "torch.optim.Adamm"}, ImportError, "has no attribute 'Adamm'"),
        ({"name": "nopkg_xyz.FastOpt"}, ModuleNotFoundError, r"`pip install nopkg_xyz`"),
        ({"name": "adam", "scheduler": {"name": "cosin"}}, ValueError, "Did you mean 'cosine'"),
        (
            {"name": "adam", "scheduler": {"name": "step"}},
            ValueError,
            r"needs argument\(s\) \['step_size'\]",
        ),
        (
            {"name": "adam", "scheduler": {"name": "step", "step_size": 2, "gama": 0.5}},
            ValueError,
            r"StepLR \(`optimizer.scheduler`\) does not take argument\(s\) \['gama'\]\. Did you mean 'gamma'",
        ),
        ({"name": "adam", "scheduler": {"name": "plateau"}}, ValueError, "add `monitor`"),
        (
            {
                "name": "adam",
                "scheduler": {"name": "exponential", "gamma": 0.9, "interval": "batch"},
            },
            ValueError,
            r"`optimizer.scheduler.interval` should be 'step' or 'epoch'",
        ),
        (
            {"name": "adam", "scheduler": {"name": "exponential", "gamma": 0.9, "frequency": 0}},
            ValueError,
            r"`optimizer.scheduler.frequency` should be an int >= 1",
        ),
    ],
)
def test_bad_specs_fail_when_the_module_is_built(spec, error, match):
    with pytest.raises(error, match=match):
        GroupedNet(optimizer=spec)
    with pytest.raises(error, match=match):
        validate_optimizer_spec(spec)


def test_weighting_group_weight_decay_is_rejected_before_training():
    for key in ("weighting", "weight*"):
        with pytest.raises(
            ValueError,
            match=rf"`optimizer.groups.{re.escape(key)}` sets "
            r"weight_decay=0.1.*must not be decayed",
        ):
            GroupedNet(optimizer={"name": "adamw", "groups": {key: {"weight_decay": 0.1}}})
    with pytest.raises(ValueError, match="must not be decayed"):
        create_optimizer(
            [{"params": [nn.Parameter(torch.ones(2))], "name": "weighting", "weight_decay": 0.1}],
            {"name": "adamw"},
        )


def test_unknown_group_names_are_reported_with_the_nearest(tmp_path):
    net = GroupedNet(optimizer={"name": "adam", "groups": {"shraed": {"lr": 0.1}}})
    with pytest.raises(
        ValueError,
        match=r"names 'shraed', but no parameter group has that name\. "
        r"Did you mean 'shared'\? The groups are: 'shared', 'task/a', 'task/b', "
        r"'task/c', 'other'",
    ):
        trainer(tmp_path, max_epochs=1).fit(net, loader(64))
    net = GroupedNet(optimizer={"name": "adam", "groups": {"head/*": {"lr": 0.1}}})
    with pytest.raises(ValueError, match=r"'head/\*', but no parameter group matches it"):
        trainer(tmp_path, max_epochs=1).fit(net, loader(64))


def test_parameter_in_two_groups_is_an_error(tmp_path):
    class Overlap(GroupedNet):
        def task_parameters(self):
            return {"a": [*self.heads["a"].parameters(), self.trunk[2].weight]}

    with pytest.raises(
        MisconfigurationException,
        match=r"`trunk.2.weight` is in two optimizer "
        r"groups: 'shared' \(from shared_parameters\(\)\) and 'task/a' \(from "
        r"task_parameters\(\)\['a'\]\)",
    ):
        trainer(tmp_path, max_epochs=1).fit(Overlap(), loader(64))

    class SharesWeighting(TinyNet):
        def shared_parameters(self):
            return self.parameters()  # includes the weighting's log-variances

    with pytest.raises(
        MisconfigurationException,
        match=r"`loss_weighting.log_vars` is in two "
        r"optimizer groups: 'shared'.* and 'weighting'",
    ):
        trainer(tmp_path, [UncertaintyWeighting()], max_epochs=1).fit(SharesWeighting(), loader(64))


def test_task_parameters_with_unknown_task(tmp_path):
    class Typo(GroupedNet):
        def task_parameters(self):
            return {"A": self.heads["a"].parameters()}

    with pytest.raises(
        MisconfigurationException,
        match=r"unknown task\(s\) \['A'\]\. Did you "
        r"mean 'a'\? The tasks are \['a', 'b', 'c'\]",
    ):
        trainer(tmp_path, max_epochs=1).fit(Typo(), loader(64))


def test_missing_optional_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    register_optimizer("ghost", "ghost_opt_pkg_xyz.GhostOpt", package="ghost-opt")
    assert "ghost" in list_optimizers() and "ghost" not in list_optimizers(available=True)
    net = GroupedNet(optimizer={"name": "ghost", "lr": 0.1})  # built: e.g. to load weights
    with pytest.raises(
        ModuleNotFoundError,
        match=r"optimizer 'ghost' needs the package "
        r"'ghost-opt'.*`pip install ghost-opt`",
    ):
        trainer(tmp_path, max_epochs=1).fit(net, loader(64))
    with pytest.raises(ModuleNotFoundError, match="pip install ghost-opt"):
        create_optimizer(nn.Linear(2, 1), {"name": "ghost"})


def test_one_lr_optimizers_reject_group_learning_rates(tmp_path, monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    register_optimizer("one_lr", torch.optim.Adam, per_group_lr=False, step_rule="adam")
    net = GroupedNet(optimizer={"name": "one_lr", "lr": 0.1, "groups": {"shared": {"lr": 0.2}}})
    with pytest.raises(
        ValueError,
        match=r"'one_lr' takes one learning rate for all parameter "
        r"groups \(lr=0.1\), but groups set others: 'shared': lr=0.2 \(from "
        r"optimizer.groups\)",
    ):
        trainer(tmp_path, max_epochs=1).fit(net, loader(64))
    net = GroupedNet(optimizer={"name": "one_lr", "lr": 0.1})
    with pytest.raises(ValueError, match=r"'weighting': lr=0.05 \(from UncertaintyWeighting"):
        trainer(tmp_path, [UncertaintyWeighting(lr=0.05)], max_epochs=1).fit(net, loader(64))
    net = GroupedNet(optimizer={"name": "one_lr", "lr": 0.1, "groups": {"shared": {"lr": 0.1}}})
    trainer(tmp_path, max_epochs=1).fit(net, loader(64))  # the same lr is fine


# ---------------------------------------------------------------------------------- schedulers
def test_list_schedulers():
    assert {
        "step",
        "multistep",
        "exponential",
        "cosine",
        "onecycle",
        "linear",
        "constant",
        "plateau",
    } <= set(list_schedulers())


@pytest.mark.parametrize("frequency", [1, 2])
def test_step_interval_scheduler_follows_its_formula(tmp_path, frequency):
    gamma, steps = 0.7, 7
    spec = {
        "name": "sgd",
        "lr": 0.1,
        "groups": {"shared": {"lr": 0.04}},
        "scheduler": {
            "name": "exponential",
            "gamma": gamma,
            "interval": "step",
            "frequency": frequency,
        },
    }
    rec = LrRecorder()
    trainer(tmp_path, [rec], max_steps=steps, max_epochs=None).fit(
        GroupedNet(optimizer=spec), loader()
    )
    assert len(rec.lrs) == steps
    for k, lrs in enumerate(rec.lrs):  # k optimizer steps taken before batch k
        factor = gamma ** (k // frequency)
        assert lrs["shared"] == pytest.approx(0.04 * factor, rel=1e-12)
        assert lrs["task/a"] == pytest.approx(0.1 * factor, rel=1e-12)


def test_cosine_length_defaults_to_the_run(tmp_path):
    steps = 10
    spec = {
        "name": "adam",
        "lr": 0.01,
        "scheduler": {"name": "cosine", "eta_min": 0.001, "interval": "step"},
    }
    rec = LrRecorder()
    net = GroupedNet(optimizer=spec)
    t = trainer(tmp_path, [rec], max_steps=steps, max_epochs=None)
    t.fit(net, loader())
    assert t.lr_scheduler_configs[0].scheduler.T_max == steps
    for k, lrs in enumerate(rec.lrs):
        expected = 0.001 + (0.01 - 0.001) * (1 + math.cos(math.pi * k / steps)) / 2
        assert lrs["other"] == pytest.approx(expected, rel=1e-9)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001, rel=1e-9)


def test_epoch_interval_scheduler(tmp_path):
    spec = {"name": "sgd", "lr": 0.1, "scheduler": {"name": "step", "step_size": 1, "gamma": 0.5}}
    rec = LrRecorder()
    trainer(tmp_path, [rec], max_epochs=3).fit(GroupedNet(optimizer=spec), loader(64))
    for epoch, lrs in zip(rec.epochs, rec.lrs, strict=True):
        assert lrs["shared"] == pytest.approx(0.1 * 0.5**epoch, rel=1e-12)
    assert sorted(set(rec.epochs)) == [0, 1, 2]


def test_plateau_and_onecycle_configs(tmp_path):
    lin = nn.Linear(2, 1)
    cfg = build_optimizers(
        lin,
        {
            "name": "adam",
            "scheduler": {"name": "plateau", "monitor": "val/loss/total", "patience": 2},
        },
    )
    assert cfg["lr_scheduler"]["monitor"] == "val/loss/total"
    assert cfg["lr_scheduler"]["scheduler"].patience == 2
    assert cfg["lr_scheduler"]["interval"] == "epoch" and cfg["lr_scheduler"]["strict"] is True
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"needs `total_steps`, and there is no Trainer"):
        create_scheduler(opt, {"name": "onecycle", "max_lr": 0.1})
    # with a Trainer, onecycle runs for exactly the run's optimizer steps
    spec = {"name": "sgd", "lr": 0.1, "scheduler": {"name": "onecycle", "max_lr": 0.1}}
    net = GroupedNet(optimizer=spec)
    t = trainer(tmp_path, max_epochs=2)
    t.fit(net, loader(64))
    sched = t.lr_scheduler_configs[0].scheduler
    assert sched.total_steps == t.global_step == 4
    assert t.lr_scheduler_configs[0].interval == "step"


def test_learning_rate_monitor_names_the_groups(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    spec = {
        "name": "adam",
        "lr": 0.01,
        "groups": {"shared": {"lr": 0.002}},
        "scheduler": {"name": "exponential", "gamma": 0.5, "interval": "step"},
    }
    t = trainer(
        tmp_path,
        [LearningRateMonitor("step")],
        logger=logger,
        max_steps=3,
        max_epochs=None,
        log_every_n_steps=1,
    )
    t.fit(GroupedNet(optimizer=spec), loader())
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert {"lr-Adam/shared", "lr-Adam/task/a", "lr-Adam/other"} <= set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("lr-Adam/shared")] == pytest.approx([0.002, 0.001, 0.0005])


# ---------------------------------------------------------------------------------- checkpoints
def test_resume_keeps_group_hyperparameters(tmp_path):
    spec = {
        "name": "adamw",
        "lr": 0.01,
        "weight_decay": 0.05,
        "groups": {"shared": {"lr": 0.004}, "task/*": {"weight_decay": 0.0}},
        "scheduler": {"name": "exponential", "gamma": 0.8, "interval": "step"},
    }
    uw = UncertaintyWeighting(lr=0.03)
    full = GroupedNet(optimizer=spec)
    trainer(tmp_path / "full", [uw], max_epochs=2).fit(full, loader(128))  # 2 x 4 steps

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = GroupedNet(optimizer=spec)
    trainer(
        tmp_path, [UncertaintyWeighting(lr=0.03), ckpt], max_epochs=1, enable_checkpointing=True
    ).fit(first, loader(128))
    saved = torch.load(ckpt.last_model_path, weights_only=True)["optimizer_states"][0]
    saved_groups = {g["name"]: g for g in saved["param_groups"]}
    assert list(saved_groups) == ["shared", "task/a", "task/b", "task/c", "other", "weighting"]
    assert saved_groups["shared"]["lr"] == pytest.approx(0.004 * 0.8**4)
    assert saved_groups["task/b"]["weight_decay"] == 0.0
    assert saved_groups["weighting"]["lr"] == pytest.approx(0.03 * 0.8**4)

    # resume with a *different* spec lr: the checkpoint's hyperparameters win
    changed = {**spec, "groups": {"shared": {"lr": 0.5}, "task/*": {"weight_decay": 0.0}}}
    resumed = GroupedNet(optimizer=changed)
    rec = LrRecorder()
    t = trainer(tmp_path, [UncertaintyWeighting(lr=0.03), rec], max_epochs=2)
    t.fit(resumed, loader(128), ckpt_path=ckpt.last_model_path)
    assert len(rec.lrs) == 4
    for k, lrs in enumerate(rec.lrs, start=4):
        assert lrs["shared"] == pytest.approx(0.004 * 0.8**k, rel=1e-12)
        assert lrs["other"] == pytest.approx(0.01 * 0.8**k, rel=1e-12)
    groups = by_name(t.optimizers[0])
    assert (groups["other"]["weight_decay"], groups["task/a"]["weight_decay"]) == (0.05, 0.0)
    for key, value in params(full).items():
        torch.testing.assert_close(params(resumed)[key], value, rtol=1e-6, atol=1e-7)


class ModeRecorder(pl.Callback):
    """Records the schedule-free optimizer's mode in training and validation batches."""

    def __init__(self) -> None:
        self.train: list[bool] = []
        self.val: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(trainer.optimizers[0].param_groups[0]["train_mode"])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(trainer.optimizers[0].param_groups[0]["train_mode"])


def test_schedule_free_optimizer_validates_on_its_averaged_weights(tmp_path):
    pytest.importorskip("schedulefree")
    rec = ModeRecorder()
    net = TinyNet(optimizer={"name": "adamw_schedulefree", "lr": 1e-2})
    trainer(tmp_path, [rec], max_epochs=2, limit_train_batches=3).fit(
        net, loader(), val_dataloaders=loader(n=64)
    )
    # eval mode (averaged weights x) in every validation batch, train mode (y) in training
    assert rec.val and not any(rec.val)
    assert len(rec.train) == 6 and all(rec.train)
