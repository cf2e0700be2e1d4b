"""2-process DDP on CPU (gloo): every rank holds identical weights, method state and parameters.

All the cases run in one launch of ``ddp_script.py`` (the session's ``ddp_results`` fixture);
the tests here read its per-rank result files:

- ``test_ddp_matrix``: every registered method, built from its registry ``example_kwargs``, in
  two configurations, 32-true and bf16-mixed with ``accumulate_grad_batches=2`` and clipping.
  Test ids are ``<method>-<config>`` (``benchmarks/reliability_table.py`` reads them).
- ``test_ddp_variant``: the configurations ``ddp_script.VARIANTS`` adds (another interval,
  source or ``ddp_sync``, an unseeded RLW, an unmarked representation), in 32-true.

The ranks see different data, task "c" is absent from rank 1's odd batches and each rank's global
generator differs, so weights or state that were not reduced (or broadcast) over the ranks would
differ.
"""

from __future__ import annotations

import pytest
import torch
from ddp_script import CONFIGS, VARIANTS, Fit

from lightning_aw.registry import get_method, list_methods

#: methods whose weights are constant by design (no movement to check)
CONSTANT = {"equal", "graddrop"}


def _total(name: str) -> float | None:
    total = get_method(name).total
    return None if total is None else 3.0 if total == "T" else float(total)


def _assert_same_on_both_ranks(r0: dict, r1: dict) -> None:
    """The method's state (all of it, and its public views) and the model's parameters are
    bitwise identical on the two ranks; finite, but for the state, which may hold infinite
    sentinels (e.g. "no loss seen yet"), and is only free of NaN. (Diagnostics may be rank-local,
    e.g. GradNorm's own loss: only the fallback counts are checked, zero on both ranks.)"""
    for part in ("state", "public", "params"):
        assert r0[part].keys() == r1[part].keys(), part
        for k, v in r0[part].items():
            torch.testing.assert_close(r1[part][k], v, rtol=0, atol=0, msg=f"{part}: {k}")
            if not v.is_floating_point():
                continue
            if part == "state":
                assert not torch.isnan(v).any(), f"{part}: {k}"
            else:
                assert torch.isfinite(v).all(), f"{part}: {k}"
    for r in (r0, r1):  # no step fell back to the plain sum
        for k, v in r["diagnostics"].items():
            if k.endswith("fallbacks"):
                assert v == 0, k


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("name", "config"),
    [pytest.param(n, c, id=f"{n}-{c}") for n in list_methods() for c in CONFIGS],
)
def test_ddp_matrix(ddp_results, name, config):
    r0, r1 = ddp_results.load(f"matrix/{name}-{config}")
    steps = 2 * 4 if config == "32" else 2 * 2  # 64 samples per rank, batch 16, 2 epochs
    assert r0["global_step"] == r1["global_step"] == steps
    # the weights applied after every optimizer step (the batch that ends a window)
    for r in (r0, r1):
        ends = torch.cat([r["steps"][:1] != 0, r["steps"][1:] != r["steps"][:-1]])
        r["weights"] = r["applied"][ends]
    assert r0["weights"].shape == (steps, 3)
    torch.testing.assert_close(r0["weights"], r1["weights"], rtol=0, atol=0)
    for which in ("raw", "applied"):  # after every batch, before the transforms and as applied
        torch.testing.assert_close(r0[which], r1[which], rtol=0, atol=0, msg=which)
    torch.testing.assert_close(r0["final"], r1["final"], rtol=0, atol=0)
    assert torch.isfinite(r0["weights"]).all() and torch.isfinite(r0["final"]).all()
    total = _total(name)
    if total is not None:
        torch.testing.assert_close(
            r0["weights"].sum(1), torch.full((steps,), total), rtol=0, atol=1e-5
        )
    if name not in CONSTANT:  # the weights did move (DWA's at the last epoch end), so the
        # equality above means something
        trajectory = torch.cat([r0["weights"], r0["final"][None]])
        assert not torch.allclose(trajectory, trajectory[0]), trajectory
    _assert_same_on_both_ranks(r0, r1)


@pytest.mark.ddp
@pytest.mark.parametrize(("variant", "fit"), VARIANTS.items(), ids=list(VARIANTS))
def test_ddp_variant(ddp_results, variant: str, fit: Fit):
    r0, r1 = ddp_results.load(f"variant/{variant}")
    steps = fit.epochs * fit.samples // 2 // 16  # batch 16 on each rank, no accumulation
    assert r0["global_step"] == r1["global_step"] == steps
    for which in ("raw", "applied"):  # the weights after every step
        assert r0[which].shape == (steps, 3)
        torch.testing.assert_close(r0[which], r1[which], rtol=0, atol=0, msg=which)
        assert torch.isfinite(r0[which]).all()
    torch.testing.assert_close(r0["initial"], r1["initial"], rtol=0, atol=0)
    torch.testing.assert_close(r0["final"], r1["final"], rtol=0, atol=0)
    total = _total(fit.method)
    if total is not None:
        torch.testing.assert_close(
            r0["applied"].sum(1), torch.full((steps,), total), atol=1e-5, rtol=0
        )
        # and not the uniform weights
        assert not torch.allclose(r0["final"], torch.full((3,), total / 3))
    # the weights moved, so the equality above means something
    assert not torch.allclose(r0["applied"], r0["applied"][0])
    _assert_same_on_both_ranks(r0, r1)
