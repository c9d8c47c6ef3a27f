"""`guard-train eval`: score checkpoints × methods for memorization; a gate for MLOps pipelines.

    guard-train eval --model BASE [--lora PATH …] [--run DIR] [--prompts FILE] --reference DATA \
        --methods cfg,guard --out DIR [--fail-if "copy_rate>0.05" …]

Checkpoints: the base alone, each `--lora`, or every complete checkpoint (and final/) of a training run `--run`.
Reference: a lab directory (manifest.jsonl: prompts default to its duplicated / unique / held-out captions) or any
dataset directory our loaders read (imagefolder, parquet, …) whose images are the training set.
Outputs: metrics.json, per_prompt.csv, grid_<ckpt>_<method>.png, report.html. Exit codes: 0 the gate holds,
1 a `--fail-if` condition is violated (by any checkpoint × method), 2 bad input. Runs under `accelerate launch`
(prompts split across processes, same numbers as one process).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import operator
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from guard_train.config.loader import ConfigError, check_model_arg
from guard_train.config.paths import (
    PathError,
    check_lora_input,
    check_out_dir,
    mark_ours,
)
from guard_train.eval.evaluate import EvalInputError, Evaluator, grid, load_reference
from guard_train.guidance.base import ParamError
from guard_train.guidance.engine import GuidanceEngine
from guard_train.guidance.schedulers import check_sampler
from guard_train.guidance.strategies import METHODS
from guard_train.metrics.aligners import default_aligner
from guard_train.metrics.clip_score import CLIPScoreError, CLIPScorer
from guard_train.metrics.embed import get_embedder
from guard_train.models.loading import ModelLoadError, load_lora, load_pipeline, placement
from guard_train.training.checkpoint import complete_checkpoints

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_COND = re.compile(r"^\s*([\w.]+)\s*(>=|<=|>|<)\s*([-\d.eE+]+)\s*$")


def parse_condition(s: str) -> tuple[str, str, float]:
    m = _COND.match(s)
    if not m:
        raise EvalInputError(f"--fail-if {s!r}: expected METRIC OP VALUE, e.g. \"copy_rate>0.05\" or "
                             f"\"duplicated.copy_rate>=0.1\"")
    return m.group(1), m.group(2), float(m.group(3))


def check_gate(rows: list[dict], conditions: list[tuple[str, str, float]]) -> list[str]:
    """Violations as messages. METRIC is 'group.metric' or 'metric' (the 'all' group)."""
    bad = []
    for r in rows:
        for key, op, v in conditions:
            g, _, m = key.rpartition(".")
            grp = r["metrics"]["groups"].get(g or "all")
            if grp is None or m not in grp:
                raise EvalInputError(f"--fail-if: no metric {key!r}; groups {list(r['metrics']['groups'])}, "
                                     f"metrics {sorted(r['metrics']['groups']['all'])}")
            if OPS[op](grp[m], v):
                bad.append(f"{r['checkpoint']} / {r['method']}: {key} = {grp[m]:.4g} {op} {v}")
    return bad


def _checkpoints(base: str, loras: list[str], run: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    if run:
        r = Path(run)
        if not r.is_dir():
            raise EvalInputError(f"--run {run!r} is not a directory")
        for c in complete_checkpoints(r) + ([r / "final"] if (r / "final").is_dir() else []):
            out.append((c.name, str(c)))
        if not out:
            raise EvalInputError(f"--run {run!r} has no complete checkpoint and no final/")

    for l in loras:
        try:
            check_lora_input(l, "--lora")
        except PathError as e:
            raise EvalInputError(str(e)) from None
        out.append((Path(l).name, l))
    return out or [("base", None)]


def _load_engine(base: str, ckpt: str | None, max_batch: int, scheduler: str = "ddim", eta: float = 0.0,
                 device=None, dtype=None):
    """base + a LoRA dir, a full pipeline dir, or an accelerate checkpoint of either kind, on `device` / `dtype`."""
    if ckpt is None:
        return GuidanceEngine(load_pipeline(base), max_batch, scheduler, eta, device, dtype)
    c = Path(ckpt)
    if (c / "model_index.json").exists():  # a full pipeline (final/ of a full fine-tune)
        return GuidanceEngine(load_pipeline(str(c)), max_batch, scheduler, eta, device, dtype)
    pipe = load_pipeline(base)
    if (c / "pytorch_lora_weights.safetensors").exists():
        load_lora(pipe, str(c))
    elif (c / "model.safetensors").exists():  # accelerate checkpoint of a full fine-tune: the UNet's weights
        from safetensors.torch import load_file

        missing, unexpected = pipe.unet.load_state_dict(load_file(c / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise EvalInputError(f"{ckpt}: UNet weights do not match the base model ({len(missing)} missing, "
                                 f"{len(unexpected)} unexpected keys)")
    else:
        raise EvalInputError(f"{ckpt}: neither LoRA weights, a pipeline, nor a UNet checkpoint")
    pipe.set_progress_bar_config(disable=True)
    return GuidanceEngine(pipe, max_batch, scheduler, eta, device, dtype)


def run_eval(a) -> int:
    from accelerate import PartialState

    state = PartialState(cpu=True) if not __import__("torch").cuda.is_available() else PartialState()
    main = state.is_main_process
    try:
        try:
            out = check_out_dir(a.out, own_files=("metrics.json",))
        except PathError as e:
            raise EvalInputError(str(e)) from None
        conditions = [parse_condition(c) for c in a.fail_if]
        methods = [m for m in a.methods.split(",") if m]
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise EvalInputError(f"unknown method(s) {bad}; methods: {', '.join(METHODS)}")
        try:
            check_model_arg(a.model)
        except ConfigError as e:
            raise EvalInputError(str(e)) from None
        try:
            check_sampler(a.scheduler, a.eta)
        except ParamError as e:
            raise EvalInputError(str(e)) from None
        try:  # auto: this process's device (under accelerate launch, one GPU per process)
            device, dtype = placement(str(state.device) if a.device == "auto" else a.device, a.dtype)
        except ModelLoadError as e:
            raise EvalInputError(str(e)) from None
        ckpts = _checkpoints(a.model, a.lora, a.run)
        ref, pset = load_reference(a.reference, a.prompts, a.prompts_per_group, a.seed)
        try:
            embedder = get_embedder(a.backend) if main else None
        except (ValueError, OSError) as e:  # an unknown backend, a missing TorchScript file
            raise EvalInputError(f"--backend {a.backend!r}: {e}") from None
        aligner = default_aligner() if main else None
        clip = None
        if main and a.clip_model:
            try:
                clip = CLIPScorer(a.clip_model)
            except CLIPScoreError as e:
                raise EvalInputError(str(e)) from None
        rows, per_prompt = [], []
        ev = Evaluator(pset, ref, embedder, a.num_images, a.steps, a.seed, a.threshold, aligner, clip)
        for name, ck in ckpts:
            engine = _load_engine(a.model, ck, a.max_batch, a.scheduler, a.eta, device, dtype)
            for m in methods:
                res = ev.measure(engine, m, state, detect=(m == "cfg"))
                if main:
                    rows.append({"checkpoint": name, "method": m, "metrics": res.metrics})
                    per_prompt += [{"checkpoint": name, "method": m, **r} for r in res.per_prompt]
                    mark_ours(out)
                    Image.fromarray(grid(res.images, pset, ref, a.num_images)).save(out / f"grid_{name}_{m}.png")
    except (EvalInputError, ModelLoadError) as e:
        if main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if not main:
        return 0
    violations = check_gate(rows, conditions)
    with open(out / "per_prompt.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(per_prompt[0]))
        w.writeheader()
        w.writerows(per_prompt)
    (out / "report.html").write_text(report_html(rows, embedder.name, violations))
    # metrics.json last and atomically (tmp + rename): when it is there, the whole evaluation is
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps({"backend": embedder.name, "rows": rows,
                               "gate": {"conditions": a.fail_if, "violations": violations}}, indent=1))
    os.replace(tmp, out / "metrics.json")
    for r in rows:
        g = r["metrics"]["groups"]
        print(f"{r['checkpoint']:>16} {r['method']:>16}  " + "  ".join(
            f"{k}: copy {v['copy_rate']:.2f} top1 {v['top1_median']:.3f}" for k, v in g.items()))
    if violations:
        print("GATE FAILED:\n  " + "\n  ".join(violations), file=sys.stderr)
        return 1
    print(f"gate holds; wrote {out}/metrics.json, per_prompt.csv, report.html")
    return 0


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def report_html(rows: list[dict], backend: str, violations: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for r in rows:
        g = r["metrics"]["groups"].get("duplicated", r["metrics"]["groups"]["all"])
        ax.scatter(g.get("lab_alignment", np.nan), g["copy_rate"], label=f"{r['checkpoint']}/{r['method']}")
    ax.set_xlabel("lab alignment (attribute classifier; not CLIP)")
    ax.set_ylabel(f"copy rate ({backend})")
    ax.legend(fontsize=7)
    scatter = _png(fig)
    plt.close(fig)
    cks = list(dict.fromkeys(r["checkpoint"] for r in rows))
    fig, ax = plt.subplots(figsize=(5, 3))
    for m in dict.fromkeys(r["method"] for r in rows):
        ys = [next((r["metrics"]["groups"].get("duplicated", r["metrics"]["groups"]["all"])["copy_rate"]
                    for r in rows if r["checkpoint"] == c and r["method"] == m), np.nan) for c in cks]
        ax.plot(range(len(cks)), ys, marker="o", label=m)
    ax.set_xticks(range(len(cks)), cks, rotation=30, fontsize=7)
    ax.set_ylabel("copy rate (duplicated)")
    ax.legend(fontsize=7)
    curve = _png(fig)
    plt.close(fig)
    head = "<tr><th>checkpoint</th><th>method</th><th>group</th><th>copy rate</th><th>own copies</th><th>top-1 median" \
           "</th><th>top-1 p95</th><th>diversity</th><th>lab alignment</th></tr>"
    body = "".join(
        f"<tr><td>{r['checkpoint']}</td><td>{r['method']}</td><td>{g}</td><td>{m['copy_rate']:.3f}</td>"
        f"<td>{m.get('own_copy_rate', float('nan')):.3f}</td><td>{m['top1_median']:.3f}</td>"
        f"<td>{m['top1_p95']:.3f}</td>"
        f"<td>{m['diversity']:.3f}</td><td>{m.get('lab_alignment', float('nan')):.3f}</td></tr>"
        for r in rows for g, m in r["metrics"]["groups"].items())
    gate = ("<p style='color:#b00'>Gate failed: " + "; ".join(violations) + "</p>" if violations
            else "<p>Gate holds.</p>")
    return (f"<!doctype html><meta charset=utf-8><title>guard_train eval</title><h1>Memorization report</h1>"
            f"<p>Copy metric: {backend}. Alignment: lab attribute classifier (not CLIP).</p>{gate}"
            f"<h2>Copy rate vs alignment</h2><img src='data:image/png;base64,{scatter}'>"
            f"<h2>Copy rate across checkpoints</h2><img src='data:image/png;base64,{curve}'>"
            f"<h2>All numbers</h2><table border=1 cellpadding=3>{head}{body}</table>")
