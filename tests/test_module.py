"""MultiTaskModule: collecting, validating, combining and logging the task losses."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import TinyNet, WeightRecorder, loader, params, trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torchmetrics import MeanSquaredError

from lightning_aw import (
    DWA,
    EqualWeighting,
    GradNorm,
    MultiTaskModule,
    TaskOutput,
    UncertaintyWeighting,
)


def test_no_callback_is_plain_sum(tmp_path):
    torch.manual_seed(0)
    a, b = TinyNet(), TinyNet()
    b.load_state_dict(a.state_dict())
    trainer(tmp_path, max_epochs=1).fit(a, loader())
    trainer(tmp_path, [EqualWeighting()], max_epochs=1).fit(b, loader())
    for k, v in params(a).items():
        torch.testing.assert_close(v, params(b)[k])
    assert a.task_weights == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_no_callback_is_said_once(tmp_path, caplog):
    with caplog.at_level("INFO"):
        trainer(tmp_path, max_epochs=1).fit(TinyNet(), loader())
    said = [r for r in caplog.records if "no weighting callback" in r.getMessage()]
    assert len(said) == 1


def test_training_step_returns_weighted_sum():
    net = TinyNet()
    x, y = next(iter(loader()))
    out = net.task_losses((x, y), 0)
    losses = torch.stack([out[t] for t in net.tasks])
    torch.testing.assert_close(net.training_step((x, y), 0), losses.sum())


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (lambda loss: loss.expand(3), ValueError, r"task 'b' .* shape \(3,\); it must be a scalar"),
        (lambda loss: 1.5, TypeError, r"task 'b' .* is a float; return a scalar torch.Tensor"),
    ],
)
def test_bad_loss_values(tmp_path, bad, error, match):
    net = TinyNet(loss_hook=lambda i, t, loss: bad(loss) if t == "b" else loss)
    with pytest.raises(error, match=match):
        trainer(tmp_path, max_epochs=1).fit(net, loader())


class _Renamed(TinyNet):
    def task_losses(self, batch, batch_idx):
        out = dict(super().task_losses(batch, batch_idx))
        out["typo"] = out.pop("b")
        return out


def test_unknown_and_missing_task_names(tmp_path):
    with pytest.raises(
        KeyError, match=r"unknown task\(s\) \['typo'\] and missing task\(s\) \['b'\]"
    ):
        trainer(tmp_path, max_epochs=1).fit(_Renamed(), loader())


def test_all_tasks_absent_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="returned None for every task at batch 0"):
        trainer(tmp_path, max_epochs=1).fit(TinyNet(absent=lambda i, t: True), loader())


def test_nonfinite_raises_with_task_and_step(tmp_path):
    hook = lambda i, t, loss: loss * float("nan") if (i == 3 and t == "c") else loss  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"task\(s\) \{'c': nan\} at epoch 0, batch 3"):
        trainer(tmp_path, max_epochs=1).fit(TinyNet(loss_hook=hook), loader())


@pytest.mark.parametrize("method", [None, DWA(interval="step"), GradNorm(alpha=1.0)])
def test_nonfinite_skip_leaves_everything_untouched(tmp_path, method):
    # step 3 is poisoned: a run that skips it must equal a run whose batch 3 contributes nothing
    # and does not step the optimizer. Compare the state right before and after that batch.
    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 3:
                self.before = (
                    params(pl_module),
                    pl_module.task_weights,
                    {
                        k: v.clone()
                        for k, v in trainer.optimizers[0].state_dict()["state"][0].items()
                    },
                )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                self.after = (
                    params(pl_module),
                    pl_module.task_weights,
                    {
                        k: v.clone()
                        for k, v in trainer.optimizers[0].state_dict()["state"][0].items()
                    },
                )

    hook = lambda i, t, loss: loss + float("inf") if (i == 3 and t == "a") else loss  # noqa: E731
    net = TinyNet(loss_hook=hook, on_nonfinite="skip", optimizer={"name": "adam", "lr": 0.01})
    probe = Probe()
    cbs = [probe] if method is None else [method, probe]
    trainer(tmp_path, cbs, max_epochs=1).fit(net, loader())
    assert net.skipped_steps == 1
    for k, v in probe.before[0].items():
        torch.testing.assert_close(probe.after[0][k], v)
    assert probe.after[1] == probe.before[1]
    for k, v in probe.before[2].items():
        torch.testing.assert_close(probe.after[2][k], v)


def test_absent_task_contributes_nothing(tmp_path):
    # task "c" has no label on odd batches: its head must get no gradient from them
    net = TinyNet(absent=lambda i, t: t == "c" and i % 2 == 1)
    x, y = next(iter(loader()))
    total = net.training_step((x, y), 1)
    total.backward()
    assert net.heads["c"].weight.grad is None or net.heads["c"].weight.grad.abs().sum() == 0
    assert net.heads["a"].weight.grad.abs().sum() > 0


def test_absent_task_statistics_count_only_present_batches(tmp_path):
    # DWA's epoch means must average task "c" over the batches where it is present only
    absent = lambda i, t: t == "c" and i % 2 == 1  # noqa: E731
    rec = WeightRecorder()
    dwa = DWA()
    trainer(tmp_path, [dwa, rec], max_epochs=2).fit(TinyNet(absent=absent), loader())
    per_epoch = {}
    for epoch, losses in zip(rec.epochs, rec.losses, strict=True):
        per_epoch.setdefault(epoch, []).append(losses)
    means = []
    for e in (0, 1):
        rows = torch.tensor(per_epoch[e])
        c_rows = rows[0::2, 2]  # batches 0, 2, 4, ... have task c
        means.append(torch.tensor([rows[:, 0].mean(), rows[:, 1].mean(), c_rows.mean()]))
    from lightning_aw.functional import dwa as dwa_fn

    expected = dwa_fn(means[1], means[0], 2.0)
    got = torch.tensor(list(dwa.weights.values()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, torch.ones(3))


class _Plain(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_weighting_needs_a_multitask_module(tmp_path):
    with pytest.raises(TypeError, match="Subclass MultiTaskModule"):
        trainer(tmp_path, [DWA()], max_epochs=1).fit(_Plain(), loader())


def test_two_weightings_are_an_error(tmp_path):
    with pytest.raises(MisconfigurationException, match="Only one weighting callback"):
        trainer(tmp_path, [DWA(), GradNorm()], max_epochs=1).fit(TinyNet(), loader())


class _Manual(TinyNet):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_is_an_error(tmp_path):
    with pytest.raises(MisconfigurationException, match="needs automatic optimization"):
        trainer(tmp_path, [GradNorm()], max_epochs=1).fit(_Manual(), loader())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DWA(temperature=-1), "temperature"),
        (lambda: DWA(interval="batch"), "interval"),
        (lambda: DWA(frequency=0), "frequency"),
        (lambda: GradNorm(alpha=-0.5), "alpha"),
        (lambda: GradNorm(lr=0), "lr"),
        (lambda: UncertaintyWeighting(lr=-1.0), "lr"),
        (lambda: UncertaintyWeighting(init=float("nan")), "init"),
    ],
)
def test_invalid_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tasks": []}, "non-empty"),
        ({"tasks": "ab"}, "non-empty"),
        ({"tasks": ["a", "a"]}, "duplicate"),
        ({"tasks": ["a/b"]}, "invalid"),
        ({"tasks": ["a"], "on_nonfinite": "ignore"}, "on_nonfinite"),
        ({"tasks": ["a"], "metrics": {"zzz": MeanSquaredError()}}, "unknown task"),
    ],
)
def test_invalid_module_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiTaskModule(**kwargs)


def test_unknown_optimizer_suggests_nearest():
    with pytest.raises(ValueError, match="Did you mean 'adam'"):
        TinyNet(optimizer={"name": "adamm", "lr": 0.1})  # checked when the module is built


def test_gradnorm_without_shared_parameters_explains(tmp_path):
    class NoShared(TinyNet):
        def shared_parameters(self):
            return MultiTaskModule.shared_parameters(self)

    with pytest.raises(MisconfigurationException, match="def shared_parameters"):
        trainer(tmp_path, [GradNorm()], max_epochs=1).fit(NoShared(), loader())


def test_gradnorm_unknown_layer(tmp_path):
    with pytest.raises(MisconfigurationException, match="no such parameter"):
        trainer(tmp_path, [GradNorm(layer="nope.weight")], max_epochs=1).fit(TinyNet(), loader())


def test_uncertainty_params_in_own_group_without_decay(tmp_path):
    net = TinyNet(optimizer={"name": "adamw", "lr": 0.01, "weight_decay": 0.1})
    uw = UncertaintyWeighting(lr=0.05)
    trainer(tmp_path, [uw], max_epochs=1).fit(net, loader())
    groups = {g["name"]: g for g in net.trainer.optimizers[0].param_groups}
    assert groups["weighting"]["weight_decay"] == 0.0 and groups["weighting"]["lr"] == 0.05
    assert groups["shared"]["weight_decay"] == 0.1 and groups["other"]["weight_decay"] == 0.1
    assert [id(p) for p in groups["weighting"]["params"]] == [id(uw.log_vars)]
    assert not torch.equal(uw.log_vars.detach(), torch.zeros(3))  # it learned


def test_uncertainty_params_with_decay_rejected(tmp_path):
    class Decayed(TinyNet):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)

    with pytest.raises(MisconfigurationException, match="must not be decayed"):
        trainer(tmp_path, [UncertaintyWeighting()], max_epochs=1).fit(Decayed(), loader())


def test_uncertainty_params_not_optimised_rejected(tmp_path):
    class Forgot(TinyNet):
        def configure_optimizers(self):
            return torch.optim.SGD(self.trunk.parameters(), lr=0.01)

    with pytest.raises(MisconfigurationException, match="no optimizer holds them"):
        trainer(tmp_path, [UncertaintyWeighting()], max_epochs=1).fit(Forgot(), loader())


class _WithMetrics(TinyNet):
    def __init__(self, bare: bool = False):
        super().__init__(metrics={"a": {"mse": MeanSquaredError()}})
        self.bare = bare

    def task_losses(self, batch, batch_idx):
        out = dict(super().task_losses(batch, batch_idx))
        if not self.bare:
            x, y = batch
            pred = self.heads["a"](self.trunk(x)).squeeze(-1)
            out["a"] = TaskOutput(out["a"], pred, y[:, 0])
        return out


def test_validation_metrics_are_logged(tmp_path):
    net = _WithMetrics()
    t = trainer(tmp_path, max_epochs=1, limit_val_batches=2)
    t.fit(net, loader(), loader(64, seed=1))
    m = t.callback_metrics
    for key in ("val/a/mse", "val/loss/a", "val/loss/b", "val/loss/total"):
        assert key in m and math.isfinite(float(m[key]))
    # the metric equals the MSE loss of task a averaged over the same batches
    torch.testing.assert_close(m["val/a/mse"], m["val/loss/a"], rtol=1e-4, atol=1e-6)


def test_metrics_need_task_output(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"TaskOutput\(loss, preds, target\)"):
        trainer(tmp_path, max_epochs=1).fit(_WithMetrics(bare=True), loader(), loader(64))
