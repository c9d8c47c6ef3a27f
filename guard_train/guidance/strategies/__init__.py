"""Registry of inference-time methods: `get_strategy(name, **params)`."""

from __future__ import annotations

from guard_train.guidance.base import ParamError, Strategy
from guard_train.guidance.strategies.cfg import CFG
from guard_train.guidance.strategies.guard import Guard, GuardAttenuation
from guard_train.guidance.strategies.jain import JainDynamic, JainStatic, OppositeDynamic, OppositeStatic
from guard_train.guidance.strategies.prompt_noise import GNI, RandomNumber, RandomToken, WordRepeat
from guard_train.guidance.strategies.ren import Ren
from guard_train.guidance.strategies.wen import BrightEndingOpt, WenOpt

METHODS: dict[str, type[Strategy]] = {s.name: s for s in (
    CFG, Guard, GuardAttenuation, JainStatic, JainDynamic, OppositeStatic, OppositeDynamic, Ren, WenOpt,
    BrightEndingOpt, GNI, RandomToken, WordRepeat, RandomNumber)}


def get_strategy(name: str, **params) -> Strategy:
    if name not in METHODS:
        raise ParamError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name](**params)
