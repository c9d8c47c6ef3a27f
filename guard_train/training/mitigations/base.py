"""The training-mitigation registry: one file per mitigation declares its config section and registers it.

A mitigation is a dataclass (its `mitigation.<section>` config keys, each declared with `ranged(default, range,
doc=...)`) decorated with `@register`, with:
* `section` (ClassVar): the config section name; `summary` (ClassVar): one line for the docs table;
* `arms` (ClassVar): the lab's training arms that turn it on, {arm name: {key: value}} ({} = none);
* `sets_sampler` (ClassVar): it replaces the data order (at most one such mitigation may be on);
* `active()`: whether the config turns it on; `build(hooks, section_of)`: add its hooks (loss weighting, caption or
  embedding transforms, a sampler factory); `check(section_of)`: cross-key checks (raise ValueError naming the key).
The config schema (`mitigation.*`), `build_hooks`, config validation, the lab's training arms, `guard-train
mitigations` and the table in docs/mitigations.md are all derived from the registry. Registration order is the
order hooks are added (the entropy filter first: it reads the training forward's own attention).
"""

from __future__ import annotations

from typing import Callable, ClassVar, TypeVar

from guard_train.training.hooks import Hooks

T = TypeVar("T", bound=type)

REGISTRY: dict[str, type] = {}


class Mitigation:
    """Base of a registered mitigation's config dataclass (see the module docstring)."""

    section: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    arms: ClassVar[dict[str, dict[str, str]]] = {}
    sets_sampler: ClassVar[bool] = False

    def active(self) -> bool:
        return bool(getattr(self, "enabled", False))

    def build(self, hooks: Hooks, section_of: Callable[[str], "Mitigation"]) -> None:
        raise NotImplementedError

    def check(self, section_of: Callable[[str], "Mitigation"]) -> None:
        """Checks beyond each key's declared range."""


def register(cls: T) -> T:
    if not cls.section or cls.section in REGISTRY:
        raise ValueError(f"mitigation {cls.__name__}: section {cls.section!r} is empty or already registered")
    REGISTRY[cls.section] = cls
    return cls
