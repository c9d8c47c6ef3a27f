"""Classifier-free guidance (Ho & Salimans 2022): ε̂ = ε_u + w (ε_c − ε_u), w = 7.5 — the no-mitigation baseline."""

from guard_train.guidance.base import Strategy, cfg_combine, register


@register
class CFG(Strategy):
    name = "cfg"

    def combine(self, eps, i, t, ctx):
        return cfg_combine(eps["uncond"], eps["cond"], self.p.guidance_scale)
