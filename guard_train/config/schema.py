"""The config schema: every key a recipe or a `key=value` override may set, with its type and default.

Recipes (recipes/*.yaml) are partial overrides of these defaults; OmegaConf checks keys and types against the
dataclasses, `validate()` checks ranges and paths. Nothing is written before validation passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from guard_train.data.lab import LabConfig


@dataclass
class ModelConfig:
    path: str = "models/tiny-sd"  # diffusers SD 1.x/2.x directory, or a hub id already in the local HF cache
    revision: Optional[str] = None
    variant: Optional[str] = None


@dataclass
class DataConfig:
    # lab | imagefolder | parquet | hf_disk | webdataset | img2dataset
    source: str = "lab"
    path: str = ""  # dataset root / file / glob (not used for source=lab)
    image_column: str = "image"
    caption_column: str = "text"
    id_column: str = ""  # stable id column; default: row index
    resolution: int = 64
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = 0.1  # empty caption with this probability (for classifier-free guidance)
    streaming: bool = False
    max_samples: int = 0  # 0 = all
    num_workers: int = 0
    lab: LabConfig = field(default_factory=LabConfig)


@dataclass
class TrainConfig:
    mode: str = "lora"  # lora | full
    lora_rank: int = 4
    lora_alpha: int = 4
    lora_targets: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    batch_size: int = 16  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps; wins over epochs when > 0
    epochs: int = 0
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    optimizer: str = "adamw"  # adamw | adamw8bit
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    noise_offset: float = 0.0
    snr_gamma: float = 0.0  # 0 = off; 5.0 is the usual min-SNR value
    cache_latents: bool = False
    seed: int = 0
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end
    checkpoints_total_limit: int = 2


@dataclass
class SummaryConfig:
    """End-of-run memorization summary (duplicated vs unique captions)."""

    enabled: bool = True
    max_prompts: int = 16  # per group (duplicated / unique)
    images_per_prompt: int = 2
    steps: int = 25
    guidance_scale: float = 5.0
    probe_timestep: int = 200  # one-step x0 reconstruction probe
    copy_threshold: float = 0.5
    backend: str = "sscd"  # sscd | pixel


@dataclass
class RunConfig:
    output_dir: str = "runs"
    name: str = ""  # default: <recipe>-<timestamp>, chosen on rank 0 and shared with every rank
    resume: str = ""  # "" | latest | path to a checkpoint dir
    overwrite: bool = False
    report_to: str = "tensorboard"  # tensorboard | wandb | … (accelerate trackers) | none
    log_every: int = 10


@dataclass
class Config:
    recipe: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    run: RunConfig = field(default_factory=RunConfig)
