"""The sampler the engine steps: one of diffusers' schedulers, built from the model directory's own scheduler config.

Every paper in this package reports DDIM with η = 0 (50 steps), so DDIM is the default whatever the directory ships —
SD 1.4/1.5 directories ship a PNDM config. `DDIMScheduler.from_config` of that config keeps its β schedule,
`steps_offset` and `set_alpha_to_one`, which is what loading DDIM from an SD directory gives in diffusers. `model`
keeps the directory's own scheduler. η (DDIM's stochasticity) is a DDIM parameter only; a stochastic step draws its
noise from a generator seeded by the generation's seed, so a run repeats exactly.
"""

from __future__ import annotations

import inspect

import diffusers
import torch

from guard_train.guidance.base import ParamError

SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
CHOICES: tuple[str, ...] = (*SCHEDULERS, "model")
DEFAULT = "ddim"


def make_scheduler(name: str, model_scheduler):
    """A fresh scheduler of kind `name` from `model_scheduler`'s config (`model`: that scheduler itself)."""
    if name == "model":
        return model_scheduler
    if name not in SCHEDULERS:
        raise ParamError(f"scheduler {name!r} is not one of {', '.join(CHOICES)}")
    extra = {"skip_prk_steps": True} if name == "pndm" else {}  # SD's own PNDM setting (PLMS steps only)
    return getattr(diffusers, SCHEDULERS[name]).from_config(model_scheduler.config, **extra)


def check_sampler(name: str, eta: float) -> None:
    """Before any work: a known scheduler, and η only where it can apply (DDIM, or the directory's own)."""
    if name not in CHOICES:
        raise ParamError(f"scheduler {name!r} is not one of {', '.join(CHOICES)}")
    if eta and name not in ("ddim", "model"):
        raise ParamError(f"eta={eta} applies to DDIM only, not {name!r} (use --scheduler ddim, or eta 0)")


def check_eta(scheduler, eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ParamError(f"eta must be in [0, 1] (0 = deterministic DDIM, the papers' setting), got {eta}")
    if eta and "eta" not in inspect.signature(scheduler.step).parameters:
        raise ParamError(f"eta={eta} applies to DDIM only; {type(scheduler).__name__} has no eta "
                              f"(use --scheduler ddim, or eta 0)")


def step_kwargs(scheduler, eta: float, seed: int) -> dict:
    """The extra arguments `scheduler.step` takes: η for DDIM, a seeded generator for stochastic steps."""
    params = inspect.signature(scheduler.step).parameters
    kw: dict = {}
    if "eta" in params:
        kw["eta"] = eta
    if "generator" in params:
        kw["generator"] = torch.Generator("cpu").manual_seed(seed)
    return kw
