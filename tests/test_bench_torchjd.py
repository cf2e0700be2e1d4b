"""`benchmarks/bench_torchjd.py`: its Lightning rows train, and it exits cleanly without torchjd.

torchjd is not a dependency: the tests that call it skip when it (or quadprog) is missing.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_aw.datasets import make_two_digits

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_torchjd.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_torchjd", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_torchjd_it_says_so_and_exits(bench, monkeypatch, capsys):
    for name in ("torchjd", "torchjd.aggregation", "torchjd.autojac", "torchjd.linalg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    assert bench.main(["--rounds", "1", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("torchjd is not installed")
    assert "nothing to compare" in out


def test_the_manual_plain_sum_module_takes_adam_steps_on_the_summed_loss(bench):
    # one step of the manual-optimization baseline against the same step written by hand
    torch.manual_seed(0)
    x, y = make_two_digits(16, seed=3)
    module = bench._ManualModule(None)
    ref = copy.deepcopy(module)
    pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
    h = ref.trunk(x)
    total = (
        F.cross_entropy(ref.heads["left"](h), y[:, 0])
        + F.cross_entropy(ref.heads["right"](h), y[:, 1])
        + (ref.heads["sum"](h)[:, 0] - y[:, 2].float()).pow(2).mean()
    )
    params = list(ref.parameters())
    grads = torch.autograd.grad(total, params)
    # Adam's first step (bias-corrected moments g and g^2): p - lr * g / (|g| + eps)
    for before, g, after in zip(params, grads, module.parameters(), strict=True):
        expected = before.detach() - 2e-3 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after.detach(), expected, atol=1e-6, rtol=0)


def test_every_lightning_row_trains_and_keeps_no_task_matrix(bench):
    data = torch.utils.data.TensorDataset(*make_two_digits(48))
    for make_module in (bench._Metricless, lambda: bench._ManualModule(None)):
        run = bench._lightning(lambda: [], make_module)
        out = run(3, 16, data, torch.device("cpu"), 3 * 1000)
        assert len(out["times"]) == 3 and all(t > 0 for t in out["times"])
        assert out["trained"] and out["kept"] == []


@pytest.fixture(scope="module")
def jd(bench):
    pytest.importorskip("torchjd", reason="torchjd is optional")
    loaded = bench._load_torchjd()
    if isinstance(loaded, str):
        pytest.skip(loaded)
    return loaded


def test_torchjd_inside_lightning_gives_the_loop_s_gradient_and_trains(bench, jd):
    lines = bench.agreement(jd, 16, torch.device("cpu"))  # raises when they differ
    assert lines[-1].startswith("torchjd UPGrad() in a Trainer (manual optimization)")
    data = torch.utils.data.TensorDataset(*make_two_digits(48))
    out = bench._lightning(lambda: [], lambda: bench._ManualModule(jd))(
        3, 16, data, torch.device("cpu"), 3 * 1000
    )
    assert out["trained"]
    assert out["kept"] == []  # jac_to_grad released the trunk's .jac
