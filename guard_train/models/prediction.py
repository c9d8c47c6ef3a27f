"""The UNet's output in the quantity a method's formula is written in, whatever the model predicts.

Detection scores and the magnitude filter are defined on ε (Wen et al.: ‖ε_θ(x_t, e_p) − ε_θ(x_t, e_∅)‖) and the
one-step probe needs x̂₀. SD 1.x and 2.x-base predict ε, SD 2.x at 768 px predicts v (`prediction_type` in the
scheduler config), some fine-tunes predict the sample. With a = √ᾱ_t, s = √(1 − ᾱ_t) and x_t = a·x₀ + s·ε
(Salimans & Ho 2022, v = a·ε − s·x₀):

    ε  = a·v + s·x_t            x̂₀ = a·x_t − s·v         (v_prediction)
    ε  = (x_t − a·x̂₀) / s       x̂₀ = (x_t − s·ε) / a     (sample / epsilon)

`x_t` is the model's input in the variance-preserving convention: `scheduler.scale_model_input(latents, t)`,
which is the latents themselves for DDPM/DDIM and latents / √(σ² + 1) for σ-space schedulers (Euler, …).
On an ε-model every function returns the output unchanged, so SD 1.x numbers are bit-identical.

Zero terminal SNR (Lin et al. 2024; diffusers' `rescale_betas_zero_snr`, with "trailing" spacing) puts the first
sampling step at ᾱ = 0, where x_t is pure noise: ε = x_t whatever the model or the prompt, so ε_c − ε_u is 0 by
definition and Wen's "first step" magnitude carries nothing. The ε-magnitude methods therefore read it from the
first step with ᾱ_t > 0 (`first_epsilon_step`); on every schedule SD 1.x/2.x ship, that is step 0 as in the papers.
"""

from __future__ import annotations

import torch

KINDS = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler) -> str:
    kind = (getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
            if scheduler is not None else "epsilon")
    if kind not in KINDS:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported; expected one of {KINDS}")
    return kind


def _coeffs(scheduler, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a = √ᾱ_t, s = √(1 − ᾱ_t), shaped to broadcast over `like` (t: int, 0-d or (B,) tensor)."""
    # float64 on the CPU, like `alphas_cumprod[t].item() ** 0.5` (so an ε-model's x̂₀ is bit-identical to before)
    ab = scheduler.alphas_cumprod.cpu().double()[torch.as_tensor(t).cpu().long()].reshape(-1, *([1] * (like.ndim - 1)))
    return ab.sqrt().to(like), (1 - ab).sqrt().to(like)


def to_epsilon(scheduler, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return output
    a, s = _coeffs(scheduler, t, output)
    if kind == "v_prediction":
        return a * output + s * x_t
    return (x_t - a * output) / s


def to_x0(scheduler, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    kind = prediction_type(scheduler)
    if kind == "sample":
        return output
    a, s = _coeffs(scheduler, t, output)
    if kind == "v_prediction":
        return a * x_t - s * output
    return (x_t - s * output) / a


def epsilon_difference(scheduler, out_a: torch.Tensor, out_b: torch.Tensor, t) -> torch.Tensor:
    """ε_a − ε_b for two outputs at the same x_t (the input cancels): Wen's magnitude in ε units on any model."""
    kind = prediction_type(scheduler)
    d = out_a - out_b
    if kind == "epsilon":
        return d
    a, s = _coeffs(scheduler, t, d)
    return a * d if kind == "v_prediction" else -(a / s) * d


def epsilon_defined(scheduler, t) -> bool:
    """Whether ε_c − ε_u carries information at timestep t: False only where ᾱ_t = 0 (zero terminal SNR)."""
    ac = getattr(scheduler, "alphas_cumprod", None)  # σ-only schedulers carry none: no ᾱ = 0 step to skip
    return True if ac is None else bool(ac.cpu()[int(t)] > 0)


def first_epsilon_step(scheduler, timesteps) -> int:
    """Index into `timesteps` of the first step at which Wen's ε magnitude is defined (ᾱ_t > 0): 0 on ordinary
    schedules, 1 on zero-terminal-SNR ones sampled from t = T."""
    for i, t in enumerate(timesteps):
        if epsilon_defined(scheduler, t):
            return i
    raise ValueError("no sampling step has ᾱ_t > 0: ε − ε_∅ is 0 at every step of this schedule")
