"""guard_train: memorization-aware Stable Diffusion fine-tuning.

The entry points a user imports (loaded on first use, so `import guard_train` stays light):

    from guard_train import load_config, train, GuidanceEngine
    cfg = load_config(["recipe=tiny", "train.max_steps=100"]); train(cfg)
    eng = GuidanceEngine.from_pretrained("models/tiny-sd"); eng.generate(["a red circle"], method="guard")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "guard_train.lab.config",
    "Trainer": "guard_train.training.loop",
    "train": "guard_train.callbacks",
    "GuidanceEngine": "guard_train.guidance.engine",
    "GenerationResult": "guard_train.guidance.engine",
    "get_strategy": "guard_train.guidance.strategies",
    "METHODS": "guard_train.guidance.strategies",
    "MemorizationCallback": "guard_train.callbacks.memorization",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'guard_train' has no attribute {name!r}")
