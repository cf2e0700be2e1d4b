"""GradientConflictMonitor and WeightFigures: real Trainers, event files read back, hand-computed
references (per-task gradients recomputed with separate forward/backward passes)."""

from __future__ import annotations

import copy
import io
import logging
import sys
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from _helpers import TinyNet, WeightRecorder, loader, regression_data, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_aw import DWA, MGDA, GradNorm, MultiTaskModule, PCGrad, UPGrad
from lightning_aw.engine import TaskGradients
from lightning_aw.monitor import GradientConflictMonitor, WeightFigures, plot_weights

TASKS = ("a", "b", "c")
PAIRS = [("a", "b"), ("a", "c"), ("b", "c")]


def _events(log_dir: str) -> EventAccumulator:
    files = list(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


class Snapshot(pl.Callback):
    """Copies the parameters and the batch at the start of every step with global_step % n == 0
    (no gradient accumulation: one batch per step)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.states: dict[int, tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.states[step] = (state, tuple(b.detach().clone() for b in batch))


def _hand(state, batch, source: str = "parameters", tasks=TASKS):
    """Per-task gradients from separate forward/backward passes of a fresh TinyNet: cosines
    (dict by pair) and norms (dict by task), in float64."""
    net = TinyNet(tasks=tasks, mark_representation=False)
    own = net.state_dict()
    net.load_state_dict({k: v for k, v in state.items() if k in own})
    x, y = batch
    grads = {}
    for i, t in enumerate(tasks):
        net.zero_grad()
        h = net.trunk(x)
        if source == "representation":
            h = h.detach().requires_grad_()
        loss = F.mse_loss(net.heads[t](h).squeeze(-1), y[:, i])
        loss.backward()
        if source == "representation":
            grads[t] = h.grad.reshape(-1).double()
        else:
            grads[t] = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()]).double()
    cos = {
        (a, b): float(grads[a] @ grads[b] / (grads[a].norm() * grads[b].norm()))
        for a, b in PAIRS
        if a in tasks and b in tasks
    }
    return cos, {t: float(g.norm()) for t, g in grads.items()}


def _check_against_hand(acc, snapshot, prefix, source, steps, rel=1e-4, abs_=1e-5):
    for step in steps:
        cos, norms = _hand(*snapshot.states[step], source=source)
        for a, b in PAIRS:
            logged = _scalars(acc, f"{prefix}/cos/{a}/{b}")[step]
            assert logged == pytest.approx(cos[(a, b)], rel=rel, abs=abs_), (step, a, b)
        frac = sum(v < 0 for v in cos.values()) / len(cos)
        assert _scalars(acc, f"{prefix}/fraction")[step] == pytest.approx(frac)
        assert _scalars(acc, f"{prefix}/min_cos")[step] == pytest.approx(
            min(cos.values()), rel=rel, abs=abs_
        )
        for t in TASKS:
            assert _scalars(acc, f"{prefix}/grad_norm/{t}")[step] == pytest.approx(
                norms[t], rel=rel * 10
            )


# ---------------------------------------------------------------------------------- conflict
@pytest.mark.parametrize("method", [None, DWA(), GradNorm(alpha=1.5)], ids=repr)
def test_cosines_equal_a_hand_computation(tmp_path, method):
    logger = TensorBoardLogger(tmp_path, name="tb")
    snap = Snapshot(3)
    callbacks = [
        GradientConflictMonitor(every_n_steps=3),
        GradientConflictMonitor(every_n_steps=3, source="representation", prefix="rep"),
        snap,
    ]
    if method is not None:
        callbacks.insert(0, copy.deepcopy(method))
    t = trainer(tmp_path, callbacks, logger=logger, max_epochs=1)
    t.fit(TinyNet(), loader())  # 8 steps
    acc = _events(logger.log_dir)
    steps = [0, 3, 6]
    for prefix in ("conflict", "rep"):
        assert sorted(_scalars(acc, f"{prefix}/cos/a/b")) == steps
    _check_against_hand(acc, snap, "conflict", "parameters", steps)
    _check_against_hand(acc, snap, "rep", "representation", steps)


@pytest.mark.parametrize(
    "method",
    [PCGrad(source="representation", seed=1), UPGrad(source="representation"), MGDA()],
    ids=repr,
)
def test_gradient_methods_with_a_cut_representation(tmp_path, method):
    # The heads run on a leaf copy of the marked representation: the parameter cosines are chained
    # through the trunk's graph and equal those of the uncut model.
    logger = TensorBoardLogger(tmp_path, name="tb")
    snap = Snapshot(4)
    params = GradientConflictMonitor(every_n_steps=4)
    rep = GradientConflictMonitor(every_n_steps=4, source="representation", prefix="rep")
    t = trainer(tmp_path, [copy.deepcopy(method), params, rep, snap], logger=logger, max_epochs=1)
    net = TinyNet()
    t.fit(net, loader())  # 8 steps
    acc = _events(logger.log_dir)
    _check_against_hand(acc, snap, "conflict", "parameters", [0, 4])
    _check_against_hand(acc, snap, "rep", "representation", [0, 4])
    assert params.num_measured == rep.num_measured == 2
    assert params.num_skipped == 0


class Opposed(MultiTaskModule):
    """One linear trunk read by both tasks, with opposite targets: from a zero start, grad L_a =
    -grad L_b exactly, and the summed gradient is zero, so the model never moves."""

    def __init__(self) -> None:
        super().__init__(tasks=["up", "down"], optimizer={"name": "sgd", "lr": 0.1})
        self.trunk = nn.Linear(6, 1)
        nn.init.zeros_(self.trunk.weight)
        nn.init.zeros_(self.trunk.bias)

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        pred = self.trunk(x).squeeze(-1)
        return {"up": F.mse_loss(pred, y[:, 0]), "down": F.mse_loss(pred, -y[:, 0])}


def test_opposite_targets_conflict_fully(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = GradientConflictMonitor(every_n_steps=2)
    trainer(tmp_path, [monitor], logger=logger, max_epochs=1).fit(Opposed(), loader())
    acc = _events(logger.log_dir)
    cos = _scalars(acc, "conflict/cos/up/down")
    assert sorted(cos) == [0, 2, 4, 6]
    assert all(v == pytest.approx(-1.0, abs=1e-6) for v in cos.values())
    assert all(v == 1.0 for v in _scalars(acc, "conflict/fraction").values())
    norms_up = _scalars(acc, "conflict/grad_norm/up")
    assert norms_up == pytest.approx(_scalars(acc, "conflict/grad_norm/down"))
    assert monitor.last_cosines is not None
    assert monitor.last_cosines.flatten().tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0])


@pytest.mark.parametrize(("accumulate", "expected"), [(1, [0, 5, 10, 15]), (2, [0, 5])])
def test_no_work_between_its_steps(tmp_path, monkeypatch, accumulate, expected):
    calls = []
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    # one backward per task (the engine may otherwise run them as one batched call)
    monkeypatch.setattr(TaskGradients, "batching", "loop")
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = GradientConflictMonitor(every_n_steps=5)
    t = trainer(
        tmp_path, [monitor], logger=logger, max_epochs=2, accumulate_grad_batches=accumulate
    )
    t.fit(TinyNet(), loader())  # 16 micro-batches: 16 or 8 optimizer steps
    # without a weighting only the monitor calls autograd.grad: one call per task, per measurement
    # (once per optimizer step, on its first micro-batch)
    assert monitor.num_measured == len(expected)
    assert len(calls) == 3 * len(expected)
    acc = _events(logger.log_dir)
    assert sorted(_scalars(acc, "conflict/cos/a/b")) == expected


def test_heatmap_image_in_the_event_file(tmp_path, monkeypatch):
    import lightning_aw.monitor._conflict as conflict

    drawn = []
    real = conflict.cosine_heatmap

    def capture(cosines, tasks, title):
        drawn.append((cosines, list(tasks), title))
        return real(cosines, tasks, title)

    monkeypatch.setattr(conflict, "cosine_heatmap", capture)
    backend = plt.get_backend()
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = GradientConflictMonitor(every_n_steps=4, log_norms=False)
    trainer(tmp_path, [monitor], logger=logger, max_epochs=2).fit(TinyNet(), loader())
    acc = _events(logger.log_dir)
    images = acc.Images("conflict/heatmap")
    assert [im.step for im in images] == [8, 16]  # at the end of each epoch, not in the steps
    assert images[0].width > 100 and images[0].height > 100
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    # each heatmap is the mean of its epoch's measurements (steps 0, 4 and 8, 12)
    assert [title for *_, title in drawn] == [
        "mean gradient cosines, steps 0-4",
        "mean gradient cosines, steps 8-12",
    ]
    for (matrix, tasks, _), steps in zip(drawn, ([0, 4], [8, 12]), strict=True):
        assert tasks == list(TASKS)
        for a, b in PAIRS:
            logged = _scalars(acc, f"conflict/cos/{a}/{b}")
            mean = sum(logged[s] for s in steps) / 2
            i, j = TASKS.index(a), TASKS.index(b)
            assert matrix[i][j] == pytest.approx(mean, abs=1e-6)
            assert matrix[j][i] == pytest.approx(mean, abs=1e-6)
        assert [matrix[i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert not any(tag.startswith("conflict/grad_norm") for tag in acc.Tags()["scalars"])
    assert plt.get_fignums() == []  # no figure left open in pyplot's registry
    assert plt.get_backend() == backend  # the user's backend is untouched


def test_any_logger_gets_the_scalars(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    monitor = GradientConflictMonitor(every_n_steps=4)
    trainer(tmp_path, [monitor], logger=logger, max_epochs=1).fit(TinyNet(), loader())
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"conflict/cos/a/b", "conflict/fraction", "conflict/grad_norm/c"} <= set(header)


def test_absent_task_has_no_cosine(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    snap = Snapshot(2)
    monitor = GradientConflictMonitor(every_n_steps=2)
    net = TinyNet(absent=lambda batch_idx, task: task == "c" and batch_idx == 2)
    trainer(tmp_path, [monitor, snap], logger=logger, max_epochs=1).fit(net, loader())
    acc = _events(logger.log_dir)
    assert sorted(_scalars(acc, "conflict/cos/a/b")) == [0, 2, 4, 6]
    assert sorted(_scalars(acc, "conflict/cos/a/c")) == [0, 4, 6]  # c absent at step 2
    assert 2 not in _scalars(acc, "conflict/grad_norm/c")
    cos, _ = _hand(*snap.states[2], tasks=("a", "b"))
    assert _scalars(acc, "conflict/cos/a/b")[2] == pytest.approx(cos[("a", "b")], rel=1e-4)
    assert _scalars(acc, "conflict/fraction")[2] == (1.0 if cos[("a", "b")] < 0 else 0.0)


def test_single_task_logs_only_the_norm(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    snap = Snapshot(4)
    monitor = GradientConflictMonitor(every_n_steps=4)
    t = trainer(tmp_path, [monitor, snap], logger=logger, max_epochs=1)
    with pytest.warns(UserWarning, match="one task"):
        t.fit(TinyNet(tasks=("a",)), loader())
    acc = _events(logger.log_dir)
    assert sorted(t for t in acc.Tags()["scalars"] if t.startswith("conflict/")) == [
        "conflict/grad_norm/a"
    ]
    assert acc.Tags()["images"] == []
    _, norms = _hand(*snap.states[4], tasks=("a",))
    assert _scalars(acc, "conflict/grad_norm/a")[4] == pytest.approx(norms["a"], rel=1e-4)


def test_fp16_grad_scaler(tmp_path):
    # fp16 autocast forward, GradScaler: cosines and (unscaled) norms close to the fp32 reference
    logger = TensorBoardLogger(tmp_path, name="tb")
    snap = Snapshot(4)
    monitor = GradientConflictMonitor(every_n_steps=4)
    t = trainer(
        tmp_path,
        [monitor, snap],
        logger=logger,
        max_epochs=1,
        plugins=[MixedPrecision("16-mixed", "cpu")],
    )
    t.fit(TinyNet(), loader())
    assert t.precision_plugin.scaler is not None and t.precision_plugin.scaler.get_scale() > 1
    acc = _events(logger.log_dir)
    _check_against_hand(acc, snap, "conflict", "parameters", [0, 4], rel=3e-2, abs_=3e-3)


def test_nonfinite_gradients_skip_the_measurement(tmp_path, caplog):
    # task b's loss is finite (its value is unchanged) but its gradient is NaN
    def nan_grad(batch_idx, task, loss):
        return loss + 0.0 * torch.sqrt(loss - loss) if task == "b" else loss

    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = GradientConflictMonitor(every_n_steps=1)
    with caplog.at_level(logging.DEBUG, logger="lightning_aw.monitor._conflict"):
        trainer(tmp_path, [monitor], logger=logger, max_steps=1).fit(
            TinyNet(loss_hook=nan_grad), loader()
        )
    assert monitor.num_skipped == 1 and monitor.num_measured == 0
    assert "not finite" in caplog.text
    scalars = EventAccumulator(logger.log_dir).Reload().Tags()["scalars"]
    assert not any(tag.startswith("conflict/") for tag in scalars)


def test_arguments_and_setup_errors(tmp_path):
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientConflictMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="source"):
        GradientConflictMonitor(source="trunk")
    with pytest.raises(ValueError, match="ddp_sync"):
        GradientConflictMonitor(ddp_sync="mean")
    with pytest.raises(ValueError, match="prefix"):
        GradientConflictMonitor(prefix="conflict/")
    assert repr(GradientConflictMonitor(3, ddp_sync="global")) == (
        "GradientConflictMonitor(every_n_steps=3, ddp_sync='global')"
    )
    monitor = GradientConflictMonitor(every_n_steps=1, source="representation")
    with pytest.raises(
        pl.utilities.exceptions.MisconfigurationException, match="shared_representation"
    ):
        trainer(tmp_path, [monitor], max_steps=1).fit(TinyNet(mark_representation=False), loader())

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(6, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="MultiTaskModule"):
        trainer(tmp_path, [GradientConflictMonitor()], max_steps=1).fit(Plain(), loader())


# ---------------------------------------------------------------------------------- figures
def test_weight_figures_record_and_draw(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    figures = WeightFigures()
    recorder = WeightRecorder()
    t = trainer(
        tmp_path,
        [GradNorm(alpha=1.5, lr=0.05), figures, recorder],
        logger=logger,
        log_every_n_steps=2,
        max_epochs=2,
    )
    t.fit(TinyNet(), loader())  # 16 steps, one batch per step
    assert figures.steps == list(range(0, 16, 2))
    history = figures.history
    assert list(history) == list(TASKS)
    for i, t_name in enumerate(TASKS):
        assert history[t_name] == pytest.approx([recorder.weights[s][i] for s in figures.steps])
    assert len({round(v, 6) for v in history["a"]}) > 1  # GradNorm's weights move
    acc = _events(logger.log_dir)
    for tag in ("weights/trajectories", "weights/shares"):
        images = acc.Images(tag)
        assert [im.step for im in images] == [8, 16]  # end of epochs 0 and 1
        assert images[-1].encoded_image_string[:4] == b"\x89PNG"
    assert plt.get_fignums() == []


def test_weight_history_stays_bounded(tmp_path):
    figures = WeightFigures(every_n_steps=1, max_points=4, every_n_epochs=2)
    recorder = WeightRecorder()
    trainer(tmp_path, [GradNorm(alpha=1.5, lr=0.05), figures, recorder], max_epochs=2).fit(
        TinyNet(), loader()
    )
    # 0,1,2,3 fill it; at 4 it halves to [0, 2] and records every 2nd step; at 8 it halves to
    # [0, 4] and records every 4th step
    assert figures.steps == [0, 4, 8, 12]
    for i, t_name in enumerate(TASKS):
        assert figures.history[t_name] == pytest.approx(
            [recorder.weights[s][i] for s in (0, 4, 8, 12)]
        )
    assert figures.state_dict()["stride"] == 4


def test_weight_history_survives_resume(tmp_path):
    def run(root, epochs, ckpt=None, checkpoint=False):
        figures = WeightFigures(every_n_steps=1, max_points=6)
        callbacks = [GradNorm(alpha=1.5, lr=0.05), figures]
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=root, save_last=True))
        trainer(root, callbacks, max_epochs=epochs, enable_checkpointing=checkpoint).fit(
            TinyNet(), loader(), ckpt_path=ckpt
        )
        return figures

    full = run(tmp_path / "full", 2)
    run(tmp_path / "part", 1, checkpoint=True)
    ckpt = tmp_path / "part" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"]["WeightFigures"]
    assert state["steps"] == [0, 2, 4, 6] and state["stride"] == 2
    resumed = run(tmp_path / "resumed", 2, ckpt=str(ckpt))
    assert full.steps == resumed.steps == [0, 4, 8, 12]
    assert resumed.history == full.history


def test_without_matplotlib(tmp_path, monkeypatch):
    for name in (
        "matplotlib",
        "matplotlib.figure",
        "matplotlib.backends",
        "matplotlib.backends.backend_agg",
    ):
        monkeypatch.setitem(sys.modules, name, None)
    logger = TensorBoardLogger(tmp_path, name="tb")
    figures = WeightFigures(every_n_steps=1)
    monitor = GradientConflictMonitor(every_n_steps=4)
    t = trainer(tmp_path, [figures, monitor], logger=logger, max_epochs=1)
    with pytest.warns(UserWarning, match=r"pip install 'lightning-aw\[plots\]'") as record:
        t.fit(TinyNet(), loader())
    ours = [w for w in record if "lightning-aw[plots]" in str(w.message)]
    assert len(ours) == 2  # one per callback
    assert {"WeightFigures" in str(w.message) for w in ours} == {True, False}
    assert figures.steps == [] and figures.history == {}
    acc = _events(logger.log_dir)
    assert acc.Tags()["images"] == []
    assert sorted(_scalars(acc, "conflict/cos/a/b")) == [0, 4]  # the scalars do not need it
    with pytest.raises(ImportError, match="lightning-aw"):
        plot_weights({"a": [1.0]})


def test_plot_weights(tmp_path):
    history = {"a": [1.0, 2.0, 3.0, -1.0], "b": [1.0, 2.0, 1.0, 1.0]}
    fig = plot_weights(history, tmp_path / "out" / "w.png", steps=[0, 10, 20, 30], title="t")
    png = (tmp_path / "out" / "w.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    lines, shares = fig.axes
    assert [list(map(float, ln.get_ydata())) for ln in lines.lines] == [history["a"], history["b"]]
    assert list(map(float, lines.lines[0].get_xdata())) == [0, 10, 20, 30]
    # stacked shares: a's band is max(w_a, 0) / (max(w_a, 0) + max(w_b, 0)), the top is 1
    a_band, b_band = shares.collections[:2]
    top_a = sorted({round(float(y), 6) for x, y in a_band.get_paths()[0].vertices if y > 0})
    assert top_a == pytest.approx(sorted({0.5, 0.75}))  # shares 0.5, 0.5, 0.75, 0 (clipped)
    assert max(y for _, y in b_band.get_paths()[0].vertices) == pytest.approx(1.0)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with pytest.raises(ValueError, match="task 'b' has 1"):
        plot_weights({"a": [1.0, 2.0], "b": [1.0]})
    with pytest.raises(ValueError, match="`steps`"):
        plot_weights({"a": [1.0, 2.0]}, steps=[0])
    with pytest.raises(ValueError, match="history"):
        plot_weights({})


def test_weight_figures_arguments():
    with pytest.raises(ValueError, match="every_n_epochs"):
        WeightFigures(every_n_epochs=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        WeightFigures(every_n_steps=0)
    with pytest.raises(ValueError, match="max_points"):
        WeightFigures(max_points=5)


# ---------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
def test_ddp_local_and_global(ddp_results):
    """The ``monitor`` case of ``ddp_script.py``: three GradientConflictMonitors and WeightFigures
    next to PCGrad, for 2 steps; rank r trains on samples r, r + 2, r + 4, ... in order."""
    r0, r1 = ddp_results.load("monitor")
    assert r0["measured"] == {"local": 2, "global": 2, "global_rep": 2}
    assert r1["measured"] == {"local": 0, "global": 2, "global_rep": 2}  # "local": rank 0 only
    assert r0["steps"] == [0, 1] and r1["steps"] == []  # WeightFigures: rank 0 only
    acc = _events(str(next((ddp_results.out / "monitor" / "tb").iterdir())))
    # step 0, initial parameters: rank 0's shard is samples 0, 2, ..., 30, the global batch 0..31
    x, y = regression_data(64)
    state = TinyNet().state_dict()
    local_cos, _ = _hand(state, (x[0:32:2], y[0:32:2]))
    global_cos, _ = _hand(state, (x[:32], y[:32]))
    global_rep_cos, _ = _hand(state, (x[:32], y[:32]), source="representation")
    for a, b in PAIRS:
        tag = f"cos/{a}/{b}"
        assert _scalars(acc, f"local/{tag}")[0] == pytest.approx(
            local_cos[(a, b)], rel=1e-4, abs=1e-6
        )
        assert _scalars(acc, f"global/{tag}")[0] == pytest.approx(
            global_cos[(a, b)], rel=1e-4, abs=1e-6
        )
        assert _scalars(acc, f"global_rep/{tag}")[0] == pytest.approx(
            global_rep_cos[(a, b)], rel=1e-4, abs=1e-6
        )
    assert local_cos != pytest.approx(global_cos)  # the two modes measure different things
    assert sorted(_scalars(acc, "global/fraction")) == [0, 1]
    assert [im.step for im in acc.Images("weights/shares")] == [2]  # the one epoch's end
    assert [im.step for im in acc.Images("global/heatmap")] == [2]
