"""The NYUv2 dense-prediction metrics against hand computation and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics import MetricCollection

from lightning_aw.metrics import (
    NYUV2_HIGHER_IS_BETTER,
    NYUV2_SINGLE_TASK,
    DepthMetric,
    MultiTaskDelta,
    NormalMetric,
    SegmentationMetric,
    multitask_delta,
    nyuv2_metrics,
)

# ----------------------------------------------------------------------------- segmentation
# a 3x3 image, 3 classes, one ignored pixel (-1)
TARGET = torch.tensor([[0, 0, 1], [1, 2, 2], [-1, 2, 0]])
PRED = torch.tensor([[0, 1, 1], [1, 2, 0], [2, 2, 0]])


def test_confusion_matrix_by_hand():
    # labelled pixels (target, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (2,2) (0,0);
    # the ignored pixel's prediction (2) is not counted
    confmat = [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    metric = SegmentationMetric(3)
    metric.update(PRED[None], TARGET[None])
    assert metric.confmat.tolist() == confmat
    # IoU_c = tp / (row + col - tp): class 0: 2/(3+3-2), class 1: 2/(2+3-2), class 2: 2/(3+2-2)
    iou = [2 / 4, 2 / 3, 2 / 3]
    out = metric.compute()
    assert float(out["miou"]) == pytest.approx(sum(iou) / 3)
    assert float(out["pix_acc"]) == pytest.approx(6 / 8)


def test_scores_are_argmaxed_and_classes_absent_from_both_are_left_out():
    scores = torch.nn.functional.one_hot(PRED.clamp(min=0), 4).permute(2, 0, 1).float()[None]
    metric = SegmentationMetric(4)  # class 3 occurs neither in the target nor the prediction
    metric.update(scores, TARGET[None])
    assert float(metric.compute()["miou"]) == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    # a class only predicted (never in the target) has IoU 0 and counts
    metric = SegmentationMetric(4)
    metric.update(torch.tensor([[3, 1]]), torch.tensor([[0, 1]]))
    assert float(metric.compute()["miou"]) == pytest.approx((0 + 1 + 0) / 3)


def test_segmentation_bad_input():
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMetric(3, ignore_index=0)
    with pytest.raises(ValueError, match="output"):
        SegmentationMetric(3, output="iou")
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="scores"):
        metric.update(torch.rand(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


# ----------------------------------------------------------------------------- depth
def test_depth_errors_skip_invalid_pixels_pixel_and_batch_reductions():
    t1 = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]])  # one invalid pixel
    p1 = torch.tensor([[[[2.0, 2.0], [7.0, 3.0]]]])
    t2 = torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]])  # one valid pixel
    p2 = torch.tensor([[[[1.0, 3.0], [3.0, 3.0]]]])
    # valid errors: batch 1 |1| |0| |1| (rel 1, 0, 1/4); batch 2 |0.5| (rel 1)
    pixel = DepthMetric()
    batch = DepthMetric(reduction="batch")
    for m in (pixel, batch):
        m.update(p1, t1)
        m.update(p2, t2)
    out = pixel.compute()
    assert float(out["abs_err"]) == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert float(out["rel_err"]) == pytest.approx((1 + 0 + 0.25 + 1) / 4)
    out = batch.compute()  # MTAN / Nash-MTL: the mean of the per-batch means
    assert float(out["abs_err"]) == pytest.approx((2 / 3 + 0.5) / 2)
    assert float(out["rel_err"]) == pytest.approx((1.25 / 3 + 1) / 2)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(DepthMetric(output="abs_err").compute()))
    with pytest.raises(ValueError, match="same shape"):
        pixel.update(p1, t1[0])


# ----------------------------------------------------------------------------- normals
def _vectors(angles_deg, axis=2):
    """Unit vectors at the given angles from the z axis (in the x-z plane), as [1, 3, N, 1]."""
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    v = torch.stack([torch.sin(a), torch.zeros_like(a), torch.cos(a)])
    return v[None, :, :, None]


def test_normal_angles_of_known_vectors():
    angles = [0.0, 5.0, 11.0, 12.0, 22.0, 25.0, 29.0, 45.0, 90.0]
    target = _vectors([0.0] * len(angles) + [0.0])
    target[0, :, -1] = 0.0  # an invalid pixel (zero vector) whatever the prediction
    preds = 3.0 * _vectors([*angles, 60.0])  # predictions are normalised first
    metric = NormalMetric()
    metric.update(preds.float(), target.float())
    out = metric.compute()
    assert float(out["mean"]) == pytest.approx(sum(angles) / 9, abs=1e-4)
    assert float(out["median"]) == pytest.approx(22.0, abs=0.01)  # 9 values: the 5th
    assert float(out["within_11"]) == pytest.approx(3 / 9)  # 0, 5, 11 (< 11.25)
    assert float(out["within_22"]) == pytest.approx(5 / 9)  # ... 12, 22
    assert float(out["within_30"]) == pytest.approx(7 / 9)  # ... 25, 29


def test_normal_histogram_median_within_a_bin_of_numpy_and_batch_reduction():
    gen = torch.Generator().manual_seed(0)
    batches = []
    for n in (1000, 777):
        t = torch.nn.functional.normalize(torch.randn(1, 3, n, 1, generator=gen), dim=1)
        p = t + 0.4 * torch.randn(1, 3, n, 1, generator=gen)
        batches.append((p, t))

    def errors(p, t):
        cos = (
            torch.nn.functional.normalize(p.double(), dim=1)
            * torch.nn.functional.normalize(t.double(), dim=1)
        ).sum(1)
        return np.degrees(np.arccos(np.clip(cos.flatten().numpy(), -1, 1)))

    pixel, batch = NormalMetric(), NormalMetric(reduction="batch")
    for p, t in batches:
        pixel.update(p, t)
        batch.update(p, t)
    every = np.concatenate([errors(p, t) for p, t in batches])
    out = pixel.compute()
    assert float(out["median"]) == pytest.approx(np.median(every), abs=0.01)  # one bin: 0.01°
    assert float(out["mean"]) == pytest.approx(every.mean(), rel=1e-9)
    assert float(out["within_22"]) == pytest.approx((every < 22.5).mean())
    per_batch = [errors(p, t) for p, t in batches]
    out = batch.compute()  # Nash-MTL: numpy statistics per batch, averaged over batches
    assert float(out["median"]) == pytest.approx(np.mean([np.median(e) for e in per_batch]))
    assert float(out["mean"]) == pytest.approx(np.mean([e.mean() for e in per_batch]))
    assert float(out["within_30"]) == pytest.approx(np.mean([(e < 30).mean() for e in per_batch]))


def test_normal_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 3"):
        NormalMetric().update(torch.rand(1, 2, 4), torch.rand(1, 2, 4))
    with pytest.raises(ValueError, match="reduction"):
        NormalMetric(reduction="image")
    with pytest.raises(ValueError, match="bins"):
        NormalMetric(bins=0)


# ----------------------------------------------------------------------------- DDP-style merge
@pytest.mark.parametrize(
    "make",
    [
        lambda: SegmentationMetric(5),
        lambda: DepthMetric(),
        lambda: DepthMetric(reduction="batch"),
        lambda: NormalMetric(),
        lambda: NormalMetric(reduction="batch"),
    ],
    ids=["seg", "depth", "depth-batch", "normal", "normal-batch"],
)
def test_two_metric_objects_merged_equal_one(make):
    # torchmetrics' DDP sync sums the states: merge_state does the same on one process
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):
        if isinstance(make(), SegmentationMetric):
            t = torch.randint(-1, 5, (2, 6, 8), generator=gen)
            data.append((torch.rand(2, 5, 6, 8, generator=gen), t))
        elif isinstance(make(), DepthMetric):
            t = torch.rand(2, 1, 6, 8, generator=gen) * (
                torch.rand(2, 1, 6, 8, generator=gen) > 0.2
            )
            data.append((torch.rand(2, 1, 6, 8, generator=gen), t))
        else:
            data.append(
                (torch.randn(2, 3, 6, 8, generator=gen), torch.randn(2, 3, 6, 8, generator=gen))
            )
    one, a, b = make(), make(), make()
    for i, (p, t) in enumerate(data):
        one.update(p, t)
        (a if i % 2 else b).update(p, t)
    a.merge_state(b)
    for key, value in one.compute().items():
        torch.testing.assert_close(a.compute()[key], value, msg=key)


# ----------------------------------------------------------------------------- presets
def test_nyuv2_metrics_collection_matches_dict_metrics_and_feeds_delta():
    gen = torch.Generator().manual_seed(2)
    seg_p, seg_t = (
        torch.rand(2, 13, 4, 6, generator=gen),
        torch.randint(-1, 13, (2, 4, 6), generator=gen),
    )
    dep_p, dep_t = torch.rand(2, 1, 4, 6, generator=gen), torch.rand(2, 1, 4, 6, generator=gen)
    nor_p, nor_t = torch.randn(2, 3, 4, 6, generator=gen), torch.randn(2, 3, 4, 6, generator=gen)
    inputs = {"seg": (seg_p, seg_t), "depth": (dep_p, dep_t), "normal": (nor_p, nor_t)}
    reference = {"seg": SegmentationMetric(13), "depth": DepthMetric(), "normal": NormalMetric()}
    values = {}
    for task, metrics in nyuv2_metrics().items():
        collection = MetricCollection(metrics)
        collection.update(*inputs[task])
        reference[task].update(*inputs[task])
        got, expected = collection.compute(), reference[task].compute()
        assert set(got) == set(expected) == set(NYUV2_HIGHER_IS_BETTER[task])
        for name in got:
            torch.testing.assert_close(got[name], expected[name])
        values[task] = {k: float(v) for k, v in got.items()}
    delta = MultiTaskDelta.nyuv2()
    delta.update(values)
    expected = multitask_delta(values, NYUV2_SINGLE_TASK, NYUV2_HIGHER_IS_BETTER, sign="drop")
    torch.testing.assert_close(delta.compute(), expected)
    with pytest.raises(ValueError, match="unknown key"):
        nyuv2_metrics(tasks={"segmentation": "seg"})


def test_delta_default_sign_is_the_papers_drop():
    base = {"a": {"err": 1.0}}
    hib = {"a": {"err": False}}
    # error 0.8 against 1.0: 20 % better, a drop of -20 % (lower is better)
    assert float(multitask_delta({"a": {"err": 0.8}}, base, hib)) == pytest.approx(-20.0)
    metric = MultiTaskDelta(base, hib)
    metric.update({"a": {"err": 1.1}})
    assert float(metric.compute()) == pytest.approx(10.0)


# ----------------------------------------------------------------------------- DDP
def test_ddp_validation_metrics_equal_one_process_over_all_scenes(ddp_results):
    """The ``dense_metrics`` case of ``ddp_script.py``: two ranks validate half of the scenes
    each; the synced metrics equal one process's over all of them."""
    from torch.utils.data import DataLoader

    from lightning_aw.datasets import SyntheticScenes
    from lightning_aw.models import SceneNet

    r0, r1 = ddp_results.load("dense_metrics")
    assert r0["metrics"] == r1["metrics"]
    torch.manual_seed(0)
    net = SceneNet(channels=4).eval()
    reference = {"seg": SegmentationMetric(13), "depth": DepthMetric(), "normal": NormalMetric()}
    with torch.no_grad():
        for batch in DataLoader(SyntheticScenes(8, 16, 24, seed=0, split="val"), batch_size=2):
            pred = net(batch["image"])
            reference["seg"].update(pred["seg"], batch["segmentation"])
            reference["depth"].update(pred["depth"], batch["depth"])
            reference["normal"].update(pred["normal"], batch["normal"])
    expected = {
        f"val/{task}/{name}": float(value)
        for task, metric in reference.items()
        for name, value in metric.compute().items()
    }
    assert set(r0["metrics"]) == set(expected)
    for key, value in expected.items():
        assert r0["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
