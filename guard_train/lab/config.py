"""The CLI's config schema: the core `Config` plus what the lab adds — the generated `data.source=lab` with its
`data.lab.*` keys, and the end-of-run `summary.*` (which measures on the lab's captions).

The core's loader takes a schema; this module is the one place that passes the lab's. A user's own data needs
none of it: `guard_train.config.loader.load_config(args)` loads the core schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from guard_train.config import loader
from guard_train.config.params import ranged
from guard_train.config.schema import DATA_SOURCES, Config, DataConfig
from guard_train.lab.dataset import LabConfig, build_lab, write_imagefolder


@dataclass
class LabDataConfig(DataConfig):
    # lab (generated: the procedural lab, `data.lab.*`) | imagefolder | parquet | hf_disk | webdataset | img2dataset
    source: str = ranged("lab", choices=("lab", *DATA_SOURCES))
    lab: LabConfig = field(default_factory=LabConfig)

    def generated(self) -> bool:
        return self.source == "lab"

    def write(self, root: Path) -> Path:
        return write_imagefolder(build_lab(self.lab), root)

    def validate(self) -> None:
        self.lab.validate()


@dataclass
class SummaryConfig:
    """End-of-run memorization summary (duplicated vs unique captions)."""

    enabled: bool = True
    max_prompts: int = ranged(16, ge=1)  # per group (duplicated / unique)
    images_per_prompt: int = ranged(2, ge=1)
    steps: int = ranged(25, ge=1)
    guidance_scale: float = 5.0
    probe_timestep: int = ranged(200, ge=0, lt=1000)  # one-step x0 reconstruction probe
    copy_threshold: float = ranged(0.5, gt=0, lt=1)
    backend: str = ranged("sscd", choices=("sscd", "pixel"))


@dataclass
class LabRunConfig(Config):
    data: LabDataConfig = field(default_factory=LabDataConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)


def load_config(args: list[str]) -> LabRunConfig:
    """`recipe=NAME key=value …` against the CLI's schema (every recipe in recipes/, the lab's included)."""
    return loader.load_config(args, schema=LabRunConfig)  # type: ignore[return-value]
