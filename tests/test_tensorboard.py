"""What a user sees in TensorBoard: event files written by a real run, read back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _helpers import TinyNet, loader, trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_aw import DWA, FAMO, GLS, MGDA, GradNorm, UncertaintyWeighting


def _events(log_dir: str) -> EventAccumulator:
    files = list(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("method", [GradNorm(), DWA(), UncertaintyWeighting()], ids=repr)
def test_weights_losses_and_layout(tmp_path, method):
    logger = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(tmp_path, [method], logger=logger, log_every_n_steps=2, max_epochs=2)
    t.fit(TinyNet(), loader(), loader(64, seed=1))
    acc = _events(logger.log_dir)
    tags = set(acc.Tags()["scalars"])
    for task in ("a", "b", "c"):
        assert {f"weights/{task}", f"loss/{task}", f"val/loss/{task}"} <= tags
    assert "loss/total" in tags and "val/loss/total" in tags
    # 16 steps per run, logged every 2nd step
    weights = acc.Scalars("weights/a")
    assert len(weights) == 8
    assert [e.step for e in weights] == list(range(1, 16, 2))
    if not isinstance(method, DWA):  # per-step methods: the logged weights move
        assert len({e.value for e in weights}) > 1
    # one chart with every task's weight
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    # TensorBoard reads chart tags as regular expressions: each must draw exactly its own tag
    assert _drawn(charts["task weights"], tags) == [["weights/a"], ["weights/b"], ["weights/c"]]
    assert _drawn(charts["task losses"], tags) == [["loss/a"], ["loss/b"], ["loss/c"]]


def _drawn(patterns, tags):
    """The logged tags each custom-scalars pattern draws (TensorBoard: ``re.search``)."""
    return [sorted(t for t in tags if re.search(p, t)) for p in patterns]


def test_chart_patterns_do_not_draw_tasks_sharing_a_prefix(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    net = TinyNet(tasks=("depth", "depth_aux"))
    trainer(tmp_path, [DWA()], max_epochs=1, logger=logger, log_every_n_steps=1).fit(net, loader())
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert _drawn(charts["task weights"], tags) == [["weights/depth"], ["weights/depth_aux"]]
    assert _drawn(charts["task losses"], tags) == [["loss/depth"], ["loss/depth_aux"]]


def test_total_is_the_weighted_sum(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [DWA()], logger=logger, log_every_n_steps=1, max_epochs=3).fit(
        TinyNet(), loader()
    )
    acc = _events(logger.log_dir)
    for i in (0, 8, 16):  # 8 steps an epoch: epochs 0, 1 (weights 1) and 2 (DWA weights)
        losses = [acc.Scalars(f"loss/{t}")[i].value for t in "abc"]
        weights = [acc.Scalars(f"weights/{t}")[i].value for t in "abc"]
        total = acc.Scalars("loss/total")[i].value
        assert total == pytest.approx(
            sum(w * l for w, l in zip(weights, losses, strict=True)), rel=1e-5
        )
    assert acc.Scalars("weights/a")[16].value != 1.0


@pytest.mark.parametrize(
    ("method", "objective_differs"),
    [(FAMO(), True), (UncertaintyWeighting(init=0.5), True), (GLS(), False), (MGDA(), False)],
    ids=lambda m: type(m).__name__,
)
def test_total_means_the_same_in_training_and_validation(tmp_path, method, objective_differs):
    """loss/total is the weighted sum as val/loss/total is; the method's own objective (which
    differs for FAMO's logarithms and the uncertainty regulariser) is loss/objective."""
    logger = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(tmp_path, [method], logger=logger, log_every_n_steps=1, max_epochs=2)
    net = TinyNet()
    t.fit(net, loader(), loader())
    acc = _events(logger.log_dir)
    gaps = []
    for i in range(16):
        losses = [acc.Scalars(f"loss/{t}")[i].value for t in "abc"]
        weights = [acc.Scalars(f"weights/{t}")[i].value for t in "abc"]
        weighted = sum(w * l for w, l in zip(weights, losses, strict=True))
        assert acc.Scalars("loss/total")[i].value == pytest.approx(weighted, rel=1e-5)
        gaps.append(abs(acc.Scalars("loss/objective")[i].value - weighted))
    assert (max(gaps) > 1e-3) == objective_differs
    # validation (after the last optimizer step): the same weighted sum, with the weights then
    val = acc.Scalars("val/loss/total")[-1].value
    weights = [net.task_weights[t] for t in "abc"]
    val_losses = [acc.Scalars(f"val/loss/{t}")[-1].value for t in "abc"]
    assert val == pytest.approx(
        sum(w * l for w, l in zip(weights, val_losses, strict=True)), rel=1e-4
    )


def test_any_logger_gets_the_scalars(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [GradNorm()], logger=logger, log_every_n_steps=1, max_epochs=1).fit(
        TinyNet(), loader()
    )
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"weights/a", "loss/a", "loss/total", "gradnorm/loss"} <= set(header)
