"""Image–caption datasets from the formats real data comes in, decoded defensively.

Sources (`data.source`):
  imagefolder  root/[train/]*.png + metadata.jsonl (`file_name`, caption column)     HF "imagefolder"
  parquet      LAION-style parquet: image bytes ({"bytes","path"} struct) or local paths     HF "parquet"
  hf_disk      a dataset saved with `Dataset.save_to_disk`                              datasets.load_from_disk
  webdataset   img2dataset's tar shards (key.jpg / key.txt / key.json)                   HF "webdataset"
  img2dataset  img2dataset's folder output (NNNNN/key.jpg + key.txt + key.json)          file scan
  lab          the procedural lab, written as imagefolder and read back through the same path as user data

Images are decoded by us (the column is cast to `Image(decode=False)`), so a broken file becomes a counted,
listed skip instead of an exception inside `datasets` (huggingface/datasets#6470). Paths from metadata are
confined to the dataset root.
"""

from __future__ import annotations

import glob
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # decompression-bomb guard (PIL's default warns at ~89 MP and errors at 2x)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
IMAGE_SUFFIXES = IMAGE_KEYS + ("bmp", "gif", "tif", "tiff")  # what an imagefolder may hold


class DataError(ValueError):
    """A dataset that cannot be used at all (missing, empty, no valid image); message says how to fix it."""


@dataclass
class Record:
    id: int
    caption: Any  # str or list[str] (several captions per image)
    image: Any  # PIL.Image | dict(bytes/path) | bytes | str path
    root: Optional[Path] = None


def _confined(root: Optional[Path], rel: str) -> Path:
    p = Path(rel)
    if root is None:
        return p
    full = (root / p).resolve() if not p.is_absolute() else p.resolve()
    if root.resolve() not in (full, *full.parents):
        raise DataError(f"path {rel!r} escapes the dataset root {str(root)!r}")
    return full


def decode_image(value: Any, root: Optional[Path] = None) -> Image.Image:
    """Decode to an RGB PIL image or raise (OSError/ValueError/DataError) with the reason."""
    if isinstance(value, Image.Image):
        img = value
    else:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = value, None
        elif isinstance(value, str):
            data, path = None, value
        else:
            raise ValueError(f"unsupported image value of type {type(value).__name__}")
        if data is None:
            if not path:
                raise ValueError("image has neither bytes nor a path")
            data = _confined(root, path).read_bytes()
        if not data:
            raise ValueError("zero-byte image")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
            except UnidentifiedImageError:  # its message names an in-memory buffer, not the problem
                raise ValueError("not an image file PIL can read (unknown or damaged format)") from None
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"image of {img.width}x{img.height} px exceeds the {MAX_PIXELS} px guard")
            img.load()  # raises on truncated files
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale to 8 bit, don't clip
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray((arr / max(arr.max(), 1.0) * 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def image_transform(resolution: int, center_crop: bool, random_flip: bool) -> Callable:
    """PIL → float tensor (3, R, R) in [-1, 1]: resize short side, crop, optional flip (rng given per call)."""

    def fn(img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        w, h = img.size
        s = resolution / min(w, h)
        if s != 1.0:
            img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = img.size
        if center_crop:
            left, top = (w - resolution) // 2, (h - resolution) // 2
        else:
            left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
        img = img.crop((left, top, left + resolution, top + resolution))
        if random_flip and rng.random() < 0.5:
            img = ImageOps.mirror(img)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return arr.float().div(127.5).sub(1.0)

    return fn


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Map-style dataset over `records(i)`; a broken item yields {"id", "error"} instead of raising."""

    def __init__(self, n: int, get: Callable[[int], Record], transform: Callable, seed: int = 0,
                 ids: Optional[Callable[[], list[int]]] = None):
        self.n, self.get, self.transform, self.seed = n, get, transform, seed
        self.epoch = 0
        self._ids = ids

    def item_ids(self) -> list[int]:
        """Dataset id of every index (without decoding images)."""
        return list(self._ids()) if self._ids else [self.get(i).id for i in range(self.n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rec = self.get(i)
        try:
            img = decode_image(rec.image, rec.root)
            if rec.caption is None:
                raise ValueError("missing caption")
            cap = rec.caption
            if isinstance(cap, bytes):
                cap = cap.decode("utf-8")  # UnicodeDecodeError is a ValueError: counted as bad
            rng = np.random.default_rng([self.seed, self.epoch, i])
            return {"id": rec.id, "pixel_values": self.transform(img, rng), "caption": cap}
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return {"id": rec.id, "error": f"{type(e).__name__}: {e}"[:300]}


def collate(batch: list[dict]) -> dict:
    good = [b for b in batch if "error" not in b]
    out: dict = {"bad": [(b["id"], b["error"]) for b in batch if "error" in b]}
    out["ids"] = torch.tensor([b["id"] for b in good], dtype=torch.long)
    out["captions"] = [b["caption"] for b in good]
    out["pixel_values"] = torch.stack([b["pixel_values"] for b in good]) if good else torch.empty(0)
    return out


# ----------------------------------------------------------------------------------------------------------------


def _hf_dataset(source: str, path: str, image_column: str):
    import datasets

    try:
        ds = _hf_load(source, path)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:  # empty folder, unreadable files, …
        if isinstance(e, DataError):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{source} dataset at {path!r} could not be read ({type(e).__name__}: {reason}). Check the "
                        f"path and that it holds {source} data") from None
    if image_column in ds.column_names and isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def _hf_load(source: str, path: str):
    import datasets

    if source == "imagefolder":
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"imagefolder root {path!r} is not a directory")
        if not any(p.suffix.lower().lstrip(".") in IMAGE_SUFFIXES for p in root.rglob("*") if p.is_file()):
            raise DataError(f"imagefolder root {path!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}); point "
                            f"data.path at the folder with the images and their metadata.jsonl")
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    elif source == "parquet":
        files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else (
            sorted(glob.glob(str(Path(path) / "*.parquet"))) if Path(path).is_dir() else [path])
        if not files:
            raise DataError(f"no parquet files at {path!r}")
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    elif source == "hf_disk":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    elif source == "webdataset":
        files = (sorted(glob.glob(path)) if any(c in path for c in "*?[")
                 else sorted(glob.glob(str(Path(path) / "*.tar"))))
        if not files:
            raise DataError(f"no .tar shards at {path!r}")
        ds = datasets.load_dataset("webdataset", data_files=files, split="train")
    else:
        raise DataError(f"unknown source {source!r}")
    return ds


def _img2dataset_records(root: Path) -> list[tuple[Path, Optional[Path], Optional[Path]]]:
    out = []
    for img in sorted(p for ext in IMAGE_KEYS for p in root.rglob(f"*.{ext}")):
        txt, js = img.with_suffix(".txt"), img.with_suffix(".json")
        out.append((img, txt if txt.exists() else None, js if js.exists() else None))
    return out


def build_dataset(source: str, path: str, image_column: str, caption_column: str, id_column: str,
                  transform: Callable, seed: int = 0, max_samples: int = 0) -> ImageCaptionDataset:
    """Map-style dataset for any supported on-disk source (see module doc)."""
    if source == "img2dataset":
        root = Path(path)
        recs = _img2dataset_records(root)
        if not recs:
            raise DataError(f"no images found under {path!r} (expected img2dataset output: key.jpg + key.txt)")
        if max_samples:
            recs = recs[:max_samples]

        def get(i: int) -> Record:
            img, txt, js = recs[i]
            cap = txt.read_bytes() if txt else None
            return Record(id=i, caption=cap, image=str(img.relative_to(root)), root=root)

        return ImageCaptionDataset(len(recs), get, transform, seed)

    ds = _hf_dataset(source, path, image_column)
    cols = ds.column_names
    if source == "webdataset":
        image_column = (image_column if image_column in cols
                        else next((k for k in IMAGE_KEYS if k in cols), image_column))
        caption_column = caption_column if caption_column in cols else ("txt" if "txt" in cols else caption_column)
    for what, col in (("image", image_column), ("caption", caption_column)):
        if col not in cols:
            raise DataError(f"{what} column {col!r} not found; the dataset has columns {cols}. "
                            f"Set data.{what}_column=<name>.")
    if id_column and id_column not in cols:
        raise DataError(f"id column {id_column!r} not found; columns are {cols}. Set data.id_column or leave it empty.")
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    root = Path(path) if Path(path).is_dir() else Path(path).parent

    def get(i: int) -> Record:
        row = ds[i]
        rid = int(row[id_column]) if id_column else i
        return Record(id=rid, caption=row[caption_column], image=row[image_column], root=root)

    if len(ds) == 0:
        raise DataError(f"dataset at {path!r} is empty")
    ids = (lambda: [int(x) for x in ds[id_column]]) if id_column else (lambda: list(range(len(ds))))
    return ImageCaptionDataset(len(ds), get, transform, seed, ids)


def write_bad_items(bad: list[tuple[int, str]], path: Path) -> None:
    path.write_text(json.dumps([{"id": i, "error": e} for i, e in bad], indent=1))


class StreamingImageCaptionDataset(torch.utils.data.IterableDataset):
    """For sets that do not fit in memory: HF `streaming=True`, split across ranks (`split_dataset_by_node`),
    shuffled with a seeded buffer per epoch, decoded defensively like the map-style path. Resume = skip the first
    `start` items of this rank's stream. Ids are the stream position × world + rank unless an id column is set."""

    def __init__(self, source: str, path: str, image_column: str, caption_column: str, id_column: str,
                 transform: Callable, seed: int, rank: int, world: int, shuffle_buffer: int = 1000):
        import datasets
        from datasets.distributed import split_dataset_by_node

        builder = {"imagefolder": "imagefolder", "parquet": "parquet", "webdataset": "webdataset"}.get(source)
        if builder is None:
            raise DataError(f"data.streaming supports imagefolder, parquet and webdataset, not {source!r}")
        kw = {"data_dir": path} if source == "imagefolder" else {"data_files": sorted(glob.glob(path)) or [path]}
        ds = datasets.load_dataset(builder, split="train", streaming=True, **kw)
        if image_column in (ds.features or {}) and isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world).shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.cols = (image_column, caption_column, id_column)
        self.transform, self.seed, self.rank, self.world = transform, seed, rank, world
        self.root = Path(path) if Path(path).is_dir() else Path(path).parent
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0
        self.ds.set_epoch(epoch)

    def start_at(self, k: int) -> None:
        self.start = k

    def __iter__(self):
        img_c, cap_c, id_c = self.cols
        for j, row in enumerate(self.ds):
            if j < self.start:
                continue
            rid = int(row[id_c]) if id_c else j * self.world + self.rank
            one = ImageCaptionDataset(1, lambda _: Record(rid, row.get(cap_c), row.get(img_c), self.root),
                                      self.transform, self.seed)
            one.epoch = self.epoch
            yield one[0]
