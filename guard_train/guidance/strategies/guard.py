"""GUARD — Zhao, Triantafillou, Triantafillou, "You Don't Need All That Attention: Surgical Memorization
Mitigation in Text-to-Image Diffusion Models" (arXiv 2603.00133), as its code runs (`dual_guidance_call`,
methods.md §1):

  three branches per step: ε_u (empty prompt), ε₊ (the prompt with cross-attention spike attenuation — z-score
  τ = 0.1 over positions 1..76 of each (sample, head)'s max-over-queries logits, spike columns × 0.3, in the down
  and mid cross-attention layers, every step), ε₋ (the prompt, untouched);
  v₊ = ε₊ − ε_u, v₋ = ε₋ − ε_u;  if cos(v₊, v₋) > 0.9: v₊ ← v₊ − clip(⟨v₊,v₋⟩/‖v₋‖², −2, 2) v₋;
  w₋(i) = λ_rep · cos(π/2 · i/T);   ε̂ = ε_u + w₊ v₊ − w₋(i) v₋    (w₊ 7.5, λ_rep 2.0 as in the README).
`guard_attn` is the attenuation-only pipeline (τ = 0.01, no repulsion): ε̂ = ε_u + w₊ (ε₊ − ε_u).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from guard_train.config.params import ranged
from guard_train.guidance.base import AttnEdit, Branch, Strategy, cfg_combine


def early_layers(layers: list[str]) -> set[str]:
    """BLOCKS_EARLY: every down-block and mid-block cross-attention layer (exec idx 0–6 in SD 1.x)."""
    return {l for l in layers if l.startswith(("down_blocks", "mid_block"))}


def orthogonalize(vp: torch.Tensor, vn: torch.Tensor, cos_max: float, clip: float) -> torch.Tensor:
    """Per sample (flattened): remove v₋'s component from v₊ when their cosine exceeds cos_max."""
    a, b = vp.flatten(1), vn.flatten(1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    coef = ((a * b).sum(1) / b.pow(2).sum(1).clamp_min(1e-12)).clamp(-clip, clip)
    coef = torch.where(cos > cos_max, coef, torch.zeros_like(coef))
    return vp - coef.view(-1, *([1] * (vp.ndim - 1))) * vn


class Guard(Strategy):
    name = "guard"

    @dataclass
    class Params:
        guidance_scale: float = 7.5
        repulsion_scale: float = 2.0
        spike_threshold: float = 0.1
        spike_scale: float = ranged(0.3, ge=0)
        orthogonalize: bool = True
        ortho_cos: float = ranged(0.9, ge=-1, le=1)
        ortho_clip: float = ranged(2.0, ge=0)

    def prepare(self, ctx):
        self.edit_layers = early_layers(ctx.engine.layers)

    def branches(self, i, t, ctx):
        pos = AttnEdit(spike=(self.p.spike_threshold, self.p.spike_scale))
        return {"uncond": Branch(ctx.uncond), "pos": Branch(ctx.cond, pos), "neg": Branch(ctx.cond)}

    def repulsion(self, i: int, steps: int) -> float:
        return self.p.repulsion_scale * math.cos(math.pi / 2 * i / steps)

    def combine(self, eps, i, t, ctx):
        u = eps["uncond"]
        vp, vn = eps["pos"] - u, eps["neg"] - u
        if self.p.orthogonalize:
            vp = orthogonalize(vp, vn, self.p.ortho_cos, self.p.ortho_clip)
        return u + self.p.guidance_scale * vp - self.repulsion(i, ctx.steps) * vn


class GuardAttenuation(Guard):
    name = "guard_attn"

    @dataclass
    class Params:
        guidance_scale: float = 7.5
        spike_threshold: float = 0.01
        spike_scale: float = ranged(0.3, ge=0)

    def branches(self, i, t, ctx):
        pos = AttnEdit(spike=(self.p.spike_threshold, self.p.spike_scale))
        return {"uncond": Branch(ctx.uncond), "pos": Branch(ctx.cond, pos)}

    def combine(self, eps, i, t, ctx):
        return cfg_combine(eps["uncond"], eps["pos"], self.p.guidance_scale)
