"""The denoising loop every inference method shares (GUARD and all baselines).

Wraps a `StableDiffusionPipeline` (a tiny SD, an SD 1.x/2.x directory, + LoRA via `load_lora_weights`) without forking
it: its UNet, text encoder and VAE, and a diffusers scheduler built from the directory's config (DDIM, η 0 by default —
the papers' sampler — or any of `guidance.schedulers`; `model` keeps the directory's own). Per step the strategy names
its branches; the engine stacks every branch's rows (all prompts × images) into as few UNet calls as `max_batch` allows,
routes per-row attention edits through the shared cross-attention processor, hands the predictions to
`strategy.combine`, and steps the scheduler. Per-prompt seeds (seed + prompt index) as in the papers. With method `cfg`
it reproduces `StableDiffusionPipeline.__call__` for the same seed and settings (tests/test_engine.py). Recorded per
step and row: ‖ε_c − ε_u‖ (Wen's magnitude, in ε units whatever the model predicts; for GUARD the unmodified prompt's
branch), at every step where it is defined — a zero-terminal-SNR schedule's first step (ᾱ = 0, ε_c − ε_u ≡ 0) is not
recorded, so "first step" scores read its first informative one (models/prediction.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from guard_train.attention.processor import CrossAttnState, SpikeEdit, cross_attention_layers, end_token_mask, install
from guard_train.data.images import to_uint8
from guard_train.guidance.base import Branch, GenContext, Strategy
from guard_train.guidance.schedulers import DEFAULT as DEFAULT_SCHEDULER
from guard_train.guidance.schedulers import check_eta, make_scheduler, step_kwargs
from guard_train.guidance.strategies import get_strategy
from guard_train.models.loading import load_lora, load_pipeline
from guard_train.models.prediction import epsilon_defined, epsilon_difference
from guard_train.models.text import token_ids


@dataclass
class GenerationResult:
    images: np.ndarray  # (R, H, W, 3) uint8, rows ordered prompt-major
    records: list[dict]
    stats: dict = field(default_factory=dict)  # raw per-step recordings asked for with `record=`
    initial_latents: Optional[torch.Tensor] = None  # (R, C, h, w) the starting noise (before init_noise_sigma)
    latents: Optional[torch.Tensor] = None  # (R, C, h, w) the final latents, before decoding


class GuidanceEngine:
    def __init__(self, pipe, max_batch: int = 64, scheduler: str = DEFAULT_SCHEDULER, eta: float = 0.0,
                 device: Optional[str | torch.device] = None, dtype: Optional[torch.dtype] = None):
        """`device` / `dtype`: move the pipeline there first (None: leave it where it is — e.g. a trainer's
        in-memory pipeline on its accelerator's device)."""
        if device is not None or dtype is not None:
            pipe = pipe.to(device=device, dtype=dtype)
        self.pipe, self.max_batch = pipe, max_batch
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.scheduler = make_scheduler(scheduler, pipe.scheduler)  # the pipe's own is left as it is
        check_eta(self.scheduler, eta)
        self.eta = eta
        self.attn: Optional[CrossAttnState] = None
        self.record_mass: set[str] = set()  # layers whose token mass is captured on every call (detection)
        self.record_maps: set[str] = set()  # layers whose full maps are captured (Bright Ending's end-token mask)

    @classmethod
    def from_pretrained(cls, path: str, lora: Optional[str] = None, **kw) -> "GuidanceEngine":
        pipe = load_pipeline(path)
        if lora:
            load_lora(pipe, lora)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, **kw)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def layers(self) -> list[str]:
        return cross_attention_layers(self.unet)

    def clear_attention(self) -> None:
        """No edits, no captures: the UNet behaves exactly like the default (SDPA) until asked otherwise."""
        self.record_mass, self.record_maps = set(), set()
        if self.attn is not None:
            st = self.attn
            st.token_mask = st.token_logit_scale = st.spike = None
            st.capture, st.capture_maps, st.edit_layers = set(), set(), None
            st.reset()

    def start_recording(self, ctx: GenContext, record: tuple[str, ...] = ()) -> None:
        """Clear every edit and capture, then record what `record` asks for during the next `run` (see generate)."""
        self.clear_attention()
        if "attention" in record:
            self.record_mass = set(self.layers)
            ctx.stats["mass"] = []
        if "diff" in record:
            ctx.stats["diff"] = []
        if "end_maps" in record:
            self.record_maps = {l for l in self.layers if l.startswith("down_blocks.0.")}

    # -- text ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.text_encoder(token_ids(self.tokenizer, prompts, self.device))[0]
        lengths = torch.tensor([len(self.tokenizer(p, truncation=True, max_length=77).input_ids) for p in prompts])
        return emb, lengths

    # -- one UNet evaluation over all requested branches -----------------------------------------------------------
    def predict(self, latents: torch.Tensor, t, branches: dict[str, Branch],
                strategy: Strategy) -> dict[str, torch.Tensor]:
        R = latents.shape[0]
        names = list(branches)
        x = self.scheduler.scale_model_input(torch.cat([latents] * len(names)), t)
        emb = torch.cat([branches[n].embeds for n in names]).to(self.unet.dtype)
        edits = [branches[n].edit for n in names]
        use_attn = any(e is not None for e in edits) or strategy.needs_attention() or bool(self.record_mass)
        if use_attn and self.attn is None:
            self.attn = install(self.unet, "all")
        out, fired, maps, mass, heads = [], [], [], [], []
        for s in range(0, len(x), self.max_batch):
            sl = slice(s, min(s + self.max_batch, len(x)))
            if self.attn is not None:
                self._set_edits(edits, R, sl, strategy)
            out.append(self.unet(x[sl], t, emb[sl]).sample)
            if self.attn is not None:
                fired.append(dict(self.attn.spikes_fired))
                maps.append(dict(self.attn.maps))
                mass.append(dict(self.attn.mass))
                heads.append({k: (m, self.attn.head_entropy[k]) for k, m in self.attn.head_mass.items()})
        eps = torch.cat(out)
        # attention outputs of all chunks, concatenated per layer (rows in batch order)
        def cat(parts):
            return {k: torch.cat([p[k] for p in parts if k in p]) for k in (parts[0] if parts else {})}

        self.last_fired, self.last_maps, self.last_mass = cat(fired), cat(maps), cat(mass)
        self.last_heads = {k: tuple(torch.cat([p[k][j] for p in heads if k in p]) for j in (0, 1))
                           for k in (heads[0] if heads else {})}  # layer -> ((B, H, T) mass, (B, H) entropy)
        self.last_names = names
        return {n: eps[k * R : (k + 1) * R] for k, n in enumerate(names)}

    def _set_edits(self, edits, R: int, sl: slice, strategy: Strategy) -> None:
        st = self.attn
        st.reset()
        st.edit_layers = strategy.edit_layers
        st.capture_maps = set(strategy.capture_maps) | set(self.record_maps)
        st.capture = set(self.record_mass) | set(strategy.capture_mass)
        st.capture_heads = set(strategy.capture_heads)
        T = self.tokenizer.model_max_length
        mask = torch.ones(len(edits) * R, T, dtype=torch.bool)
        scale = torch.ones(len(edits) * R, T)
        spike_rows = torch.zeros(len(edits) * R, dtype=torch.bool)
        has_mask = has_scale = False
        spike, heads = None, {}
        for k, e in enumerate(edits):
            if e is None:
                continue
            r = slice(k * R, (k + 1) * R)
            if e.token_mask is not None:
                mask[r], has_mask = e.token_mask, True
            if e.token_logit_scale is not None:
                scale[r], has_scale = e.token_logit_scale, True
            if e.spike is not None:  # one spike setting per step (tau, scale, penalty); head masks per branch
                spike_rows[r], spike = True, e.spike
                for layer, m in (e.spike.heads or {}).items():
                    heads.setdefault(layer, torch.ones(len(edits) * R, m.shape[1], dtype=torch.bool))[r] = m
        st.token_mask = mask[sl] if has_mask else None
        st.token_logit_scale = scale[sl] if has_scale else None
        st.spike = None if spike is None else SpikeEdit(
            spike_rows[sl], spike.tau, spike.scale, spike.penalty, {k: m[sl] for k, m in heads.items()} or None)

    # -- the loop ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, ctx: GenContext, strategy: Strategy, latents: Optional[torch.Tensor] = None,
            progress: bool = False, stop: Optional[int] = None, record: bool = True) -> torch.Tensor:
        """Denoise from ctx.latents0 (or `latents`) with `strategy`; returns the latents after `stop` steps (all by
        default). Probe and pre-passes (Jain's probe, Bright Ending's baseline, Wen's steps to its target) call this
        with record=False, so their predictions do not enter the detection statistics or the spike counts; the
        last step's captured maps are still kept in ctx.state["last_maps"] (Bright Ending reads its mask there)."""
        self.scheduler.set_timesteps(ctx.steps, device=self.device)
        x = (ctx.latents0 if latents is None else latents).clone()
        timesteps = self.scheduler.timesteps[:stop]
        extra = step_kwargs(self.scheduler, self.eta, ctx.state["seeds"][0])  # a stochastic step repeats exactly
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc=strategy.name)):
            eps = self.predict(x, t, strategy.branches(i, int(t), ctx), strategy)
            if record:
                self._record(eps, ctx, t, strategy.own_branch)
            if record and self.attn is not None and self.last_fired:
                ctx.state.setdefault("spikes_per_step", []).append(self.last_fired)
            if self.attn is not None and self.last_maps:
                ctx.state["last_maps"] = (self.last_names, self.last_maps)  # only the last step's are kept
            x = self.scheduler.step(strategy.combine(eps, i, int(t), ctx), t, x, **extra).prev_sample
        return x

    def _record(self, eps: dict[str, torch.Tensor], ctx: GenContext, t, key: str) -> None:
        c = eps.get(key)
        if c is not None and "uncond" in eps and epsilon_defined(self.scheduler, t):
            d = epsilon_difference(self.scheduler, c, eps["uncond"], t)  # ε units on v-prediction models too
            ctx.stats["magnitude"].append(d.flatten(1).norm(dim=1).float().cpu())
            if "diff" in ctx.stats:
                ctx.stats["diff"].append(d.float().cpu())
        # the own branch's rows' token mass, layers in execution order
        if "mass" in ctx.stats and self.last_mass and key in self.last_names:
            R, k = ctx.rows, self.last_names.index(key)
            ctx.stats["mass"].append(torch.stack([self.last_mass[l][k * R : (k + 1) * R] for l in self.layers
                                                  if l in self.last_mass]).cpu())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.vae.decode(latents / self.vae.config.scaling_factor).sample)

    def generate(self, prompts: list[str] | str, method: str = "cfg", num_images: int = 1, seed: int = 0,
                 steps: int = 50, height: Optional[int] = None, width: Optional[int] = None,
                 progress: bool = False, record: tuple[str, ...] = (), seeds: Optional[list[int]] = None,
                 latents: Optional[torch.Tensor] = None, **params) -> GenerationResult:
        """record: any of "attention" (cond-row token mass per step and layer), "diff" (ε_c − ε_u per step),
        "end_maps" (last-step maps of the down_blocks.0 layers, for Bright Ending's mask).
        seeds: one seed per prompt (default seed + prompt index), so a prompt's images do not depend on which
        other prompts share the call (e.g. when prompts are split across processes).
        latents: the starting noise, (prompts × num_images, C, h, w) in prompt-major row order, instead of the
        seeded draw (as diffusers' `latents=`: scaled by the scheduler's init_noise_sigma) — e.g. one noise bank
        shared by every method. The result carries the starting noise and the final latents either way."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        strategy = get_strategy(method, **params)
        t0 = time.time()
        rows = [p for p in prompts for _ in range(num_images)]
        pidx = [k for k in range(len(prompts)) for _ in range(num_images)]
        seeds = list(seeds) if seeds is not None else [seed + k for k in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError("seeds must have one entry per prompt")
        ctx = self._context(rows, pidx, prompts, num_images, seeds, steps, height, width, latents)
        ctx.state["seed"] = seed
        self.start_recording(ctx, record)
        try:
            strategy.prepare(ctx)
            x = self.run(ctx, strategy, progress=progress)
        finally:
            self.clear_attention()
        images = self.decode(x)
        wall = time.time() - t0
        mag = torch.stack(ctx.stats["magnitude"], 1) if ctx.stats["magnitude"] else None  # (R, steps)
        records = []
        for r in range(len(rows)):
            rec = {"prompt": prompts[pidx[r]], "prompt_index": pidx[r], "image_index": r % num_images,
                   "seed": seeds[pidx[r]], "method": strategy.name, "params": vars(strategy.p), "steps": steps,
                   "wall_s_batch": round(wall, 3)}
            if mag is not None:
                rec["magnitude_first_step"] = float(mag[r, 0])
                rec["magnitude_mean"] = float(mag[r].mean())
            rec.update(strategy_record(ctx, r))
            records.append(rec)
        stats = {"magnitude": mag, "lengths": ctx.lengths}
        if ctx.stats.get("mass"):
            stats["mass"] = torch.stack(ctx.stats["mass"])  # (steps, layers, R, T)
        if ctx.stats.get("diff"):
            stats["diff"] = torch.stack(ctx.stats["diff"])  # (steps, R, C, h, w)
        if "last_maps" in ctx.state and "end_maps" in record:
            names, maps = ctx.state["last_maps"]

            k = names.index(strategy.own_branch)
            sel = {l: m for l, m in maps.items() if l.startswith("down_blocks.0.")}
            stats["end_mask"] = end_token_mask(sel, slice(k * ctx.rows, (k + 1) * ctx.rows), ctx.lengths,
                                               tuple(x.shape[-2:]))
        return GenerationResult(images, records, stats, initial_latents=ctx.state["noise"].cpu(), latents=x.cpu())

    def _context(self, rows, pidx, prompts, n, seeds, steps, height, width, latents=None) -> GenContext:
        h = height or self.unet.config.sample_size * self.pipe.vae_scale_factor
        w = width or self.unet.config.sample_size * self.pipe.vae_scale_factor
        shape = (n, self.unet.config.in_channels, h // self.pipe.vae_scale_factor, w // self.pipe.vae_scale_factor)
        if isinstance(seeds, int):
            seeds = [seeds + k for k in range(len(prompts))]
        if latents is None:
            noise = torch.cat([randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(sd), device=self.device,
                                            dtype=self.unet.dtype) for sd in seeds])
        else:
            want = (len(rows), *shape[1:])
            if tuple(latents.shape) != want:
                raise ValueError(f"latents must have shape {want} (prompts × images, channels, h, w), "
                                 f"got {tuple(latents.shape)}")
            noise = latents.to(self.device, self.unet.dtype)
        latents0 = noise * self.scheduler.init_noise_sigma
        cond, lengths = self.encode(rows)
        uncond, _ = self.encode([""] * len(rows))
        self.scheduler.set_timesteps(steps, device=self.device)
        ctx = GenContext(self, rows, pidx, cond, uncond, lengths, latents0, self.scheduler.timesteps.clone(), steps,
                         state={"seed": seeds[0], "seeds": seeds, "prompt_list": prompts, "images_per_prompt": n})
        ctx.state["noise"] = noise
        return ctx


def strategy_record(ctx: GenContext, r: int) -> dict:
    out = {}
    fired = ctx.state.get("spikes_per_step", [])
    if fired:  # GUARD: attenuated positions per (sample, head) of this row, mean over steps and edited layers
        out["spikes_fired_mean"] = float(np.mean([float(torch.stack([v[r] for v in f.values()]).mean())
                                                  for f in fired]))
    for k in ("transition_step", "opt_step", "opt_iterations", "opt_loss"):
        if k in ctx.state:
            v = ctx.state[k]
            out[k] = v[r].item() if torch.is_tensor(v) else v[r] if isinstance(v, list) else v
    return out

