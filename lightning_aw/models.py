"""Small reference multi-task models, ready to train on :mod:`lightning_aw.datasets`.

They back the examples, the benchmarks and the example configurations
(``model.class_path: lightning_aw.models.DigitsNet``).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError
from torchmetrics.classification import MulticlassAccuracy

from lightning_aw.module import MultiTaskModule, TaskOutput

__all__ = ["DigitsNet", "SceneNet"]


class DigitsNet(MultiTaskModule):
    """A ~55k-parameter CNN for :class:`~lightning_aw.datasets.TwoDigitsDataModule`.

    Tasks ``left`` and ``right`` (10-way classification, accuracy) and ``sum`` (regression of the
    digit sum, mean absolute error) share a two-layer convolutional trunk; each has a linear head.
    The trunk output is marked with :meth:`~MultiTaskModule.shared_representation`.

    Args:
        lr: learning rate of the default optimizer (used when ``optimizer`` is not given).
        **kwargs: passed to :class:`~lightning_aw.MultiTaskModule` (``optimizer``,
            ``on_nonfinite``).

    Example::

        >>> import torch
        >>> net = DigitsNet()
        >>> losses = net.task_losses((torch.rand(4, 1, 8, 16), torch.tensor([[1, 2, 3]] * 4)), 0)
        >>> sorted(losses)
        ['left', 'right', 'sum']
    """

    def __init__(self, lr: float = 2e-3, **kwargs: Any) -> None:
        kwargs.setdefault("optimizer", {"name": "adam", "lr": lr})
        super().__init__(
            tasks=["left", "right", "sum"],
            metrics={
                "left": {"acc": MulticlassAccuracy(num_classes=10)},
                "right": {"acc": MulticlassAccuracy(num_classes=10)},
                "sum": {"mae": MeanAbsoluteError()},
            },
            **kwargs,
        )
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 8, 48),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict(
            {"left": nn.Linear(48, 10), "right": nn.Linear(48, 10), "sum": nn.Linear(48, 1)}
        )
        self.save_hyperparameters()  # load_from_checkpoint rebuilds the same optimizer spec

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.shared_representation(self.trunk(x))  # for source="representation" methods
        left, right = self.heads["left"](h), self.heads["right"](h)
        total = self.heads["sum"](h).squeeze(-1)
        target_sum = y[:, 2].float()
        return {
            "left": TaskOutput(F.cross_entropy(left, y[:, 0]), left, y[:, 0]),
            "right": TaskOutput(F.cross_entropy(right, y[:, 1]), right, y[:, 1]),
            "sum": TaskOutput(F.mse_loss(total, target_sum), total, target_sum),
        }


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _BasicBlock(nn.Module):
    """ResNet's basic block (two 3×3 convolutions and a shortcut; He et al., CVPR 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class _SceneTrunk(nn.Module):
    """A small ResNet-style encoder-decoder: stride-2 stem, blocks at 1/2, 1/4 and 1/8 of the
    input, and a decoder that upsamples back to 1/2 with additive skip connections."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem = _conv_bn(3, c, stride=2)  # 1/2
        self.enc1 = _BasicBlock(c, c)  # 1/2
        self.enc2 = _BasicBlock(c, 2 * c, stride=2)  # 1/4
        self.enc3 = _BasicBlock(2 * c, 4 * c, stride=2)  # 1/8
        self.dec2 = _conv_bn(4 * c, 2 * c)
        self.dec1 = _conv_bn(2 * c, c)

    def forward(self, x: Tensor) -> Tensor:
        s1 = self.enc1(self.stem(x))
        s2 = self.enc2(s1)
        s3 = self.enc3(s2)
        up2 = F.interpolate(s3, size=s2.shape[-2:], mode="bilinear", align_corners=False)
        d2 = self.dec2(up2) + s2
        up1 = F.interpolate(d2, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        return self.dec1(up1) + s1


class SceneNet(MultiTaskModule):
    """A small ResNet-style encoder-decoder with three dense heads, for NYUv2-like data.

    For :class:`~lightning_aw.datasets.SyntheticScenesDataModule` and
    :class:`~lightning_aw.datasets.NYUv2DataModule` (batches are dicts with ``image``,
    ``segmentation``, ``depth``, ``normal``). A shared trunk (stride-2 stem, ResNet basic blocks
    at 1/2, 1/4 and 1/8 resolution, a decoder back to 1/2 with skip connections; He et al.,
    CVPR 2016) feeds three heads (3×3 conv, ReLU, 1×1 conv), whose outputs are upsampled
    bilinearly to the input size. The trunk's output is marked with
    :meth:`~MultiTaskModule.shared_representation`. The losses are those of MTAN / Nash-MTL on
    NYUv2:

    - ``seg``: cross-entropy over pixels with a label (``ignore_index=-1``);
    - ``depth``: L1 over pixels with a depth (target ≠ 0);
    - ``normal``: 1 − cosine similarity between the unit-normalised prediction and the target,
      over pixels with a normal (target ≠ 0).

    Each is a sum over its valid pixels divided by their count (at least 1), so a batch without
    any valid pixel gives 0, not NaN. Validation logs the NYUv2 metric set of
    :func:`lightning_aw.metrics.nyuv2_metrics` as ``val/<task>/<metric>``.

    With ``channels=16`` it has about 108k parameters (101k in the trunk); a training step on a
    batch of 8 scenes of 72×96 takes 60-100 ms on one CPU core (measured on a shared machine,
    ``benchmarks/bench_realistic.py``).

    Args:
        num_classes: segmentation classes (13 for the NYUv2 protocol).
        channels: width of the first stage (then 2× and 4×).
        lr: learning rate of the default optimizer (used when ``optimizer`` is not given).
        metric_reduction: ``"pixel"`` or ``"batch"`` for the depth and normal metrics (see
            :class:`~lightning_aw.metrics.DepthMetric`).
        **kwargs: passed to :class:`~lightning_aw.MultiTaskModule` (``optimizer``,
            ``on_nonfinite``).

    Example::

        >>> import torch
        >>> net = SceneNet(channels=8)
        >>> batch = {"image": torch.rand(2, 3, 24, 32),
        ...          "segmentation": torch.randint(-1, 13, (2, 24, 32)),
        ...          "depth": torch.rand(2, 1, 24, 32), "normal": torch.randn(2, 3, 24, 32)}
        >>> out = net.task_losses(batch, 0)
        >>> {task: list(o.preds.shape[1:]) for task, o in out.items()}
        {'seg': [13, 24, 32], 'depth': [1, 24, 32], 'normal': [3, 24, 32]}
    """

    def __init__(
        self,
        num_classes: int = 13,
        channels: int = 16,
        lr: float = 1e-3,
        metric_reduction: str = "pixel",
        **kwargs: Any,
    ) -> None:
        from lightning_aw.metrics import nyuv2_metrics

        kwargs.setdefault("optimizer", {"name": "adam", "lr": lr})
        super().__init__(
            tasks=["seg", "depth", "normal"],
            metrics=nyuv2_metrics(num_classes, reduction=metric_reduction),  # type: ignore[arg-type]
            **kwargs,
        )
        self.num_classes = num_classes
        self.trunk = _SceneTrunk(channels)
        outputs = {"seg": num_classes, "depth": 1, "normal": 3}
        self.heads = nn.ModuleDict(
            {
                task: nn.Sequential(
                    nn.Conv2d(channels, channels, 3, padding=1),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(channels, out, 1),
                )
                for task, out in outputs.items()
            }
        )
        self.save_hyperparameters()

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_parameters(self):
        return {task: head.parameters() for task, head in self.heads.items()}

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Predictions at the input resolution: ``seg`` logits, ``depth``, unit ``normal``."""
        return self._heads(self.trunk(image), image.shape[-2:])

    def _heads(self, h: Tensor, size: Any) -> dict[str, Tensor]:
        out = {
            task: F.interpolate(head(h), size=size, mode="bilinear", align_corners=False)
            for task, head in self.heads.items()
        }
        out["normal"] = F.normalize(out["normal"], dim=1)
        return out

    @staticmethod
    def dense_losses(pred: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The three losses of predictions ``pred`` (as :meth:`forward` returns) on ``batch``.

        Each is a sum over the task's valid pixels divided by their count (at least 1).
        """
        seg, depth, normal = batch["segmentation"], batch["depth"], batch["normal"]
        seg_valid = (seg != -1).sum().clamp(min=1)
        seg_loss = F.cross_entropy(pred["seg"], seg, ignore_index=-1, reduction="sum") / seg_valid
        depth_mask = (depth != 0).to(depth.dtype)
        depth_err = (pred["depth"] - depth).abs() * depth_mask
        normal_mask = (normal != 0).any(1).to(normal.dtype)
        normal_err = (1 - (pred["normal"] * normal).sum(1)) * normal_mask
        return {
            "seg": seg_loss,
            "depth": depth_err.sum() / depth_mask.sum().clamp(min=1),
            "normal": normal_err.sum() / normal_mask.sum().clamp(min=1),
        }

    def task_losses(self, batch, batch_idx):
        image = batch["image"]
        h = self.shared_representation(self.trunk(image))
        pred = self._heads(h, image.shape[-2:])
        losses = self.dense_losses(pred, batch)
        return {
            "seg": TaskOutput(losses["seg"], pred["seg"], batch["segmentation"]),
            "depth": TaskOutput(losses["depth"], pred["depth"], batch["depth"]),
            "normal": TaskOutput(losses["normal"], pred["normal"], batch["normal"]),
        }
