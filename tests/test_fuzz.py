"""Fuzzing every functional twin (``lightning_aw.functional.__all__``) with hypothesis.

Random task counts ``T`` in 1..8, shapes, scales from 1e-8 to 1e8, exact zeros, duplicated and
rank-deficient gradients, negative and NaN entries where a function documents what it does with
them. Every output is finite with the documented shape (and sum, sign), or the call raises the
documented ``ValueError`` whose message names the parameter. Derandomized (``tests/conftest.py``)
and bounded (``MAX_EXAMPLES`` per function). Test ids are the function names;
``METHOD_TWINS`` says which functions each registered method calls (the "fuzz" column of
``docs/reliability.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lightning_aw.functional as F
from lightning_aw.registry import list_methods

MAX_EXAMPLES = 30
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: the functional twins each registered method calls
METHOD_TWINS: dict[str, list[str]] = {
    "equal": ["equal"],
    "uncertainty": ["uncertainty_loss", "uncertainty_weights"],
    "dwa": ["dwa"],
    "gradnorm": ["gradnorm_weight_grad", "renormalize"],
    "rlw": ["rlw"],
    "gls": ["gls_loss", "gls_weights"],
    "scale_invariant": ["scale_invariant_loss", "scale_invariant_weights"],
    "imtl_l": ["imtl_l_loss"],
    "famo": ["famo_loss", "famo_weights", "famo_logit_grad"],
    "softadapt": ["softadapt"],
    "relobralo": ["relobralo"],
    "stch": ["stch_loss", "stch_weights", "scale_invariant_loss", "scale_invariant_weights"],
    "mgda": ["mgda", "mgda_from_gram", "gram_matrix"],
    "pcgrad": ["pcgrad", "pcgrad_from_gram", "gram_matrix"],
    "cagrad": ["cagrad", "cagrad_from_gram", "gram_matrix"],
    "imtl_g": ["imtl_g", "imtl_g_from_gram", "gram_matrix"],
    "nash_mtl": ["nash_mtl", "nash_mtl_from_gram", "gram_matrix"],
    "aligned_mtl": ["aligned_mtl", "aligned_mtl_from_gram", "gram_matrix"],
    "upgrad": ["upgrad", "upgrad_from_gram", "gram_matrix"],
    "gradvac": ["gradvac", "gradvac_from_gram", "gram_matrix"],
    "graddrop": ["graddrop"],
    "db_mtl": ["db_mtl"],
    "fairgrad": ["fairgrad", "fairgrad_from_gram", "gram_matrix"],
    "con_fig": ["con_fig", "con_fig_from_gram", "gram_matrix"],
    "dual_proj": ["dual_proj", "dual_proj_from_gram", "gram_matrix"],
    "excess_mtl": ["excess_mtl"],
    "moco": ["moco", "project_simplex"],
    "lr_annealing": ["lr_annealing"],
    "auto_lambda": ["auto_lambda_grad"],
    "modo": ["modo", "project_simplex"],
    "sdmgrad": ["sdmgrad", "project_simplex"],
}

# ---------------------------------------------------------------------------------- strategies
tasks = st.integers(1, 8)
exponents = st.integers(-8, 8)


@st.composite
def positive(draw, n: int) -> torch.Tensor:
    """``n`` positive numbers from 1e-8 to 1e8, with duplicates."""
    values = draw(st.lists(exponents.map(lambda e: 10.0**e), min_size=1, max_size=n))
    mantissa = draw(st.lists(st.floats(1.0, 9.99), min_size=n, max_size=n))
    return torch.tensor([values[i % len(values)] * mantissa[i] for i in range(n)])


@st.composite
def losses(draw, n: int, bad: bool = True) -> torch.Tensor:
    """Task losses: positive at any scale, exact zeros, and (``bad``) negative, NaN and +inf
    entries."""
    x = draw(positive(n))
    kinds = ["keep", "zero"] + (["negative", "nan", "inf"] if bad else [])
    for i in range(n):
        kind = draw(st.sampled_from(kinds))
        if kind == "zero":
            x[i] = 0.0
        elif kind == "negative":
            x[i] = -x[i]
        elif kind == "nan":
            x[i] = math.nan
        elif kind == "inf":
            x[i] = math.inf
    return x


def masks(n: int) -> st.SearchStrategy[torch.Tensor | None]:
    return st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n).map(torch.tensor))


@st.composite
def gradients(draw, n: int | None = None, bad: bool = False) -> torch.Tensor:
    """``[T, P]`` gradients: random rows at scales 1e-8..1e8, zero rows, duplicates, negated or
    rescaled copies, linear combinations (rank-deficient), float32 or float64."""
    n = draw(tasks) if n is None else n
    p = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        kind = draw(st.sampled_from(["random", "random", "zero", "copy", "neg", "combo"]))
        scale = 10.0 ** draw(exponents)
        if i == 0 or kind == "random":
            rows.append(torch.randn(p, generator=gen, dtype=torch.float64) * scale)
        elif kind == "zero":
            rows.append(torch.zeros(p, dtype=torch.float64))
        elif kind == "copy":
            rows.append(rows[draw(st.integers(0, i - 1))].clone())
        elif kind == "neg":
            rows.append(-scale * rows[draw(st.integers(0, i - 1))])
        else:
            a, b = draw(st.integers(0, i - 1)), draw(st.integers(0, i - 1))
            rows.append(rows[a] + 0.5 * rows[b])
    g = torch.stack(rows)
    if bad and draw(st.booleans()):
        g[draw(st.integers(0, n - 1)), draw(st.integers(0, p - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
    return g.to(draw(st.sampled_from([torch.float32, torch.float64])))


def generators() -> st.SearchStrategy[torch.Generator]:
    return st.integers(0, 2**16).map(lambda s: torch.Generator().manual_seed(s))


# ---------------------------------------------------------------------------------- oracle
def _finite(*outputs: torch.Tensor) -> None:
    for out in outputs:
        assert isinstance(out, torch.Tensor)
        assert torch.isfinite(out).all(), out


def documented_error(call: Callable[[], Any], allowed: bool) -> Any:
    """Run ``call``; a ``ValueError`` naming a parameter is accepted where ``allowed``."""
    error: ValueError | None = None
    try:
        return call()
    except ValueError as err:
        error = err
    assert allowed, f"unexpected ValueError: {error}"
    assert "`" in str(error) or "Parameter" in str(error), f"unclear error: {error}"
    return None


def _sum_close(w: torch.Tensor, total: float, rel: float = 1e-4) -> None:
    assert float(w.double().sum()) == pytest.approx(total, rel=rel, abs=1e-6)


# ---------------------------------------------------------------------------------- loss-based
@FUZZ
@given(n=tasks, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_equal(n, dtype):
    w = F.equal(n, dtype=dtype)
    assert w.shape == (n,) and w.dtype == dtype
    assert torch.equal(w, torch.ones(n, dtype=dtype))


@FUZZ
@given(data=st.data(), n=tasks)
def test_renormalize(data, n):
    w = data.draw(losses(n))  # any sign, zeros, NaN (documented: replaced by min_value)
    total = data.draw(st.sampled_from([1.0, float(n)]))
    out = F.renormalize(w, total)
    _finite(out)
    assert out.shape == (n,) and (out > 0).all()
    _sum_close(out, total)


@FUZZ
@given(data=st.data(), n=tasks)
def test_uncertainty_weights(data, n):
    log_vars = torch.tensor(data.draw(st.lists(st.floats(-30, 30), min_size=n, max_size=n)))
    flags = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)))
    w = F.uncertainty_weights(log_vars, flags)
    _finite(w)
    assert w.shape == (n,) and (w > 0).all()


@FUZZ
@given(data=st.data(), n=tasks)
def test_uncertainty_loss(data, n):
    values = data.draw(losses(n, bad=False))
    log_vars = torch.tensor(data.draw(st.lists(st.floats(-30, 30), min_size=n, max_size=n)))
    flags = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)))
    out = F.uncertainty_loss(values, log_vars, flags, data.draw(masks(n)))
    _finite(out)
    assert out.shape == ()


@FUZZ
@given(data=st.data(), n=tasks)
def test_dwa(data, n):
    previous, before = data.draw(losses(n)), data.draw(losses(n))
    temperature = data.draw(st.floats(0.05, 20.0))
    usable = bool((torch.isfinite(previous) & (previous > 0)).all()) and bool(
        (torch.isfinite(before) & (before > 0)).all()
    )
    w = documented_error(lambda: F.dwa(previous, before, temperature), allowed=not usable)
    if w is not None:
        _finite(w)
        assert w.shape == (n,) and (w >= 0).all()
        _sum_close(w, float(n))
    assert usable == (w is not None)  # documented: a ValueError for non-positive losses


@FUZZ
@given(data=st.data(), n=tasks)
def test_gradnorm_weight_grad(data, n):
    weights = F.renormalize(data.draw(positive(n)), float(n))
    norms = data.draw(losses(n, bad=False))  # norms >= 0, zeros included
    ratios = data.draw(losses(n, bad=False))
    alpha = data.draw(st.floats(0.0, 3.0))
    grad, loss = F.gradnorm_weight_grad(weights, norms, ratios, alpha, data.draw(masks(n)))
    _finite(grad, loss)
    assert grad.shape == (n,) and loss.shape == () and loss >= 0


@FUZZ
@given(
    n=tasks,
    gen=generators(),
    distribution=st.sampled_from(["normal", "uniform", "dirichlet"]),
)
def test_rlw(n, gen, distribution):
    w = F.rlw(n, gen, distribution=distribution)
    _finite(w)
    assert w.shape == (n,) and (w >= 0).all()
    _sum_close(w, 1.0)


LOG_PAIRS = {
    "gls": (F.gls_loss, F.gls_weights),
    "scale_invariant": (F.scale_invariant_loss, F.scale_invariant_weights),
}


@pytest.mark.parametrize(
    "fn", ["gls_loss", "gls_weights", "scale_invariant_loss", "scale_invariant_weights"]
)
@FUZZ
@given(data=st.data(), n=tasks)
def test_log_losses(fn, data, n):
    """Documented: a non-positive (or NaN) entry counts as absent; nothing is NaN."""
    values = data.draw(losses(n))
    present = data.draw(masks(n))
    out = getattr(F, fn)(values, present)
    _finite(out)
    usable = (torch.isfinite(values) & (values > 0)) & (
        torch.ones(n, dtype=torch.bool) if present is None else present
    )
    if fn.endswith("weights"):
        assert out.shape == (n,) and (out >= 0).all()
        assert (out[~usable] == 0).all()
    else:
        assert out.shape == ()


@FUZZ
@given(data=st.data(), n=tasks)
def test_imtl_l_loss(data, n):
    values = data.draw(losses(n, bad=False))
    scales = torch.tensor(data.draw(st.lists(st.floats(-30, 30), min_size=n, max_size=n)))
    out = F.imtl_l_loss(values, scales, data.draw(masks(n)))
    _finite(out)
    assert out.shape == ()


def _logits(data, n: int) -> torch.Tensor:
    return torch.tensor(data.draw(st.lists(st.floats(-30, 30), min_size=n, max_size=n)))


@pytest.mark.parametrize("fn", ["famo_loss", "famo_weights"])
@FUZZ
@given(data=st.data(), n=tasks)
def test_famo(fn, data, n):
    values, logits, present = data.draw(losses(n)), _logits(data, n), data.draw(masks(n))
    lower = data.draw(
        st.one_of(st.none(), st.just(torch.zeros(n)), st.just(torch.full((n,), -1.0)))
    )
    out = getattr(F, fn)(values, logits, lower, present)
    _finite(out)
    if fn == "famo_weights":  # documented: sum to 1 (0 when no task is usable)
        assert out.shape == (n,) and (out >= 0).all()
        assert float(out.sum()) == pytest.approx(1.0, rel=1e-4) or float(out.sum()) == 0.0


@FUZZ
@given(data=st.data(), n=tasks)
def test_famo_logit_grad(data, n):
    before, after = data.draw(losses(n)), data.draw(losses(n))
    delta = F.famo_logit_grad(_logits(data, n), before, after, None, data.draw(masks(n)))
    _finite(delta)
    assert delta.shape == (n,)
    scale = float(delta.abs().max()) + 1.0
    assert abs(float(delta.double().sum())) <= 1e-5 * scale  # documented: sums to 0


@FUZZ
@given(data=st.data(), n=tasks)
def test_softadapt(data, n):
    slopes = data.draw(losses(n, bad=False)) * torch.tensor(
        data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
    )
    beta = data.draw(st.floats(-10.0, 10.0))
    values = data.draw(st.one_of(st.none(), positive(n)))
    w = F.softadapt(slopes, beta, normalize=data.draw(st.booleans()), loss_values=values)
    _finite(w)
    assert w.shape == (n,) and (w >= 0).all()
    _sum_close(w, 1.0)


@FUZZ
@given(data=st.data(), n=tasks)
def test_relobralo(data, n):
    now, last, first = data.draw(losses(n)), data.draw(losses(n)), data.draw(losses(n))
    weights = F.renormalize(data.draw(positive(n)), float(n))
    rho = data.draw(st.sampled_from([0.0, 1.0]))
    alpha = data.draw(st.floats(0.0, 1.0))
    temperature = data.draw(st.floats(0.05, 20.0))
    usable = all(bool((torch.isfinite(x) & (x > 0)).all()) for x in (now, last, first))
    w = documented_error(
        lambda: F.relobralo(now, last, first, weights, rho, alpha, temperature),
        allowed=not usable,
    )
    assert usable == (w is not None)  # documented: a ValueError for non-positive losses
    if w is not None:
        _finite(w)
        assert w.shape == (n,) and (w >= 0).all()
        _sum_close(w, float(n))  # documented: sums to T when the previous weights do


@pytest.mark.parametrize("fn", ["stch_loss", "stch_weights"])
@FUZZ
@given(data=st.data(), n=tasks)
def test_stch(fn, data, n):
    logarithmic = data.draw(st.booleans())
    values = data.draw(losses(n))
    reference = data.draw(positive(n)) if logarithmic else data.draw(losses(n, bad=False))
    mu = data.draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    if not logarithmic:  # the raw differences must not overflow float32 / mu
        values = torch.where(torch.isfinite(values), values.clamp(-1e8, 1e8), values)
    out = getattr(F, fn)(
        values, reference, mu, logarithmic=logarithmic, present=data.draw(masks(n))
    )
    _finite(out)
    assert out.shape == ((n,) if fn == "stch_weights" else ())


# ---------------------------------------------------------------------------------- gradient
COEFFICIENT_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "mgda": F.mgda,
    "pcgrad": F.pcgrad,
    "cagrad": F.cagrad,
    "imtl_g": F.imtl_g,
    "nash_mtl": F.nash_mtl,
    "aligned_mtl": F.aligned_mtl,
    "upgrad": F.upgrad,
    "fairgrad": F.fairgrad,
    "con_fig": F.con_fig,
    "dual_proj": F.dual_proj,
}


def _options(name: str, data, n: int) -> dict[str, Any]:
    if name == "mgda":
        norm = data.draw(st.sampled_from(["none", "l2", "loss", "loss+"]))
        out: dict[str, Any] = {"normalization": norm}
        if norm in ("loss", "loss+"):
            out["losses"] = data.draw(positive(n))
        return out
    if name == "pcgrad":
        return {
            "reduction": data.draw(st.sampled_from(["sum", "mean"])),
            "generator": data.draw(generators()),
        }
    if name == "cagrad":
        return {
            "c": data.draw(st.floats(0.0, 2.0)),
            "rescale": data.draw(st.sampled_from([0, 1, 2])),
        }
    if name == "aligned_mtl":
        return {"scale_mode": data.draw(st.sampled_from(["min", "median", "rmse"]))}
    if name == "fairgrad":
        return {"alpha": data.draw(st.sampled_from([0.0, 0.25, 1.0, 2.0, 10.0]))}
    if name == "dual_proj":
        return {"preference": data.draw(st.one_of(st.none(), positive(n)))}
    return {}


def _check_coefficients(name: str, c: torch.Tensor, g: torch.Tensor, options: dict) -> None:
    n = g.shape[0]
    _finite(c)
    assert c.shape == (n,) and c.dtype == g.dtype
    if name in ("nash_mtl", "fairgrad"):
        assert (c > 0).all()
    if name == "imtl_g" and bool((g != 0).any(dim=1).all()):
        _sum_close(c, 1.0, rel=1e-3)  # documented: sum to 1 (for non-zero gradients)
    if name == "mgda" and options["normalization"] == "none":
        assert (c >= -1e-6).all()
        _sum_close(c, 1.0, rel=1e-3)
    if name == "dual_proj":  # documented: c >= p (the projected combination's weights)
        p = options.get("preference")
        p = torch.full((n,), 1.0 / n) if p is None else p
        assert (c.double() >= p.double() * (1 - 1e-6)).all()


@pytest.mark.parametrize("name", sorted(COEFFICIENT_FUNCTIONS))
@FUZZ
@given(data=st.data())
def test_coefficients_from_gradients(name, data):
    g = data.draw(gradients(bad=True))
    options = _options(name, data, g.shape[0])
    finite = bool(torch.isfinite(g).all())
    c = documented_error(lambda: COEFFICIENT_FUNCTIONS[name](g, **options), allowed=not finite)
    assert finite == (c is not None)  # documented: non-finite input raises
    if c is not None:
        _check_coefficients(name, c, g, options)


@pytest.mark.parametrize("name", sorted(COEFFICIENT_FUNCTIONS))
@FUZZ
@given(data=st.data())
def test_coefficients_from_gram(name, data):
    g = data.draw(gradients()).double()
    gram = F.gram_matrix(g)
    if data.draw(st.booleans()):  # also a Gram matrix not formed by gram_matrix (e.g. averaged)
        gram = 0.5 * (gram + F.gram_matrix(data.draw(gradients(n=g.shape[0])).double()))
    options = _options(name, data, g.shape[0])
    fn = getattr(F, f"{name}_from_gram")
    c = fn(gram, **options)
    _finite(c)
    assert c.shape == (g.shape[0],)
    if name in ("nash_mtl", "fairgrad"):
        assert (c > 0).all()


@FUZZ
@given(data=st.data())
def test_excess_mtl(data):
    g = data.draw(gradients(bad=True))
    n, size = g.shape
    weights = F.renormalize(data.draw(positive(n)), float(n)).to(g.dtype)
    seed = data.draw(st.integers(0, 2**16))
    acc = torch.rand(n, size, generator=torch.Generator().manual_seed(seed), dtype=g.dtype)
    acc = acc * 10.0 ** data.draw(exponents)
    initial = data.draw(positive(n)).to(g.dtype) * torch.tensor(
        data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n)), dtype=g.dtype
    )
    step = data.draw(st.sampled_from([0.0, 1e-3, 0.5, 10.0, 1e4]))
    present = data.draw(masks(n))
    finite = bool(torch.isfinite(g).all())
    out = documented_error(
        lambda: F.excess_mtl(weights, g, acc, initial, step, present), allowed=not finite
    )
    assert finite == (out is not None)  # documented: non-finite input raises
    if out is not None:
        w, new_acc, new_initial = out
        _finite(w, new_acc, new_initial)
        assert (w >= 0).all() and (new_acc >= acc).all() and (new_initial >= 0).all()
        _sum_close(w, float(n))  # documented: sums to T


@FUZZ
@given(data=st.data())
def test_moco(data):
    g = data.draw(gradients(bad=True))
    n = g.shape[0]
    tracked = data.draw(st.one_of(st.just(torch.zeros_like(g)), gradients(n=n)))
    if tracked.shape != g.shape:
        tracked = torch.zeros_like(g)
    tracked = tracked.to(g.dtype)
    weights = F.project_simplex(data.draw(positive(n)).double()).to(g.dtype)
    beta = data.draw(st.floats(0.0, 1.0))
    gamma = data.draw(st.sampled_from([0.0, 1e-3, 0.1, 10.0]))
    rho = data.draw(st.sampled_from([0.0, 0.1, 10.0]))
    finite = bool(torch.isfinite(g).all())
    out = documented_error(
        lambda: F.moco(tracked, weights, g, beta, gamma, rho, data.draw(masks(n))),
        allowed=not finite,
    )
    assert finite == (out is not None)
    if out is not None:
        y, lam = out
        _finite(y, lam)
        assert y.shape == g.shape and (lam >= 0).all()
        _sum_close(lam, 1.0)  # documented: on the simplex


@FUZZ
@given(data=st.data())
def test_lr_annealing(data):
    g = data.draw(gradients(bad=True))
    n = g.shape[0]
    weights = data.draw(positive(n)).to(g.dtype)
    reference = data.draw(st.integers(0, n - 1))
    finite = bool(torch.isfinite(g).all())
    out = documented_error(
        lambda: F.lr_annealing(
            weights,
            g,
            reference,
            data.draw(st.floats(0.0, 1.0)),
            data.draw(st.sampled_from(["max", "mean"])),
            data.draw(st.booleans()),
            data.draw(masks(n)),
        ),
        allowed=not finite,
    )
    assert finite == (out is not None)
    if out is not None:
        _finite(out)
        assert out.shape == (n,) and (out >= 0).all() and out[reference] == 1


@FUZZ
@given(data=st.data())
def test_gram_matrix(data):
    g = data.draw(gradients(bad=True))
    finite = bool(torch.isfinite(g).all())
    k = documented_error(lambda: F.gram_matrix(g), allowed=not finite)
    assert finite == (k is not None)
    if k is not None:
        _finite(k)
        assert k.shape == (g.shape[0],) * 2
        torch.testing.assert_close(k, k.T)
        assert (k.diagonal() >= 0).all()


@pytest.mark.parametrize("fn", ["gradvac", "gradvac_from_gram"])
@FUZZ
@given(data=st.data())
def test_gradvac(fn, data):
    g = data.draw(gradients())
    n = g.shape[0]
    targets = torch.tensor(
        data.draw(st.lists(st.floats(-1.0, 1.0), min_size=n * n, max_size=n * n)),
        dtype=torch.float64,
    ).reshape(n, n)
    beta = data.draw(st.floats(0.0, 1.0))
    source = g if fn == "gradvac" else F.gram_matrix(g)
    c, new = getattr(F, fn)(source, targets, beta, data.draw(generators()))
    _finite(c, new)
    assert c.shape == (n,) and new.shape == (n, n)
    assert (new.abs() <= 1.0 + 1e-9).all()


@FUZZ
@given(data=st.data())
def test_db_mtl(data):
    g = data.draw(gradients(bad=True))
    n = g.shape[0]
    values = data.draw(losses(n))
    ema = data.draw(st.one_of(st.none(), gradients(n=n).map(lambda e: e)))
    if ema is not None and ema.shape != g.shape:
        ema = None
    beta = data.draw(st.floats(0.0, 0.99))
    ok = bool(torch.isfinite(g).all()) and bool((torch.isfinite(values) & (values > 0)).all())
    out = documented_error(lambda: F.db_mtl(g, values, ema, beta), allowed=not ok)
    assert ok == (out is not None)
    if out is not None:
        d, new = out
        _finite(d, new)
        assert d.shape == (g.shape[1],) and new.shape == g.shape


@FUZZ
@given(data=st.data())
def test_graddrop(data):
    g = data.draw(gradients(bad=True))
    if data.draw(st.booleans()) and g.shape[1] % 2 == 0:  # a [T, B, D] representation
        g = g.reshape(g.shape[0], 2, -1)
    n = g.shape[0]
    leak = data.draw(
        st.one_of(
            st.floats(0.0, 1.0),
            st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n).map(torch.tensor),
        )
    )
    finite = bool(torch.isfinite(g).all())
    out = documented_error(lambda: F.graddrop(g, leak, data.draw(generators())), allowed=not finite)
    assert finite == (out is not None)
    if out is not None:
        _finite(out)
        assert out.shape == g.shape[1:]


# ---------------------------------------------------------------------------------- coverage
FUZZED = {
    "equal",
    "renormalize",
    "uncertainty_weights",
    "uncertainty_loss",
    "dwa",
    "gradnorm_weight_grad",
    "rlw",
    "gls_loss",
    "gls_weights",
    "scale_invariant_loss",
    "scale_invariant_weights",
    "imtl_l_loss",
    "famo_loss",
    "famo_weights",
    "famo_logit_grad",
    "softadapt",
    "relobralo",
    "stch_loss",
    "stch_weights",
    "gram_matrix",
    "gradvac",
    "gradvac_from_gram",
    "db_mtl",
    "graddrop",
    "excess_mtl",
    "moco",
    "project_simplex",
    "lr_annealing",
    "modo",
    "sdmgrad",
    "auto_lambda_grad",
    # weights over several learners (lightning_aw.fusion), not a registered method's twin
    "samme",
    "samme_alpha",
    "hedge",
    *COEFFICIENT_FUNCTIONS,
    *(f"{n}_from_gram" for n in COEFFICIENT_FUNCTIONS),
}


@pytest.mark.parametrize("fn", ["modo", "sdmgrad"])
@FUZZ
@given(data=st.data())
def test_multibatch_weights(fn, data):
    """The cross Gram matrix of two independent gradient draws (not symmetric, any sign, any
    scale): the new weights stay on the simplex; non-finite input is the documented error."""
    g1 = data.draw(gradients(bad=True)).double()
    n, p = g1.shape
    g2 = data.draw(gradients(n=n)).double()
    cross = g1 @ g2[:, :p].T if g2.shape[1] >= p else g1[:, : g2.shape[1]] @ g2.T
    start = data.draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
    weights = F.project_simplex(torch.tensor(start, dtype=torch.float64))
    if fn == "modo":
        kwargs = {"gamma": data.draw(st.floats(1e-3, 10.0)), "rho": data.draw(st.floats(0, 1))}
    else:
        kwargs = {
            "lam": data.draw(st.floats(0.0, 5.0)),
            "momentum": data.draw(st.floats(0.0, 0.9)),
            "niter": data.draw(st.integers(1, 5)),
            "normalize": data.draw(st.booleans()),
        }
    ok = bool(torch.isfinite(cross).all())
    out = documented_error(lambda: getattr(F, fn)(cross, weights, **kwargs), allowed=not ok)
    assert ok == (out is not None)
    if out is not None:
        _finite(out)
        assert out.shape == (n,) and (out >= 0).all()
        assert float(out.sum()) == pytest.approx(1.0, abs=1e-9)


@FUZZ
@given(data=st.data())
def test_auto_lambda_grad(data):
    g = data.draw(gradients(bad=True))
    d = data.draw(gradients(n=1)).to(g.dtype)[0]
    p = min(g.shape[1], d.shape[0])
    g, d = g[:, :p], d[:p]
    lr = data.draw(st.floats(1e-6, 1.0))
    out = F.auto_lambda_grad(g, d, lr)  # no documented error: a linear map
    assert out.shape == (g.shape[0],)
    if bool(torch.isfinite(g).all()):
        _finite(out)
        torch.testing.assert_close(out, -(lr * g.double() @ d.double()).to(out.dtype))


@FUZZ
@given(data=st.data())
def test_project_simplex(data):
    v = data.draw(gradients(n=1, bad=True))[0].double()
    ok = bool(torch.isfinite(v).all())
    out = documented_error(lambda: F.project_simplex(v), allowed=not ok)
    assert ok == (out is not None)
    if out is not None:
        _finite(out)
        assert (out >= 0).all() and float(out.sum()) == pytest.approx(1.0, abs=1e-9)
        # the largest entry keeps the most weight (the projection preserves the order)
        assert out[v.argmax()] == out.max()


#: the fusion functions (no registered method calls them)
FUSION = {"samme", "samme_alpha", "hedge"}


def test_every_functional_twin_is_fuzzed():
    assert set(F.__all__) == FUZZED
    assert set(METHOD_TWINS) == set(list_methods())
    assert {f for twins in METHOD_TWINS.values() for f in twins} == FUZZED - FUSION


@st.composite
def sample_weights(draw, n: int) -> torch.Tensor:
    """``[n]`` non-negative sample weights at any scale, with exact zeros (never all zero)."""
    w = draw(positive(n)).double()
    zeros = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask = torch.tensor(zeros)
    mask[draw(st.integers(0, n - 1))] = False  # at least one positive weight
    return torch.where(mask, torch.zeros_like(w), w).to(draw(st.sampled_from(DTYPES)))


DTYPES = [torch.float32, torch.float64]


@FUZZ
@given(data=st.data())
def test_samme(data):
    n = data.draw(st.integers(1, 40))
    w = data.draw(sample_weights(n))
    incorrect = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    k = data.draw(st.integers(2, 10))
    lr = data.draw(st.sampled_from([1e-3, 0.5, 1.0, 2.0]))
    new, alpha, error = F.samme(w, incorrect, k, lr)
    _finite(new, alpha, error)
    assert new.shape == w.shape and new.dtype == w.dtype
    assert (new >= 0).all() and ((new > 0) == (w > 0)).all()  # zero weights stay zero
    _sum_close(new, 1.0)
    assert 0.0 <= float(error) <= 1.0 and float(alpha) >= 0.0
    chance = 1.0 - 1.0 / k
    if 0 < float(error) < chance:  # a boosting step: the misclassified gain weight
        # against scikit-learn's normalised weights, positive ones raised to machine epsilon
        ref = (w / w.sum()).clamp_min(torch.finfo(w.dtype).eps) * (w > 0)
        up, down = incorrect & (w > 0), ~incorrect & (w > 0)
        if up.any() and down.any():
            ratio = (new[up] / ref[up]).min() / (new[down] / ref[down]).max()
            assert float(ratio) >= 1.0 - 1e-3


@FUZZ
@given(data=st.data())
def test_samme_alpha(data):
    n = data.draw(st.integers(1, 8))
    e = torch.tensor(data.draw(st.lists(st.floats(-0.5, 1.5), min_size=n, max_size=n)))
    e = e.to(data.draw(st.sampled_from(DTYPES)))
    k = data.draw(st.integers(2, 10))
    ok = bool(((e >= 0) & (e <= 1)).all())
    out = documented_error(lambda: F.samme_alpha(e, k), allowed=not ok)
    assert ok == (out is not None)
    if out is not None:
        _finite(out)
        assert (out >= 0).all()
        assert (out[e >= 1 - 1 / k] == 0).all() and (out[e == 0] == 1).all()


@FUZZ
@given(data=st.data())
def test_hedge(data):
    n = data.draw(tasks)
    w = data.draw(sample_weights(n))
    ell = data.draw(losses(n)).to(w.dtype)
    eta = data.draw(st.sampled_from([0.0, 1e-3, 0.5, 10.0]))
    ok = bool(torch.isfinite(ell).all())
    out = documented_error(lambda: F.hedge(w, ell, eta), allowed=not ok)
    assert ok == (out is not None)
    if out is not None:
        _finite(out)
        assert ((out > 0) <= (w > 0)).all()  # a zero weight stays zero
        _sum_close(out, 1.0)
