"""What does a fine-tuned lab model draw from the empty caption, and which training images is that close to?

    python benchmarks/uncond_neighbours.py --lora models/tiny-sd-memorized-lora [--images 64] [--steps 25]

Why: Wen et al.'s detection score is the size of the text-conditional part of the noise prediction,
‖ε(x, c) − ε(x, ∅)‖. It is large for a memorized prompt when the unconditional model does *not* already draw that
image — true on LAION, where duplicated images are a tiny fraction of the data. In the lab the duplicated
instances make up most of the fine-tuning samples, and caption dropout trains ε(x, ∅) on those samples, so the
unconditional model may draw the duplicates itself. This measures it: unconditional generations (guidance 1,
empty caption), each one's nearest training instance by SSCD, and how often that instance is a duplicated one —
against the duplicated instances' share of the distinct images and of the training samples.
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
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default="results/uncond_neighbours.json")
    a = ap.parse_args()
    ll = LoraLab(a.lora)
    keys, dup = ll.keys, set(ll.dup)
    n_dup_samples = sum(it.is_dup for it in ll.lab.items)
    emb = get_embedder("sscd")
    e_train = emb.embed(ll.originals())
    out = {"copy_metric": emb.name, "lab_config": ll.config, "images": a.images, "steps": a.steps,
           "dup_share_of_distinct_images": round(len(dup) / len(keys), 3),
           "dup_share_of_training_samples": round(n_dup_samples / len(ll.lab.items), 3)}
    models = {"base": None, "lora": a.lora}
    eng = GuidanceEngine.from_pretrained(resolve_model_path(a.model))
    for name, lora in models.items():
        if lora:
            eng = GuidanceEngine.from_pretrained(resolve_model_path(a.model), lora=lora)
        res = eng.generate([""], method="cfg", guidance_scale=1.0, num_images=a.images, steps=a.steps, seed=0)
        sims = emb.embed(res.images) @ e_train.T
        top1, nn = sims.max(1), np.array(keys)[sims.argmax(1)]
        is_dup = np.array([k in dup for k in nn])
        out[name] = {"nn_is_duplicated_instance": round(float(is_dup.mean()), 3),
                     "top1_median": round(float(np.median(top1)), 3),
                     "top1_median_when_nn_dup": round(float(np.median(top1[is_dup])), 3) if is_dup.any() else None,
                     "top1_median_when_nn_unique": round(float(np.median(top1[~is_dup])), 3) if (~is_dup).any()
                     else None,
                     "copy_rate_0.5": round(float((top1 > 0.5).mean()), 3),
                     "distinct_nn_instances": int(len(set(nn.tolist())))}
        print(name, json.dumps(out[name]))
    return emit(out, a.out)


if __name__ == "__main__":
    sys.exit(main())
