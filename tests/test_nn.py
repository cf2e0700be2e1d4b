"""The blocks of `lightning_aw.nn` (gated experts, cross-stitch, task attention) and the balancing
terms, against hand computations; the aux-free bias in real Trainers (balance, exact resume); a
block inside a MultiTaskModule with a loss- and a gradient-based method."""

from __future__ import annotations

import math
import statistics

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import regression_data, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw import DWA, MGDA, MultiTaskModule
from lightning_aw.nn import (
    CGC,
    PLE,
    AuxFreeBalancing,
    CrossStitch,
    Gate,
    MMoE,
    TaskAttention,
    importance_loss,
    route,
    router_z_loss,
    switch_load_balancing_loss,
)


def _linear(d_in: int = 6, d_out: int = 4):
    return lambda: nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU())


# ---------------------------------------------------------------------- gates
def test_route_top_k_keeps_the_largest_and_renormalises():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.0, 4.0, 1.0]])
    g = route(logits, top_k=2)
    assert (g > 0).sum(-1).tolist() == [2, 2]
    # row 0 keeps experts 1 and 2, row 1 experts 2 and 3; others exactly 0
    assert g[0, 0] == 0 and g[0, 3] == 0 and g[1, 0] == 0 and g[1, 1] == 0
    e = math.exp
    assert g[0, 1].item() == pytest.approx(e(3) / (e(3) + e(2)))
    assert g[1, 3].item() == pytest.approx(e(1) / (e(4) + e(1)))
    # a selection bias changes which experts are kept, not their values
    biased = route(logits, top_k=1, bias=torch.tensor([0.0, 0.0, 0.0, 10.0]))
    assert biased[:, 3].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_blocks_gates_sum_to_one_and_top_k_is_sparse(top_k):
    torch.manual_seed(0)
    x = torch.randn(7, 6)
    blocks = [
        MMoE(6, _linear(), num_experts=3, tasks=["a", "b"], top_k=top_k),
        CGC(6, _linear(), tasks=["a", "b"], num_shared=2, num_specific=1, top_k=top_k),
        PLE(6, lambda d: _linear(d)(), ["a", "b"], 2, 1, num_levels=3, hidden_dim=4, top_k=top_k),
    ]
    for block in blocks:
        out = block(x)
        assert sorted(out) == ["a", "b"] and out["a"].shape == (7, 4)
        for key, gate in block.gates().items():
            g = gate.last
            assert g is not None and g.shape == (7, len(block.expert_names(key)))
            torch.testing.assert_close(g.sum(-1), torch.ones(7))
            if top_k is not None:
                assert ((g > 0).sum(-1) == top_k).all(), key
        for key, mean in block.gate_weights.items():
            assert mean.sum().item() == pytest.approx(1.0), key


def test_mmoe_is_the_gated_mixture_of_its_experts():
    torch.manual_seed(1)
    block = MMoE(6, _linear(), num_experts=3, tasks=["a", "b"])
    x = torch.randn(5, 6)
    out = block(x)
    experts = [e(x) for e in block.experts]
    for t in ("a", "b"):
        g = torch.softmax(x @ block.gate[t].linear.weight.T + block.gate[t].linear.bias, -1)
        want = sum(g[:, i : i + 1] * experts[i] for i in range(3))
        torch.testing.assert_close(out[t], want)
        torch.testing.assert_close(block.gate_weights[t], g.mean(0))
    # experts shared, gates per task, for the gradient methods
    assert {id(p) for p in block.shared_parameters()} == {id(p) for p in block.experts.parameters()}
    assert len(block.task_parameters("a")) == 2


def test_ple_levels_read_their_task_and_the_shared_output():
    torch.manual_seed(2)
    block = PLE(6, lambda d: nn.Linear(d, 4), ["a", "b"], 1, 1, num_levels=2, hidden_dim=4)
    x = torch.randn(3, 6)
    out = block(x)
    l0, l1 = block.levels

    def gate(g, h):
        return torch.softmax(g.linear(h), -1)

    e = {t: l0.specific[t][0](x) for t in ("a", "b")}
    s = l0.shared[0](x)
    h = {t: gate(l0.gate[t], x)[:, :1] * e[t] + gate(l0.gate[t], x)[:, 1:] * s for t in e}
    gs = gate(l0.shared_gate, x)  # over a.0, b.0, shared.0
    hs = gs[:, :1] * e["a"] + gs[:, 1:2] * e["b"] + gs[:, 2:] * s
    for t in ("a", "b"):
        g = gate(l1.gate[t], h[t])
        want = g[:, :1] * l1.specific[t][0](h[t]) + g[:, 1:] * l1.shared[0](hs)
        torch.testing.assert_close(out[t], want)
    assert block.expert_names("level0/shared") == ["a.0", "b.0", "shared.0"]
    assert l1.shared_gate is None  # the last level has no shared output


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="top_k"):
        MMoE(6, _linear(), num_experts=3, tasks=["a"], top_k=4)
    with pytest.raises(ValueError, match="balance=True"):
        Gate(6, 3, top_k=None, balance=True)
    with pytest.raises(ValueError, match="hidden_dim"):
        PLE(6, lambda d: nn.Linear(d, 4), ["a"], 1, 1, num_levels=2)
    with pytest.raises(TypeError, match="factory"):
        MMoE(6, lambda: 3, num_experts=2, tasks=["a"])  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="6 features"):
        MMoE(6, lambda: nn.Identity(), num_experts=2, tasks=["a"])(torch.randn(2, 5))
    with pytest.raises(ValueError, match="hidden_dim=3"):
        PLE(6, lambda d: nn.Linear(d, 4), ["a"], 1, 1, num_levels=2, hidden_dim=3)(torch.ones(2, 6))


def test_recording_off_keeps_nothing():
    block = MMoE(6, _linear(), num_experts=2, tasks=["a"])
    block(torch.randn(2, 6))
    block.record_gates(False)
    block(torch.randn(2, 6))
    assert block.gate_weights == {} and block.gate["a"].logits is not None


# ---------------------------------------------------------------------- soft sharing
@pytest.mark.parametrize("channels", [None, 3])
def test_cross_stitch_combines_the_columns(channels):
    unit = CrossStitch(["a", "b", "c"], num_channels=channels, alpha_self=0.8, alpha_other=0.05)
    a = unit.alpha.detach()
    assert a[..., 0, 0].flatten().tolist() == pytest.approx([0.8] * (channels or 1))
    assert a[..., 0, 1].flatten().tolist() == pytest.approx([0.05] * (channels or 1))
    with torch.no_grad():
        unit.alpha.copy_(torch.randn_like(unit.alpha))
    xs = {t: torch.randn(2, 3, 4) for t in ("a", "b", "c")}
    out = unit(xs)
    a = unit.alpha.detach()
    for i, t in enumerate(("a", "b", "c")):
        if channels is None:
            want = sum(a[i, j] * xs[s] for j, s in enumerate(("a", "b", "c")))
        else:
            want = sum(a[:, i, j].view(1, 3, 1) * xs[s] for j, s in enumerate(("a", "b", "c")))
        torch.testing.assert_close(out[t], want)
        torch.testing.assert_close(unit.gate_weights[t], a[..., i, :])


def test_task_attention_masks_the_shared_features():
    torch.manual_seed(3)
    att = TaskAttention(["a", "b"], channels=4, hidden=2, with_previous=True)
    att.eval()
    p = torch.randn(2, 4, 3, 3)
    prev = {t: torch.randn(2, 4, 3, 3) for t in ("a", "b")}
    out = att(p, prev)
    for t in ("a", "b"):
        mask = att.mask[t](torch.cat([p, prev[t]], 1))
        assert ((mask > 0) & (mask < 1)).all()
        torch.testing.assert_close(out[t], mask * p)
        torch.testing.assert_close(att.gate_weights[t], mask.mean(dim=(0, 2, 3)))
    with pytest.raises(ValueError, match="previous"):
        att(p)


# ---------------------------------------------------------------------- balancing losses
def test_importance_loss_is_the_squared_cv_of_the_importances():
    gates = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], requires_grad=True)
    imp = [0.7, 0.8, 0.5]  # column sums
    cv2 = statistics.pvariance(imp) / statistics.mean(imp) ** 2  # population std (the paper's)
    loss = importance_loss(gates, weight=0.3)
    assert loss.item() == pytest.approx(0.3 * cv2)
    loss.backward()
    assert gates.grad is not None
    assert importance_loss(torch.full((4, 3), 1 / 3)).item() == pytest.approx(0.0, abs=1e-12)


def test_switch_loss_is_alpha_n_sum_f_p():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    probs = [math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in logits.tolist()]
    p0 = sum(probs) / 3  # mean probability of expert 0
    f = [2 / 3, 1 / 3]  # top-1: rows 0 and 2 to expert 0, row 1 to expert 1
    want = 0.5 * 2 * (f[0] * p0 + f[1] * (1 - p0))
    assert switch_load_balancing_loss(logits, alpha=0.5).item() == pytest.approx(want)


def test_router_z_loss_is_the_mean_squared_logsumexp():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    want = 0.1 * sum(v * v for v in lse) / 2
    assert router_z_loss(logits, weight=0.1).item() == pytest.approx(want)


# ---------------------------------------------------------------------- aux-free balancing
class _Skewed(pl.LightningModule):
    """A top-1 MMoE whose gate sends every sample to expert 0 at the start (frozen router)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = MMoE(4, lambda: nn.Linear(4, 1), 4, ["y"], top_k=1, balance=True)
        with torch.no_grad():
            lin = self.block.gate["y"].linear
            lin.weight.mul_(0.1)
            lin.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        lin.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.block(x)["y"].squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _skewed_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(-1)), batch_size=16)


def _load(block, x):
    block.eval()
    with torch.no_grad():
        g = block.gate["y"](x)
    block.train()
    return (g > 0).sum(0).float() / x.shape[0]


def test_aux_free_bias_moves_load_toward_uniform(tmp_path):
    net = _Skewed()
    x = _skewed_data().dataset.tensors[0]
    before = _load(net.block, x)
    assert before[0] == 1.0  # collapsed on expert 0
    balancer = AuxFreeBalancing(step_size=0.1)
    trainer(tmp_path, [balancer], max_epochs=4).fit(net, _skewed_data())
    after = _load(net.block, x)
    bias = net.block.gate["y"].balance_bias
    assert bias[0] < 0 and (bias[1:] > 0).any()
    # the spread of the load over the experts shrinks (uniform: 0.25 each)
    assert (after - 0.25).abs().max() < 0.5 * (before - 0.25).abs().max()
    assert balancer.last_load["block.gate.y"].sum().item() == 16  # one selection per sample


def test_aux_free_resumes_exactly(tmp_path):
    def run(epochs, ckpt=None, root=tmp_path / "a"):
        net = _Skewed()
        cb = ModelCheckpoint(dirpath=root, save_last=True)
        t = trainer(
            root, [AuxFreeBalancing(0.05), cb], max_epochs=epochs, enable_checkpointing=True
        )
        t.fit(net, _skewed_data(), ckpt_path=ckpt)
        return net, root / "last.ckpt"

    straight, _ = run(4, root=tmp_path / "straight")
    _, ckpt = run(2, root=tmp_path / "first")
    resumed, _ = run(4, ckpt=str(ckpt), root=tmp_path / "resumed")
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert straight.block.gate["y"].balance_bias.abs().sum() > 0


def test_aux_free_needs_a_balanced_gate(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    net = _Skewed()
    net.block = MMoE(4, lambda: nn.Linear(4, 1), 2, ["y"])
    with pytest.raises(MisconfigurationException, match="balance=True"):
        trainer(tmp_path, [AuxFreeBalancing()], max_epochs=1).fit(net, _skewed_data())
    with pytest.raises(ValueError, match="step_size"):
        AuxFreeBalancing(0.0)


# ---------------------------------------------------------------------- inside MultiTaskModule
class MoENet(MultiTaskModule):
    """A shared 6 -> 8 trunk (marked representation), an MMoE and one tower per task."""

    def __init__(self, mark: bool = True, **kwargs):
        kwargs.setdefault("optimizer", {"name": "sgd", "lr": 0.05})
        super().__init__(tasks=("a", "b", "c"), **kwargs)
        self.mark = mark
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.moe = MMoE(8, lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU()), 3, self.tasks)
        self.towers = nn.ModuleDict({t: nn.Linear(8, 1) for t in self.tasks})

    def shared_parameters(self):
        # gradient methods: the trunk and the experts are shared; gates and towers are per task
        return [*self.trunk.parameters(), *self.moe.shared_parameters()]

    def task_parameters(self):
        return {t: [*self.moe.task_parameters(t), *self.towers[t].parameters()] for t in self.tasks}

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        if self.mark:  # the last tensor every task reads (the MMoE gives one per task)
            h = self.shared_representation(h)
        mixed = self.moe(h)
        return {
            t: F.mse_loss(self.towers[t](mixed[t]).squeeze(-1), y[:, i])
            for i, t in enumerate(self.tasks)
        }


@pytest.mark.parametrize(
    ("method", "mark"),
    [(DWA(), True), (MGDA(), False), (MGDA(source="representation"), True)],
    ids=repr,
)
def test_mmoe_inside_a_multitask_module(tmp_path, method, mark):
    net = MoENet(mark=mark)
    gate_before = net.moe.gate["a"].linear.weight.detach().clone()
    expert_before = net.moe.experts[0][0].weight.detach().clone()
    x, y = regression_data(64)
    trainer(tmp_path, [method], max_epochs=1).fit(
        net, DataLoader(TensorDataset(x, y), batch_size=16)
    )
    assert not torch.equal(net.moe.gate["a"].linear.weight, gate_before)
    assert not torch.equal(net.moe.experts[0][0].weight, expert_before)
    assert all(math.isfinite(w) for w in net.task_weights.values())


def test_parameter_source_refuses_experts_behind_the_marked_representation(tmp_path):
    # the experts come after the trunk's output: with it marked, `shared_parameters()` may only
    # return what produces it; the error says so before any update
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    x, y = regression_data(32)
    with pytest.raises(MisconfigurationException, match="do not produce the tensor"):
        trainer(tmp_path, [MGDA()], max_epochs=1).fit(
            MoENet(mark=True), DataLoader(TensorDataset(x, y), batch_size=16)
        )


def test_readme_gated_experts_module_trains(tmp_path):
    import re
    from pathlib import Path

    from lightning.pytorch.loggers import TensorBoardLogger

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Gated experts and attention") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(block.split("\ntrainer = ")[0], "README.md", "exec"), namespace)
    net = namespace["Net"]()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=gen), torch.randint(0, 2, (64, 2), generator=gen).float()
    from lightning_aw.monitor import GateMonitor

    monitor = GateMonitor(heatmap=False)
    t = trainer(tmp_path, [DWA(), monitor], logger=TensorBoardLogger(tmp_path), log_every_n_steps=2)
    t.fit(net, DataLoader(TensorDataset(x, y), batch_size=16))
    assert sorted(monitor.last_stats) == ["moe/ctr", "moe/cvr"]


def test_blocks_copy_and_pickle_after_a_forward():
    # the logits keep their graph: EMA/SWA callbacks deep-copy the model mid-training
    import copy
    import pickle

    block = PLE(6, lambda d: nn.Linear(d, 4), ["a", "b"], 1, 2, hidden_dim=4, top_k=1, balance=True)
    att = TaskAttention(["a"], channels=2)
    block(torch.randn(3, 6)).values()
    att(torch.randn(2, 2, 3, 3))
    for module in (block, att):
        clone = copy.deepcopy(module)
        restored = pickle.loads(pickle.dumps(module))
        for other in (clone, restored):
            assert other.state_dict().keys() == module.state_dict().keys()
            for k, v in module.state_dict().items():
                torch.testing.assert_close(other.state_dict()[k], v)
    assert "levels.0.gate.a.balance_bias" in block.state_dict()
    assert copy.deepcopy(block).gate_weights == {}  # per-step scratch is not copied


def test_balancing_terms_reach_the_router_of_a_block():
    block = MMoE(6, _linear(), 4, ["a"], top_k=2)
    block(torch.randn(8, 6))
    g = block.gates()["a"]
    values = route(g.logits, g.top_k, g.balance_bias)
    torch.testing.assert_close(values.detach(), g.last)  # the gates the forward applied
    loss = importance_loss(values) + switch_load_balancing_loss(g.logits) + router_z_loss(g.logits)
    loss.backward()
    assert g.linear.weight.grad is not None and g.linear.weight.grad.abs().sum() > 0
