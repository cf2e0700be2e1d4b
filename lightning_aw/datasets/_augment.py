"""The standard NYUv2 augmentation (random scale-crop and horizontal flip) on dense-task dicts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flip_and_scale"]


def flip_and_scale(
    sample: dict[str, Tensor],
    scales: tuple[float, ...] = (1.0, 1.2, 1.5),
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Random scale-crop, then a horizontal flip with probability 1/2, of one dense-task sample.

    The augmentation the NYUv2 multi-task literature applies when it applies one (the
    PAD-Net / MTI-Net recipe used by the public MTAN, CAGrad and Nash-MTL code): pick a scale
    ``s`` from ``scales``, crop a random window of ``1/s`` of the height and width, resize it back
    (image bilinear; labels, depth and validity nearest), divide depth by ``s`` (the scene looks
    ``s`` times closer); a flip mirrors every map and negates the normals' x component. Resized
    normals are renormalised to unit length; invalid pixels (depth 0, normal 0) stay invalid.

    Args:
        sample: ``{"image": [3, H, W], "segmentation": [H, W], "depth": [1, H, W],
            "normal": [3, H, W]}``.
        scales: the scales to draw from.
        generator: source of the random draws (default: torch's global generator, which
            DataLoader workers seed).

    Returns:
        A new dict with the same keys, shapes and dtypes.

    Example::

        >>> import torch
        >>> x_axis = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 6, 8)
        >>> sample = {"image": torch.rand(3, 6, 8), "segmentation": torch.zeros(6, 8).long(),
        ...           "depth": torch.ones(1, 6, 8), "normal": x_axis}
        >>> gen = torch.Generator().manual_seed(1)
        >>> out = flip_and_scale(sample, scales=(1.0,), generator=gen)
        >>> {k: list(v.shape) for k, v in out.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'image': [3, 6, 8], 'segmentation': [6, 8], 'depth': [1, 6, 8], 'normal': [3, 6, 8]}
        >>> sorted(set(out["normal"][0].flatten().tolist()))  # flipped or not: x = -1 or +1
        [-1.0]
    """
    image, seg, depth, normal = (
        sample["image"],
        sample["segmentation"],
        sample["depth"],
        sample["normal"],
    )
    height, width = image.shape[-2:]
    scale = scales[int(torch.randint(len(scales), (1,), generator=generator))]
    if scale != 1.0:
        h, w = int(height / scale), int(width / scale)
        i = int(torch.randint(height - h + 1, (1,), generator=generator))
        j = int(torch.randint(width - w + 1, (1,), generator=generator))
        size = (height, width)

        def crop(x: Tensor) -> Tensor:
            return x[..., i : i + h, j : j + w].unsqueeze(0)

        image = F.interpolate(crop(image), size, mode="bilinear", align_corners=True)[0]
        seg = F.interpolate(crop(seg[None].float()), size, mode="nearest")[0, 0].to(seg.dtype)
        depth = F.interpolate(crop(depth), size, mode="nearest")[0] / scale
        valid = F.interpolate(crop((normal != 0).any(0, keepdim=True).float()), size)[0] > 0
        normal = F.interpolate(crop(normal), size, mode="bilinear", align_corners=True)[0]
        normal = torch.where(valid, F.normalize(normal, dim=0), 0.0)
    if float(torch.rand(1, generator=generator)) < 0.5:
        image, seg, depth, normal = (x.flip(-1) for x in (image, seg, depth, normal))
        normal = normal * torch.tensor([-1.0, 1.0, 1.0], dtype=normal.dtype).view(3, 1, 1)
    return {"image": image, "segmentation": seg, "depth": depth, "normal": normal}
