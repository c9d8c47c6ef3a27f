"""Caption–image alignment scorers the evaluation reports beside copy rates.

An aligner has `name: str` and `score(images (N,H,W,3) uint8, captions) -> (N,) float` (NaN where it has no
opinion, e.g. a caption outside its vocabulary). Scorers register a factory; `default_aligner()` returns the first
whose factory finds its weights, or None (evaluation then reports no alignment). CLIP score has its own flag
(`--clip-model`, metrics/clip_score.py) because it needs a model the user points at.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import numpy as np


class Aligner(Protocol):
    name: str

    def score(self, images: np.ndarray, captions: list[str]) -> np.ndarray: ...


_FACTORIES: dict[str, Callable[[], Optional[Aligner]]] = {}


def register_aligner(name: str, factory: Callable[[], Optional[Aligner]]) -> None:
    """`factory()` returns a ready aligner, or None when its weights are not present."""
    _FACTORIES[name] = factory


def default_aligner() -> Optional[Aligner]:
    for factory in _FACTORIES.values():
        aligner = factory()
        if aligner is not None:
            return aligner
    return None
