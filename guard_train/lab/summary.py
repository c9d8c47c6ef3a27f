"""End-of-run memorization summary: duplicated vs unique training captions (lab), written and printed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from guard_train.lab.aligner import committed_scorer
from guard_train.lab.dataset import read_rows
from guard_train.metrics.embed import get_embedder
from guard_train.metrics.memorization import Probe, memorization_summary


def lab_probes(lab_root: Path, max_per_group: int, seed: int = 0) -> tuple[list[Probe], np.ndarray, list[int]]:
    """One probe per distinct training instance (its original image and caption), up to max_per_group per group;
    plus every training row and its instance (the reference set for top-1 similarity: near-copies included)."""
    rows, row_images = read_rows(lab_root)
    keys = [it.instance for it in rows]
    orig = [i for i, it in enumerate(rows) if it.copy_kind == "original"]
    items, train_images = [rows[i] for i in orig], row_images[orig]
    rng = np.random.default_rng(seed)
    probes = []
    for group, sel in (("duplicated", [i for i, it in enumerate(items) if it.is_dup]),
                       ("unique", [i for i, it in enumerate(items) if not it.is_dup])):
        pick = sorted(rng.permutation(len(sel))[:max_per_group].tolist())
        probes += [Probe(group, items[sel[j]].caption, train_images[sel[j]], items[sel[j]].instance) for j in pick]
    return probes, row_images, keys


def run_summary(trainer) -> dict:
    cfg, acc, s = trainer.cfg, trainer.acc, trainer.cfg.summary
    if not s.enabled or trainer.lab_root is None:
        return {}
    probes, train_images, keys = lab_probes(trainer.lab_root, s.max_prompts, cfg.train.seed)
    pipe = trainer.pipeline()
    trainer.unet.eval()
    embedder = get_embedder(s.backend) if acc.is_main_process else None
    aligner = committed_scorer() if acc.is_main_process else None
    res = memorization_summary(pipe, probes, train_images, keys, embedder, acc, s.images_per_prompt, s.steps,
                               s.guidance_scale, s.probe_timestep, s.copy_threshold, cfg.train.seed, aligner=aligner)
    trainer.unet.train()
    if acc.is_main_process:
        (trainer.run_dir / "summary.json").write_text(json.dumps(res, indent=2))
    return res


def format_summary(res: dict) -> str:
    if not res:
        return "(no memorization summary: needs the lab's duplicate manifest)"
    lines = [f"memorization summary — copy metric: {res['backend']}, copy = top-1 > {res['threshold']}",
             f"{'group':<11} {'prompts':>7} {'probe@t' + str(res['probe_timestep']) + ' med':>15} {'probe>thr':>9} "
             f"{'copies':>12} {'own copies':>10} {'top-1 p95':>9} {'NN is own':>9} {'lab align':>9}"]
    for g, r in res["groups"].items():
        lines.append(f"{g:<11} {r['n_prompts']:>7} {r['probe_median']:>15.3f} {r['probe_above_threshold']:>9.2f} "
                     f"{_count(r, 'copies', 'n_generations'):>12} {_count(r, 'own_copies', 'n_generations'):>10} "
                     f"{r.get('top1_p95', float('nan')):>9.3f} "
                     f"{r.get('nn_is_own', float('nan')):>9.2f} {r.get('lab_alignment', float('nan')):>9.2f}")
    lines.append("probe = SSCD of the one-step x0 reconstruction of each training image (noised to t) to itself;")
    lines.append("copies = generations from the training captions whose top-1 SSCD over every training row "
                 "(near-copies")
    lines.append("included) > threshold; own copies = best match among the caption's own rows > threshold.")
    lines.append("Too few generations here to compare mitigations: `guard-train lab` measures them "
                 "(docs/lab-results.md).")
    if "alignment_backend" in res:
        lines.append(f"lab align = {res['alignment_backend']}, generation vs its caption, 0..1.")
    return "\n".join(lines)


def _count(r: dict, k: str, n: str) -> str:
    return f"{r[k]}/{r[n]}" if k in r and n in r else "—"
