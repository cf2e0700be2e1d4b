"""GateMonitor: the logged gate statistics equal a hand computation from the recorded gate
outputs, read back from TensorBoard event files; nothing between logging steps; the charts and
heatmaps; the DDP reduction (the ``gate_monitor`` case of ``ddp_script.py``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import regression_data, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw import DWA, MultiTaskModule
from lightning_aw.monitor import GateMonitor
from lightning_aw.nn import PLE, CrossStitch, MMoE, TaskAttention


class MoENet(MultiTaskModule):
    def __init__(self) -> None:
        super().__init__(tasks=("a", "b"), optimizer={"name": "sgd", "lr": 0.1})
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.moe = MMoE(8, lambda: nn.Linear(8, 4), num_experts=3, tasks=self.tasks)
        self.towers = nn.ModuleDict({t: nn.Linear(4, 1) for t in self.tasks})

    def task_losses(self, batch, batch_idx):
        x, y = batch
        mixed = self.moe(self.trunk(x))
        return {
            t: F.mse_loss(self.towers[t](mixed[t]).squeeze(-1), y[:, i])
            for i, t in enumerate(self.tasks)
        }


class GateRecorder(pl.Callback):
    """The gate values every step's forward left in the blocks (put before the monitor)."""

    def __init__(self) -> None:
        self.gates: dict[int, dict[str, torch.Tensor | None]] = {}

    def on_before_backward(self, trainer, pl_module, loss):
        self.gates[trainer.global_step] = {
            f"{name}/{key}": None if g.last is None else g.last.clone()
            for name, m in pl_module.named_modules()
            if hasattr(m, "gates") and callable(m.gates)
            for key, g in m.gates().items()
        }


def _events(log_dir: str) -> EventAccumulator:
    assert list(Path(log_dir).glob("events.out.tfevents.*")), f"no event file in {log_dir}"
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def _charts(acc: EventAccumulator) -> dict[str, list[str]]:
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}


def _data(n: int = 64) -> DataLoader:
    x, y = regression_data(n)
    return DataLoader(TensorDataset(x, y[:, :2]), batch_size=16)


def test_logged_statistics_equal_a_hand_computation(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    recorder, monitor = GateRecorder(), GateMonitor()
    t = trainer(tmp_path, [DWA(), recorder, monitor], logger=logger, log_every_n_steps=3)
    t.fit(MoENet(), _data())  # 2 epochs of 4 steps: logging steps 2 and 5
    acc = _events(logger.log_dir)
    tags = set(acc.Tags()["scalars"])
    logged = [s for s, g in recorder.gates.items() if g["moe/a"] is not None]
    assert logged == [2, 5]  # the blocks recorded nothing between logging steps
    for task in ("a", "b"):
        base = f"gates/moe/{task}"
        assert [e.step for e in acc.Scalars(f"{base}/entropy")] == [2, 5]
        for step in (2, 5):
            g = recorder.gates[step][f"moe/{task}"].double()  # [16, 3], dense softmax
            n = g.shape[0]
            want_entropy = sum(-sum(v * math.log(v) for v in row) for row in g.tolist()) / n
            top = [max(range(3), key=row.__getitem__) for row in g.tolist()]
            got = {e.step: e.value for e in acc.Scalars(f"{base}/entropy")}
            assert got[step] == pytest.approx(want_entropy, rel=1e-5)
            for e in range(3):
                weight = {ev.step: ev.value for ev in acc.Scalars(f"{base}/weight/{e}")}
                util = {ev.step: ev.value for ev in acc.Scalars(f"{base}/utilisation/{e}")}
                assert weight[step] == pytest.approx(sum(r[e] for r in g.tolist()) / n, rel=1e-5)
                assert util[step] == pytest.approx(top.count(e) / n, abs=1e-7)
    # one chart per gate (weights, utilisation) and one per block (entropy), next to the module's
    charts = _charts(acc)
    assert "task losses" in charts and "task weights" in charts
    drawn = [sorted(t for t in tags if re.search(p, t)) for p in charts["gates/moe/a weights"]]
    assert drawn == [[f"gates/moe/a/weight/{e}"] for e in range(3)]
    assert len(charts["gates/moe entropy"]) == 2
    assert len(acc.Images("gates/moe/heatmap")) == 2  # one per epoch
    # the gates record again after fit (the blocks' default)
    assert monitor.last_step == 5 and net_records_by_default(t.lightning_module)


def net_records_by_default(net) -> bool:
    return all(g.record for g in net.moe.gates().values())


class PlainPLE(pl.LightningModule):
    """Not a MultiTaskModule: the monitor writes its own chart layout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ple = PLE(6, lambda d: nn.Linear(d, 4), ["a", "b"], 1, 2, hidden_dim=4, top_k=2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.ple(x)
        return F.mse_loss(out["a"].sum(-1), y[:, 0]) + F.mse_loss(out["b"].sum(-1), y[:, 1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_any_lightning_module_and_accumulated_steps(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = GateMonitor(prefix="moe", heatmap=False)
    t = trainer(
        tmp_path,
        [monitor],
        logger=logger,
        log_every_n_steps=1,
        max_epochs=1,
        accumulate_grad_batches=2,
    )
    t.fit(PlainPLE(), _data())  # 4 micro-batches, 2 optimizer steps
    acc = _events(logger.log_dir)
    tags = set(acc.Tags()["scalars"])
    assert {"moe/ple/level0/shared/entropy", "moe/ple/level1/b/utilisation/b.1"} <= tags
    assert "moe/ple/level1/shared/entropy" not in tags  # the last level has no shared gate
    assert [e.step for e in acc.Scalars("moe/ple/level0/a/entropy")] == [0, 1]
    # both micro-batches of an optimizer step are counted; top-2 of 3: utilisation sums to 1
    stats = monitor.last_stats["ple/level0/a"]
    assert stats["count"].item() == 32
    assert stats["utilisation"].sum().item() == pytest.approx(1.0)
    assert stats["weight"].sum().item() == pytest.approx(1.0)
    assert "moe/ple/level0/shared weights" in _charts(acc)
    assert "images" not in acc.Tags() or not acc.Tags()["images"]


def test_no_gated_block_is_refused(tmp_path):
    class Plain(PlainPLE):
        def __init__(self):
            super().__init__()
            self.ple = nn.Linear(6, 4)  # type: ignore[assignment]

        def training_step(self, batch, batch_idx):
            return self.ple(batch[0]).sum()

    with pytest.raises(MisconfigurationException, match="no gated block"):
        trainer(tmp_path, [GateMonitor()], max_epochs=1).fit(Plain(), _data())
    with pytest.raises(ValueError, match="prefix"):
        GateMonitor(prefix="x/")


def test_ddp_statistics_are_reduced_and_identical(ddp_results):
    r0, r1 = ddp_results.load("gate_monitor")
    assert r0["stats"].keys() == r1["stats"].keys() and r0["stats"]
    for key in r0["stats"]:
        for name, value in r0["stats"][key].items():
            torch.testing.assert_close(r1["stats"][key][name], value, rtol=0, atol=0)
        # the reduced means are those of both ranks' samples together (ranks saw different data)
        local = [r["local"][key] for r in (r0, r1)]
        assert not torch.equal(local[0], local[1])
        both = torch.cat(local).double()
        torch.testing.assert_close(r0["stats"][key]["weight"], both.mean(0))
        top = F.one_hot(both.argmax(-1), both.shape[1]).double().mean(0)
        torch.testing.assert_close(r0["stats"][key]["utilisation"], top)
        assert r0["stats"][key]["count"].item() == both.shape[0]
    # the aux-free biases moved, identically on both ranks, from the loads of both ranks
    for name, bias in r0["biases"].items():
        assert bias.abs().sum() > 0
        torch.testing.assert_close(r1["biases"][name], bias, rtol=0, atol=0)
    for key in r0["biases"]:
        load = r0["load"][f"moe.gate.{key}"]
        torch.testing.assert_close(r1["load"][f"moe.gate.{key}"], load, rtol=0, atol=0)
        # the last step's selections (top-2) of both ranks together
        selected = sum((r["local"][f"moe/{key}"] > 0).sum(0).float() for r in (r0, r1))
        torch.testing.assert_close(load, selected)
        assert load.sum().item() == 2 * 16 * 2


class Columns(MultiTaskModule):
    """A conv trunk with MTAN attention per task and a cross-stitch unit between the columns."""

    def __init__(self) -> None:
        super().__init__(tasks=("a", "b"), optimizer={"name": "sgd", "lr": 0.1})
        torch.manual_seed(0)
        self.trunk = nn.Conv2d(1, 3, 3, padding=1)
        self.att = TaskAttention(self.tasks, channels=3)
        self.stitch = CrossStitch(self.tasks, num_channels=3)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in self.tasks})

    def task_losses(self, batch, batch_idx):
        x, y = batch
        feats = self.stitch(self.att(self.trunk(x.view(-1, 1, 2, 3))))
        return {
            t: F.mse_loss(self.heads[t](feats[t].mean(dim=(2, 3))).squeeze(-1), y[:, i])
            for i, t in enumerate(self.tasks)
        }


class MaskRecorder(pl.Callback):
    def __init__(self) -> None:
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.alpha: dict[int, torch.Tensor] = {}

    def on_before_backward(self, trainer, pl_module, loss):
        step = trainer.global_step
        self.masks[step] = {t: a.clone() for t, a in pl_module.att.last.items()}
        self.alpha[step] = pl_module.stitch.alpha.detach().clone()


def test_attention_and_cross_stitch_are_logged(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    recorder = MaskRecorder()
    t = trainer(tmp_path, [recorder, GateMonitor()], logger=logger, log_every_n_steps=2)
    t.fit(Columns(), _data())
    acc = _events(logger.log_dir)
    assert [s for s, m in recorder.masks.items() if m] == [1, 3, 5, 7]
    for step in (1, 5):
        for task in ("a", "b"):
            a = recorder.masks[step][task].double()
            per_sample = [row.mean().item() for row in a]
            opened = [(row > 0.5).double().mean().item() for row in a]
            got = {e.step: e.value for e in acc.Scalars(f"gates/att/{task}/attention/mean")}
            assert got[step] == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-5)
            got = {e.step: e.value for e in acc.Scalars(f"gates/att/{task}/attention/open")}
            assert got[step] == pytest.approx(sum(opened) / len(opened), rel=1e-5)
        # alpha of the step (before its update), averaged over the channels: row a, column b
        got = {e.step: e.value for e in acc.Scalars("gates/stitch/a/alpha/b")}
        assert got[step] == pytest.approx(recorder.alpha[step][:, 0, 1].mean().item(), rel=1e-5)
    charts = _charts(acc)
    assert len(charts["gates/att attention"]) == 4 and "gates/stitch/b alpha" in charts
