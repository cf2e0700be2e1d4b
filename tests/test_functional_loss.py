"""The maths of the loss-based weightings, without Lightning."""

from __future__ import annotations

import pytest
import torch

from lightning_aw import functional as AF


def test_dwa_worked_example():
    # METHODS.md: r = [0.5, 1, 1.2], tau = 2 -> w = [0.810134, 1.040232, 1.149634]
    w = AF.dwa(torch.tensor([0.5, 1.0, 1.2], dtype=torch.float64), torch.ones(3, dtype=torch.float64))
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
        torch.ones(3), torch.tensor([1.0, 2.0, 5.0]), torch.ones(3), 1.0,
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
