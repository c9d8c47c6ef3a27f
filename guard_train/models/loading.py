"""Load SD components (tiny default, an SD 1.x/2.x directory, or a cached hub id) with clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import DDPMScheduler, StableDiffusionPipeline

# The tiny SD's model_index.json names this module for its VAE slot; diffusers only loads components from modules
# that are already imported (it never imports a module a repository names), so import it here.
import guard_train.models.codec  # noqa: F401,E402  (side effect: registers the codec module)


class ModelLoadError(RuntimeError):
    pass


@dataclass
class Components:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: DDPMScheduler
    path: str


def load_pipeline(path: str, revision: str | None = None, variant: str | None = None, **kw) -> StableDiffusionPipeline:
    try:
        return StableDiffusionPipeline.from_pretrained(
            path, revision=revision, variant=variant, safety_checker=None, requires_safety_checker=False,
            local_files_only=True, **kw,
        )
    except (OSError, ValueError, EnvironmentError) as e:
        where = "directory" if Path(path).exists() else "hub id (looked up in the local cache only)"
        raise ModelLoadError(
            f"could not load a Stable Diffusion pipeline from {where} {path!r}: {str(e).splitlines()[0]}. "
            f"Give a diffusers SD 1.x/2.x directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
            f"scheduler/); to use a hub id offline, download it first on a machine with access."
        ) from None


def load_components(path: str, revision: str | None = None, variant: str | None = None) -> Components:
    pipe = load_pipeline(path, revision, variant)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    return Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, sched, path)
