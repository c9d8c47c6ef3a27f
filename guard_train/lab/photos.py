"""Natural-photo sources for the lab, cut into cells that are split between pretraining and the lab.

Why natural photos: SSCD keys on background texture. On flat procedural scenes a new instance of the same
caption scores *higher* than a near-copy, so a copy metric would call generalisation copying; crops of real photos
give every instance its own texture (docs/lab.md). The photos ship inside
scikit-image and scikit-learn, so nothing is downloaded.

Disjointness: each photo is cut into a grid of square cells; a fixed, seeded half of the cells belongs to the
*pretraining* stream of the base model and the other half to the *fine-tuning lab*. Crops never leave their cell,
so the base model never sees a pixel of a lab instance (otherwise its own memories would count as copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# name used in captions -> loader; the 7 photos whose tiles SSCD tells apart (measured when the lab was
# designed: rocket and retina were dropped because their crops are SSCD-copies of each other).
PHOTO_NAMES: tuple[str, ...] = ("astronaut", "cat", "coffee", "cells", "motorcycle", "temple", "flower")
GRID = 5  # cells along the short side
SPLIT_SEED = 20261123


def _load(name: str) -> np.ndarray:
    from skimage import data as skd

    if name == "astronaut":
        return skd.astronaut()
    if name == "cat":
        return skd.chelsea()
    if name == "coffee":
        return skd.coffee()
    if name == "cells":
        return skd.immunohistochemistry()
    if name == "motorcycle":
        return skd.stereo_motorcycle()[0]
    from sklearn.datasets import load_sample_images

    imgs = dict(zip(("temple", "flower"), load_sample_images().images))
    return imgs[name]


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """The photo as uint8 HxWx3 (read-only)."""
    img = np.ascontiguousarray(_load(name)[..., :3]).astype(np.uint8)
    img.setflags(write=False)
    return img


@dataclass(frozen=True)
class Cell:
    photo: str
    y: int  # top-left corner in photo pixels
    x: int
    size: int


@lru_cache(maxsize=None)
def cells(split: str, sub: int = 1) -> tuple[Cell, ...]:
    """All cells of the given split ("lab" or "pretrain"), in a fixed order.

    sub > 1 cuts every cell into sub × sub disjoint sub-cells (a lab of more instances than cells; they stay inside
    their cell, so the lab/pretrain split — and the base model's never having seen a lab pixel — is unchanged).
    """
    if split not in ("lab", "pretrain"):
        raise ValueError(f"split must be 'lab' or 'pretrain', got {split!r}")
    if sub < 1:
        raise ValueError(f"sub must be >= 1, got {sub}")
    if sub > 1:
        return tuple(Cell(c.photo, c.y + i * (c.size // sub), c.x + j * (c.size // sub), c.size // sub)
                     for c in cells(split) for i in range(sub) for j in range(sub))
    out: list[Cell] = []
    rng = np.random.default_rng(SPLIT_SEED)
    for name in PHOTO_NAMES:
        h, w = photo(name).shape[:2]
        s = min(h, w) // GRID
        grid = [Cell(name, r * s, c * s, s) for r in range(h // s) for c in range(w // s)]
        is_lab = rng.permutation(len(grid)) < len(grid) // 2
        out += [g for g, lab in zip(grid, is_lab) if lab == (split == "lab")]
    return tuple(out)


def crop(cell: Cell, rng: np.random.Generator, scale: tuple[float, float], out_px: int) -> np.ndarray:
    """A square crop of side scale×cell, placed at random inside the cell, resized to out_px (bicubic)."""
    from PIL import Image

    side = max(8, int(round(cell.size * rng.uniform(*scale))))
    oy = int(rng.integers(0, cell.size - side + 1))
    ox = int(rng.integers(0, cell.size - side + 1))
    patch = photo(cell.photo)[cell.y + oy : cell.y + oy + side, cell.x + ox : cell.x + ox + side]
    return np.asarray(Image.fromarray(patch).resize((out_px, out_px), Image.BICUBIC))
