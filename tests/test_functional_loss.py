"""The maths of the loss-based weightings, without Lightning.

Baselines (equal, RLW), loss rates (DWA, SoftAdapt, ReLoBRaLo), learned weights (uncertainty, GradNorm,
IMTL-L, FAMO) and scalarisations (GLS, the log loss, STCH).
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn
from torch.func import vmap

from lightning_aw import functional as AF
from lightning_aw.functional import _baseline, _learned, _loss_rates, _scalarization

#: the modules of the loss-based weightings and the public names they define
LOSS_MODULES = (_baseline, _loss_rates, _learned, _scalarization)
LOSS_NAMES = [name for mod in LOSS_MODULES for name in mod.__all__]


def test_dwa_worked_example():
    # METHODS.md: r = [0.5, 1, 1.2], tau = 2 -> w = [0.810134, 1.040232, 1.149634]
    w = AF.dwa(
        torch.tensor([0.5, 1.0, 1.2], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    )
    expected = torch.tensor([0.810134, 1.040232, 1.149634], dtype=torch.float64)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)
    assert w.sum().item() == pytest.approx(3.0)


def test_dwa_hand_computation_and_temperature():
    prev, before = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0])
    r = torch.tensor([2.0, 0.5])
    for tau in (0.5, 2.0, 10.0):
        e = torch.exp(r / tau)
        torch.testing.assert_close(AF.dwa(prev, before, tau), 2 * e / e.sum())
    # higher temperature -> more even weights
    spread = [float(AF.dwa(prev, before, t).std()) for t in (0.5, 2.0, 10.0)]
    assert spread[0] > spread[1] > spread[2]


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_dwa_rejects_bad_temperature(tau):
    with pytest.raises(ValueError, match="temperature"):
        AF.dwa(torch.ones(2), torch.ones(2), tau)


def test_dwa_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="before_previous"):
        AF.dwa(torch.ones(2), torch.ones(3))


def _np_relobralo(now, last, first, w, rho, alpha, tau):
    import numpy as np

    def bal(a, b):
        z = a / (tau * b)
        e = np.exp(z - z.max())
        return len(a) * e / e.sum()

    hist = rho * w + (1 - rho) * bal(now, first)
    return alpha * hist + (1 - alpha) * bal(now, last)


@pytest.mark.parametrize("rho", [0.0, 1.0])
@pytest.mark.parametrize(("alpha", "tau"), [(0.999, 0.1), (0.5, 1.0), (0.0, 2.0)])
def test_relobralo_hand_computation_and_total(rho, alpha, tau):
    import numpy as np

    now, last = np.array([0.3, 2.0, 0.9]), np.array([0.5, 1.5, 1.0])
    first, w = np.array([1.0, 4.0, 2.0]), np.array([0.5, 1.5, 1.0])
    expected = _np_relobralo(now, last, first, w, rho, alpha, tau)
    t = [torch.tensor(x, dtype=torch.float64) for x in (now, last, first, w)]
    out = AF.relobralo(*t, rho=rho, alpha=alpha, temperature=tau)
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-12, atol=1e-12)
    assert out.sum().item() == pytest.approx(3.0)


def test_relobralo_lookback_and_temperature():
    now, last, first = torch.tensor([0.3, 2.0]), torch.tensor([0.5, 1.5]), torch.tensor([1.0, 4.0])
    w = torch.tensor([0.2, 1.8])
    # rho = 1 keeps the history (no lookback); alpha = 1 then keeps the weights unchanged
    torch.testing.assert_close(AF.relobralo(now, last, first, w, 1.0, alpha=1.0), w)
    # rho = 0 looks back: the history becomes the balance against L(0)
    e = torch.softmax(now / (0.1 * first), 0) * 2
    torch.testing.assert_close(AF.relobralo(now, last, first, w, 0.0, alpha=1.0), e)
    # a huge temperature gives equal weights from the balance terms
    out = AF.relobralo(now, last, first, torch.ones(2), 0.0, alpha=0.5, temperature=1e9)
    torch.testing.assert_close(out, torch.ones(2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 2.0}, "rho"),
        ({"alpha": -0.1}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"losses": torch.tensor([0.0, 1.0])}, "losses"),
        ({"initial_losses": torch.tensor([1.0, float("nan")])}, "initial_losses"),
        ({"previous_losses": torch.ones(3)}, "previous_losses"),
    ],
)
def test_relobralo_rejects_bad_input(kwargs, match):
    args = {
        "losses": torch.ones(2),
        "previous_losses": torch.ones(2),
        "initial_losses": torch.ones(2),
        "previous_weights": torch.ones(2),
        "rho": 1.0,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        AF.relobralo(**args)


def test_uncertainty_forms():
    losses = torch.tensor([2.0, 3.0])
    s = torch.tensor([0.5, -0.2])
    total = AF.uncertainty_loss(losses, s, classification=[False, True])
    expected = 0.5 * torch.exp(-s[0]) * 2.0 + 0.5 * s[0] + torch.exp(-s[1]) * 3.0 + 0.5 * s[1]
    torch.testing.assert_close(total, expected)
    w = AF.uncertainty_weights(s, classification=[False, True])
    torch.testing.assert_close(w, torch.stack([0.5 * torch.exp(-s[0]), torch.exp(-s[1])]))


def test_uncertainty_optimum_is_the_loss():
    # d/ds [1/2 e^-s L + s/2] = 0  <=>  e^s = L
    L = torch.tensor([4.0, 0.25])
    s = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        AF.uncertainty_loss(L, s).backward()
        opt.step()
    torch.testing.assert_close(s.detach().exp(), L, rtol=1e-3, atol=1e-4)


def test_uncertainty_absent_task_keeps_graph_and_adds_nothing():
    s = torch.zeros(2, requires_grad=True)
    total = AF.uncertainty_loss(torch.tensor([2.0, 7.0]), s, present=torch.tensor([True, False]))
    total.backward()
    assert total.item() == pytest.approx(1.0)
    assert s.grad is not None and s.grad[1].item() == 0.0


def test_gradnorm_closed_form_equals_autograd():
    torch.manual_seed(0)
    w = torch.tensor([0.7, 1.1, 1.2], requires_grad=True)
    norms = torch.tensor([2.0, 0.5, 1.5])
    ratios = torch.tensor([1.2, 0.8, 1.0])
    alpha = 1.5
    grad, loss = AF.gradnorm_weight_grad(w.detach(), norms, ratios, alpha)
    # L_grad with the target held constant, by autograd
    G = w * norms
    r = ratios / ratios.mean()
    target = (G.mean() * r**alpha).detach()
    l_grad = (G - target).abs().sum()
    l_grad.backward()
    torch.testing.assert_close(grad, w.grad)
    torch.testing.assert_close(loss, l_grad.detach())


def test_gradnorm_absent_task_gets_no_gradient():
    grad, _ = AF.gradnorm_weight_grad(
        torch.ones(3),
        torch.tensor([1.0, 2.0, 5.0]),
        torch.ones(3),
        1.0,
        present=torch.tensor([True, True, False]),
    )
    assert grad[2].item() == 0.0
    # with the third task absent, the mean norm is 1.5: task 0 below, task 1 above
    assert grad[0].item() < 0 < grad[1].item()


def test_renormalize():
    w = AF.renormalize(torch.tensor([-1.0, float("nan"), 2.0]), total=3.0)
    assert torch.isfinite(w).all() and (w > 0).all()
    assert w.sum().item() == pytest.approx(3.0)


def test_vector_validation_message():
    with pytest.raises(ValueError, match=r"Parameter `previous` should be a non-empty 1-D"):
        AF.dwa(torch.ones(2, 2), torch.ones(2))


D64 = torch.float64


def _grad_wrt_losses(fn, losses, *args, **kw):
    """d fn(losses) / d losses by autograd: the effective weights, derived independently."""
    x = losses.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x, *args, **kw), x)
    return g


# ---------------------------------------------------------------------------------- RLW
def test_rlw_is_softmax_of_gaussian_draws_from_the_generator():
    for seed in (0, 1, 123):
        w = AF.rlw(4, torch.Generator().manual_seed(seed))
        eps = torch.randn(4, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(w, torch.exp(eps) / torch.exp(eps).sum(), rtol=1e-6, atol=0)
        assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (w > 0).all()


def test_rlw_successive_draws_follow_the_generator_stream():
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(5):
        torch.testing.assert_close(AF.rlw(3, g), torch.softmax(torch.randn(3, generator=ref), 0))


def test_rlw_reproducible_and_seed_dependent():
    a = AF.rlw(3, torch.Generator().manual_seed(7))
    b = AF.rlw(3, torch.Generator().manual_seed(7))
    c = AF.rlw(3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rlw_other_distributions_by_hand():
    u = AF.rlw(3, torch.Generator().manual_seed(0), distribution="uniform")
    r = torch.rand(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(u, torch.softmax(r, 0))
    d = AF.rlw(3, torch.Generator().manual_seed(0), distribution="dirichlet")
    e = torch.empty(3).exponential_(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d, e / e.sum())
    assert d.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_rlw_dtype_and_device():
    w = AF.rlw(2, torch.Generator().manual_seed(0), dtype=D64, device="cpu")
    assert w.dtype == D64 and w.device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_tasks": 2.0}, "num_tasks"),
        ({"num_tasks": 2, "distribution": "bernoulli"}, "distribution"),
    ],
)
def test_rlw_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AF.rlw(**kwargs)


# ---------------------------------------------------------------------------------- GLS / log
def test_gls_is_the_geometric_mean_and_its_weights_are_its_gradient():
    L = torch.tensor([0.5, 2.0, 8.0], dtype=D64)
    gls = AF.gls_loss(L)
    assert gls.item() == pytest.approx((0.5 * 2.0 * 8.0) ** (1 / 3))
    torch.testing.assert_close(AF.gls_weights(L), _grad_wrt_losses(AF.gls_loss, L))
    torch.testing.assert_close(AF.gls_weights(L), gls / (3 * L))


def test_gls_is_stable_where_the_product_is_not():
    L = torch.full((40,), 1e-3)  # the product underflows float32
    assert torch.prod(L).item() == 0.0
    assert AF.gls_loss(L).item() == pytest.approx(1e-3, rel=1e-5)


def test_gls_absent_and_nonpositive_tasks_count_as_absent():
    L = torch.tensor([4.0, 1.0, -3.0, 0.0])
    present = torch.tensor([True, True, True, False])
    x = L.clone().requires_grad_(True)
    out = AF.gls_loss(x, present)
    out.backward()
    assert out.item() == pytest.approx(2.0)  # sqrt(4 * 1): T counts the usable tasks
    assert torch.isfinite(x.grad).all() and x.grad[2:].eq(0).all()
    torch.testing.assert_close(AF.gls_weights(L, present), torch.tensor([0.25, 1.0, 0.0, 0.0]))


def test_gls_nothing_usable_is_zero_with_finite_gradient():
    x = torch.tensor([-1.0, 0.0], requires_grad=True)
    out = AF.gls_loss(x)
    out.backward()
    assert out.item() == 0.0 and x.grad.eq(0).all()


def test_scale_invariant_loss_and_weights():
    L = torch.tensor([0.5, 2.0, 3.0], dtype=D64)
    assert AF.scale_invariant_loss(L).item() == pytest.approx(math.log(3.0))
    torch.testing.assert_close(AF.scale_invariant_weights(L), 1 / L)
    torch.testing.assert_close(
        AF.scale_invariant_weights(L), _grad_wrt_losses(AF.scale_invariant_loss, L)
    )
    bad = torch.tensor([-1.0, 2.0])
    assert AF.scale_invariant_loss(bad).item() == pytest.approx(math.log(2.0))
    assert AF.scale_invariant_weights(bad).tolist() == [0.0, 0.5]


def _tiny_problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2) * torch.tensor([1.0, 10.0])

    def losses():
        return ((net(x) - y) ** 2).mean(0)  # two positive task losses of different scales

    return net, losses


def _grads(net, loss):
    return torch.autograd.grad(loss, list(net.parameters()))


def test_scale_invariant_update_ignores_task_scales():
    net, losses = _tiny_problem()
    base = _grads(net, AF.scale_invariant_loss(losses()))
    scaled = _grads(net, AF.scale_invariant_loss(losses() * torch.tensor([1e-3, 1e4])))
    for a, b in zip(base, scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_gls_direction_ignores_task_scales():
    net, losses = _tiny_problem()
    base = torch.cat([g.flatten() for g in _grads(net, AF.gls_loss(losses()))])
    scaled_losses = losses() * torch.tensor([1e-2, 1e2])
    scaled = torch.cat([g.flatten() for g in _grads(net, AF.gls_loss(scaled_losses))])
    cos = torch.dot(base, scaled) / (base.norm() * scaled.norm())
    assert cos.item() == pytest.approx(1.0, abs=1e-5)


def test_imtl_l_value_by_hand():
    L, s = torch.tensor([2.0, 0.5]), torch.tensor([0.3, -1.0])
    expected = math.exp(0.3) * 2.0 - 0.3 + math.exp(-1.0) * 0.5 + 1.0
    assert AF.imtl_l_loss(L, s).item() == pytest.approx(expected, rel=1e-6)
    assert AF.imtl_l_loss(L, s, torch.tensor([True, False])).item() == pytest.approx(
        math.exp(0.3) * 2.0 - 0.3, rel=1e-6
    )


def test_imtl_l_at_its_optimum_updates_like_the_log_loss():
    net, losses = _tiny_problem(seed=1)
    L = losses().detach()
    s = (-torch.log(L)).requires_grad_(True)  # the optimum e^s L = 1
    total = AF.imtl_l_loss(losses(), s)
    grads = torch.autograd.grad(total, [*net.parameters(), s])
    g_net, g_s = grads[:-1], grads[-1]
    torch.testing.assert_close(g_s, torch.zeros(2), atol=1e-6, rtol=0)  # s is stationary there
    for a, b in zip(g_net, _grads(net, AF.scale_invariant_loss(losses())), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # ... and not elsewhere (the assertion above can fail)
    away = AF.imtl_l_loss(losses(), torch.zeros(2))
    diff = [(a - b).abs().max() for a, b in zip(_grads(net, away), g_net, strict=True)]
    assert max(diff) > 1e-3


def test_imtl_l_scales_converge_to_minus_log_loss():
    L = torch.tensor([4.0, 0.25])
    s = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        AF.imtl_l_loss(L, s).backward()
        opt.step()
    torch.testing.assert_close(s.detach(), -torch.log(L), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------- FAMO
def test_famo_weights_are_the_loss_gradient_and_sum_to_one():
    L = torch.tensor([0.3, 2.0, 5.0], dtype=D64)
    logits = torch.tensor([0.2, -0.4, 1.0], dtype=D64)
    mins = torch.tensor([0.1, -1.0, 0.0], dtype=D64)
    w = AF.famo_weights(L, logits, mins)
    torch.testing.assert_close(w, _grad_wrt_losses(AF.famo_loss, L, logits, mins))
    z = torch.softmax(logits, 0)
    D = L - mins + 1e-8
    torch.testing.assert_close(w, (z / D) / (z / D).sum())
    assert w.sum().item() == pytest.approx(1.0)


def test_famo_loss_value_by_hand():
    L, logits = torch.tensor([1.0, 4.0], dtype=D64), torch.tensor([0.0, math.log(3.0)], dtype=D64)
    z = torch.tensor([0.25, 0.75], dtype=D64)
    D = L + 1e-8
    c = 1 / (z / D).sum()
    assert AF.famo_loss(L, logits).item() == pytest.approx((c * (z * torch.log(D)).sum()).item())


def test_famo_logit_grad_is_the_softmax_jacobian_product():
    logits = torch.tensor([0.3, -0.2, 0.9], dtype=D64, requires_grad=True)
    before = torch.tensor([1.0, 2.0, 0.5], dtype=D64)
    after = torch.tensor([0.8, 2.1, 0.45], dtype=D64)
    mins = torch.tensor([0.0, 0.5, -0.5], dtype=D64)
    delta = torch.log(before - mins + 1e-8) - torch.log(after - mins + 1e-8)
    (expected,) = torch.autograd.grad(torch.softmax(logits, 0), logits, grad_outputs=delta)
    got = AF.famo_logit_grad(logits.detach(), before, after, mins)
    torch.testing.assert_close(got, expected)
    assert got.sum().item() == pytest.approx(0.0, abs=1e-12)


def test_famo_logit_step_takes_weight_from_the_fastest_task():
    before, after = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.99])
    g = AF.famo_logit_grad(torch.zeros(2), before, after)
    assert g[0] > 0 > g[1]  # descending g lowers task 0's logit


def test_famo_below_the_minimum_counts_as_absent_without_nan():
    L = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    out = AF.famo_loss(L, torch.zeros(3))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(L.grad).all() and L.grad[1] == 0
    w = AF.famo_weights(L.detach(), torch.zeros(3))
    assert w[1] == 0 and w.sum().item() == pytest.approx(1.0)
    g = AF.famo_logit_grad(torch.zeros(3), L.detach(), torch.tensor([0.5, -1.0, 3.0]))
    assert torch.isfinite(g).all() and g[1] == 0
    # the same loss is fine with a lower bound below it
    w2 = AF.famo_weights(L.detach(), torch.zeros(3), torch.full((3,), -5.0))
    assert (w2 > 0).all()


def _toy(x: torch.Tensor) -> torch.Tensor:
    """The 2-D toy of CAGrad / Nash-MTL / FAMO (METHODS.md), for a batch of points [..., 2]."""
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.log(torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), 5e-6)) + 6
    f2 = torch.log(torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), 5e-6)) + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c1 = torch.clamp(torch.tanh(0.5 * x2), 0)
    c2 = torch.clamp(torch.tanh(-0.5 * x2), 0)
    return torch.stack([0.1 * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2], dim=-1)


TOY_INITS = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
PARETO_X2 = -8.3552


@pytest.fixture
def one_thread():
    """Thousands of tiny ops: one intra-op thread is as fast, and robust to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_famo_reaches_the_pareto_set_of_the_toy_where_the_sum_gets_stuck(one_thread):
    steps, lr = 2000, 2e-2  # Adam on x (the papers use lr 1e-3 and more steps)
    mins = torch.tensor([-2.1, -21.0])
    loss = vmap(AF.famo_loss, in_dims=(0, 0, None))
    logit_grad = vmap(AF.famo_logit_grad, in_dims=(0, 0, 0, None))
    x = torch.tensor(TOY_INITS, requires_grad=True)  # the five runs side by side
    logits = torch.zeros(5, 2, requires_grad=True)
    opt_x = torch.optim.Adam([x], lr=lr, betas=(0.9, 0.99))
    opt_logits = torch.optim.Adam([logits], lr=0.025)  # gamma = 0
    for _ in range(steps):
        before = _toy(x)
        opt_x.zero_grad()
        loss(before, logits.detach(), mins).sum().backward()
        opt_x.step()
        with torch.no_grad():
            after = _toy(x)
        logits.grad = logit_grad(logits.detach(), before.detach(), after, mins)
        opt_logits.step()
    x2 = x.detach()[:, 1]
    assert ((x2 - PARETO_X2).abs() < 0.1).all(), x.detach()
    assert (x.detach()[:, 0].abs() <= 7.1).all(), x.detach()  # x1 within the Pareto set [-7, 7]

    y = torch.tensor([(9.0, 9.0)], requires_grad=True)
    opt_y = torch.optim.Adam([y], lr=lr, betas=(0.9, 0.99))
    for _ in range(steps):
        opt_y.zero_grad()
        _toy(y).sum().backward()
        opt_y.step()
    assert y.detach()[0, 1] > 0, y.detach()  # stuck in the upper half, far from x2 = -8.36


# ---------------------------------------------------------------------------------- SoftAdapt
def test_softadapt_original_variant_by_hand():
    s = torch.tensor([0.5, -1.0, 2.0], dtype=D64)
    for beta in (0.1, 1.0, -2.0):
        e = torch.exp(beta * s)
        torch.testing.assert_close(AF.softadapt(s, beta), e / e.sum())
    w = AF.softadapt(s, 1.0)
    assert w.argmax() == 2 and w.argmin() == 1  # beta > 0: the slowest-falling task gains
    assert w.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(AF.softadapt(s, 0.0), torch.full((3,), 1 / 3, dtype=D64))


def test_softadapt_normalized_and_loss_weighted_variants_by_hand():
    s = torch.tensor([0.5, -1.0, 2.0], dtype=D64)
    f = torch.tensor([3.0, 1.0, 0.5], dtype=D64)
    ns = s / 3.5
    e = torch.exp(2.0 * ns)
    torch.testing.assert_close(AF.softadapt(s, 2.0, normalize=True), e / e.sum())
    e = f * torch.exp(0.1 * s)
    torch.testing.assert_close(AF.softadapt(s, 0.1, loss_values=f), e / e.sum())
    e = f * torch.exp(2.0 * ns)
    torch.testing.assert_close(AF.softadapt(s, 2.0, normalize=True, loss_values=f), e / e.sum())
    # normalised slopes do not depend on the losses' scale
    torch.testing.assert_close(
        AF.softadapt(s * 1e3, 2.0, normalize=True), AF.softadapt(s, 2.0, normalize=True)
    )


def test_softadapt_large_slopes_stay_finite():
    w = AF.softadapt(torch.tensor([1e4, 0.0]), beta=1.0)
    assert torch.isfinite(w).all() and w[0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("beta", [float("nan"), True])
def test_softadapt_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        AF.softadapt(torch.zeros(2), beta)


# ---------------------------------------------------------------------------------- STCH
def test_stch_value_by_hand_and_bounds():
    L = torch.tensor([0.5, 2.0, 1.0], dtype=D64)
    z = torch.tensor([1.0, 1.0, 2.0], dtype=D64)
    f = torch.log(L / z)
    for mu in (0.05, 1.0, 4.0):
        got = AF.stch_loss(L, z, mu)
        assert got.item() == pytest.approx(3 * mu * math.log(torch.exp(f / mu).sum().item()))
        assert 3 * f.max() <= got <= 3 * f.max() + 3 * mu * math.log(3) + 1e-12
    # small mu: close to T * max_i f_i (the Tchebycheff scalarisation)
    assert AF.stch_loss(L, z, 1e-3).item() == pytest.approx(3 * f.max().item(), abs=1e-2)
    lin = AF.stch_loss(L, z, 0.5, logarithmic=False)
    assert lin.item() == pytest.approx(3 * 0.5 * math.log(torch.exp((L - z) / 0.5).sum().item()))


def test_stch_weights_are_the_loss_gradient():
    L = torch.tensor([0.5, 2.0, 1.0], dtype=D64)
    z = torch.tensor([1.0, 1.0, 2.0], dtype=D64)
    for logarithmic in (True, False):
        w = AF.stch_weights(L, z, 0.7, logarithmic=logarithmic)
        torch.testing.assert_close(
            w, _grad_wrt_losses(AF.stch_loss, L, z, 0.7, logarithmic=logarithmic)
        )
    lin = AF.stch_weights(L, z, 0.7, logarithmic=False)
    assert lin.sum().item() == pytest.approx(3.0)
    # the worst task (relative to its reference) gets the most weight
    assert AF.stch_weights(L, z, 0.1, logarithmic=False).argmax() == 1


def test_stch_absent_and_nonpositive_tasks():
    L = torch.tensor([2.0, -1.0, 4.0], requires_grad=True)
    z = torch.ones(3)
    out = AF.stch_loss(L, z, present=torch.tensor([True, True, False]))
    out.backward()
    assert out.item() == pytest.approx(math.log(2.0))  # only task 0 usable: T = 1
    assert torch.isfinite(L.grad).all() and L.grad[1:].eq(0).all()
    x = torch.tensor([-1.0, -2.0], requires_grad=True)
    out = AF.stch_loss(x, torch.ones(2))
    out.backward()
    assert out.item() == 0.0 and x.grad.eq(0).all()


@pytest.mark.parametrize("mu", [0.0, -1.0, float("inf"), float("nan")])
def test_stch_rejects_bad_mu(mu):
    with pytest.raises(ValueError, match="Parameter `mu`"):
        AF.stch_loss(torch.ones(2), torch.ones(2), mu)


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: AF.gls_loss(torch.ones(2, 2)), "Parameter `losses`"),
        (lambda: AF.imtl_l_loss(torch.ones(2), torch.ones(3)), "Parameter `log_scales`"),
        (lambda: AF.famo_loss(torch.ones(2), torch.ones(3)), "Parameter `logits`"),
        (lambda: AF.famo_loss(torch.ones(2), torch.ones(2), torch.ones(3)), "min_losses"),
        (lambda: AF.stch_loss(torch.ones(2), torch.ones(3)), "Parameter `reference`"),
        (lambda: AF.gls_loss(torch.ones(2), torch.ones(3, dtype=torch.bool)), "present"),
        (lambda: AF.softadapt(torch.ones(2), 0.1, loss_values=torch.ones(3)), "loss_values"),
    ],
)
def test_shape_errors_name_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_dtype_follows_the_losses():
    L = torch.tensor([1.0, 2.0], dtype=D64)
    assert AF.gls_loss(L).dtype == D64
    assert AF.famo_loss(L, torch.zeros(2)).dtype == D64
    assert AF.famo_weights(L, torch.zeros(2)).dtype == D64
    assert AF.stch_loss(L, torch.ones(2)).dtype == D64
    half = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert AF.scale_invariant_loss(half).dtype == torch.bfloat16


def test_examples_run_and_every_function_has_one():
    results = [doctest.testmod(m, extraglobs={"torch": torch}) for m in LOSS_MODULES]
    assert sum(r.attempted for r in results) >= len(LOSS_NAMES)
    assert sum(r.failed for r in results) == 0
    for name in LOSS_NAMES:
        doc = getattr(AF, name).__doc__ or ""
        assert "Example::" in doc, name
