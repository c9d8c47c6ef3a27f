"""Load SD components (tiny default, an SD 1.x/2.x directory, or a cached hub id) with clear errors."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors import SafetensorError


class ModelLoadError(RuntimeError):
    pass


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def placement(device: str = "auto", dtype: str = "fp32") -> tuple[torch.device, torch.dtype]:
    """Where a pipeline runs: `auto` = the first CUDA device when there is one, else the CPU. fp16 needs CUDA
    (CPU kernels lack it); bf16 works on both. ModelLoadError names the fix."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but torch sees no CUDA device here: use --device cpu")
    if dtype == "fp16" and not device.startswith("cuda"):
        raise ModelLoadError("fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    return torch.device(device), DTYPES[dtype]


@dataclass
class Components:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: DDPMScheduler
    path: str


def import_own_components(path: str) -> None:
    """A model directory may name one of this package's modules as a component's library (the embedded tiny SD's
    VAE slot names its codec). diffusers only loads components from modules that are already imported — it never
    imports a module a directory names — so import those, and only those: a module outside `guard_train` named by
    a downloaded directory is never imported (that would run its code)."""
    index = Path(path) / "model_index.json"
    try:
        spec = json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, ValueError):
        return  # a damaged index is diffusers' to report, with the path
    for value in spec.values() if isinstance(spec, dict) else ():
        if isinstance(value, list) and value and isinstance(value[0], str) and value[0].startswith("guard_train."):
            importlib.import_module(value[0])


def load_pipeline(path: str, revision: str | None = None, variant: str | None = None, **kw) -> StableDiffusionPipeline:
    import_own_components(path)
    try:
        return StableDiffusionPipeline.from_pretrained(
            path, revision=revision, variant=variant, safety_checker=None, requires_safety_checker=False,
            local_files_only=True, use_safetensors=True, **kw,  # never unpickle weights (code execution)
        )
    except (OSError, ValueError, EnvironmentError) as e:
        where = "directory" if Path(path).exists() else "hub id (looked up in the local cache only)"
        raise ModelLoadError(
            f"could not load a Stable Diffusion pipeline from {where} {path!r}: {str(e).splitlines()[0]}. "
            f"Give a diffusers SD 1.x/2.x directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
            f"scheduler/) with .safetensors weights (pickled .bin weights are refused: convert them with "
            f"diffusers' save_pretrained(..., safe_serialization=True)); to use a hub id offline, download it first on "
            f"a machine with access."
        ) from None


def read_lora(path: str) -> tuple[dict, dict, dict | None]:
    """A LoRA file's UNet keys in PEFT format (`unet.` removed), its other keys, and its alphas — from safetensors
    only (a pickled .bin LoRA could run code when loaded). One key format for every UNet key: diffusers decides a
    file's format from a single key, so a file that mixes diffusers' lora.down/up (attention) with PEFT's lora_A/B
    (conv, ff) would otherwise silently lose layers."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    try:
        sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path), use_safetensors=True)
    except (OSError, ValueError, EnvironmentError, SafetensorError) as e:  # missing, not ours, or damaged
        raise ModelLoadError(
            f"could not load LoRA weights from {str(path)!r}: {str(e).splitlines()[0]}. Give a directory with "
            f"pytorch_lora_weights.safetensors (diffusers' save_lora_weights format; pickled .bin files are refused)."
        ) from None
    unet = convert_unet_state_dict_to_peft({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})
    return unet, {k: v for k, v in sd.items() if not k.startswith("unet.")}, alphas


def load_lora(pipe: StableDiffusionPipeline, path: str) -> None:
    """`pipe.load_lora_weights` of `read_lora`'s keys; afterwards every LoRA'd module of the file is checked to be
    present in the UNet."""
    unet, rest, alphas = read_lora(path)
    check_lora_base(pipe, path)
    try:
        if alphas:  # kohya-style files carry alphas that only the path-based loader maps: leave those to diffusers
            pipe.load_lora_weights(path, use_safetensors=True)
        else:
            pipe.load_lora_weights({**{f"unet.{k}": v for k, v in unet.items()}, **rest})
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"could not apply LoRA weights from {path!r}: {str(e).splitlines()[0]}") from None
    modules = dict(pipe.unet.named_modules())
    missing = sorted(n for n in {k.split(".lora_")[0] for k in unet} if not hasattr(modules.get(n), "lora_A"))
    if missing:
        raise ModelLoadError(f"LoRA {path!r}: {len(missing)} module(s) of the file were not applied to the UNet "
                             f"(first: {missing[0]}); the file does not match this model's architecture")


def merge_lora(pipe: StableDiffusionPipeline) -> None:
    """Merge the loaded LoRA into the weights and drop the adapter layers: the same outputs up to float rounding
    (tests/test_engine.py), without the adapters' extra matmuls on every layer — for inference only (training
    and `init_lora` need the adapters)."""
    pipe.fuse_lora()
    pipe.unload_lora_weights()


def _build_info(path: str) -> dict:
    """A LoRA dir's build_info.json (our build scripts write one), or {} for any other LoRA."""
    info = Path(path) / "build_info.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def lora_base_model(path: str) -> str | None:
    """The base a LoRA was trained on: its build_info.json's (our build scripts), else the base_model.txt a training
    run writes beside its final weights, else None."""
    base = _build_info(path).get("base_model")
    txt = Path(path) / "base_model.txt"
    if base is None and txt.is_file():
        base = txt.read_text().strip() or None
    return base


def check_lora_base(pipe: StableDiffusionPipeline, path: str) -> None:
    """A LoRA trained on a v-prediction base gives noise on an ε base (and vice versa) without any error from
    diffusers, whose architectures are the same: refuse it when the LoRA's build_info.json names its base's
    prediction type."""
    info = _build_info(path)
    want = info.get("base_prediction_type")
    have = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    if want and want != have:
        base = info.get("base_model", "its base")
        raise ModelLoadError(f"LoRA {path!r} was trained on a {want} model ({base}) but this model predicts {have}: "
                             f"load it on its own base (e.g. --model {base})")


def load_components(path: str, revision: str | None = None, variant: str | None = None) -> Components:
    pipe = load_pipeline(path, revision, variant)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    return Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, sched, path)
