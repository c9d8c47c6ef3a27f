"""Trade-off curves: every inference method swept over its own strength knob on a model that copies, CFG swept over
its guidance scale as the reference curve (issue 20, item 2).

    python benchmarks/tradeoff.py --lora models/tiny-sd-v-memorized-lora --out runs/tradeoff.jsonl \
        [--dup-images 40] [--other-images 8] [--steps 25] [--guidance 3] [--methods cfg,guard,...] [--dry]

`--lora` is a built LoRA (lab_config.json and build_info.json beside the weights) or a training run's `final/`
(e.g. `runs/copying/runs/plain/final`: its base from base_model.txt, its lab from the run's data/lab_config.json).
The lab is the LoRA's own (rebuilt from its lab_config.json), scored by the product's evaluator
(`guard_train.eval.evaluate`): copy rate = top-1 SSCD over every training row > 0.5 (Wilson 95 % interval),
own-copy rate, top-1 mean/p95, lab alignment. Prompts: every duplicated caption × `--dup-images` (8 × 40 = 320
generations per point), and the same number of unique and held-out captions × `--other-images`. The caption
choice, seeds and sampler are the same at every point; only the method's knob moves. One JSON line per point is
appended to `--out` as it finishes, so an interrupted sweep keeps what it made and a rerun skips finished points.

Each method's knob and its values are fixed here, before any result (the authors' default is always one of the
points): a method's strength is its knob, every other parameter stays at its default, every method runs at the
same guidance scale `--guidance` (the scale where the model copies most).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from guard_train.eval.evaluate import Evaluator, PromptSet, reference_and_prompts  # noqa: E402
from guard_train.guidance.engine import GuidanceEngine  # noqa: E402
from guard_train.lab.aligner import LabAligner  # noqa: E402
from guard_train.lab.dataset import build_lab, read_lab_config, write_imagefolder  # noqa: E402
from guard_train.metrics.embed import get_embedder  # noqa: E402
from guard_train.models.loading import load_lora, load_pipeline, lora_base_model, merge_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# method -> (knob, values). Stronger mitigation to the right where the knob has a direction.
SWEEPS: dict[str, tuple[str, list]] = {
    "cfg": ("guidance_scale", [1.0, 1.5, 2.0, 3.0, 4.5, 7.5]),
    "guard": ("repulsion_scale", [0.25, 0.5, 1.0, 2.0, 4.0]),
    "guard_attn": ("spike_scale", [0.9, 0.7, 0.5, 0.3, 0.1]),
    "jain_static": ("transition_t", [900, 700, 500, 300, 100]),
    "jain_dynamic": ("guidance_before", [2.0, 1.0, 0.0, -1.0, -2.0]),
    "opposite_static": ("transition_t", [950, 800, 650, 400, 200]),
    "opposite_dynamic": ("opposite_scale", [1.0, 2.0, 4.0, 7.5, 10.0]),
    "ren": ("bos_scale", [1.0, 1.1, 1.25, 1.5, 2.0]),
    "wen_opt": ("target_loss", [3.0, 1.0, 0.5, 0.25, 0.1]),
    "be_opt": ("target_loss", [3.0, 1.0, 0.5, 0.25, 0.1]),
    "gni": ("noise_lambda", [0.05, 0.1, 0.2, 0.4, 0.8]),
    "random_token": ("repeats", [1, 2, 4, 8, 16]),
    "word_repeat": ("repeats", [1, 2, 4, 8, 16]),
}
# GUARD's second knob (issue: "repulsion λ and spike threshold"), a curve of its own
EXTRA = {"guard:spike_threshold": ("guard", "spike_threshold", [0.4, 0.2, 0.1, 0.05, 0.02])}


def points(methods: list[str]) -> list[tuple[str, str, str, object]]:
    """(curve, method, knob, value) for every point to run, in rounds across curves — each curve's two ends first,
    then its middle, then the rest — so an interrupted sweep still has a coarse curve for every method."""
    curves = [(m, m, *SWEEPS[m]) for m in methods if m in SWEEPS]
    curves += [(c, m, k, vs) for c, (m, k, vs) in EXTRA.items() if m in methods]
    rank = lambda n: [0, n - 1, n // 2] + [i for i in range(1, n - 1) if i != n // 2]  # noqa: E731
    rounds = max(len(vs) for *_, vs in curves) if curves else 0
    return [(c, m, k, vs[rank(len(vs))[r]]) for r in range(rounds) for c, m, k, vs in curves if r < len(vs)]


def prompt_sets(pset: PromptSet) -> dict[str, PromptSet]:
    """The duplicated captions apart (many images each) from the unique and held-out ones (fewer)."""
    def sub(keep) -> PromptSet:
        idx = [i for i, g in enumerate(pset.groups) if keep(g)]
        return PromptSet([pset.prompts[i] for i in idx], [pset.groups[i] for i in idx], [pset.owners[i] for i in idx])

    return {"dup": sub(lambda g: g == "duplicated"), "other": sub(lambda g: g != "duplicated")}


def lab_config_dir(lora: Path) -> Path:
    """Where the LoRA's lab_config.json is: beside the weights (a built model), or in the run's data/ when `lora` is a
    training run's final/ directory."""
    for d in (lora, lora.parent / "data"):
        if (d / "lab_config.json").is_file():
            return d
    raise FileNotFoundError(f"no lab_config.json beside {lora} or in {lora.parent / 'data'}: the sweep needs the lab "
                            f"the LoRA was trained on (give --lora a built LoRA or a training run's final/)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", default="models/tiny-sd-v-memorized-lora")
    ap.add_argument("--out", default="runs/tradeoff.jsonl")
    ap.add_argument("--work", default="runs/tradeoff-work", help="where the LoRA's lab is written")
    ap.add_argument("--dup-images", type=int, default=40)
    ap.add_argument("--other-images", type=int, default=8)
    ap.add_argument("--prompts-per-group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--methods", default=",".join(SWEEPS))
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sscd-threads", type=int, default=2)
    ap.add_argument("--deadline-s", type=float, default=0.0, help="stop starting new points after this many s")
    ap.add_argument("--dry", action="store_true", help="2 values per curve, tiny sizes: checks the plumbing")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    lora = Path(a.lora)
    base = lora_base_model(str(lora)) or "models/tiny-sd"
    data = Path(a.work) / "lab"
    if not (data / "manifest.jsonl").exists():
        try:
            lab_dir = lab_config_dir(lora)
        except FileNotFoundError as e:
            print(f"error: --lora: {e}", file=sys.stderr)
            return 2
        write_imagefolder(build_lab(read_lab_config(lab_dir)), data)
    ref, pset = reference_and_prompts(data, a.prompts_per_group, 0)
    sets = prompt_sets(pset)
    pipe = load_pipeline(str(base if Path(base).exists() else ROOT / base))
    load_lora(pipe, str(lora))
    merge_lora(pipe)  # unmerged adapters on every conv and linear cost several times the base UNet's time
    pipe.set_progress_bar_config(disable=True)
    eng = GuidanceEngine(pipe.to("cuda" if torch.cuda.is_available() else "cpu"), max_batch=a.max_batch)
    from guard_train.metrics.embed import SSCDOnnx

    emb = SSCDOnnx(threads=a.sscd_threads) if a.sscd_threads != 2 else get_embedder("sscd")
    aligner = LabAligner.load(ROOT / "models" / "lab-scorer")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["curve"], json.dumps(r["value"])) for r in map(json.loads, out.read_text().splitlines())} \
        if out.exists() else set()
    todo = points(a.methods.split(","))
    if a.dry:
        todo = [p for i, p in enumerate(todo) if i % 5 in (0, 3)]
    for curve, method, knob, value in todo:
        if (curve, json.dumps(value)) in done:
            continue
        if a.deadline_s and time.perf_counter() - t_start > a.deadline_s:
            print(f"[tradeoff] deadline reached: {curve} {knob}={value} and later points not run", flush=True)
            break
        params = {"guidance_scale": a.guidance, knob: value}
        if method == "cfg":
            params = {knob: value}
        row = {"curve": curve, "method": method, "knob": knob, "value": value, "params": params}
        t0 = time.perf_counter()
        for name, ps, n in (("dup", sets["dup"], a.dup_images), ("other", sets["other"], a.other_images)):
            res = Evaluator(ps, ref, emb, n, a.steps, a.seed, 0.5, aligner).measure(eng, method, **params)
            row[f"gen_wall_s_{name}"] = res.wall_s
            row[f"per_prompt_{name}"] = res.per_prompt  # lets the report choose settings on a validation split
            row.update({f"{g}": m for g, m in res.metrics["groups"].items() if g != "all"})
        row["point_wall_s"] = time.perf_counter() - t0
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        d = row["duplicated"]
        print(f"[tradeoff] {curve} {knob}={value}: dup copies {d['copies']}/{d['n_images']}, "
              f"align {d.get('lab_alignment', float('nan')):.3f}, {row['point_wall_s']:.1f}s", flush=True)
    meta = {"lora": str(lora), "base": base, "guidance": a.guidance, "steps": a.steps, "dup_images": a.dup_images,
            "other_images": a.other_images, "prompts_per_group": a.prompts_per_group, "backend": emb.name,
            "alignment": aligner.name, "wall_s": time.perf_counter() - t_start,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "command": "python benchmarks/tradeoff.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
