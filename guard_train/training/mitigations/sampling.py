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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from guard_train.config.params import ranged
from guard_train.data.dedup import dedup_dataset, read_clusters
from guard_train.data.loaders import ImageCaptionDataset, image_transform
from guard_train.training.hooks import Hooks
from guard_train.training.mitigations.base import Mitigation, register
from guard_train.training.sampler import EpochShardSampler


@register
@dataclass
class DupSamplingConfig(Mitigation):
    section: ClassVar[str] = "dup_sampling"
    summary: ClassVar[str] = ("duplicate-aware sampling: draw item i with probability ∝ 1/|cluster(i)|^α, clusters "
                              "from near-duplicate detection (`guard-train dedup`, or run at the start)")
    arms: ClassVar[dict[str, dict[str, str]]] = {"dup_sampling": {"enabled": "true"}}
    sets_sampler: ClassVar[bool] = True
    enabled: bool = ranged(False, doc="turn duplicate-aware sampling on")
    clusters: str = ranged("", doc="clusters.jsonl from `guard-train dedup`; empty: run dedup on the training data "
                                   "at the start (main process; written to <run>/dedup/)")
    alpha: float = ranged(1.0, ge=0, doc="weight 1/|cluster|^α (1: every near-duplicate cluster is drawn like one "
                                         "image; 0: uniform)")
    backend: str = ranged("sscd", doc="dedup embedding: sscd | phash | sscd-torchscript:<path>")
    threshold: float = ranged(0.0, ge=0, doc="dedup threshold; 0: the backend's default (SSCD cosine 0.6, pHash 8 "
                                             "bits)")
    group_by: str = ranged("image", choices=("image", "caption", "both"),
                           doc="what makes a group: near-duplicate images, identical captions, or the larger of both")

    def build(self, hooks: Hooks, section_of) -> None:
        hooks.sampler_factory = DupAwareSamplerFactory(self)

    def check(self, section_of) -> None:
        if self.clusters and not Path(self.clusters).is_file():
            raise ValueError(f"mitigation.dup_sampling.clusters {self.clusters!r} does not exist: run "
                             f"`guard-train dedup` first or leave it empty")


@register
@dataclass
class InjectionConfig(Mitigation):
    """Somepalli et al.'s duplication testbed: makes a memorizing model on purpose (not a mitigation arm)."""

    section: ClassVar[str] = "injection"
    summary: ClassVar[str] = ("Somepalli et al.'s duplication testbed (the opposite of a mitigation): a seeded "
                              "fraction of items drawn `weight` times as often, to make a memorizing model on purpose")
    sets_sampler: ClassVar[bool] = True
    enabled: bool = ranged(False, doc="turn the injection testbed on")
    fraction: float = ranged(0.05, gt=0, lt=1, doc="share of items up-weighted")
    weight: float = ranged(5.0, gt=0, doc="their sampling weight (the rest 1)")

    def build(self, hooks: Hooks, section_of) -> None:
        hooks.sampler_factory = InjectionSamplerFactory(self)


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


class _WeightedSamplerFactory:
    """Builds the weighted sampler once the trainer knows the dataset (ids) and run dir; the weights are saved in
    the run dir (`sampling_weights.npy`)."""

    def weights(self, n: int, seed: int, dataset, run_dir, accelerator) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, n, seed, rank, world, bs, dataset=None, run_dir=None, accelerator=None):
        w = self.weights(n, seed, dataset, run_dir, accelerator)
        if accelerator is None or accelerator.is_main_process:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            np.save(Path(run_dir) / "sampling_weights.npy", w)
        return WeightedEpochSampler(w, seed, rank, world, bs)


class InjectionSamplerFactory(_WeightedSamplerFactory):
    def __init__(self, cfg: InjectionConfig):
        self.cfg = cfg

    def weights(self, n, seed, dataset, run_dir, accelerator) -> np.ndarray:
        return injection_weights(n, self.cfg.fraction, self.cfg.weight, seed)


class DupAwareSamplerFactory(_WeightedSamplerFactory):
    def __init__(self, cfg: DupSamplingConfig):
        self.cfg = cfg

    def weights(self, n, seed, dataset, run_dir, accelerator) -> np.ndarray:
        return duplicate_aware_weights(self._cluster_sizes(dataset, run_dir, accelerator), self.cfg.alpha)

    def _cluster_sizes(self, dataset, run_dir, acc) -> np.ndarray:
        d = self.cfg
        path = Path(d.clusters) if d.clusters else Path(run_dir) / "dedup" / "clusters.jsonl"
        if not d.clusters:
            with acc.main_process_first():
                if acc.is_main_process and not path.exists():
                    _dedup_dataset(dataset, d, path.parent)
        rows = read_clusters(path)
        ids = dataset.item_ids()
        missing = [i for i in ids if i not in rows]
        if missing:
            raise ValueError(f"{len(missing)} dataset ids (e.g. {missing[:3]}) are not in {path}; re-run dedup")
        key = {"image": ["cluster_size"], "caption": ["caption_group_size"],
               "both": ["cluster_size", "caption_group_size"]}[d.group_by]
        return np.array([max(rows[i][k] for k in key) for i in ids], dtype=np.float64)


def _dedup_dataset(dataset, d: DupSamplingConfig, out: Path) -> None:
    view = ImageCaptionDataset(len(dataset), dataset.get, image_transform(256, True, False), ids=dataset.item_ids)
    res, _ = dedup_dataset(view, d.backend, d.threshold, cache=out / "cache")
    res.write(out)
    (out / "dedup_summary.json").write_text(json.dumps(res.summary(), indent=1))
