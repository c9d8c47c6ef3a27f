"""`guard-train lab`: the memorization lab benchmark — every training and inference arm on the same lab, data,
steps and seeds, with mean and spread over seeds.

    guard-train lab --size smoke --out runs/lab-smoke          # CI: the whole pipeline in a few minutes
    guard-train lab --size full --out runs/lab --docs          # the documented table (docs/lab-results.md)

Design (fixed before looking at results; the lab's own seed is never varied or tuned):
* The lab is the default recipe's (`recipes/tiny_nomit.yaml`: 64 instances, 8 of them planted ×16, 16 held-out
  captions), built from LabConfig's fixed seed 0. The benchmark's seeds vary the training run (`train.seed`: init of
  the noise, sampling order) and the generation seeds — never the data.
* Training arms fine-tune the committed base with one mitigation each (plain = none) for the same steps. Each arm
  is then measured by generating with plain CFG on the same prompts (duplicated / unique / held-out captions,
  `reference_and_prompts`, prompt choice fixed).
* Inference arms run every method on one memorizing model. Default (`infer_model`, full size): the committed
  memorizing LoRA `models/tiny-sd-memorized-lora` on the base, generating for its own training lab (rebuilt from
  its `lab_config.json`), because the plain arm's 800-step fine-tune copies nothing (copy rate 0 on every seed),
  which leaves an inference method nothing to remove. `infer_model="plain"` uses the plain arm's model of the same
  seed instead (smoke size). The seeds then vary the generation only.
* Metrics (backend named in every table): copy rate (the standard rule: top-1 SSCD over every training row, planted
  near-copies included, > 0.5) and own-copy rate (best match among the caption's own rows > 0.5), each pooled over
  seeds with a Wilson 95 % interval, SSCD top-1 95th percentile and mean, localized similarity (Bright Ending's mask),
  lab alignment (attribute classifier, not CLIP), diversity, detection AUROC of each detection score (duplicated
  vs unique captions, from the CFG generation), training cost ÷ plain (wall of setup + loop, minus the
  memorization callback's own evaluation time), inference cost ÷ CFG (generation wall).
* Every (arm, seed) cell is written to `cells/` as it finishes; a rerun skips finished cells, so a long run can
  be continued (another session, or after a crash). A cell is reused only when its key matches: the size's
  settings, the copy-metric backend and the fingerprint of the base's (and the inference LoRA's) weights. With
  `--docs` the cells live in `results/lab_cells/`, committed with the tables they make.
* Verdicts per arm, each against the reference arm (plain / CFG) with one rule — the duplicated-caption mean moved
  beyond the spread of both arms (mean ± std over seeds), in either direction, or not — for three quantities side
  by side: copy rate (the papers' headline), top-1 similarity mean (continuous, shows a shift when copies are too
  rare to count) and lab alignment (the quality cost). An earlier single verdict decided on copy rate whenever the
  reference copied at all; with 1 copy in 64 CFG generations that said "no effect" for every inference arm while
  top-1 moved far beyond the spread, so all three are reported instead of one chosen.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
from transformers import CLIPTokenizer

from guard_train.callbacks import build_callbacks
from guard_train.eval.evaluate import Evaluator, PromptSet, grid, reference_and_prompts
from guard_train.guidance.engine import GuidanceEngine
from guard_train.lab.aligner import committed_scorer
from guard_train.lab.config import load_config
from guard_train.lab.dataset import build_lab, read_lab_config, write_imagefolder
from guard_train.lab.tiny_sd import safetensors_digest
from guard_train.metrics.copy import wilson
from guard_train.metrics.embed import get_embedder
from guard_train.models.loading import load_lora, load_pipeline, lora_base_model, merge_lora
from guard_train.training.loop import Trainer
from guard_train.training.mitigations import REGISTRY as MITIGATIONS

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Size:
    seeds: tuple[int, ...]
    train_steps: int
    eval_every: int  # memorization callback (cfg) during training: copy rate over training
    lab: dict
    batch_size: int
    prompts_per_group: int
    images_per_prompt: int
    gen_steps: int
    callback_images: int = 1
    extra: dict = field(default_factory=dict)
    infer_model: str = "plain"  # inference arms' model: "plain" (the plain arm, per seed) or a LoRA dir (on its
    # own base, build_info.json's base_model; the training arms' base when it has none)
    infer_guidance: Optional[float] = None  # every inference method's guidance_scale; None = each method's own (7.5)


SIZES = {
    # the whole pipeline end to end on a tiny lab; numbers are noise, only the plumbing is checked
    "smoke": Size(seeds=(0, 1), train_steps=8, eval_every=4,
                  lab={"num_instances": 16, "dup_fraction": 0.25, "dup_repeats": 4, "held_out": 2},
                  batch_size=4, prompts_per_group=2, images_per_prompt=2, gen_steps=3,
                  extra={"mitigation.entropy_filter.warmup_steps": 2, "mitigation.entropy_filter.buckets": 2,
                         "mitigation.magnitude_filter.warmup_steps": 2, "train.lr_warmup_steps": 0}),
    # the default recipe's lab and length (README's job), 3 seeds
    "full": Size(seeds=(0, 1, 2), train_steps=800, eval_every=200, lab={}, batch_size=16, prompts_per_group=8,
                 images_per_prompt=4, gen_steps=25, infer_model="models/tiny-sd-memorized-lora"),
}

DEFAULT_PAIR = ("entropy_filter", "dup_sampling")  # what recipe=tiny turns on


def _train_arms() -> dict[str, dict]:
    """plain, one arm per registered mitigation arm (training/mitigations: each declares the overrides that turn
    it on), and the default pair as soon as both of its arms are there."""
    arms: dict[str, dict] = {"plain": {}}
    for name, cls in MITIGATIONS.items():
        for arm, kv in cls.arms.items():
            arms[arm] = {f"mitigation.{name}.{k}": v for k, v in kv.items()}
        if "entropy+dup (default)" not in arms and all(a in arms for a in DEFAULT_PAIR):
            arms["entropy+dup (default)"] = {k: v for a in DEFAULT_PAIR for k, v in arms[a].items()}
    return arms


TRAIN_ARMS: dict[str, dict] = _train_arms()
INFER_ARMS = ("cfg", "guard", "guard_attn", "jain_static", "jain_dynamic", "opposite_static", "opposite_dynamic",
              "ren", "wen_opt", "be_opt", "gni", "random_token")
# arms whose outcome depends on the whole tokenizer vocabulary (they insert random vocabulary tokens), so their
# cells also carry its size in the key: a vocabulary-trimmed base keeps every other cell (`weights_fingerprint`)
VOCABULARY_ARMS = ("random_token", "captions_rc")
HEADLINE = ("copy_rate", "own_copy_rate", "top1_p95", "top1_mean", "localized_similarity_mean",
            "lab_alignment", "diversity", "nn_is_own")
COUNTS = ("copies", "own_copies", "n_images")  # pooled over seeds for the Wilson intervals
# The copy protocol in every cell's key: cells scored by an older rule (reference = original rows only, SSCD input
# 256 px bicubic) are never mixed with these.
COPY_PROTOCOL = "all-training-rows; sscd resize short side 288 bilinear; own = best of own rows"


def _slug(arm: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in arm).strip("_")


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _overrides(size: Size, arm: str, seed: int, out: Path, model: str) -> list[str]:
    kv = {"recipe": "tiny_nomit", "model.path": model, "run.output_dir": str(out / "runs"),
          "run.name": f"{_slug(arm)}-s{seed}", "run.overwrite": "true", "run.report_to": "none",
          "summary.enabled": "false", "train.seed": seed, "train.max_steps": size.train_steps,
          "train.batch_size": size.batch_size, "train.checkpoint_every": 0,
          "eval.every_n_steps": size.eval_every, "eval.methods": "[cfg]",
          "eval.prompts_per_group": size.prompts_per_group, "eval.images_per_prompt": size.callback_images,
          "eval.steps": size.gen_steps, **{f"data.lab.{k}": v for k, v in size.lab.items()},
          **size.extra, **TRAIN_ARMS[arm]}
    return [f"{k}={v}" for k, v in kv.items()]


def _measure(engine, method: str, ref, pset, size: Size, seed: int, embedder, aligner,
             **params) -> tuple[dict, np.ndarray]:
    m = Evaluator(pset, ref, embedder, size.images_per_prompt, size.gen_steps, seed, 0.5, aligner).measure(
        engine, method, None, detect=True, **params)
    m.metrics["gen_wall_s"] = m.wall_s
    return m.metrics, m.images


def _save_grid(images, pset, ref, size: Size, path: Path) -> None:
    """Fixed prompts per arm: the first two duplicated and the first two unique captions of the set."""
    from PIL import Image

    pick = [i for g in ("duplicated", "unique") for i in [k for k, x in enumerate(pset.groups) if x == g][:2]]
    n = size.images_per_prompt
    sub = PromptSet([pset.prompts[i] for i in pick], [pset.groups[i] for i in pick], [pset.owners[i] for i in pick])
    imgs = np.concatenate([images[i * n:(i + 1) * n] for i in pick])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(imgs, sub, ref, n)).save(path)


def run_train_cell(size: Size, arm: str, seed: int, out: Path, model: str, embedder, aligner) -> dict:
    _reset_accelerate()
    t0 = time.perf_counter()
    cfg = load_config(_overrides(size, arm, seed, out, model))
    trainer = Trainer(cfg, build_callbacks(cfg))
    try:
        result = trainer.train()
        train_wall = time.perf_counter() - t0
        cb = next(c for c in trainer.hooks.callbacks if hasattr(c, "history"))
        eval_wall = sum(h.get("wall_s", 0.0) for h in cb.history)
        over_training = [{"step": h["step"], **{k: h["methods"]["cfg"]["groups"][g].get(k) for g in ("duplicated",)
                                                for k in ("copy_rate", "top1_mean")}} for h in cb.history]
        ref, pset = reference_and_prompts(trainer.run_dir / "data", size.prompts_per_group, 0)
        pipe = trainer.pipeline()
        pipe.unet.eval()
        metrics, images = _measure(GuidanceEngine(pipe), "cfg", ref, pset, size, seed, embedder, aligner)
    finally:
        trainer.close()
        _reset_accelerate()
    if seed == size.seeds[0]:
        _save_grid(images, pset, ref, size, out / "grids" / f"train_{_slug(arm)}.png")
    return {"kind": "train", "arm": arm, "seed": seed, "metrics": metrics, "over_training": over_training,
            "train_wall_s": train_wall - eval_wall, "train_steps": size.train_steps,
            "cell_wall_s": time.perf_counter() - t0,
            "final": result["final"], "run_dir": result["run_dir"]}


def infer_engine(model: str, lora: Optional[str] = None):
    """The inference arms' model (a fine-tuned pipeline dir, or the base plus a LoRA), loaded once per seed."""
    pipe = load_pipeline(model)
    if lora:
        load_lora(pipe, lora)
        merge_lora(pipe)  # several times faster on a CPU; outputs equal up to float rounding
    pipe.set_progress_bar_config(disable=True)
    return GuidanceEngine(pipe)


def _repo_path(path: str) -> Path:
    """A relative path from the cwd when it exists there, else from the repo (where models/ lives)."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p


def _lora_dir(infer_model: str) -> Optional[Path]:
    """None for "plain"; else the LoRA dir (relative paths: from the cwd, else from the repo), validated."""
    if infer_model == "plain":
        return None
    lora = _repo_path(infer_model)
    if not (lora / "pytorch_lora_weights.safetensors").exists() or not (lora / "lab_config.json").exists():
        raise ValueError(f"infer_model {infer_model!r}: expected a LoRA dir with pytorch_lora_weights.safetensors and "
                         f"the lab_config.json of its training lab (as scripts/build_memorized_lora.sh writes), or "
                         f"'plain' for the plain arm's model of each seed")
    return lora


def infer_base(lora: Optional[Path], model: str) -> str:
    """The inference arms' base: the LoRA's own (its build_info.json's base_model, e.g. the v-prediction pair's
    models/tiny-sd-v) — a LoRA on another base draws noise — else the training arms' `model`."""
    base = lora_base_model(str(lora)) if lora is not None else None
    if base is None:
        return model
    found = _repo_path(base)
    if not (found / "model_index.json").exists():
        raise ValueError(f"infer_model {str(lora)!r} was trained on {base!r} (its build_info.json), which is not a "
                         f"model directory here; restore it or give another LoRA")
    return str(found)


def infer_source(lora: Optional[Path], out: Path) -> tuple[Optional[Path], str]:
    """For a LoRA dir: (its training lab written under out/infer_lab, a fingerprint of its weights). The lab is
    rebuilt from the LoRA's lab_config.json (the lab is deterministic from its config)."""
    if lora is None:
        return None, "plain"
    data = out / "infer_lab"
    if not (data / "manifest.jsonl").exists():
        tmp = out / "infer_lab.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
        write_imagefolder(build_lab(read_lab_config(lora)), tmp)
        tmp.replace(data)
    return data, weights_fingerprint(lora)


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over a model dir's safetensors files (names and bytes): cells made with other weights are not
    reused, whatever path the model was given by (so committed cells stay valid in another checkout). A model whose
    vocabulary was trimmed (`tiny_sd.trim_vocabulary`, recorded in build_info.json) encodes every lab caption
    bit-identically to the model it was trimmed from, so it keeps that model's fingerprint — unless its bytes
    changed since; methods that draw random vocabulary tokens name the vocabulary in their key instead."""
    digest = safetensors_digest(model_dir)
    info = Path(model_dir) / "build_info.json"
    vocab = json.loads(info.read_text()).get("vocabulary", {}) if info.exists() else {}
    return vocab["weights_before"] if vocab.get("weights_after") == digest else digest


def run_infer_cell(size: Size, method: str, seed: int, out: Path, data_dir: Path, engine, embedder,
                   aligner) -> dict:
    t0 = time.perf_counter()
    ref, pset = reference_and_prompts(data_dir, size.prompts_per_group, 0)
    cfg_wall = None
    params = {} if size.infer_guidance is None else {"guidance_scale": size.infer_guidance}
    if method != "cfg":  # its own CFG reference in the same process, just before: a ratio, not an absolute time
        cfg_wall = _measure(engine, "cfg", ref, pset, size, seed, embedder, aligner, **params)[0]["gen_wall_s"]
    metrics, images = _measure(engine, method, ref, pset, size, seed, embedder, aligner, **params)
    if seed == size.seeds[0]:
        _save_grid(images, pset, ref, size, out / "grids" / f"infer_{_slug(method)}.png")
    ratio = 1.0 if cfg_wall is None else metrics["gen_wall_s"] / cfg_wall
    return {"kind": "infer", "arm": method, "seed": seed, "metrics": metrics, "cost_vs_cfg": ratio,
            "cell_wall_s": time.perf_counter() - t0}


def _cell(cells_dir: Path, kind: str, arm: str, seed: int) -> Path:
    return cells_dir / f"{kind}__{_slug(arm)}__s{seed}.json"


def _finished(path: Path, key: dict) -> Optional[dict]:
    """The cell at `path` if it was made with these settings, else None."""
    if not path.exists():
        return None
    c = json.loads(path.read_text())
    return c if c.get("key") == key else None


def run_lab(size_name: str, out: Path, seeds: Optional[list[int]] = None, arms: Optional[list[str]] = None,
            methods: Optional[list[str]] = None, model: str = "models/tiny-sd", backend: str = "sscd",
            progress=print, infer_model: Optional[str] = None, cells_dir: Optional[Path] = None,
            infer_guidance: Optional[float] = None) -> dict:
    """Every cell of the size (reusing finished ones from `cells_dir`, default `out/cells`), then the tables,
    plots and grids under `out`."""
    size = SIZES[size_name]
    if seeds:
        size = replace(size, seeds=tuple(seeds))
    if infer_model:
        size = replace(size, infer_model=infer_model)
    if infer_guidance is not None:
        if not infer_guidance > 0:
            raise ValueError(f"infer_guidance must be > 0, got {infer_guidance}")
        size = replace(size, infer_guidance=infer_guidance)
    arms = arms or list(TRAIN_ARMS)
    methods = methods or list(INFER_ARMS)
    unknown = [a for a in arms if a not in TRAIN_ARMS] + [m for m in methods if m not in INFER_ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; training arms: {list(TRAIN_ARMS)}; inference: {list(INFER_ARMS)}")
    lora = _lora_dir(size.infer_model)  # checked before anything is written
    base = infer_base(lora, model)  # likewise
    cells_dir = Path(cells_dir) if cells_dir else out / "cells"
    out.mkdir(parents=True, exist_ok=True)
    infer_data, infer_fp = infer_source(lora, out)
    if "plain" not in arms:
        arms = ["plain", *arms]  # the reference of every ratio and the inference arms' model
    embedder = get_embedder(backend)
    aligner = committed_scorer()
    t_start = time.perf_counter()
    # a cell is reused only if it was made with the same settings (size minus the seed list, weights, backend)
    # (infer_guidance only in the inference cells' key, and only when set: cells made before it existed stay valid)
    key = {**{k: v for k, v in _jsonable(size.__dict__).items() if k not in ("seeds", "infer_guidance")},
           "model_weights": weights_fingerprint(Path(model)), "backend": embedder.name,
           "copy_protocol": COPY_PROTOCOL}
    infer_key = {**key, "infer_weights": infer_fp}  # a rebuilt LoRA invalidates the inference cells
    if size.infer_guidance is not None:
        infer_key["infer_guidance"] = size.infer_guidance
    if Path(base).resolve() != Path(model).resolve():  # a LoRA of another base: that base's weights too
        infer_key["infer_base_weights"] = weights_fingerprint(Path(base))
    sizes = {m: len(CLIPTokenizer.from_pretrained(m / "tokenizer")) for m in {Path(x).resolve() for x in (model, base)}}
    vocab = {"train": sizes[Path(model).resolve()], "infer": sizes[Path(base).resolve()]}
    cells, reused = [], 0

    def cell(kind: str, arm: str, seed: int, make, needs_model: bool = False) -> dict:
        nonlocal reused
        path = _cell(cells_dir, kind, arm, seed)
        want = key if kind == "train" else infer_key
        if arm in VOCABULARY_ARMS:
            want = {**want, "vocabulary": vocab[kind]}
        c = _finished(path, want)
        # a train cell whose model the inference arms still need is reused only while that model exists
        if c is not None and (not needs_model or Path(c["final"]).exists()):
            reused += 1
            return c
        progress(f"[lab] {'train' if kind == 'train' else 'inference'} arm {arm!r} seed {seed}")
        c = {**make(), "key": want}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(c, indent=1))
        tmp.replace(path)
        return c

    engines: dict = {}  # loaded on first use: the LoRA once for every seed, or the current seed's plain model
    for seed in size.seeds:  # seed-major: an interrupted run still has complete seeds for every arm
        def train(arm: str, seed: int = seed, needs_model: bool = False) -> dict:
            return cell("train", arm, seed, lambda: run_train_cell(size, arm, seed, out, model, embedder, aligner),
                        needs_model)

        # plain first (the reference), then the seed's cheap inference arms, then the other training arms
        infer_todo = any(_finished(_cell(cells_dir, "infer", m, seed), infer_key) is None for m in methods)
        plain = train("plain", needs_model=lora is None and infer_todo)
        cells.append(plain)
        src, data = (str(lora), infer_data) if lora else (plain["final"], Path(plain["run_dir"]) / "data")
        for m in methods:
            def make(m=m, src=src, data=data, seed=seed):
                if src not in engines:
                    engines.clear()  # a previous seed's plain model is not needed again
                    engines[src] = infer_engine(base, src) if lora else infer_engine(src)
                return run_infer_cell(size, m, seed, out, data, engines[src], embedder, aligner)

            cells.append(cell("infer", m, seed, make))
        cells += [train(arm) for arm in arms if arm != "plain"]
    results = aggregate(cells, size_name, size, embedder.name, aligner.name if aligner else None)
    results["wall_s_this_invocation"] = round(time.perf_counter() - t_start, 1)
    results["cells_reused"], results["cells_total"] = reused, len(cells)
    results["wall_s_cells"] = round(sum(c.get("cell_wall_s", 0.0) for c in cells), 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots(results, cells, out)
    (out / "lab-results.md").write_text(markdown(results, out))
    (out / "headline.md").write_text(headline(results) + "\n")
    return results


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


def pooled_rates(counts: dict) -> dict:
    """Copy and own-copy rate per group pooled over seeds (copies ÷ images), with Wilson 95 % intervals."""
    out = dict(counts)
    for grp in ("duplicated", "unique", "held_out"):
        n = counts.get(f"{grp}.n_images")
        for k, name in (("copies", "copy_rate"), ("own_copies", "own_copy_rate")):
            c = counts.get(f"{grp}.{k}")
            if n and c is not None:
                out[f"{grp}.{name}"] = {"rate": c / n, "ci95": wilson(c, n), "k": c, "n": n}
    return out


def _rate(p: Optional[dict]) -> str:
    """A pooled rate as 'r % [lo, hi] (k/n)'."""
    if not p:
        return "—"
    lo, hi = p["ci95"]
    return f"{100 * p['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({p['k']}/{p['n']})"


def _stats(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and np.isnan(x))], float)
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "n": int(len(v))}


def aggregate(cells: list[dict], size_name: str, size: Size, backend: str, align_backend: Optional[str]) -> dict:
    plain_wall = {c["seed"]: c["train_wall_s"] for c in cells if c["kind"] == "train" and c["arm"] == "plain"}
    table: dict = {"train": {}, "infer": {}}
    for c in cells:
        row = table[c["kind"]].setdefault(c["arm"], {"per_seed": {}})
        g = c["metrics"]["groups"]
        vals = {f"{grp}.{k}": g[grp].get(k) for grp in ("duplicated", "unique", "held_out") if grp in g
                for k in HEADLINE}
        counts = row.setdefault("pooled", {})
        for grp in ("duplicated", "unique", "held_out"):
            for k in COUNTS:
                if grp in g and g[grp].get(k) is not None:
                    counts[f"{grp}.{k}"] = counts.get(f"{grp}.{k}", 0) + g[grp][k]
        for k, v in (c["metrics"].get("detection_auroc_duplicated_vs_unique") or {}).items():
            vals[f"auroc.{k}"] = v
        if c["kind"] == "train":
            vals["cost_vs_plain"] = c["train_wall_s"] / plain_wall[c["seed"]]
        else:
            vals["cost_vs_cfg"] = c["cost_vs_cfg"]
        row["per_seed"][c["seed"]] = vals
    for kind, rows in table.items():
        for arm, row in rows.items():
            keys = sorted({k for v in row["per_seed"].values() for k in v})
            row["stats"] = {k: _stats([v.get(k) for v in row["per_seed"].values()]) for k in keys}
            row["pooled"] = pooled_rates(row.get("pooled", {}))
        ref = rows.get("plain" if kind == "train" else "cfg")
        for arm, row in rows.items():
            row["verdict"] = (verdict(row["stats"], ref["stats"], row["pooled"], ref["pooled"])
                              if ref is not None and row is not ref else {name: "reference" for name in VERDICT_KEYS})
    import diffusers
    import torch
    import transformers

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'}, " \
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    return {"size": size_name,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.__dict__.items()},
            "backend": backend, "alignment_backend": align_backend, "copy_threshold": 0.5,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "machine": dev, "table": table}


VERDICT_KEYS = {"copy_rate": "duplicated.copy_rate", "top1_mean": "duplicated.top1_mean",
                "alignment": "duplicated.lab_alignment"}


def effect(stats: dict, ref: dict, key: str) -> str:
    """One quantity of an arm vs the reference: did its mean move beyond both arms' seed spread (mean ± std)?"""
    a, b = stats.get(key), ref.get(key)
    if not a or not b or a["mean"] is None or b["mean"] is None:
        return "n/a"
    if key.endswith("copy_rate") and a["mean"] == 0 and b["mean"] == 0:
        return "no copies either side"
    if min(a.get("n", 2), b.get("n", 2)) < 2:  # std is 0 by construction: any difference would look "beyond" it
        return "one seed: no verdict"
    gap, spread = a["mean"] - b["mean"], (a["std"] or 0) + (b["std"] or 0)
    good_if_lower = not key.endswith("lab_alignment")
    if gap < -spread:
        return "lower (helps)" if good_if_lower else "lower (costs quality)"
    if gap > spread:
        return "higher (worse)" if good_if_lower else "higher (better)"
    return "within seed spread"


def verdict(stats: dict, ref: dict, pooled: Optional[dict] = None, ref_pooled: Optional[dict] = None) -> dict[str, str]:
    """Copy rate, top-1 mean and alignment of the duplicated captions, each judged by `effect`; with pooled counts,
    the copy rate is judged by its Wilson 95 % intervals instead (`interval_effect`)."""
    out = {name: effect(stats, ref, key) for name, key in VERDICT_KEYS.items()}
    a, b = (pooled or {}).get("duplicated.copy_rate"), (ref_pooled or {}).get("duplicated.copy_rate")
    if a and b:
        out["copy_rate"] = interval_effect(a, b)
    return out


def interval_effect(a: dict, b: dict) -> str:
    """A pooled copy rate vs the reference's: a verdict only when their Wilson 95 % intervals do not overlap."""
    if a["k"] == 0 and b["k"] == 0:
        return "no copies either side"
    if a["ci95"][1] < b["ci95"][0]:
        return "lower (helps)"
    if a["ci95"][0] > b["ci95"][1]:
        return "higher (worse)"
    return "intervals overlap"


def _fmt(s: Optional[dict], pct: bool = False) -> str:
    if not s or s["mean"] is None:
        return "—"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
    return f"{f(s['mean'])} ± {f(s['std'])}"


def _guidance(cfg: dict) -> str:
    g = cfg.get("infer_guidance")
    return "each method's own guidance scale, 7.5" if g is None else f"every method at guidance scale {g:g}"


def _base_name(cfg: dict) -> str:
    base = lora_base_model(str(_repo_path(cfg["infer_model"]))) if cfg.get("infer_model", "plain") != "plain" else None
    return f"its base `{base}`" if base else "the base"


def markdown(results: dict, out: Path) -> str:
    t, b = results["table"], results["backend"]
    cfg = results["config"]
    lines = [f"Size `{results['size']}`: seeds {cfg['seeds']}, {cfg['train_steps']} training steps, "
             f"{cfg['prompts_per_group']} prompts per caption group × {cfg['images_per_prompt']} images, "
             f"{cfg['gen_steps']} DDIM steps. Copy metric backend: **{b}**; copy = top-1 over every training row "
             f"(near-copies included) > 0.5, own copy = best of the caption's own rows > 0.5, both pooled over seeds "
             f"with a Wilson 95 % interval; alignment: {results['alignment_backend'] or 'none'}. "
             f"Values: mean ± std over seeds. Machine: {results['machine']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".", ""]
    im = cfg.get("infer_model", "plain")
    on = "the plain arm's model of each seed" if im == "plain" else f"`{im}` on {_base_name(cfg)}, its own training lab"
    train_title = ("Training arms (recipe `tiny_nomit` + the arm's mitigations: full UNet fine-tune — LoRA arms not "
                   "run on this CPU; generation: CFG)")
    for kind, title, cost in (("train", train_title, "cost_vs_plain"),
                              ("infer", f"Inference arms (on {on}; {_guidance(cfg)})", "cost_vs_cfg")):
        lines += [f"### {title}", "",
                  f"| arm | copy rate dup ({b}>0.5) | copy rate unique | own-copy rate dup | top-1 p95 dup | "
                  f"top-1 mean dup | LS dup | alignment dup | diversity dup | {cost.replace('_', ' ')} | "
                  "verdict: copy rate | verdict: top-1 mean | verdict: alignment |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm, row in t[kind].items():
            s = row["stats"]
            p = row.get("pooled", {})
            lines.append(" | ".join([
                f"| {arm}", _rate(p.get("duplicated.copy_rate")), _rate(p.get("unique.copy_rate")),
                _rate(p.get("duplicated.own_copy_rate")), _fmt(s.get("duplicated.top1_p95")),
                _fmt(s.get("duplicated.top1_mean")), _fmt(s.get("duplicated.localized_similarity_mean")),
                _fmt(s.get("duplicated.lab_alignment")), _fmt(s.get("duplicated.diversity")), _fmt(s.get(cost)),
                *row["verdict"].values()]) + " |")
        lines.append("")
    auroc_keys = sorted({k for row in t["train"].values() for k in row["stats"] if k.startswith("auroc.")})
    if auroc_keys:
        lines += ["### Detection AUROC (duplicated vs unique captions, CFG generation of each trained model)", "",
                  "| arm | " + " | ".join(k[6:] for k in auroc_keys) + " |", "|---|" + "---|" * len(auroc_keys)]
        for arm, row in t["train"].items():
            lines.append(f"| {arm} | " + " | ".join(_fmt(row["stats"].get(k)) for k in auroc_keys) + " |")
        lines.append("")
    lines += ["Figures: `tradeoff.png` (copy rate and top-1 vs alignment per arm — the papers' trade-off figure), "
              "`over_training.png` (duplicated captions' copy rate and top-1 during training), `grids/` (fixed "
              "prompts per arm, seed " + str(cfg["seeds"][0]) + "; first column = the prompt's training image).", ""]
    return "\n".join(lines)


def headline(results: dict) -> str:
    """The README's short table: both arm kinds in one, the three verdicts, the costs."""
    b = results["backend"].split(" ")[0]
    lines = [f"| arm | copy rate dup ({b} > 0.5, all training rows) | top-1 mean dup | top-1 mean unique | "
             "lab alignment dup | cost | copy rate | top-1 | alignment |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, cost, ref in (("train", "cost_vs_plain", "plain"), ("infer", "cost_vs_cfg", "CFG")):
        for arm, row in results["table"][kind].items():
            s = row["stats"]
            lines.append(" | ".join([
                f"| {kind}: {arm}", _rate(row.get("pooled", {}).get("duplicated.copy_rate")),
                _fmt(s.get("duplicated.top1_mean")),
                _fmt(s.get("unique.top1_mean")), _fmt(s.get("duplicated.lab_alignment")),
                f"{_fmt(s.get(cost))} × {ref}", *row["verdict"].values()]) + " |")
    return "\n".join(lines)


HEADLINE_START, HEADLINE_END = "<!-- lab-headline: start (written by guard-train lab --docs) -->", \
    "<!-- lab-headline: end -->"
# docs/lab-results.md also holds hand-written sections (trade-off curves, copying regime): --docs rewrites only this
TABLE_START, TABLE_END = "<!-- lab-table: start (written by guard-train lab --docs) -->", "<!-- lab-table: end -->"


def replace_marked(text: str, block: str, start: str, end: str) -> str:
    """Put `block` between the `start` and `end` marker lines of a docs page, keeping everything around them; the
    text must hold each marker once, in order."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i or text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"the page needs one '{start}' line followed by one '{end}'")
    return text[:i + len(start)] + "\n" + block + "\n" + text[j:]


def plots(results: dict, cells: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, b = results["table"], results["backend"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "duplicated.copy_rate", f"copy rate, duplicated captions ({b} > 0.5)"),
                           (axes[1], "duplicated.top1_mean", f"mean top-1 {b} similarity, duplicated captions")):
        for kind, marker in (("train", "o"), ("infer", "s")):
            for arm, row in t[kind].items():
                x, y = row["stats"].get("duplicated.lab_alignment"), row["stats"].get(key)
                if not x or not y or x["mean"] is None or y["mean"] is None:
                    continue
                ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt=marker, capsize=2)
                ax.annotate(arm if kind == "infer" else f"[train] {arm}", (x["mean"], y["mean"]), fontsize=6)
        ax.set_xlabel("lab alignment, duplicated captions (attribute classifier)")
        ax.set_ylabel(label)
    axes[0].set_title("copy rate vs alignment (mean ± std over seeds)", fontsize=9)
    axes[1].set_title("circles: training arms; squares: inference arms", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for arm in t["train"]:
        series = [c["over_training"] for c in cells if c["kind"] == "train" and c["arm"] == arm]
        if not series or not series[0]:
            continue
        steps = [p["step"] for p in series[0]]
        for ax, k in ((axes[0], "copy_rate"), (axes[1], "top1_mean")):
            v = np.array([[p[k] for p in s] for s in series if len(s) == len(steps)], float)
            ax.errorbar(steps, v.mean(0), yerr=v.std(0), label=arm, capsize=2)
    axes[0].set_ylabel(f"copy rate, duplicated ({b} > 0.5)")
    axes[1].set_ylabel(f"mean top-1 {b}, duplicated")
    for ax in axes:
        ax.set_xlabel("training step")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "over_training.png", dpi=120)
    plt.close(fig)
