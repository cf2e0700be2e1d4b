"""A reader of the preprocessed NYUv2 of MTAN / CAGrad / Nash-MTL / FAMO / LibMTL (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_aw.datasets._augment import flip_and_scale
from lightning_aw.datasets._splits import _SplitDataModule

__all__ = ["NYUv2", "NYUv2DataModule"]

_FOLDERS = ("image", "label", "depth", "normal")


def _load(path: Path) -> Tensor:
    import numpy as np  # a dependency of torch's numpy bridge; imported where needed

    return torch.from_numpy(np.load(path))


class NYUv2(Dataset):
    """The preprocessed NYUv2 (13 classes, depth, normals at 288×384), read from ``.npy`` files.

    The layout of the preprocessed NYUv2 that MTAN (Liu, Johns & Davison, CVPR 2019,
    arXiv:1803.10704) released and CAGrad, Nash-MTL, FAMO and LibMTL reuse: ``root/<split>/
    {image,label,depth,normal}/<i>.npy`` for ``i = 0 .. n-1`` (795 training and 654 validation
    images), with ``image`` H×W×3 float in [0, 1], ``label`` H×W with classes 0..12 and −1 for
    unlabelled pixels, ``depth`` H×W×1 in metres (0 = missing), ``normal`` H×W×3 (0 = missing).
    This class downloads nothing: get the data from the MTAN repository's link and pass its
    folder.

    Items are dicts in the layout of :class:`~lightning_aw.datasets.SyntheticScenes`:
    ``image`` ``[3, H, W]`` float32, ``segmentation`` ``[H, W]`` int64 (−1 = ignore),
    ``depth`` ``[1, H, W]`` float32, ``normal`` ``[3, H, W]`` float32.

    Args:
        root: the folder that holds ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        augmentation: random scale-crop and flip (:func:`~lightning_aw.datasets.flip_and_scale`);
            off by default (MTAN's baselines train without it; Nash-MTL and FAMO with it).

    Raises:
        FileNotFoundError: when ``root/<split>/image`` holds no ``.npy`` file, or a file of the
            other three folders is missing.

    Example::

        >>> import tempfile, numpy as np
        >>> from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> for name, shape in [("image", (4, 6, 3)), ("label", (4, 6)), ("depth", (4, 6, 1)),
        ...                     ("normal", (4, 6, 3))]:
        ...     (root / "train" / name).mkdir(parents=True)
        ...     np.save(root / "train" / name / "0.npy", np.zeros(shape, np.float32))
        >>> item = NYUv2(root)[0]
        >>> {k: list(v.shape) for k, v in item.items()}
        {'image': [3, 4, 6], 'segmentation': [4, 6], 'depth': [1, 4, 6], 'normal': [3, 4, 6]}
    """

    def __init__(self, root: str | Path, split: str = "train", augmentation: bool = False) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"Parameter `split` should be 'train' or 'val'. Found {split!r}.")
        self.root, self.split, self.augmentation = Path(root).expanduser(), split, augmentation
        self.folder = self.root / split
        images = self.folder / "image"
        self.length = len(list(images.glob("*.npy"))) if images.is_dir() else 0
        if self.length == 0:
            raise FileNotFoundError(
                f"NYUv2: no .npy file in {images}. Expected the preprocessed NYUv2 layout "
                "root/{train,val}/{image,label,depth,normal}/<i>.npy (MTAN's release); pass its "
                "folder as `root`."
            )
        for folder in _FOLDERS:
            last = self.folder / folder / f"{self.length - 1}.npy"
            if not last.is_file():
                raise FileNotFoundError(
                    f"NYUv2: {last} is missing ({self.length} images in {images}); every folder "
                    f"of {list(_FOLDERS)} needs files 0..{self.length - 1}.npy."
                )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"NYUv2 index {index} out of range [0, {self.length}).")
        image, label, depth, normal = (
            _load(self.folder / folder / f"{index}.npy") for folder in _FOLDERS
        )
        sample = {
            "image": image.float().permute(2, 0, 1).contiguous(),
            "segmentation": label.round().long(),  # stored as float with -1 for "unlabelled"
            "depth": depth.float().permute(2, 0, 1).contiguous(),
            "normal": normal.float().permute(2, 0, 1).contiguous(),
        }
        return flip_and_scale(sample) if self.augmentation else sample


class NYUv2DataModule(_SplitDataModule):
    """The preprocessed NYUv2 (:class:`NYUv2`) as a LightningDataModule of dict batches.

    Args:
        root: the folder that holds ``train/`` and ``val/``.
        batch_size: batch size of both loaders (Nash-MTL and FAMO train with 2).
        num_workers: DataLoader workers.
        augmentation: scale-crop and flip the training images (off by default).
        seed: seed of the shuffling.

    Example::

        >>> import tempfile, numpy as np
        >>> from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> for split in ("train", "val"):
        ...     for name, shape in [("image", (4, 6, 3)), ("label", (4, 6)),
        ...                         ("depth", (4, 6, 1)), ("normal", (4, 6, 3))]:
        ...         (root / split / name).mkdir(parents=True)
        ...         for i in range(3):
        ...             np.save(root / split / name / f"{i}.npy", np.zeros(shape, np.float32))
        >>> dm = NYUv2DataModule(root, batch_size=2)
        >>> dm.setup("fit")
        >>> len(dm.train_dataloader()), next(iter(dm.val_dataloader()))["image"].shape
        (2, torch.Size([2, 3, 4, 6]))
    """

    tasks = ("seg", "depth", "normal")
    num_classes = 13

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 8,
        num_workers: int = 0,
        augmentation: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root, self.batch_size, self.num_workers = root, batch_size, num_workers
        self.augmentation, self.seed = augmentation, seed
        self._train: NYUv2 | None = None
        self._val: NYUv2 | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._val is None:
            self._val = NYUv2(self.root, "val")
        if self._train is None and stage in (None, "fit"):
            self._train = NYUv2(self.root, "train", augmentation=self.augmentation)
