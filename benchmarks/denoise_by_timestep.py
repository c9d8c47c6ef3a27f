"""How much copy-relevant texture does a model keep when it denoises? SSCD(one-step x0 at t, original) per timestep.

    python benchmarks/denoise_by_timestep.py [--model models/tiny-sd] [--lora models/tiny-sd-memorized-lora | none]

Why: an SSCD copy needs texture within ~2x blur of the training image (docs/base-model.md).
A sample's last denoising steps run at small t, so if the model's x0 prediction from a *lightly* noised image is
already far below the codec's own ceiling (t = 0: encode → decode), no sample can be an SSCD copy, however well the
model memorized the image's layout. On the lab images of the memorizing LoRA's training set (the base never saw
them): t = 0 is the codec ceiling; each t > 0 is one UNet call under the image's own caption, noise fixed by seed.
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
from guard_train.data.images import to_model, to_uint8  # noqa: E402
from guard_train.metrics.embed import get_embedder  # noqa: E402
from guard_train.metrics.memorization import one_step_probe  # noqa: E402
from guard_train.models.loading import load_lora, load_pipeline  # noqa: E402


def codec_roundtrip(pipe, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return to_uint8(pipe.vae.decode(pipe.vae.encode(to_model(list(images))).latent_dist.mode()).sample)


def identity_denoiser(pipe, images: np.ndarray, t: int, seed: int = 0) -> np.ndarray:
    """The reference a denoiser must beat: x0 = x_t / sqrt(ᾱ_t), the noised latent rescaled, noise left in."""
    sf, abar = pipe.vae.config.scaling_factor, pipe.scheduler.alphas_cumprod[t].item()
    with torch.no_grad():
        z = pipe.vae.encode(to_model(list(images))).latent_dist.mode() * sf
        zt = abar ** 0.5 * z + (1 - abar) ** 0.5 * torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        return to_uint8(pipe.vae.decode(zt / abar ** 0.5 / sf).sample)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/tiny-sd")
    ap.add_argument("--lora", default="models/tiny-sd-memorized-lora", help="a LoRA dir, or 'none' for the model")
    ap.add_argument("--lab-of", default="models/tiny-sd-memorized-lora", help="LoRA dir whose training lab is used")
    ap.add_argument("--timesteps", default="10,50,100,200,400,600,800,999")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    ll = LoraLab(a.lab_of)
    images = ll.originals()
    captions = [ll.caption[k] for k in ll.keys]
    is_dup = np.array([k in set(ll.dup) for k in ll.keys])
    emb = get_embedder("sscd")
    e0 = emb.embed(images)
    pipe = load_pipeline(resolve_model_path(a.model))
    if a.lora != "none":
        load_lora(pipe, a.lora)
    rows = []
    for t in [0, *[int(x) for x in a.timesteps.split(",")]]:
        out = codec_roundtrip(pipe, images) if t == 0 else one_step_probe(pipe, images, captions, t)
        sim = (emb.embed(out) * e0).sum(1)
        row = {"t": t, "noise_std": round((1 - pipe.scheduler.alphas_cumprod[t].item()) ** 0.5, 3) if t else 0.0,
               **{g: {"median": round(float(np.median(sim[s])), 3), "above_0.5": round(float((sim[s] > 0.5).mean()),
                                                                                     3)}
                  for g, s in (("duplicated", is_dup), ("unique", ~is_dup))}}
        if t:
            row["identity_denoiser_median"] = round(float(np.median((emb.embed(identity_denoiser(
                pipe, images, t)) * e0).sum(1))), 3)
        rows.append(row)
        print(rows[-1], flush=True)
    with torch.no_grad():
        z = pipe.vae.encode(to_model(list(images))).latent_dist.mode() * pipe.vae.config.scaling_factor
    return emit({"model": a.model, "lora": a.lora, "copy_metric": emb.name, "images": len(images),
                 "latent_channel_std": [round(float(v), 2) for v in z.std(dim=(0, 2, 3))],
                 "note": "t = 0 is the codec round trip (its ceiling); t > 0 one-step x0 under the own caption",
                 "rows": rows}, a.out)


if __name__ == "__main__":
    sys.exit(main())
