"""The examples reproduce the papers' findings (quick settings, a few seconds each).

Each example's ``main(argv)`` runs with small sizes in this process (``--jobs 1``) and its key
finding is checked against an independent reference where there is one: a hand-written Δm%,
the true noise levels, the known ordering of GradNorm's weights, the chance accuracy.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_aw.registry import get_method, list_methods

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODULES = (
    "_common",
    "boosting_quantiles",
    "digits_table",
    "gradnorm_toy",
    "mmoe_synthetic",
    "pareto_toy",
    "scenes",
    "stress_scales",
    "uncertainty_noise",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _example(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    """The scalars of the run's only version (``run_dir/version_0``)."""
    (version,) = run_dir.glob("version_*")
    acc = EventAccumulator(str(version))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check_png(path: Path | None) -> None:
    assert path is not None and path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size < 150_000  # commit-friendly


# ----------------------------------------------------------------------------- (b) GradNorm toy
def test_gradnorm_toy_weights_order_inversely_to_sigma_and_sum_to_t(tmp_path):
    toy = _example("gradnorm_toy")
    sigmas = [1.0, 2.0, 4.0, 8.0]
    out = toy.main(
        [
            "--sigmas",
            *map(str, sigmas),
            "--steps",
            "150",
            "--num-train",
            "2000",
            "--num-test",
            "500",
            "--jobs",
            "1",
            "--logdir",
            str(tmp_path),
        ]
    )
    weights = out["weights"]
    # the paper's finding: larger scale -> smaller weight (strictly, for every pair)
    assert all(weights[i] > weights[i + 1] for i in range(len(sigmas) - 1)), weights
    assert weights[0] > 1.0 > weights[-1]
    # sum to T at every step, not just at the end
    assert len(out["weight_sums"]) == 150
    assert all(abs(s - len(sigmas)) < 1e-4 for s in out["weight_sums"])
    # equal weighting really used weight 1 throughout
    assert all(w == [1.0] * 4 for w in out["runs"]["none"]["weights"])
    _check_png(out["png"])
    logged = _scalars(tmp_path / "gradnorm_toy" / "gradnorm" / "seed0")
    assert {"weights/task0", "weights/task3", "test_ratio/task0"} <= set(logged)
    assert logged["weights/task0"][-1] > logged["weights/task3"][-1]
    # the test-loss ratios fell from 1 for every task, with both methods
    assert all(0.0 < r < 1.0 for r in out["ratios"]["gradnorm"] + out["ratios"]["none"])


# ------------------------------------------------------------------------ (c) noise recovery
def test_uncertainty_weighting_recovers_the_noise_levels(tmp_path):
    ex = _example("uncertainty_noise")
    noise = [1.0, 10.0]
    out = ex.main(
        [
            "--noise",
            *map(str, noise),
            "--steps",
            "1200",
            "--num-train",
            "4000",
            "--num-test",
            "2000",
            "--uw-lr",
            "0.05",
            "--logdir",
            str(tmp_path),
        ]
    )
    for learnt, true, resid in zip(out["learnt"], noise, out["residual"], strict=True):
        assert learnt == pytest.approx(true, rel=0.1)
        assert resid == pytest.approx(true, rel=0.1)  # the network did fit the signal
    # it started at sigma = 1 for both: task 1's sigma really was learnt
    assert out["history"][0][1] < 2.0 < 8.0 < out["history"][-1][1]
    logged = _scalars(tmp_path / "uncertainty_noise" / "seed0")
    log_var = logged["uncertainty/log_var/task1"][-1]
    assert math.exp(0.5 * log_var) == pytest.approx(10.0, rel=0.15)
    _check_png(out["png"])


# --------------------------------------------------------------------------- (d) Pareto toy
def test_pareto_toy_paths_end_nearer_the_front(tmp_path):
    ex = _example("pareto_toy")
    out = ex.main(
        [
            "--methods",
            "mgda",
            "famo",
            "--num-starts",
            "2",
            "--steps",
            "300",
            "--jobs",
            "1",
            "--logdir",
            str(tmp_path),
        ]
    )
    assert len(out["results"]) == 4
    for res in out["results"]:
        assert len(res["path"]) > 2
        assert res["final_distance"] < res["start_distance"], (res["method"], res["start"])
        assert res["path"][0] == pytest.approx(list(ex.STARTS[res["start"]]))
    _check_png(out["png"])
    logged = _scalars(tmp_path / "pareto_toy" / "famo" / "start1")
    assert {"loss/L1", "loss/L2", "weights/L1"} <= set(logged)


def test_pareto_front_is_non_dominated_and_matches_the_formula():
    ex = _example("pareto_toy")
    front = ex.pareto_front(50)
    # along x1 = -7 .. 7 one loss falls while the other rises: no point dominates another
    assert bool((front[1:, 0] < front[:-1, 0]).all() and (front[1:, 1] > front[:-1, 1]).all())
    # at x = (7, -8): g1 = -20, c2 = tanh(4), c1 = 0 (hand computation)
    losses = ex.toy_losses(torch.tensor([7.0, -8.0], dtype=torch.float64))
    assert losses[0].item() == pytest.approx(0.1 * math.tanh(4.0) * -20.0)
    assert losses[1].item() == pytest.approx(math.tanh(4.0) * ((14.0**2) / 10 - 20))


# ----------------------------------------------------------------------- (e) badly scaled
def test_stress_scales_plain_sum_at_chance_adaptive_recovers(tmp_path):
    ex = _example("stress_scales")
    out = ex.main(
        [
            "--methods",
            "none",
            "uncertainty",
            "scale_invariant",
            "--seeds",
            "0",
            "--epochs",
            "40",
            "--jobs",
            "1",
            "--no-reference",
            "--logdir",
            str(tmp_path),
        ]
    )
    chance = out["chance"]
    assert chance == pytest.approx(21 / 54)  # 21 of the 54 held-out wines are cultivar 1
    none = out["results"]["none"][0]
    assert none["error"] is None
    assert none["accuracy"] <= chance + 0.1
    for method in ("uncertainty", "scale_invariant"):
        run = out["results"][method][0]
        assert run["error"] is None and run["accuracy"] >= 0.85, run
    logged = _scalars(tmp_path / "stress_scales" / "uncertainty" / "seed0")
    assert {"loss/cultivar", "loss/proline", "weights/proline"} <= set(logged)
    # the regression's weight fell far below the classification's (1/(2 sigma^2) vs 1/sigma^2)
    assert logged["weights/proline"][-1] < 1e-3 * logged["weights/cultivar"][-1]


def test_parallel_runs_match_sequential_runs(tmp_path):
    """The default ``--jobs 2`` path (spawned workers) gives the same runs as one process."""
    ex = _example("stress_scales")
    common = _example("_common")
    specs = [
        {"method": m, "seed": 0, "epochs": 2, "lr": 0.01, "logdir": None}
        for m in ("none", "uncertainty")
    ]
    parallel = common.run_parallel(ex.run_one, specs, jobs=2)
    sequential = common.run_parallel(ex.run_one, specs, jobs=1)
    for par, seq in zip(parallel, sequential, strict=True):
        assert par["error"] is None and seq["error"] is None
        assert (par["method"], par["accuracy"], par["mae"]) == (
            seq["method"],
            seq["accuracy"],
            seq["mae"],
        )


# ---------------------------------------------------------------------- (a) results table
def test_digits_table_has_every_method_and_finite_delta(tmp_path):
    ex = _example("digits_table")
    md = tmp_path / "results.md"
    out = ex.main(
        [
            "--train-pairs",
            "256",
            "--val-pairs",
            "128",
            "--epochs",
            "1",
            "--seeds",
            "0",
            "--jobs",
            "1",
            "--logdir",
            str(tmp_path),
            "--out",
            str(md),
        ]
    )
    expected = {"single-task", "none", *list_methods()}
    assert set(out["rows"]) == expected
    text = md.read_text()
    for method in expected:
        assert f"| {method} |" in text
    base = out["baselines"]
    for method, row in out["rows"].items():
        (delta,) = row["delta"]
        assert math.isfinite(delta), method
        if method == "single-task":
            continue
        m = row["metrics"]
        by_hand = (  # the papers' "drop": lower is better
            -100
            / 3
            * (
                (m["left"]["acc"][0] - base["left"]["acc"]) / base["left"]["acc"]
                + (m["right"]["acc"][0] - base["right"]["acc"]) / base["right"]["acc"]
                - (m["sum"]["mae"][0] - base["sum"]["mae"]) / base["sum"]["mae"]
            )
        )
        assert delta == pytest.approx(by_hand, abs=1e-9), method
    # plain sum and equal weighting are the same run: same metrics
    assert out["rows"]["none"]["metrics"] == out["rows"]["equal"]["metrics"]
    assert "val/left/acc" in _scalars(tmp_path / "digits_table" / "mgda" / "seed0")


def test_single_task_weighting_rejects_an_unknown_task(tmp_path):
    ex = _example("digits_table")
    with pytest.raises(ValueError, match=r"`task` of SingleTask .* Found 'middle'"):
        ex.run_one(
            {
                "method": "stl_middle",
                "seed": 0,
                "epochs": 1,
                "train_pairs": 64,
                "val_pairs": 32,
                "logdir": None,
            }
        )


# ------------------------------------------------------------------------------- plumbing
def test_examples_run_without_matplotlib(tmp_path, monkeypatch, capsys):
    ex = _example("pareto_toy")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = ex.main(
        [
            "--methods",
            "none",
            "--num-starts",
            "1",
            "--steps",
            "5",
            "--jobs",
            "1",
            "--logdir",
            str(tmp_path),
        ]
    )
    assert out["png"] is None
    assert "pip install 'lightning-aw[plots]'" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("name", MODULES)
def test_example_docstrings_run(name):
    module = _example(name)
    assert module.__doc__ and module.__all__
    for public in module.__all__:
        obj = getattr(module, public)
        if callable(obj):
            assert obj.__doc__, f"{name}.{public} has no docstring"
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


# ------------------------------------------------------------------------------ benchmarks
def _bench_module(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_benchmark_covers_every_registered_method():
    """`benchmarks/bench_weighting.py` (issue 7 item 5) times every registered method."""
    bench = _bench_module("bench_weighting")
    covered: set[type] = set()
    for make in bench.CONFIGS.values():
        _, callbacks = make()
        covered |= {type(c) for c in callbacks}
    missing = sorted(n for n in list_methods() if get_method(n).cls not in covered)
    assert not missing, f"not benchmarked: {missing}"


def test_paired_schedule_reruns_the_reference_and_divides_by_its_neighbours():
    paired = _bench_module("_paired")

    def reference_of(name):
        return None if name == "R" else "R"

    order = paired.schedule(["R", "a", "b", "c"], reference_of, 2)
    assert order == ["R", "a", "b", "R", "c", "R"]
    times = [10.0, 11.0, 12.0, 14.0, 7.0, 10.0]  # the reference drifts 10 -> 14 -> 10
    assert paired.adjacent_reference(order, times, 1, reference_of) == 12.0  # (10 + 14) / 2
    assert paired.adjacent_reference(order, times, 4, reference_of) == 12.0  # (14 + 10) / 2
    assert paired.adjacent_reference(order, times, 3, reference_of) == 14.0  # itself
    assert paired.quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert paired.spread([1.0, 2.0, 3.0, 4.0, 5.0]) == "3.000 [2.000, 4.000]"
    with pytest.raises(ValueError, match="reference that is not run"):
        paired.schedule(["a"], reference_of, 2)


def test_overhead_benchmark_runs_paired(capsys):
    bench = _bench_module("bench_weighting")
    threads = torch.get_num_threads()
    out = bench.main(["--rounds", "2", "--steps", "7", "--batch-size", "4", "--only", "GLS"])
    torch.set_num_threads(threads)
    plain = ["plain LightningModule", "plain LightningModule (no logging)"]
    assert set(out["ratio"]) == {"GLS", "MultiTaskModule (no callback)", *plain}
    assert out["ratio"]["MultiTaskModule (no callback)"] == 1.0
    # one paired ratio per round for each configuration (the reference runs 3 times a round)
    assert all(len(out["paired"][n]) == 2 for n in ["GLS", *plain])
    assert all(x > 0 for r in out["paired"].values() for x in r)
    assert "MultiTaskModule (no callback) vs plain LightningModule:" in capsys.readouterr().out


# ----------------------------------------------------------------- (f) MMoE and gate collapse
def test_mmoe_synthetic_aux_free_bias_prevents_gate_collapse(tmp_path):
    ex = _example("mmoe_synthetic")
    args = ["--steps", "2", "--collapse-steps", "50", "--step-size", "0.05", "--num-train"]
    args += ["6400", "--num-test", "512", "--correlations", "0.0", "--seeds", "1", "--jobs", "1"]
    out = ex.main(
        [*args, "--logdir", str(tmp_path), "--out", str(tmp_path), "--png-dir", str(tmp_path)]
    )
    shares = {r["balance"]: r["selected"] for r in out["collapse"]}
    # the skewed start keeps experts 0-1 without balancing; the aux-free bias spreads the load
    assert sum(shares["none"][:2]) > 0.6
    assert max(shares["aux_free"]) < max(shares["none"]) - 0.1
    assert all(abs(sum(s) - 1.0) < 1e-5 for s in shares.values())
    assert (tmp_path / "results_mmoe.md").is_file()


# ----------------------------------------------------------------------------- scenes table
def test_scenes_table_trains_logs_and_leaves_delta_undefined_on_a_zero_baseline(tmp_path):
    ex = _example("scenes")
    args = "--methods none --num-train 16 --num-val 8 --epochs 2 --height 16 --width 24"
    out = ex.main([*args.split(), "--logdir", str(tmp_path)])
    assert sorted(out["rows"]) == ["none", "single-task"]
    assert "| none |" in out["out"].read_text()
    assert "val/normal/median" in _scalars(tmp_path / "scenes" / "none" / "seed0")
    base = out["rows"]["single-task"]["metrics"]
    zero = any(v[0] == 0 for metrics in base.values() for v in metrics.values())
    (delta,) = out["rows"]["none"]["delta"]
    assert math.isnan(delta) == zero  # Δm% divides by every baseline


def test_scenes_table_delta_by_hand(tmp_path, monkeypatch):
    from lightning_aw.metrics import NYUV2_HIGHER_IS_BETTER

    ex = _example("scenes")
    names = [(t, n) for t in NYUV2_HIGHER_IS_BETTER for n in NYUV2_HIGHER_IS_BETTER[t]]
    stl = {name: 1.0 + i for i, name in enumerate(names)}  # each task's own model
    mtl = {name: 1.5 + 0.5 * i for i, name in enumerate(names)}  # the multi-task run

    def fake_run(spec):  # the training is replaced: the table and Δm% are what is tested
        values = stl if spec["method"].startswith("stl_") else mtl
        metrics = {t: {n: values[(t, n)] for n in NYUV2_HIGHER_IS_BETTER[t]} for t, _ in names}
        return {**spec, "metrics": metrics, "seconds": 1.0}

    monkeypatch.setattr(ex, "run_one", fake_run)
    out = ex.main(["--methods", "famo", "--quick", "--logdir", str(tmp_path)])
    terms = [
        (1 if NYUV2_HIGHER_IS_BETTER[t][n] else -1) * (mtl[(t, n)] - stl[(t, n)]) / stl[(t, n)]
        for t, n in names
    ]
    (delta,) = out["rows"]["famo"]["delta"]
    assert delta == pytest.approx(-100 * sum(terms) / 9, rel=1e-12)  # the papers' "drop"


def test_realistic_benchmark_covers_every_method_and_runs(capsys):
    """`benchmarks/bench_realistic.py` times every registered method on SceneNet; a tiny run."""
    bench = _bench_module("bench_realistic")
    args = bench.argparse.Namespace(channels=4)
    covered: set[type] = set()
    for make in bench.lightning_configs(["parameters", "representation"]).values():
        _, callbacks = make(args)
        covered |= {type(c) for c in callbacks}
    missing = sorted(n for n in list_methods() if get_method(n).cls not in covered)
    assert not missing, f"not benchmarked: {missing}"
    threads = torch.get_num_threads()
    tiny = "--rounds 1 --steps 3 --height 16 --width 24 --channels 4 --batch-size 4 --only MGDA"
    out = bench.main(tiny.split())
    torch.set_num_threads(threads)
    assert set(out["median"]) >= {
        "plain LightningModule",
        "MultiTaskModule (no method)",
        "MGDA (para.)",
        "MGDA (repr.)",
    }
    assert all(t > 0 for t in out["median"].values())
    assert out["ratio"]["plain LightningModule"] == 1.0
    assert "| MGDA (repr.) |" in capsys.readouterr().out
