"""Training-time minibatch filters: a per-sample score, a threshold, weight 0 above it.

* `EntropyFilter` — Ren et al., "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models through
  Cross Attention" (ECCV 2024), training-time mitigation. The authors released no training code; this is our
  implementation of their description (docs/mitigations.md). For sample b at its random timestep t_b, with
  a_b = mean over heads and queries of the cross-attention probabilities of the chosen layer(s) (averaged over
  layers), taken from the training forward itself (no extra UNet pass):
        H_b = −Σ_k a_b[k] log a_b[k]            (77 positions, natural log)
  Memorized samples spread attention from BOS onto trigger tokens ⇒ higher H. Drop b when H_b > τ(bucket(t_b)).
* `MagnitudeFilter` — Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion Models"
  (ICLR 2024), `train_text_to_image.py --hard_threshold`: one extra no-grad forward with the empty prompt,
        M_b = ‖ε_θ(x_t, c_b) − ε_θ(x_t, ∅)‖₂     (flattened latent)
  drop b when M_b ≥ τ (README τ = 2 for SD v1.4 at 512 px; the norm grows with latent size, so calibrate).

Thresholds: fixed (`mode=fixed`), or the q-quantile of the score per timestep bucket (`mode=quantile`; the score
depends strongly on t), estimated over the first `warmup_steps` micro-steps from every rank's samples (gathered,
so all ranks use the same τ); nothing is dropped during warm-up. Samples whose caption was dropped (empty) are
never scored. Filtered ids go to `<run>/filtered/<name>_rank<r>.jsonl`, thresholds to `<run>/<name>_thresholds.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch

from guard_train.attention.processor import CrossAttnState, cross_attention_layers, install
from guard_train.config.params import ranged
from guard_train.models.prediction import epsilon_difference
from guard_train.training.hooks import Hooks, StepContext
from guard_train.training.mitigations.base import Mitigation, register


@dataclass
class FilterConfig(Mitigation):
    enabled: bool = ranged(False, doc="turn the filter on")
    mode: str = ranged("quantile", choices=("quantile", "fixed"),
                       doc="quantile: a threshold per timestep bucket calibrated over the warm-up; fixed: `threshold`")
    threshold: float = ranged(0.0, ge=0, doc="the score above which a sample is dropped (mode=fixed); scores are >= 0")
    quantile: float = ranged(0.95, gt=0, lt=1, doc="drop the top 1 − q of scores, per timestep bucket (mode=quantile)")
    buckets: int = ranged(10, ge=1, doc="timestep buckets of the calibrated threshold")
    warmup_steps: int = ranged(50, ge=1, doc="micro-steps of calibration, gathered over ranks (nothing dropped "
                                             "meanwhile)")


@register
@dataclass
class EntropyFilterConfig(FilterConfig):
    section: ClassVar[str] = "entropy_filter"
    summary: ClassVar[str] = ("Ren et al.'s minibatch filter: drop a sample whose cross-attention entropy (read from "
                              "the training forward itself) is above the threshold")
    arms: ClassVar[dict[str, dict[str, str]]] = {"entropy_filter": {"enabled": "true"}}
    layers: list[str] = ranged(factory=lambda: ["down_blocks.1.attentions.1.transformer_blocks.0.attn2"],
                               doc="cross-attention layers whose entropy is averaged (default: the analogue of SD's "
                                   "down_blocks.1.attentions.1, Ren et al.'s detection layer)")

    def build(self, hooks: Hooks, section_of) -> None:
        hooks.loss_weighting.append(EntropyFilter(self))


@register
@dataclass
class MagnitudeFilterConfig(FilterConfig):
    section: ClassVar[str] = "magnitude_filter"
    summary: ClassVar[str] = ("Wen et al.'s filter: drop a sample whose text-conditional noise-prediction magnitude "
                              "‖ε(x_t, c) − ε(x_t, ∅)‖ is above the threshold (one extra no-grad forward)")
    arms: ClassVar[dict[str, dict[str, str]]] = {"magnitude_filter": {"enabled": "true"}}
    buckets: int = ranged(1, ge=1, doc="timestep buckets of the calibrated threshold")

    def build(self, hooks: Hooks, section_of) -> None:
        hooks.loss_weighting.append(MagnitudeFilter(self))


class ThresholdFilter:
    name = "filter"

    def __init__(self, cfg: FilterConfig, num_train_timesteps: int = 1000):
        self.cfg, self.T = cfg, num_train_timesteps
        self.buf: list[tuple[np.ndarray, np.ndarray]] = []  # (bucket, score) during warm-up, this rank
        self.thr: Optional[np.ndarray] = np.full(cfg.buckets, cfg.threshold) if cfg.mode == "fixed" else None
        self.calls = 0

    def score(self, ctx: StepContext) -> torch.Tensor:  # (B,)
        raise NotImplementedError

    def _bucket(self, t: torch.Tensor) -> np.ndarray:
        return (t.cpu().numpy() * self.cfg.buckets // self.T).clip(0, self.cfg.buckets - 1)

    def _calibrate(self, acc) -> None:
        from accelerate.utils import gather_object

        parts = gather_object([self.buf]) if acc.num_processes > 1 else [self.buf]
        b = np.concatenate([x[0] for p in parts for x in p]) if any(parts) else np.zeros(0, int)
        s = np.concatenate([x[1] for p in parts for x in p]) if any(parts) else np.zeros(0)
        q = self.cfg.quantile
        overall = float(np.quantile(s, q)) if len(s) else float("inf")
        # a bucket with too few warm-up samples falls back to the overall quantile
        self.thr = np.array([float(np.quantile(s[b == k], q)) if (b == k).sum() >= 5 else overall
                             for k in range(self.cfg.buckets)])
        self.buf = []

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        sc = self.score(ctx).detach().float()
        scored = torch.tensor([c != "" for c in ctx.captions], device=sc.device)
        bucket = self._bucket(ctx.timesteps)
        self.calls += 1
        ctx.logs[f"{self.name}_score"] = float(sc[scored].mean()) if scored.any() else float("nan")
        if self.thr is None:
            keep = scored.cpu().numpy()
            self.buf.append((bucket[keep], sc.cpu().numpy()[keep]))
            if self.calls >= self.cfg.warmup_steps:
                self._calibrate(ctx.accelerator)
                self._write_thresholds(ctx)
            return torch.ones_like(sc)
        thr = torch.as_tensor(self.thr[bucket], dtype=sc.dtype, device=sc.device)
        drop = (sc > thr if isinstance(self, EntropyFilter) else sc >= thr) & scored
        ctx.logs[f"{self.name}_kept"] = float(1 - drop.float().mean())
        if drop.any() and ctx.run_dir is not None:
            d = Path(ctx.run_dir) / "filtered"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{self.name}_rank{ctx.accelerator.process_index}.jsonl", "a") as f:
                for i in drop.nonzero().flatten().tolist():
                    f.write(json.dumps({"step": ctx.step, "id": int(ctx.ids[i]), "t": int(ctx.timesteps[i]),
                                        "score": round(float(sc[i]), 5), "threshold": round(float(thr[i]), 5)}) + "\n")
        return (~drop).float()

    def _write_thresholds(self, ctx: StepContext) -> None:
        if ctx.accelerator.is_main_process and ctx.run_dir is not None:
            Path(ctx.run_dir).mkdir(parents=True, exist_ok=True)
            edges = [int(k * self.T / self.cfg.buckets) for k in range(self.cfg.buckets + 1)]
            (Path(ctx.run_dir) / f"{self.name}_thresholds.json").write_text(json.dumps(
                {"quantile": self.cfg.quantile, "bucket_edges_t": edges, "thresholds": self.thr.tolist(),
                 "calibrated_at_micro_step": self.calls}, indent=1))

    def state_dict(self) -> dict:
        """Plain lists only, so checkpoints load with torch.load(weights_only=True)."""
        return {"buf": [(b.tolist(), s.tolist()) for b, s in self.buf],
                "thr": None if self.thr is None else self.thr.tolist(), "calls": self.calls}

    def load_state_dict(self, d: dict) -> None:
        self.buf = [(np.asarray(b, dtype=np.int64), np.asarray(s, dtype=np.float64)) for b, s in d["buf"]]
        self.calls = d["calls"]
        self.thr = None if d["thr"] is None else np.asarray(d["thr"])


class EntropyFilter(ThresholdFilter):
    name = "entropy_filter"

    def __init__(self, cfg: EntropyFilterConfig, num_train_timesteps: int = 1000):
        super().__init__(cfg, num_train_timesteps)
        self.state: Optional[CrossAttnState] = None

    def setup(self, unet) -> None:
        layers = cross_attention_layers(unet)
        bad = [l for l in self.cfg.layers if l not in layers]
        if bad:
            raise ValueError(f"mitigation.entropy_filter.layers {bad} are not cross-attention layers of this UNet; "
                             f"choose from {layers}")
        self.state = install(unet, list(self.cfg.layers))
        self.state.capture = set(self.cfg.layers)

    def score(self, ctx: StepContext) -> torch.Tensor:
        return torch.stack([self.state.entropy[l] for l in self.cfg.layers]).mean(0)


class MagnitudeFilter(ThresholdFilter):
    name = "magnitude_filter"

    def score(self, ctx: StepContext) -> torch.Tensor:
        with torch.no_grad():
            empty = ctx.encode_text([""]).expand(len(ctx.captions), -1, -1)
            eps_u = ctx.unet(ctx.noisy_latents, ctx.timesteps, empty.to(ctx.encoder_hidden_states)).sample
        d = epsilon_difference(ctx.scheduler, ctx.pred.detach().float(), eps_u.float(), ctx.timesteps)
        return d.flatten(1).norm(dim=1)  # ε units, so v-prediction models (SD 2.x 768) get Wen's score too
