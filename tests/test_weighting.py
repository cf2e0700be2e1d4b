"""Loss-based weighting callbacks in real (tiny) Trainers: the behaviour each paper promises.

DWA, uncertainty weighting and GradNorm first; then RLW, GLS, ScaleInvariant, IMTL-L, FAMO,
SoftAdapt and STCH, which also share a suite over ``METHODS`` (resume, documented total, pickle,
precision and accumulation, bad losses, DDP).
"""

from __future__ import annotations

import copy
import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import TinyNet, WeightRecorder, loader, params, trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_aw import DBMTL, DWA, GradNorm, MultiTaskModule, UncertaintyWeighting
from lightning_aw.functional import dwa as dwa_fn
from lightning_aw.step import StepRecord
from lightning_aw.weighting._famo import FAMO
from lightning_aw.weighting._gls import GLS, ScaleInvariant
from lightning_aw.weighting._imtl_l import IMTLL
from lightning_aw.weighting._relobralo import ReLoBRaLo
from lightning_aw.weighting._rlw import RLW
from lightning_aw.weighting._softadapt import SoftAdapt
from lightning_aw.weighting._stch import STCH


def test_dwa_weights_one_for_two_epochs_then_eq7(tmp_path):
    rec = WeightRecorder()
    dwa = DWA(temperature=2.0)
    trainer(tmp_path, [dwa, rec], max_epochs=4).fit(TinyNet(), loader())
    per_epoch_w: dict[int, list[list[float]]] = {}
    per_epoch_l: dict[int, list[list[float]]] = {}
    for e, w, l in zip(rec.epochs, rec.weights, rec.losses, strict=True):
        per_epoch_w.setdefault(e, []).append(w)
        per_epoch_l.setdefault(e, []).append(l)
    for e in (0, 1):
        assert torch.tensor(per_epoch_w[e]).eq(1.0).all()
    means = {e: torch.tensor(v).mean(0) for e, v in per_epoch_l.items()}
    for e in (2, 3):
        w = torch.tensor(per_epoch_w[e])
        assert (w == w[0]).all()  # constant within the epoch
        torch.testing.assert_close(w[0], dwa_fn(means[e - 1], means[e - 2]), rtol=1e-5, atol=1e-6)
        assert w[0].sum().item() == pytest.approx(3.0, abs=1e-5)


def test_dwa_step_interval_windows(tmp_path):
    rec = WeightRecorder()
    trainer(tmp_path, [DWA(interval="step", frequency=2), rec], max_epochs=1).fit(
        TinyNet(), loader()
    )
    w = torch.tensor(rec.weights)
    assert w[:4].eq(1.0).all()  # two windows of two steps
    assert not w[4].eq(1.0).all()
    l = torch.tensor(rec.losses)
    torch.testing.assert_close(w[4], dwa_fn(l[2:4].mean(0), l[0:2].mean(0)), rtol=1e-5, atol=1e-6)


class NoisyRegression(MultiTaskModule):
    """Kendall & Gal's setup: two regression tasks with known noise std."""

    def __init__(self):
        super().__init__(tasks=["noisy", "clean"], optimizer={"name": "adam", "lr": 0.01})
        self.trunk = nn.Sequential(nn.Linear(1, 32), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(32, 1) for t in self.tasks})

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        return {
            t: F.mse_loss(self.heads[t](h).squeeze(-1), y[:, i]) for i, t in enumerate(self.tasks)
        }


def test_uncertainty_recovers_noise(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2048, 1, generator=gen) * 2 - 1
    signal = torch.cat([3 * x, -2 * x], dim=1)
    noise = torch.randn(2048, 2, generator=gen) * torch.tensor([10.0, 1.0])
    data = DataLoader(TensorDataset(x, signal + noise), batch_size=128, shuffle=False)
    uw = UncertaintyWeighting(lr=0.05)
    torch.manual_seed(0)
    trainer(tmp_path, [uw], max_epochs=30).fit(NoisyRegression(), data)
    # regression form: at the optimum sigma^2 = MSE = noise variance
    assert uw.sigmas["noisy"] == pytest.approx(10.0, rel=0.25)
    assert uw.sigmas["clean"] == pytest.approx(1.0, rel=0.25)
    w = uw.weights
    assert w["clean"] > 10 * w["noisy"]


class GradNormToy(MultiTaskModule):
    """GradNorm's toy (Sec. 4): f_i(x) = sigma_i tanh((B + eps_i) x), 4-layer ReLU MLP."""

    def __init__(self, sigmas):
        tasks = [f"t{i}" for i in range(len(sigmas))]
        super().__init__(tasks=tasks, optimizer={"name": "adam", "lr": 1e-3})
        self.trunk = nn.Sequential(
            nn.Linear(250, 100),
            nn.ReLU(),
            nn.Linear(100, 100),
            nn.ReLU(),
            nn.Linear(100, 100),
            nn.ReLU(),
            nn.Linear(100, 100),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({t: nn.Linear(100, 100) for t in tasks})

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        return {t: F.mse_loss(self.heads[t](h), y[:, i]) for i, t in enumerate(self.tasks)}


def gradnorm_toy_data(sigmas, n=2000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(100, 250, generator=gen) * 10**0.5
    x = torch.randn(n, 250, generator=gen)
    ys = []
    for s in sigmas:
        eps = torch.randn(100, 250, generator=gen) * 3.5**0.5
        ys.append(s * torch.tanh(x @ (B + eps).T / 250**0.5))
    return x, torch.stack(ys, dim=1)


def test_gradnorm_toy_orders_weights_inversely_to_scale(tmp_path):
    sigmas = [1.0, 4.0, 12.0]
    data = DataLoader(TensorDataset(*gradnorm_toy_data(sigmas)), batch_size=100, shuffle=False)
    gn = GradNorm(alpha=0.12)
    torch.manual_seed(0)
    trainer(tmp_path, [gn], max_epochs=6).fit(GradNormToy(sigmas), data)
    w = list(gn.weights.values())
    assert w[0] > w[1] > w[2], w
    assert sum(w) == pytest.approx(3.0, abs=1e-4)


def test_gradnorm_does_not_leak_into_network_gradients(tmp_path):
    """With GradNorm attached, the network's gradients are exactly those of sum_i w_i L_i."""

    class Check(pl.Callback):
        def __init__(self):
            self.checked = 0

        def on_after_backward(self, trainer, pl_module):
            if self.checked >= 3:
                return
            w = self.w_before
            ref = TinyNet()
            ref.load_state_dict(self.state_before, strict=False)
            out = ref.task_losses(self.batch, 0)
            (sum(w[i] * out[t] for i, t in enumerate(ref.tasks))).backward()
            for (name, p), (_, q) in zip(
                pl_module.named_parameters(), ref.named_parameters(), strict=False
            ):
                torch.testing.assert_close(p.grad, q.grad, msg=name)
            self.checked += 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch
            self.w_before = list(pl_module.task_weights.values())
            self.state_before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    check = Check()
    trainer(tmp_path, [GradNorm(alpha=1.5, lr=0.1), check], max_epochs=1).fit(TinyNet(), loader())
    assert check.checked == 3


def test_gradnorm_first_step_is_the_paper_update(tmp_path):
    """One step by hand: norms on the last shared weight, ratio 1, Adam's first step = lr * sign."""
    net = TinyNet()
    batch = next(iter(loader()))
    out = net.task_losses(batch, 0)
    W = net.trunk[2].weight
    norms = torch.stack(
        [torch.autograd.grad(out[t], W, retain_graph=True)[0].norm() for t in net.tasks]
    )
    target = norms.mean()
    grad = torch.sign(norms - target) * norms
    w = torch.ones(3) - 0.025 * torch.sign(grad)  # Adam's first step moves by lr * sign(grad)
    expected = 3 * w / w.sum()
    gn = GradNorm(alpha=1.5)
    trainer(tmp_path, [gn], max_steps=1).fit(TinyNet(), loader())
    torch.testing.assert_close(
        torch.tensor(list(gn.weights.values())), expected, rtol=1e-5, atol=1e-6
    )


def test_uncertainty_callback_matches_functional():
    from lightning_aw.functional import uncertainty_loss, uncertainty_weights

    uw = UncertaintyWeighting(classification=["b"])
    uw.tasks = ["a", "b", "c"]
    uw.init_state(3)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.7, 1.1]))
    losses = torch.tensor([1.5, 0.2, 3.0])
    present = torch.tensor([True, True, False])
    flags = [False, True, False]
    torch.testing.assert_close(
        uw.combine(losses, present), uncertainty_loss(losses, uw.log_vars, flags, present)
    )
    torch.testing.assert_close(uw.weight_tensor(), uncertainty_weights(uw.log_vars.detach(), flags))


METHODS = [
    RLW(seed=3),
    RLW(),
    RLW(seed=1, distribution="dirichlet", interval="epoch"),
    GLS(),
    ScaleInvariant(),
    IMTLL(lr=0.05),
    FAMO(),
    FAMO(min_losses=[-1.0, -1.0, -1.0], gamma=0.0),
    FAMO(losses_after="next_batch"),
    SoftAdapt(beta=5.0),
    SoftAdapt(beta=5.0, normalize=True, loss_weighted=True, interval="step", frequency=3),
    STCH(warmup_epochs=1),
    STCH(warmup_epochs=3),
    STCH(reference=[1.0, 5.0, 0.1], logarithmic=False, mu=0.5),
    ReLoBRaLo(seed=2),
    ReLoBRaLo(alpha=0.5, expected_rho=0.0, temperature=2.0, interval="epoch", frequency=2),
]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_pickle_deepcopy_repr_and_state_key(method):
    clone = pickle.loads(pickle.dumps(method))
    assert repr(clone) == repr(method) == repr(copy.deepcopy(method))
    for name, value in method.hparams_repr().items():
        assert f"{name}={value!r}" in repr(method)
    assert type(method).__name__ in method.state_key


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-scaler"])
@pytest.mark.parametrize(
    "method",
    [
        RLW(seed=0),
        GLS(),
        ScaleInvariant(),
        IMTLL(),
        FAMO(),
        FAMO(losses_after="next_batch"),
        SoftAdapt(),
        STCH(warmup_epochs=1),
    ],
    ids=repr,
)
def test_mixed_precision_accumulation_and_clipping(tmp_path, method, precision):
    kw = (
        {"plugins": [MixedPrecision("16-mixed", "cpu")]}
        if precision == "fp16-scaler"
        else {"precision": precision}
    )
    rec = WeightRecorder()
    net = TinyNet(optimizer={"name": "adam", "lr": 0.01})
    before = params(net)
    t = trainer(
        tmp_path,
        [copy.deepcopy(method), rec],
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        **kw,
    )
    t.fit(net, loader())
    assert t.global_step == 8
    assert all(torch.isfinite(v).all() for v in params(net).values())
    assert any(not torch.equal(before[k], v) for k, v in params(net).items())
    w = torch.tensor(rec.weights)
    assert torch.isfinite(w).all() and (w >= 0).all()
    if method.total == 1:
        torch.testing.assert_close(w.sum(1), torch.ones(len(w)), rtol=0, atol=1e-6)
    if isinstance(method, (RLW, SoftAdapt, IMTLL)):  # weights that are state: constant in windows
        torch.testing.assert_close(w[0::2], w[1::2])


def test_callbacks_cite_their_paper_and_show_a_trainer():
    # the examples themselves run in tests/test_docstrings.py
    for cls in (RLW, GLS, ScaleInvariant, IMTLL, FAMO, SoftAdapt, STCH):
        doc = cls.__doc__ or ""
        assert "https://" in doc, cls
        assert f"pl.Trainer(callbacks=[{cls.__name__}(" in doc or "callbacks=[method]" in doc, cls


BAD_HPARAMS = [
    (lambda: RLW(seed=-1), "Parameter `seed`"),
    (lambda: RLW(seed=1.5), "Parameter `seed`"),
    (lambda: RLW(distribution="gamma"), "Parameter `distribution`"),
    (lambda: RLW(interval="batch"), "Parameter `interval`"),
    (lambda: RLW(frequency=0), "Parameter `frequency`"),
    (lambda: IMTLL(lr=0.0), "Parameter `lr`"),
    (lambda: IMTLL(init=float("nan")), "Parameter `init`"),
    (lambda: FAMO(lr=-0.1), "Parameter `lr`"),
    (lambda: FAMO(gamma=-1e-3), "Parameter `gamma`"),
    (lambda: FAMO(eps=-1.0), "Parameter `eps`"),
    (lambda: FAMO(min_losses="low"), "Parameter `min_losses`"),
    (lambda: FAMO(min_losses=[0.0, float("nan"), 0.0]), "Parameter `min_losses`"),
    (lambda: SoftAdapt(beta=float("inf")), "Parameter `beta`"),
    (lambda: SoftAdapt(normalize="yes"), "Parameter `normalize`"),
    (lambda: SoftAdapt(interval="batch"), "Parameter `interval`"),
    (lambda: STCH(mu=0.0), "Parameter `mu`"),
    (lambda: ReLoBRaLo(alpha=1.5), "Parameter `alpha`"),
    (lambda: ReLoBRaLo(expected_rho=-0.1), "Parameter `expected_rho`"),
    (lambda: ReLoBRaLo(expected_rho=True), "Parameter `expected_rho`"),
    (lambda: ReLoBRaLo(temperature=0.0), "Parameter `temperature`"),
    (lambda: ReLoBRaLo(temperature=float("inf")), "Parameter `temperature`"),
    (lambda: ReLoBRaLo(seed=-2), "Parameter `seed`"),
    (lambda: STCH(warmup_epochs=-1), "Parameter `warmup_epochs`"),
    (lambda: STCH(warmup_epochs=0), "Parameter `warmup_epochs` should be >= 1 when no `reference`"),
    (lambda: STCH(reference=[1.0, -1.0, 1.0]), "Parameter `reference` should be positive"),
    (lambda: STCH(logarithmic=1), "Parameter `logarithmic`"),
]


@pytest.mark.parametrize(("factory", "match"), BAD_HPARAMS)
def test_bad_hyperparameters_are_clear_errors(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    ("method", "match"),
    [
        (FAMO(min_losses=[0.0, 0.0]), r"`min_losses` should have one number per task \(3"),
        (FAMO(min_losses={"x": -1.0}), r"`min_losses` names unknown task\(s\) \['x'\]"),
        (STCH(reference={"zz": 1.0}), r"`reference` names unknown task\(s\) \['zz'\]"),
    ],
    ids=repr,
)
def test_per_task_arguments_are_checked_against_the_tasks(tmp_path, method, match):
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [method], max_epochs=1).fit(TinyNet(), loader())


# ---------------------------------------------------------------------------------- bad losses
def _negative_b(batch_idx, task, loss):
    return loss - 100.0 if task == "b" and batch_idx >= 2 else loss


#: every method that takes logarithms or ratios of the step's losses declares a floor of 0
LOG_METHODS = [
    GLS(),
    ScaleInvariant(),
    IMTLL(),
    FAMO(),
    STCH(warmup_epochs=1),
    GradNorm(),
    DBMTL(),
    DBMTL(source="representation"),
]


@pytest.mark.parametrize("method", LOG_METHODS, ids=repr)
def test_negative_loss_is_a_clear_error_at_the_step_it_appears(tmp_path, method):
    rec = WeightRecorder()
    net = TinyNet(loss_hook=_negative_b)
    t = trainer(tmp_path, [copy.deepcopy(method), rec], max_epochs=2)
    name = type(method).__name__
    with pytest.raises(
        ValueError,
        match=rf"^{name} needs .*, but got loss -\d+\.?\d* for task 'b' at epoch 0, batch 2 "
        r"\(global step 2\)\. .*",
    ):
        t.fit(net, loader())
    assert t.global_step == 2 and len(rec.weights) == 3  # the third step raised before it ran
    assert torch.isfinite(torch.tensor(rec.weights)).all()
    assert all(torch.isfinite(v).all() for v in params(net).values())


def test_famo_loss_at_its_minimum_is_an_error(tmp_path):
    # a loss of exactly min_losses would take every weight (its gap is eps)
    def at_minimum(batch_idx, task, loss):
        return loss * 0.0 + 0.5 if task == "c" else loss

    t = trainer(tmp_path, [FAMO(min_losses={"c": 0.5})], max_epochs=1)
    with pytest.raises(
        ValueError,
        match=r"got loss 0\.5 for task 'c' \(it must be above \[0\.5\]\) at epoch 0, batch 0",
    ):
        t.fit(TinyNet(loss_hook=at_minimum), loader())


@pytest.mark.parametrize(
    "method",
    [FAMO(min_losses={"b": -200.0}), STCH(warmup_epochs=1, logarithmic=False), RLW(seed=0)],
    ids=repr,
)
def test_negative_losses_where_allowed(tmp_path, method):
    rec = WeightRecorder()
    trainer(tmp_path, [method, rec], max_epochs=3).fit(TinyNet(loss_hook=_negative_b), loader())
    w = torch.tensor(rec.weights)
    assert torch.isfinite(w).all() and (w > 0).all()


def test_softadapt_loss_weighted_needs_positive_means(tmp_path):
    t = trainer(tmp_path, [SoftAdapt(loss_weighted=True)], max_epochs=2)
    with pytest.raises(ValueError, match=r"needs positive mean losses, but task 'b' has mean -\d"):
        t.fit(TinyNet(loss_hook=_negative_b), loader())


# ---------------------------------------------------------------------------------- RLW
def _draws(seed, n):
    gen = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(3, generator=gen), dim=0) for _ in range(n)]


def test_rlw_weights_are_the_seeded_gaussian_softmax_draws(tmp_path):
    rec = WeightRecorder()
    trainer(tmp_path, [RLW(seed=7), rec], max_epochs=1).fit(TinyNet(), loader())
    draws = _draws(7, 8)  # one at setup, then one after every optimizer step
    for k, w in enumerate(rec.weights):
        torch.testing.assert_close(torch.tensor(w), draws[k], rtol=0, atol=0)
        assert sum(w) == pytest.approx(1.0, abs=1e-6)


def test_rlw_constant_within_accumulation_windows_and_epochs(tmp_path):
    rec = WeightRecorder()
    t = trainer(tmp_path, [RLW(seed=7), rec], max_epochs=1, accumulate_grad_batches=2)
    t.fit(TinyNet(), loader())
    draws = _draws(7, 4)
    for k, w in enumerate(rec.weights):
        torch.testing.assert_close(torch.tensor(w), draws[k // 2], rtol=0, atol=0)
    rec = WeightRecorder()
    trainer(tmp_path, [RLW(seed=7, interval="epoch"), rec], max_epochs=3).fit(TinyNet(), loader())
    draws = _draws(7, 3)
    for e, w in zip(rec.epochs, rec.weights, strict=True):
        torch.testing.assert_close(torch.tensor(w), draws[e], rtol=0, atol=0)


def test_rlw_reproducible_with_a_seed(tmp_path):
    runs = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        rec = WeightRecorder()
        trainer(tmp_path, [RLW(seed=seed), rec], max_epochs=1).fit(TinyNet(), loader())
        runs[name] = rec.weights
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


# ---------------------------------------------------------------------------------- ReLoBRaLo
_WINDOWS = [
    torch.tensor([1.0, 2.0, 4.0]),
    torch.tensor([0.5, 2.2, 3.0]),
    torch.tensor([0.4, 1.0, 3.5]),
]


def _relobralo_updates(method, windows=_WINDOWS):
    """Drive ``update`` with the given window means (all tasks present); the weights after each."""
    method.init_state(3)
    method._generator.manual_seed(0 if method.seed is None else method.seed)
    out = []
    for k, mean in enumerate(windows):
        method._num_updates = k
        method.update(None, mean, torch.ones(3, dtype=torch.bool))
        out.append(method.weight_tensor().clone())
    return out


def _bal(now, ref, tau):
    return 3 * torch.softmax(now / (tau * ref), 0)


def test_relobralo_first_window_is_the_reference_and_weights_start_at_one():
    w = _relobralo_updates(ReLoBRaLo(seed=0))
    torch.testing.assert_close(w[0], torch.ones(3))
    for x in w:
        assert float(x.sum()) == pytest.approx(3.0)


def test_relobralo_expected_rho_one_never_looks_back():
    # alpha = 1: only the history; rho = 1 always: the weights keep their start, 1
    for x in _relobralo_updates(ReLoBRaLo(alpha=1.0, expected_rho=1.0, seed=0)):
        torch.testing.assert_close(x, torch.ones(3))


def test_relobralo_expected_rho_zero_always_looks_back():
    # alpha = 1, rho = 0 always: the weights are the balance against the first window
    w = _relobralo_updates(ReLoBRaLo(alpha=1.0, expected_rho=0.0, temperature=0.5, seed=0))
    for k in (1, 2):
        torch.testing.assert_close(w[k], _bal(_WINDOWS[k], _WINDOWS[0], 0.5))


def test_relobralo_by_hand_with_the_seeded_draws():
    m = ReLoBRaLo(alpha=0.7, expected_rho=0.5, temperature=0.3, seed=4)
    w = _relobralo_updates(m)
    gen, expected = torch.Generator().manual_seed(4), torch.ones(3)
    for k in (1, 2):
        rho = float(torch.rand((), generator=gen) < 0.5)
        hist = rho * expected + (1 - rho) * _bal(_WINDOWS[k], _WINDOWS[0], 0.3)
        expected = 0.7 * hist + 0.3 * _bal(_WINDOWS[k], _WINDOWS[k - 1], 0.3)
        torch.testing.assert_close(w[k], expected)


def test_relobralo_huge_temperature_gives_equal_weights():
    for x in _relobralo_updates(ReLoBRaLo(alpha=0.5, expected_rho=0.5, temperature=1e9, seed=1)):
        torch.testing.assert_close(x, torch.ones(3))


def test_relobralo_absent_task_keeps_its_mean_and_first_seen_is_its_reference():
    m = ReLoBRaLo(alpha=1.0, expected_rho=0.0, temperature=1.0, seed=0)
    m.init_state(3)
    m._generator.manual_seed(0)
    present = torch.tensor([True, True, False])
    m._num_updates = 0
    m.update(None, torch.tensor([1.0, 2.0, 0.0]), present)
    m._num_updates = 1
    m.update(None, torch.tensor([0.5, 2.0, 7.0]), torch.ones(3, dtype=torch.bool))
    # task c first seen now: its L(0) is 7, ratio 1
    torch.testing.assert_close(
        m.weight_tensor(), _bal(torch.tensor([0.5, 1.0, 1.0]), torch.ones(3), 1.0)
    )


def test_relobralo_trains_with_positive_losses_and_sums_to_t(tmp_path):
    rec = WeightRecorder()
    trainer(tmp_path, [ReLoBRaLo(alpha=0.9, expected_rho=0.5, seed=3), rec], max_epochs=2).fit(
        TinyNet(), loader()
    )
    assert len(rec.weights) > 2 and rec.weights[0] == pytest.approx([1.0, 1.0, 1.0])
    assert rec.weights[-1] != pytest.approx([1.0, 1.0, 1.0])
    for w in rec.weights:
        assert sum(w) == pytest.approx(3.0, rel=1e-5)


# ---------------------------------------------------------------------------------- GLS / log
def test_gls_and_log_weights_are_their_gradients_on_the_last_batch(tmp_path):
    for method, formula in (
        (GLS(), lambda L: torch.prod(L) ** (1 / 3) / (3 * L)),
        (ScaleInvariant(), lambda L: 1 / L),
    ):
        rec = WeightRecorder()
        trainer(tmp_path, [method, rec], max_epochs=1).fit(TinyNet(), loader())
        for k in range(1, len(rec.weights)):  # weights at batch k come from batch k - 1
            expected = formula(torch.tensor(rec.losses[k - 1], dtype=torch.float64))
            torch.testing.assert_close(
                torch.tensor(rec.weights[k], dtype=torch.float64), expected, rtol=1e-5, atol=0
            )


def test_imtl_l_scales_are_learned_without_weight_decay(tmp_path):
    m = IMTLL(lr=0.05)
    net = TinyNet(optimizer={"name": "adamw", "lr": 0.01, "weight_decay": 0.1})
    t = trainer(tmp_path, [m], max_epochs=2)
    t.fit(net, loader())
    groups = t.optimizers[0].param_groups
    (group,) = [g for g in groups if any(p is m.log_scales for p in g["params"])]
    assert group["weight_decay"] == 0.0 and group["lr"] == 0.05
    assert not torch.equal(m.log_scales.detach(), torch.zeros(3))
    torch.testing.assert_close(
        torch.tensor(list(m.weights.values())), torch.exp(m.log_scales.detach())
    )
    # e^{s_i} moves towards 1 / L_i: task "b" (targets scaled by 3) gets the smallest scale
    assert m.log_scales.detach().argmin() == 1


# ---------------------------------------------------------------------------------- FAMO
def test_famo_first_step_is_the_paper_update(tmp_path):
    """One step by hand: network update with c z_i / D_i, then Adam's first step on the logits."""
    ref = TinyNet()
    batch = next(iter(loader()))
    losses = torch.stack(list(ref.task_losses(batch, 0).values()))
    D0 = losses.detach() + 1e-8
    w = (1 / D0) / (1 / D0).sum()  # z uniform at xi = 0
    grads = torch.autograd.grad((w * losses).sum(), list(ref.parameters()))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads, strict=True):
            p -= 0.05 * g  # TinyNet's default SGD, lr 0.05
        D1 = torch.stack(list(ref.task_losses(batch, 0).values())) + 1e-8
    xi = torch.zeros(3, requires_grad=True)
    (delta,) = torch.autograd.grad(
        torch.softmax(xi, 0), xi, grad_outputs=torch.log(D0) - torch.log(D1)
    )
    expected = -0.025 * torch.sign(delta)  # Adam's first step: lr * sign(gradient)

    famo = FAMO()
    net = TinyNet()
    trainer(tmp_path, [famo], max_steps=1).fit(net, loader())
    torch.testing.assert_close(famo.logits, expected, rtol=1e-5, atol=1e-7)
    for k, v in params(ref).items():
        torch.testing.assert_close(params(net)[k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_famo_updates_once_per_optimizer_step(tmp_path):
    famo = FAMO()
    t = trainer(tmp_path, [famo], max_epochs=1, accumulate_grad_batches=2)
    t.fit(TinyNet(), loader())
    assert t.global_step == 4 and famo._adam.step.item() == 4

    def nan_a_at_3(batch_idx, task, loss):
        return loss * float("nan") if batch_idx == 3 and task == "a" else loss

    famo = FAMO()
    net = TinyNet(on_nonfinite="skip", loss_hook=nan_a_at_3)
    t = trainer(tmp_path, [famo], max_epochs=1)
    t.fit(net, loader())
    assert net.skipped_steps == 1
    assert famo._adam.step.item() == t.global_step - 1  # the skipped step left xi alone
    assert torch.isfinite(famo.logits).all()


def test_famo_gives_weight_to_the_slowest_task(tmp_path):
    """A constant offset on task "c" makes its gap D_c large, so its relative (log) improvement is
    the smallest: FAMO raises its logit above the others' (delta_c < 0)."""

    def offset_c(batch_idx, task, loss):
        return loss + 5.0 if task == "c" else loss

    famo = FAMO(gamma=0.0)
    trainer(tmp_path, [famo], max_epochs=3).fit(
        TinyNet(loss_hook=offset_c, optimizer={"name": "adam", "lr": 0.01}), loader()
    )
    assert famo.logits.argmax() == 2, famo.logits


# ------------------------------------------------------------- FAMO(losses_after="next_batch")
class _FamoTrace(pl.Callback):
    """After every training batch: the step's losses (``None`` for a skipped micro-batch), FAMO's
    logits and the effective weights the step used."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor | None] = []
        self.logits: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.step_record
        self.losses.append(None if step is None else step.losses.detach().double().clone())
        self.logits.append(pl_module.weighting.logits.double().clone())
        self.weights.append(pl_module.weighting.weight_tensor().double().clone())


def _famo_logits_by_hand(pairs, lr=0.025, gamma=1e-3, eps=1e-8):
    """The logits after FAMO's updates from ``(losses before, losses after)`` pairs, written out:
    delta = J_softmax(xi)^T [log D(t) - log D(t+1)] (autograd of the softmax), and
    ``torch.optim.Adam`` with L2 decay ``gamma`` on a leaf xi. Returns xi after each update."""
    xi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=lr, weight_decay=gamma, eps=1e-8)
    out = []
    for before, after in pairs:
        (delta,) = torch.autograd.grad(
            torch.softmax(xi, 0), xi, grad_outputs=torch.log(before + eps) - torch.log(after + eps)
        )
        xi.grad = delta
        opt.step()
        out.append(xi.detach().clone())
    return out


def test_famo_next_batch_logits_and_weights_by_hand(tmp_path):
    """Two epochs of 4 steps: step k >= 1 updates the logits from (L_{k-1}, L_k), its own training
    losses, before its weights c z_i / D_i are formed; the epoch boundary changes nothing."""
    trace = _FamoTrace()
    famo = FAMO(losses_after="next_batch")
    trainer(tmp_path, [famo, trace], max_epochs=2).fit(TinyNet(), loader(n=128))
    L = trace.losses
    assert len(L) == 8 and all(v is not None for v in L)
    expected = [torch.zeros(3, dtype=torch.float64)]
    expected += _famo_logits_by_hand([(L[k - 1], L[k]) for k in range(1, 8)])
    for k in range(8):
        torch.testing.assert_close(trace.logits[k], expected[k], rtol=1e-5, atol=1e-6)
        ratio = torch.softmax(expected[k], 0) / (L[k] + 1e-8)
        torch.testing.assert_close(trace.weights[k], ratio / ratio.sum(), rtol=1e-5, atol=1e-6)
    assert famo._adam.step.item() == 7  # the last step's update is still pending
    assert torch.equal(famo._pending, L[7].float())


def test_famo_next_batch_skipped_window_is_rolled_back_by_hand(tmp_path):
    """Accumulation of 2, the third window (batches 4, 5) skipped for a NaN at batch 5: the
    update (L_3, L_4) its first micro-batch applied is rolled back at the end of the window, and
    the next window that is taken applies (L_3, L_6), L_6 still at the parameters after the second
    window."""

    def nan_a_at_5(batch_idx, task, loss):
        return loss * float("nan") if batch_idx == 5 and task == "a" else loss

    trace = _FamoTrace()
    famo = FAMO(losses_after="next_batch")
    net = TinyNet(on_nonfinite="skip", loss_hook=nan_a_at_5)
    trainer(tmp_path, [famo, trace], max_epochs=1, accumulate_grad_batches=2).fit(net, loader())
    L = trace.losses
    assert net.skipped_steps == 1 and L[5] is None
    first, second = _famo_logits_by_hand([(L[1], L[2]), (L[3], L[6])])
    _, undone = _famo_logits_by_hand([(L[1], L[2]), (L[3], L[4])])  # applied at batch 4
    zero = torch.zeros(3, dtype=torch.float64)
    for k, xi in enumerate([zero, zero, first, first, undone, first, second, second]):
        torch.testing.assert_close(trace.logits[k], xi, rtol=1e-5, atol=1e-6, msg=str(k))
    assert famo._adam.step.item() == 2


class _CountingNet(TinyNet):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def task_losses(self, batch, batch_idx):
        self.calls += 1
        return super().task_losses(batch, batch_idx)


@pytest.mark.parametrize(("losses_after", "per_step"), [("same_batch", 2), ("next_batch", 1)])
def test_famo_forward_passes_per_step(tmp_path, losses_after, per_step):
    net = _CountingNet()
    famo = FAMO(losses_after=losses_after)
    t = trainer(tmp_path, [famo], max_steps=4)
    t.fit(net, loader())
    assert t.global_step == 4 and net.calls == per_step * 4
    assert famo._adam.step.item() == (4 if losses_after == "same_batch" else 3)


def test_famo_next_batch_resumes_exactly(tmp_path):
    """8 steps in one run equal 4 steps, a checkpoint (holding the pending update of step 4) and a
    resume to 8: logits, Adam moments and network parameters bit-identical."""
    make = lambda: TinyNet(optimizer={"name": "adam", "lr": 0.01})  # noqa: E731
    whole, whole_net = FAMO(losses_after="next_batch"), make()
    trainer(tmp_path / "whole", [whole], max_epochs=2).fit(whole_net, loader(n=128))

    first = FAMO(losses_after="next_batch")
    t = trainer(tmp_path / "first", [first], max_epochs=1)
    t.fit(make(), loader(n=128))
    assert first._pending is not None
    ckpt = tmp_path / "famo.ckpt"
    t.save_checkpoint(ckpt)
    resumed, resumed_net = FAMO(losses_after="next_batch"), make()
    trainer(tmp_path / "second", [resumed], max_epochs=2).fit(
        resumed_net, loader(n=128), ckpt_path=str(ckpt)
    )
    assert torch.equal(resumed.logits, whole.logits)
    assert torch.equal(resumed._pending, whole._pending)
    for a, b in zip(
        resumed._adam.state_dict().values(), whole._adam.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    for k, v in params(whole_net).items():
        assert torch.equal(params(resumed_net)[k], v), k


def test_ddp_famo_next_batch_uses_the_rank_mean_losses(ddp_results):
    """The ``famo_next_batch`` case of ``ddp_script.py``: both ranks hold the same logits, those
    of the updates from the rank-mean losses of consecutive steps."""
    r0, r1 = ddp_results.load("famo_next_batch")
    assert torch.equal(r0["logits"], r1["logits"])
    assert not torch.equal(r0["losses"], r1["losses"])  # the ranks saw different data
    mean = (r0["losses"].double() + r1["losses"].double()) / 2
    steps = len(mean)
    assert steps == 6
    *_, expected = _famo_logits_by_hand([(mean[k - 1], mean[k]) for k in range(1, steps)])
    torch.testing.assert_close(r0["logits"].double(), expected, rtol=1e-5, atol=1e-6)
    # one rank's own losses would have given other logits
    *_, local = _famo_logits_by_hand(
        [(r0["losses"][k - 1].double(), r0["losses"][k].double()) for k in range(1, steps)]
    )
    assert not torch.allclose(local, expected, rtol=1e-4, atol=1e-5)


def test_famo_losses_after_is_checked_and_reaches_the_registry():
    with pytest.raises(ValueError, match=r"Parameter `losses_after` should be 'same_batch' .*"):
        FAMO(losses_after="next")
    from lightning_aw.registry import create_method

    method = create_method("famo", losses_after="next_batch")
    assert isinstance(method, FAMO) and method.losses_after == "next_batch"
    assert "losses_after='next_batch'" in repr(method)
    assert "losses_after" not in repr(FAMO())  # the default keeps its state key
    assert method.state_key != FAMO().state_key
    # a YAML configuration (LightningCLI) takes it, and names the allowed values
    from lightning_aw.config import ConfigError, validate_config

    famo = {"class_path": "FAMO", "init_args": {"losses_after": "next_batch"}}
    config = {
        "trainer": {"callbacks": [famo]},
        "model": {"class_path": "lightning_aw.models.DigitsNet"},
    }
    validate_config(copy.deepcopy(config))
    famo["init_args"]["losses_after"] = "next"
    with pytest.raises(ConfigError, match=r"losses_after: expected one of 'same_batch', 'next_b"):
        validate_config(config)


# ---------------------------------------------------------------------------------- SoftAdapt
def _epoch_means(rec):
    out: dict[int, list[list[float]]] = {}
    for e, l in zip(rec.epochs, rec.losses, strict=True):
        out.setdefault(e, []).append(l)
    return {e: torch.tensor(v, dtype=torch.float64).mean(0) for e, v in out.items()}


def test_softadapt_epoch_weights_by_hand(tmp_path):
    rec = WeightRecorder()
    trainer(tmp_path, [SoftAdapt(beta=10.0), rec], max_epochs=4).fit(TinyNet(), loader())
    means = _epoch_means(rec)
    w = torch.tensor(rec.weights, dtype=torch.float64)
    epochs = torch.tensor(rec.epochs)
    assert w[epochs < 2].sub(1 / 3).abs().max() < 1e-7
    for e in (2, 3):
        slopes = means[e - 1] - means[e - 2]
        expected = torch.exp(10.0 * slopes) / torch.exp(10.0 * slopes).sum()
        torch.testing.assert_close(w[epochs == e], expected.expand(8, 3), rtol=1e-5, atol=1e-7)


def test_softadapt_normalized_loss_weighted_step_windows_by_hand(tmp_path):
    rec = WeightRecorder()
    m = SoftAdapt(beta=10.0, normalize=True, loss_weighted=True, interval="step", frequency=2)
    trainer(tmp_path, [m, rec], max_epochs=1).fit(TinyNet(), loader())
    l = torch.tensor(rec.losses, dtype=torch.float64)
    w = torch.tensor(rec.weights, dtype=torch.float64)
    assert w[:4].sub(1 / 3).abs().max() < 1e-7
    old, new = l[0:2].mean(0), l[2:4].mean(0)
    s = (new - old) / (new - old).abs().sum()
    e = 0.5 * (new + old) * torch.exp(10.0 * s)
    torch.testing.assert_close(w[4], e / e.sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w[5], w[4])


# ---------------------------------------------------------------------------------- STCH
def test_stch_warmup_reference_and_weights_by_hand(tmp_path):
    rec = WeightRecorder()
    m = STCH(warmup_epochs=2, mu=0.5)
    trainer(tmp_path, [m, rec], max_epochs=3).fit(TinyNet(), loader())
    L = torch.tensor(rec.losses, dtype=torch.float64)
    w = torch.tensor(rec.weights, dtype=torch.float64)
    means = _epoch_means(rec)
    assert m.active
    torch.testing.assert_close(m.reference_point.double(), means[1], rtol=1e-6, atol=0)
    for k in range(1, 24):  # weights at batch k come from the losses of batch k - 1
        if k <= 16:  # warm-up: the log sum, weights 1 / L
            expected = 1 / L[k - 1]
        else:
            f = torch.log(L[k - 1] / means[1])
            expected = 3 * torch.softmax(f / 0.5, 0) / L[k - 1]
        torch.testing.assert_close(w[k], expected, rtol=1e-5, atol=1e-7, msg=str(k))


def test_stch_with_a_reference_starts_at_once(tmp_path):
    rec = WeightRecorder()
    ref = torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64)
    m = STCH(reference=ref.tolist(), logarithmic=False, mu=2.0)
    assert m.warmup_epochs == 0
    trainer(tmp_path, [m, rec], max_epochs=1).fit(TinyNet(), loader())
    L = torch.tensor(rec.losses, dtype=torch.float64)
    for k in range(1, 8):
        expected = 3 * torch.softmax((L[k - 1] - ref) / 2.0, 0)
        torch.testing.assert_close(torch.tensor(rec.weights[k], dtype=torch.float64), expected)
        assert sum(rec.weights[k]) == pytest.approx(3.0, abs=1e-5)


def test_famo_frequency_updates_the_logits_every_n_steps(tmp_path):
    import lightning.pytorch as pl

    from lightning_aw import FAMO

    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.weighting._logits.clone())

    famo = FAMO(frequency=3)
    trainer(tmp_path, [famo, Spy()], max_epochs=1).fit(TinyNet(), loader())
    changed = [
        not torch.equal(a, b) for a, b in zip([torch.zeros(3), *seen[:-1]], seen, strict=True)
    ]
    # steps 3 and 6 (1-based) update the logits, the others leave them as they are
    assert changed == [False, False, True, False, False, True, False, False]


def test_famo_epoch_interval_updates_once_per_epoch(tmp_path):
    import lightning.pytorch as pl

    from lightning_aw import FAMO

    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.weighting._logits.clone())

    trainer(tmp_path, [FAMO(interval="epoch"), Spy()], max_epochs=2).fit(TinyNet(), loader())
    changed = [
        not torch.equal(a, b) for a, b in zip([torch.zeros(3), *seen[:-1]], seen, strict=True)
    ]
    assert changed == [True] + [False] * 7 + [True] + [False] * 7  # first step of each epoch


# ------------------------------------------------------------------- fast paths (combine_step)
def _record(losses: torch.Tensor) -> StepRecord:
    present = torch.ones(losses.numel(), dtype=torch.bool)
    return StepRecord(
        tasks=("a", "b", "c"),
        losses=losses,
        task_losses=tuple(losses.unbind()),
        present=present,
        present_list=(True,) * losses.numel(),
        batch=None,
        batch_idx=0,
        representation=None,
        representation_graph=None,
        trainer=None,
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: STCH(warmup_epochs=2),  # in the warm-up, logarithmic: sum log L
        lambda: STCH(warmup_epochs=2, logarithmic=False, reference=[0.0, 0.0, 0.0]),
        lambda: STCH(reference=[1.0, 5.0, 0.1], logarithmic=False, mu=0.5, warmup_epochs=0),
        lambda: STCH(reference=[2.0, 1.0, 0.5], mu=0.3, warmup_epochs=0),  # active, logarithmic
        GLS,
        ScaleInvariant,
    ],
    ids=["stch-warmup-log", "stch-warmup-raw", "stch-raw", "stch-log", "gls", "scale_invariant"],
)
def test_combine_step_equals_combine_when_every_task_is_present(make):
    """The every-task-present fast path gives the loss, its gradient and the weights of
    ``combine`` (the general form with masks), in every phase of the method."""
    values = torch.tensor([0.7, 3.0, 0.2])
    out = {}
    for path in ("combine", "combine_step"):
        method = make()
        method.tasks = ["a", "b", "c"]
        method.init_state(3)
        losses = values.clone().requires_grad_()
        if path == "combine":
            loss = method.combine(losses, torch.ones(3, dtype=torch.bool))
        else:
            loss = method.combine_step(_record(losses))
        (grad,) = torch.autograd.grad(loss, losses)
        out[path] = (loss.detach(), grad, method.weight_tensor().clone())
    for a, b in zip(out["combine"], out["combine_step"], strict=True):
        torch.testing.assert_close(a, b)
