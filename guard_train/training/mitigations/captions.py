"""Caption mitigations at training time — Somepalli et al., "Understanding and Mitigating Copying in Diffusion
Models" (NeurIPS 2023), `datasets.py --trainspecial`, each applied with probability p (default 0.1) per sample:

* MC  (allcaps)     several captions per image: pick one at random each time. Built into the loop: a caption
                    column holding a list is sampled per step; nothing to enable.
* RC  (randrepl)    replace the caption by 4 random vocabulary tokens (ids < 49400, decoded).
* RT  (randwordadd) insert 2 random vocabulary tokens at random word positions.
* CWR (wordrepeat)  insert 2 words sampled from the caption at random word positions.
* GN  (--rand_noise_lam λ) add λ·N(0, 1) to the text-encoder output every step (an embedding transform).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

from guard_train.config.params import ranged
from guard_train.models.text import random_vocabulary_words
from guard_train.training.hooks import Hooks
from guard_train.training.mitigations.base import Mitigation, register

MODES = ("none", "rc", "rt", "cwr")


@register
@dataclass
class CaptionMitigationConfig(Mitigation):
    section: ClassVar[str] = "captions"
    summary: ClassVar[str] = ("Somepalli et al.'s caption mitigations: replace (RC) or perturb (RT, CWR) a sample's "
                              "caption with probability p; Gaussian noise on the text embedding (GN); MC = give a "
                              "list-valued caption column")
    arms: ClassVar[dict[str, dict[str, str]]] = {"captions_rc": {"mode": "rc", "p": "0.1"}}
    mode: str = ranged("none", choices=MODES, doc="none | rc (4 random tokens) | rt (2 random tokens inserted) | cwr "
                                                  "(2 of the caption's words repeated)")
    p: float = ranged(0.1, ge=0, le=1, doc="probability per sample of the caption mitigation")
    gn_lambda: float = ranged(0.0, ge=0, doc="λ of λ·N(0, 1) added to the text-encoder output every step (GN); "
                                             "0 = off")

    def active(self) -> bool:
        return self.mode != "none" or self.gn_lambda > 0

    def build(self, hooks: Hooks, section_of) -> None:
        if self.mode != "none":
            hooks.caption_transforms.append(_LazyCaption(self.mode, self.p))
        if self.gn_lambda > 0:
            hooks.embedding_transforms.append(gaussian_embedding_noise(self.gn_lambda))


class _LazyCaption:
    """Needs the tokenizer, which the trainer loads after the hooks are built."""

    def __init__(self, mode: str, p: float):
        self.mode, self.p, self.fn = mode, p, None

    def bind(self, tokenizer) -> None:
        self.fn = caption_transform(self.mode, self.p, tokenizer)

    def __call__(self, caption, item_id, rng):
        return self.fn(caption, item_id, rng)


def _insert(words: list[str], new: list[str], rng: np.random.Generator) -> list[str]:
    out = list(words)
    for w in new:
        out.insert(int(rng.integers(0, len(out) + 1)), w)
    return out


def caption_transform(mode: str, p: float, tokenizer) -> Callable[[str, int, np.random.Generator], str]:
    if mode not in MODES:
        raise ValueError(f"mitigation.captions.mode must be one of {MODES}, got {mode!r}")

    def fn(caption: str, item_id: int, rng: np.random.Generator) -> str:
        if mode == "none" or rng.random() >= p:
            return caption
        words = caption.split()
        if mode == "rc":
            return " ".join(random_vocabulary_words(tokenizer, 4, rng))
        if mode == "rt":
            return " ".join(_insert(words, random_vocabulary_words(tokenizer, 2, rng), rng))
        picks = [words[int(i)] for i in rng.integers(0, len(words), size=2)] if words else []
        return " ".join(_insert(words, picks, rng))

    return fn


def gaussian_embedding_noise(lam: float) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    def fn(emb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return emb + lam * torch.randn(emb.shape, generator=gen).to(emb)

    return fn
