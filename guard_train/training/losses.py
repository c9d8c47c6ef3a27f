"""Per-sample loss weights shared by fine-tuning (`loop.py`) and base pretraining (`pretrain.py`)."""

from __future__ import annotations

import torch


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023): min(SNR, γ) / SNR for an epsilon target, min(SNR, γ) / (SNR + 1) for
    v-prediction; all ones when γ = 0 (off). They shrink the low-noise timesteps — where fine texture is learned —
    by γ / SNR (e.g. ×0.05 at SNR 100 with γ = 5)."""
    if not gamma:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    w = torch.clamp(snr, max=gamma)
    return w / snr if scheduler.config.prediction_type == "epsilon" else w / (snr + 1)


def v_weights(scheduler, timesteps: torch.Tensor, cap: float) -> torch.Tensor:
    """min(1 + 1/SNR, cap) for an ε target: the weight a v-prediction loss puts on ε errors (Δv = Δε / √ᾱ), so the
    x̂₀ error at high noise — ‖Δx̂₀‖² = ‖Δε‖² / SNR — counts about as much as at low noise, where a plain ε-loss
    weighs it by SNR (×0.007 at t = 961 with SD's betas). With SD's betas 1 + 1/SNR runs from 1 to 215 (t = 999);
    the cap keeps a zero-terminal-SNR schedule (SNR = 0 at the top) finite."""
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError("v_weights reweights an epsilon-prediction loss; a v-model's loss already has this weight")
    from diffusers.training_utils import compute_snr

    return torch.clamp(1 + 1 / compute_snr(scheduler, timesteps), max=cap).float()


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses: the noise ε, or v = √ᾱ·ε − √(1−ᾱ)·x₀ for a v-prediction scheduler (SD 2.x 768)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not trained here; use 'epsilon' or 'v_prediction'")


def loss_weights(scheduler, timesteps: torch.Tensor, snr_gamma: float = 0.0, v_weight_cap: float = 0.0) -> torch.Tensor:
    """Per-sample weights of the MSE: min-SNR-γ (`snr_gamma`), the v-loss weight on an ε target (`v_weight_cap`),
    or ones. The two reweight the same timesteps in opposite directions, so at most one may be set."""
    if snr_gamma and v_weight_cap:
        raise ValueError("set snr_gamma or v_weight_cap, not both")
    if v_weight_cap:
        return v_weights(scheduler, timesteps, v_weight_cap)
    return snr_weights(scheduler, timesteps, snr_gamma)


def timestep_weights(strategy: str, num_timesteps: int, multiplier: float = 1.0, portion: float = 0.25,
                     begin: int = 0, end: int = 1000) -> torch.Tensor:
    """Sampling weights over the training timesteps (the timestep bias of diffusers' SDXL fine-tuning script):
    ones, times `multiplier` on the biased part — `later`: the top ⌊portion·T⌋ timesteps (the high-noise steps that
    decide an image's layout), `earlier`: the bottom ones (texture), `range`: [begin, end). Normalised to sum 1."""
    w = torch.ones(num_timesteps)
    k = max(1, int(portion * num_timesteps))
    part = {"none": slice(0, 0), "later": slice(num_timesteps - k, num_timesteps), "earlier": slice(0, k),
            "range": slice(begin, min(end, num_timesteps))}[strategy]
    w[part] *= multiplier
    return w / w.sum()


def sample_timesteps(bsz: int, num_timesteps: int, generator: torch.Generator, weights: torch.Tensor | None = None):
    """Uniform timesteps (SD's training) or, with weights, drawn from them. Uniform draws keep the RNG stream of
    `torch.randint`, so runs without a bias are unchanged."""
    if weights is None:
        return torch.randint(0, num_timesteps, (bsz,), generator=generator)
    return torch.multinomial(weights, bsz, replacement=True, generator=generator)
