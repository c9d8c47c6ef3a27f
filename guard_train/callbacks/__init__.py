"""Callbacks that measure during training, and the one place that adds them to a Trainer's hooks."""

from __future__ import annotations

from typing import Optional

from guard_train.callbacks.memorization import MemorizationCallback
from guard_train.config.schema import Config
from guard_train.training.hooks import Hooks
from guard_train.training.loop import train as _train


def build_callbacks(cfg: Config, hooks: Optional[Hooks] = None) -> Hooks:
    """`hooks` (or empty ones) with the memorization callback added when `cfg.eval` asks for it (every_n_epochs,
    every_n_steps or at_end) and `hooks` holds none yet."""
    h = hooks or Hooks()
    if cfg.eval.wants_callback() and not any(getattr(cb, "measures_memorization", False) for cb in h.callbacks):
        h.callbacks.append(MemorizationCallback(cfg.eval))
    return h


def train(cfg: Config, hooks: Optional[Hooks] = None) -> dict:
    """Train (guard_train.training.loop.train) with the callbacks `cfg.eval` asks for."""
    return _train(cfg, build_callbacks(cfg, hooks))
