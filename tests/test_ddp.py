"""2-process DDP on CPU (gloo): every rank holds identical weights and parameters.

``test_ranks_hold_identical_weights_and_parameters`` runs a few configurations of the first
methods (``ddp_script.py``); ``test_ddp_matrix`` runs every registered method in two
configurations, 32-true and bf16-mixed with ``accumulate_grad_batches=2`` and clipping, all in
one launch (``ddp_matrix_script.py``). Test ids of the matrix are ``<method>-<config>``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import run_ddp_script

from lightning_aw.registry import get_method, list_methods

SCRIPT = Path(__file__).with_name("ddp_script.py")
MATRIX_SCRIPT = Path(__file__).with_name("ddp_matrix_script.py")
METHODS = [
    "dwa", "dwa-step", "gradnorm", "uncertainty",
    "mgda", "pcgrad", "upgrad-gradients", "gradvac-representation",
]
MATRIX_CONFIGS = ("32", "bf16acc2")
#: methods whose weights are constant by design (no movement to check)
CONSTANT = {"equal", "graddrop"}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_ddp_script(SCRIPT, out, METHODS)
    return out


@pytest.mark.ddp
@pytest.mark.parametrize("method", METHODS)
def test_ranks_hold_identical_weights_and_parameters(ddp_run, method):
    r0 = torch.load(ddp_run / f"{method}-rank0.pt", weights_only=True)
    r1 = torch.load(ddp_run / f"{method}-rank1.pt", weights_only=True)
    assert r0["global_step"] == r1["global_step"] == 3 * 8  # 128 samples per rank, batch 16
    torch.testing.assert_close(r0["weights"], r1["weights"], rtol=0, atol=0)
    assert torch.isfinite(r0["weights"]).all()
    assert r0["weights"].shape == (24, 3)  # the weights after every step
    assert not torch.allclose(r0["weights"], torch.ones_like(r0["weights"]))  # they moved
    for k, v in r0["params"].items():
        torch.testing.assert_close(r1["params"][k], v, rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def ddp_matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_matrix")
    try:
        run_ddp_script(MATRIX_SCRIPT, out, list_methods(), timeout=420)
    except AssertionError as err:  # reported per cell below, with the failing method's error
        return out, str(err)
    return out, None


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("name", "config"),
    [pytest.param(n, c, id=f"{n}-{c}") for n in list_methods() for c in MATRIX_CONFIGS],
)
def test_ddp_matrix(ddp_matrix, name, config):
    out, failure = ddp_matrix
    errors = sorted(out.glob(f"{name}-{config}-rank*.err"))
    assert not errors, errors[0].read_text()[-3000:]
    files = [out / f"{name}-{config}-rank{r}.pt" for r in (0, 1)]
    assert all(f.exists() for f in files), f"no result (the job stopped before it): {failure}"
    r0, r1 = (torch.load(f, weights_only=True) for f in files)
    steps = 2 * 4 if config == "32" else 2 * 2  # 64 samples per rank, batch 16, 2 epochs
    assert r0["global_step"] == r1["global_step"] == steps
    assert r0["weights"].shape == (steps, 3)  # the weights after every optimizer step
    torch.testing.assert_close(r0["weights"], r1["weights"], rtol=0, atol=0)
    torch.testing.assert_close(r0["final"], r1["final"], rtol=0, atol=0)
    assert torch.isfinite(r0["weights"]).all() and torch.isfinite(r0["final"]).all()
    total = get_method(name).total
    if total is not None:
        expected = 3.0 if total == "T" else float(total)
        torch.testing.assert_close(
            r0["weights"].sum(1), torch.full((steps,), expected), rtol=0, atol=1e-5
        )
    if name not in CONSTANT:  # the weights did move (DWA's at the last epoch end), so the
        # equality above means something
        trajectory = torch.cat([r0["weights"], r0["final"][None]])
        assert not torch.allclose(trajectory, trajectory[0]), trajectory
    for k, v in r0["params"].items():
        assert torch.isfinite(v).all(), k
        torch.testing.assert_close(r1["params"][k], v, rtol=0, atol=0, msg=k)
