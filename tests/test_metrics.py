"""MultiTaskDelta against the published NYUv2 numbers (METHODS.md; Nash-MTL/FAMO protocol)."""

from __future__ import annotations

import pytest
import torch

from lightning_aw.metrics import MultiTaskDelta, multitask_delta

NAMES = {
    "seg": ["miou", "pix_acc"],
    "depth": ["abs_err", "rel_err"],
    "normal": ["mean", "median", "within_11", "within_22", "within_30"],
}
HIGHER = {"seg": [True, True], "depth": [False, False], "normal": [False, False, True, True, True]}
STL = [38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15]
EW = [39.29, 65.33, 0.5493, 0.2263, 28.15, 23.96, 22.09, 47.50, 61.08]
FAMO = [38.88, 64.90, 0.5474, 0.2194, 25.06, 19.57, 29.21, 56.61, 68.98]


def nest(row):
    it = iter(row)
    return {task: {m: next(it) for m in metrics} for task, metrics in NAMES.items()}


HIB = {task: dict(zip(NAMES[task], HIGHER[task], strict=True)) for task in NAMES}


@pytest.mark.parametrize(("row", "published"), [(FAMO, -4.10), (EW, 5.59)], ids=["famo", "equal"])
def test_published_delta_m(row, published):
    # the papers report the "drop" sign (lower is better), averaged over all 9 metrics
    drop = multitask_delta(nest(row), nest(STL), HIB, sign="drop", average="metrics")
    assert round(float(drop), 2) == published
    up = multitask_delta(nest(row), nest(STL), HIB, sign="improvement")
    assert float(up) == pytest.approx(-float(drop))


def test_task_average_by_hand():
    # LibMTL's convention: average within each task first
    flags = [h for task in NAMES for h in HIGHER[task]]
    rel = [(m - s) / s * (1 if h else -1) for m, s, h in zip(FAMO, STL, flags, strict=True)]
    per_task = [sum(rel[0:2]) / 2, sum(rel[2:4]) / 2, sum(rel[4:9]) / 5]
    expected = 100 * sum(per_task) / 3
    got = multitask_delta(nest(FAMO), nest(STL), HIB, sign="improvement", average="tasks")
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # the default sign is the papers' "drop" (lower is better)
    assert float(multitask_delta(nest(FAMO), nest(STL), HIB, average="tasks")) == pytest.approx(
        -expected, rel=1e-12
    )


def test_metric_averages_updates_and_merges_like_ddp():
    one = MultiTaskDelta(nest(STL), HIB, sign="drop")
    one.update(nest(FAMO))
    one.update(nest(EW))
    mean_row = [(a + b) / 2 for a, b in zip(FAMO, EW, strict=True)]
    expected = multitask_delta(nest(mean_row), nest(STL), HIB, sign="drop")
    torch.testing.assert_close(one.compute(), expected)
    # two "ranks" with one update each, states summed as torchmetrics' DDP sync does
    a, b = MultiTaskDelta(nest(STL), HIB, sign="drop"), MultiTaskDelta(nest(STL), HIB, sign="drop")
    a.update(nest(FAMO))
    b.update(nest(EW))
    a.merge_state(b)
    torch.testing.assert_close(a.compute(), expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sign": "up"}, ValueError, "sign"),
        ({"average": "all"}, ValueError, "average"),
        (
            {"higher_is_better": {"seg": {"miou": True}}},
            ValueError,
            "no entry for metric 'pix_acc'",
        ),
        (
            {"baselines": {"seg": {"miou": 0.0}}, "higher_is_better": {"seg": {"miou": True}}},
            ValueError,
            "non-zero",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"baselines": nest(STL), "higher_is_better": HIB, **kwargs}
    with pytest.raises(error, match=match):
        MultiTaskDelta(**args)


def test_missing_value_and_compute_before_update():
    metric = MultiTaskDelta(nest(STL), HIB)
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()
    with pytest.raises(KeyError, match="metric 'miou' of task 'seg'"):
        metric.update({"depth": {"abs_err": 0.5}})


def test_docstring_examples_run():
    import doctest

    import lightning_aw.metrics._delta as module

    result = doctest.testmod(module)
    assert result.attempted >= 6 and result.failed == 0
