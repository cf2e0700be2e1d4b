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
from fsdp_script import REFUSED, RESUMED, cases
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_aw import MGDA, GradNorm
from lightning_aw._sharding import check_parameter_gradients
from lightning_aw.engine import TaskGradients
from lightning_aw.registry import get_method
from lightning_aw.step import StepRecord

#: methods whose weights are constant by design
CONSTANT = {"equal", "graddrop"}
#: mixed-precision cases (``mp/``: FSDP2's MixedPrecisionPolicy, ``bf16/``: bf16-mixed)
MIXED = [name for name in cases() if name.startswith(("mp/", "bf16/"))]
COMPARED = [name for name in cases() if name not in REFUSED and name not in MIXED]
#: cases whose weights are rank-local by design (DB-MTL's representation-source EMA: each rank's
#: representation holds other samples), compared with the same rank's DDP weights only
RANK_LOCAL_WEIGHTS = {"db_mtl-representation"}
STEPS = 8  # 2 epochs of 4 steps
HALF = STEPS // 2  # the steps before the checkpoint of the resumed cases


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
    """What cannot be supported is refused before the first step (an absent task: at the first
    step that has one), naming the strategy, the method or the task, and what to do instead."""
    r0, r1 = fsdp_results.load(case)
    kind, words = REFUSED[case]
    for r in (r0, r1):
        assert r["error_type"] == kind, r["error"]
        for word in words:
            assert word in r["error"], (word, r["error"])


@pytest.mark.ddp
@pytest.mark.parametrize("case", RESUMED)
def test_fsdp_resume_equals_uninterrupted(fsdp_results, case: str):
    """Crash-and-resume under FSDP2: the run saved a distributed checkpoint (a directory) at the
    end of its first epoch; a new Trainer, model and method resumed from it to the end. The
    weights before and after every resumed step, the final weights, the full parameters and the
    method's state equal the uninterrupted run's, exactly, on both ranks."""
    r0, r1 = fsdp_results.load(case)
    for r in (r0, r1):
        full, resumed = r["fsdp"], r["resumed"]
        assert resumed["checkpoint_is_dir"]
        assert resumed["global_step"] == full["global_step"] == STEPS
        assert resumed["applied"].shape == (STEPS - HALF, 3)
        for key in ("before", "applied"):
            torch.testing.assert_close(resumed[key], full[key][HALF:], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(resumed["final"], full["final"], rtol=0, atol=0)
        assert resumed["params"].keys() == full["params"].keys()
        for k, v in full["params"].items():
            torch.testing.assert_close(resumed["params"][k], v, rtol=0, atol=0, msg=k)
        assert resumed["state"].keys() == full["state"].keys()
        for k, v in full["state"].items():
            assert resumed["state"][k].dtype == v.dtype, k
            torch.testing.assert_close(resumed["state"][k], v, rtol=0, atol=0, msg=k)
    for key in ("before", "applied", "final"):
        torch.testing.assert_close(r1["resumed"][key], r0["resumed"][key], rtol=0, atol=0)
    for k, v in r0["resumed"]["params"].items():
        torch.testing.assert_close(r1["resumed"]["params"][k], v, rtol=0, atol=0, msg=k)
    # the weights moved in the resumed half, so the equality above means something
    resumed = r0["resumed"]
    trajectory = torch.cat([resumed["before"], resumed["applied"], resumed["final"][None]])
    assert not torch.allclose(trajectory, trajectory[0]), trajectory


#: Mixed precision against DDP bf16-mixed. ``bf16/`` runs DDP's autocast ops on the unsharded
#: fp32 parameters, and ``mp/`` computes in bf16 what autocast computes in bf16 (the forward, the
#: gradients of the bf16 parameters): both give DDP's run to the fp32 cases' tolerance (measured:
#: identical). The exception is a gradient method's parameter source under ``mp/``: its update,
#: combined in float32, is delivered into the bf16 unsharded parameters, so it is rounded to bf16
#: (relative 2^-9) before FSDP2's fp32 reduction, where DDP keeps it in float32. The weights then
#: differ by a few 1e-4 (measured 2.6e-4, tolerance 1e-3); a parameter coordinate whose combined
#: gradient is near 0 (MGDA cancels the tasks' gradients) can take a different Adam step, which is
#: up to the learning rate (measured: one coordinate of 435 by 1.0e-2, the mean 8e-5), hence a
#: per-coordinate bound of 2 x lr and a mean bound of 1e-3.
EXACT_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
ROUNDED_UPDATE = {"mp/mgda-parameters"}


@pytest.mark.ddp
@pytest.mark.parametrize("case", MIXED)
def test_fsdp_mixed_precision(fsdp_results, case: str):
    """bf16 under FSDP2, by its own MixedPrecisionPolicy (bf16 parameters in the forward, fp32
    reduction) or by Lightning's ``precision="bf16-mixed"``: finite weights with the documented
    total, parameters finite and moved, and close to the DDP bf16-mixed run; both ranks equal."""
    r0, r1 = fsdp_results.load(case)
    rounded = case in ROUNDED_UPDATE
    weight_tol = {"rtol": 0.0, "atol": 1e-3} if rounded else EXACT_TOLERANCE
    total = get_method(cases()[case].method).cls.total
    for r in (r0, r1):
        ddp, fsdp = r["ddp"], r["fsdp"]
        assert ddp["global_step"] == fsdp["global_step"] == STEPS
        # both runs computed the trunk in bf16 (the comparison is bf16 against bf16)
        assert ddp["compute_dtype"] == fsdp["compute_dtype"] == "torch.bfloat16"
        weights = torch.cat([fsdp["before"], fsdp["applied"], fsdp["final"][None]])
        assert torch.isfinite(weights).all()
        if total is not None:
            expected = torch.full((weights.shape[0],), 3.0 if total == "T" else float(total))
            torch.testing.assert_close(weights.sum(dim=1), expected)
        assert not torch.allclose(weights, weights[0]), weights
        for key in ("before", "applied", "final"):
            torch.testing.assert_close(fsdp[key], ddp[key], **weight_tol, msg=key)
        diffs = []
        for k, v in ddp["params"].items():
            got = fsdp["params"][k]
            assert got.dtype == torch.float32 and torch.isfinite(got).all(), k
            if k in fsdp["start"]:  # (the weighting's own parameters are attached in fit)
                assert not torch.equal(got, fsdp["start"][k]), k  # it trained
            if rounded:
                diffs.append((got - v).abs().flatten())
            else:
                torch.testing.assert_close(got, v, **EXACT_TOLERANCE, msg=k)
        if rounded:
            lr = 0.01  # Adam's, in fsdp_script.fit
            assert torch.cat(diffs).max() <= 2 * lr and torch.cat(diffs).mean() <= 1e-3
    for key in ("applied", "final"):
        torch.testing.assert_close(r1["fsdp"][key], r0["fsdp"][key], rtol=0, atol=0, msg=key)
    for k, v in r0["fsdp"]["params"].items():
        torch.testing.assert_close(r1["fsdp"]["params"][k], v, rtol=0, atol=0, msg=k)


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
