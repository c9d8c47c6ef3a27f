"""The inference methods: one file per method family, each class decorated with `@register` (guidance/base.py).
Importing this package imports them all; `METHODS` is every registered method, `get_strategy(name, **params)` one."""

from __future__ import annotations

from guard_train.guidance.base import METHODS, ParamError, Strategy

# One line per file; the order is the methods' order in the CLI and the docs table (guard imports prompt_noise
# for its neighbour prompts, so those register before it).
# isort: off
from guard_train.guidance.strategies import cfg  # noqa: E402,F401
from guard_train.guidance.strategies import guard  # noqa: E402,F401
from guard_train.guidance.strategies import jain  # noqa: E402,F401
from guard_train.guidance.strategies import ren  # noqa: E402,F401
from guard_train.guidance.strategies import wen  # noqa: E402,F401
from guard_train.guidance.strategies import prompt_noise  # noqa: E402,F401
# isort: on

__all__ = ["METHODS", "get_strategy"]


def get_strategy(name: str, **params) -> Strategy:
    if name not in METHODS:
        raise ParamError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name](**params)
