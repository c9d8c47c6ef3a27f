"""The reference manifest: which training rows copy which, written beside an imagefolder dataset.

A dataset directory `root/` with `root/train/NNNNN.png` (imagefolder) may carry `root/manifest.jsonl`, one JSON
object per training row: `id` (the row; its image is `train/{id:05d}.png`), `instance` (the key every copy of one
image shares), `caption`, `is_dup` (the instance has duplicates in the training set) and `copy_kind` ("original"
for one row per instance, else "exact" / "near"); optional `root/held_out.jsonl` lists captions never trained on,
in the same shape. Extra fields are ignored. The lab writes this format; dedup clusters of user data can too.
The memorization callback and `guard-train eval` take their reference set (every row) and prompt groups
(duplicated / unique / held-out captions) from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ManifestRow:
    id: int
    instance: int
    caption: str
    is_dup: bool = False
    copy_kind: str = "original"


def _rows(path: Path) -> list[ManifestRow]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            out.append(ManifestRow(int(d["id"]), int(d["instance"]), str(d["caption"]), bool(d.get("is_dup", False)),
                                   str(d.get("copy_kind", "original"))))
    return out


def row_images(root: str | Path, ids: list[int]) -> np.ndarray:
    """The training images of rows `ids` (N, H, W, 3) uint8, from root/train/{id:05d}.png."""
    root = Path(root)
    return np.stack([np.asarray(Image.open(root / "train" / f"{i:05d}.png").convert("RGB")) for i in ids])


def read_reference(root: str | Path) -> tuple[list[ManifestRow], np.ndarray, list[ManifestRow]]:
    """Every training row of `root/manifest.jsonl`, their images, and the held-out rows (may be empty)."""
    root = Path(root)
    rows = _rows(root / "manifest.jsonl")
    return rows, row_images(root, [r.id for r in rows]), _rows(root / "held_out.jsonl")
