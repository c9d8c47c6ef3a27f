"""Does the committed base model draw lab scenes that follow their captions? (docs/base-model.md)

    python benchmarks/base_model_check.py [--model models/tiny-sd] [--prompts 32] [--images 4]

Prompts: held-out lab captions (new compositions, never trained on by the base, which saw pretraining cells only).
Reported: lab alignment (attribute classifier, not CLIP) of each image with its own caption vs with another
prompt's caption (the chance level), the classifier's photo accuracy on the generations, SSCD of the codec's
reconstruction of lab images (the ceiling any copy can reach), and a sample grid.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from guard_train.config.loader import resolve_model_path  # noqa: E402
from guard_train.data.images import to_model, to_uint8  # noqa: E402
from guard_train.guidance.engine import GuidanceEngine  # noqa: E402
from guard_train.lab.aligner import LabAligner, parse_caption  # noqa: E402
from guard_train.lab.dataset import LabConfig, build_lab  # noqa: E402
from guard_train.lab.photos import PHOTO_NAMES  # noqa: E402
from guard_train.metrics.embed import get_embedder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/tiny-sd")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--out", default="results/base_model_check.json")
    ap.add_argument("--grid", default="docs/figures/base_samples.png")
    a = ap.parse_args()
    lab = build_lab(LabConfig(num_instances=100 - a.prompts, held_out=a.prompts, dup_fraction=0, seed=123))
    prompts = [h.caption for h in lab.held_out]
    eng = GuidanceEngine.from_pretrained(resolve_model_path(a.model))
    t0 = time.perf_counter()
    res = eng.generate(prompts, method="cfg", num_images=a.images, steps=a.steps, guidance_scale=a.guidance)
    wall = time.perf_counter() - t0
    al = LabAligner.load(ROOT / "models/lab-scorer")
    caps = [prompts[r["prompt_index"]] for r in res.records]
    shifted = [prompts[(r["prompt_index"] + 1) % len(prompts)] for r in res.records]
    own, other = al.score(res.images, caps), al.score(res.images, shifted)
    pp, _ = al.probabilities(res.images)
    photo_acc = float(np.mean([PHOTO_NAMES[i] == parse_caption(c)[0] for i, c in zip(pp.argmax(1), caps)]))
    codec = eng.vae
    imgs = np.stack(lab.images[:64])
    with torch.no_grad():
        rec = to_uint8(codec.decode(codec.encode(to_model(imgs)).latent_dist.mode()).sample)
    emb = get_embedder("sscd")
    ceil = np.sum(emb.embed(rec) * emb.embed(imgs), 1)
    info = json.loads((Path(resolve_model_path(a.model)) / "build_info.json").read_text())
    out = {"model": a.model, "pretraining_steps": info.get("total_steps"),
           "pretraining_wall_s": info.get("wall_s_total"), "prompts": len(prompts), "images_per_prompt": a.images,
           "steps": a.steps, "guidance": a.guidance,
           "generation_wall_s": round(wall, 1), "alignment_backend": al.name,
           "lab_alignment_own_caption": float(np.mean(own)), "lab_alignment_other_caption": float(np.mean(other)),
           "share_images_own_caption_better": float(np.mean(own > other)),
           "photo_accuracy_of_generations": photo_acc, "photo_chance": 1 / len(PHOTO_NAMES),
           "scorer_heldout": al.info.get("heldout_lab"),
           "codec_sscd_ceiling": {"p5": float(np.percentile(ceil, 5)), "p50": float(np.median(ceil)),
                                  "p95": float(np.percentile(ceil, 95)), "share_above_0.5": float((ceil > 0.5).mean()),
                                  "backend": emb.name}}
    print(json.dumps(out, indent=1))
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    rows = [np.concatenate(list(res.images[i * a.images:(i + 1) * a.images]), 1) for i in range(min(12, len(prompts)))]
    Image.fromarray(np.concatenate(rows, 0)).save(a.grid)
    (Path(a.grid).with_suffix(".txt")).write_text("\n".join(prompts[:12]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
