"""The config schema: every key a recipe or a `key=value` override may set, with its type and default.

Recipes (recipes/*.yaml) are partial overrides of these defaults; OmegaConf checks keys and types against the
dataclasses; a field's valid range is declared beside it (`ranged`, config/params.py) and every float must be
finite; `validate()` checks what spans several keys, and paths. Nothing is written before validation passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Optional

from guard_train.config.params import ranged
from guard_train.guidance.schedulers import CHOICES as SCHEDULER_CHOICES
from guard_train.guidance.schedulers import DEFAULT as DEFAULT_SCHEDULER
from guard_train.training.mitigations import REGISTRY as MITIGATIONS

DATA_SOURCES = ("imagefolder", "parquet", "hf_disk", "webdataset", "img2dataset")


@dataclass
class ModelConfig:
    path: str = "models/tiny-sd"  # diffusers SD 1.x/2.x directory, or a hub id already in the local HF cache
    revision: Optional[str] = None
    variant: Optional[str] = None


@dataclass
class DataConfig:
    # imagefolder | parquet | hf_disk | webdataset | img2dataset (a subclass may add generated sources)
    source: str = ranged("imagefolder", choices=DATA_SOURCES)
    path: str = ""  # dataset root / file / glob (not used for a generated source)
    image_column: str = "image"
    caption_column: str = "text"
    id_column: str = ""  # stable id column; default: row index
    resolution: int = ranged(64, ge=8)  # a multiple of 8 (checked in validate)
    center_crop: bool = True
    random_flip: bool = False
    # empty caption with this probability (for classifier-free guidance)
    caption_dropout: float = ranged(0.1, ge=0, lt=1)
    streaming: bool = False
    max_samples: int = ranged(0, ge=0)  # 0 = all
    num_workers: int = ranged(0, ge=0)

    # A schema that adds a generated source (the lab, guard_train/lab/config.py) overrides these three.
    def generated(self) -> bool:
        """True when the dataset is made by code at the start of a run (no data.path) — `write` makes it, as an
        imagefolder with a manifest.jsonl of every row, which the memorization callback reads."""
        return False

    def write(self, root: Path) -> Path:
        raise NotImplementedError(f"data.source={self.source} is read from data.path, not generated")

    def validate(self) -> None:
        """Checks beyond the declared ranges; raises ValueError naming the key (without the `data.` prefix)."""


@dataclass
class TrainConfig:
    mode: str = ranged("lora", choices=("lora", "full"))
    lora_rank: int = ranged(4, ge=1)
    lora_alpha: int = ranged(4, gt=0)
    lora_targets: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    batch_size: int = ranged(16, ge=1)  # per process
    gradient_accumulation_steps: int = ranged(1, ge=1)
    max_steps: int = ranged(1000, ge=0)  # optimizer steps; wins over epochs when > 0
    epochs: int = ranged(0, ge=0)
    learning_rate: float = ranged(1e-4, gt=0)
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = ranged(0, ge=0)
    adam_beta1: float = ranged(0.9, ge=0, lt=1)
    adam_beta2: float = ranged(0.999, ge=0, lt=1)
    adam_weight_decay: float = ranged(1e-2, ge=0)
    adam_epsilon: float = ranged(1e-8, gt=0)
    optimizer: str = ranged("adamw", choices=("adamw", "adamw8bit"))
    max_grad_norm: float = ranged(1.0, gt=0)
    mixed_precision: str = ranged("no", choices=("no", "fp16", "bf16"))  # accelerate's values
    gradient_checkpointing: bool = False
    # mode=full: shard the UNet over the processes with torch's FSDP2, driven by the loop (training/fsdp.py) —
    # works on CPU too, where accelerate ignores an FSDP config
    fsdp: bool = False
    ema: bool = False
    ema_decay: float = ranged(0.9999, gt=0, lt=1)
    noise_offset: float = ranged(0.0, ge=0)
    snr_gamma: float = ranged(0.0, ge=0)  # 0 = off; 5.0 is the usual min-SNR value
    # > 0: weight an ε-model's loss by min(1 + 1/SNR, cap) — what a v-prediction loss weighs it by
    # (‖Δv‖² = ‖Δε‖²·(1 + 1/SNR)): the x̂₀ error of the high-noise steps, which set the layout, counts ~1, not SNR.
    v_weight_cap: float = ranged(0.0, ge=1, off=0.0)
    # Timestep bias (the knob of diffusers' SDXL text-to-image script): sample training timesteps with weight
    # `multiplier` on a part of the range — later = the top `portion`, earlier = the bottom, range = [begin, end).
    timestep_bias_strategy: str = ranged("none", choices=("none", "later", "earlier", "range"))
    timestep_bias_multiplier: float = ranged(1.0, gt=0)
    timestep_bias_portion: float = ranged(0.25, gt=0, le=1)
    timestep_bias_begin: int = ranged(0, ge=0)
    timestep_bias_end: int = 1000
    init_lora: str = ""  # LoRA weights (dir or .safetensors) to start from instead of a fresh adapter (mode=lora)
    cache_latents: bool = False
    seed: int = 0
    checkpoint_every: int = ranged(0, ge=0)  # optimizer steps; 0 = only at the end
    checkpoints_total_limit: int = ranged(2, ge=1)
    # stop (last good checkpoint kept) after this many non-finite steps in a row
    max_consecutive_nonfinite: int = ranged(5, ge=1)


# One section per registered training mitigation (guard_train/training/mitigations/: each file declares its keys).
MitigationConfig = make_dataclass(
    "MitigationConfig", [(name, cls, field(default_factory=cls)) for name, cls in MITIGATIONS.items()])


@dataclass
class EvalConfig:
    """Memorization measured during training (MemorizationCallback); off unless every_n_* or at_end is set."""

    every_n_epochs: int = 0
    every_n_steps: int = 0
    at_end: bool = False
    methods: list[str] = field(default_factory=lambda: ["cfg", "guard"])
    prompts_per_group: int = 8  # duplicated / unique / held-out captions each
    images_per_prompt: int = 2
    steps: int = 25
    guidance_scale: float = ranged(0.0, gt=0, off=0.0)  # every method's CFG scale; 0 = each method's own (7.5)
    scheduler: str = ranged(DEFAULT_SCHEDULER, choices=SCHEDULER_CHOICES)  # model = the directory's own
    eta: float = ranged(0.0, ge=0, le=1)  # DDIM only
    max_batch: int = 64
    seed: int = 0
    copy_threshold: float = 0.5
    backend: str = "sscd"  # sscd | sscd-torchscript:<path> | pixel
    copy_rate_limit: float = 0.0  # 0 = off; early warning when the duplicated captions' copy rate exceeds it
    stop_on_limit: bool = False
    # The reference set: "" = the run's generated dataset (data.source=lab); else a dataset dir with a reference
    # manifest (manifest.jsonl: prompt groups from it), or any imagefolder / parquet of the training images
    # (every image is the reference set; then eval.prompts is required)
    reference: str = ""
    prompts: str = ""  # .txt (one prompt per line) or .jsonl ({"prompt", "group", "owner"}); replaces the groups

    def wants_callback(self) -> bool:
        """Whether these settings ask for the memorization callback during training."""
        return bool(self.every_n_epochs or self.every_n_steps or self.at_end)


@dataclass
class RunConfig:
    output_dir: str = "runs"
    name: str = ""  # default: <recipe>-<timestamp>, chosen on rank 0 and shared with every rank
    resume: str = ""  # "" | latest | path to a checkpoint dir
    overwrite: bool = False
    report_to: str = "tensorboard"  # tensorboard | wandb | … (accelerate trackers) | none
    log_every: int = ranged(10, ge=1)  # optimizer steps between metric lines
    # a collective that waits longer than this (a peer rank died or hangs) raises instead of hanging; the
    # launcher (torchrun's agent) usually ends the survivors sooner, this bounds it when it does not
    collective_timeout_s: int = ranged(600, ge=10)  # seconds


@dataclass
class Config:
    recipe: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
