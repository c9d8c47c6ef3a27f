"""What the lab's committed results cost to make: wall time summed from the records each run wrote (issue 20, item 7).

    python benchmarks/lab_compute.py [--out results/lab_compute.json]

Reads only committed files: the lab cells' `cell_wall_s` (`results/lab_cells*/`), the trade-off sweeps'
`results/tradeoff_*.meta.json`, the copying-regime arms' logs (`results/copying_regime_*.json`: the training log's
last wall time plus the evaluation made at that step, which the log line precedes) and the build records of the
models the lab runs on (`models/*/build_info.json`, `models/lab-scorer/scorer.json`). Every figure is wall time on the
machine that made it (the 2-core CPU unless its record says otherwise); runs that shared the CPU with other work
count their shared time too, so this is what the results took, not what they would take alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lab_cells(root: Path) -> dict[str, float]:
    """`guard-train lab` cells: one JSON per (arm, seed) with its own wall time."""
    out = {}
    for d in sorted(root.glob("results/lab_cells*")):
        if d.is_dir():
            out[d.name] = sum(json.loads(f.read_text()).get("cell_wall_s", 0.0) for f in d.glob("*.json"))
    return out


def sweeps(root: Path) -> dict[str, float]:
    return {f.name.removesuffix(".meta.json"): json.loads(f.read_text())["wall_s"]
            for f in sorted(root.glob("results/tradeoff_*.meta.json"))}


def copying_arms(root: Path) -> dict[str, float]:
    """Each arm's training wall time (every segment of a resumed run; older records: the log's last wall time), plus
    the evaluation at its last step (logged after the line)."""
    out = {}
    for f in sorted(root.glob("results/copying_regime_*.json")):
        for arm, rec in json.loads(f.read_text())["arms"].items():
            last = rec.get("last_log", {})
            tail = sum(e["wall_s_eval"] or 0.0 for e in rec["evals"] if e["step"] == last.get("step"))
            out[f"{f.stem}:{arm}"] = rec.get("train_wall_s", last.get("wall_s", 0.0)) + tail
    return out


def models(root: Path) -> dict[str, float]:
    """Model builds; a continued model (tiny-sd-v from tiny-sd) counts only its own run."""
    out = {}
    for f in sorted(root.glob("models/*/build_info.json")):
        b = json.loads(f.read_text())
        if "wall_s_this_run" in b:
            own = b["wall_s_this_run"]
        elif "wall_s_total" in b:
            own = b["wall_s_total"]
        else:
            own = b.get("train_wall_s", 0.0) + sum(p.get("wall_s", 0.0) for p in b.get("phase2", []))
        out[f.parent.name] = own
    scorer = root / "models" / "lab-scorer" / "scorer.json"
    if scorer.exists():
        out["lab-scorer"] = json.loads(scorer.read_text())["train_wall_s"]
    return out


def account(root: Path = ROOT) -> dict:
    parts = {"lab cells (guard-train lab)": lab_cells(root), "trade-off sweeps": sweeps(root),
             "copying-regime arms": copying_arms(root), "models the lab runs on": models(root)}
    totals = {k: sum(v.values()) for k, v in parts.items()}
    return {"parts_s": parts, "totals_s": totals, "total_s": sum(totals.values()),
            "total_h": sum(totals.values()) / 3600}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/lab_compute.json")
    a = ap.parse_args(argv)
    acc = account()
    Path(a.out).write_text(json.dumps(acc, indent=1) + "\n")
    for k, v in acc["totals_s"].items():
        print(f"| {k} | {v / 3600:.1f} h |")
    print(f"| total | {acc['total_h']:.1f} h |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
