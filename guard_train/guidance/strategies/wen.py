"""Prompt-embedding optimisation at step 0, then an ordinary CFG generation.

* `wen_opt` — Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion Models" (ICLR 2024),
  `aug_prompt` in their released code: minimise L(e) = ‖ε_θ(x_T, e) − ε_θ(x_T, ∅)‖₂ (Frobenius over the prompt's N
  images) over the conditional embedding e (position 0 frozen) with AdamW (lr 0.05), ≤ 10 iterations, stopping
  when L ≤ 3. Each prompt is optimised on its own (per-prompt stopping; stopped prompts are frozen).
* `be_opt` — Bright Ending (Chen et al., ICLR 2025), `inference_mem.py --run_version ours_A` (§4.1, §4.4): a
  baseline CFG pass records the cross-attention of the end token (position L−1) at the last step in the two
  highest-resolution down-block layers, heads and layers averaged → mask m (raw probabilities at latent
  resolution, no normalisation); then the same optimisation with L(e) = ‖(ε_c − ε_u) ⊙ m‖₂ / mean(m), target 1.
Note: the norm grows with the latent size, so the targets (set for SD v1.4 at 512 px) may need rescaling.
On a zero-terminal-SNR schedule ε_c − ε_u ≡ 0 at the first step (ᾱ = 0), so the loss would be 0 for every e and
the method a silent no-op: there the optimisation runs at the first step with ᾱ_t > 0 (models/prediction.py),
reached by ordinary CFG steps with the prompt's own embedding from the same x_T. Step 0 on every other schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from guard_train.attention.processor import end_token_mask
from guard_train.config.params import ranged
from guard_train.guidance.base import ParamError, Strategy, cfg_combine, register
from guard_train.models.prediction import epsilon_difference, first_epsilon_step


@register
class WenOpt(Strategy):
    name = "wen_opt"

    @dataclass
    class Params:
        guidance_scale: float = ranged(7.5, doc="CFG weight of the generation and of the steps before the loss")
        lr: float = ranged(0.05, gt=0, doc="AdamW learning rate on the prompt embedding")
        max_iters: int = ranged(10, ge=1, doc="optimisation iterations at most")
        target_loss: float = ranged(3.0, ge=0, doc="stop when the prompt's loss is at most this",
                                    official="3 (README); BE's 1")
        target_step: int = ranged(0, ge=0, doc="sampling step whose magnitude is minimised (0: the first; "
                                  "zero-terminal-SNR: at least the first with ᾱ > 0)")

    def mask(self, ctx) -> Optional[torch.Tensor]:
        return None

    def prepare(self, ctx):
        m = self.mask(ctx)
        eng = ctx.engine
        eng.clear_attention()
        eng.scheduler.set_timesteps(ctx.steps, device=eng.device)
        t0, x = self._target_step(ctx)
        x = eng.scheduler.scale_model_input(x, t0)
        with torch.no_grad():
            eps_u = eng.unet(x, t0, ctx.uncond.to(eng.unet.dtype)).sample.float()
        groups = torch.tensor(ctx.prompt_index)
        P = int(groups.max()) + 1
        emb = ctx.cond.detach().clone().float().requires_grad_(True)
        opt = torch.optim.AdamW([emb], lr=self.p.lr)
        active = torch.ones(P, dtype=torch.bool)
        iters = torch.zeros(P, dtype=torch.long)
        loss_p = torch.zeros(P)
        with torch.enable_grad():
            for _ in range(self.p.max_iters):
                eps_c = eng.unet(x, t0, emb.to(eng.unet.dtype)).sample.float()
                diff = epsilon_difference(eng.scheduler, eps_c, eps_u, t0)  # ε units on v-prediction models
                if m is not None:
                    diff = diff * m
                sq = diff.flatten(1).pow(2).sum(1)  # per row
                loss = torch.zeros(P).index_add(0, groups, sq).sqrt()  # Frobenius over each prompt's rows
                if m is not None:
                    loss = loss / torch.zeros(P).index_add(0, groups, m.flatten(1).mean(1)).div(
                        torch.bincount(groups, minlength=P)).clamp_min(1e-12)
                loss_p = torch.where(active, loss.detach(), loss_p)
                active &= loss.detach() > self.p.target_loss  # early stop per prompt, before the update
                if not active.any():
                    break
                (g,) = torch.autograd.grad(loss[active].sum(), emb)  # no grads accumulate in the UNet
                g[:, 0] = 0  # BOS embedding frozen
                g[~active[groups]] = 0
                frozen = emb.detach()[~active[groups]].clone()
                emb.grad = g
                opt.step()
                with torch.no_grad():
                    emb[~active[groups]] = frozen  # AdamW's decay/momentum must not move stopped prompts
                iters[active] += 1
        ctx.cond = emb.detach().to(ctx.cond.dtype)
        ctx.state["opt_iterations"] = iters[groups].tolist()
        ctx.state["opt_loss"] = loss_p[groups].tolist()

    def _target_step(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, x_t) where the loss is taken: step max(target_step, first step with ᾱ_t > 0), x reached by CFG steps
        with the prompt's own embedding. The optimised embedding then drives the whole generation from x_T, as in
        Wen et al.'s code."""
        eng = ctx.engine
        k = max(self.p.target_step, first_epsilon_step(eng.scheduler, ctx.timesteps))
        if k >= len(ctx.timesteps):
            raise ParamError(f"target_step {self.p.target_step} is past the last of {len(ctx.timesteps)} steps")
        x = eng.run(ctx, _Baseline(self.p.guidance_scale, set()), stop=k, record=False) if k else ctx.latents0
        ctx.state["opt_step"] = k
        return ctx.timesteps[k], x

    def combine(self, eps, i, t, ctx):
        return cfg_combine(eps["uncond"], eps["cond"], self.p.guidance_scale)


class _Baseline(Strategy):
    name = "be_baseline"

    def __init__(self, w: float, layers: set[str]):
        super().__init__(guidance_scale=w)
        self.capture_maps = layers

    def combine(self, eps, i, t, ctx):
        return cfg_combine(eps["uncond"], eps["cond"], self.p.guidance_scale)


@register
class BrightEndingOpt(WenOpt):
    name = "be_opt"

    @dataclass
    class Params:
        guidance_scale: float = ranged(7.5, doc="CFG weight of the generation and of the steps before the loss")
        lr: float = ranged(0.05, gt=0, doc="AdamW learning rate on the prompt embedding")
        max_iters: int = ranged(10, ge=1, doc="optimisation iterations at most")
        target_loss: float = ranged(1.0, ge=0, doc="stop when the prompt's loss is at most this")
        target_step: int = ranged(0, ge=0, doc="sampling step whose magnitude is minimised (0: the first; "
                                  "zero-terminal-SNR: at least the first with ᾱ > 0)")

    def mask(self, ctx):
        eng = ctx.engine
        h, w = ctx.latents0.shape[-2:]
        layers = {l for l in eng.layers if l.startswith("down_blocks.0.")}  # the two highest-resolution layers
        if not layers:
            raise ValueError("be_opt needs cross-attention in down_blocks.0 (the highest-resolution layers)")
        eng.run(ctx, _Baseline(self.p.guidance_scale, layers), record=False)  # the baseline pass (one generation)
        names, maps = ctx.state.pop("last_maps")
        R = ctx.rows
        k = names.index("cond")
        m = end_token_mask(maps, slice(k * R, (k + 1) * R), ctx.lengths, (h, w))
        ctx.state["be_mask"] = m
        return m.to(ctx.latents0.device)
