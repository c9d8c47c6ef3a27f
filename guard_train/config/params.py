"""One declaration of a parameter's valid range, read by every place that takes the value from a user.

A config key (schema.py), a strategy hyper-parameter (`--param`, guidance/base.py) and a CLI flag (cli.py) all
declare their range with the same `Range`; `check_value` refuses a value outside it — and any non-finite number,
everywhere — with the key, the value and what is allowed. So `lr=inf`, `guidance_scale=nan`, `--steps 0` or
`num_instances=abc` stop before any work with exit 2, instead of a traceback or a silent NaN image.
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Optional


class ParamValueError(ValueError):
    """A value of the wrong type or outside its declared range; the message names key, value and what is allowed."""


@dataclass(frozen=True)
class Range:
    """Bounds (inclusive ge/le, exclusive gt/lt), or a set of choices; `off` is one extra value meaning "off"."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: tuple = ()
    off: Optional[float] = None

    def ok(self, v: Any) -> bool:
        if self.choices:
            return v in self.choices
        if v is None or isinstance(v, (str, bool)):
            return True
        if self.off is not None and v == self.off:
            return True
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        lo = f"[{_num(self.ge)}" if self.ge is not None else (f"({_num(self.gt)}" if self.gt is not None else None)
        hi = f"{_num(self.le)}]" if self.le is not None else (f"{_num(self.lt)})" if self.lt is not None else None)
        if lo and hi:
            text = f"in {lo}, {hi}"
        elif lo:
            text = (">= " if lo[0] == "[" else "> ") + lo[1:]
        elif hi:
            text = ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        else:
            text = "a finite number"
        return f"{_num(self.off)} (off) or {text}" if self.off is not None else text


def _num(x: Optional[float]) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# the ranges most keys and flags share
COUNT = Range(ge=1)  # steps, images, batch sizes, prompts
NON_NEG = Range(ge=0)  # seeds, intervals where 0 means "never", non-negative weights
POSITIVE = Range(gt=0)  # learning rates, scales
OPEN_UNIT = Range(gt=0, lt=1)  # probabilities / thresholds strictly between 0 and 1
UNIT = Range(ge=0, le=1)  # fractions
FINITE = Range()


def ranged(default: Any = None, *, factory: Optional[Callable[[], Any]] = None, doc: str = "",
           official: str = "", **bounds: Any) -> Any:
    """A dataclass field with its valid range: `lr: float = ranged(1e-4, gt=0)`; `doc` says what it does and
    `official`, where it differs from ours, the method authors' default (both go into the docs' parameter tables)."""
    meta = {"range": Range(**bounds), "doc": doc, "official": official}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def field_doc(f) -> tuple[str, str]:
    """(doc, the authors' default where it differs) of a field declared with `ranged`."""
    m = f.metadata or {}
    return m.get("doc", ""), m.get("official", "")


def field_range(f) -> Optional[Range]:
    return f.metadata.get("range") if f.metadata else None


def check_value(key: str, value: Any, rng: Optional[Range] = None) -> None:
    """Refuse a non-finite number anywhere, and a value outside its declared range."""
    allowed = rng.describe() if rng else "a finite number"
    if isinstance(value, float) and not math.isfinite(value):
        finite = "a finite number" + (f" {allowed}" if rng and not rng.choices and allowed != "a finite number" else "")
        raise ParamValueError(f"{key} must be {finite}, got {value}")
    if isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, float) and not math.isfinite(v):
                raise ParamValueError(f"{key} must hold finite numbers, got {v}")
        return
    if rng is not None and not rng.ok(value):
        raise ParamValueError(f"{key} must be {allowed}, got {value!r}")


def check_dataclass(obj: Any, prefix: str = "") -> None:
    """check_value on every field of a dataclass (recursing into nested ones), keys as `prefix.name`."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            check_dataclass(v, f"{prefix}{f.name}.")
        else:
            check_value(prefix + f.name, v, field_range(f))


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(tp: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) for `X` or `Optional[X]`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


NONE_WORDS = ("none", "null", "~", "")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse(key: str, text: str, tp: Any, rng: Optional[Range] = None) -> Any:
    """A command-line string as the declared type, range-checked."""
    typ, optional = base_type(tp)
    if optional and text.strip().lower() in NONE_WORDS:
        return None
    kind = {bool: "true or false", int: "an integer", float: "a number"}.get(typ)
    try:
        if typ is bool:
            low = text.strip().lower()
            if low not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(text)
            value: Any = low in TRUE_WORDS
        elif typ is int:
            value = int(text)
        elif typ is float:
            value = float(text)
        else:
            value = text
    except ValueError:
        bounds = f" {rng.describe()}" if rng and not rng.choices and rng.describe() != "a finite number" else ""
        raise ParamValueError(f"{key} must be {kind}{bounds}, got {text!r}") from None
    check_value(key, value, rng)
    return value


def arg_type(tp: type, rng: Optional[Range] = None) -> Callable[[str], Any]:
    """An argparse `type=`: a bad flag value exits 2 with argparse's usage line, before any work."""

    def conv(text: str) -> Any:
        try:
            return parse("value", text, tp, rng)
        except ParamValueError as e:  # argparse prefixes "argument --flag:"
            raise argparse.ArgumentTypeError(str(e).replace("value ", "", 1)) from None

    conv.__name__ = getattr(tp, "__name__", "value")
    return conv


def bad_input(e: object) -> int:
    """A command's answer to bad input: one line on stderr, exit code 2 (never a traceback)."""
    import sys

    print(f"error: {e}", file=sys.stderr)
    return 2


def dataclass_arg_type(cls: type, name: str) -> Callable[[str], Any]:
    """The argparse `type=` of a dataclass field (its type and declared range): a flag that sets that field."""
    f = next(f for f in fields(cls) if f.name == name)
    return arg_type(type_hints(cls)[name], field_range(f))


def field_rows(cls: type) -> list[tuple[str, str, str, str, str, str]]:
    """(name, type, default, allowed, doc, the authors' default where it differs) per field of a dataclass declared
    with `ranged`: the rows of the docs' parameter tables (methods, training mitigations)."""
    hints = type_hints(cls)
    out = []
    for f in fields(cls):
        rng = field_range(f)
        allowed = rng.describe() if rng is not None else "a finite number" if hints[f.name] is float else ""
        if hints[f.name] is bool:
            allowed = "true / false"
        elif hints[f.name] is str and not (rng and rng.choices):
            allowed = "text"
        elif typing.get_origin(hints[f.name]) is list:
            allowed = "a list"
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = ""
        doc, official = field_doc(f)
        out.append((f.name, getattr(hints[f.name], "__name__", str(hints[f.name])), str(default), allowed, doc,
                    official))
    return out
