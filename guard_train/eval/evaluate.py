"""Evaluate a model's memorization on a prompt set, through the GUARD engine, on one or several processes.

Shared by the per-epoch `MemorizationCallback` and `guard-train eval`. Prompts are split across processes
(`split_between_processes`, padded), each prompt generated with its own seed (seed + its index in the set, so the
result does not depend on the number of processes), images gathered, and scored on the main process:
per group (e.g. duplicated / unique / held-out captions) and method — copy rate (top-1 SSCD against every image of
the reference set > threshold, with its Wilson 95 % interval), own-copy rate (best match among the prompt's own
training rows > threshold), the share whose nearest training image is its own, top-1 mean/median/95th percentile,
diversity, lab alignment (attribute classifier, lab captions only), and wall time per image.

The reference set is every image the model trained on: for a lab, all rows of the manifest (planted exact and
near copies included); for user data, the training set or a given reference set. A prompt's `owner` is the key
(lab instance / dataset id) its own training rows carry.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from guard_train.config.paths import PathError, read_jsonl_input, read_text_input
from guard_train.data.dedup import load_images_for_dedup
from guard_train.data.loaders import DataError, build_dataset, image_transform
from guard_train.data.manifest import read_reference
from guard_train.metrics.copy import copy_rates, diversity, localized_similarity, own_similarity
from guard_train.metrics.detection import scores_from_stats, summarize


@dataclass
class PromptSet:
    prompts: list[str]
    groups: list[str]
    owners: list[int]  # key (Reference.keys) of the prompt's own training rows, -1 if none

    def to_jsonl(self, path: Path) -> None:
        with open(path, "w") as f:
            for p, g, o in zip(self.prompts, self.groups, self.owners):
                f.write(json.dumps({"prompt": p, "group": g, "owner": o}) + "\n")


@dataclass
class Reference:
    images: np.ndarray  # (N, H, W, 3) uint8 — every training image (row)
    keys: list[int]  # per row: the key its copies share (lab instance, dataset id)
    embeddings: dict = field(default_factory=dict)  # backend name -> (N, D)

    def own_rows(self, key: int) -> np.ndarray:
        """Indices of the rows carrying `key` (an instance's original and all its copies)."""
        return np.flatnonzero(np.asarray(self.keys) == key)


def reference_and_prompts(root: Path, per_group: int, seed: int = 0) -> tuple[Reference, PromptSet]:
    """Every training row of a dataset dir with a reference manifest (data/manifest.py; the lab writes one) as the
    reference set + prompts: duplicated, unique and held-out captions (≤ per_group each, chosen among the distinct
    instances)."""
    rows, images, held = read_reference(root)
    ref = Reference(images, [it.instance for it in rows])
    items = [it for it in rows if it.copy_kind == "original"]
    rng = np.random.default_rng(seed)
    prompts, groups, owners = [], [], []
    for g, sel in (("duplicated", [i for i, it in enumerate(items) if it.is_dup]),
                   ("unique", [i for i, it in enumerate(items) if not it.is_dup])):
        for j in sorted(rng.permutation(len(sel))[:per_group].tolist()):
            prompts.append(items[sel[j]].caption)
            groups.append(g)
            owners.append(items[sel[j]].instance)
    for it in held[:per_group]:
        prompts.append(it.caption)
        groups.append("held_out")
        owners.append(-1)
    return ref, PromptSet(prompts, groups, owners)


class EvalInputError(ValueError):
    """Bad evaluation input (a reference or prompt file): exit 2 in the CLI, a ConfigError at config time."""


def load_reference(ref: str, prompts: str, per_group: int, seed: int,
                   flags: tuple[str, str] = ("--reference", "--prompts")) -> tuple[Reference, PromptSet]:
    """The reference set and prompt set of an evaluation. `ref`: a dataset dir with a reference manifest (every
    row + its duplicated / unique / held-out prompt groups; the lab writes one) or any dataset of the training images
    (imagefolder / parquet: every image is the reference set, and `prompts` is required). `prompts`: a .txt (one
    per line) or .jsonl ({"prompt", "group", "owner"}) file; it replaces the manifest's groups when given. Bad input
    raises EvalInputError naming the setting (`flags`: the CLI's or the config's names), the file and the fix."""
    ref_flag, prompts_flag = flags
    r = Path(ref)
    if not r.exists():
        raise EvalInputError(f"{ref_flag} {ref!r} does not exist (a dataset dir with a manifest.jsonl, or a dataset "
                             f"of the training images)")
    if (r / "manifest.jsonl").exists():
        try:  # checked before it is read: a damaged manifest is exit 2, not a traceback inside the reader
            read_jsonl_input(str(r / "manifest.jsonl"), ref_flag,
                             "a dataset dir with a reference manifest (make-lab writes one)",
                             keys=("id", "instance", "caption"))
        except PathError as e:
            raise EvalInputError(str(e)) from None
        reference, pset = reference_and_prompts(r, per_group, seed)
    else:
        src = "parquet" if r.suffix == ".parquet" or list(r.glob("*.parquet")) else "imagefolder"
        try:
            ds = build_dataset(src, ref, "image", "text", "", image_transform(256, True, False))
            imgs, ids, _, _ = load_images_for_dedup(ds)
        except (DataError, OSError, ValueError) as e:
            raise EvalInputError(f"{ref_flag} {ref!r} could not be read: {e}") from None
        reference, pset = Reference(imgs, [int(i) for i in ids]), None
    if prompts:
        try:
            text = read_text_input(prompts, prompts_flag,
                                   "a .txt (one prompt per line) or .jsonl ({\"prompt\": …}) file")
        except PathError as e:
            raise EvalInputError(str(e)) from None
        lines = [l for l in text.splitlines() if l.strip()]
        try:
            rows = [json.loads(l) if l.lstrip().startswith("{") else {"prompt": l.strip()} for l in lines]
            pset = PromptSet([x["prompt"] for x in rows], [x.get("group", "all_prompts") for x in rows],
                             [int(x.get("owner", -1)) for x in rows])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise EvalInputError(f"{prompts_flag} {prompts}: {type(e).__name__}: {e}") from None
    if pset is None:
        raise EvalInputError(f"give {prompts_flag} (the reference has no manifest.jsonl to take prompt groups from)")
    return reference, pset


def _local(engine, pset, mine, method, n, steps, seed, detect, **params) -> list[tuple]:
    """Generate this process's prompts; per prompt: (index, images, records, detection scores, end masks)."""
    if not mine:
        return []
    record = ("attention", "diff", "end_maps") if detect else ()
    res = engine.generate([pset.prompts[i] for i in mine], method=method, num_images=n, steps=steps,
                          seeds=[seed + i for i in mine], record=record, **params)
    scores = {}
    if detect:
        scores = scores_from_stats(res.stats, n)
    mask = res.stats.get("end_mask")
    return [(i, res.images[k * n:(k + 1) * n], res.records[k * n:(k + 1) * n],
             {name: float(v[k]) for name, v in scores.items()},
             None if mask is None else mask[k * n:(k + 1) * n].cpu()) for k, i in enumerate(mine)]


def generate_distributed(engine, pset: PromptSet, method: str, images_per_prompt: int, steps: int, seed: int,
                         acc=None, detect: bool = False, **params) -> tuple[np.ndarray, list[dict], float, dict]:
    """Images for every prompt of the set (in order), split over processes. Returns (images, records, wall,
    extras) where extras holds per-prompt detection scores and per-image end-token masks when `detect`."""
    idx = list(range(len(pset.prompts)))
    t0 = time.perf_counter()
    if acc is not None and acc.num_processes > 1:
        from accelerate.utils import gather_object

        with acc.split_between_processes(idx, apply_padding=True) as mine:
            local = _local(engine, pset, list(mine), method, images_per_prompt, steps, seed, detect, **params)
        parts = gather_object([local])
        flat = {t[0]: t[1:] for part in parts for t in part}  # padding repeats collapse here
    else:
        flat = {t[0]: t[1:] for t in _local(engine, pset, idx, method, images_per_prompt, steps, seed, detect,
                                            **params)}
    wall = time.perf_counter() - t0
    images = np.concatenate([flat[i][0] for i in idx])
    records = [r for i in idx for r in flat[i][1]]
    extras: dict = {}
    if detect:
        extras["detection"] = {k: np.array([flat[i][2][k] for i in idx]) for k in flat[idx[0]][2]}
        if flat[idx[0]][3] is not None:
            import torch

            extras["end_mask"] = torch.cat([flat[i][3] for i in idx])
    return images, records, wall, extras


def detection_scores(engine, prompts: list[str], images_per_prompt: int, steps: int, seed: int = 0,
                     acc=None) -> tuple[dict[str, np.ndarray], float]:
    """Every detection score (metrics/detection.py) per prompt, from one recording CFG generation per prompt on
    the path every measurement takes (split over processes with `acc`); returns (scores, wall seconds per
    prompt)."""
    pset = PromptSet(list(prompts), ["prompt"] * len(prompts), [-1] * len(prompts))
    _, _, wall, extras = generate_distributed(engine, pset, "cfg", images_per_prompt, steps, seed, acc, detect=True)
    return extras["detection"], wall / max(1, len(prompts))


def score(images: np.ndarray, pset: PromptSet, ref: Reference, embedder, images_per_prompt: int,
          threshold: float = 0.5, aligner=None, clip=None, extras: Optional[dict] = None) -> tuple[dict, list[dict]]:
    """Metrics per group (+ "all") and one row per prompt. With `extras` from a detecting generation: localized
    similarity (against the prompt's own training image) and detection AUROC of duplicated vs unique captions."""
    e_ref = ref.embeddings.get(embedder.name)
    if e_ref is None:
        e_ref = ref.embeddings[embedder.name] = embedder.embed(ref.images)
    e = embedder.embed(images)
    sims = e @ e_ref.T
    top1, nn = sims.max(1), sims.argmax(1)
    n = images_per_prompt
    owner = np.repeat(np.array(pset.owners), n)
    own_top1 = own_similarity(sims, owner, ref.keys)
    nn_is_own = np.asarray(ref.keys)[nn] == owner
    group = np.repeat(np.array(pset.groups), n)
    caps = list(np.repeat(np.array(pset.prompts, dtype=object), n))
    align = aligner.score(images, caps) if aligner is not None else np.full(len(images), np.nan)
    div = diversity([e[i * n:(i + 1) * n] for i in range(len(pset.prompts))])
    clip_s = clip.score(images, caps) if clip is not None else None
    ls = np.full(len(images), np.nan)
    if extras and "end_mask" in extras:
        own = np.where(owner >= 0)[0]
        if len(own):
            ls[own] = localized_similarity(embedder, images[own], extras["end_mask"][own],
                                           [ref.images[ref.own_rows(owner[i])] for i in own])
    metrics = {"backend": embedder.name, "threshold": threshold, "groups": {}}
    if aligner is not None:
        metrics["alignment_backend"] = aligner.name
    if clip is not None:
        metrics["clip_backend"] = clip.name
    for g in sorted(set(pset.groups)) + ["all"]:
        s = np.ones(len(images), bool) if g == "all" else group == g
        m = {**copy_rates(top1[s], own_top1[s], threshold),
             "top1_mean": float(top1[s].mean()), "top1_median": float(np.median(top1[s])),
             "diversity": _nanmean(div[np.array(pset.groups) == g] if g != "all" else div)}
        if (owner[s] >= 0).any():
            m["nn_is_own"] = float(nn_is_own[s][owner[s] >= 0].mean())
        if aligner is not None:
            m["lab_alignment"] = float(np.nanmean(align[s]))
        if clip_s is not None:
            m["clip_score"] = float(clip_s[s].mean())
        if not np.isnan(ls[s]).all():
            m["localized_similarity_mean"] = float(np.nanmean(ls[s]))
        metrics["groups"][g] = m
    if extras and "detection" in extras:
        groups = np.array(pset.groups)
        sel = np.isin(groups, ["duplicated", "unique"])
        if (groups[sel] == "duplicated").any() and (groups[sel] == "unique").any():
            labels = (groups[sel] == "duplicated").astype(int)
            metrics["detection_auroc_duplicated_vs_unique"] = {
                k: summarize(v[sel], labels)["auroc"] for k, v in extras["detection"].items()}
    rows = []
    for i, p in enumerate(pset.prompts):
        sl = slice(i * n, (i + 1) * n)
        rows.append({"prompt": p, "group": pset.groups[i], "top1_mean": float(top1[sl].mean()),
                     "copies": int((top1[sl] > threshold).sum()),
                     "own_copies": int((own_top1[sl] > threshold).sum()),
                     "lab_alignment": _nanmean(align[sl]), "diversity": float(div[i])})
    return metrics, rows


@dataclass
class Measurement:
    images: np.ndarray  # every generation, prompt-major
    metrics: Optional[dict]  # per group (+ "all"); None on processes other than the main one
    per_prompt: Optional[list[dict]]
    wall_s: float


@dataclass
class Evaluator:
    """One evaluation — a prompt set, its reference set, the copy embedder and an alignment scorer — measured for
    any engine and method on one or several processes (generation split across them, scoring on the main one).
    The memorization callback, `guard-train eval`, the lab benchmark and the trade-off sweep all measure through
    it, and `guard-train detect` generates through the same `generate_distributed` (`detection_scores`); the
    end-of-run summary's one-step probe is the only other measurement (metrics/memorization.py)."""

    pset: PromptSet
    ref: Reference
    embedder: object  # metrics.embed.Embedder; None on processes other than the main one
    images_per_prompt: int
    steps: int
    seed: int = 0
    threshold: float = 0.5
    aligner: object = None  # metrics.aligners.Aligner
    clip: object = None  # metrics.clip_score.CLIPScorer

    def measure(self, engine, method: str, acc=None, detect: bool = False, **params) -> Measurement:
        """Generate every prompt's images with `method` and score them (`detect`: also record the detection
        statistics, for localized similarity and the detection AUROC)."""
        images, _, wall, extras = generate_distributed(engine, self.pset, method, self.images_per_prompt, self.steps,
                                                       self.seed, acc, detect=detect, **params)
        if acc is not None and not acc.is_main_process:
            return Measurement(images, None, None, wall)
        metrics, rows = score(images, self.pset, self.ref, self.embedder, self.images_per_prompt, self.threshold,
                              self.aligner, self.clip, extras)
        metrics["wall_s_per_image"] = wall / len(images)
        return Measurement(images, metrics, rows, wall)


def _nanmean(x: np.ndarray) -> float:
    """Mean of the finite values; NaN (no warning) when there are none, e.g. diversity with one image per prompt."""
    x = np.asarray(x, float)
    return float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else float("nan")


def grid(images: np.ndarray, pset: PromptSet, ref: Reference, n: int, max_rows: int = 12) -> np.ndarray:
    """One row per prompt: its own training image (its first row; grey if none) then its generations."""
    rows = []
    for i in range(min(len(pset.prompts), max_rows)):
        mine = ref.own_rows(pset.owners[i]) if pset.owners[i] >= 0 else []
        own = ref.images[mine[0]] if len(mine) else np.full_like(images[0], 128)
        rows.append(np.concatenate([own, *images[i * n:(i + 1) * n]], 1))
    return np.concatenate(rows, 0)
