"""Ren et al., "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models through Cross Attention"
(ECCV 2024), inference-time mitigation as `renjie3/MemAttn` runs it, in every cross-attention
layer at every step, with ordinary CFG (w = 7.5):
  1. mask the summary tokens: logits of positions k ≥ L (padding after the first EOS) set to −∞, on the
     unconditional and the conditional rows alike (the prompt's L is used for both);
  2. multiply the BOS logit by C = 1.25 on the conditional rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guard_train.config.params import ranged
from guard_train.guidance.base import AttnEdit, Branch, Strategy, cfg_combine, register


@register
class Ren(Strategy):
    name = "ren"

    @dataclass
    class Params:
        guidance_scale: float = ranged(7.5, doc="CFG weight")
        bos_scale: float = ranged(1.25, gt=0, doc="C: the BOS logit multiplier on conditional rows",
                                  official="1.0 (CLI default = off); 1.25 in the scripts")
        mask_first_eos: bool = ranged(False, doc="also mask the first EOS (the reference's mask_length_minis1)")

    def branches(self, i, t, ctx):
        T = ctx.cond.shape[1]
        L = ctx.lengths - (1 if self.p.mask_first_eos else 0)
        keep = torch.arange(T)[None, :] < L[:, None]
        scale = torch.ones(ctx.rows, T)
        scale[:, 0] = self.p.bos_scale
        return {"uncond": Branch(ctx.uncond, AttnEdit(token_mask=keep)),
                "cond": Branch(ctx.cond, AttnEdit(token_mask=keep, token_logit_scale=scale))}

    def combine(self, eps, i, t, ctx):
        return cfg_combine(eps["uncond"], eps["cond"], self.p.guidance_scale)
