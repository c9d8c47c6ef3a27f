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
    # > 0: weight an ε-model's loss by min(1 + 1/SNR, cap) — what a v-prediction loss weighs it by
    # (‖Δv‖² = ‖Δε‖²·(1 + 1/SNR)): the x̂₀ error of the high-noise steps, which set the layout, counts ~1, not SNR.
    v_weight_cap: float = 0.0
    # Timestep bias (the knob of diffusers' SDXL text-to-image script): sample training timesteps with weight
    # `multiplier` on a part of the range — later = the top `portion`, earlier = the bottom, range = [begin, end).
    timestep_bias_strategy: str = "none"  # none | later | earlier | range
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    init_lora: str = ""  # LoRA weights (dir or .safetensors) to start from instead of a fresh adapter (mode=lora)
    cache_latents: bool = False
    seed: int = 0
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end
    checkpoints_total_limit: int = 2
    max_consecutive_nonfinite: int = 5  # stop (last good checkpoint kept) after this many non-finite steps in a row


@dataclass
class FilterConfig:
    enabled: bool = False
    mode: str = "quantile"  # quantile | fixed
    threshold: float = 0.0  # used when mode=fixed
    quantile: float = 0.95  # drop the top 1-q of scores, per timestep bucket, calibrated over the warm-up
    buckets: int = 10  # timestep buckets for the calibrated threshold
    warmup_steps: int = 50  # micro-steps of calibration (nothing dropped meanwhile)

    def validate(self, name: str) -> None:
        if self.mode not in ("quantile", "fixed"):
            raise ValueError(f"{name}.mode must be quantile or fixed, got {self.mode!r}")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"{name}.quantile must be in (0, 1), got {self.quantile}")
        if self.buckets < 1 or self.warmup_steps < 1:
            raise ValueError(f"{name}.buckets and {name}.warmup_steps must be >= 1")
        if self.threshold < 0:  # both scores (attention entropy, noise-prediction magnitude) are >= 0
            raise ValueError(f"{name}.threshold must be >= 0 (the filter's score is never negative), got {self.threshold}")


@dataclass
class EntropyFilterConfig(FilterConfig):
    # the analogue of SD's down_blocks.1.attentions.1 (exec index 3, Ren et al.'s detection layer)
    layers: list[str] = field(default_factory=lambda: ["down_blocks.1.attentions.1.transformer_blocks.0.attn2"])


@dataclass
class MagnitudeFilterConfig(FilterConfig):
    buckets: int = 1


@dataclass
class DupSamplingConfig:
    enabled: bool = False
    clusters: str = ""  # clusters.jsonl from `guard-train dedup`; "" = run dedup on the training data at start
    alpha: float = 1.0  # weight 1/|cluster|^alpha
    backend: str = "sscd"  # sscd | phash | sscd-torchscript:<path>
    threshold: float = 0.0  # 0 = backend default (SSCD cosine 0.6, pHash 8 bits)
    group_by: str = "image"  # image | caption | both


@dataclass
class InjectionConfig:
    """Somepalli et al.'s duplication testbed: make a memorizing model on purpose."""

    enabled: bool = False
    fraction: float = 0.05
    weight: float = 5.0


@dataclass
class CaptionMitigationConfig:
    mode: str = "none"  # none | rc | rt | cwr (MC: give a list-valued caption column)
    p: float = 0.1
    gn_lambda: float = 0.0  # Gaussian noise on text embeddings (GN); 0 = off


@dataclass
class MitigationConfig:
    entropy_filter: EntropyFilterConfig = field(default_factory=EntropyFilterConfig)
    magnitude_filter: MagnitudeFilterConfig = field(default_factory=MagnitudeFilterConfig)
    dup_sampling: DupSamplingConfig = field(default_factory=DupSamplingConfig)
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    captions: CaptionMitigationConfig = field(default_factory=CaptionMitigationConfig)


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
class EvalConfig:
    """Memorization measured during training (MemorizationCallback); off unless every_n_* or at_end is set."""

    every_n_epochs: int = 0
    every_n_steps: int = 0
    at_end: bool = False
    methods: list[str] = field(default_factory=lambda: ["cfg", "guard"])
    prompts_per_group: int = 8  # duplicated / unique / held-out captions each
    images_per_prompt: int = 2
    steps: int = 25
    max_batch: int = 64
    seed: int = 0
    copy_threshold: float = 0.5
    backend: str = "sscd"  # sscd | sscd-torchscript:<path> | pixel
    copy_rate_limit: float = 0.0  # 0 = off; early warning when the duplicated captions' copy rate exceeds it
    stop_on_limit: bool = False


@dataclass
class RunConfig:
    output_dir: str = "runs"
    name: str = ""  # default: <recipe>-<timestamp>, chosen on rank 0 and shared with every rank
    resume: str = ""  # "" | latest | path to a checkpoint dir
    overwrite: bool = False
    report_to: str = "tensorboard"  # tensorboard | wandb | … (accelerate trackers) | none
    log_every: int = 10
    # a collective that waits longer than this (a peer rank died or hangs) raises instead of hanging; the
    # launcher (torchrun's agent) usually ends the survivors sooner, this bounds it when it does not
    collective_timeout_s: int = 600


@dataclass
class Config:
    recipe: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    run: RunConfig = field(default_factory=RunConfig)
