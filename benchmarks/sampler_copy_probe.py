"""Does the memorizing LoRA copy more with another sampler setting? (a property of the model, not of a method)

    python benchmarks/sampler_copy_probe.py --lora models/tiny-sd-memorized-lora [--steps 25,50,100] [--scales 1,3,7.5]

The lab benchmark and the training summary sample with DDIM 25 steps at CFG 7.5. Copies need sharp texture (SSCD
sees the background photo, docs/lab.md), so the number of DDIM steps and the guidance scale could
change how often a memorized duplicate comes out as an SSCD copy. Plain CFG only, on the duplicated and as many
unique training captions; per setting: copy rate (top-1 SSCD > 0.5 against every training image), own copies,
top-1 median. Seeds fixed, so settings differ only in the sampler.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import LoraLab, emit  # noqa: E402

from guard_train.config.loader import resolve_model_path  # noqa: E402
from guard_train.guidance.engine import GuidanceEngine  # noqa: E402
from guard_train.metrics.embed import get_embedder  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/tiny-sd")
    ap.add_argument("--lora", default="models/tiny-sd-memorized-lora")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", default="25,50,100")
    ap.add_argument("--scales", default="1,3,7.5")
    ap.add_argument("--spacing", default="", help="DDIM timestep_spacing (leading = the model's config, trailing "
                    "= first step at t = 999, Lin et al. 2024 §3.3); default: the model's")
    ap.add_argument("--out", default="results/sampler_copy_probe.json")
    a = ap.parse_args()
    ll = LoraLab(a.lora)
    keys, caption, dup, uniq = ll.keys, ll.caption, ll.dup, ll.uniq
    owner = np.repeat(np.array(dup + uniq), a.images)
    is_dup = np.repeat(np.array([True] * len(dup) + [False] * len(uniq)), a.images)
    emb = get_embedder("sscd")
    e_train = emb.embed(ll.originals())
    eng = GuidanceEngine.from_pretrained(resolve_model_path(a.model), lora=a.lora)
    if a.spacing:
        from diffusers import DDIMScheduler

        eng.scheduler = DDIMScheduler.from_config(eng.scheduler.config, timestep_spacing=a.spacing)
    rows = []
    for steps in [int(s) for s in a.steps.split(",")]:
        for scale in [float(s) for s in a.scales.split(",")]:
            res = eng.generate([caption[k] for k in dup + uniq], method="cfg", guidance_scale=scale,
                               num_images=a.images, steps=steps, seed=0)
            sims = emb.embed(res.images) @ e_train.T
            top1, nn = sims.max(1), np.array(keys)[sims.argmax(1)]
            row = {"ddim_steps": steps, "guidance_scale": scale,
                   "timestep_spacing": eng.scheduler.config.timestep_spacing,
                   "first_timestep": int(eng.scheduler.timesteps[0])}
            for name, s in (("duplicated", is_dup), ("unique", ~is_dup)):
                row[name] = {"copy_rate_0.5": round(float((top1[s] > 0.5).mean()), 3),
                             "own_copy_rate_0.5": round(float(((top1[s] > 0.5) & (nn[s] == owner[s])).mean()), 3),
                             # a copy of one of the planted duplicates
                             # (for unique captions: regurgitating another image)
                             "copy_of_duplicate_rate_0.5": round(
                                 float(((top1[s] > 0.5) & np.isin(nn[s], dup)).mean()), 3),
                             "top1_median": round(float(np.median(top1[s])), 3),
                             "top1_max": round(float(top1[s].max()), 3)}
            rows.append(row)
            print(json.dumps(row))
    return emit({"copy_metric": emb.name, "prompts": {"duplicated": len(dup), "unique": len(uniq)},
                 "images_per_prompt": a.images, "lab_config": ll.config, "rows": rows}, a.out)


if __name__ == "__main__":
    sys.exit(main())
