"""Training-time mitigations, assembled from `cfg.mitigation` into the loop's hooks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from guard_train.config.schema import Config
from guard_train.training.hooks import Hooks


def build_hooks(cfg: Config, hooks: Hooks | None = None) -> Hooks:
    """Filters → loss weighting; captions → caption/embedding transforms; dup-aware / injection → sampler."""
    from guard_train.training.mitigations.captions import gaussian_embedding_noise
    from guard_train.training.mitigations.filters import EntropyFilter, MagnitudeFilter

    h = hooks or Hooks()
    m = cfg.mitigation
    if m.entropy_filter.enabled:  # first: it reads the attention of the training forward itself
        h.loss_weighting.append(EntropyFilter(m.entropy_filter))
    if m.magnitude_filter.enabled:
        h.loss_weighting.append(MagnitudeFilter(m.magnitude_filter))
    if m.captions.mode != "none":
        h.caption_transforms.append(_LazyCaption(m.captions.mode, m.captions.p))
    if m.captions.gn_lambda > 0:
        h.embedding_transforms.append(gaussian_embedding_noise(m.captions.gn_lambda))
    if m.dup_sampling.enabled or m.injection.enabled:
        h.sampler_factory = WeightedSamplerFactory(cfg)
    e = cfg.eval
    if e.every_n_epochs or e.every_n_steps or e.at_end:
        from guard_train.callbacks.memorization import MemorizationCallback

        h.callbacks.append(MemorizationCallback(e))
    return h


class _LazyCaption:
    """Needs the tokenizer, which the trainer loads after the hooks are built."""

    def __init__(self, mode: str, p: float):
        self.mode, self.p, self.fn = mode, p, None

    def bind(self, tokenizer) -> None:
        from guard_train.training.mitigations.captions import caption_transform

        self.fn = caption_transform(self.mode, self.p, tokenizer)

    def __call__(self, caption, item_id, rng):
        return self.fn(caption, item_id, rng)


class WeightedSamplerFactory:
    """Builds the weighted sampler once the trainer knows the dataset (ids) and run dir."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self, n, seed, rank, world, bs, dataset=None, run_dir=None, accelerator=None):
        from guard_train.training.mitigations.sampling import (
            WeightedEpochSampler,
            duplicate_aware_weights,
            injection_weights,
        )

        m = self.cfg.mitigation
        if m.injection.enabled:
            w = injection_weights(n, m.injection.fraction, m.injection.weight, seed)
        else:
            sizes = self._cluster_sizes(dataset, run_dir, accelerator)
            w = duplicate_aware_weights(sizes, m.dup_sampling.alpha)
        if accelerator is None or accelerator.is_main_process:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            np.save(Path(run_dir) / "sampling_weights.npy", w)
        return WeightedEpochSampler(w, seed, rank, world, bs)

    def _cluster_sizes(self, dataset, run_dir, acc) -> np.ndarray:
        from guard_train.data.dedup import read_clusters

        d = self.cfg.mitigation.dup_sampling
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


def _dedup_dataset(dataset, d, out: Path) -> None:
    from guard_train.data.dedup import load_images_for_dedup, run_dedup
    from guard_train.data.loaders import ImageCaptionDataset, image_transform

    view = ImageCaptionDataset(len(dataset), dataset.get, image_transform(256, True, False))
    imgs, ids, caps, _ = load_images_for_dedup(view)
    res = run_dedup(imgs, ids, caps, d.backend, d.threshold, cache=out / "cache")
    res.write(out)
    (out / "dedup_summary.json").write_text(json.dumps(res.summary(), indent=1))
