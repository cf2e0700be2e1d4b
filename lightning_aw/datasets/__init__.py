"""Offline multi-task datasets for examples, tests and benchmarks.

- :class:`TwoDigitsDataModule` (:func:`make_two_digits`): two digit classifications and their
  sum, from scikit-learn's bundled digits.
- :class:`SyntheticScenesDataModule` (:class:`SyntheticScenes`, :func:`render_scene`):
  procedurally rendered rooms with NYUv2's three dense tasks (13-class segmentation, depth,
  surface normals), nothing to download.
- :class:`NYUv2DataModule` (:class:`NYUv2`): a reader of the preprocessed NYUv2 files of
  MTAN / Nash-MTL / FAMO, in the same dict layout.
"""

from lightning_aw.datasets._augment import flip_and_scale
from lightning_aw.datasets._digits import TwoDigitsDataModule, make_two_digits
from lightning_aw.datasets._nyuv2 import NYUv2, NYUv2DataModule
from lightning_aw.datasets._scenes import (
    SCENE_CLASSES,
    SyntheticScenes,
    SyntheticScenesDataModule,
    render_scene,
)

__all__ = [
    "SCENE_CLASSES",
    "NYUv2",
    "NYUv2DataModule",
    "SyntheticScenes",
    "SyntheticScenesDataModule",
    "TwoDigitsDataModule",
    "flip_and_scale",
    "make_two_digits",
    "render_scene",
]
