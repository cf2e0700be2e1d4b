"""AdaptiveStepMonitor: logged step-size statistics equal a hand computation from the state."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _helpers import TinyNet, loader, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_aw.optim import AdaptiveStepMonitor, effective_step_sizes, param_step_size

QS = (0.1, 0.5, 0.9)
QNAMES = ("p10", "median", "p90")


class GroupedNet(TinyNet):
    def task_parameters(self):
        return {t: self.heads[t].parameters() for t in self.tasks}


def np_(x) -> np.ndarray:
    return x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def hand_eta(kind: str, state: dict, group: dict, t: int) -> np.ndarray:
    """The effective step size by hand (float64, t = optimizer steps taken), from the papers'
    update rules as torch implements them."""
    lr, eps = group["lr"], group.get("eps", 0.0)
    if kind in ("adam", "adamw"):
        b1, b2 = group["betas"]
        v = np_(state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"])
        return lr / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + eps)
    if kind == "nadam":
        b1, b2 = group["betas"]
        psi = group["momentum_decay"]
        mu = [b1 * (1 - 0.5 * 0.96 ** (i * psi)) for i in range(1, t + 2)]  # mu_1 .. mu_{t+1}
        prod_next = math.prod(mu)  # mu_1 ... mu_{t+1}, recomputed, not read from the state
        v = np_(state["exp_avg_sq"])
        return lr * mu[-1] / (1 - prod_next) / (np.sqrt(v / (1 - b2**t)) + eps)
    if kind == "radam":
        b1, b2 = group["betas"]
        v = np_(state["exp_avg_sq"])
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho <= 5:
            return np.full_like(v, lr / (1 - b1**t))
        r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        return lr / (1 - b1**t) * r * math.sqrt(1 - b2**t) / (np.sqrt(v) + eps)
    if kind == "adamax":
        return lr / (1 - group["betas"][0] ** t) / np_(state["exp_inf"])
    if kind == "adagrad":
        return lr / (1 + (t - 1) * group["lr_decay"]) / (np.sqrt(np_(state["sum"])) + eps)
    if kind == "rmsprop":
        sq = np_(state["square_avg"])
        if group["centered"]:
            sq = sq - np_(state["grad_avg"]) ** 2
        return lr / (np.sqrt(sq) + eps)
    if kind == "adadelta":
        return lr * np.sqrt(np_(state["acc_delta"]) + eps) / np.sqrt(np_(state["square_avg"]) + eps)
    raise AssertionError(kind)


class StateSnapshots(pl.Callback):
    """Copies of the optimizer state and groups after every optimizer step."""

    def __init__(self):
        self.at: dict[int, list[tuple[str, dict, list[dict]]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.at[trainer.global_step] = [
            (
                g["name"],
                {k: v for k, v in g.items() if k != "params"},
                [
                    {
                        k: v.clone() if isinstance(v, torch.Tensor) else v
                        for k, v in opt.state.get(p, {}).items()
                    }
                    for p in g["params"]
                ],
            )
            for g in opt.param_groups
        ]


def events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def scalar(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def step_tags(acc: EventAccumulator) -> list[str]:
    return sorted(t for t in acc.Tags()["scalars"] if t.startswith("step_size/"))


CASES = [
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01, "eps": 1e-3}),
    ("adamw", {"lr": 0.02, "betas": (0.8, 0.95), "foreach": False}),
    ("adagrad", {"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.1, "eps": 1e-4}),
    ("rmsprop", {"lr": 0.005}),
    ("rmsprop", {"lr": 0.005, "centered": True, "momentum": 0.5, "alpha": 0.9}),
    ("nadam", {"lr": 0.01}),
    ("radam", {"lr": 0.01}),  # rho_t <= 5 at step 3 (no adaptive factor), 6.0 > 5 at step 6
    ("radam", {"lr": 0.01, "betas": (0.9, 0.9)}),  # rho_t = 2.9 at step 3, 5.4 at step 6
    ("adamax", {"lr": 0.01}),
    ("adadelta", {"lr": 1.0, "rho": 0.8}),
]


@pytest.mark.parametrize(("kind", "kwargs"), CASES, ids=lambda x: str(x))
def test_logged_step_sizes_equal_hand_computation(tmp_path, kind, kwargs):
    spec = {"name": kind, **kwargs, "groups": {"shared": {"lr": kwargs["lr"] / 2}}}
    logger = TensorBoardLogger(tmp_path, name="tb")
    snap = StateSnapshots()
    monitor = AdaptiveStepMonitor(every_n_steps=3)
    t = trainer(
        tmp_path, [monitor, snap], logger=logger, max_steps=6, max_epochs=None, log_every_n_steps=1
    )
    t.fit(GroupedNet(optimizer=spec), loader())
    acc = events(logger.log_dir)
    groups = ["shared", "task/a", "task/b", "task/c"]
    assert step_tags(acc) == sorted(f"step_size/{g}/{q}" for g in groups for q in QNAMES)
    for step in (3, 6):
        for name, group, states in snap.at[step]:
            assert all(int(s["step"]) == step for s in states if "step" in s)
            eta = np.concatenate([hand_eta(kind, s, group, step).ravel() for s in states])
            expected = np.quantile(eta, QS)
            for q, value in zip(QNAMES, expected, strict=True):
                logged = scalar(acc, f"step_size/{name}/{q}")
                assert sorted(logged) == [3, 6]  # logging steps only
                assert logged[step] == pytest.approx(value, rel=2e-5), (name, q, step)
            (hist,) = [
                h.histogram_value
                for h in acc.Histograms(f"step_size/{name}/log10")
                if h.step == step
            ]
            assert hist.num == eta.size
            assert hist.min == pytest.approx(np.log10(eta).min(), rel=1e-5, abs=1e-6)
            assert hist.max == pytest.approx(np.log10(eta).max(), rel=1e-5, abs=1e-6)
            assert hist.sum == pytest.approx(np.log10(eta).sum(), rel=1e-4, abs=1e-4)


def _moment_rules():
    """(kind, kwargs, what eta multiplies) for which the torch update is exactly eta * that."""
    return [
        ("adam", {"lr": 0.1}, "exp_avg"),
        ("adam", {"lr": 0.1, "amsgrad": True}, "exp_avg"),
        ("radam", {"lr": 0.1}, "exp_avg"),  # both regimes: rho_t <= 5 up to step 5
        ("adamax", {"lr": 0.1}, "exp_avg"),
        ("adagrad", {"lr": 0.1, "lr_decay": 0.2}, "grad"),
        ("rmsprop", {"lr": 0.01}, "grad"),
        ("rmsprop", {"lr": 0.01, "centered": True}, "grad"),
    ]


@pytest.mark.parametrize(("kind", "kwargs", "times"), _moment_rules(), ids=str)
def test_step_size_times_moment_is_the_update_torch_takes(kind, kwargs, times):
    """Behavioural check of the formulas: p_before - p_after == eta * m (or eta * g)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, dtype=torch.float64, generator=gen))
    cls = {
        "adam": torch.optim.Adam,
        "radam": torch.optim.RAdam,
        "adamax": torch.optim.Adamax,
        "adagrad": torch.optim.Adagrad,
        "rmsprop": torch.optim.RMSprop,
    }[kind]
    opt = cls([p], **kwargs)
    for _ in range(8):
        g = torch.randn(50, dtype=torch.float64, generator=gen)
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
        eta = param_step_size(kind, opt.state[p], opt.param_groups[0])
        assert eta.dtype == torch.float64 and (eta > 0).all()
        factor = g if times == "grad" else opt.state[p][times]
        torch.testing.assert_close(before - p.detach(), eta * factor, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("kind", "cls", "kwargs"),
    [
        ("adam", torch.optim.Adam, {"amsgrad": True}),
        ("nadam", torch.optim.NAdam, {}),
        ("radam", torch.optim.RAdam, {"betas": (0.9, 0.9)}),
        ("adamax", torch.optim.Adamax, {}),
        ("adagrad", torch.optim.Adagrad, {"lr_decay": 0.1}),
    ],
)
def test_device_tensor_step_path_agrees(monkeypatch, kind, cls, kwargs):
    """A fused/capturable optimizer on a GPU keeps ``step`` (and NAdam's ``mu_product``) on the
    device; the formulas then run on tensors (no host sync). Force that path on the CPU."""
    from lightning_aw.optim import _monitor

    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(20, dtype=torch.float64, generator=gen))
    opt = cls([p], lr=0.1, **kwargs)

    def on_device(x, like):
        return x.to(like) if isinstance(x, torch.Tensor) else float(x)

    for _ in range(6):  # RAdam with beta2 = 0.9: rho_t <= 5 up to step 5, > 5 at step 6
        p.grad = torch.randn(20, dtype=torch.float64, generator=gen)
        opt.step()
        as_floats = param_step_size(kind, opt.state[p], opt.param_groups[0])
        with monkeypatch.context() as m:
            m.setattr(_monitor, "_scalar", on_device)
            as_tensors = param_step_size(kind, opt.state[p], opt.param_groups[0])
        torch.testing.assert_close(as_tensors, as_floats, rtol=1e-12, atol=0)


def test_effective_step_sizes_by_group():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    unstepped = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.RMSprop(
        [{"params": [a, unstepped], "name": "x"}, {"params": [b]}], lr=0.1, eps=0.0, alpha=0.5
    )
    a.grad, b.grad = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 2.0])
    opt.step()
    out = effective_step_sizes(opt)
    assert list(out) == ["x", "group1"]  # the unstepped parameter is left out
    # square_avg = (1 - alpha) g^2 after one step: eta = lr / (sqrt(0.5) |g|)
    torch.testing.assert_close(out["x"], 0.1 / (math.sqrt(0.5) * torch.tensor([1.0, 2.0, 4.0])))
    with pytest.raises(ValueError, match="SGD: it is not adaptive"):
        effective_step_sizes(torch.optim.SGD([a], lr=0.1))
    with pytest.raises(ValueError, match="Parameter `rule`"):
        param_step_size("lamb", opt.state[a], opt.param_groups[0])


def test_accumulation_logs_once_per_logging_optimizer_step(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(
        tmp_path,
        [AdaptiveStepMonitor(every_n_steps=2)],
        logger=logger,
        max_steps=4,
        max_epochs=None,
        accumulate_grad_batches=2,
        log_every_n_steps=1,
    )
    t.fit(GroupedNet(optimizer={"name": "adam", "lr": 0.01}), loader())
    acc = events(logger.log_dir)
    assert sorted(scalar(acc, "step_size/shared/median")) == [2, 4]
    assert [h.step for h in acc.Histograms("step_size/shared/log10")] == [2, 4]


def test_parameters_without_state_are_skipped(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    net = GroupedNet(optimizer={"name": "adam", "lr": 0.01}, absent=lambda i, t: t == "c")
    t = trainer(
        tmp_path,
        [AdaptiveStepMonitor(every_n_steps=2)],
        logger=logger,
        max_steps=4,
        max_epochs=None,
        log_every_n_steps=1,
    )
    t.fit(net, loader())
    assert not t.optimizers[0].state.get(net.heads["c"].weight)  # never stepped
    tags = step_tags(events(logger.log_dir))
    assert "step_size/task/a/median" in tags
    assert not [tag for tag in tags if tag.startswith("step_size/task/c/")]


class _SignSGD(torch.optim.Optimizer):
    """An optimizer the registry does not know."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
        return loss


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.05), "SGD: it is not adaptive"),
        (lambda m: _SignSGD(m.parameters()), "_SignSGD: it is not in the lightning_aw.optim"),
    ],
)
def test_uninterpretable_optimizers_warn_once_and_log_nothing(tmp_path, make, match):
    class Net(GroupedNet):
        def configure_optimizers(self):
            return make(self)

    logger = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(
        tmp_path,
        [AdaptiveStepMonitor(every_n_steps=1)],
        logger=logger,
        max_steps=5,
        max_epochs=None,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Net(), loader())
    said = [w for w in caught if "AdaptiveStepMonitor: nothing to monitor" in str(w.message)]
    assert len(said) == 1 and match in str(said[0].message)
    acc = events(logger.log_dir)
    assert "loss/total" in acc.Tags()["scalars"] and step_tags(acc) == []


def test_large_groups_are_subsampled(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    snap = StateSnapshots()
    monitor = AdaptiveStepMonitor(every_n_steps=4, max_samples=40, quantiles=(0.25, 0.5, 0.75))
    t = trainer(
        tmp_path, [monitor, snap], logger=logger, max_steps=4, max_epochs=None, log_every_n_steps=1
    )
    t.fit(GroupedNet(optimizer={"name": "adagrad", "lr": 0.05}), loader())
    acc = events(logger.log_dir)
    full = {
        name: np.concatenate([hand_eta("adagrad", s, g, 4).ravel() for s in states])
        for name, g, states in snap.at[4]
    }
    assert full["shared"].size == 384 and full["task/a"].size == 17
    (shared,) = acc.Histograms("step_size/shared/log10")
    assert shared.histogram_value.num == 40  # exactly max_samples, drawn from the group
    assert np.log10(full["shared"]).min() - 1e-6 <= shared.histogram_value.min
    assert shared.histogram_value.max <= np.log10(full["shared"]).max() + 1e-6
    lo, hi = np.quantile(full["shared"], [0.2, 0.8])
    assert lo <= scalar(acc, "step_size/shared/median")[4] <= hi
    (head,) = acc.Histograms("step_size/task/a/log10")  # small group: every element, exact
    assert head.histogram_value.num == 17
    assert scalar(acc, "step_size/task/a/p25")[4] == pytest.approx(
        np.quantile(full["task/a"], 0.25), rel=2e-5
    )


def test_linear_histograms(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    snap = StateSnapshots()
    t = trainer(
        tmp_path,
        [AdaptiveStepMonitor(every_n_steps=2, log10=False), snap],
        logger=logger,
        max_steps=2,
        max_epochs=None,
        log_every_n_steps=1,
    )
    t.fit(GroupedNet(optimizer={"name": "rmsprop", "lr": 0.01}), loader())
    acc = events(logger.log_dir)
    assert not [h for h in acc.Tags()["histograms"] if h.endswith("/log10")]
    name, group, states = snap.at[2][0]
    eta = np.concatenate([hand_eta("rmsprop", s, group, 2).ravel() for s in states])
    (hist,) = acc.Histograms(f"step_size/{name}")
    assert hist.histogram_value.min == pytest.approx(eta.min(), rel=1e-5)
    assert hist.histogram_value.max == pytest.approx(eta.max(), rel=1e-5)


def test_no_histograms_and_no_logger(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(
        tmp_path,
        [AdaptiveStepMonitor(every_n_steps=2, histograms=False)],
        logger=logger,
        max_steps=2,
        max_epochs=None,
        log_every_n_steps=1,
    )
    t.fit(GroupedNet(optimizer={"name": "adam", "lr": 0.01}), loader())
    acc = events(logger.log_dir)
    assert acc.Tags()["histograms"] == [] and step_tags(acc)
    # without a logger it has nothing to do, and does nothing
    monitor = AdaptiveStepMonitor(every_n_steps=1)
    trainer(tmp_path, [monitor], max_steps=2, max_epochs=None).fit(GroupedNet(), loader())
    assert monitor._generators == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "Parameter `every_n_steps`"),
        ({"every_n_steps": True}, "Parameter `every_n_steps`"),
        ({"quantiles": (0.5, 1.5)}, "Parameter `quantiles`"),
        ({"quantiles": ()}, "Parameter `quantiles`"),
        ({"quantiles": (0.5, 0.5)}, "Parameter `quantiles`"),
        ({"max_samples": 0}, "Parameter `max_samples`"),
        ({"max_samples": 20_000_000}, "Parameter `max_samples`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveStepMonitor(**kwargs)


def test_repr_and_quantile_names():
    m = AdaptiveStepMonitor(every_n_steps=5, quantiles=(0.025, 0.5, 0.975))
    assert (
        repr(m) == "AdaptiveStepMonitor(every_n_steps=5, histograms=True, "
        "quantiles=(0.025, 0.5, 0.975))"
    )
    assert [m.quantile_name(q) for q in m.quantiles] == ["p2.5", "median", "p97.5"]
    assert m.state_key != AdaptiveStepMonitor(every_n_steps=6).state_key


@pytest.mark.ddp
def test_ddp_rank_zero_logs_the_shared_state(ddp_results):
    """The ``step_monitor`` case of ``ddp_script.py``: AdaptiveStepMonitor(every_n_steps=2) for
    4 Adam steps, one parameter group per task head; each rank saved the optimizer's state."""
    r0, r1 = ddp_results.load("step_monitor")
    tb = ddp_results.out / "step_monitor" / "tb" / "version_0"
    for i, s in r0["state"].items():  # the state is identical on both ranks
        for k, v in s.items():
            torch.testing.assert_close(r1["state"][i][k], v, rtol=0, atol=0)
    files = list(tb.glob("events.out.tfevents.*"))
    assert len(files) == 1  # rank 0 only
    acc = events(tb)
    for group in r0["param_groups"]:
        states = [r0["state"][i] for i in group["params"]]
        eta = np.concatenate([hand_eta("adam", s, group, 4).ravel() for s in states])
        logged = scalar(acc, f"step_size/{group['name']}/median")
        assert sorted(logged) == [2, 4]
        assert logged[4] == pytest.approx(np.median(eta), rel=2e-5)
