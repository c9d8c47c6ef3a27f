"""Weighted data order, sharded across ranks: duplicate-aware sampling and Somepalli et al.'s injection testbed.

* Duplicate-aware (our mitigation, following Somepalli et al.'s finding that duplicated images are the copied
  ones; no paper ships it as code): item i is drawn with probability
      p_i ∝ 1 / |cluster(i)|^α          (α = 1: every near-duplicate cluster is sampled like one image)
  with clusters from `guard-train dedup`.
* Injection (to *build* memorizing models on purpose; Somepalli et al., NeurIPS 2023, `datasets.py`): a seeded
  `fraction` (5 %) of items get weight `weight` (5), the rest 1.
Each epoch draws n = len(dataset) indices with replacement (the epoch length is kept) from a generator seeded by
(seed, epoch) — identical on every rank, so the global sequence is one permutation-like draw and rank r takes
positions r, r+W, … (disjoint). Accelerate never re-wraps it (the loop shards itself; see training/sampler.py).
"""

from __future__ import annotations

import numpy as np

from guard_train.training.sampler import EpochShardSampler


class WeightedEpochSampler(EpochShardSampler):
    def __init__(self, weights: np.ndarray, seed: int, rank: int, world: int, batch_size: int):
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("sampling weights must be >= 0 with a positive sum")
        super().__init__(len(w), seed, rank, world, batch_size)
        self.p = w / w.sum()

    def order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, 17]).choice(self.n, size=self.n, replace=True, p=self.p)


def duplicate_aware_weights(cluster_sizes: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    return 1.0 / np.asarray(cluster_sizes, dtype=np.float64) ** alpha


def injection_weights(n: int, fraction: float = 0.05, weight: float = 5.0, seed: int = 0) -> np.ndarray:
    w = np.ones(n)
    k = int(round(fraction * n))
    w[np.random.default_rng([seed, 5]).choice(n, size=k, replace=False)] = weight
    return w
