"""Full fine-tuning with the UNet sharded by torch's FSDP2 (`fully_shard`), driven by the loop itself.

Why not accelerate's FSDP plugin: on a machine without CUDA, accelerate 1.15 ignores an FSDP config —
`Accelerator(cpu=True)` becomes plain multi-process CPU training (the UNet replicated and wrapped in DDP) and
`Accelerator()` runs each process alone — so `train.fsdp=true` shards here instead: each BasicTransformerBlock and
then the UNet root become FSDP units (parameters are DTensors sharded over the processes; gradients are
reduce-scattered; the optimizer holds only its shard). On GPUs accelerate's FSDP config (accelerate_configs/
fsdp.yaml) is the usual route; this one works on both.

Checkpoints: the model and optimizer shards go through torch.distributed.checkpoint (`<checkpoint>/fsdp/`, every
rank writes its own part); the final export gathers the full weights into a plain UNet (`full_copy`), as does the
in-memory pipeline the memorization callback and the summary generate with (a collective: every rank calls it).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard


def shard_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """Every transformer block its own FSDP unit (its parameters gathered only for its forward), then the root."""
    for m in unet.modules():
        if isinstance(m, BasicTransformerBlock):
            fully_shard(m)
    fully_shard(unet)
    return unet


def save(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Model and optimizer shards, every rank its own part (a collective)."""
    model_sd, optim_sd = get_state_dict(unet, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(unet, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(unet, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_copy(unet: torch.nn.Module) -> UNet2DConditionModel:
    """A plain (unsharded) UNet with the current full weights, on every rank (a collective)."""
    full = get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True))
    copy = UNet2DConditionModel.from_config(unet.config)
    copy.load_state_dict(full, strict=True)
    return copy.to(next(iter(full.values())).device).eval()


def grad_norm_value(norm) -> torch.Tensor:
    """clip_grad_norm_ over sharded parameters returns a (replicated) DTensor: its plain value."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else torch.as_tensor(norm)
