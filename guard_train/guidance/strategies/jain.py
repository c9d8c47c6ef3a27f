"""Jain et al., "Classifier-Free Guidance inside the Attraction Basin May Cause Memorization" (CVPR 2025), as the
released scripts run. ε̂ = ε_u + w (ε_c − ε_u) with a guidance scale that changes at a transition
point:

* `jain_static`       w = 0 while t > τ (τ = 500), then 7.5                       (generate_test_dataset_stp.py)
* `jain_dynamic`      w = 1 until the first local minimum of d_j = ‖ε_u − ε_c‖ is detected (d_{j−1} < d_{j−2} and
                      d_j > d_{j−1}, i.e. one step late), then 7.5, per sample     (generate_test_dataset_dtp.py)
* `opposite_static`   opposite guidance w = −2 while t > 650, then 7.5             (README, OG + STP)
* `opposite_dynamic`  probe pass with the unconditional prediction (w = 0) recording d_j; transition = the first
                      local minimum of d (the second if the first is at index 1; index 5 if none); then, from the
                      same initial noise, w = −7.5 before and +7.5 from the transition   (…-negative_guidance.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guard_train.config.params import ranged
from guard_train.guidance.base import Strategy, cfg_combine, register


@register
class JainStatic(Strategy):
    name = "jain_static"

    @dataclass
    class Params:
        guidance_scale: float = ranged(7.5, doc="CFG weight after the transition")
        transition_t: int = ranged(500, ge=0, doc="timestep of the static transition point")
        guidance_before: float = ranged(0.0, doc="guidance weight while t > transition_t")

    def combine(self, eps, i, t, ctx):
        w = self.p.guidance_before if t > self.p.transition_t else self.p.guidance_scale
        return cfg_combine(eps["uncond"], eps["cond"], w)


@register
class OppositeStatic(JainStatic):
    name = "opposite_static"

    @dataclass
    class Params:
        guidance_scale: float = ranged(7.5, doc="CFG weight after the transition")
        transition_t: int = ranged(650, ge=0, doc="timestep of the static transition point")
        guidance_before: float = ranged(-2.0, doc="(opposite) guidance weight while t > transition_t")


@register
class JainDynamic(Strategy):
    name = "jain_dynamic"

    @dataclass
    class Params:
        guidance_scale: float = ranged(7.5, doc="CFG weight after the detected transition")
        guidance_before: float = ranged(1.0, doc="guidance weight before it (1: the conditional prediction)")

    def prepare(self, ctx):
        ctx.state["d"] = []
        ctx.state["transition_step"] = torch.full((ctx.rows,), -1)

    def combine(self, eps, i, t, ctx):
        d = ctx.state["d"]
        # the statistic and the transition stay on the UNet's device: no host sync per step on a GPU
        d.append((eps["uncond"] - eps["cond"]).flatten(1).norm(dim=1))
        tp = ctx.state["transition_step"] = ctx.state["transition_step"].to(d[-1].device)
        if len(d) >= 3:
            found = (d[-2] < d[-3]) & (d[-1] > d[-2]) & (tp < 0)
            tp[found] = i
        w = torch.where(tp >= 0, self.p.guidance_scale, self.p.guidance_before)
        return cfg_combine(eps["uncond"], eps["cond"], w)


def first_local_minimum(d: torch.Tensor, fallback: int = 5) -> torch.Tensor:
    """Per row of d (R, steps): index of the first strict local minimum (argrelextrema-like), the second one if
    the first is at index 1, `fallback` if none."""
    R, n = d.shape
    out = torch.full((R,), fallback, dtype=torch.long)
    for r in range(R):
        mins = [k for k in range(1, n - 1) if d[r, k] < d[r, k - 1] and d[r, k] < d[r, k + 1]]
        if mins and mins[0] == 1:
            mins = mins[1:]
        if mins:
            out[r] = mins[0]
    return out


class _Probe(Strategy):
    """The unconditional trajectory (w = 0) of the opposite-guidance probe pass."""

    name = "probe"

    def combine(self, eps, i, t, ctx):
        ctx.state.setdefault("probe_d", []).append((eps["uncond"] - eps["cond"]).flatten(1).norm(dim=1).cpu())
        return eps["uncond"]


@register
class OppositeDynamic(Strategy):
    name = "opposite_dynamic"

    @dataclass
    class Params:
        guidance_scale: float = ranged(7.5, doc="CFG weight after the transition")
        opposite_scale: float = ranged(7.5, doc="s: guidance −s before the transition (found by a probe pass)")

    def prepare(self, ctx):
        ctx.engine.run(ctx, _Probe(), record=False)  # costs one extra full trajectory
        ctx.state["transition_step"] = first_local_minimum(torch.stack(ctx.state.pop("probe_d"), 1))

    def combine(self, eps, i, t, ctx):
        w = torch.where(torch.tensor(i) < ctx.state["transition_step"], -self.p.opposite_scale, self.p.guidance_scale)
        return cfg_combine(eps["uncond"], eps["cond"], w)
