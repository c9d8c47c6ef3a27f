"""The inference methods' parameter table, derived from each strategy's `Params` declaration (type, default,
range, doc, the authors' default where it differs): `guard-train methods` prints it, docs/inference.md holds it,
and a test keeps the two equal."""

from __future__ import annotations

from guard_train.config.params import field_rows
from guard_train.guidance.strategies import METHODS

BEGIN, END = "<!-- params:begin (guard-train methods --markdown) -->", "<!-- params:end -->"


def rows(method: str) -> list[tuple[str, str, str, str, str, str]]:
    """(name, type, default, allowed, doc, authors' default) per parameter of one method."""
    return field_rows(METHODS[method].Params)


def markdown() -> str:
    lines = [BEGIN,
             "| method | parameter | type | default | allowed | what it does | authors' code, where it differs |",
             "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        for name, typ, default, allowed, doc, official in rows(m):
            lines.append(f"| `{m}` | `{name}` | {typ} | {default} | {allowed} | {doc} | {official} |")
    lines.append(END)
    return "\n".join(lines)
