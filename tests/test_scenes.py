"""SyntheticScenes (determinism, ranges, geometry), the NYUv2 reader on a generated fixture, and
the augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_aw.datasets import (
    SCENE_CLASSES,
    NYUv2,
    NYUv2DataModule,
    SyntheticScenes,
    SyntheticScenesDataModule,
    TwoDigitsDataModule,
    flip_and_scale,
    make_two_digits,
)
from lightning_aw.metrics import NYUV2_HIGHER_IS_BETTER

H, W = 24, 32


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("image", "segmentation", "depth", "normal"))


def test_old_import_paths_still_work():
    import lightning_aw.datasets as datasets

    assert datasets.TwoDigitsDataModule is TwoDigitsDataModule
    assert make_two_digits(2)[0].shape == (2, 1, 8, 16)


def test_same_seed_same_scene_other_index_or_split_or_seed_differs():
    a = SyntheticScenes(5, H, W, seed=3)
    b = SyntheticScenes(5, H, W, seed=3, cache=True)
    assert _equal(a[2], b[2]) and _equal(b[2], b[2])
    assert not torch.equal(a[1]["image"], a[2]["image"])
    assert not torch.equal(a[2]["depth"], SyntheticScenes(5, H, W, seed=3, split="val")[2]["depth"])
    assert not torch.equal(a[2]["depth"], SyntheticScenes(5, H, W, seed=4)[2]["depth"])


def test_value_ranges_and_layout():
    data = SyntheticScenes(12, H, W, seed=0)
    seen_invalid = seen_ignored = False
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
        assert float(item["image"].min()) >= 0 and float(item["image"].max()) <= 1
        seg, depth, normal = item["segmentation"], item["depth"][0], item["normal"]
        assert seg.dtype == torch.int64 and seg.shape == (H, W)
        assert int(seg.min()) >= -1 and int(seg.max()) < len(SCENE_CLASSES)
        valid = depth != 0
        assert bool((depth[valid] > 0).all())
        norm = normal.norm(dim=0)
        torch.testing.assert_close(norm[valid], torch.ones_like(norm[valid]))
        assert bool((normal[:, ~valid] == 0).all())  # no depth <-> no normal (windows)
        assert bool((seg[~valid] == SCENE_CLASSES.index("window")).all())
        seen_invalid |= bool((~valid).any())
        seen_ignored |= bool((seg == -1).any())
    # in 12 scenes both a window (invalid depth) and an unlabelled object occur
    assert seen_invalid and seen_ignored


def test_floor_normals_agree_with_the_depth_geometry():
    # back-project floor pixels with the pinhole model: they lie on one plane n . p = c whose
    # normal n is the rendered normal (an independent check of depth against normals)
    data = SyntheticScenes(3, 36, 48, seed=1)
    f = 24 / math.tan(math.radians(62.0) / 2)
    v, u = torch.meshgrid(torch.arange(36) + 0.5, torch.arange(48) + 0.5, indexing="ij")
    for i in range(3):
        item = data[i]
        floor = item["segmentation"] == SCENE_CLASSES.index("floor")
        z = item["depth"][0][floor]
        p = torch.stack([(u[floor] - 24) / f * z, (v[floor] - 18) / f * z, z], -1)
        n = item["normal"][:, floor].T
        torch.testing.assert_close(n, n[:1].expand_as(n), atol=1e-5, rtol=0)  # one plane
        offsets = (p * n).sum(-1)
        assert float(offsets.std()) < 1e-3 * float(offsets.abs().mean())
        assert float((n[0] * p[0]).sum()) < 0  # facing the camera


def test_datamodule_batches():
    dm = SyntheticScenesDataModule(num_train=6, num_val=3, height=H, width=W, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, H, W)
    assert batch["segmentation"].shape == (4, H, W)
    assert [len(b["depth"]) for b in dm.val_dataloader()] == [3]
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes(2, split="test")


def test_flip_and_scale_mirrors_and_scales():
    item = SyntheticScenes(1, H, W, seed=5)[0]
    flipped = None
    for seed in range(10):  # find a draw that flips (probability 1/2 each)
        out = flip_and_scale(item, scales=(1.0,), generator=torch.Generator().manual_seed(seed))
        if not torch.equal(out["image"], item["image"]):
            flipped = out
            break
    assert flipped is not None
    torch.testing.assert_close(flipped["depth"], item["depth"].flip(-1))
    torch.testing.assert_close(flipped["segmentation"], item["segmentation"].flip(-1))
    expected = item["normal"].flip(-1) * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    torch.testing.assert_close(flipped["normal"], expected)
    scaled = flip_and_scale(item, scales=(1.5,), generator=torch.Generator().manual_seed(0))
    # nearest resize: every valid depth is one of the original depths divided by 1.5
    originals = (item["depth"][item["depth"] != 0] / 1.5).unique()
    got = scaled["depth"][scaled["depth"] != 0].unique()
    assert bool(torch.isin(got, originals).all())
    norm = scaled["normal"].norm(dim=0)
    valid = norm > 0
    torch.testing.assert_close(norm[valid], torch.ones_like(norm[valid]))


# ----------------------------------------------------------------------------- NYUv2 reader
def _write_nyuv2(root, split, n, seed):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        image = rng.random((8, 12, 3), dtype=np.float32)
        label = rng.integers(-1, 13, (8, 12)).astype(np.float32)  # stored as float, -1 = ignore
        depth = (rng.random((8, 12, 1)) * 5).astype(np.float32)
        depth[0, 0] = 0.0
        normal = rng.normal(size=(8, 12, 3)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        normal[0, 0] = 0.0
        for name, array in zip(
            ("image", "label", "depth", "normal"), (image, label, depth, normal), strict=True
        ):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            np.save(root / split / name / f"{i}.npy", array)
        samples.append((image, label, depth, normal))
    return samples


def test_nyuv2_reader_on_a_generated_fixture(tmp_path):
    train = _write_nyuv2(tmp_path, "train", 3, seed=0)
    _write_nyuv2(tmp_path, "val", 2, seed=1)
    data = NYUv2(tmp_path, "train")
    assert len(data) == 3
    image, label, depth, normal = train[2]
    item = data[2]
    np.testing.assert_array_equal(item["image"].numpy(), image.transpose(2, 0, 1))
    assert item["segmentation"].dtype == torch.int64
    np.testing.assert_array_equal(item["segmentation"].numpy(), label.astype(np.int64))
    assert int(item["segmentation"].min()) == -1
    np.testing.assert_array_equal(item["depth"].numpy(), depth.transpose(2, 0, 1))
    np.testing.assert_array_equal(item["normal"].numpy(), normal.transpose(2, 0, 1))
    dm = NYUv2DataModule(tmp_path, batch_size=2)
    dm.setup("fit")
    assert [len(b["image"]) for b in dm.val_dataloader()] == [2]
    batch = next(iter(dm.train_dataloader()))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "image": (2, 3, 8, 12),
        "segmentation": (2, 8, 12),
        "depth": (2, 1, 8, 12),
        "normal": (2, 3, 8, 12),
    }
    augmented = NYUv2(tmp_path, "train", augmentation=True)[0]
    assert augmented["depth"].shape == (1, 8, 12)


def test_nyuv2_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \.npy file"):
        NYUv2(tmp_path, "train")
    _write_nyuv2(tmp_path, "train", 2, seed=0)
    (tmp_path / "train" / "normal" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"normal.1\.npy is missing"):
        NYUv2(tmp_path, "train")


# ----------------------------------------------------------------------------- SceneNet
def test_scenenet_losses_by_hand():
    from lightning_aw.models import SceneNet

    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # [1, 2 classes, 1, 2]
    pred = {
        "seg": logits,
        "depth": torch.tensor([[[[1.0, 5.0]]]]),
        "normal": torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]]),
    }
    batch = {
        "segmentation": torch.tensor([[[0, -1]]]),  # the second pixel is ignored
        "depth": torch.tensor([[[[3.0, 0.0]]]]),  # the second pixel has no depth
        "normal": torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.0]]]]),  # 2nd: invalid
    }
    losses = SceneNet.dense_losses(pred, batch)
    assert float(losses["seg"]) == pytest.approx(math.log(1 + math.exp(-2.0)))
    assert float(losses["depth"]) == pytest.approx(2.0)
    assert float(losses["normal"]) == pytest.approx(1.0)  # (1,0,0) against (0,1,0): cos 0
    # nothing valid: 0, not NaN
    empty = {k: torch.zeros_like(v) for k, v in batch.items()}
    empty["segmentation"] = torch.full_like(batch["segmentation"], -1)
    assert all(float(v) == 0.0 for v in SceneNet.dense_losses(pred, empty).values())


def test_scenenet_trains_with_a_method_and_logs_the_nyuv2_metrics(tmp_path):
    import lightning.pytorch as pl

    from lightning_aw.models import SceneNet
    from lightning_aw.registry import create_method

    torch.manual_seed(0)
    dm = SyntheticScenesDataModule(num_train=8, num_val=4, height=16, width=24, batch_size=4)
    net = SceneNet(channels=4)
    before = [p.detach().clone() for p in net.trunk.parameters()]
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[create_method("upgrad", source="representation")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(net, dm)
    assert trainer.global_step == 4
    logged = trainer.callback_metrics
    names = [f"val/{t}/{m}" for t, ms in NYUV2_HIGHER_IS_BETTER.items() for m in ms]
    assert all(math.isfinite(float(logged[n])) for n in names)
    assert 0 <= float(logged["val/seg/miou"]) <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, net.trunk.parameters(), strict=True))
    weights = net.task_weights
    assert sorted(weights) == ["depth", "normal", "seg"]
    assert all(math.isfinite(w) for w in weights.values())
