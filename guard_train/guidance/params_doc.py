"""The inference methods' parameter table, derived from each strategy's `Params` declaration (type, default,
range, doc, the authors' default where it differs): `guard-train methods` prints it, docs/inference.md holds it,
and a test keeps the two equal."""

from __future__ import annotations

from dataclasses import MISSING, fields

from guard_train.config.params import field_doc, field_range, type_hints
from guard_train.guidance.strategies import METHODS

BEGIN, END = "<!-- params:begin (guard-train methods --markdown) -->", "<!-- params:end -->"


def rows(method: str) -> list[tuple[str, str, str, str, str, str]]:
    """(name, type, default, allowed, doc, authors' default) per parameter of one method."""
    cls = METHODS[method].Params
    hints = type_hints(cls)
    out = []
    for f in fields(cls):
        rng = field_range(f)
        allowed = rng.describe() if rng is not None else "a finite number" if hints[f.name] is float else ""
        if hints[f.name] is bool:
            allowed = "true / false"
        elif hints[f.name] is str and not (rng and rng.choices):
            allowed = "text"
        default = f.default if f.default is not MISSING else ""
        doc, official = field_doc(f)
        out.append((f.name, getattr(hints[f.name], "__name__", str(hints[f.name])), str(default), allowed, doc,
                    official))
    return out


def markdown() -> str:
    lines = [BEGIN,
             "| method | parameter | type | default | allowed | what it does | authors' code, where it differs |",
             "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        for name, typ, default, allowed, doc, official in rows(m):
            lines.append(f"| `{m}` | `{name}` | {typ} | {default} | {allowed} | {doc} | {official} |")
    lines.append(END)
    return "\n".join(lines)
