"""The memorization lab: a procedural, captioned stand-in for a LAION subset, with planted duplicates.

Each instance = a crop of a natural photo (its own texture, so SSCD can tell a copy from a new instance) with
1–2 coloured shapes drawn on it, and a web-style caption built from its attributes. A configurable fraction of
instances is repeated k times, as exact copies or near-copies (small crop + brightness jitter + pixel noise), with
the same caption (Somepalli et al.'s *dup_both*) or a re-phrased caption of the same attributes (*dup_image*).
The ground truth goes into a manifest (one row per training item) that tests and metrics read.

Everything is a pure function of (config, seed): the same seed gives byte-identical images.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from guard_train.config.params import check_dataclass, ranged
from guard_train.data.manifest import row_images
from guard_train.lab import photos

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
# Web-caption-like phrasings; every one names all attributes so a caption always describes its image.
TEMPLATES: tuple[str, ...] = (
    "{shapes} on a {photo} photo",
    "{shapes} over a {photo} background",
    "photo of a {photo} with {shapes}",
    "{shapes}, {photo} texture, stock image",
)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: int
    cy: int
    size: int


@dataclass(frozen=True)
class Scene:
    photo: str
    shapes: tuple[Shape, ...]

    def caption(self, template: int = 0) -> str:
        words = " and ".join(_article(f"{s.color} {s.kind}") for s in self.shapes)
        return TEMPLATES[template % len(TEMPLATES)].format(shapes=words, photo=self.photo)

    def attributes(self) -> dict:
        return {"photo": self.photo, "shapes": [[s.color, s.kind] for s in self.shapes]}


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def all_captions() -> Iterator[str]:
    """Every caption the lab's grammar can write: photo × one or two coloured shapes × template (16,800). These are
    the texts the embedded tiny SD must encode exactly, so its vocabulary is trimmed to them (`tiny_sd`)."""
    singles = [(color, kind) for color in COLORS for kind in SHAPES]
    for photo in photos.PHOTO_NAMES:
        for combo in itertools.chain(([s] for s in singles), itertools.product(singles, repeat=2)):
            scene = Scene(photo, tuple(Shape(kind, color, 0, 0, 0) for color, kind in combo))
            yield from (scene.caption(t) for t in range(len(TEMPLATES)))


def random_scene(rng: np.random.Generator, photo: str, px: int) -> Scene:
    n = int(rng.integers(1, 3))
    lo, hi = int(round(0.22 * px)), int(round(0.39 * px))  # 14–25 px at 64 px
    shapes = []
    for _ in range(n):
        size = int(rng.integers(lo, hi + 1))
        shapes.append(
            Shape(
                kind=SHAPES[int(rng.integers(len(SHAPES)))],
                color=list(COLORS)[int(rng.integers(len(COLORS)))],
                cx=int(rng.integers(size // 2, px - size // 2)),
                cy=int(rng.integers(size // 2, px - size // 2)),
                size=size,
            )
        )
    return Scene(photo, tuple(shapes))


def draw(background: np.ndarray, scene: Scene) -> np.ndarray:
    img = Image.fromarray(background.copy())
    d = ImageDraw.Draw(img)
    for s in scene.shapes:
        h = s.size // 2
        box = (s.cx - h, s.cy - h, s.cx + h, s.cy + h)
        col = COLORS[s.color]
        if s.kind == "circle":
            d.ellipse(box, fill=col)
        elif s.kind == "square":
            d.rectangle(box, fill=col)
        else:
            d.polygon([(s.cx, s.cy - h), (s.cx - h, s.cy + h), (s.cx + h, s.cy + h)], fill=col)
    return np.asarray(img)


def near_copy(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-duplicate as web re-uploads make them: ~90 % crop resized back, ±10 % brightness, N(0, 4) noise."""
    px = img.shape[0]
    side = int(round(px * rng.uniform(0.88, 0.94)))
    oy, ox = (int(rng.integers(0, px - side + 1)) for _ in range(2))
    out = Image.fromarray(img[oy : oy + side, ox : ox + side]).resize((px, px), Image.BICUBIC)
    arr = np.asarray(out).astype(np.float32) * rng.uniform(0.9, 1.1) + rng.normal(0, 4, img.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Pretraining stream (base model): endless fresh scenes from the *pretrain* cells, never a lab pixel.


def pretrain_stream(seed: int, px: int = 64, start: int = 0) -> Iterator[tuple[np.ndarray, str]]:
    """Yields (uint8 image, caption) forever; item i depends only on (seed, i), so a stream can resume at `start`."""
    pool = photos.cells("pretrain")
    i = start
    while True:
        rng = np.random.default_rng([seed, i])
        cell = pool[int(rng.integers(len(pool)))]
        bg = photos.crop(cell, rng, scale=(0.6, 1.0), out_px=px)
        if rng.random() < 0.5:
            bg = bg[:, ::-1]
        scene = random_scene(rng, cell.photo, px)
        yield draw(bg, scene), scene.caption(int(rng.integers(len(TEMPLATES))))
        i += 1


# ----------------------------------------------------------------------------------------------------------------
# The fine-tuning lab.


@dataclass
class LabConfig:
    # distinct images (≤ number of lab cells: one cell each, so crops never overlap)
    num_instances: int = ranged(64, ge=1)
    dup_fraction: float = ranged(0.125, ge=0, le=1)  # fraction of instances that get planted duplicates
    dup_repeats: int = ranged(16, ge=1)  # copies of each duplicated instance in the training set (incl. the original)
    near_copy_fraction: float = ranged(0.5, ge=0, le=1)  # of the extra copies, which share are near-copies (rest exact)
    # of duplicated instances, which share re-phrase captions (dup_image)
    dup_image_fraction: float = ranged(0.0, ge=0, le=1)
    resolution: int = ranged(64, ge=8)
    seed: int = ranged(0, ge=0)
    held_out: int = ranged(16, ge=0)  # extra captions (new instances, never trained on) for evaluation
    # cut each lab photo cell into cell_split × cell_split sub-cells: up to cell_split² × 109 instances, so unique
    # images can be many and each seen rarely (smaller crops: check the train–train SSCD background before use)
    cell_split: int = ranged(1, ge=1)

    def validate(self) -> None:
        check_dataclass(self, "lab.")  # the declared ranges (a ParamValueError is a ValueError)
        n_cells = len(photos.cells("lab", self.cell_split))
        if not 1 <= self.num_instances + self.held_out <= n_cells:
            raise ValueError(
                f"lab.num_instances + lab.held_out must be in [1, {n_cells}] (one photo cell each); "
                f"got {self.num_instances} + {self.held_out} (raise lab.cell_split for more cells)"
            )


@dataclass
class LabItem:
    id: int  # row in the training set
    instance: int  # distinct instance (= duplicate cluster id)
    caption: str
    is_dup: bool  # instance has planted duplicates
    copy_kind: str  # "original" | "exact" | "near"
    caption_mode: str  # "dup_both" | "dup_image" | "unique"
    attributes: dict = field(default_factory=dict)
    photo: str = ""
    cell: list = field(default_factory=list)  # [y, x, size] of the photo cell the background was cropped from


@dataclass
class Lab:
    config: LabConfig
    items: list[LabItem]
    images: list[np.ndarray]  # aligned with items
    held_out: list[LabItem]  # instances not in the training set (their image is in held_out_images)
    held_out_images: list[np.ndarray]

    @property
    def originals(self) -> dict[int, np.ndarray]:
        """instance id -> the original (un-jittered) image of every *training* instance."""
        return {it.instance: im for it, im in zip(self.items, self.images) if it.copy_kind == "original"}


def build_lab(cfg: LabConfig) -> Lab:
    cfg.validate()
    rng = np.random.default_rng([cfg.seed, 1])
    pool = list(photos.cells("lab", cfg.cell_split))
    order = rng.permutation(len(pool))[: cfg.num_instances + cfg.held_out]
    scenes, bgs, seen, cell_of = [], [], set(), []
    for j in order:
        cell = pool[int(j)]
        bg = photos.crop(cell, rng, scale=(0.85, 0.85), out_px=cfg.resolution)
        while True:  # captions are forced distinct, so caption -> instance is unambiguous
            sc = random_scene(rng, cell.photo, cfg.resolution)
            if sc.caption() not in seen:
                seen.add(sc.caption())
                break
        scenes.append(sc)
        bgs.append(bg)
        cell_of.append([cell.y, cell.x, cell.size])
    n_dup = int(round(cfg.dup_fraction * cfg.num_instances))
    dup_ids = set(int(i) for i in rng.choice(cfg.num_instances, size=n_dup, replace=False)) if n_dup else set()
    dup_image_ids = set(sorted(dup_ids)[: int(round(cfg.dup_image_fraction * n_dup))])

    items: list[LabItem] = []
    images: list[np.ndarray] = []
    for inst in range(cfg.num_instances):
        img = draw(bgs[inst], scenes[inst])
        is_dup = inst in dup_ids
        mode = ("dup_image" if inst in dup_image_ids else "dup_both") if is_dup else "unique"
        reps = cfg.dup_repeats if is_dup else 1
        n_near = int(round(cfg.near_copy_fraction * (reps - 1)))
        for r in range(reps):
            kind = "original" if r == 0 else ("near" if r <= n_near else "exact")
            im = near_copy(img, rng) if kind == "near" else img
            tpl = r % len(TEMPLATES) if mode == "dup_image" else 0
            items.append(
                LabItem(
                    id=len(items), instance=inst, caption=scenes[inst].caption(tpl), is_dup=is_dup,
                    copy_kind=kind, caption_mode=mode, attributes=scenes[inst].attributes(),
                    photo=scenes[inst].photo, cell=cell_of[inst],
                )
            )
            images.append(im)
    held, held_imgs = [], []
    for k, inst in enumerate(range(cfg.num_instances, cfg.num_instances + cfg.held_out)):
        held.append(
            LabItem(id=k, instance=inst, caption=scenes[inst].caption(), is_dup=False, copy_kind="original",
                    caption_mode="held_out", attributes=scenes[inst].attributes(), photo=scenes[inst].photo,
                    cell=cell_of[inst])
        )
        held_imgs.append(draw(bgs[inst], scenes[inst]))
    return Lab(cfg, items, images, held, held_imgs)


# ----------------------------------------------------------------------------------------------------------------
# Export in the formats real data comes in; read back through guard_train.data.loaders.


def write_imagefolder(lab: Lab, root: str | Path) -> Path:
    """root/train/NNNNN.png + root/train/metadata.jsonl (HF imagefolder), root/manifest.jsonl (ground truth)."""
    root = Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    with open(root / "train" / "metadata.jsonl", "w") as meta:
        for it, im in zip(lab.items, lab.images):
            name = f"{it.id:05d}.png"
            Image.fromarray(im).save(root / "train" / name)
            meta.write(json.dumps({"file_name": name, "text": it.caption, "id": it.id}) + "\n")
    _write_manifest(lab, root)
    return root


def write_parquet(lab: Lab, path: str | Path) -> Path:
    """LAION-style parquet with embedded image bytes ({"bytes", "path"} struct, as HF `Image()` stores it)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "image": [{"bytes": png(im), "path": f"{it.id:05d}.png"} for it, im in zip(lab.items, lab.images)],
            "text": [it.caption for it in lab.items],
            "id": [it.id for it in lab.items],
        }
    )
    pq.write_table(table, path)
    _write_manifest(lab, path.parent)
    return path


def _write_manifest(lab: Lab, root: Path) -> None:
    """The ground truth, after the images; manifest.jsonl (what readers take as "a written lab") is renamed into
    place last, so an interrupted write never leaves a lab that looks complete."""
    with open(root / "manifest.jsonl.tmp", "w") as f:
        for it in lab.items:
            f.write(json.dumps(asdict(it)) + "\n")
    with open(root / "held_out.jsonl", "w") as f:
        for it in lab.held_out:
            f.write(json.dumps(asdict(it)) + "\n")
    (root / "lab_config.json").write_text(json.dumps(asdict(lab.config), indent=2))
    # labelled prompts for `guard-train detect`: a duplicated instance's caption is "memorized" (label 1)
    with open(root / "detect_prompts.jsonl", "w") as f:
        for it in lab.items:
            if it.copy_kind == "original":
                f.write(json.dumps({"prompt": it.caption, "label": int(it.is_dup), "group": it.caption_mode}) + "\n")
        for it in lab.held_out:
            f.write(json.dumps({"prompt": it.caption, "label": 0, "group": "held_out"}) + "\n")
    (root / "manifest.jsonl.tmp").replace(root / "manifest.jsonl")


def read_lab_config(root: str | Path) -> LabConfig:
    """The config a written lab (or a LoRA made on one) was built from; fields added since it was written take their
    defaults, so an older lab rebuilds the same."""
    return LabConfig(**json.loads((Path(root) / "lab_config.json").read_text()))


def read_manifest(root: str | Path) -> list[LabItem]:
    with open(Path(root) / "manifest.jsonl") as f:
        return [LabItem(**json.loads(line)) for line in f]


def read_rows(root: str | Path, originals_only: bool = False) -> tuple[list[LabItem], np.ndarray]:
    """The training rows of a written lab and their images (N, H, W, 3): every row (planted exact and near copies
    included — what the model trained on, the copy metric's reference set), or only each instance's original."""
    items = [it for it in read_manifest(root) if not originals_only or it.copy_kind == "original"]
    return items, row_images(root, [it.id for it in items])


def read_originals(root: str | Path) -> tuple[list[LabItem], np.ndarray]:
    """The distinct training instances of a written lab (their original rows) and their images (N, H, W, 3)."""
    return read_rows(root, originals_only=True)


def same_caption_new_instance(lab: Lab, instance: int, rng: np.random.Generator) -> np.ndarray:
    """What a model that generalises (rather than copies) would draw for this instance's caption: the same shapes
    on a new crop of the same photo, from another lab cell. Used to calibrate the copy metric."""
    it = next(i for i in lab.items if i.instance == instance and i.copy_kind == "original")
    shapes = tuple(Shape(k, c, 0, 0, 0) for c, k in it.attributes["shapes"])
    others = [c for c in photos.cells("lab", lab.config.cell_split)
              if c.photo == it.photo and [c.y, c.x, c.size] != it.cell]
    cell = others[int(rng.integers(len(others)))]
    bg = photos.crop(cell, rng, scale=(0.85, 0.85), out_px=lab.config.resolution)
    scene = random_scene(rng, it.photo, lab.config.resolution)
    placed = tuple(Shape(s.kind, s.color, p.cx, p.cy, p.size) for s, p in zip(shapes, scene.shapes + scene.shapes))
    return draw(bg, Scene(it.photo, placed))
