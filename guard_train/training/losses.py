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
