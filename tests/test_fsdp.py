"""Sharded training: FSDP2 (Lightning's ``ModelParallelStrategy``) gives DDP's run, or a clear
refusal before the first step.

``test_fsdp_equals_ddp`` and ``test_fsdp_refused`` read the results of ONE 2-process CPU launch of
``fsdp_script.py`` (the session's ``fsdp_results`` fixture): every registered method (gradient
methods in both sources, a few unmarked-representation and unsharded-between-passes variants),
trained with the same seeds and global batch under DDP and under FSDP2 (``fully_shard`` on the
trunk, each head and the module). The other tests need no launch.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fsdp_script import REFUSED, cases
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_aw import MGDA, GradNorm
from lightning_aw._sharding import check_parameter_gradients
from lightning_aw.engine import TaskGradients
from lightning_aw.step import StepRecord

#: methods whose weights are constant by design
CONSTANT = {"equal", "graddrop"}
COMPARED = [name for name in cases() if name not in REFUSED]
#: cases whose weights are rank-local by design (DB-MTL's representation-source EMA: each rank's
#: representation holds other samples), compared with the same rank's DDP weights only
RANK_LOCAL_WEIGHTS = {"db_mtl-representation"}
STEPS = 8  # 2 epochs of 4 steps


@pytest.mark.ddp
@pytest.mark.parametrize("case", COMPARED)
def test_fsdp_equals_ddp(fsdp_results, case: str):
    """Weights after every step, the weights before the first and at the end, and the full
    parameters (gathered from the shards) equal DDP's; both ranks hold identical ones."""
    r0, r1 = fsdp_results.load(case)
    sharded = (r0["fsdp"], r1["fsdp"])
    for r in (r0, r1):
        ddp, fsdp = r["ddp"], r["fsdp"]
        assert ddp["global_step"] == fsdp["global_step"] == STEPS
        assert fsdp["applied"].shape == (STEPS, 3)
        for key in ("applied", "initial", "final"):
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)
        assert fsdp["params"].keys() == ddp["params"].keys()
        for k, v in ddp["params"].items():
            torch.testing.assert_close(fsdp["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)
            assert torch.isfinite(fsdp["params"][k]).all(), k
    for key in ("applied", "initial", "final"):
        if case not in RANK_LOCAL_WEIGHTS:
            torch.testing.assert_close(sharded[1][key], sharded[0][key], rtol=0, atol=0, msg=key)
    for k, v in sharded[0]["params"].items():
        torch.testing.assert_close(sharded[1]["params"][k], v, rtol=0, atol=0, msg=k)
    if cases()[case].method not in CONSTANT:  # the weights moved: the equality means something
        trajectory = torch.cat([sharded[0]["applied"], sharded[0]["final"][None]])
        assert not torch.allclose(trajectory, trajectory[0]), trajectory


@pytest.mark.ddp
@pytest.mark.parametrize("case", list(REFUSED))
def test_fsdp_refused(fsdp_results, case: str):
    """What cannot be supported is refused before the first step, naming the strategy, the
    method and what to do instead."""
    r0, r1 = fsdp_results.load(case)
    kind, words = REFUSED[case]
    for r in (r0, r1):
        assert r["error_type"] == kind, r["error"]
        for word in words:
            assert word in r["error"], (word, r["error"])


def _step(losses: torch.Tensor) -> StepRecord:
    n = losses.numel()
    return StepRecord(
        tasks=tuple("abc"[:n]),
        losses=losses,
        task_losses=tuple(losses),
        present=torch.ones(n, dtype=torch.bool),
        present_list=(True,) * n,
        batch=None,
        batch_idx=0,
        representation=None,
        representation_graph=None,
        trainer=None,
    )


def test_guard_missing_task_gradient():
    """A present task whose loss reaches none of the parameters (what autograd returned for
    FSDP2's sharded parameters before the engine resolved them) is an error, not a zero row
    and silently uniform coefficients."""
    w = torch.ones(3, requires_grad=True)
    other = torch.ones(3, requires_grad=True)
    losses = torch.stack([other.sum(), (other * 2).sum()])  # neither reaches w
    engine = TaskGradients(_step(losses), MGDA())
    with pytest.raises(MisconfigurationException, match="task 'a' on the shared parameters"):
        engine.on_parameters_scaled([w])
    engine = TaskGradients(_step(other.sum().reshape(1)), GradNorm())
    with pytest.raises(MisconfigurationException, match="task 'a' does not reach the layer"):
        engine.layer_norms(w)


def test_fsdp1_refused_for_parameter_gradients():
    """FSDP1 (flat parameters, CUDA only) is refused for the methods that take per-task
    gradients on parameters, with what to do instead."""
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy.*source='representation'"):
        check_parameter_gradients(MGDA(), trainer, "shared_parameters()", "source='representation'")
    check_parameter_gradients(MGDA(), SimpleNamespace(strategy=None), "x", "y")  # no error
