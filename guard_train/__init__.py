"""guard_train: memorization-aware Stable Diffusion fine-tuning."""

__version__ = "0.1.0"
