"""From how much noise does a model bring its training image back? SDEdit (img2img) from each training image.

    python benchmarks/sdedit_return.py [--lora models/tiny-sd-memorized-lora | none] [--strengths 0.2,0.4,0.6,0.8,1.0]

Why: the memorizing LoRA's one-step reconstructions are SSCD copies of the duplicates (docs/base-model.md) while its
samples from pure noise are not. Starting the sampler from the training image noised to t = strength × 1000 (diffusers'
StableDiffusionImg2ImgPipeline on the same components, DDIM, CFG 7.5, own caption) shows up to which noise level the
model's sampling trajectory still returns to that image, i.e. where memorization stops steering the sample.
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import LoraLab, emit  # noqa: E402

from guard_train.config.loader import resolve_model_path  # noqa: E402
from guard_train.metrics.embed import get_embedder  # noqa: E402
from guard_train.models.loading import load_lora, load_pipeline  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/tiny-sd")
    ap.add_argument("--lora", default="models/tiny-sd-memorized-lora", help="a LoRA dir, or 'none'")
    ap.add_argument("--lab-of", default="models/tiny-sd-memorized-lora")
    ap.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    ll = LoraLab(a.lab_of)
    keys = ll.dup + ll.uniq  # the 8 duplicated instances and as many unique ones
    images, captions = ll.originals(keys), [ll.caption[k] for k in keys]
    is_dup = np.array([True] * len(ll.dup) + [False] * len(ll.uniq))
    emb = get_embedder("sscd")
    e0 = emb.embed(images)
    pipe = load_pipeline(resolve_model_path(a.model))
    if a.lora != "none":
        load_lora(pipe, a.lora)
    # built from the components (from_pipe drops a VAE-slot module that is not an AutoencoderKL)
    i2i = StableDiffusionImg2ImgPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                         unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    i2i.set_progress_bar_config(disable=True)
    rows = []
    for s in [float(x) for x in a.strengths.split(",")]:
        out = i2i(captions, image=[Image.fromarray(im) for im in images], strength=s, num_inference_steps=a.steps,
                  guidance_scale=a.guidance, generator=torch.Generator().manual_seed(0), output_type="np").images
        sim = (emb.embed((out * 255).round().astype(np.uint8)) * e0).sum(1)
        rows.append({"strength": s, "start_t": int(s * 1000), **{g: {
            "own_sscd_median": round(float(np.median(sim[m])), 3),
            "copy_rate_0.5": round(float((sim[m] > 0.5).mean()), 3)}
            for g, m in (("duplicated", is_dup), ("unique", ~is_dup))}})
        print(rows[-1], flush=True)
    return emit({"model": a.model, "lora": a.lora, "copy_metric": emb.name, "steps": a.steps,
                 "guidance_scale": a.guidance, "prompts": {"duplicated": len(ll.dup), "unique": len(ll.uniq)},
                 "rows": rows}, a.out)


if __name__ == "__main__":
    sys.exit(main())
