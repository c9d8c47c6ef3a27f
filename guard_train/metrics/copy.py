"""Copy metrics over embeddings (any backend of metrics/embed.py; every result carries the backend's name).

* Dataset level (Somepalli et al. 2023, `diff_retrieval.py`): each generation's top-1 similarity against the whole
  training set (faiss inner-product search on L2-normalised embeddings), its mean, 75/90/95th percentiles, the
  fraction above the copy threshold, and the train–train top-2 background (each training image's nearest *other*).
* Per prompt (GUARD's evaluation protocol, `inference_mem.py`): for each generation the max over the prompt's
  ground-truth images, then the mean over the prompt's generations.
* Copy rate (the standard rule) = share of generations whose top-1 over *every* training image (all rows, planted
  near-copies included) exceeds the threshold, with a Wilson 95 % interval; own-copy rate = share whose best match
  among the caption's own training rows (all of its copies) exceeds it. Both in `copy_rates`.
* Diversity: mean pairwise (1 − cosine) among one prompt's generations.
* Localized similarity (Bright Ending's LS; the authors released no code — our definition): upsample the end-token
  mask m to image size (bilinear), normalise to [0, 1] by its max, multiply the generation and each ground-truth
  image by it, embed, and take the max cosine over ground truths.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def top_k(queries: np.ndarray, reference: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(reference.shape[1])
    index.add(np.ascontiguousarray(reference, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def dataset_similarity(gen: np.ndarray, train: np.ndarray, threshold: float = 0.5) -> dict:
    sim, _ = top_k(gen, train, 1)
    s = sim[:, 0]
    return {"n": int(len(s)), "mean": float(s.mean()), "p75": float(np.percentile(s, 75)),
            "p90": float(np.percentile(s, 90)), "p95": float(np.percentile(s, 95)),
            "copy_rate": float((s > threshold).mean()), "threshold": threshold}


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (stays inside [0, 1] and is not empty at k = 0 or k = n)."""
    if n == 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def copy_rates(top1: np.ndarray, own_top1: np.ndarray, threshold: float = 0.5) -> dict:
    """Copy and own-copy rate of a set of generations with their Wilson 95 % intervals, and the dataset-level
    95th percentile of top-1 (Somepalli et al.'s sim_95pc). `own_top1` is NaN where a prompt has no own image."""
    top1, own_top1 = np.asarray(top1, float), np.asarray(own_top1, float)
    n, k = len(top1), int((top1 > threshold).sum())
    has_own = ~np.isnan(own_top1)
    k_own, n_own = int((own_top1[has_own] > threshold).sum()), int(has_own.sum())
    out = {"n_images": n, "copies": k, "copy_rate": k / n if n else float("nan"), "copy_rate_ci95": wilson(k, n),
           "top1_p95": float(np.percentile(top1, 95)) if n else float("nan")}
    if n_own:
        out.update(own_copies=k_own, own_copy_rate=k_own / n_own, own_copy_rate_ci95=wilson(k_own, n_own))
    return out


def own_similarity(sims: np.ndarray, owner: np.ndarray, keys) -> np.ndarray:
    """(N,) each generation's best similarity among its prompt's own reference rows (rows whose key is its owner);
    NaN where the owner is -1. `sims` is (N, rows), `keys` the rows' keys."""
    keys, out = np.asarray(keys), np.full(len(sims), np.nan)
    for key in np.unique(owner[owner >= 0]):
        rows = np.flatnonzero(keys == key)
        if not len(rows):
            raise ValueError(f"prompt owner {int(key)} names no image of the reference set (keys: the lab instance or "
                             f"the dataset's id column)")
        sel = owner == key
        out[sel] = sims[np.ix_(sel, rows)].max(1)
    return out


def train_background(train: np.ndarray, threshold: float = 0.5) -> dict:
    sim, _ = top_k(train, train, 2)
    s = sim[:, 1]  # the nearest other image (top-1 is itself)
    return {"n": int(len(s)), "mean": float(s.mean()), "p95": float(np.percentile(s, 95)),
            "share_above_threshold": float((s > threshold).mean())}


def per_prompt_similarity(gen_by_prompt: list[np.ndarray], gt_by_prompt: list[np.ndarray]) -> np.ndarray:
    """(P,) mean over a prompt's generations of the max over its ground-truth images."""
    return np.array([(g @ gt.T).max(1).mean() for g, gt in zip(gen_by_prompt, gt_by_prompt)])


def diversity(gen_by_prompt: list[np.ndarray]) -> np.ndarray:
    out = []
    for g in gen_by_prompt:
        n = len(g)
        if n < 2:
            out.append(np.nan)
            continue
        s = g @ g.T
        out.append(float(1 - (s.sum() - np.trace(s)) / (n * (n - 1))))
    return np.array(out)


def masked_images(images: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """images uint8 (N, H, W, 3) × mask (N, 1, h, w) upsampled and max-normalised per image."""
    m = F.interpolate(mask.float(), size=images.shape[1:3], mode="bilinear", align_corners=False)
    m = m / m.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (images.astype(np.float32) * m.permute(0, 2, 3, 1).numpy()).round().astype(np.uint8)


def localized_similarity(embedder, gens: np.ndarray, masks: torch.Tensor, gts: list[np.ndarray]) -> np.ndarray:
    """(N,) LS of generation i (mask i) against its ground truths gts[i] (G_i, H, W, 3)."""
    eg = embedder.embed(masked_images(gens, masks))
    out = []
    for i, gt in enumerate(gts):
        et = embedder.embed(masked_images(gt, masks[i : i + 1].expand(len(gt), -1, -1, -1)))
        out.append(float((et @ eg[i]).max()))
    return np.array(out)
