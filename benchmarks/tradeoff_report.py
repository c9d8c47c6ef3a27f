"""The trade-off figure and the matched-alignment table from a `benchmarks/tradeoff.py` sweep.

    python benchmarks/tradeoff_report.py results/tradeoff_v_g3_dup80.jsonl \
        --figure docs/figures/tradeoff_v_g3.png --table results/tradeoff_v_g3_table.md

Figure: per method, the duplicated captions' copy rate (Wilson 95 % interval) and top-1 mean against lab alignment,
one point per knob value, CFG's guidance sweep as the reference curve. Table: each method's copy rate read off its
curve at CFG's alignment (CFG at the sweep's guidance scale) and at 0.9× it — linear interpolation between the two
points that bracket the target alignment, the interval interpolated the same way from the points' Wilson bounds —
or "never reaches" where the curve's best alignment is below the target.

No tuning on the test captions (`--validated`): the duplicated captions are split in two (even / odd positions in
the prompt set). Each method's setting is chosen on the validation half — of the sweep points whose validation
alignment is at least the target (CFG's alignment on the same half, or 0.9× it), the one with the fewest
validation copies (ties: the higher alignment) — and reported on the test half only, with its Wilson interval.
Needs the per-prompt rows `tradeoff.py` writes (sweeps made before they existed have none).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(path: Path) -> tuple[dict[str, list[dict]], dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    curves: dict[str, list[dict]] = {}
    for r in rows:
        curves.setdefault(r["curve"], []).append(r)
    meta_path = path.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return curves, meta


def point(r: dict) -> tuple[float, float, float, float, float]:
    """(alignment, copy rate, ci low, ci high, top-1 mean) of the duplicated captions at one sweep point."""
    d = r["duplicated"]
    lo, hi = d["copy_rate_ci95"]
    return d.get("lab_alignment", float("nan")), d["copy_rate"], lo, hi, d["top1_mean"]


def at_alignment(rows: list[dict], target: float) -> dict:
    """Copy rate (and interval) of a curve at `target` alignment, interpolated between the bracketing points."""
    pts = sorted(point(r) for r in rows)
    a = np.array([p[0] for p in pts])
    if not len(a) or np.nanmax(a) < target:
        return {"reached": False, "best_alignment": float(np.nanmax(a)) if len(a) else None}
    for (a0, *v0), (a1, *v1) in zip(pts, pts[1:]):
        if a0 <= target <= a1:
            w = 0.0 if a1 == a0 else (target - a0) / (a1 - a0)
            c, lo, hi, _ = (x0 + w * (x1 - x0) for x0, x1 in zip(v0, v1))
            return {"reached": True, "copy_rate": c, "ci95": [lo, hi], "bracket": [a0, a1]}
    lowest = pts[0]  # the whole curve is above the target: its least-aligned point is the nearest
    return {"reached": True, "copy_rate": lowest[1], "ci95": [lowest[2], lowest[3]], "bracket": [lowest[0]] * 2,
            "note": "every point is above the target alignment; nearest point shown"}


def table(curves: dict[str, list[dict]], guidance: float) -> tuple[str, dict]:
    cfg = next((r for r in curves.get("cfg", []) if r["value"] == guidance), None)
    if cfg is None:
        raise SystemExit(f"no CFG point at guidance {guidance}: the table's reference alignment is missing")
    ref = point(cfg)[0]
    out, lines = {}, [f"CFG at guidance {guidance:g}: lab alignment {ref:.3f}, copy rate {100 * point(cfg)[1]:.1f} % "
                      f"[{100 * point(cfg)[2]:.1f}, {100 * point(cfg)[3]:.1f}].", "",
                      "| method (knob) | points | copy rate at CFG's alignment | at 0.9× it | alignment range |",
                      "|---|---|---|---|---|"]
    for name, rows in curves.items():
        knob = rows[0]["knob"]
        cells = []
        for f in (1.0, 0.9):
            m = at_alignment(rows, f * ref)
            out.setdefault(name, {})[str(f)] = m
            mark = " † (nearest point: the whole curve is above the target)" if "note" in m else ""
            cells.append(f"{100 * m['copy_rate']:.1f} % [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]{mark}"
                         if m["reached"] else f"never reaches (best {m['best_alignment']:.3f})")
        al = [point(r)[0] for r in rows]
        lines.append(f"| {name} ({knob}) | {len(rows)} | {cells[0]} | {cells[1]} | {min(al):.3f}–{max(al):.3f} |")
    return "\n".join(lines), out


def halves(r: dict) -> dict[str, dict]:
    """Validation (even positions) and test (odd) aggregates of a point's duplicated captions."""
    rows = [x for x in r.get("per_prompt_dup") or [] if x["group"] == "duplicated"]
    if len(rows) < 2:
        raise ValueError("this sweep has no per-prompt rows; rerun it with the current benchmarks/tradeoff.py")
    n = r["duplicated"]["n_images"] // len(rows)  # images per caption
    out = {}
    for name, part in (("validation", rows[0::2]), ("test", rows[1::2])):
        k = sum(x["copies"] for x in part)
        out[name] = {"alignment": float(np.mean([x["lab_alignment"] for x in part])), "copies": k,
                     "n": n * len(part), "captions": len(part)}
    return out


def validated(curves: dict[str, list[dict]], guidance: float) -> tuple[str, dict]:
    """Each method's setting chosen on the validation captions, its copy rate reported on the test captions."""
    from guard_train.metrics.copy import wilson

    cfg = next((r for r in curves.get("cfg", []) if r["value"] == guidance), None)
    if cfg is None:
        raise SystemExit(f"no CFG point at guidance {guidance}: the table's reference alignment is missing")
    ref = halves(cfg)
    lines = [f"CFG at guidance {guidance:g}, validation captions: alignment {ref['validation']['alignment']:.3f}; "
             f"test captions: {ref['test']['copies']}/{ref['test']['n']} copies.", "",
             "| method (knob) | target | chosen on validation | test copy rate | test alignment |",
             "|---|---|---|---|---|"]
    out: dict = {}
    for name, rows in curves.items():
        for f in (1.0, 0.9):
            target = f * ref["validation"]["alignment"]
            ok = [(h, r) for r in rows for h in [halves(r)] if h["validation"]["alignment"] >= target]
            if not ok:
                best = max(halves(r)["validation"]["alignment"] for r in rows)
                out.setdefault(name, {})[str(f)] = {"reached": False, "best_validation_alignment": best}
                lines.append(f"| {name} ({rows[0]['knob']}) | {f:g}× | never reaches (best {best:.3f}) | — | — |")
                continue
            h, r = min(ok, key=lambda hr: (hr[0]["validation"]["copies"], -hr[0]["validation"]["alignment"]))
            t = h["test"]
            lo, hi = wilson(t["copies"], t["n"])
            out.setdefault(name, {})[str(f)] = {"reached": True, "value": r["value"], "test": t, "ci95": [lo, hi]}
            lines.append(f"| {name} ({r['knob']}) | {f:g}× | {r['knob']} = {r['value']} | "
                         f"{100 * t['copies'] / t['n']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] | "
                         f"{t['alignment']:.3f} |")
    return "\n".join(lines), out


def figure(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, rows in curves.items():
        pts = sorted(point(r) for r in rows)
        a, c, lo, hi, t1 = (np.array(x) for x in zip(*pts))
        style = dict(color="black", lw=2.2) if name == "cfg" else dict(lw=1.1)
        axes[0].errorbar(a, 100 * c, yerr=[100 * (c - lo), 100 * (hi - c)], marker="o", ms=3, capsize=2,
                         label=name, **style)
        axes[1].plot(a, t1, marker="o", ms=3, label=name, **style)
    axes[0].set_ylabel("copy rate, duplicated captions (%, Wilson 95 %)")
    axes[1].set_ylabel("top-1 SSCD mean, duplicated captions")
    for ax in axes:
        ax.set_xlabel("lab alignment, duplicated captions")
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep")
    ap.add_argument("--figure", default="")
    ap.add_argument("--table", default="")
    ap.add_argument("--guidance", type=float, default=None, help="CFG reference point (default: the sweep's)")
    ap.add_argument("--validated", action="store_true",
                    help="settings chosen on half of the duplicated captions, copy rates on the other half")
    a = ap.parse_args(argv)
    curves, meta = load(Path(a.sweep))
    g = a.guidance if a.guidance is not None else meta.get("guidance", 3.0)
    md, data = (validated if a.validated else table)(curves, g)
    print(md)
    if a.table:
        Path(a.table).write_text(md + "\n")
        Path(a.table).with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    if a.figure:
        n = sum(len(v) for v in curves.values())
        figure(curves, Path(a.figure), f"{Path(a.sweep).name}: {n} points, every method at guidance {g:g} "
                                       f"(CFG: its guidance sweep)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
