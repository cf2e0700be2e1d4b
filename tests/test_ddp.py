"""2-process DDP on CPU (gloo): every rank holds identical weights and parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_script.py")
METHODS = [
    "dwa", "dwa-step", "gradnorm", "uncertainty",
    "mgda", "pcgrad", "upgrad-gradients", "gradvac-representation",
]


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
