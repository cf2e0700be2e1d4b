"""WeightedEnsemble, SAMMEWeights, HedgeWeights and Boosting in real (tiny) Trainers."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _fusion_helpers import MEMBERS, FusionNet, Member, class_data, class_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import TensorDataset

from lightning_aw.fusion import Boosting, HedgeWeights, SAMMEWeights, WeightedEnsemble


def _trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        deterministic=True,
        **kw,
    )


def _events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _samme_weights_by_hand(errors: np.ndarray, k: int, floor: float = 1e-3) -> np.ndarray:
    e = np.maximum(errors, floor)
    alpha = np.log((1 - e) / e) + np.log(k - 1)
    alpha = np.where(e >= 1 - 1 / k, 0.0, alpha)
    return alpha / alpha.sum()


# -- WeightedEnsemble -------------------------------------------------------------------------


def test_ensemble_fuses_logits_and_probabilities_by_hand():
    gen = torch.Generator().manual_seed(0)
    z = {n: torch.randn(5, 3, generator=gen, dtype=torch.float64) for n in "abc"}
    w = np.array([0.2, 0.5, 0.3])
    lin = WeightedEnsemble(list("abc"), weights="fixed")
    lin.set_weights(torch.tensor(w))
    zn = {n: t.numpy() for n, t in z.items()}
    expected = sum(wi * zn[n] for wi, n in zip(w, "abc", strict=True))
    np.testing.assert_allclose(lin(z).numpy(), expected, rtol=1e-6)  # weights kept in float32
    mix = WeightedEnsemble(list("abc"), combine="probabilities", weights="fixed")
    mix.set_weights(torch.tensor(w))
    p = sum(
        wi * np.exp(zn[n]) / np.exp(zn[n]).sum(1, keepdims=True)
        for wi, n in zip(w, "abc", strict=True)
    )
    out = mix(z)
    np.testing.assert_allclose(out.numpy(), np.log(p), rtol=1e-6)
    y = torch.tensor([0, 1, 2, 0, 1])
    nll = -np.log(p[np.arange(5), y.numpy()]).mean()
    assert F.nll_loss(out, y).item() == pytest.approx(nll, rel=1e-6)
    assert F.cross_entropy(out, y).item() == pytest.approx(nll, rel=1e-6)
    assert (
        set(mix.last_member_outputs) == set("abc")
        and not mix.last_member_outputs["a"].requires_grad
    )


def test_ensemble_of_whole_models_learns_its_weights():
    torch.manual_seed(0)
    good, bad = nn.Linear(4, 3), nn.Linear(4, 3)
    ens = WeightedEnsemble({"good": good, "bad": bad})
    assert ens.weights == {"good": 0.5, "bad": 0.5}
    x, y = class_data(256)
    opt_members = torch.optim.SGD(good.parameters(), lr=0.5)
    opt_fusion = torch.optim.SGD(ens.fusion_parameters(), lr=0.5)
    for _ in range(60):  # "bad" stays random: the learned weights move to "good"
        loss = F.cross_entropy(ens(x), y)
        opt_members.zero_grad()
        opt_fusion.zero_grad()
        loss.backward()
        opt_members.step()
        opt_fusion.step()
    assert ens.weights["good"] > 0.6
    assert sum(ens.weights.values()) == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="weights='fixed'"):
        ens.set_weights(torch.tensor([1.0, 0.0]))


def test_learned_weights_go_to_the_weighting_group_of_a_multitask_module():
    """The documented recipe: return ``fusion_parameters()`` from ``weighting_parameters()``."""
    from lightning_aw import MultiTaskModule

    class Net(MultiTaskModule):
        def __init__(self):
            super().__init__(
                tasks=["cls"], optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}
            )
            self.members = nn.ModuleDict({n: nn.Linear(4, 3) for n in ("a", "b")})
            self.ensemble = WeightedEnsemble(["a", "b"])

        def weighting_parameters(self):
            return self.ensemble.fusion_parameters()

        def task_losses(self, batch, batch_idx):
            x, y = batch
            return {
                "cls": F.cross_entropy(self.ensemble({n: m(x) for n, m in self.members.items()}), y)
            }

    net = Net()
    groups = {g["name"]: g for g in net.configure_optimizers().param_groups}
    assert groups["weighting"]["params"] == [net.ensemble.weight_logits]
    assert groups["weighting"]["weight_decay"] == 0.0 and groups["other"]["weight_decay"] == 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"members": []}, "at least one"),
        ({"members": ["a", "a"]}, "duplicate"),
        ({"members": ["a"], "combine": "votes"}, "combine"),
        ({"members": ["a"], "weights": "adaptive"}, "weights"),
        ({"members": ["a", "b"], "initial_weights": [1.0]}, "one entry per member"),
        ({"members": ["a", "b"], "initial_weights": [1.0, -1.0]}, "non-negative"),
    ],
)
def test_ensemble_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightedEnsemble(**kwargs)


def test_ensemble_bad_outputs():
    ens = WeightedEnsemble(["a", "b"])
    with pytest.raises(ValueError, match="one output per member"):
        ens({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="one shape"):
        ens({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)})
    with pytest.raises(TypeError, match="fuses heads"):
        ens(torch.zeros(2, 3))


# -- SAMMEWeights ----------------------------------------------------------------------------


def test_samme_weights_follow_the_validation_errors_and_are_logged(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    errors_seen = []

    class Record(pl.Callback):  # the members' validation errors, computed here by hand
        def on_validation_epoch_end(self, trainer, pl_module):
            x, y = class_data(96, seed=1)
            with torch.no_grad():
                logits = pl_module.member_logits(x)
            errors_seen.append([float((logits[n].argmax(1) != y).double().mean()) for n in MEMBERS])

    net = FusionNet()
    callback = SAMMEWeights(num_classes=3)
    t = _trainer(tmp_path, [Record(), callback], max_epochs=3, logger=logger, log_every_n_steps=1)
    t.fit(net, class_loader(), class_loader(96, seed=1))
    errors = np.array(errors_seen)
    assert errors.shape == (3, 3)
    assert errors[-1][0] > errors[-1][2]  # the member with more features errs less
    expected = _samme_weights_by_hand(errors[-1], 3)
    np.testing.assert_allclose(list(net.ensemble.weights.values()), expected, rtol=1e-6)
    assert callback.num_updates == 3
    np.testing.assert_allclose(callback.errors, errors[-1], rtol=1e-12)
    acc = _events(logger.log_dir)
    tags = set(acc.Tags()["scalars"])
    for i, n in enumerate(MEMBERS):
        logged = [e.value for e in acc.Scalars(f"fusion/{n}")]
        assert logged == pytest.approx(
            [_samme_weights_by_hand(errors[k], 3)[i] for k in range(3)], rel=1e-6
        )
        assert [e.value for e in acc.Scalars(f"fusion_error/{n}")] == pytest.approx(errors[:, i])
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    drawn = [sorted(t for t in tags if re.search(p, t)) for p in charts["fusion weights"]]
    assert drawn == [[f"fusion/{n}"] for n in MEMBERS]


def test_samme_weights_zero_for_members_no_better_than_chance(tmp_path):
    _, y = class_data(96, seed=1)
    rarest = int(torch.bincount(y, minlength=3).argmin())  # predicting it: error >= 2/3

    class Chance(FusionNet):
        def member_logits(self, x):  # member m1 always predicts the rarest class
            out = super().member_logits(x)
            out["m1"] = out["m1"] * 0 + F.one_hot(torch.tensor(rarest), 3).float()
            return out

    net = Chance()
    callback = SAMMEWeights(num_classes=3)
    with pytest.warns(UserWarning, match=r"\['m1'\] are no better than chance"):
        _trainer(tmp_path, [callback], max_epochs=1).fit(net, class_loader(), class_loader(96, 1))
    assert net.ensemble.weights["m1"] == 0.0
    assert sum(net.ensemble.weights.values()) == pytest.approx(1.0)


def test_samme_weights_refuse_learned_ensembles_and_missing_calls(tmp_path):
    class Learned(FusionNet):
        def __init__(self):
            super().__init__()
            self.ensemble = WeightedEnsemble(list(MEMBERS))

    with pytest.raises(MisconfigurationException, match="weights='fixed'"):
        _trainer(tmp_path, [SAMMEWeights(3)], max_epochs=1).fit(Learned(), class_loader())

    class NoCall(FusionNet):
        def validation_step(self, batch, batch_idx):
            pass

    with pytest.raises(MisconfigurationException, match="not called in this batch's validation"):
        _trainer(tmp_path, [SAMMEWeights(3)], max_epochs=1).fit(
            NoCall(), class_loader(), class_loader(64)
        )
    with pytest.warns(UserWarning, match="never updated the fusion weights"):
        _trainer(tmp_path, [SAMMEWeights(3)], max_epochs=1).fit(FusionNet(), class_loader())
    with pytest.raises(ValueError, match="num_classes"):
        SAMMEWeights(num_classes=1)
    with pytest.raises(ValueError, match="min_error"):
        SAMMEWeights(num_classes=3, min_error=0.9)


# -- HedgeWeights ----------------------------------------------------------------------------


def test_hedge_weights_follow_the_training_losses(tmp_path):
    net = FusionNet()
    eta = 0.7
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    t = _trainer(tmp_path, [HedgeWeights(eta=eta)], max_epochs=1, logger=logger)
    t.fit(net, class_loader())
    losses = np.array(net.train_losses)  # recorded by the module, one row per batch
    assert losses.shape == (6, 3)
    w = np.full(3, 1 / 3)
    history = []
    for row in losses:
        w = w * np.exp(-eta * row)
        w = w / w.sum()
        history.append(w)
    np.testing.assert_allclose(list(net.ensemble.weights.values()), w, rtol=1e-5)
    assert w[2] > w[0]
    # logged at the optimizer steps that are multiples of log_every_n_steps: with 50, none of the
    # 6 steps; with 1, every step, with the weights of the replay above
    acc = _events(logger.log_dir)
    assert "fusion/m1" not in acc.Tags()["scalars"]
    logger = TensorBoardLogger(tmp_path, name="tb", version=1)
    net = FusionNet()
    t = _trainer(
        tmp_path, [HedgeWeights(eta=eta)], max_epochs=1, logger=logger, log_every_n_steps=1
    )
    t.fit(net, class_loader())
    acc = _events(logger.log_dir)
    for i, n in enumerate(MEMBERS):
        events = acc.Scalars(f"fusion/{n}")
        assert [e.step for e in events] == list(range(1, 7))
        assert [e.value for e in events] == pytest.approx([h[i] for h in history], rel=1e-5)


# -- resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: HedgeWeights(eta=0.5), lambda: SAMMEWeights(3)])
def test_resume_is_exact(tmp_path, make):
    full = FusionNet()
    cb_full = make()
    _trainer(tmp_path / "a", [cb_full], max_epochs=3).fit(full, class_loader(), class_loader(64, 1))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = FusionNet()
    _trainer(tmp_path / "b", [make(), ckpt], max_epochs=2, enable_checkpointing=True).fit(
        first, class_loader(), class_loader(64, 1)
    )
    resumed = FusionNet(seed=123)  # other initial weights: everything must come from the ckpt
    cb = make()
    _trainer(tmp_path / "c", [cb], max_epochs=3).fit(
        resumed, class_loader(), class_loader(64, 1), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert cb.num_updates == cb_full.num_updates > 0
    assert resumed.ensemble.weights == full.ensemble.weights
    assert full.ensemble.weights != {n: 1 / 3 for n in MEMBERS}
    if isinstance(cb, SAMMEWeights):
        assert cb.errors == cb_full.errors


# -- DDP -------------------------------------------------------------------------------------


def test_ddp_fusion_weights_identical_on_ranks(ddp_results):
    """The ``fusion`` case of ``ddp_script.py``: each rank trains and validates on its own half of
    the data; SAMME (on the validation errors) and Hedge (on the training losses) must give both
    ranks the weights of the global statistics."""
    r0, r1 = ddp_results.load("fusion")
    for key in ("samme", "hedge"):
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0)
    # SAMME: the errors of the whole validation set (both halves), recomputed on each rank
    expected = _samme_weights_by_hand(r0["global_errors"].numpy(), 3)
    np.testing.assert_allclose(r0["samme"].numpy(), expected, rtol=1e-6)
    # the ranks' own errors differ: unreduced statistics would have given different weights
    assert not torch.equal(r0["local_errors"], r1["local_errors"])
    # Hedge: the global per-batch losses (the two ranks' means averaged), replayed by hand
    w = np.full(3, 1 / 3)
    for a, b in zip(r0["losses"], r1["losses"], strict=True):
        w = w * np.exp(-0.5 * (np.array(a) + np.array(b)) / 2)
        w = w / w.sum()
    np.testing.assert_allclose(r0["hedge"].numpy(), w, rtol=1e-5)


# -- Boosting --------------------------------------------------------------------------------


class Classifier(pl.LightningModule):
    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.net = Member(k)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


TRAINER = {
    "max_epochs": 2,
    "accelerator": "cpu",
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


def _samme_by_hand(preds, y, k):
    """SAMME's alphas and final sample weights from the members' predictions (numpy)."""
    w = np.full(len(y), 1 / len(y))
    alphas = []
    for p in preds:
        inc = (p != y).astype(float)
        err = (w * inc).sum() / w.sum()
        a = np.log((1 - err) / err) + np.log(k - 1)
        alphas.append(a)
        w = w * np.exp(a * inc)
        w = w / w.sum()
    return np.array(alphas), w


def test_boosting_matches_samme_logs_and_resumes(tmp_path):
    x, y = class_data(150, seed=3)
    data = TensorDataset(x, y)
    full = Boosting(
        lambda m: Classifier(), 3, 3, trainer_kwargs=TRAINER, root_dir=tmp_path / "full"
    )
    full.fit(data)
    assert len(full.members) == 3
    with torch.no_grad():
        preds = [m(x).argmax(1).numpy() for m in full.members]
    alphas, w = _samme_by_hand(preds, y.numpy(), 3)
    np.testing.assert_allclose(full.alphas, alphas, rtol=1e-10)
    np.testing.assert_allclose(full.sample_weight.numpy(), w, rtol=1e-10)
    # SAMME's vote, by hand
    votes = sum(a * np.eye(3)[p] for a, p in zip(alphas, preds, strict=True))
    np.testing.assert_array_equal(full.predict(x).numpy(), votes.argmax(1))
    np.testing.assert_array_equal(full.predict(x, num_members=1).numpy(), preds[0])
    # TensorBoard: one run, each member under member_<m>/, the boosting scalars at step m
    acc = _events(tmp_path / "full" / "tb")
    assert [e.step for e in acc.Scalars("boosting/alpha")] == [0, 1, 2]
    assert [e.value for e in acc.Scalars("boosting/alpha")] == pytest.approx(alphas, rel=1e-6)
    train_errors = [
        (
            sum(a * np.eye(3)[p] for a, p in zip(alphas[:k], preds[:k], strict=True)).argmax(1)
            != y.numpy()
        ).mean()
        for k in (1, 2, 3)
    ]
    logged = [e.value for e in acc.Scalars("boosting/train_error")]
    assert logged == pytest.approx(train_errors, rel=1e-6)
    assert {p.name for p in (tmp_path / "full" / "tb").iterdir() if p.is_dir()} == {
        "member_0",
        "member_1",
        "member_2",
    }
    # interrupted after two rounds, then resumed to three (from a datamodule holding the same
    # data, batch size 32 as for a dataset): the same third round
    Boosting(lambda m: Classifier(), 2, 3, trainer_kwargs=TRAINER, root_dir=tmp_path / "cut").fit(
        data
    )
    resumed = Boosting(
        lambda m: Classifier(), 3, 3, trainer_kwargs=TRAINER, root_dir=tmp_path / "cut"
    )
    resumed.fit(pl.LightningDataModule.from_datasets(train_dataset=data, batch_size=32))
    assert resumed.alphas == full.alphas and resumed.errors == full.errors
    torch.testing.assert_close(resumed.sample_weight, full.sample_weight, rtol=0, atol=0)
    torch.testing.assert_close(resumed.predict(x), full.predict(x))


def test_boosting_stops_as_samme_and_refuses_bad_settings(tmp_path):
    class Constant(Classifier):
        def forward(self, x):
            return self.net(x) * 0 + torch.tensor([0.0, 0.0, 1.0])

    x, _ = class_data(60)
    y = torch.tensor([0, 1] * 30)  # class 2 never occurs: error 1
    with pytest.raises(ValueError, match="no better than chance"):
        Boosting(lambda m: Constant(), 2, 3, trainer_kwargs=TRAINER, root_dir=tmp_path).fit(
            TensorDataset(x, y)
        )
    # a later member no better than chance is discarded and boosting stops, for good
    with pytest.warns(UserWarning, match="member 1's weighted training error"):
        later = Boosting(
            lambda m: Classifier() if m == 0 else Constant(),
            3,
            3,
            trainer_kwargs=TRAINER,
            root_dir=tmp_path / "later",
        ).fit(TensorDataset(x, y))
    assert len(later.members) == 1 and later.stopped
    again = Boosting(lambda m: Classifier(), 3, 3, trainer_kwargs=TRAINER, root_dir=later.root_dir)
    assert len(again.fit(TensorDataset(x, y)).members) == 1

    class Oracle(Classifier):  # a perfect member: alpha 1 (scikit-learn's convention), stop
        def forward(self, x):
            return self.net(x) * 0 + F.one_hot((x[:, 0] > 0).long(), 3).float()

    perfect = Boosting(lambda m: Oracle(), 3, 3, trainer_kwargs=TRAINER, root_dir=tmp_path / "p")
    perfect.fit(TensorDataset(x, (x[:, 0] > 0).long()))
    assert perfect.alphas == [1.0] and perfect.errors == [0.0] and perfect.stopped
    multi = {**TRAINER, "devices": 2, "strategy": "ddp"}
    with pytest.raises(MisconfigurationException, match="devices=1"):
        Boosting(lambda m: Classifier(), 2, 3, trainer_kwargs=multi, root_dir=tmp_path / "d").fit(
            TensorDataset(x, torch.tensor([0, 1, 2] * 20))
        )
    with pytest.raises(ValueError, match="num_members"):
        Boosting(lambda m: Classifier(), 0, 3)


# -- README and example ----------------------------------------------------------------------


def test_readme_fusion_module_trains(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Adaptive fusion and boosting\n", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(block.split("\ntrainer = ")[0], "README.md", "exec"), namespace)
    net = namespace["Fused"]()
    callback = SAMMEWeights(num_classes=3)
    _trainer(tmp_path, [callback], max_epochs=2).fit(net, class_loader(), class_loader(64, 1))
    x, y = class_data(64, seed=1)
    with torch.no_grad():
        errors = np.array(
            [float((m(x).argmax(1) != y).double().mean()) for m in net.members.values()]
        )
    expected = _samme_weights_by_hand(errors, 3)
    np.testing.assert_allclose(list(net.ensemble.weights.values()), expected, rtol=1e-6)


def test_example_runs_with_small_settings(tmp_path):
    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    try:
        example = importlib.import_module("boosting_quantiles")
    finally:
        sys.path.remove(str(examples))
    args = ["--members", "3", "--epochs", "4", "--seeds", "0", "--estimators", "20"]
    args += ["--logdir", str(tmp_path), "--png-dir", str(tmp_path), "--out", str(tmp_path / "r.md")]
    out = example.main(args)
    assert set(out["errors"]) == set(example.METHODS)
    assert len(out["curves"]["neural boosting"]) == 3
    assert len(out["curves"]["sklearn AdaBoost, stumps"]) == 20
    # every ensemble of trained members does better than chance on the test split
    assert all(e[0] < 2 / 3 for e in out["errors"].values())
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| neural boosting |" in (tmp_path / "r.md").read_text()


def test_fusion_chart_joins_a_multitask_modules_layout(tmp_path):
    """TensorBoard reads one custom-scalars layout per run: in a MultiTaskModule the fusion chart
    sits in the module's layout, next to its task charts, and draws the logged weights."""
    from lightning_aw import MultiTaskModule

    class Net(MultiTaskModule):
        def __init__(self):
            super().__init__(tasks=list(MEMBERS), optimizer={"name": "sgd", "lr": 0.2})
            torch.manual_seed(0)
            self.members = nn.ModuleDict({n: Member(int(n[1:])) for n in MEMBERS})
            self.ensemble = WeightedEnsemble(list(MEMBERS), weights="fixed")

        def task_losses(self, batch, batch_idx):
            x, y = batch
            logits = {n: m(x) for n, m in self.members.items()}
            self.ensemble(logits)
            return {n: F.cross_entropy(z, y) for n, z in logits.items()}

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(
        tmp_path, [HedgeWeights(0.5)], max_steps=3, logger=logger, log_every_n_steps=1
    )
    trainer.fit(Net(), class_loader())
    acc = _events(logger.log_dir)
    configs = acc.Tensors("custom_scalars__config__")
    assert len(configs) == 1  # one layout, not one per writer
    layout = layout_pb2.Layout()
    layout.ParseFromString(configs[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert {"task losses", "fusion weights"} <= charts.keys()
    tags = set(acc.Tags()["scalars"])
    drawn = [sorted(t for t in tags if re.search(p, t)) for p in charts["fusion weights"]]
    assert drawn == [[f"fusion/{n}"] for n in MEMBERS]
