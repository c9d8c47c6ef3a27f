"""Prompt perturbations — Somepalli et al., "Understanding and Mitigating Copying in Diffusion Models" (NeurIPS
2023), `sd_mitigation.py` in their released code, each followed by ordinary CFG (w = 7.5):
* `gni`            Gaussian noise λ·N(0, 1) (λ = 0.1) on the prompt embeddings, both CFG branches.
* `random_token`   insert 4 random vocabulary tokens (ids < 49400, never a special token) at random word positions.
* `word_repeat`    insert 4 words sampled from the prompt at random word positions.
* `random_number`  insert 4 random integers in [0, 100000) at random word positions.
Randomness is seeded per prompt and image (the prompt's seed), so outputs are deterministic and do not depend on
which other prompts share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from guard_train.config.params import ranged
from guard_train.guidance.base import Strategy, cfg_combine, register
from guard_train.models.text import random_vocabulary_words


@register
class GNI(Strategy):
    name = "gni"

    @dataclass
    class Params:
        guidance_scale: float = ranged(7.5, doc="CFG weight")
        noise_lambda: float = ranged(0.1, ge=0, doc="λ: Gaussian noise scale on the prompt embeddings")

    def prepare(self, ctx):
        def noise(x: torch.Tensor, salt: int) -> torch.Tensor:
            rows = []
            for r in range(ctx.rows):
                img = r % ctx.state["images_per_prompt"]
                g = torch.Generator().manual_seed(ctx.state["seeds"][ctx.prompt_index[r]] * 1_000 + img * 2 + salt)
                rows.append(torch.randn(x.shape[1:], generator=g))
            return x + self.p.noise_lambda * torch.stack(rows).to(x)

        ctx.cond, ctx.uncond = noise(ctx.cond, 0), noise(ctx.uncond, 1)

    def combine(self, eps, i, t, ctx):
        return cfg_combine(eps["uncond"], eps["cond"], self.p.guidance_scale)


class _Insert(Strategy):
    @dataclass
    class Params:
        guidance_scale: float = ranged(7.5, doc="CFG weight")
        repeats: int = ranged(4, ge=1, doc="tokens / words / numbers inserted")

    def words(self, prompt: str, rng: np.random.Generator, tokenizer) -> list[str]:
        raise NotImplementedError

    def prepare(self, ctx):
        new = []
        for r, p in enumerate(ctx.prompts):
            rng = np.random.default_rng([ctx.state["seeds"][ctx.prompt_index[r]], r % ctx.state["images_per_prompt"]])
            words = p.split()
            for w in self.words(p, rng, ctx.engine.tokenizer):
                words.insert(int(rng.integers(0, len(words) + 1)), w)
            new.append(" ".join(words))
        ctx.prompts = new
        ctx.cond, ctx.lengths = ctx.engine.encode(new)
        ctx.state["augmented_prompts"] = new

    def combine(self, eps, i, t, ctx):
        return cfg_combine(eps["uncond"], eps["cond"], self.p.guidance_scale)


@register
class RandomToken(_Insert):
    name = "random_token"

    def words(self, prompt, rng, tok):
        return random_vocabulary_words(tok, self.p.repeats, rng)


@register
class WordRepeat(_Insert):
    name = "word_repeat"

    def words(self, prompt, rng, tok):
        w = prompt.split()
        return [w[int(i)] for i in rng.integers(0, len(w), size=self.p.repeats)] if w else []


@register
class RandomNumber(_Insert):
    name = "random_number"

    def words(self, prompt, rng, tok):
        return [str(int(x)) for x in rng.integers(0, 100_000, size=self.p.repeats)]
