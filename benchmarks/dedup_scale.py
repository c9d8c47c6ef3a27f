"""Dedup time for N synthetic 512-d embeddings (planted near-duplicate groups): pair search (`--index`: join =
k-means cell self-join, the default beyond 20k items; ivf = faiss range search; flat = exact) + union-find, and
pair precision / recall of the clusters against the planted groups.

    python benchmarks/dedup_scale.py [--n 100000] [--index auto|join|ivf|flat] [--out results/dedup_scale.json]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402

from guard_train.data.dedup import cluster_labels, pairs_sscd, pairwise_precision_recall  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "join"])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n_groups, k = a.n // 100, 5  # 1 % of items seed a group of 5 near-duplicates
    base = rng.standard_normal((a.n - n_groups * (k - 1), 512)).astype(np.float32)
    # near-duplicates: base + N(0, 0.6²) per dim -> cosine to the base ≈ 0.86, to each other ≈ 0.74
    dups = np.repeat(base[:n_groups], k - 1, axis=0) + 0.6 * rng.standard_normal(
        (n_groups * (k - 1), 512)).astype(np.float32)
    x = np.concatenate([base, dups])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.concatenate([np.arange(len(base)), np.repeat(np.arange(n_groups), k - 1)])
    t0 = time.perf_counter()
    pairs = pairs_sscd(x, a.threshold, a.index)
    t1 = time.perf_counter()
    labels = cluster_labels(len(x), pairs)
    t2 = time.perf_counter()
    out = {"n": len(x), "dim": 512, "planted_groups": n_groups, "group_size": k, "threshold": a.threshold,
           "index": a.index if a.index != "auto" else ("join" if len(x) > 20_000 else "flat"),
           "range_search_s": round(t1 - t0, 2), "union_find_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
           **pairwise_precision_recall(labels, truth)}
    return emit(out, a.out)


if __name__ == "__main__":
    sys.exit(main())
