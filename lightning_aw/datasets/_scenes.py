"""SyntheticScenes: procedurally rendered rooms with NYUv2's three dense tasks, no download.

Each scene is a box-shaped room (floor, ceiling, walls) seen by a pinhole camera, furnished with
random boxes (beds, sofas, tables, chairs, cabinets, books), spheres and cylinders (objects), and
rectangles on the walls (pictures, TVs, windows). A vectorised ray caster finds the nearest
surface of every pixel: its class, its depth along the optical axis and its unit normal. The
image is the class colour, shaded by a directional light, with a checkered floor, distance
falloff and noise.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_aw.datasets._augment import flip_and_scale
from lightning_aw.datasets._splits import _SplitDataModule

__all__ = ["SCENE_CLASSES", "SyntheticScenes", "SyntheticScenesDataModule", "render_scene"]

#: The 13 classes, index -> name: the names of NYUv2's 13-class protocol (Couprie et al. 2013,
#: used by MTAN / Nash-MTL / FAMO) in the alphabetical order of its usual class mapping. Only the
#: names are borrowed: nothing relies on the order matching the preprocessed NYUv2 labels. Label
#: −1 marks pixels without a label (here: objects left unlabelled, as NYUv2's annotators left
#: some).
SCENE_CLASSES: tuple[str, ...] = (
    "bed",  # 0: a wide, low box
    "books",  # 1: a small box, often on a table
    "ceiling",  # 2
    "chair",  # 3: a small, tall box
    "floor",  # 4: checkered
    "furniture",  # 5: a tall cabinet
    "objects",  # 6: spheres and cylinders
    "picture",  # 7: a rectangle on a wall
    "sofa",  # 8: a wide box
    "table",  # 9: a box
    "tv",  # 10: a dark rectangle on a wall
    "wall",  # 11
    "window",  # 12: a bright rectangle on a wall; no depth (0) and no normal, like a Kinect
)
BED, BOOKS, CEILING, CHAIR, FLOOR, FURNITURE, OBJECTS, PICTURE, SOFA, TABLE, TV, WALL, WINDOW = (
    range(13)
)
IGNORE_INDEX = -1

# base colours (RGB in [0, 1]); each object gets a random tint around its class colour
_PALETTE = torch.tensor(
    [
        [0.75, 0.55, 0.55],  # bed
        [0.85, 0.25, 0.20],  # books
        [0.92, 0.92, 0.88],  # ceiling
        [0.45, 0.30, 0.20],  # chair
        [0.60, 0.45, 0.30],  # floor
        [0.55, 0.40, 0.25],  # furniture
        [0.30, 0.55, 0.75],  # objects
        [0.80, 0.70, 0.30],  # picture
        [0.35, 0.45, 0.35],  # sofa
        [0.65, 0.50, 0.35],  # table
        [0.08, 0.08, 0.10],  # tv
        [0.80, 0.78, 0.70],  # wall
        [0.75, 0.90, 1.00],  # window
    ]
)
# box classes and their half-sizes (x, y, z) in metres: (low, high)
_BOXES = {
    BED: ((0.8, 1.0), (0.22, 0.30), (0.9, 1.1)),
    SOFA: ((0.8, 1.1), (0.35, 0.45), (0.4, 0.5)),
    TABLE: ((0.4, 0.7), (0.35, 0.40), (0.3, 0.5)),
    CHAIR: ((0.2, 0.28), (0.4, 0.5), (0.2, 0.28)),
    FURNITURE: ((0.3, 0.6), (0.6, 1.0), (0.2, 0.3)),
    BOOKS: ((0.1, 0.2), (0.04, 0.12), (0.1, 0.15)),
}
_BOX_CLASSES = tuple(_BOXES)
_MAX_BOXES, _MAX_SPHERES, _MAX_CYLINDERS, _MAX_RECTS = 5, 2, 2, 3
_UNLABELLED = 0.12  # probability that an object is left unlabelled (label -1)
_EPS = 1e-4
_INF = float("inf")


def _uniform(g: torch.Generator, low: float, high: float, n: int = 1) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _rot_y(angle: Tensor) -> Tensor:
    """Rotations about the (downward) y axis, ``[K, 3, 3]``."""
    c, s = torch.cos(angle), torch.sin(angle)
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(-1, 3, 3)


def _camera(g: torch.Generator) -> Tensor:
    """A camera rotation (camera -> world): yaw, then a downward pitch, then a slight roll."""
    yaw, pitch, roll = (math.radians(float(_uniform(g, *r))) for r in ((-15, 15), (0, 20), (-3, 3)))
    cy, sy, cp, sp, cr, sr = (
        math.cos(yaw),
        math.sin(yaw),
        math.cos(pitch),
        math.sin(pitch),
        math.cos(roll),
        math.sin(roll),
    )
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = torch.tensor([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])  # +pitch looks down (y is down)
    rz = torch.tensor([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return ry @ rx @ rz


def _rays(height: int, width: int, fov: float) -> Tensor:
    """Unit ray directions of a pinhole camera, ``[H*W, 3]`` (x right, y down, z forward)."""
    f = (width / 2) / math.tan(math.radians(fov) / 2)
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float32) + 0.5,
        torch.arange(width, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    d = torch.stack([(u - width / 2) / f, (v - height / 2) / f, torch.ones_like(u)], -1)
    return F.normalize(d.reshape(-1, 3), dim=-1)


def _hit_boxes(d: Tensor, center: Tensor, half: Tensor, yaw: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest hit of rays from the origin with yawed boxes: ``t [N, K]``, normals ``[N, K, 3]``."""
    rot = _rot_y(yaw)  # box -> world
    o_local = -torch.einsum("kji,kj->ki", rot, center)  # R^T (0 - c)
    d_local = torch.einsum("kji,nj->nki", rot, d)  # R^T d
    d_safe = torch.where(d_local.abs() < 1e-9, torch.full_like(d_local, 1e-9), d_local)
    t1 = (-half - o_local) / d_safe
    t2 = (half - o_local) / d_safe
    t_near, axis = torch.minimum(t1, t2).max(-1)
    t_far = torch.maximum(t1, t2).min(-1).values
    hit = (t_near <= t_far) & (t_near > _EPS)
    t = torch.where(hit, t_near, _INF)
    sign = -torch.sign(torch.gather(d_local, -1, axis.unsqueeze(-1)))
    n_local = F.one_hot(axis, 3).to(d) * sign
    return t, torch.einsum("kij,nkj->nki", rot, n_local)


def _hit_spheres(d: Tensor, center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    b = d @ center.T  # [N, M]
    disc = b**2 - ((center**2).sum(-1) - radius**2)
    t = b - disc.clamp(min=0).sqrt()
    t = torch.where((disc > 0) & (t > _EPS), t, _INF)
    point = t.unsqueeze(-1).clamp(max=1e4) * d.unsqueeze(1)
    return t, (point - center) / radius.unsqueeze(-1)


def _hit_cylinders(
    d: Tensor, center: Tensor, radius: Tensor, top: Tensor, bottom: Tensor
) -> tuple[Tensor, Tensor]:
    """Vertical cylinders (axis along y) between ``top`` and ``bottom`` (y grows downwards)."""
    dx, dy, dz = d[:, :1], d[:, 1:2], d[:, 2:]
    cx, cz = center[:, 0], center[:, 2]
    a = (dx**2 + dz**2).clamp(min=1e-12)
    b = dx * cx + dz * cz
    disc = b**2 - a * (cx**2 + cz**2 - radius**2)
    t_side = (b - disc.clamp(min=0).sqrt()) / a
    y = t_side * dy
    side = (disc > 0) & (t_side > _EPS) & (y >= top) & (y <= bottom)
    t_side = torch.where(side, t_side, _INF)
    dy_safe = torch.where(dy.abs() < 1e-9, torch.full_like(dy, 1e-9), dy)
    t_cap = top / dy_safe
    radial = (t_cap * dx - cx) ** 2 + (t_cap * dz - cz) ** 2
    t_cap = torch.where((t_cap > _EPS) & (radial <= radius**2), t_cap, _INF)
    use_cap = t_cap < t_side
    t = torch.minimum(t_side, t_cap)
    px, pz = t_side.clamp(max=1e4) * dx - cx, t_side.clamp(max=1e4) * dz - cz
    n_side = torch.stack([px, torch.zeros_like(px), pz], -1) / radius.unsqueeze(-1)
    n_cap = torch.zeros_like(n_side)
    n_cap[..., 1] = -torch.sign(dy).expand_as(t)
    return t, torch.where(use_cap.unsqueeze(-1), n_cap, n_side)


def render_scene(
    generator: torch.Generator, height: int = 72, width: int = 96, noise: float = 0.02
) -> dict[str, Tensor]:
    """Render one random room; the draws come from ``generator`` only.

    Args:
        generator: a CPU ``torch.Generator`` (the scene is a function of its state).
        height: image height in pixels.
        width: image width in pixels.
        noise: standard deviation of the Gaussian noise added to the image.

    Returns:
        ``{"image": [3, H, W] float in [0, 1], "segmentation": [H, W] int64 (0..12, −1 =
        unlabelled), "depth": [1, H, W] float metres (0 = invalid), "normal": [3, H, W] unit
        vectors in camera coordinates (x right, y down, z forward; facing the camera; 0 =
        invalid)}``.

    Example::

        >>> import torch
        >>> scene = render_scene(torch.Generator().manual_seed(0), height=24, width=32)
        >>> {k: list(v.shape) for k, v in scene.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'image': [3, 24, 32], 'segmentation': [24, 32], 'depth': [1, 24, 32],
         'normal': [3, 24, 32]}
    """
    g = generator
    # room: the camera at the origin, floor at y = cam_height (y points down), back wall at z = D
    cam_height = float(_uniform(g, 1.2, 1.6))
    room_height = float(_uniform(g, 2.5, 3.0))
    depth_back = float(_uniform(g, 4.0, 7.0))
    left, right = float(_uniform(g, 1.8, 3.2)), float(_uniform(g, 1.8, 3.2))
    rotation = _camera(g)
    d_cam = _rays(height, width, fov=62.0)
    d = d_cam @ rotation.T  # world directions
    n = d.shape[0]

    # planes: floor, ceiling, back, left, right, front
    planes = [
        (1, cam_height, FLOOR, (0.0, -1.0, 0.0)),
        (1, cam_height - room_height, CEILING, (0.0, 1.0, 0.0)),
        (2, depth_back, WALL, (0.0, 0.0, -1.0)),
        (0, -left, WALL, (1.0, 0.0, 0.0)),
        (0, right, WALL, (-1.0, 0.0, 0.0)),
        (2, -1.0, WALL, (0.0, 0.0, 1.0)),
    ]
    t_planes = []
    for axis, offset, _, _ in planes:
        comp = d[:, axis]
        comp = torch.where(comp.abs() < 1e-9, torch.full_like(comp, 1e-9), comp)
        t = offset / comp
        t_planes.append(torch.where(t > _EPS, t, _INF))
    t_all = [torch.stack(t_planes, -1)]
    n_all = [torch.tensor([p[3] for p in planes]).expand(n, -1, -1)]
    labels = [p[2] for p in planes]
    tints = [torch.zeros(3) for _ in planes]

    # boxes on the floor (books may lie on a table)
    num_boxes = int(torch.randint(2, _MAX_BOXES + 1, (1,), generator=g))
    centers, halves, yaws = [], [], []
    table_top = None
    for _ in range(num_boxes):
        cls = _BOX_CLASSES[int(torch.randint(len(_BOX_CLASSES), (1,), generator=g))]
        half = torch.cat([_uniform(g, *r) for r in _BOXES[cls]])
        x = float(_uniform(g, -left + 0.6, right - 0.6))
        z = float(_uniform(g, 2.2, depth_back - 0.6))
        base = cam_height
        if cls == BOOKS and table_top is not None:
            x, z, base = table_top
        if cls == FURNITURE:  # cabinets stand against the back wall
            z = depth_back - float(half[2]) - 0.01
        centers.append(torch.tensor([x, base - float(half[1]), z]))
        halves.append(half)
        yaws.append(_uniform(g, -0.6, 0.6) if cls != FURNITURE else torch.zeros(1))
        if cls == TABLE:
            table_top = (x, z, cam_height - 2 * float(half[1]))
        unlabelled = float(torch.rand(1, generator=g)) < _UNLABELLED
        labels.append(IGNORE_INDEX if unlabelled else cls)
        tints.append(_uniform(g, -0.08, 0.08, 3))
    t, normal = _hit_boxes(d, torch.stack(centers), torch.stack(halves), torch.cat(yaws))
    t_all.append(t)
    n_all.append(normal)

    # spheres resting on the floor, cylinders standing on it
    num_spheres = int(torch.randint(0, _MAX_SPHERES + 1, (1,), generator=g))
    num_cylinders = int(torch.randint(0, _MAX_CYLINDERS + 1, (1,), generator=g))
    if num_spheres:
        radius = _uniform(g, 0.12, 0.35, num_spheres)
        x = _uniform(g, -left + 0.5, right - 0.5, num_spheres)
        z = _uniform(g, 1.5, depth_back - 0.5, num_spheres)
        center = torch.stack([x, cam_height - radius, z], -1)
        t, normal = _hit_spheres(d, center, radius)
        t_all.append(t)
        n_all.append(normal)
    if num_cylinders:
        radius = _uniform(g, 0.1, 0.3, num_cylinders)
        tall = _uniform(g, 0.3, 1.2, num_cylinders)
        x = _uniform(g, -left + 0.5, right - 0.5, num_cylinders)
        z = _uniform(g, 1.5, depth_back - 0.5, num_cylinders)
        center = torch.stack([x, torch.full_like(x, cam_height), z], -1)
        t, normal = _hit_cylinders(
            d, center, radius, cam_height - tall, torch.full_like(x, cam_height)
        )
        t_all.append(t)
        n_all.append(normal)
    for _ in range(num_spheres + num_cylinders):
        unlabelled = float(torch.rand(1, generator=g)) < _UNLABELLED
        labels.append(IGNORE_INDEX if unlabelled else OBJECTS)
        tints.append(_uniform(g, -0.15, 0.15, 3))

    # nearest surface of every ray
    t_cat = torch.cat(t_all, -1)
    n_cat = torch.cat(n_all, 1)
    t_hit, which = t_cat.min(-1)
    normal = torch.gather(n_cat, 1, which.view(-1, 1, 1).expand(-1, 1, 3)).squeeze(1)
    label = torch.tensor(labels)[which]
    colour = (_PALETTE[label.clamp(min=0)] + torch.stack(tints)[which]).clamp(0, 1)
    colour[label == IGNORE_INDEX] = torch.stack(tints)[which][label == IGNORE_INDEX] + 0.5
    point = t_hit.unsqueeze(-1) * d
    valid = torch.ones(n, dtype=torch.bool)

    # rectangles on the back and side walls: pictures, TVs, windows
    num_rects = int(torch.randint(1, _MAX_RECTS + 1, (1,), generator=g))
    for _ in range(num_rects):
        cls = (PICTURE, TV, WINDOW)[int(torch.randint(3, (1,), generator=g))]
        wall = 2 + int(torch.randint(3, (1,), generator=g))  # plane index: back, left, right
        span = (-left, right) if wall == 2 else (1.0, depth_back)
        w, h = float(_uniform(g, 0.4, 1.2)), float(_uniform(g, 0.3, 0.9))
        u0 = float(_uniform(g, span[0] + 0.1, max(span[0] + 0.2, span[1] - w - 0.1)))
        v0 = float(_uniform(g, cam_height - room_height + 0.3, cam_height - 0.8 - h))
        u = point[:, 0] if wall == 2 else point[:, 2]
        inside = (
            (which == wall)
            & (u >= u0)
            & (u <= u0 + w)
            & (point[:, 1] >= v0)
            & (point[:, 1] <= v0 + h)
        )
        label = torch.where(inside, cls, label)
        colour[inside] = _PALETTE[cls]
        if cls == WINDOW:
            valid &= ~inside

    # checkered floor, Lambertian light from above, distance falloff, noise
    floor = label == FLOOR
    checker = ((point[:, 0] * 2).floor() + (point[:, 2] * 2).floor()).remainder(2)
    colour[floor] *= (0.8 + 0.2 * checker[floor]).unsqueeze(-1)
    light = F.normalize(
        torch.cat([_uniform(g, -0.5, 0.5), torch.tensor([-1.0]), _uniform(g, -0.5, 0.2)]), dim=0
    )
    shade = 0.5 + 0.5 * (normal @ light).clamp(min=0)
    shade = torch.where(label == WINDOW, torch.ones_like(shade), shade)
    depth = t_hit * d_cam[:, 2]  # along the optical axis
    image = colour * (shade / (1 + 0.04 * depth)).unsqueeze(-1)
    image = image + noise * torch.randn(image.shape, generator=g)
    normal_cam = F.normalize(normal @ rotation, dim=-1)  # world -> camera: R^T n
    normal_cam = torch.where(valid.unsqueeze(-1), normal_cam, 0.0)
    depth = torch.where(valid, depth, 0.0)
    return {
        "image": image.clamp(0, 1).T.reshape(3, height, width).contiguous(),
        "segmentation": label.reshape(height, width).long(),
        "depth": depth.reshape(1, height, width),
        "normal": normal_cam.T.reshape(3, height, width).contiguous(),
    }


def _scene_seed(seed: int, index: int, stream: int) -> int:
    # torch's CPU generator keeps 32 bits of its seed: hash the triple into them
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class SyntheticScenes(Dataset):
    """Procedurally rendered indoor scenes with segmentation, depth and normals (no download).

    A stand-in for NYUv2 with the same tasks and output layout as
    :class:`~lightning_aw.datasets.NYUv2`: 13 classes named after NYUv2's 13-class protocol
    (:data:`SCENE_CLASSES`), metric depth, unit surface normals. Item ``i`` is rendered by
    :func:`render_scene` from a generator seeded with ``(seed, split, i)`` only: the same
    arguments give the same scene on any machine and in any worker; two indices or two splits
    give different scenes. Rendering is vectorised over pixels (a few milliseconds per scene at
    72×96); ``cache=True`` keeps rendered scenes in memory (about 0.15 MB each at 72×96).

    Item layout (a dict): ``image`` ``[3, H, W]`` float in [0, 1]; ``segmentation`` ``[H, W]``
    int64, class 0..12 or −1 (unlabelled: an object left unlabelled, about 12 % of objects);
    ``depth`` ``[1, H, W]`` metres along the optical axis, 0 where invalid (windows, as a Kinect
    sees glass); ``normal`` ``[3, H, W]`` unit vectors in camera coordinates (x right, y down,
    z forward), facing the camera, 0 where invalid (windows).

    Args:
        num_scenes: dataset length.
        height: image height (default 72; NYUv2's 288×384 has the same 3:4 aspect).
        width: image width (default 96).
        seed: seed of the scene stream.
        split: ``"train"`` or ``"val"`` (independent streams).
        noise: standard deviation of the image noise.
        augmentation: random horizontal flip and scale-crop (see
            :func:`~lightning_aw.datasets.flip_and_scale`); off by default.
        cache: keep rendered scenes in memory.

    Example::

        >>> data = SyntheticScenes(4, height=24, width=32, seed=0)
        >>> item = data[1]
        >>> item["image"].shape, item["segmentation"].dtype, item["depth"].shape
        (torch.Size([3, 24, 32]), torch.int64, torch.Size([1, 24, 32]))
        >>> bool((data[1]["depth"] == item["depth"]).all())  # deterministic
        True
    """

    def __init__(
        self,
        num_scenes: int,
        height: int = 72,
        width: int = 96,
        seed: int = 0,
        split: str = "train",
        noise: float = 0.02,
        augmentation: bool = False,
        cache: bool = False,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"Parameter `split` should be 'train' or 'val'. Found {split!r}.")
        if num_scenes < 1:
            raise ValueError(f"Parameter `num_scenes` should be >= 1. Found {num_scenes!r}.")
        if height < 4 or width < 4:
            raise ValueError(
                f"Parameters `height` and `width` should be >= 4. Found {height}x{width}."
            )
        self.num_scenes, self.height, self.width = num_scenes, height, width
        self.seed, self.split, self.noise = seed, split, noise
        self.augmentation, self.cache = augmentation, cache
        self._cache: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return self.num_scenes

    def render(self, index: int) -> dict[str, Tensor]:
        """Scene ``index`` without augmentation."""
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"Scene index {index} out of range [0, {self.num_scenes}).")
        if index in self._cache:
            return self._cache[index]
        stream = 0 if self.split == "train" else 1
        g = torch.Generator().manual_seed(_scene_seed(self.seed, index, stream))
        scene = render_scene(g, self.height, self.width, self.noise)
        if self.cache:
            self._cache[index] = scene
        return scene

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        scene = self.render(index)
        return flip_and_scale(scene) if self.augmentation else dict(scene)


class SyntheticScenesDataModule(_SplitDataModule):
    """Train and validation :class:`SyntheticScenes` in DataLoaders of dict batches.

    Args:
        num_train: training scenes (NYUv2 has 795).
        num_val: validation scenes (NYUv2 has 654).
        height: image height.
        width: image width.
        batch_size: batch size of both loaders.
        seed: seed of the scenes and of the shuffling.
        num_workers: DataLoader workers.
        augmentation: flip and scale-crop the training scenes.
        cache: keep rendered scenes in memory (default True: each is rendered once).

    Example::

        >>> dm = SyntheticScenesDataModule(num_train=8, num_val=4, height=24, width=32,
        ...                                batch_size=4)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> {k: list(v.shape) for k, v in batch.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'image': [4, 3, 24, 32], 'segmentation': [4, 24, 32], 'depth': [4, 1, 24, 32],
         'normal': [4, 3, 24, 32]}
    """

    tasks = ("seg", "depth", "normal")
    num_classes = len(SCENE_CLASSES)

    def __init__(
        self,
        num_train: int = 800,
        num_val: int = 200,
        height: int = 72,
        width: int = 96,
        batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        augmentation: bool = False,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self.num_train, self.num_val = num_train, num_val
        self.height, self.width = height, width
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.augmentation, self.cache = augmentation, cache
        self._train: SyntheticScenes | None = None
        self._val: SyntheticScenes | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            common = {"height": self.height, "width": self.width, "seed": self.seed}
            self._train = SyntheticScenes(
                self.num_train, augmentation=self.augmentation, cache=self.cache, **common
            )
            self._val = SyntheticScenes(self.num_val, split="val", cache=self.cache, **common)
