"""Memorization measurements on a pipeline with the current weights.

* One-step reconstruction probe (in the spirit of Webster 2023's one-step extraction): noise a training image's
  latent to timestep t, take the model's one-step x̂₀ = (x_t − √(1−ᾱ_t) ε̂(x_t, t, c)) / √ᾱ_t under its caption,
  decode, and score the copy similarity to the original. One UNet call per image; it separates duplicated from
  unique images before samples are clean (on the tiny SD: 0.41–0.56 vs 0.10–0.23 at t = 200, docs/base-model.md).
* Generation copy rate: sample with CFG from a caption, take the top-1 similarity against every training image —
  every row, planted near-copies included (Somepalli protocol); a copy = top-1 > threshold (0.5 for SSCD, the
  papers' value). Own-copy rate: the best match among the caption's own rows (all of its copies) > threshold.
Work items are split across processes and gathered; scoring runs on the main process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from guard_train.data.images import to_model as _to_tensor
from guard_train.data.images import to_uint8 as _to_u8
from guard_train.guidance.engine import GuidanceEngine
from guard_train.metrics.copy import copy_rates, own_similarity
from guard_train.metrics.embed import Embedder
from guard_train.models.prediction import to_x0
from guard_train.models.text import encode_text


@dataclass
class Probe:
    group: str  # e.g. "duplicated" / "unique"
    caption: str
    image: np.ndarray  # uint8 HxWx3 training image of this caption
    key: int  # instance id


def _encode_text(pipe, captions: list[str]) -> torch.Tensor:
    return encode_text(pipe.tokenizer, pipe.text_encoder, captions)


@torch.no_grad()
def one_step_probe(pipe, images: np.ndarray, captions: list[str], t: int, seed: int = 0, batch: int = 32) -> np.ndarray:
    """x̂₀ images (uint8) from training images noised to timestep t. Deterministic in `seed`."""
    vae, unet, sf = pipe.vae, pipe.unet, pipe.vae.config.scaling_factor
    abar = pipe.scheduler.alphas_cumprod[t].item()
    out = []
    g = torch.Generator().manual_seed(seed)
    dtype = next(unet.parameters()).dtype
    for i in range(0, len(images), batch):
        x = _to_tensor(images[i : i + batch]).to(pipe.device, vae.dtype)
        z = vae.encode(x).latent_dist.mode() * sf
        noise = torch.randn(z.shape, generator=g).to(z)
        zt = abar**0.5 * z + (1 - abar) ** 0.5 * noise
        tt = torch.full((len(z),), t, device=pipe.device, dtype=torch.long)
        out_t = unet(zt.to(dtype), tt, _encode_text(pipe, captions[i : i + batch]).to(dtype)).sample.to(z.dtype)
        x0 = to_x0(pipe.scheduler, out_t, zt, tt)  # ε-, v- or sample-prediction models alike
        out.append(_to_u8(vae.decode(x0 / sf).sample.float()))
    return np.concatenate(out)


@torch.no_grad()
def generate(pipe, captions: list[str], n: int, steps: int, guidance: float, seed: int, offset: int = 0) -> np.ndarray:
    """n CFG images per caption through the engine (the one generation path; DDIM, η 0), caption k seeded with
    seed + offset + k (the papers' per-prompt seeds). On a pipeline whose own scheduler is DDIM a caption's images are
    bit-identical to diffusers' `pipe(caption, num_images_per_prompt=n, generator=manual_seed(seed))` when they are
    the whole batch; batched with other captions, a pixel may move by one level on CPUs whose kernels round by
    batch size."""
    px = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if not captions:
        return np.zeros((0, px, px, 3), np.uint8)
    engine = GuidanceEngine(pipe)
    return engine.generate(captions, method="cfg", num_images=n, steps=steps, guidance_scale=guidance,
                           seeds=[seed + offset + k for k in range(len(captions))]).images


def memorization_summary(pipe, probes: list[Probe], train_images: np.ndarray, train_keys: list[int],
                         embedder: Embedder, acc=None, images_per_prompt: int = 2, steps: int = 25,
                         guidance: float = 5.0, probe_t: int = 200, threshold: float = 0.5, seed: int = 0,
                         max_gen: Optional[int] = None, aligner=None) -> dict:
    """Per group: probe similarity (median, share > threshold) and generation copy rate / top-1 / own-NN."""
    idx = list(range(len(probes)))
    parts: list = []
    if acc is not None and acc.num_processes > 1:
        from accelerate.utils import gather_object

        with acc.split_between_processes(idx) as mine:
            local = _work(pipe, [probes[i] for i in mine], mine, images_per_prompt, steps, guidance, probe_t, seed,
                          max_gen)
        parts = gather_object([local])
    else:
        parts = [_work(pipe, probes, idx, images_per_prompt, steps, guidance, probe_t, seed, max_gen)]
    if acc is not None and not acc.is_main_process:
        return {}
    rows = sorted((r for p in parts for r in p), key=lambda r: r["i"])
    seen, uniq = set(), []
    for r in rows:  # split_between_processes may pad the last rank with repeats
        if r["i"] not in seen:
            seen.add(r["i"])
            uniq.append(r)
    out = score(uniq, probes, train_images, train_keys, embedder, threshold, aligner)
    if aligner is not None:
        out["alignment_backend"] = aligner.name
    out["probe_timestep"] = probe_t
    return out


def _work(pipe, probes, indices, n, steps, guidance, probe_t, seed, max_gen) -> list[dict]:
    if not probes:
        return []
    imgs = np.stack([p.image for p in probes])
    caps = [p.caption for p in probes]
    x0 = one_step_probe(pipe, imgs, caps, probe_t, seed)
    rows = []
    for j, (i, p) in enumerate(zip(indices, probes)):
        gen = (generate(pipe, [p.caption], n, steps, guidance, seed, offset=i)
               if (max_gen is None or i < max_gen) else None)
        rows.append({"i": i, "x0": x0[j], "gen": gen})
    return rows


def score(rows, probes, train_images, train_keys, embedder: Embedder, threshold: float, aligner=None) -> dict:
    emb_train = embedder.embed(train_images) if type(embedder).similarity is Embedder.similarity else None
    out: dict = {"backend": embedder.name, "threshold": threshold, "groups": {}}
    groups = sorted({probes[r["i"]].group for r in rows})
    keys = np.asarray(train_keys)
    for gname in groups:
        rs = [r for r in rows if probes[r["i"]].group == gname]
        own = np.stack([probes[r["i"]].image for r in rs])
        x0 = np.stack([r["x0"] for r in rs])
        probe_sim = np.diag(_sim(embedder, x0, own, emb_b=None))
        g: dict = {"n_prompts": len(rs),
                   "probe_median": float(np.median(probe_sim)),
                   "probe_above_threshold": float((probe_sim > threshold).mean())}
        gens = [(r, r["gen"]) for r in rs if r["gen"] is not None and len(r["gen"])]
        if gens:
            allg = np.concatenate([x for _, x in gens])
            owner = np.concatenate([[probes[r["i"]].key] * len(x) for r, x in gens])
            sims = _sim(embedder, allg, train_images, emb_b=emb_train)
            top1 = sims.max(1)
            nn = keys[sims.argmax(1)]
            own_top1 = own_similarity(sims, owner, keys)
            rates = copy_rates(top1, own_top1, threshold)
            g.update(n_generations=rates.pop("n_images"), **rates, top1_median=float(np.median(top1)),
                     nn_is_own=float((nn == owner).mean()))
            if aligner is not None:
                caps = [probes[r["i"]].caption for r, x in gens for _ in range(len(x))]
                g["lab_alignment"] = float(np.nanmean(aligner.score(allg, caps)))
        out["groups"][gname] = g
    return out


def _sim(embedder: Embedder, a: np.ndarray, b: np.ndarray, emb_b=None) -> np.ndarray:
    return embedder.similarity(a, b) if emb_b is None else embedder.embed(a) @ emb_b.T
