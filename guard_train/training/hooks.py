"""Extension points of the training loop. Mitigations (entropy/magnitude filters, duplicate-aware sampling, caption
mitigations) and measurement callbacks plug in here; the loop itself stays method-agnostic.

Every hook runs on every rank. A hook that needs agreement across ranks (a calibrated threshold, "skip this step")
does its own collective through `ctx.accelerator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class StepContext:
    """What a loss-weighting hook sees for one micro-batch."""

    accelerator: "Accelerator"
    step: int  # optimizer steps done so far
    ids: torch.Tensor  # (B,) dataset ids
    captions: list[str]
    timesteps: torch.Tensor  # (B,)
    noisy_latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    per_sample_loss: torch.Tensor  # (B,), already SNR-weighted, with grad
    unet: torch.nn.Module  # the prepared (possibly DDP-wrapped) UNet; use accelerator.unwrap_model for extra passes
    pred: torch.Tensor = None  # the UNet's prediction for this micro-batch (with grad)
    encode_text: Callable[[list[str]], torch.Tensor] = None  # frozen text encoder, captions -> embeddings
    run_dir: Any = None
    scheduler: Any = None  # the noise scheduler (its prediction_type and ᾱ_t); None = an ε-model
    captures: dict[str, Any] = field(default_factory=dict)  # filled by attention processors (issue: attention)
    logs: dict[str, float] = field(default_factory=dict)  # hooks add scalars to log here


class LossWeighting(Protocol):
    """Returns per-sample weights (B,) ≥ 0; 0 drops a sample. The loop normalises by the summed weight; when every
    sample on every rank is dropped, all ranks skip the step together. Optional methods the loop calls if present:
    `setup(unet)`, `state_dict()` / `load_state_dict(d)` (saved per rank in checkpoints)."""

    def __call__(self, ctx: StepContext) -> torch.Tensor: ...


CaptionTransform = Callable[[str, int, np.random.Generator], str]  # (caption, dataset id, rng) -> caption
# (text embeddings (B, T, D), per-rank torch.Generator) -> embeddings; e.g. Gaussian noise on embeddings (GN)
EmbeddingTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class TrainState:
    """Passed to callbacks; `run_dir` is shared by all ranks, `pipeline()` builds an in-memory pipeline."""

    accelerator: "Accelerator"
    step: int
    epoch: int
    run_dir: Any
    metrics: dict[str, float]
    pipeline: Callable[[], Any]
    should_stop: bool = False


class Callback:
    """Override what you need. Called on every rank (split work with accelerator.split_between_processes and
    write/log on the main process only)."""

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Hooks:
    loss_weighting: list[LossWeighting] = field(default_factory=list)
    caption_transforms: list[CaptionTransform] = field(default_factory=list)
    embedding_transforms: list[EmbeddingTransform] = field(default_factory=list)
    # (dataset_len, seed, rank, world) -> sampler with set_epoch(e), start_at(i), __iter__, __len__, state_dict
    sampler_factory: Optional[Callable[..., Any]] = None
    callbacks: list[Callback] = field(default_factory=list)
    # called once with the unet before training (e.g. to install attention processors)
    setup: list[Callable[[torch.nn.Module], None]] = field(default_factory=list)
