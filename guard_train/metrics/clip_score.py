"""CLIP score with transformers' CLIPModel from a *local* model directory (nothing is downloaded).

score(image, text) = cos(f_img(image), f_txt(text)) — the raw cosine, not ×100 (GUARD's `metrics/clip.py`
reports the raw cosine of OpenCLIP ViT-g-14 against the original prompt). Reported as "clip_score (<model>)",
never in the same column as the lab alignment scorer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class CLIPScoreError(ValueError):
    pass


class CLIPScorer:
    def __init__(self, path: str, batch: int = 32):
        p = Path(path)
        if not (p / "config.json").exists():
            raise CLIPScoreError(
                f"CLIP model path {path!r} is not a local transformers CLIPModel directory (config.json, weights, "
                f"tokenizer and preprocessor files). Save one on a machine with access with "
                f"CLIPModel.from_pretrained(id).save_pretrained(dir) + CLIPProcessor likewise, then pass that dir.")
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.name = f"clip_score ({p.name}, raw cosine)"
        self.batch = batch

    @torch.no_grad()
    def score(self, images: np.ndarray, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch):
            inp = self.processor(text=texts[i : i + self.batch], images=list(images[i : i + self.batch]),
                                 return_tensors="pt", padding=True, truncation=True)
            img = self.model.get_image_features(pixel_values=inp["pixel_values"])
            txt = self.model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            out.append(torch.nn.functional.cosine_similarity(img, txt, dim=-1).numpy())
        return np.concatenate(out)
