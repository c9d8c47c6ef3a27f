"""Training-time mitigations: one file each, registered in `base.REGISTRY` (import order = hook order), assembled
from `cfg.mitigation` into the loop's hooks. (The measuring callback that `cfg.eval` asks for is added one layer up,
by guard_train.callbacks.build_callbacks.)"""

from __future__ import annotations

from typing import Any

from guard_train.training.hooks import Hooks
from guard_train.training.mitigations.base import REGISTRY, Mitigation

# Registration order is hook order (the entropy filter first: it reads the training forward's own attention), the
# order of the config sections and of the lab's arms. Adding a mitigation: one file here, one line below.
# isort: off
from guard_train.training.mitigations import filters  # noqa: E402,F401
from guard_train.training.mitigations import sampling  # noqa: E402,F401
from guard_train.training.mitigations import captions  # noqa: E402,F401
# isort: on


def active(mitigation_cfg: Any) -> list[Mitigation]:
    """The sections of `cfg.mitigation` that are on, in registration order."""
    return [getattr(mitigation_cfg, name) for name in REGISTRY if getattr(mitigation_cfg, name).active()]


def build_hooks(mitigation_cfg: Any, hooks: Hooks | None = None) -> Hooks:
    """`hooks` (or empty ones) plus every active mitigation's hooks."""
    h = hooks or Hooks()
    for m in active(mitigation_cfg):
        m.build(h, lambda name: getattr(mitigation_cfg, name))
    return h


def check(mitigation_cfg: Any) -> None:
    """Cross-key checks of every section, and at most one mitigation that sets the data order. ValueError."""
    on = active(mitigation_cfg)
    samplers = [m.section for m in on if m.sets_sampler]
    if len(samplers) > 1:
        both = "both" if len(samplers) == 2 else "all"
        raise ValueError(f"{' and '.join('mitigation.' + s for s in samplers)} {both} set the data order: enable one")
    for name in REGISTRY:
        getattr(mitigation_cfg, name).check(lambda n: getattr(mitigation_cfg, n))
