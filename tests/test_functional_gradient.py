"""The maths of the gradient-based multi-task methods (lightning_aw.functional: `_gram`, `_qp`,
`_simplex`, `_projection`, `_balancing`, `_direction`)."""

from __future__ import annotations

import doctest
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_aw import functional as GF
from lightning_aw.functional import _balancing, _direction, _gram, _projection, _qp, _simplex

#: the modules of the gradient-based methods and the public names they define
GRADIENT_MODULES = (_gram, _simplex, _projection, _balancing, _direction)
GRADIENT_NAMES = [name for mod in GRADIENT_MODULES for name in mod.__all__]

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_grads(num_tasks: int, dim: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    """Random gradients with a shared component, mixed signs and row scales in [0.2, 5]."""
    gen = _gen(seed)
    shared = torch.randn(1, dim, generator=gen, dtype=F64)
    g = torch.randn(num_tasks, dim, generator=gen, dtype=F64) + 0.5 * shared
    scales = torch.exp(torch.empty(num_tasks, 1, dtype=F64).uniform_(-1.6, 1.6, generator=gen))
    return (g * scales).to(dtype)


# ---------------------------------------------------------------------------------------------
# Registry of the coefficient methods: every entry runs through the shared property suite.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[Tensor], Tensor]
    from_gram: Callable[[Tensor], Tensor]
    scale_power: float = 0  # c(k G) = k**scale_power * c(G) for k > 0 (documented)
    random_order: bool = False  # visits tasks in a random order: equivariance only for T = 2

    def __repr__(self) -> str:
        return self.name


def _gradvac_fn(g: Tensor) -> Tensor:
    targets = torch.full((g.shape[0], g.shape[0]), 0.3, dtype=g.dtype)
    return GF.gradvac(g, targets, generator=_gen(0))[0]


def _gradvac_gram(k: Tensor) -> Tensor:
    targets = torch.full((k.shape[0], k.shape[0]), 0.3, dtype=k.dtype)
    return GF.gradvac_from_gram(k, targets, generator=_gen(0))[0]


METHODS = [
    Method("mgda", GF.mgda, GF.mgda_from_gram),
    Method("mgda-l2", lambda g: GF.mgda(g, "l2"), lambda k: GF.mgda_from_gram(k, "l2"), -1),
    Method(
        "pcgrad",
        lambda g: GF.pcgrad(g, generator=_gen(0)),
        lambda k: GF.pcgrad_from_gram(k, generator=_gen(0)),
        random_order=True,
    ),
    Method(
        "pcgrad-mean",
        lambda g: GF.pcgrad(g, "mean", generator=_gen(0)),
        lambda k: GF.pcgrad_from_gram(k, "mean", generator=_gen(0)),
        random_order=True,
    ),
    Method("cagrad", GF.cagrad, GF.cagrad_from_gram),
    Method(
        "cagrad-c0.9-r0",
        lambda g: GF.cagrad(g, c=0.9, rescale=0),
        lambda k: GF.cagrad_from_gram(k, c=0.9, rescale=0),
    ),
    Method("imtl_g", GF.imtl_g, GF.imtl_g_from_gram),
    Method("nash_mtl", GF.nash_mtl, GF.nash_mtl_from_gram),
    Method("aligned_mtl-min", GF.aligned_mtl, GF.aligned_mtl_from_gram),
    Method(
        "aligned_mtl-median",
        lambda g: GF.aligned_mtl(g, "median"),
        lambda k: GF.aligned_mtl_from_gram(k, "median"),
    ),
    Method(
        "aligned_mtl-rmse",
        lambda g: GF.aligned_mtl(g, "rmse"),
        lambda k: GF.aligned_mtl_from_gram(k, "rmse"),
    ),
    Method("upgrad", GF.upgrad, GF.upgrad_from_gram),
    Method("gradvac", _gradvac_fn, _gradvac_gram, random_order=True),
    Method("fairgrad", GF.fairgrad, GF.fairgrad_from_gram, scale_power=-4 / 3),  # alpha = 2
    Method(
        "fairgrad-a0.5",
        lambda g: GF.fairgrad(g, alpha=0.5),
        lambda k: GF.fairgrad_from_gram(k, alpha=0.5),
        scale_power=-2 / 3,
    ),
    Method(
        "fairgrad-a0",
        lambda g: GF.fairgrad(g, alpha=0.0),
        lambda k: GF.fairgrad_from_gram(k, alpha=0.0),
    ),
    Method("con_fig", GF.con_fig, GF.con_fig_from_gram),
]

by_method = pytest.mark.parametrize("method", METHODS, ids=repr)


def _degenerate_cases() -> dict[str, Tensor]:
    gen = _gen(3)
    g, h = torch.randn(2, 40, generator=gen, dtype=F64)
    return {
        "zero": torch.zeros(3, 40, dtype=F64),
        "one-zero-row": torch.stack([g, h, torch.zeros_like(g)]),
        "identical": torch.stack([g, g, g]),
        "opposite": torch.stack([g, -g]),
        "opposite+other": torch.stack([g, -g, h]),
        "collinear": torch.stack([g, -2 * g, 0.5 * g]),
        "rank-deficient": torch.stack([g, h, g + h, g - 2 * h]),
        "more-tasks-than-dims": torch.randn(6, 2, generator=gen, dtype=F64),
        "cancelling-in-2d": torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=F64),
        "scale-1e-12": 1e-12 * torch.randn(4, 40, generator=gen, dtype=F64),
        "scale-1e12": 1e12 * torch.randn(4, 40, generator=gen, dtype=F64),
        "mixed-1e-12-1e12": torch.stack([1e-12 * g, 1e12 * h, g + h]),
        "single-task": g[None],
    }


DEGENERATE = _degenerate_cases()


# ---------------------------------------------------------------------------------------------
# Shared property suite
# ---------------------------------------------------------------------------------------------


@by_method
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finite_shape_dtype_device(method, dtype):
    g = random_grads(4, 10, seed=1, dtype=dtype)
    c = method.fn(g)
    assert c.shape == (4,)
    assert c.dtype == dtype
    assert c.device == g.device
    assert torch.isfinite(c).all()
    # the same coefficients as the float64 computation, up to the input precision
    ref = method.fn(g.double())
    tol = {torch.float32: 1e-4, torch.float64: 1e-9}.get(dtype, 3e-2)
    torch.testing.assert_close(c.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@by_method
@pytest.mark.parametrize("case", list(DEGENERATE), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_inputs_give_finite_coefficients(method, case, dtype):
    g = DEGENERATE[case].to(dtype)
    c = method.fn(g)
    assert c.shape == (g.shape[0],)
    assert c.dtype == dtype
    assert torch.isfinite(c).all(), c
    k = GF.gram_matrix(g)
    assert torch.isfinite(method.from_gram(k)).all()


@by_method
@pytest.mark.parametrize("seed", range(3))
def test_from_gram_twin_agrees(method, seed):
    g = random_grads(3 + seed, 8, seed=seed)
    c = method.fn(g)
    torch.testing.assert_close(method.from_gram(g @ g.T), c, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(method.from_gram(GF.gram_matrix(g)), c, rtol=1e-8, atol=1e-10)


@by_method
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_tasks=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_permutation_equivariance(method, num_tasks, seed, data):
    if method.random_order and num_tasks > 2:
        num_tasks = 2  # the visiting order is random: only two tasks have a unique order
    g = random_grads(num_tasks, 7, seed=seed)
    perm = torch.tensor(data.draw(st.permutations(range(num_tasks))))
    c, c_perm = method.fn(g), method.fn(g[perm])
    torch.testing.assert_close(c_perm, c[perm], rtol=1e-6, atol=1e-9 * float(c.abs().max()))


@by_method
@pytest.mark.parametrize("factor", [1e-9, 1e-3, 3.0, 1e8])
def test_documented_scale_behaviour(method, factor):
    g = random_grads(4, 9, seed=5)
    c, c_scaled = method.fn(g), method.fn(factor * g)
    expected = c * factor**method.scale_power
    torch.testing.assert_close(
        c_scaled, expected, rtol=1e-7, atol=1e-12 * float(expected.abs().max())
    )


@by_method
def test_single_task(method):
    c = method.fn(torch.tensor([[3.0, 4.0]], dtype=F64))
    assert c.shape == (1,)
    assert float(c[0]) > 0
    assert torch.isfinite(c).all()


@by_method
@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.ones(3), r"2-D tensor \[T, P\].*grads.shape = \(3,\)"),
        (torch.ones(0, 4), r"grads.shape = \(0, 4\)"),
        (torch.ones(2, 3, 4), r"grads.shape = \(2, 3, 4\)"),
        (torch.ones(2, 3, dtype=torch.int64), "floating-point"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "finite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "finite"),
    ],
)
def test_invalid_grads_raise_clear_error(method, bad, match):
    with pytest.raises(ValueError, match=match):
        method.fn(bad)


@by_method
@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.ones(2, 3), r"square 2-D tensor \[T, T\].*gram.shape = \(2, 3\)"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "finite"),
        (torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "non-negative diagonal"),
    ],
)
def test_invalid_gram_raises_clear_error(method, bad, match):
    with pytest.raises(ValueError, match=match):
        method.from_gram(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@by_method
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_device_kept(method, dtype):
    g = random_grads(4, 64, seed=2, dtype=dtype)
    c = method.fn(g.cuda())
    assert c.device.type == "cuda"
    assert c.dtype == dtype
    torch.testing.assert_close(c.cpu(), method.fn(g), rtol=1e-4, atol=1e-5)


def test_docstring_examples_run():
    results = [
        doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE) for m in GRADIENT_MODULES
    ]
    assert sum(r.attempted for r in results) >= len(GRADIENT_NAMES)
    assert sum(r.failed for r in results) == 0


@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_every_public_name_is_documented(name):
    doc = getattr(GF, name).__doc__ or ""
    assert "Example::" in doc
    if not name.endswith("_from_gram") and name != "gram_matrix":
        assert "https://" in doc  # the paper
        assert ".. math::" in doc
        assert "Raises:" in doc


# ---------------------------------------------------------------------------------------------
# Gram matrix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-18, 1e-12, 1.0, 1e12, 1e17])
def test_gram_matrix_is_accurate_at_extreme_scales(scale):
    # float32 Gram entries span about 1e-38 .. 3e38, i.e. gradients of about 1e-18 .. 1e18
    g = random_grads(3, 50, seed=0)
    k = GF.gram_matrix((g * scale).float())
    expected = (g @ g.T) * scale**2
    torch.testing.assert_close(k.double(), expected, rtol=1e-5, atol=0.0)


def test_gram_matrix_dtype():
    assert GF.gram_matrix(torch.ones(2, 3, dtype=torch.bfloat16)).dtype == torch.float32
    assert GF.gram_matrix(torch.ones(2, 3, dtype=F64)).dtype == F64


# ---------------------------------------------------------------------------------------------
# Pinned values. One fixed conflicting pair, every number derived by hand:
#   g1 = (1, 0), g2 = (-1, 2);  K = [[1, -1], [-1, 5]],  |g1| = 1, |g2| = sqrt(5).
# ---------------------------------------------------------------------------------------------

PAIR = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=F64)
SQRT5 = math.sqrt(5.0)
PHI = (1 + SQRT5) / 2


def _pinned() -> dict[str, list[float]]:
    # IMTL-G: alpha ~ K^-1 n, K^-1 = [[5, 1], [1, 1]] / 4, n = (1, sqrt5)
    #   -> alpha ~ (5 + sqrt5, 1 + sqrt5), normalised to sum 1.
    s = 6 + 2 * SQRT5
    imtl = [(5 + SQRT5) / s, (1 + SQRT5) / s]
    # Nash-MTL: Kbar = K / |K|_F, |K|_F = sqrt(28); two tasks => alpha1 |g1| = alpha2 |g2|,
    #   row 1: alpha1 (alpha1 - alpha2) / sqrt(28) = 1  =>  alpha1^2 (1 - 1/sqrt5) = sqrt(28).
    a1 = math.sqrt(math.sqrt(28.0) / (1 - 1 / SQRT5))
    # Aligned-MTL: sqrt(K) = (K + sqrt(det K) I) / sqrt(tr K + 2 sqrt(det K)) = (K + 2I)/sqrt(10)
    #   so K^-1/2 = [[7, 1], [1, 3]] sqrt(10) / 20 and K^-1/2 1 = sqrt(10) (0.4, 0.2);
    #   eigenvalues 3 -+ sqrt5: sqrt(lambda_min) = (sqrt5 - 1)/sqrt2  =>  c = (5 - sqrt5)(0.4, 0.2);
    #   rmse: sqrt(mean eigenvalue) = sqrt(3).
    # CAGrad (c = 0.4): g0 = (0, 1), |g0| = 1; w = (1 - t, t): F(t) = 2t + 0.4 sqrt(8t^2 - 4t + 1),
    #   F'(0) = 2 - 0.8 > 0 so w = (1, 0), g_w = g1, lambda = 0.4 / |g1| = 0.4,
    #   c = (1/2 + 0.4, 1/2) = (0.9, 0.5); rescale=1 divides by 1 + 0.16.
    # UPGrad: w1 = argmin_{v >= e1} v^T K v = (1, 1/5), w2 = (1, 1)  (KKT checked by hand)
    #   c = mean = (1, 0.6).
    # MGDA: c1 = (g2 - g1).g2 / |g1 - g2|^2 = 6 / 8.
    # PCGrad: g1.g2 = -1 < 0: p1 = g1 + g2/5, p2 = g2 + g1  => c = (2, 1.2).
    # GradVac with zero targets is PCGrad (adjust whenever cos < 0, weight = -cos |p_i|/|g_j|).
    return {
        "mgda": [0.75, 0.25],
        "mgda-l2": [0.0, 0.0],  # filled in the test: normalised pair, see below
        "pcgrad": [2.0, 1.2],
        "pcgrad-mean": [1.0, 0.6],
        "cagrad": [0.9 / 1.16, 0.5 / 1.16],
        "cagrad-r0": [0.9, 0.5],
        "imtl_g": imtl,
        "nash_mtl": [a1, a1 / SQRT5],
        "aligned_mtl-min": [(5 - SQRT5) * 0.4, (5 - SQRT5) * 0.2],
        "aligned_mtl-median": [(5 - SQRT5) * 0.4, (5 - SQRT5) * 0.2],  # lower median = min
        "aligned_mtl-rmse": [math.sqrt(30.0) * 0.4, math.sqrt(30.0) * 0.2],
        "upgrad": [1.0, 0.6],
        "gradvac": [2.0, 1.2],
        # FairGrad, alpha = 1: K w = 1/w; as for Nash-MTL w1 |g1| = w2 |g2|, and row 1 gives
        #   w1 (w1 - w2) = 1  =>  w1^2 (1 - 1/sqrt5) = 1 (no Frobenius normalisation here).
        "fairgrad-a1": [(1 - 1 / SQRT5) ** -0.5, (1 - 1 / SQRT5) ** -0.5 / SQRT5],
        # ConFIG: u1 = (1, 0), u2 = (-1, 2)/sqrt5; u_i.d = 1 => d_u = (1, phi), phi = (1+sqrt5)/2;
        #   |d_u|^2 = 1 + phi^2 = phi + 2, g1.d_u + g2.d_u = 1 + sqrt5, so
        #   d = (1 + sqrt5)/(phi + 2) d_u = (2/sqrt5)(1, phi) = c1 g1 + c2 g2 with
        #   c2 = phi/sqrt5 and c1 = (2 + phi)/sqrt5.
        "con_fig": [(2 + PHI) / SQRT5, PHI / SQRT5],
    }


PINNED = _pinned()


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("mgda", lambda g: GF.mgda(g)),
        ("pcgrad", lambda g: GF.pcgrad(g)),
        ("pcgrad-mean", lambda g: GF.pcgrad(g, "mean")),
        ("cagrad", lambda g: GF.cagrad(g)),
        ("cagrad-r0", lambda g: GF.cagrad(g, rescale=0)),
        ("imtl_g", GF.imtl_g),
        ("nash_mtl", GF.nash_mtl),
        ("aligned_mtl-min", GF.aligned_mtl),
        ("aligned_mtl-median", lambda g: GF.aligned_mtl(g, "median")),
        ("aligned_mtl-rmse", lambda g: GF.aligned_mtl(g, "rmse")),
        ("upgrad", GF.upgrad),
        ("gradvac", lambda g: GF.gradvac(g, torch.zeros(2, 2, dtype=F64))[0]),
        ("fairgrad-a1", lambda g: GF.fairgrad(g, alpha=1.0, ridge=1e-14)),
        ("con_fig", GF.con_fig),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_pinned_values_on_a_conflicting_pair(name, call):
    expected = torch.tensor(PINNED[name], dtype=F64)
    torch.testing.assert_close(call(PAIR), expected, rtol=1e-7, atol=1e-9)


def test_pinned_three_orthogonal_tasks():
    # g_i = (i+1) e_i: |g| = 1, 2, 3 and K = diag(1, 4, 9).
    g = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    # MGDA: min sum c_i^2 |g_i|^2 on the simplex => c ~ 1/|g_i|^2 = (36, 9, 4) / 49.
    torch.testing.assert_close(GF.mgda(g), torch.tensor([36, 9, 4], dtype=F64) / 49)
    # IMTL-G: K alpha = gamma n => alpha ~ 1/|g_i| = (6, 3, 2) / 11.
    torch.testing.assert_close(GF.imtl_g(g), torch.tensor([6, 3, 2], dtype=F64) / 11)
    # Nash-MTL: alpha_i^2 |g_i|^2 / |K|_F = 1, |K|_F = sqrt(98) => alpha_i = 98^(1/4) / |g_i|.
    nash = 98**0.25 / torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    torch.testing.assert_close(GF.nash_mtl(g), nash, rtol=1e-7, atol=0.0)
    # Aligned-MTL (min): B = sqrt(1) K^-1/2 => c_i = 1/|g_i|.
    torch.testing.assert_close(GF.aligned_mtl(g), 1 / torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    # UPGrad: nothing conflicts, w_i = e_i => c = 1/3; PCGrad: nothing projected => c = 1.
    torch.testing.assert_close(GF.upgrad(g), torch.full((3,), 1 / 3, dtype=F64))
    torch.testing.assert_close(GF.pcgrad(g), torch.ones(3, dtype=F64))
    # FairGrad: |g_i|^2 w_i = w_i^(-1/alpha) => w_i = |g_i|^(-2 alpha / (1 + alpha)).
    norms = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    for alpha in (0.5, 1.0, 2.0, 5.0):
        torch.testing.assert_close(
            GF.fairgrad(g, alpha=alpha, ridge=1e-14), norms ** (-2 * alpha / (1 + alpha))
        )
    # ConFIG: u_i = e_i, d_u = (1, 1, 1), sum_i g_i.d_u / |d_u|^2 = 6/3 => d = (2, 2, 2),
    #   c_i = 2 / |g_i|.
    torch.testing.assert_close(GF.con_fig(g), 2 / norms)


# ---------------------------------------------------------------------------------------------
# MGDA
# ---------------------------------------------------------------------------------------------


def _scipy_min_norm(k: Tensor) -> Tensor:
    optimize = pytest.importorskip("scipy.optimize")
    np = pytest.importorskip("numpy")
    q = k.numpy()
    n = q.shape[0]
    best = None
    rng = np.random.default_rng(0)
    for x0 in [np.full(n, 1 / n), *rng.dirichlet(np.ones(n), size=4)]:
        res = optimize.minimize(
            lambda x: x @ q @ x,
            x0,
            jac=lambda x: 2 * q @ x,
            method="SLSQP",
            bounds=[(0, 1)] * n,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            options={"ftol": 1e-16, "maxiter": 1000},
        )
        if best is None or res.fun < best.fun:
            best = res
    return torch.from_numpy(best.x)


@pytest.mark.parametrize(("num_tasks", "dim"), [(3, 10), (4, 3), (5, 20), (7, 30), (12, 40)])
@pytest.mark.parametrize("seed", range(2))
def test_mgda_is_the_exact_min_norm_point(num_tasks, dim, seed):
    g = random_grads(num_tasks, dim, seed=seed)
    k = g @ g.T
    c = GF.mgda(g)
    # KKT certificate of global optimality of min c^T K c on the simplex:
    #   c >= 0, sum c = 1, (K c)_j >= c^T K c for all j.
    value = float(c @ k @ c)
    assert float(c.min()) >= 0
    assert float(c.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((k @ c).min()) >= value - 1e-9 * float(k.diagonal().max())
    # and an independent solver (scipy SLSQP) finds the same point and value
    ref = _scipy_min_norm(k)
    assert value == pytest.approx(float(ref @ k @ ref), rel=1e-4, abs=1e-10)
    if num_tasks <= dim:  # full-rank Gram: unique minimiser
        torch.testing.assert_close(c, ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.integers(1, 5))
def test_mgda_two_task_closed_form(seed, dim):
    g1, g2 = random_grads(2, dim, seed=seed)
    denom = float((g1 - g2) @ (g1 - g2))
    c1 = min(max(float((g2 - g1) @ g2) / denom, 0.0), 1.0)
    torch.testing.assert_close(
        GF.mgda(torch.stack([g1, g2])), torch.tensor([c1, 1 - c1], dtype=F64)
    )


def test_mgda_identical_gradients_split_evenly():
    g = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=F64)
    torch.testing.assert_close(GF.mgda(g), torch.tensor([0.5, 0.5], dtype=F64))


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgda_normalisation_is_folded_into_the_coefficients(normalization):
    g = random_grads(4, 6, seed=7)
    losses = torch.tensor([0.5, 2.0, 3.0, 0.1], dtype=F64)
    norms = g.norm(dim=1)
    s = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    c = GF.mgda(g, normalization, losses=losses)
    c_hat = GF.mgda(g / s[:, None])  # MGDA on the normalised gradients
    torch.testing.assert_close(c, c_hat / s)
    torch.testing.assert_close(c @ g, c_hat @ (g / s[:, None]))  # the same direction


def test_mgda_rejects_bad_options():
    g = random_grads(3, 4, seed=0)
    with pytest.raises(ValueError, match="normalization"):
        GF.mgda(g, "bogus")
    with pytest.raises(ValueError, match="losses"):
        GF.mgda(g, "loss")
    with pytest.raises(ValueError, match="losses"):
        GF.mgda(g, "loss+", losses=torch.tensor([1.0, -1.0, 2.0]))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", ["random", "rank-deficient", "opposite+other", "identical"])
def test_active_set_path_matches_enumeration(monkeypatch, seed, case):
    g = random_grads(6, 4 if case == "rank-deficient" else 12, seed=seed)
    if case in DEGENERATE and case != "rank-deficient":
        g = DEGENERATE[case]
    k = g @ g.T
    enum = GF.mgda(g), GF.upgrad(g), GF.cagrad(g)
    monkeypatch.setattr(_qp, "_MAX_ENUM_TASKS", 1)
    aset = GF.mgda(g), GF.upgrad(g), GF.cagrad(g)
    scale = float(k.diagonal().max())
    assert float(aset[0] @ k @ aset[0]) == pytest.approx(
        float(enum[0] @ k @ enum[0]), abs=1e-10 * scale
    )
    assert float((k @ aset[1]).min()) >= -1e-10 * scale  # UPGrad stays non-conflicting
    assert float(aset[1] @ k @ aset[1]) == pytest.approx(
        float(enum[1] @ k @ enum[1]), rel=1e-8, abs=1e-10 * scale
    )
    torch.testing.assert_close(aset[2] @ g, enum[2] @ g, rtol=1e-7, atol=1e-9 * scale**0.5)


# ---------------------------------------------------------------------------------------------
# PCGrad
# ---------------------------------------------------------------------------------------------


def _pcgrad_reference(g: Tensor, orders: Tensor) -> Tensor:
    """PCGrad on the vectors themselves (the paper's Algorithm 1) with given visiting orders."""
    out = []
    for i in range(g.shape[0]):
        p = g[i].clone()
        for j in orders[i].tolist():
            dot = p @ g[j]
            if dot < 0:
                p = p - dot / (g[j] @ g[j]) * g[j]
        out.append(p)
    return torch.stack(out).sum(0)


@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_matches_vector_space_algorithm(seed):
    g = random_grads(5, 6, seed=seed)
    orders = _projection._random_orders(
        5, _gen(seed), torch.device("cpu")
    )  # the orders it will draw
    c = GF.pcgrad(g, generator=_gen(seed))
    torch.testing.assert_close(c @ g, _pcgrad_reference(g, orders))
    assert sorted(orders[0].tolist()) == [1, 2, 3, 4]


def test_pcgrad_generator_gives_determinism_and_reduction_is_mean():
    g = random_grads(5, 4, seed=1)
    a = GF.pcgrad(g, generator=_gen(3))
    torch.testing.assert_close(GF.pcgrad(g, generator=_gen(3)), a)
    torch.testing.assert_close(GF.pcgrad(g, "mean", generator=_gen(3)), a / 5)
    with pytest.raises(ValueError, match="reduction"):
        GF.pcgrad(g, "max")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.integers(2, 6))
def test_pcgrad_two_tasks_never_conflicts(seed, dim):
    g = random_grads(2, dim, seed=seed)
    d = GF.pcgrad(g) @ g
    scale = float(g.norm(dim=1).prod())
    assert float(d @ g[0]) >= -1e-12 * scale
    assert float(d @ g[1]) >= -1e-12 * scale


def test_pcgrad_without_conflict_is_the_plain_sum():
    g = torch.tensor([[1.0, 0.2], [0.5, 1.0], [0.1, 0.1]], dtype=F64)
    torch.testing.assert_close(GF.pcgrad(g), torch.ones(3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# CAGrad
# ---------------------------------------------------------------------------------------------


def _scipy_cagrad_direction(g: Tensor, c: float) -> Tensor:
    optimize = pytest.importorskip("scipy.optimize")
    np = pytest.importorskip("numpy")
    gn = g.numpy()
    q = gn @ gn.T
    n = q.shape[0]
    g0 = gn.mean(0)
    radius = c * np.linalg.norm(g0)
    b = q.mean(1)

    def dual(w):
        return w @ b + radius * np.sqrt(max(w @ q @ w, 0.0) + 1e-30)

    best = None
    rng = np.random.default_rng(0)
    for x0 in [np.full(n, 1 / n), *rng.dirichlet(np.ones(n), size=6)]:
        res = optimize.minimize(
            dual,
            x0,
            method="SLSQP",
            bounds=[(0, 1)] * n,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    gw = best.x @ gn
    return torch.from_numpy(g0 + radius / np.linalg.norm(gw) * gw)


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
@pytest.mark.parametrize("c", [0.4, 0.8])
def test_cagrad_matches_a_reference_solver(num_tasks, c):
    g = random_grads(num_tasks, 12, seed=num_tasks)
    d = GF.cagrad(g, c=c, rescale=0) @ g
    ref = _scipy_cagrad_direction(g, c)
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-6 * float(ref.norm()))
    # primal view: d lies on the sphere |d - g0| = c |g0| and its worst task improvement is
    # at least the reference's
    g0 = g.mean(0)
    assert float((d - g0).norm()) == pytest.approx(c * float(g0.norm()), rel=1e-9)
    assert float((g @ d).min()) >= float((g @ ref).min()) - 1e-7 * float(ref.norm() ** 2)


@pytest.mark.parametrize("seed", range(3))
def test_cagrad_with_c_zero_is_the_mean(seed):
    g = random_grads(4, 5, seed=seed)
    for rescale in (0, 1, 2):
        torch.testing.assert_close(
            GF.cagrad(g, c=0.0, rescale=rescale), torch.full((4,), 0.25, dtype=F64)
        )


def test_cagrad_rescale_conventions():
    g = random_grads(3, 5, seed=0)
    d0 = GF.cagrad(g, c=0.5, rescale=0)
    torch.testing.assert_close(GF.cagrad(g, c=0.5, rescale=1), d0 / 1.25)
    torch.testing.assert_close(GF.cagrad(g, c=0.5, rescale=2), d0 / 1.5)
    with pytest.raises(ValueError, match="rescale"):
        GF.cagrad(g, rescale=3)
    with pytest.raises(ValueError, match="`c`"):
        GF.cagrad(g, c=-0.1)


def test_cagrad_degenerate_hull_projects_the_mean():
    # 0 is in the hull and every w with g_w = 0 is optimal: the mean (0, 1/3) is already
    # non-conflicting (g1.d = g2.d = 0, g3.d > 0), so d = g0.
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(GF.cagrad(g, rescale=0), torch.full((3,), 1 / 3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# IMTL-G and Nash-MTL
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(num_tasks=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_imtl_g_equal_projections_on_unit_gradients(num_tasks, seed):
    g = random_grads(num_tasks, 10, seed=seed)
    alpha = GF.imtl_g(g)
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-10)
    proj = (alpha @ g) @ (g / g.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(proj, proj.mean().expand_as(proj), rtol=1e-8, atol=1e-10)


def test_imtl_g_rank_deficient_cases():
    g, h = DEGENERATE["identical"][0], DEGENERATE["rank-deficient"][1]
    # identical gradients: every alpha on the simplex has equal projections; min-norm -> 1/T
    torch.testing.assert_close(
        GF.imtl_g(torch.stack([g, g, g])), torch.full((3,), 1 / 3, dtype=F64)
    )
    # opposite gradients: only d = 0 has equal projections
    alpha = GF.imtl_g(torch.stack([g, -2 * g]))
    torch.testing.assert_close(alpha, torch.tensor([2 / 3, 1 / 3], dtype=F64))
    # a zero gradient has no direction: weight 0, the others solved as usual
    alpha = GF.imtl_g(torch.stack([g, h, torch.zeros_like(g)]))
    torch.testing.assert_close(alpha[:2], GF.imtl_g(torch.stack([g, h])))
    assert float(alpha[2]) == 0.0


@settings(max_examples=25, deadline=None)
@given(num_tasks=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_nash_mtl_solves_the_bargaining_system(num_tasks, seed):
    g = random_grads(num_tasks, 10, seed=seed)
    alpha = GF.nash_mtl(g)
    k = g @ g.T
    kbar = k / torch.linalg.matrix_norm(k)
    assert float(alpha.min()) > 0
    residual = kbar @ alpha - 1 / alpha
    assert float(residual.norm()) <= 1e-6 * float((1 / alpha).norm())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.integers(2, 6))
def test_nash_mtl_equals_imtl_g_up_to_scale_for_two_tasks(seed, dim):
    g = random_grads(2, dim, seed=seed)
    alpha, imtl = GF.nash_mtl(g, ridge=1e-14), GF.imtl_g(g)  # a negligible ridge: exact system
    torch.testing.assert_close(alpha / alpha.sum(), imtl, rtol=1e-8, atol=1e-10)


def test_nash_mtl_options():
    g = random_grads(3, 5, seed=0)
    rough = GF.nash_mtl(g, max_iter=1)
    assert torch.isfinite(rough).all() and float(rough.min()) > 0
    assert not torch.allclose(rough, GF.nash_mtl(g), rtol=1e-6)  # one step is not converged
    torch.testing.assert_close(GF.nash_mtl(torch.zeros(3, 4)), torch.ones(3))
    for kwargs in ({"max_iter": 0}, {"tol": -1.0}, {"ridge": 0.0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            GF.nash_mtl(g, **kwargs)


# ---------------------------------------------------------------------------------------------
# FairGrad and ConFIG
# ---------------------------------------------------------------------------------------------


def _scipy_fair_system(k: Tensor, alpha: float) -> Tensor:
    """The paper's system K w = w^(-1/alpha), w > 0, by scipy's least squares (as the authors
    solve it), from a start other than the library's."""
    optimize = pytest.importorskip("scipy.optimize")
    np = pytest.importorskip("numpy")
    q = k.numpy()
    start = np.full(len(q), 1.0 / len(q))
    res = optimize.least_squares(
        lambda x: q @ x - x ** (-1.0 / alpha),
        start,
        bounds=(1e-12, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=10_000,
    )
    return torch.from_numpy(res.x)


@settings(max_examples=20, deadline=None)
@given(
    num_tasks=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    alpha=st.sampled_from([0.5, 1.0, 2.0, 5.0]),
)
def test_fairgrad_solves_the_fair_system(num_tasks, seed, alpha):
    g = random_grads(num_tasks, 10, seed=seed)
    k = g @ g.T
    w = GF.fairgrad(g, alpha=alpha, ridge=1e-14)  # a negligible ridge: the paper's system
    assert float(w.min()) > 0
    residual = k @ w - w ** (-1 / alpha)
    assert float(residual.abs().max()) <= 1e-8 * float((w ** (-1 / alpha)).abs().max())
    torch.testing.assert_close(w, _scipy_fair_system(k, alpha), rtol=1e-6, atol=0.0)


def test_fairgrad_special_cases_of_alpha():
    g = random_grads(3, 8, seed=4)
    k = g @ g.T
    # alpha = 0: linear scalarization, the plain sum
    torch.testing.assert_close(GF.fairgrad(g, alpha=0.0), torch.ones(3, dtype=F64))
    # alpha = 1: proportional fairness, Nash-MTL's system without its Frobenius normalisation
    nash = GF.nash_mtl(g, ridge=1e-14) / torch.linalg.matrix_norm(k).sqrt()
    torch.testing.assert_close(GF.fairgrad(g, alpha=1.0, ridge=1e-14), nash, rtol=1e-8, atol=0)
    # alpha -> infinity: max-min fairness; here MGDA's min-norm point uses every task, so the
    # direction is MGDA's and every task gets the same decrease (K w -> 1)
    g = torch.tensor([[1.0, 0.2, 0.0], [-0.3, 2.0, 0.1], [0.2, -0.4, 3.0]], dtype=F64)
    k = g @ g.T
    mgda = GF.mgda(g)
    assert float(mgda.min()) > 0.05
    w = GF.fairgrad(g, alpha=1e4, ridge=1e-14)
    d, d_mgda = w @ g, mgda @ g
    assert float(d @ d_mgda / (d.norm() * d_mgda.norm())) > 1 - 1e-6
    torch.testing.assert_close(k @ w, torch.ones(3, dtype=F64), rtol=1e-2, atol=0)
    # also when MGDA leaves a task out (its weight then tends to 0)
    g = torch.randn(4, 6, dtype=F64, generator=_gen(1))
    mgda = GF.mgda(g)
    assert float(mgda.min()) == 0.0
    for alpha, cosine in ((100.0, 0.9999), (1e4, 1 - 1e-8)):
        d, d_mgda = GF.fairgrad(g, alpha=alpha) @ g, mgda @ g
        assert float(d @ d_mgda / (d.norm() * d_mgda.norm())) > cosine


def test_fairgrad_options_and_degenerate_cases():
    g = random_grads(3, 5, seed=0)
    rough = GF.fairgrad(g, max_iter=1)  # not converged: the last iterate, positive and finite
    assert torch.isfinite(rough).all() and float(rough.min()) > 0
    assert not torch.allclose(rough, GF.fairgrad(g), rtol=1e-6)
    torch.testing.assert_close(GF.fairgrad(torch.zeros(3, 4)), torch.ones(3))
    # opposite gradients: only the ridge holds the weights (equal, large, finite)
    w = GF.fairgrad(torch.stack([g[0], -g[0]]))
    assert torch.isfinite(w).all() and float(w[0]) == pytest.approx(float(w[1]), rel=1e-6)
    for kwargs, match in (
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": 0.0}, "tol"),
        ({"ridge": -1.0}, "ridge"),
    ):
        with pytest.raises(ValueError, match=match):
            GF.fairgrad(g, **kwargs)


def _paper_con_fig(g: Tensor, rcond: float = 1e-15) -> Tensor:
    """The paper's update from the full gradient matrix: d_u = pinv(U) 1 with U the unit
    gradients, then (sum_i g_i . d_hat) d_hat."""
    np = pytest.importorskip("numpy")
    G = g.numpy()
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    d_u = np.linalg.pinv(U, rcond=rcond) @ np.ones(len(G))
    d_hat = d_u / np.linalg.norm(d_u)
    return torch.from_numpy((G @ d_hat).sum() * d_hat)


@settings(max_examples=25, deadline=None)
@given(num_tasks=st.integers(1, 6), dim=st.integers(6, 12), seed=st.integers(0, 10_000))
def test_con_fig_is_the_paper_s_update(num_tasks, dim, seed):
    g = random_grads(num_tasks, dim, seed=seed)
    d = GF.con_fig(g) @ g
    torch.testing.assert_close(d, _paper_con_fig(g), rtol=1e-8, atol=1e-10)


def test_con_fig_is_the_paper_s_update_with_more_tasks_than_dimensions():
    g = random_grads(5, 3, seed=1)  # rank 3: the pseudo-inverse's least-squares solution
    torch.testing.assert_close(GF.con_fig(g) @ g, _paper_con_fig(g, 1e-10), rtol=1e-8, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(num_tasks=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_con_fig_equal_positive_cosines_and_imtl_g_direction(num_tasks, seed):
    g = random_grads(num_tasks, 10, seed=seed)
    c = GF.con_fig(g)
    d = c @ g
    cos = (g @ d) / (g.norm(dim=1) * d.norm())
    torch.testing.assert_close(cos, cos.mean().expand_as(cos), rtol=1e-8, atol=1e-10)
    assert float(cos.min()) > 0  # no task's loss increases to first order
    # the length: the sum of the projections of the gradients on the direction
    assert float(d.norm()) == pytest.approx(float((g @ d).sum() / d.norm()), rel=1e-9)
    torch.testing.assert_close(c / c.sum(), GF.imtl_g(g), rtol=1e-7, atol=1e-10)


def test_con_fig_degenerate_cases():
    g, h = DEGENERATE["rank-deficient"][:2]
    torch.testing.assert_close(GF.con_fig(torch.stack([g, g, g])), torch.ones(3, dtype=F64))
    torch.testing.assert_close(GF.con_fig(torch.stack([g, -g])), torch.zeros(2, dtype=F64))
    # a zero gradient is left out and keeps 1; all-zero gradients give 1
    c = GF.con_fig(torch.stack([g, h, torch.zeros_like(g)]))
    torch.testing.assert_close(c[:2], GF.con_fig(torch.stack([g, h])))
    assert float(c[2]) == 1.0
    torch.testing.assert_close(GF.con_fig(torch.zeros(3, 4)), torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Aligned-MTL and UPGrad
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("seed", range(3))
def test_aligned_mtl_aligned_gradients_are_orthogonal_with_equal_norms(mode, seed):
    g = random_grads(4, 9, seed=seed)
    k = g @ g.T
    lam = torch.linalg.eigvalsh(k)
    scale = {"min": lam.min(), "median": lam.median(), "rmse": lam.mean()}[mode]
    c = GF.aligned_mtl(g, mode)
    # B = sqrt(s) K^-1/2 is symmetric with B 1 = c; the aligned gradients B G have Gram s I
    lam_v, vec = torch.linalg.eigh(k)
    b = vec @ torch.diag((scale / lam_v).sqrt()) @ vec.T
    torch.testing.assert_close(b.sum(1), c)
    aligned = b @ g
    torch.testing.assert_close(
        aligned @ aligned.T, scale * torch.eye(4, dtype=F64), rtol=1e-8, atol=1e-8 * float(scale)
    )


def test_aligned_mtl_rank_deficient_projector():
    g = DEGENERATE["rank-deficient"]  # 4 tasks in a 2-d span
    k = g @ g.T
    lam, vec = torch.linalg.eigh(k)
    keep = lam > 1e-9 * lam.max()
    b = vec[:, keep] @ torch.diag((lam[keep].min() / lam[keep]).sqrt()) @ vec[:, keep].T
    torch.testing.assert_close(GF.aligned_mtl(g), b.sum(1))
    aligned = b @ g
    projector = vec[:, keep] @ vec[:, keep].T
    torch.testing.assert_close(
        aligned @ aligned.T, lam[keep].min() * projector, atol=1e-8 * float(lam.max()), rtol=0
    )
    with pytest.raises(ValueError, match="scale_mode"):
        GF.aligned_mtl(g, "max")


def _scipy_upgrad(g: Tensor) -> Tensor:
    optimize = pytest.importorskip("scipy.optimize")
    np = pytest.importorskip("numpy")
    q = (g @ g.T).numpy()
    n = q.shape[0]
    ws = []
    for i in range(n):
        res = optimize.minimize(
            lambda v: v @ q @ v,
            np.eye(n)[i] + 0.1,
            jac=lambda v: 2 * q @ v,
            method="L-BFGS-B",
            bounds=[(1.0 if j == i else 0.0, None) for j in range(n)],
            options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 10_000},
        )
        ws.append(res.x)
    return torch.from_numpy(np.mean(ws, axis=0))


@pytest.mark.parametrize(("num_tasks", "seed"), [(2, 0), (3, 1), (5, 2), (8, 3), (12, 4)])
def test_upgrad_matches_a_reference_solver(num_tasks, seed):
    g = random_grads(num_tasks, 20, seed=seed)
    c = GF.upgrad(g)
    torch.testing.assert_close(c, _scipy_upgrad(g), rtol=1e-5, atol=1e-7)
    assert float(c.min()) >= 1 / num_tasks - 1e-12  # w_i >= e_i


@settings(max_examples=30, deadline=None)
@given(num_tasks=st.integers(2, 7), dim=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_upgrad_is_non_conflicting(num_tasks, dim, seed):
    g = random_grads(num_tasks, dim, seed=seed)
    c = GF.upgrad(g)
    d = c @ g
    # round-off of d = sum_i c_i g_i is relative to the terms summed, not to d (which can be an
    # exact 0 when the gradients fully conflict, e.g. opposite signs in one dimension)
    scale = float(g.norm(dim=1).max()) * float((c.abs().unsqueeze(1) * g).norm(dim=1).sum())
    assert float((g @ d).min()) >= -1e-10 * max(scale, float(g.norm(dim=1).max() ** 2))


# ---------------------------------------------------------------------------------------------
# GradVac
# ---------------------------------------------------------------------------------------------


def test_gradvac_reaches_the_target_cosine_and_updates_the_ema():
    g = PAIR
    targets = torch.full((2, 2), 0.5, dtype=F64)
    c, new = GF.gradvac(g, targets, beta=0.25)
    # coefficient matrix [[1, w12], [w21, 1]] and c = its column sums
    p1 = g[0] + (c[1] - 1) * g[1]
    p2 = (c[0] - 1) * g[0] + g[1]
    assert float(torch.cosine_similarity(p1, g[1], dim=0)) == pytest.approx(0.5, abs=1e-12)
    assert float(torch.cosine_similarity(p2, g[0], dim=0)) == pytest.approx(0.5, abs=1e-12)
    cos = -1 / SQRT5  # cos(g1, g2) before adjustment
    expected = torch.tensor([[0.5, 0.75 * 0.5 + 0.25 * cos]] * 2, dtype=F64)
    expected[1] = expected[1].flip(0)
    torch.testing.assert_close(new, expected)


def test_gradvac_leaves_pairs_above_target_alone():
    g = torch.tensor([[1.0, 0.1], [1.0, -0.1]], dtype=F64)  # cosine ~ 0.98
    c, new = GF.gradvac(g, torch.zeros(2, 2, dtype=F64), beta=1.0)
    torch.testing.assert_close(c, torch.ones(2, dtype=F64))
    cos = float(torch.cosine_similarity(g[0], g[1], dim=0))
    torch.testing.assert_close(new, torch.tensor([[0.0, cos], [cos, 0.0]], dtype=F64))


def test_gradvac_validates_targets_and_beta():
    g = random_grads(3, 4, seed=0)
    with pytest.raises(ValueError, match="targets"):
        GF.gradvac(g, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="targets"):
        GF.gradvac(g, torch.full((3, 3), 1.5))
    with pytest.raises(ValueError, match="beta"):
        GF.gradvac(g, torch.zeros(3, 3), beta=2.0)
    c, new = GF.gradvac(g.float(), torch.zeros(3, 3, dtype=F64))
    assert c.dtype == torch.float32 and new.dtype == F64


# ---------------------------------------------------------------------------------------------
# DB-MTL and GradDrop
# ---------------------------------------------------------------------------------------------


def test_db_mtl_hand_computed_two_steps():
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    losses = torch.tensor([1.0, 4.0], dtype=F64)
    # step 1: log-gradients (2, 0) and (0, 0.25); norms 2 and 0.25 -> scales 1 and 8
    d, ema = GF.db_mtl(g, losses)
    torch.testing.assert_close(d, torch.tensor([2.0, 2.0], dtype=F64))
    torch.testing.assert_close(ema, torch.tensor([[2.0, 0.0], [0.0, 0.25]], dtype=F64))
    # step 2 with beta 0.5 and new grads (0, 2), (1, 0), losses (2, 1):
    #   log-grads (0, 1), (1, 0); EMA (1, 0.5), (0.5, 0.125)
    #   norms sqrt(1.25), sqrt(0.265625); both scaled to norm sqrt(1.25)
    g2 = torch.tensor([[0.0, 2.0], [1.0, 0.0]], dtype=F64)
    d, ema = GF.db_mtl(g2, torch.tensor([2.0, 1.0], dtype=F64), ema=ema, beta=0.5)
    torch.testing.assert_close(ema, torch.tensor([[1.0, 0.5], [0.5, 0.125]], dtype=F64))
    ratio = math.sqrt(1.25 / 0.265625)
    torch.testing.assert_close(d, torch.tensor([1 + 0.5 * ratio, 0.5 + 0.125 * ratio], dtype=F64))


def test_db_mtl_scale_and_validation():
    g = random_grads(3, 5, seed=0)
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    d, _ = GF.db_mtl(g, losses)
    torch.testing.assert_close(GF.db_mtl(7.0 * g, losses)[0], 7.0 * d)
    torch.testing.assert_close(GF.db_mtl(g, 7.0 * losses)[0], d / 7.0)
    d32, ema32 = GF.db_mtl(g.bfloat16(), losses)
    assert d32.dtype == torch.bfloat16 and ema32.dtype == torch.float32
    assert torch.isfinite(GF.db_mtl(torch.zeros(3, 5), losses)[0]).all()
    with pytest.raises(ValueError, match="losses"):
        GF.db_mtl(g, torch.tensor([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="ema"):
        GF.db_mtl(g, losses, ema=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="beta"):
        GF.db_mtl(g, losses, beta=1.0)
    with pytest.raises(ValueError, match="finite"):
        GF.db_mtl(g * float("nan"), losses)


def test_graddrop_agreeing_signs_or_full_leak_is_the_plain_sum():
    gen = _gen(0)
    g = torch.rand(3, 50, generator=gen, dtype=F64)
    torch.testing.assert_close(GF.graddrop(g, generator=_gen(1)), g.sum(0))
    torch.testing.assert_close(GF.graddrop(-g, generator=_gen(1)), -g.sum(0))
    mixed = torch.randn(3, 50, generator=gen, dtype=F64)
    torch.testing.assert_close(GF.graddrop(mixed, leak=1.0), mixed.sum(0))


def test_graddrop_keeps_one_sign_per_element():
    g = torch.randn(4, 2000, generator=_gen(2), dtype=F64)
    out = GF.graddrop(g, generator=_gen(3))
    pos, neg = g.clamp_min(0).sum(0), g.clamp_max(0).sum(0)
    assert bool(((out == pos) | (out == neg)).all())
    torch.testing.assert_close(GF.graddrop(g, generator=_gen(3)), out)  # deterministic
    # P(keep the positive ones) = purity = (1 + sum g / sum |g|) / 2
    purity = 0.5 * (1 + g.sum(0) / g.abs().sum(0))
    kept_pos = (out == pos) & (pos != neg)
    assert abs(float(kept_pos.double().mean()) - float(purity.mean())) < 0.04


def test_graddrop_leak_per_task_and_reduce_dims():
    g = torch.randn(2, 8, 5, generator=_gen(4), dtype=F64)  # [T, batch, features]
    out = GF.graddrop(g, leak=torch.tensor([1.0, 0.0]), generator=_gen(5))
    # task 0 always passes; task 1 only where its sign was drawn
    rest = out - g[0]
    assert bool((torch.isclose(rest, g[1], rtol=0, atol=1e-12) | (rest.abs() < 1e-12)).all())
    # with the batch summed for the purity, one sign is drawn per feature and shared by the batch
    out = GF.graddrop(g, generator=_gen(6), reduce_dims=(0,))
    pos, neg = g.clamp_min(0).sum(0), g.clamp_max(0).sum(0)
    same_sign_for_batch = (out == pos).all(0) | (out == neg).all(0)
    assert bool(same_sign_for_batch.all())
    # ... whereas without reduce_dims the draws differ along the batch for some feature
    out = GF.graddrop(g, generator=_gen(6))
    assert not bool(((out == pos).all(0) | (out == neg).all(0)).all())
    with pytest.raises(ValueError, match="leak"):
        GF.graddrop(g, leak=1.5)
    with pytest.raises(ValueError, match="reduce_dims"):
        GF.graddrop(g, reduce_dims=(2,))
    with pytest.raises(ValueError, match="grads_repr"):
        GF.graddrop(torch.ones(3))


def test_all_exports_exist():
    for name in GRADIENT_NAMES:
        assert callable(getattr(GF, name))
    assert len(set(GRADIENT_NAMES)) == len(GRADIENT_NAMES)


def test_nash_mtl_survives_a_slightly_indefinite_gram_of_cancelling_gradients():
    # two gradients that cancel give, in float32, a Gram matrix with a tiny negative eigenvalue
    # (found on the 2-D Pareto toy): the solver projects it onto the PSD cone instead of failing
    gram = torch.tensor([[1.0, -1.0000001], [-1.0000001, 1.0]])
    assert float(torch.linalg.eigvalsh(gram.double()).min()) < 0
    alpha = GF.nash_mtl_from_gram(gram)
    assert torch.isfinite(alpha).all() and (alpha > 0).all()
    torch.testing.assert_close(alpha[0], alpha[1])  # symmetric problem, symmetric answer
