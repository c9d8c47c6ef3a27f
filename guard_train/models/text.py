"""SD's text conditioning: CLIP token ids padded to the tokenizer's length (77) and truncated, and the text
encoder's last hidden states — the one way every part of the package (training, the engine, the probes,
pretraining) turns captions into conditioning."""

from __future__ import annotations

import numpy as np
import torch


def token_ids(tokenizer, texts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """(B, 77) token ids, padded with the tokenizer's pad token (SD 1.x: EOS; SD 2.x: 0) and truncated."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids if device is None else ids.to(device)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    """(B, 77, D) last hidden states, on the text encoder's device."""
    return text_encoder(token_ids(tokenizer, texts, text_encoder.device))[0]


def random_vocabulary_words(tokenizer, k: int, rng: np.random.Generator) -> list[str]:
    """k random vocabulary tokens, decoded to text — Somepalli et al.'s random-token perturbation. Ids are drawn
    below 49,400 as their code does (on CLIP's vocabulary that excludes the last merges and the special tokens);
    on a smaller vocabulary, below its first special token, so BOS/EOS are never inserted as words."""
    hi = min(49400, len(tokenizer) - len(set(tokenizer.all_special_ids)))
    return [tokenizer.decode([int(i)]).strip() or "x" for i in rng.integers(0, hi, size=k)]
