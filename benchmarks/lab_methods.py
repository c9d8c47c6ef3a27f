"""Every inference method at its defaults on a model fine-tuned to memorize the lab's planted duplicates.

    python benchmarks/lab_methods.py --lora models/tiny-sd-memorized-lora [--images 4] [--steps 50] [--guidance 3]

The lab is rebuilt from the LoRA's `lab_config.json` (the exact set it was trained on). Prompts: every duplicated
caption and as many unique ones. Per method: copy rate (SSCD top-1 against every training image > 0.5, and > the
lab-calibrated threshold), "own" copies (nearest training image is the prompt's own), SSCD top-1 median, lab
alignment (attribute classifier — not CLIP), wall time ÷ CFG. Writes JSON and one image grid per method.
`--guidance W` sets every method's CFG scale (`guidance_scale`; each method's other parameters stay at their
defaults), e.g. where a memorizing model copies most; default: each method's own (7.5).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import LoraLab, emit  # noqa: E402

from guard_train.config.loader import resolve_model_path  # noqa: E402
from guard_train.guidance.engine import GuidanceEngine  # noqa: E402
from guard_train.guidance.strategies import METHODS  # noqa: E402
from guard_train.lab.aligner import LabAligner  # noqa: E402
from guard_train.metrics.embed import get_embedder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/tiny-sd")
    ap.add_argument("--lora", default="models/tiny-sd-memorized-lora")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--guidance", type=float, default=None, help="every method's guidance_scale (default: its own)")
    ap.add_argument("--out", default="results/lab_methods.json")
    ap.add_argument("--figures", default="docs/figures")
    a = ap.parse_args()
    Path(a.figures).mkdir(parents=True, exist_ok=True)
    ll = LoraLab(a.lora)
    lab_cfg, lab = ll.config, ll.lab
    calib = json.loads((ROOT / "results/lab_calibration_sscd.json").read_text())
    origs, keys, train = lab.originals, ll.keys, ll.originals()
    inst_caption, dup, uniq = ll.caption, ll.dup, ll.uniq
    prompts = [inst_caption[k] for k in dup + uniq]
    owner = np.repeat(np.array(dup + uniq), a.images)
    group = np.repeat(np.array(["duplicated"] * len(dup) + ["unique"] * len(uniq)), a.images)
    eng = GuidanceEngine.from_pretrained(resolve_model_path(a.model), lora=a.lora)
    emb = get_embedder("sscd")
    e_train = emb.embed(train)
    aligner = LabAligner.load(ROOT / "models/lab-scorer")
    results = {}
    for m in a.methods.split(","):
        t0 = time.perf_counter()
        scale = {} if a.guidance is None else {"guidance_scale": a.guidance}
        res = eng.generate(prompts, method=m, num_images=a.images, steps=a.steps, seed=0, **scale)
        wall = time.perf_counter() - t0
        sims = emb.embed(res.images) @ e_train.T
        top1, nn = sims.max(1), np.array(keys)[sims.argmax(1)]
        align = aligner.score(res.images, [prompts[r["prompt_index"]] for r in res.records])
        r = {"wall_s": round(wall, 2)}
        for gname in ("duplicated", "unique"):
            s = group == gname
            r[gname] = {"copy_rate_0.5": float((top1[s] > 0.5).mean()),
                        "copy_rate_lab_threshold": float((top1[s] > calib["lab_threshold"]).mean()),
                        "own_copy_rate_0.5": float(((top1[s] > 0.5) & (nn[s] == owner[s])).mean()),
                        "top1_median": float(np.median(top1[s])), "lab_alignment": float(np.nanmean(align[s]))}
        results[m] = r
        rows = [np.concatenate(list(res.images[i * a.images:(i + 1) * a.images]), 1) for i in range(len(prompts))]
        gt = [origs[k] for k in dup + uniq]
        grid = np.concatenate([np.concatenate([g, row], 1) for g, row in zip(gt, rows)], 0)
        Image.fromarray(grid).save(Path(a.figures) / f"lab_methods_{m}.jpg", "JPEG", quality=92)  # docs' size
        print(m, json.dumps(r))
    base = results.get("cfg", {}).get("wall_s")
    for m in results:
        results[m]["wall_ratio_vs_cfg"] = round(results[m]["wall_s"] / base, 3) if base else None
    out = {"copy_metric": emb.name, "lab_threshold": calib["lab_threshold"], "alignment": aligner.name,
           "prompts": {"duplicated": len(dup), "unique": len(uniq)}, "images_per_prompt": a.images,
           "steps": a.steps, "guidance_scale": a.guidance or "each method's default", "model": a.model,
           "lora": a.lora, "lab_config": lab_cfg, "results": results}
    return emit(out, a.out)


if __name__ == "__main__":
    sys.exit(main())
