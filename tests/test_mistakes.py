"""The mistakes a new user makes raise a clear error within the first steps (no silent training).

Each test builds the mistake into a real tiny Trainer run and checks the error fires before the
first optimizer step, naming the task, parameter or setting. Without the guard each of these
runs trains without a word (the weights degrade silently), so each test fails on a library
without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import TinyNet, loader, trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_aw import DBMTL, MGDA, GradDrop, GradNorm, UPGrad
from lightning_aw.registry import create_method, get_method, list_methods


class BypassNet(TinyNet):
    """Task "c"'s head reads the trunk's output, not the marked representation."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        z = self.shared_representation(h)
        return {
            t: F.mse_loss(self.heads[t](h if t == "c" else z).squeeze(-1), y[:, i])
            for i, t in enumerate(self.tasks)
        }


@pytest.mark.parametrize(
    "method",
    [
        MGDA(source="representation"),
        MGDA(source="parameters"),  # the marked tensor is cut: parameter mode goes through it
        UPGrad(source="representation"),
        GradDrop(),
        DBMTL(source="representation"),
    ],
    ids=repr,
)
def test_head_that_bypasses_the_marked_representation(tmp_path, method):
    t = trainer(tmp_path, [method], max_epochs=1)
    with pytest.raises(
        MisconfigurationException,
        match=r"the loss of task 'c' does not depend on the tensor marked with "
        r"`shared_representation\(\)`",
    ):
        t.fit(BypassNet(), loader())
    assert t.global_step == 0


@pytest.mark.parametrize("name", ["none", *list_methods()])
@pytest.mark.parametrize("make_loss", ["detach", "constant"])
def test_task_loss_without_a_graph(tmp_path, name, make_loss):
    def hook(batch_idx, task, loss):
        if task != "b":
            return loss
        return loss.detach() if make_loss == "detach" else torch.tensor(3.0)

    callbacks = [] if name == "none" else [create_method(name, **get_method(name).example_kwargs)]
    t = trainer(tmp_path, callbacks, max_epochs=1)
    with pytest.raises(
        ValueError, match=r"The loss of task 'b' at batch 0 has no graph \(requires_grad is False"
    ):
        t.fit(TinyNet(loss_hook=hook), loader())
    assert t.global_step == 0


class ExtraSharedNet(TinyNet):
    """``shared_parameters()`` lists an unused layer, or a task's head, besides the trunk."""

    def __init__(self, extra: str, **kwargs) -> None:
        super().__init__(mark_representation=False, **kwargs)
        self.extra = extra
        self.unused = nn.Linear(16, 16)

    def shared_parameters(self):
        yield from self.trunk.parameters()
        yield from (self.unused if self.extra == "unused" else self.heads["a"]).parameters()


@pytest.mark.parametrize("extra", ["unused", "head"])
@pytest.mark.parametrize("method", [MGDA(), UPGrad(), DBMTL()], ids=repr)
def test_shared_parameters_every_task_does_not_reach(tmp_path, method, extra):
    names = "unused.weight" if extra == "unused" else "heads.a.weight"
    tasks = r"\['a', 'b', 'c'\]" if extra == "unused" else r"\['b', 'c'\]"
    t = trainer(tmp_path, [method], max_epochs=1)
    with pytest.raises(
        MisconfigurationException, match=rf"the shared parameter\(s\) \{{'{names}': {tasks}"
    ):
        t.fit(ExtraSharedNet(extra), loader())
    assert t.global_step == 0


def test_gradnorm_layer_every_task_does_not_reach(tmp_path):
    # the default layer is the last shared weight matrix: here an unused one
    t = trainer(tmp_path, [GradNorm()], max_epochs=1)
    with pytest.raises(
        MisconfigurationException,
        match=r"the loss of task 'a' does not reach the layer it measures \(shape \(16, 16\)\)",
    ):
        t.fit(ExtraSharedNet("unused"), loader())
    assert t.global_step == 0


class ManualNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_without_a_training_step(tmp_path):
    t = trainer(tmp_path, [], max_epochs=1)  # without a weighting callback too
    with pytest.raises(
        MisconfigurationException,
        match=r"`ManualNet.automatic_optimization` is False, but MultiTaskModule's "
        r"`training_step` relies on Lightning's automatic optimization",
    ):
        t.fit(ManualNet(), loader())
    assert t.global_step == 0


def test_manual_optimization_with_its_own_training_step_is_allowed(tmp_path):
    class OwnStep(ManualNet):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            losses, _ = self.compute_losses(batch, batch_idx)
            self.manual_backward(losses.sum())
            opt.step()

    t = trainer(tmp_path, [], max_epochs=1)
    t.fit(OwnStep(), loader())
    assert t.global_step == 8
