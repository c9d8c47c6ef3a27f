"""The training mitigations' parameter table, derived from the registry (each section's keys: type, default, range,
doc): `guard-train mitigations` prints it, docs/mitigations.md holds it, and a test keeps the two equal."""

from __future__ import annotations

from guard_train.config.params import field_rows
from guard_train.training.mitigations import REGISTRY

BEGIN, END = "<!-- mitigations:begin (guard-train mitigations --markdown) -->", "<!-- mitigations:end -->"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")  # a literal | (as in 1/|cluster|^α) would split the cell


def markdown() -> str:
    lines = [BEGIN, "| section | what it does | lab arms |", "|---|---|---|"]
    for name, cls in REGISTRY.items():
        arms = ", ".join(f"`{a}`" for a in cls.arms) or "—"
        lines.append(f"| `mitigation.{name}` | {_cell(cls.summary)} | {arms} |")
    lines += ["", "| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for name, cls in REGISTRY.items():
        for key, typ, default, allowed, doc, _ in field_rows(cls):
            lines.append(f"| `mitigation.{name}.{key}` | {typ} | {_cell(default)} | {_cell(allowed)} | {_cell(doc)} |")
    lines.append(END)
    return "\n".join(lines)


def text() -> str:
    out = []
    for name, cls in REGISTRY.items():
        out.append(f"mitigation.{name} — {cls.summary}")
        for key, typ, default, allowed, doc, _ in field_rows(cls):
            out.append(f"  {key:<14} {typ:<6} default {default:<10} {allowed:<24} {doc}")
    return "\n".join(out)
