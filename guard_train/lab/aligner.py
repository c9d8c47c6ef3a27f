"""Lab alignment: does a generated lab image show what its caption says? — an offline stand-in for CLIP score.

A small CNN classifies a 64-px lab image into its background photo (7-way) and which (colour, shape) pairs it
contains (24-way multi-label). It is trained on fresh scenes from the *pretraining* cells and its accuracy is
measured on lab instances (disjoint cells). For an image and a caption, parsed back to its attributes:

    lab_alignment = ( P(photo | image) + Σ_s P(shape s present | image) ) / (1 + #shapes)      ∈ [0, 1]

Always reported as "lab alignment (attribute classifier)", never as CLIP score, and never in the same column.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from guard_train.data.images import to_model as _x
from guard_train.lab.dataset import COLORS, SHAPES, pretrain_stream
from guard_train.lab.photos import PHOTO_NAMES
from guard_train.metrics.aligners import register_aligner

PAIRS = [f"{c} {s}" for c in COLORS for s in SHAPES]
NAME = "lab alignment (attribute classifier; not CLIP)"


def parse_caption(caption: str) -> tuple[str | None, list[str]]:
    """A lab caption → (photo, ["red circle", …]); (None, []) if it is not a lab caption."""
    photo = next((p for p in PHOTO_NAMES if re.search(rf"\b{p}\b", caption)), None)
    pairs = re.findall(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b", caption)
    return photo, [f"{c} {s}" for c, s in pairs]


class AttributeNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        layers, cin = [], 3
        for cout in (w, 2 * w, 4 * w, 4 * w):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.photo = nn.Linear(cin, len(PHOTO_NAMES))
        self.pairs = nn.Linear(cin, len(PAIRS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x).mean(dim=(2, 3))
        return self.photo(h), self.pairs(h)


def _targets(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    photo = torch.tensor([PHOTO_NAMES.index(parse_caption(c)[0]) for c in captions])
    pairs = torch.zeros(len(captions), len(PAIRS))
    for i, c in enumerate(captions):
        for p in parse_caption(c)[1]:
            pairs[i, PAIRS.index(p)] = 1
    return photo, pairs


@dataclass
class LabAligner:
    net: AttributeNet
    info: dict

    name: str = NAME

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.net.eval()
        lp, lq = self.net(_x(images))
        return lp.softmax(-1).numpy(), lq.sigmoid().numpy()

    def score(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        """Per-image lab alignment with its caption (NaN for a caption that is not a lab caption)."""
        pp, pq = self.probabilities(images)
        out = np.full(len(images), np.nan)
        for i, c in enumerate(captions):
            photo, pairs = parse_caption(c)
            if photo is None:
                continue
            out[i] = (pp[i, PHOTO_NAMES.index(photo)] + sum(pq[i, PAIRS.index(p)] for p in pairs)) / (1 + len(pairs))
        return out

    def save(self, d: str | Path) -> None:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        save_file(self.net.state_dict(), d / "model.safetensors")
        (d / "scorer.json").write_text(json.dumps(self.info, indent=2))

    @classmethod
    def load(cls, d: str | Path) -> "LabAligner":
        d = Path(d)
        info = json.loads((d / "scorer.json").read_text())
        net = AttributeNet(info["width"])
        net.load_state_dict(load_file(d / "model.safetensors"))
        return cls(net.eval(), info)


SCORER_DIR = Path(__file__).resolve().parents[2] / "models" / "lab-scorer"  # the committed scorer


def committed_scorer() -> LabAligner | None:
    """The committed lab scorer, or None when its weights are absent."""
    return LabAligner.load(SCORER_DIR) if (SCORER_DIR / "model.safetensors").exists() else None


register_aligner("lab", committed_scorer)


def evaluate(aligner: LabAligner, images: np.ndarray, captions: list[str]) -> dict:
    pp, pq = aligner.probabilities(images)
    photo_t, pairs_t = _targets(captions)
    photo_acc = float((pp.argmax(1) == photo_t.numpy()).mean())
    pred = pq > 0.5
    exact = float((pred == pairs_t.numpy().astype(bool)).all(1).mean())
    own = aligner.score(images, captions)
    shuffled = aligner.score(images, captions[1:] + captions[:1])  # mismatched captions: the chance level
    return {"photo_accuracy": photo_acc, "shape_set_exact_accuracy": exact,
            "alignment_own_caption": float(np.mean(own)),
            "alignment_other_caption": float(np.mean(shuffled)), "n": len(captions)}


def train_scorer(steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0, width: int = 32) -> LabAligner:
    """Train on fresh pretraining-stream scenes (never lab pixels); measured on the lab by `evaluate`."""
    torch.manual_seed(seed)
    net = AttributeNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    stream = pretrain_stream(seed + 777)
    t0 = time.time()
    for _ in range(steps):
        data = list(islice(stream, batch))
        x = _x(np.stack([d[0] for d in data]))
        photo, pairs = _targets([d[1] for d in data])
        lp, lq = net(x)
        loss = F.cross_entropy(lp, photo) + F.binary_cross_entropy_with_logits(lq, pairs) * len(PAIRS) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    info = {"width": width, "steps": steps, "batch": batch, "seed": seed, "train_wall_s": round(time.time() - t0, 1),
            "trained_on": "pretraining-stream scenes (cells disjoint from the lab)"}
    return LabAligner(net.eval(), info)
