"""Near-duplicate detection of a training set (`guard-train dedup`).

Embed every image (SSCD by default; an SSCD TorchScript file by path; 64-bit perceptual hash as the fallback that
needs no model), find every pair closer than a threshold with faiss range search (inner product ≥ τ on
L2-normalised SSCD embeddings; Hamming distance ≤ r on pHashes) — no Python O(N²) loop — and merge pairs into
clusters with union-find. Identical captions (after lower-casing and whitespace folding) are grouped too.
Output: `clusters.jsonl` (one row per item: id, cluster, cluster_size, caption_group, caption_group_size) that
the duplicate-aware sampler reads, plus `dedup_summary.json`. Embeddings are cached next to the output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard_train.data.loaders import DataError
from guard_train.metrics.embed import get_embedder


class UnionFind:
    def __init__(self, n: int):
        self.p = np.arange(n)

    def find(self, i: int) -> int:
        while self.p[i] != i:
            self.p[i] = self.p[self.p[i]]
            i = self.p[i]
        return int(i)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[max(ra, rb)] = min(ra, rb)

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.p))])


def pairs_sscd(emb: np.ndarray, threshold: float, index: str = "auto") -> np.ndarray:
    """All pairs (i < j) with cosine ≥ threshold, as an (P, 2) array. `flat` is exact (O(N²)); `join` (cell
    self-join, `pairs_cell_join`) and `ivf` (faiss range search, 64 of ~4√N inverted lists probed) are
    approximate and much faster on large sets; `auto` = flat up to 20k items, then join."""
    import faiss

    x = np.ascontiguousarray(emb.astype(np.float32))
    d = x.shape[1]
    if index == "join" or (index == "auto" and len(x) > 20_000):
        return pairs_cell_join(x, threshold)
    if index == "ivf":
        nlist = int(4 * np.sqrt(len(x)))
        idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        idx.train(x[np.random.default_rng(0).choice(len(x), min(len(x), 40 * nlist), replace=False)])
        idx.nprobe = min(64, nlist)
    else:
        idx = faiss.IndexFlatIP(d)
    idx.add(x)
    lims, _, nbr = idx.range_search(x, float(threshold))
    src = np.repeat(np.arange(len(x)), np.diff(lims).astype(np.int64))
    keep = src < nbr
    return np.stack([src[keep], nbr[keep]], 1)


def pairs_cell_join(x: np.ndarray, threshold: float, cells_per_item: int = 8, items_per_cell: int = 250,
                    block: int = 2048, seed: int = 0) -> np.ndarray:
    """Pairs with inner product ≥ threshold among items that share a k-means cell, each item placed in its
    `cells_per_item` nearest cells (spherical k-means, ~`items_per_cell` items per cell on average).

    Why a self-join and not N range searches: every query of an all-pairs search is also a database item, so the
    work can be done cell by cell as one matrix product of the cell's members with themselves (BLAS), instead of N
    scans of the probed lists. A near-duplicate pair is missed only if the two items have no cell in common among
    their nearest few — the redundancy `cells_per_item` > 1 buys. On isotropic 512-d data with planted pairs at
    cosine 0.74 (benchmarks/dedup_scale.py; real embeddings cluster, which helps): 100k items, recall 0.964 with 3
    cells, 0.993 with 4, 1.0 with 6; 1M items, 0.986 with 6, 0.998 with 8 (the default; 196 s on 2 CPU cores).
    Every reported pair's similarity is exact (precision 1 before clustering)."""
    import faiss

    n, d = x.shape
    nlist = max(1, n // items_per_cell)
    rng = np.random.default_rng(seed)
    km = faiss.Kmeans(d, nlist, niter=8, seed=seed, spherical=True, max_points_per_centroid=32)
    km.train(x[rng.choice(n, 32 * nlist, replace=False)] if n > 32 * nlist else x)  # cells need not be optimal
    _, cell = km.index.search(x, min(cells_per_item, nlist))  # (n, m) nearest centroids
    flat = cell.ravel()
    order = np.argsort(flat, kind="stable")
    members = np.repeat(np.arange(n), cell.shape[1])[order]
    bounds = np.searchsorted(flat[order], np.arange(nlist + 1))
    found = []
    for c in range(nlist):
        m = members[bounds[c] : bounds[c + 1]]
        for start in range(0, len(m), block):  # rows in blocks: a crowded cell never needs an (M, M) matrix
            rows = m[start : start + block]
            i, j = np.nonzero(x[rows] @ x[m].T >= threshold)
            keep = rows[i] < m[j]
            if keep.any():
                found.append(np.stack([rows[i][keep], m[j][keep]], 1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)  # a pair shared by several cells once


def pairs_hamming(bits: np.ndarray, radius: int) -> np.ndarray:
    import faiss

    index = faiss.IndexBinaryFlat(bits.shape[1] * 8)
    index.add(bits)
    lims, _, nbr = index.range_search(bits, radius + 1)  # faiss: distance < radius
    src = np.repeat(np.arange(len(bits)), np.diff(lims).astype(np.int64))
    keep = src < nbr
    return np.stack([src[keep], nbr[keep]], 1)


def cluster_labels(n: int, pairs: np.ndarray) -> np.ndarray:
    uf = UnionFind(n)
    for a, b in pairs:
        uf.union(int(a), int(b))
    return uf.labels()


def caption_labels(captions: list) -> np.ndarray:
    norm = [re.sub(r"\s+", " ", (c if isinstance(c, str) else str(c)).strip().lower()) for c in captions]
    first: dict[str, int] = {}
    return np.array([first.setdefault(c, i) for i, c in enumerate(norm)])


def phash_bits(images: np.ndarray) -> np.ndarray:
    import imagehash
    from PIL import Image

    return np.stack([np.packbits(imagehash.phash(Image.fromarray(im)).hash.flatten()) for im in images])


@dataclass
class DedupResult:
    ids: np.ndarray
    cluster: np.ndarray  # root item index per item
    caption_group: np.ndarray
    backend: str
    threshold: float

    def sizes(self, labels: np.ndarray) -> np.ndarray:
        _, inv, cnt = np.unique(labels, return_inverse=True, return_counts=True)
        return cnt[inv]

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        cs, gs = self.sizes(self.cluster), self.sizes(self.caption_group)
        tmp = out / "clusters.jsonl.tmp"  # renamed into place when whole: a reader never sees half a file
        with open(tmp, "w") as f:
            for i, rid in enumerate(self.ids):
                f.write(json.dumps({"id": int(rid), "cluster": int(self.ids[self.cluster[i]]),
                                    "cluster_size": int(cs[i]),
                                    "caption_group": int(self.ids[self.caption_group[i]]),
                                    "caption_group_size": int(gs[i])}) + "\n")
        os.replace(tmp, out / "clusters.jsonl")
        return out / "clusters.jsonl"

    def summary(self, top: int = 10) -> dict:
        labels, counts = np.unique(self.cluster, return_counts=True)
        order = np.argsort(-counts)
        return {"backend": self.backend, "threshold": self.threshold, "items": int(len(self.ids)),
                "clusters": int(len(labels)), "items_in_duplicate_clusters": int(counts[counts > 1].sum()),
                "duplicate_clusters": int((counts > 1).sum()),
                "caption_groups_with_duplicates": int((np.unique(self.caption_group, return_counts=True)[1] > 1).sum()),
                "largest": [{"cluster": int(self.ids[labels[k]]), "size": int(counts[k])}
                            for k in order[:top] if counts[k] > 1]}


def read_clusters(path: str | Path) -> dict[int, dict]:
    with open(path) as f:
        return {r["id"]: r for r in map(json.loads, f)}


def embed_images(images: np.ndarray, backend: str) -> np.ndarray:
    if backend == "phash":
        return phash_bits(images)

    return get_embedder(backend).embed(images)


def default_threshold(backend: str, threshold: float = 0.0) -> float:
    """cosine ≥ τ for SSCD (default 0.6), Hamming ≤ r bits for phash (default 8)."""
    return threshold or (8 if backend == "phash" else 0.6)


def dedup_embeddings(emb: np.ndarray, ids: np.ndarray, captions: list, backend: str,
                     threshold: float = 0.0) -> DedupResult:
    """Clusters from embeddings (SSCD vectors or pHash bits) and the captions' groups."""
    threshold = default_threshold(backend, threshold)
    pairs = pairs_hamming(emb, int(threshold)) if backend == "phash" else pairs_sscd(emb, threshold)
    return DedupResult(np.asarray(ids), cluster_labels(len(ids), pairs), caption_labels(captions), backend, threshold)


def run_dedup(images: np.ndarray, ids: np.ndarray, captions: list, backend: str = "sscd", threshold: float = 0.0,
              cache: Path | None = None) -> DedupResult:
    """Dedup images already in memory (embeddings cached under `cache`, keyed by a sample of the pixels)."""
    key = hashlib.sha1(images.tobytes()[:: max(1, images.size // 4_000_000)] + backend.encode()).hexdigest()[:16]
    emb = None
    if cache is not None and (cache / f"emb_{key}.npy").exists():
        emb = np.load(cache / f"emb_{key}.npy")
    if emb is None:
        emb = embed_images(images, backend)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            np.save(cache / f"emb_{key}.npy", emb)
    return dedup_embeddings(emb, ids, captions, backend, threshold)


def dedup_dataset(ds, backend: str = "sscd", threshold: float = 0.0, cache: Path | None = None,
                  chunk: int = 1024) -> tuple[DedupResult, list]:
    """Dedup a dataset of any size: embedded chunk by chunk (`embed_dataset`), clustered from the embeddings alone.
    Returns the result and the (id, error) list of undecodable items."""
    emb, ids, caps, bad = embed_dataset(ds, backend, cache, chunk)
    return dedup_embeddings(emb, ids, caps, backend, threshold), bad


def embed_dataset(ds, backend: str, cache: Path | None = None, chunk: int = 1024,
                  ) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Embed every decodable item of an ImageCaptionDataset (built with a 256-px transform), `chunk` items at a
    time → (embeddings, ids, captions, undecodable (id, error) list). Only the embeddings stay in memory (a million
    SSCD vectors are 2 GB; the images would be 200 GB). Each finished chunk is written under `cache`, named by the
    backend and the chunk's item ids, so an interrupted run resumes at the first missing chunk; a progress bar
    counts the items."""
    from tqdm.auto import tqdm

    all_ids = [int(i) for i in ds.item_ids()]
    parts = []
    with tqdm(total=len(ds), desc=f"embedding ({backend})", unit="img", disable=None) as bar:
        for start in range(0, len(ds), chunk):
            stop = min(start + chunk, len(ds))
            parts.append(_embedded_chunk(ds, range(start, stop), all_ids[start:stop], backend, cache))
            bar.update(stop - start)
    bad = [b for p in parts for b in p["bad"]]
    if not any(len(p["ids"]) for p in parts):
        raise _none_decoded(bad)
    parts = [p for p in parts if len(p["ids"])]
    return (np.concatenate([p["emb"] for p in parts]), np.concatenate([p["ids"] for p in parts]),
            [c for p in parts for c in p["caps"]], bad)


def _embedded_chunk(ds, indices: range, ids: list[int], backend: str, cache: Path | None) -> dict:
    key = hashlib.sha1(f"{backend}|{','.join(map(str, ids))}".encode()).hexdigest()[:16]
    path = cache / f"chunk_{indices.start:09d}_{key}.npz" if cache is not None else None
    if path is not None and path.exists():
        z = np.load(path, allow_pickle=False)
        bad = [tuple(b) for b in json.loads(str(z["bad"]))]
        return {"emb": z["emb"], "ids": z["ids"], "caps": z["caps"].tolist(), "bad": bad}
    imgs, got, caps, bad = _decode(ds, indices)
    bad = [(int(i), str(e)) for i, e in bad]
    emb = embed_images(np.stack(imgs), backend) if imgs else np.zeros((0, 1), np.float32)
    part = {"emb": emb, "ids": np.asarray(got, dtype=np.int64), "caps": caps, "bad": bad}
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, emb=emb, ids=part["ids"], caps=np.array(caps, dtype=str), bad=json.dumps(bad))
        os.replace(tmp, path)  # a chunk file is complete or absent
    return part


def _none_decoded(bad: list) -> DataError:
    first = f" (item {bad[0][0]}: {bad[0][1]})" if bad else ""
    return DataError(f"none of the {len(bad)} images could be decoded{first}; check that the files are images")


def _decode(ds, indices) -> tuple[list[np.ndarray], list[int], list[str], list]:
    imgs, ids, caps, bad = [], [], [], []
    for i in indices:
        r = ds[i]
        if "error" in r:
            bad.append((r["id"], r["error"]))
            continue
        imgs.append(((r["pixel_values"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
        ids.append(r["id"])
        caps.append(r["caption"])
    return imgs, ids, caps, bad


def pairwise_precision_recall(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Pair-counting precision/recall of a clustering against ground-truth groups (same-group pairs)."""
    def same_pairs(lbl):
        _, cnt = np.unique(lbl, return_counts=True)
        return int((cnt * (cnt - 1) // 2).sum())

    both = same_pairs([f"{a}/{b}" for a, b in zip(pred, truth)])
    p, t = same_pairs(pred), same_pairs(truth)
    return {"pair_precision": both / p if p else 1.0, "pair_recall": both / t if t else 1.0,
            "predicted_pairs": p, "true_pairs": t}


def load_images_for_dedup(ds, size: int = 256) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Decode every item of an ImageCaptionDataset (built with a `size` transform) → uint8 images, ids, captions,
    and the (id, error) list of undecodable items (all in memory: for reference sets, not LAION-scale data)."""
    imgs, ids, caps, bad = _decode(ds, range(len(ds)))
    if not imgs:  # np.stack would fail with "need at least one array to stack"
        raise _none_decoded(bad)
    return np.stack(imgs), np.asarray(ids), caps, bad
