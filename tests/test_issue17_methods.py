"""DualProj, ExcessMTL, MoCo and learning-rate annealing: their functional twins pinned against
independent re-derivations (scipy / numpy), edge cases, and the callbacks' update on a real
Trainer. (The registry-fed conformance suite checks the rest: totals, resume, DDP, ...)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import TinyNet, loader, trainer
from scipy.optimize import minimize, nnls

from lightning_aw import MGDA, DualProj, ExcessMTL, LRAnnealing, MoCo
from lightning_aw.functional import (
    dual_proj,
    dual_proj_from_gram,
    excess_mtl,
    lr_annealing,
    mgda,
    moco,
    project_simplex,
)
from lightning_aw.transforms import EMA


def _rng_grads(seed: int, num: int = 3, size: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num, size))


# ================================================================================== DualProj
def _primal_projection(G: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin ||x - target||^2 subject to G x >= 0, by scipy's SLSQP (the primal problem)."""
    fit = minimize(
        lambda x: ((x - target) ** 2).sum(),
        np.zeros_like(target),
        jac=lambda x: 2 * (x - target),
        constraints=[{"type": "ineq", "fun": lambda x: G @ x, "jac": lambda x: G}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert fit.success
    return fit.x


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("num", [2, 3, 5])
def test_dual_proj_is_the_projection_of_the_mean_gradient_onto_the_dual_cone(seed, num):
    G = _rng_grads(seed, num)
    c = dual_proj(torch.tensor(G)).numpy()
    d = c @ G
    np.testing.assert_allclose(d, _primal_projection(G, G.mean(0)), atol=1e-6)
    # the dual, independently: c = 1/T + argmin_{u >= 0} ||G^T (1/T + u)|| (NNLS)
    mean = np.full(num, 1 / num)
    np.testing.assert_allclose(c, mean + nnls(G.T, -G.T @ mean)[0], atol=1e-6)
    assert (G @ d >= -1e-9).all() and (c >= 1 / num - 1e-12).all()
    # the Gram twin, the scale and a permutation of the tasks
    gram = torch.tensor(G @ G.T)
    np.testing.assert_allclose(dual_proj_from_gram(gram).numpy(), c, atol=1e-9)
    np.testing.assert_allclose(dual_proj(torch.tensor(1e-6 * G)).numpy(), c, atol=1e-6)
    perm = np.random.default_rng(seed).permutation(num)
    np.testing.assert_allclose(dual_proj(torch.tensor(G[perm])).numpy(), c[perm], atol=1e-7)


def test_dual_proj_two_tasks_closed_form():
    # T = 2: at most one task conflicts with the mean (g_mean . (g1 + g2) >= 0); projecting onto
    # that one half-space, d = g_mean - (g1 . g_mean / |g1|^2) g1, i.e. c = (1/2 - s, 1/2)
    g1, g2 = np.array([1.0, 0.0, 0.0]), np.array([-3.0, 1.0, 0.5])
    mean = (g1 + g2) / 2
    s = g1 @ mean / (g1 @ g1)
    assert s < 0 and g2 @ (mean - s * g1) >= 0  # one conflict, the projection satisfies both
    c = dual_proj(torch.tensor(np.stack([g1, g2])))
    np.testing.assert_allclose(c.numpy(), [0.5 - s, 0.5], atol=1e-12)


def test_dual_proj_edge_cases():
    g = torch.tensor([[1.0, 2.0, -1.0]])
    # no conflict: the mean itself (identical gradients, orthogonal ones, a single task)
    assert torch.equal(dual_proj(torch.cat([g, g, g])), torch.full((3,), 1 / 3))
    assert torch.equal(dual_proj(torch.eye(3)), torch.full((3,), 1 / 3))
    assert torch.equal(dual_proj(g), torch.ones(1))
    # opposite gradients: the dual cone is the orthogonal complement, the mean projects to 0
    c = dual_proj(torch.cat([g, -2 * g])).double()
    assert (c >= 0.5 - 1e-12).all()
    torch.testing.assert_close(c @ torch.cat([g, -2 * g]).double(), torch.zeros(3, dtype=c.dtype))
    # a task with a zero gradient constrains nothing: the update is the projection of the mean
    # of all T gradients onto the cone of the others
    G = _rng_grads(5, 2)
    G0 = np.vstack([G, np.zeros(7)])
    c = dual_proj(torch.tensor(G0)).numpy()
    assert np.isfinite(c).all()
    np.testing.assert_allclose(c @ G0, _primal_projection(G, G0.mean(0)), atol=1e-6)
    # all-zero gradients: the mean coefficients
    assert torch.equal(dual_proj(torch.zeros(3, 4)), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="finite"):
        dual_proj(torch.tensor([[float("nan"), 1.0], [1.0, 0.0]]))


def test_dual_proj_with_a_preference_projects_that_combination():
    G = _rng_grads(7, 3)
    p = np.array([1.0, 0.2, 0.0])
    c = dual_proj(torch.tensor(G), preference=torch.tensor(p)).numpy()
    np.testing.assert_allclose(c @ G, _primal_projection(G, p @ G), atol=1e-6)
    np.testing.assert_allclose(c, p + nnls(G.T, -G.T @ p)[0], atol=1e-6)
    with pytest.raises(ValueError, match="preference"):
        dual_proj(torch.tensor(G), preference=torch.tensor([1.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="every task name"):
        DualProj(preference=[1.0, 0.0, 0.0])  # type: ignore[arg-type]


def test_dual_proj_preference_must_name_the_tasks(tmp_path):
    t = trainer(tmp_path, [DualProj(preference={"a": 1.0, "b": 1.0})], max_steps=1)
    with pytest.raises(ValueError, match=r"missing \['c'\], unknown \[\]"):
        t.fit(TinyNet(), loader(n=32))


# ================================================================================== ExcessMTL
def test_excess_mtl_matches_a_hand_written_recurrence():
    rng = np.random.default_rng(0)
    steps = [rng.normal(size=(3, 5)) * [[1.0], [0.1], [3.0]] for _ in range(6)]
    present = [np.ones(3, bool)] * 6
    present[3] = np.array([True, False, True])  # task 1 absent from the 4th update
    w, acc, e0 = torch.ones(3), torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3)
    w, e0 = w.double(), e0.double()
    ref_w, ref_acc, ref_e0 = np.ones(3), np.zeros((3, 5)), np.zeros(3)
    for G, here in zip(steps, present, strict=True):
        w, acc, e0 = excess_mtl(
            w, torch.tensor(G), acc, e0, step_size=0.3, present=torch.tensor(here)
        )
        # independently: A += g^2 (present rows), e = sum g^2 / sqrt(A + 1e-7); the first
        # positive estimate is e0 (exponent 0 then); w <- T w exp(eta e/e0) / sum
        ref_acc[here] += G[here] ** 2
        e = (G**2 / np.sqrt(ref_acc + 1e-7)).sum(1)
        expo = np.where(here & (ref_e0 > 0), e / np.where(ref_e0 > 0, ref_e0, 1), 0.0)
        ref_e0 = np.where(here & (ref_e0 <= 0), e, ref_e0)
        ref_w = ref_w * np.exp(0.3 * expo)
        ref_w = 3 * ref_w / ref_w.sum()
        np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-12)
        np.testing.assert_allclose(acc.numpy(), ref_acc, rtol=1e-12)
        np.testing.assert_allclose(e0.numpy(), ref_e0, rtol=1e-12)
    assert w.sum().item() == pytest.approx(3.0)


def test_excess_mtl_edge_cases():
    # a task with a zero gradient at first waits for its first positive estimate
    G0 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    w, acc, e0 = excess_mtl(torch.ones(2), G0, torch.zeros(2, 2), torch.zeros(2))
    assert e0[1] == 0 and torch.equal(w, torch.ones(2))
    w, acc, e0 = excess_mtl(w, torch.tensor([[1.0, 1.0], [2.0, 0.0]]), acc, e0, step_size=1.0)
    assert e0[1] == pytest.approx(2.0, rel=1e-6)  # set now; its exponent was 0 this update
    assert w[0] > w[1]
    # identical gradients and histories: equal weights stay equal
    g = torch.tensor([[0.5, -1.0], [0.5, -1.0]])
    w, acc, e0 = torch.ones(2), torch.zeros(2, 2), torch.zeros(2)
    for _ in range(4):
        w, acc, e0 = excess_mtl(w, g, acc, e0, step_size=2.0)
    torch.testing.assert_close(w, torch.ones(2))
    # huge step sizes do not overflow (the step is taken in log space)
    w, acc, e0 = excess_mtl(torch.ones(2), torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2))
    w, _, _ = excess_mtl(w, torch.tensor([[1.0], [1e-3]]), acc, e0, step_size=1e6)
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="step_size"):
        excess_mtl(torch.ones(2), torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2), -1.0)
    with pytest.raises(ValueError, match="accumulator"):
        excess_mtl(torch.ones(2), torch.ones(2, 1), torch.zeros(2, 3), torch.zeros(2))


# ================================================================================== MoCo
def _simplex_projection_scipy(v: np.ndarray) -> np.ndarray:
    n = len(v)
    fit = minimize(
        lambda x: ((x - v) ** 2).sum(),
        np.full(n, 1 / n),
        jac=lambda x: 2 * (x - v),
        bounds=[(0, None)] * n,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-15},
    )
    return fit.x


@pytest.mark.parametrize("seed", range(5))
def test_project_simplex_matches_scipy(seed):
    v = np.random.default_rng(seed).normal(scale=2.0, size=5)
    np.testing.assert_allclose(
        project_simplex(torch.tensor(v)).numpy(), _simplex_projection_scipy(v), atol=1e-7
    )
    x = project_simplex(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))  # on it already
    torch.testing.assert_close(x, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))


def test_moco_matches_a_hand_written_recurrence():
    rng = np.random.default_rng(1)
    Y, lam = torch.zeros(3, 4, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    ref_y, ref_lam = np.zeros((3, 4)), np.full(3, 1 / 3)
    for t in range(1, 7):
        G = rng.normal(size=(3, 4))
        beta, gamma = 0.5 / t**0.5, 0.3 / t**0.5
        Y, lam = moco(Y, lam, torch.tensor(G), beta=beta, gamma=gamma, rho=0.1)
        ref_y = ref_y - beta * (ref_y - G)
        ref_lam = _simplex_projection_scipy(
            ref_lam - gamma * (ref_y @ ref_y.T + 0.1 * np.eye(3)) @ ref_lam
        )
        np.testing.assert_allclose(Y.numpy(), ref_y, rtol=1e-12)
        np.testing.assert_allclose(lam.numpy(), ref_lam, atol=1e-7)


def test_moco_edge_cases():
    g = torch.tensor([[1.0, -1.0]])
    # identical gradients: (Y Y^T) lambda has equal entries, the weights do not move
    Y, lam = moco(torch.zeros(3, 2), torch.full((3,), 1 / 3), torch.cat([g, g, g]), beta=1.0)
    torch.testing.assert_close(lam, torch.full((3,), 1 / 3))
    # a task with a zero gradient: the weights move to it (the min-norm point of the hull is 0)
    Y, lam = torch.zeros(2, 2), torch.full((2,), 0.5)
    for _ in range(30):
        Y, lam = moco(Y, lam, torch.tensor([[1.0, 2.0], [0.0, 0.0]]), beta=1.0, gamma=0.5)
    torch.testing.assert_close(lam, torch.tensor([0.0, 1.0]))
    # opposite gradients of different norms: the fixed point balances them (MGDA's weights),
    # lambda = |g2| / (|g1| + |g2|) on the larger-norm task... i.e. 1/3 and 2/3 here
    G = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    Y, lam = torch.zeros(2, 2), torch.full((2,), 0.5)
    for _ in range(200):
        Y, lam = moco(Y, lam, G, beta=1.0, gamma=0.1)
    torch.testing.assert_close(lam, mgda(G), atol=1e-5, rtol=0)
    torch.testing.assert_close(lam, torch.tensor([1 / 3, 2 / 3]), atol=1e-5, rtol=0)
    # an absent task keeps its tracked row
    Y, lam = moco(
        torch.ones(2, 2),
        torch.full((2,), 0.5),
        torch.zeros(2, 2),
        beta=1.0,
        present=torch.tensor([True, False]),
    )
    assert torch.equal(Y, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="beta"):
        moco(torch.zeros(2, 2), torch.full((2,), 0.5), torch.zeros(2, 2), beta=1.5)


def test_moco_callback_sends_the_trunk_the_tracked_direction(tmp_path):
    """One SGD step: the trunk moves by -lr Y^T lambda (Y = beta g at t = 1), each head by
    -lr lambda_i grad L_i; without and with a marked representation."""
    for marked in (False, True):
        method = MoCo(beta=0.6, gamma=0.4)
        net = TinyNet(mark_representation=marked, optimizer={"name": "sgd", "lr": 0.1})
        before = {k: v.detach().clone() for k, v in net.named_parameters()}
        x, y = next(iter(loader(n=32, batch_size=32)))
        trunk = list(net.trunk.parameters())
        h = net.trunk(x)
        losses = [
            torch.nn.functional.mse_loss(net.heads[t](h).squeeze(-1), y[:, i])
            for i, t in enumerate(net.tasks)
        ]
        G = torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, trunk, retain_graph=True)])
                for L in losses
            ]
        ).double()
        heads = [
            torch.autograd.grad(L, [net.heads[t].weight], retain_graph=True)[0].double()
            for L, t in zip(losses, net.tasks, strict=True)
        ]
        Y = 0.6 * G
        lam = torch.tensor(_simplex_projection_scipy((1 / 3 - 0.4 * (Y @ Y.T).sum(1) / 3).numpy()))
        d = lam @ Y
        t = trainer(tmp_path, [method], max_steps=1)
        t.fit(net, loader(n=32, batch_size=32))
        torch.testing.assert_close(method.weight_tensor().double(), lam, atol=1e-6, rtol=0)
        moved = torch.cat(
            [
                (before[f"trunk.{n}"] - p.detach()).reshape(-1)
                for n, p in net.trunk.named_parameters()
            ]
        ).double()
        torch.testing.assert_close(moved, 0.1 * d, atol=1e-6, rtol=1e-4)
        for i, task in enumerate(net.tasks):
            step = before[f"heads.{task}.weight"] - net.heads[task].weight.detach()
            torch.testing.assert_close(step.double(), 0.1 * lam[i] * heads[i], atol=1e-7, rtol=1e-4)


# ================================================================================== LR annealing
def test_lr_annealing_matches_the_formula_and_its_fixed_points():
    G = _rng_grads(3)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    out = lr_annealing(w, torch.tensor(G), reference=1, alpha=0.9)
    absolute = np.abs(G)
    hat = absolute[1].max() / (absolute.mean(1) * w.numpy())
    expected = 0.1 * w.numpy() + 0.9 * hat
    expected[1] = 1.0
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    # fixed points with constant gradients: lambda^2 = max/mean (weighted) or max/mean
    ratio = absolute[0].max() / absolute.mean(1)
    for weighted, fixed in ((True, np.sqrt(ratio)), (False, ratio)):
        w = torch.ones(3, dtype=torch.float64)
        for _ in range(300):
            w = lr_annealing(w, torch.tensor(G), alpha=0.5, weighted=weighted)
        fixed[0] = 1.0
        np.testing.assert_allclose(w.numpy(), fixed, rtol=1e-9)
    # the mean/mean variant, two tasks: closed form
    out = lr_annealing(
        torch.ones(2),
        torch.tensor([[3.0, -1.0], [0.25, 0.25]]),
        alpha=1.0,
        statistic="mean",
        weighted=False,
    )
    torch.testing.assert_close(out, torch.tensor([1.0, 8.0]))


def test_lr_annealing_layerwise_is_the_authors_statistics(tmp_path):
    """layerwise=True: max |grad L_r| over the weight matrices, the mean of their per-matrix
    mean |grad (lambda_i L_i)|, as the authors' code; pinned over several steps on a Trainer, from
    per-step gradients recorded by an independent probe (trunk: W0 [16x6], b0, W2 [16x16], b2)."""
    from test_conformance import PermNet, Recorder

    G = _rng_grads(4, 3, 10)
    out = lr_annealing(
        torch.ones(3, dtype=torch.float64), torch.tensor(G), alpha=1.0, blocks=[4, 6]
    )
    means = (np.abs(G[:, :4]).mean(1) + np.abs(G[:, 4:]).mean(1)) / 2
    np.testing.assert_allclose(out.numpy()[1:], (np.abs(G[0]).max() / means)[1:], rtol=1e-12)
    with pytest.raises(ValueError, match="blocks"):
        lr_annealing(torch.ones(3), torch.tensor(G), blocks=[4, 5])

    method, rec = LRAnnealing(alpha=0.1, layerwise=True), Recorder(probe=True)
    net = PermNet(optimizer={"name": "sgd", "lr": 0.05})
    trainer(tmp_path, [method, rec], max_epochs=2).fit(net, loader(n=96, batch_size=32))
    w = np.ones(3)
    for k, g in enumerate(rec.g_par):
        blocks = [np.abs(g[:, 0:96]), np.abs(g[:, 112:368])]  # the two weight matrices
        num = max(b[0].max() for b in blocks)
        mean = np.mean([b.mean(1) for b in blocks], axis=0)
        w = 0.9 * w + 0.1 * num / (mean * w)
        w[0] = 1.0
        np.testing.assert_allclose(rec.array("after")[k], w, rtol=1e-5)


def test_lr_annealing_edge_cases():
    w = torch.tensor([1.0, 3.0, 2.0])
    # a zero gradient, an absent task, an absent reference: the weight stays
    G = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    out = lr_annealing(w, G, alpha=0.5, present=torch.tensor([True, True, False]))
    assert torch.equal(out, w)
    out = lr_annealing(w, torch.ones(3, 2), alpha=0.5, present=torch.tensor([False, True, True]))
    assert torch.equal(out, w)
    # identical gradients, unweighted: every weight goes to max/mean = 1
    out = lr_annealing(w, torch.ones(3, 2), alpha=1.0, weighted=False)
    torch.testing.assert_close(out, torch.ones(3))
    with pytest.raises(ValueError, match="reference"):
        lr_annealing(w, G, reference=3)
    with pytest.raises(ValueError, match="statistic"):
        lr_annealing(w, G, statistic="median")  # type: ignore[arg-type]


def test_loss_weightings_average_the_gradient_statistics_of_a_window(tmp_path):
    """With accumulate_grad_batches=2: LRAnnealing averages each micro-batch's statistics and
    ExcessMTL the micro-batches' gradients over the window, then update once per optimizer step
    (the weights weigh the next window). Re-derived from per-micro-batch gradients recorded by an
    independent probe."""
    from test_conformance import PermNet, Recorder

    for make in (
        lambda: LRAnnealing(alpha=0.7, statistic="max", weighted=True),
        lambda: ExcessMTL(step_size=0.8),
    ):
        method, rec = make(), Recorder(probe=True)
        net = PermNet(optimizer={"name": "sgd", "lr": 0.05})
        t = trainer(tmp_path, [method, rec], max_epochs=1, accumulate_grad_batches=2)
        t.fit(net, loader(n=128, batch_size=32))  # 4 micro-batches, 2 optimizer steps
        assert t.global_step == 2
        w, acc, e0, after = np.ones(3), 0.0, None, []
        for window in (rec.g_par[0:2], rec.g_par[2:4]):
            if isinstance(method, LRAnnealing):
                num = np.mean([np.abs(G[0]).max() for G in window])
                mean_abs = np.mean([np.abs(G).mean(1) for G in window], axis=0)
                w = 0.3 * w + 0.7 * num / (mean_abs * w)
                w[0] = 1.0
            else:
                g = np.mean(window, axis=0)
                acc = acc + g**2
                e = (g**2 / np.sqrt(acc + 1e-7)).sum(1)
                if e0 is None:
                    e0 = e
                else:
                    w = w * np.exp(0.8 * e / e0)
                    w = 3 * w / w.sum()
            after.append(w.copy())
        before = rec.array("before")
        assert (before[1] == before[0]).all() and (before[3] == before[2]).all()
        np.testing.assert_allclose(before[2], after[0], rtol=1e-5)
        np.testing.assert_allclose(method.weight_tensor().double().numpy(), after[1], rtol=1e-5)
        assert not np.allclose(w, 1.0)


def test_lr_annealing_rejects_an_unknown_reference_task_before_the_first_step(tmp_path):
    t = trainer(tmp_path, [LRAnnealing(reference="pde")], max_steps=1)
    with pytest.raises(ValueError, match=r"reference task 'pde' is not one of .*\['a', 'b', 'c'\]"):
        t.fit(TinyNet(), loader(n=32))
    assert t.global_step == 0


def test_callbacks_validate_their_arguments():
    with pytest.raises(ValueError, match="`alpha` should be in"):
        LRAnnealing(alpha=1.5)
    with pytest.raises(ValueError, match="`step_size`"):
        ExcessMTL(step_size=float("inf"))
    with pytest.raises(ValueError, match="`gamma`"):
        MoCo(gamma=-0.1)
    assert repr(DualProj()) == "DualProj(preference=None, source='parameters')"


# ================================================================================== CR-MOGM
def test_ema_around_mgda_is_cr_mogm(tmp_path):
    """Zhou et al. (NeurIPS 2022), CR-MOGM: lambda_t = alpha lambda_{t-1} + (1 - alpha) hat_t,
    with hat_t the gradient method's weights at step t and lambda_1 = hat_1. EMA(decay=alpha)
    around MGDA must reproduce that recurrence over several steps, from MGDA's weights of each
    step recomputed here from the step's own per-task gradients."""
    from test_conformance import PermNet, Recorder  # the probe records the per-task gradients

    alpha = 0.7
    rec = Recorder(probe=True)
    net = PermNet(optimizer={"name": "sgd", "lr": 0.05})
    method = MGDA().transformed(EMA(alpha))
    trainer(tmp_path, [method, rec], max_epochs=2).fit(net, loader(n=96, batch_size=32))
    lam = None
    for k, G in enumerate(rec.g_par):
        hat = mgda(torch.tensor(G)).numpy()
        lam = hat if lam is None else alpha * lam + (1 - alpha) * hat
        np.testing.assert_allclose(rec.array("after")[k], lam, rtol=1e-5, atol=1e-7)
    assert not np.allclose(rec.array("after")[-1], mgda(torch.tensor(rec.g_par[-1])).numpy())
