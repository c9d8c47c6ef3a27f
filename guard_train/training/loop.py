"""The fine-tuning loop: Accelerate, any SD 1.x/2.x UNet, LoRA or full, with hooks for mitigations.

Shape of one optimizer step (nanoGPT-style, everything visible here):
  images → VAE latents (optionally cached) → noise (per-rank generator) at random t → UNet(x_t, t, text(c))
  → per-sample loss (ε or v target, optional min-SNR) → × hook weights (0 drops a sample) → normalised mean
  → backward → clip → optimizer / LR scheduler step.
The VAE and text encoder are frozen (as SD fine-tuning does). The data order is a seeded per-epoch permutation
sharded across ranks (training/sampler.py); per-rank seeds drive noise, timesteps and caption dropout.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from guard_train.config.loader import ConfigError, resolve_model_path
from guard_train.config.paths import PathError, check_replaceable, has_content, mark_ours
from guard_train.config.schema import Config
from guard_train.data import loaders
from guard_train.models.loading import load_components, read_lora
from guard_train.models.text import token_ids
from guard_train.training import checkpoint as ckpt
from guard_train.training import fsdp
from guard_train.training.hooks import Hooks, StepContext, TrainState
from guard_train.training.losses import diffusion_target, loss_weights, sample_timesteps, timestep_weights
from guard_train.training.mitigations import build_hooks
from guard_train.training.sampler import EpochShardSampler
from guard_train.training.status import describe_failure, write_status

# ---------------------------------------------------------------------------------------------------------------
# run directory


def resolve_run_dir(cfg: Config, acc) -> tuple[Path, Optional[Path]]:
    """(run_dir, checkpoint to resume from). Decided on rank 0 and broadcast, so all ranks agree."""
    decision: list[Any] = [None]
    if acc.is_main_process:
        try:
            decision[0] = _decide_run_dir(cfg)
        except ConfigError as e:
            decision[0] = e
    decision = broadcast_object_list(decision) if acc.num_processes > 1 else decision
    if isinstance(decision[0], ConfigError):
        raise decision[0]
    run_dir, resume = decision[0]
    return Path(run_dir), (Path(resume) if resume else None)


def _decide_run_dir(cfg: Config) -> tuple[str, Optional[str]]:
    out = Path(cfg.run.output_dir)
    if cfg.run.resume not in ("", "latest"):
        c = Path(cfg.run.resume)
        if not (c / ckpt.MARKER).exists():
            raise ConfigError(f"run.resume {str(c)!r} is not a complete checkpoint (no {ckpt.MARKER} marker)")
        why = ckpt.damaged(c)
        if why:
            raise ConfigError(f"run.resume {str(c)!r} is damaged ({why}); resume from another checkpoint-N")
        return str(c.parent.parent), str(c)
    if cfg.run.resume == "latest" and not cfg.run.name:
        runs = sorted((p for p in out.glob(f"{cfg.recipe}-*") if ckpt.latest_checkpoint(p)), key=lambda p: p.name)
        if runs:
            return str(runs[-1]), str(_loadable_checkpoint(runs[-1]))
    name = cfg.run.name or f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = out / name
    if cfg.run.resume == "latest":
        last = _loadable_checkpoint(run_dir)
        return str(run_dir), (str(last) if last else None)
    try:  # never delete (or write into) a directory a run of ours did not create: run.overwrite cannot either
        check_replaceable(run_dir, "output directory")
    except PathError as e:
        raise ConfigError(str(e)) from None
    if has_content(run_dir):
        if not cfg.run.overwrite:
            raise ConfigError(
                f"output directory {str(run_dir)!r} already holds a run. Pass resume=latest to continue it, "
                f"run.overwrite=true to replace it, or another run.name."
            )
        shutil.rmtree(run_dir)
    return str(run_dir), None


def _loadable_checkpoint(run_dir: Path) -> Optional[Path]:
    """resume=latest: the newest complete checkpoint whose files are intact. A damaged newer one (a truncated or
    zero-byte file) is skipped with a warning; when every complete checkpoint is damaged, exit 2 naming the file."""
    last, skipped = ckpt.latest_loadable(run_dir)
    if skipped and last is None:
        raise ConfigError(f"no checkpoint of {str(run_dir)!r} can be resumed: {'; '.join(skipped)}. Restore the "
                          f"file, or start over with run.overwrite=true or another run.name")
    for why in skipped:
        print(f"warning: skipping a damaged checkpoint ({why}); resuming from the previous complete one, {last}",
              file=sys.stderr)
    return last


# ---------------------------------------------------------------------------------------------------------------
# data


def make_dataset(cfg: Config, run_dir: Path, acc: Accelerator) -> tuple[loaders.ImageCaptionDataset, Optional[Path]]:
    """Returns (dataset, generated root or None). A generated dataset (the lab) is written as an imagefolder with
    its manifest once (rank 0) and read back."""
    d = cfg.data
    tf = loaders.image_transform(d.resolution, d.center_crop, d.random_flip)
    if d.streaming:
        if d.num_workers:
            raise ConfigError("data.streaming needs data.num_workers=0 (each worker would re-read the whole shard)")
        if not cfg.train.max_steps:
            raise ConfigError("data.streaming needs train.max_steps (a stream has no known epoch length)")
        ds = loaders.StreamingImageCaptionDataset(d.source, d.path, d.image_column, d.caption_column, d.id_column, tf,
                                                  cfg.train.seed, acc.process_index, acc.num_processes)
        return ds, None
    if d.generated():
        root = run_dir / "data"
        with acc.main_process_first():
            if acc.is_main_process and not (root / "manifest.jsonl").exists():
                mark_ours(run_dir)
                d.write(root)
        return loaders.build_dataset("imagefolder", str(root), "image", "text", "id", tf, cfg.train.seed), root
    ds = loaders.build_dataset(d.source, d.path, d.image_column, d.caption_column, d.id_column, tf,
                               cfg.train.seed, d.max_samples)
    return ds, None


# ---------------------------------------------------------------------------------------------------------------


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "checkpoint saved, requeue me" (resume with resume=latest)


class Preempted(Exception):
    """SIGTERM/SIGINT was received: every rank saved a checkpoint and stops."""


class NonFiniteError(RuntimeError):
    pass


def weighted_loss(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·ℓ / Σ w: a dropped sample (w = 0) contributes no gradient, and the mean is over the kept ones."""
    return (per_sample * weights).sum() / weights.sum().clamp(min=1e-8)


class Trainer:
    def __init__(self, cfg: Config, hooks: Optional[Hooks] = None):
        self.cfg, self.hooks = cfg, build_hooks(cfg.mitigation, hooks)
        if cfg.eval.wants_callback() and not any(getattr(cb, "measures_memorization", False)
                                                 for cb in self.hooks.callbacks):
            raise ConfigError("eval.every_n_epochs / every_n_steps / at_end ask for the memorization callback, "
                              "which these hooks lack: build them with guard_train.callbacks.build_callbacks(cfg) (as "
                              "the CLI and guard_train.train do), or set eval.every_n_steps=0 eval.every_n_epochs=0 "
                              "eval.at_end=false")
        t = cfg.train
        self.fsdp = t.fsdp
        if t.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
        # The process group comes up first (PartialState) so that rank 0 can pick the run directory and share it;
        # the Accelerator, whose trackers need that directory, is built after.
        from datetime import timedelta

        from accelerate import PartialState

        # `--cpu` launches give 1 process (see configs); the timeout bounds a collective whose peer died or hangs
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=cfg.run.collective_timeout_s))
        self.run_dir, self.resume_from = resolve_run_dir(cfg, state)
        self.acc = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            log_with=None if cfg.run.report_to == "none" else cfg.run.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.bad: dict[int, str] = {}  # item id -> its first error: an item broken every epoch counts once
        self.metrics: dict[str, float] = {}
        self._signal, self._preempt, self._nonfinite_run = None, False, 0  # micro_step() works after setup() alone
        self._status_ready = False

    # -- setup ---------------------------------------------------------------------------------------------------
    def _setup_model(self) -> None:
        cfg, t, acc = self.cfg, self.cfg.train, self.acc
        c = load_components(resolve_model_path(cfg.model.path), cfg.model.revision, cfg.model.variant)
        self.tokenizer, self.noise_scheduler, self.model_path = c.tokenizer, c.noise_scheduler, c.path
        kind = self.noise_scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ConfigError(f"{cfg.model.path}: scheduler prediction_type {kind!r} cannot be fine-tuned here; "
                              "use an epsilon or v_prediction model")
        if t.v_weight_cap and kind != "epsilon":
            raise ConfigError(f"train.v_weight_cap weighs an ε-loss as a v-loss, but {cfg.model.path} is a {kind} "
                              "model whose loss already has that weight: drop train.v_weight_cap")
        for tf in self.hooks.caption_transforms:
            if hasattr(tf, "bind"):
                tf.bind(self.tokenizer)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        self.vae, self.text_encoder, unet = c.vae, c.text_encoder, c.unet
        for m in (self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.eval()
            m.to(acc.device, dtype=self.weight_dtype)
        if t.mode == "lora":
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.to(acc.device, dtype=self.weight_dtype)
            unet.add_adapter(LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, init_lora_weights="gaussian",
                                        target_modules=list(t.lora_targets)))
            for p in unet.parameters():  # LoRA params train in fp32 even under mixed precision
                if p.requires_grad:
                    p.data = p.data.float()
            if t.init_lora:  # continue an existing LoRA (e.g. the committed memorizing one) with a fresh optimizer
                self._set_lora(unet, t.init_lora)
        else:
            unet.requires_grad_(True)
            unet.to(acc.device)
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        for fn in self.hooks.setup:
            fn(unet)
        for h in self.hooks.loss_weighting:
            if hasattr(h, "setup"):
                h.setup(unet)
        if self.fsdp:  # sharded by the loop itself (training/fsdp.py): parameters become DTensor shards
            fsdp.shard_unet(unet)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        if t.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes==0.50.2")
            opt_cls = bnb.optim.AdamW8bit
        else:
            opt_cls = torch.optim.AdamW
        opt = opt_cls(self.params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                      weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
        from diffusers.optimization import get_scheduler

        # The prepared scheduler steps once per process per optimizer step (diffusers PR #8312), hence × world.
        sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=t.lr_warmup_steps * self.world,
                              num_training_steps=self.max_steps * self.world)
        if self.fsdp:  # FSDP syncs gradients itself (no DDP wrap) and its optimizer state is checkpointed by us
            self.unet, self.optimizer = unet, opt
            self.lr_scheduler = acc.prepare_scheduler(sched)
        else:
            self.unet, self.optimizer, self.lr_scheduler = acc.prepare(unet, opt, sched)
        self.ema = None
        if t.ema:
            from diffusers.training_utils import EMAModel

            # saved by us (ema.pt, tensors + numbers, loaded weights_only), not register_for_checkpointing, whose
            # custom_checkpoint_*.pkl accelerate unpickles with weights_only=False
            self.ema = EMAModel(self.params, decay=t.ema_decay)
        if t.mode == "lora":
            acc.register_save_state_pre_hook(self._save_lora_hook)
            acc.register_load_state_pre_hook(self._load_lora_hook)

    def _lora_state(self) -> dict:
        """PEFT keys (lora_A/lora_B) for every target. Not diffusers' convert_state_dict_to_diffusers: it renames only
        attention projections (to lora.down/up), and a file mixing both formats loses its attention layers in
        `pipe.load_lora_weights`, which picks the format from one key."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.acc.unwrap_model(self.unet))

    def _save_lora_hook(self, models, weights, output_dir):  # only LoRA tensors, not the whole UNet
        from diffusers import StableDiffusionPipeline

        if self.acc.is_main_process:
            StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=self._lora_state(),
                                                      safe_serialization=True)
        while weights:
            weights.pop()

    def _load_lora_hook(self, models, input_dir):
        while models:
            models.pop()
        self._set_lora(self.acc.unwrap_model(self.unet), input_dir)

    @staticmethod
    def _set_lora(unet, path) -> None:
        """Load LoRA weights (a dir with pytorch_lora_weights.safetensors, or the file) into the adapter in place."""
        from peft.utils import set_peft_model_state_dict

        sd, _, _ = read_lora(str(path))  # the same key handling as inference's load_lora
        try:
            res = set_peft_model_state_dict(unet, sd, adapter_name="default")
        except RuntimeError as e:  # a size mismatch: another rank
            raise ConfigError(f"LoRA {path} does not fit this adapter ({str(e).splitlines()[-1].strip()}): set "
                              "train.lora_rank / lora_targets to the ones it was trained with") from None
        if getattr(res, "unexpected_keys", None):
            raise ConfigError(f"LoRA {path} has keys this adapter does not have ({res.unexpected_keys[:3]} ...): "
                              "set train.lora_targets / lora_rank to the ones it was trained with")

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        acc = self.acc
        tmp = ckpt.tmp_dir(self.run_dir, self.step)
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.fsdp:
            fsdp.save(self.unet, self.optimizer, tmp / "fsdp")
        torch.save({"gen": self.gen.get_state(), "vae_gen": self.vae_gen.get_state(),
                    "np": self.np_rng.bit_generator.state, "items": self.items_done,
                    "loss_hooks": [h.state_dict() if hasattr(h, "state_dict") else None
                                   for h in self.hooks.loss_weighting]},
                   tmp / f"rank_state_{self.rank}.pt")
        if self.ema is not None and acc.is_main_process:  # identical on every rank: one copy
            torch.save(self.ema.state_dict(), tmp / "ema.pt")
        bad = self._gather_bad()
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": self.step, "epoch": self.epoch, "bad_items": bad, "metrics": self.metrics,
                     "world": self.world, "hooks": [cb.state_dict() for cb in self.hooks.callbacks]}
            ckpt.finalize(self.run_dir, self.step, state, self.cfg.train.checkpoints_total_limit)
        acc.wait_for_everyone()
        self._status("running", checkpoint=str(ckpt.latest_checkpoint(self.run_dir)))

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "training_state.json").read_text())
        if state["world"] != self.world:
            raise ConfigError(f"checkpoint {path} was written by {state['world']} processes; resume it with the "
                              f"same number of processes (got {self.world})")
        import pickle

        from safetensors import SafetensorError

        try:  # every file is loaded weights_only (accelerate's too): a tampered pickle is refused, never run
            self.acc.load_state(str(path))
            if self.fsdp:
                fsdp.load(self.unet, self.optimizer, path / "fsdp")
            from accelerate.utils import load as acc_load

            # accelerate swallows a failed RNG-state load (resume would silently stop being exact): check it here
            acc_load(path / f"random_states_{self.rank}.pkl")
            rs = torch.load(path / f"rank_state_{self.rank}.pt", weights_only=True)  # tensors and plain data only
            if self.ema is not None:
                self.ema.load_state_dict(torch.load(path / "ema.pt", weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, EOFError, FileNotFoundError, SafetensorError, ValueError) as e:
            raise ConfigError(
                f"checkpoint {path} could not be loaded safely: {str(e).splitlines()[0][:300]}. A file in it is "
                f"missing, corrupted or holds more than tensors (refused: loading it could run code). Resume from "
                f"another checkpoint with resume=<path to checkpoint-N>, or start over with run.overwrite=true."
            ) from None
        self.gen.set_state(rs["gen"])
        self.vae_gen.set_state(rs["vae_gen"])
        self.np_rng.bit_generator.state = rs["np"]
        self.items_done = rs["items"]
        for h, st in zip(self.hooks.loss_weighting, rs.get("loss_hooks", [])):
            if st is not None:
                h.load_state_dict(st)
        self.step, self.epoch = state["step"], state["epoch"]
        self.bad = {int(i): e for i, e in state["bad_items"]} if self.acc.is_main_process else {}
        for cb, st in zip(self.hooks.callbacks, state.get("hooks", [])):
            cb.load_state_dict(st)

    def _gather_bad(self) -> list[list]:
        """[id, error] of every bad item seen by any rank, once each (a collective when world > 1)."""
        merged: dict[int, str] = {}
        for part in gather_object([self.bad]) if self.world > 1 else [self.bad]:
            for i, e in part.items():
                merged.setdefault(i, e)
        return [[i, merged[i]] for i in sorted(merged)]

    # -- one micro-batch -----------------------------------------------------------------------------------------
    def _latents(self, batch: dict) -> torch.Tensor:
        """VAE latents. Posterior sampling uses its own streams (never the training-noise generator), so a resumed
        run — whose latent cache starts empty — draws exactly the same noise as an uninterrupted one."""
        px = batch["pixel_values"].to(self.acc.device, dtype=self.weight_dtype)
        sf = self.vae.config.scaling_factor
        if not self.cfg.train.cache_latents:
            with torch.no_grad():
                return self.vae.encode(px).latent_dist.sample(self.vae_gen) * sf
        ids = batch["ids"].tolist()
        missing = [i for i, k in enumerate(ids) if k not in self.latent_cache]
        if missing:
            with torch.no_grad():
                dist = self.vae.encode(px[missing]).latent_dist
            for j, i in enumerate(missing):  # one posterior sample per item, seeded by (seed, item id)
                g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + ids[i])
                eps = torch.randn(dist.mean[j].shape, generator=g).to(dist.mean)
                self.latent_cache[ids[i]] = (dist.mean[j] + dist.std[j] * eps) * sf
        return torch.stack([self.latent_cache[k] for k in ids])

    def _captions(self, caps: list, ids: list[int]) -> list[str]:
        out = []
        for c, i in zip(caps, ids):
            if isinstance(c, (list, tuple)):  # several captions per image: pick one (Somepalli's MC)
                c = c[int(self.np_rng.integers(len(c)))]
            for tf in self.hooks.caption_transforms:
                c = tf(c, i, self.np_rng)
            out.append("" if self.np_rng.random() < self.cfg.data.caption_dropout else c)
        return out

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        t, acc = self.cfg.train, self.acc
        latents = self._latents(batch)
        noise = torch.randn(latents.shape, generator=self.gen).to(latents.device, latents.dtype)
        if t.noise_offset:
            noise += t.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=self.gen).to(noise)
        bsz = latents.shape[0]
        timesteps = sample_timesteps(bsz, self.noise_scheduler.config.num_train_timesteps, self.gen, self.t_weights)
        timesteps = timesteps.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        captions = self._captions(batch["captions"], batch["ids"].tolist())
        with torch.no_grad():
            enc = self.text_encoder(token_ids(self.tokenizer, captions, acc.device))[0]
        for tf in self.hooks.embedding_transforms:
            enc = tf(enc, self.gen)
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, enc).sample
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        if t.snr_gamma or t.v_weight_cap:
            per = per * loss_weights(self.noise_scheduler, timesteps, t.snr_gamma, t.v_weight_cap).to(per)
        ctx = StepContext(acc, self.step, batch["ids"], captions, timesteps, noisy, enc, per, self.unet, pred=pred,
                          encode_text=self.encode_text, run_dir=self.run_dir, scheduler=self.noise_scheduler)
        w = torch.ones_like(per.detach())
        for hook in self.hooks.loss_weighting:
            w = w * hook(ctx).to(w)
        self._kept = int(w.gt(0).sum())
        loss = weighted_loss(per, w)
        return loss, {"loss": per.detach().mean().item(), "kept": float(w.gt(0).float().mean()), **ctx.logs}

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder(token_ids(self.tokenizer, captions, self.acc.device))[0]

    def _empty_loss(self) -> torch.Tensor:
        # A rank whose micro-batch had no decodable image still joins the gradient all-reduce, with zero grads.
        return sum(p.sum() for p in self.params) * 0.0

    # -- main ----------------------------------------------------------------------------------------------------
    @property
    def max_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        return t.epochs * self.steps_per_epoch

    def pipeline(self):
        """An in-memory StableDiffusionPipeline with the current weights (no save/reload), DDIM sampler."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        # sharded: a full copy of the current weights on every rank (a collective — every rank calls pipeline())
        unet = fsdp.full_copy(self.unet) if self.fsdp else self.acc.unwrap_model(self.unet)
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            unet=unet, scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _state(self) -> TrainState:
        """One TrainState for the whole run (callbacks may set should_stop on it), refreshed on every call."""
        if not hasattr(self, "_ts"):
            self._ts = TrainState(self.acc, self.step, self.epoch, self.run_dir, self.metrics, self.pipeline)
        self._ts.step, self._ts.epoch, self._ts.metrics = self.step, self.epoch, self.metrics
        return self._ts

    def setup(self) -> None:
        """Everything before the first step: data, sampler, model, optimizer, RNG streams, resume, run dir."""
        cfg, t, acc = self.cfg, self.cfg.train, self.acc
        self.dataset, self.lab_root = make_dataset(cfg, self.run_dir, acc)
        self.streaming = isinstance(self.dataset, torch.utils.data.IterableDataset)
        if self.streaming:  # the stream shards itself across ranks; epoch length unknown (max_steps required)
            self.sampler, self.steps_per_epoch = self.dataset, 1
        else:
            if len(self.dataset) < self.world * t.batch_size:  # else the sampler fails deep inside with a ValueError
                raise ConfigError(f"train.batch_size={t.batch_size} × {self.world} process(es) is more than the "
                                  f"{len(self.dataset)} items of the dataset; lower train.batch_size")
            if self.hooks.sampler_factory is not None:
                self.sampler = self.hooks.sampler_factory(len(self.dataset), t.seed, self.rank, self.world,
                                                          t.batch_size, dataset=self.dataset, run_dir=self.run_dir,
                                                          accelerator=acc)
            else:
                self.sampler = EpochShardSampler(len(self.dataset), t.seed, self.rank, self.world, t.batch_size)
            self.steps_per_epoch = max(1, len(self.sampler) // t.batch_size // t.gradient_accumulation_steps)
        self._setup_model()
        self.gen = torch.Generator().manual_seed(t.seed * 1_000_003 + 7919 * (self.rank + 1))  # per-rank noise
        self.vae_gen = torch.Generator().manual_seed(t.seed * 1_000_003 + 104_729 * (self.rank + 1))
        self.t_weights = None if t.timestep_bias_strategy == "none" else timestep_weights(
            t.timestep_bias_strategy, self.noise_scheduler.config.num_train_timesteps, t.timestep_bias_multiplier,
            t.timestep_bias_portion, t.timestep_bias_begin, t.timestep_bias_end)
        self.np_rng = np.random.default_rng([t.seed, self.rank, 1])
        self.step, self.epoch, self.items_done = 0, 0, 0
        self.good_seen, self.tried_seen = 0, 0  # items decoded / items read in this process (all-bad check)
        self.latent_cache: dict[int, torch.Tensor] = {}
        if self.resume_from:
            self.load_checkpoint(self.resume_from)
            acc.print(f"resumed from {self.resume_from} at step {self.step} (epoch {self.epoch}, "
                      f"{self.items_done} items into it on rank {self.rank})")
        if acc.is_main_process:
            mark_ours(self.run_dir)  # the marker run.overwrite checks before it deletes anything
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            if self.resume_from or cfg.run.resume:  # also resume=latest before any checkpoint: a fresh start
                _drop_metrics_after(self.run_dir, self.step)
        self._status("running")
        self._status_ready = True

    def batches(self):
        """Micro-batches forever, epoch after epoch, from the resumed position; runs the epoch-end hooks."""
        t, acc = self.cfg.train, self.acc
        while True:
            self.sampler.set_epoch(self.epoch)
            self.dataset.epoch = self.epoch  # per-epoch crop/flip randomness
            self.sampler.start_at(self.items_done)
            dl = torch.utils.data.DataLoader(self.dataset, batch_size=t.batch_size,
                                             sampler=None if self.streaming else self.sampler,
                                             collate_fn=loaders.collate, num_workers=self.cfg.data.num_workers,
                                             drop_last=True)
            for batch in self._batches(dl):
                self.items_done += t.batch_size
                for i, e in batch["bad"]:
                    self.bad.setdefault(i, e)
                self.good_seen += len(batch["ids"])
                self.tried_seen += len(batch["ids"]) + len(batch["bad"])
                yield batch
            self.epoch += 1
            self.items_done = 0
            # A run resumed at an epoch's last batch reads nothing before this point: only "read some, decoded none"
            # means the data is unusable.
            good, tried = acc.reduce(torch.tensor([self.good_seen, self.tried_seen], device=acc.device), "sum").tolist()
            if tried > 0 and good == 0:
                bad = self._gather_bad()  # every rank is here together (the reduce above): the gather is safe
                if acc.is_main_process:
                    loaders.write_bad_items(bad, self.run_dir / "bad_items.json")
                raise loaders.DataError(f"no image in the dataset could be decoded; the {len(bad)} items and their "
                                        f"errors are listed in {self.run_dir / 'bad_items.json'}")
            for cb in self.hooks.callbacks:
                cb.on_epoch_end(self._state())

    def micro_step(self, batch: dict) -> tuple[dict, str]:
        """Forward, hooks, backward and (on sync steps) the optimizer step for one micro-batch.
        Returns (logs, skip reason or "")."""
        t, acc = self.cfg.train, self.acc
        with acc.accumulate(self.unet):
            self._kept = 0
            if len(batch["ids"]):
                loss, logs = self._loss(batch)
            else:
                loss, logs = self._empty_loss(), {"loss": float("nan"), "kept": 0.0}
            # one collective for all agreements: [non-finite on any rank, samples kept on all ranks, preemption]
            flags = acc.reduce(torch.tensor([float(not torch.isfinite(loss)), float(self._kept),
                                             float(self._signal is not None)], device=acc.device), "sum")
            self._preempt = bool(flags[2] > 0)
            reason = "skipped_nonfinite" if flags[0] > 0 else ("skipped_all_dropped" if flags[1] == 0 else "")
            # consecutive non-finite events (losses here, gradients below); reset by any other outcome
            self._nonfinite_run = self._nonfinite_run + 1 if reason == "skipped_nonfinite" else (
                0 if reason else self._nonfinite_run)
            self._check_nonfinite_run("losses")
            if reason:  # every rank skips this micro-step together: no hang, no divergent update
                self._zero_grad()
                self.metrics[reason] = self.metrics.get(reason, 0) + 1
                return (logs if reason == "skipped_all_dropped" else {}), reason
            acc.backward(loss)
            if acc.sync_gradients:
                norm = acc.clip_grad_norm_(self.params, t.max_grad_norm)
                # finite loss, non-finite gradients: gradients are already all-reduced here, so every rank sees the
                # same norm and skips together. fp16 is left to its GradScaler, which skips such steps itself.
                if t.mixed_precision != "fp16" and norm is not None and not torch.isfinite(fsdp.grad_norm_value(norm)):
                    self._zero_grad()
                    self._nonfinite_run += 1
                    self.metrics["skipped_nonfinite"] = self.metrics.get("skipped_nonfinite", 0) + 1
                    self._check_nonfinite_run("gradients")
                    return {}, "skipped_nonfinite"
                self._nonfinite_run = 0
            if acc.sync_gradients or not self.fsdp:  # a prepared optimizer skips non-sync micro-steps itself
                self.optimizer.step()
            self.lr_scheduler.step()
            self._zero_grad()
        return logs, ""

    def _zero_grad(self) -> None:
        """As a prepared optimizer does: gradients are cleared on sync micro-steps only (accumulation keeps them)."""
        if self.acc.sync_gradients or not self.fsdp:
            self.optimizer.zero_grad(set_to_none=True)

    def _check_nonfinite_run(self, what: str) -> None:
        if self._nonfinite_run >= self.cfg.train.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{self._nonfinite_run} non-finite losses/gradients in a row (last: {what}) at step {self.step}; "
                f"stopping. The last good checkpoint is kept ({ckpt.latest_checkpoint(self.run_dir)}); lower "
                f"train.learning_rate or check the data, then resume=latest.")

    def _status(self, state: str, **extra) -> None:
        """This rank's status file (training/status.py), always with the step and the world size."""
        write_status(self.run_dir, self.rank, state, self.step, world=self.world, **extra)

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum  # acted on at the next step boundary, by every rank together

    def train(self) -> dict:
        import signal

        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            result = self._train()
            self._status("completed")
            return result
        except Preempted:
            self._status("preempted", signal=self._signal, checkpoint=str(ckpt.latest_checkpoint(self.run_dir)))
            raise
        except BaseException as e:
            if self._status_ready:
                self._status("failed", error=describe_failure(e))
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _train(self) -> dict:
        cfg, t, acc = self.cfg, self.cfg.train, self.acc
        self.setup()
        acc.init_trackers("guard_train", config=_flat(cfg))
        for cb in self.hooks.callbacks:
            cb.on_train_begin(self._state())
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", disable=not acc.is_local_main_process,
                   mininterval=5)
        t0, window = time.time(), []
        batches = self.batches()
        while self.step < self.max_steps:
            logs, skipped = self.micro_step(next(batches))
            if logs:
                window.append(logs)
            if not skipped and acc.sync_gradients:
                if self.ema is not None:
                    self.ema.step(self.params)
                self.step += 1
                bar.update(1)
                if self.step % cfg.run.log_every == 0 or self.step == self.max_steps:
                    self._log(window, t0)
                    window = []
                for cb in self.hooks.callbacks:
                    cb.on_step_end(self._state())
                if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                    self.save_checkpoint()
                if self._state().should_stop:  # set by a callback, identically on every rank
                    self.metrics["stopped_early_at_step"] = self.step
                    break
            # preemption: all ranks saw the flag in the same collective; act at an accumulation boundary, after the
            # step's bookkeeping, so the checkpoint holds exactly `step` updates
            if self._preempt and acc.sync_gradients:
                if window:
                    self._log(window, t0)
                if not (t.checkpoint_every and self.step % t.checkpoint_every == 0 and not skipped):
                    self.save_checkpoint()
                acc.print(f"preempted (signal {self._signal}) at step {self.step}: checkpoint saved to "
                          f"{ckpt.latest_checkpoint(self.run_dir)}; continue with resume=latest")
                raise Preempted()
        bar.close()
        self.metrics["train_wall_s"] = round(time.time() - t0, 1)
        self.save_checkpoint()
        self._export_final()
        for cb in self.hooks.callbacks:
            cb.on_train_end(self._state())
        return {"run_dir": str(self.run_dir), "final": str(self.run_dir / "final"), **self.metrics}

    def close(self) -> None:
        """End trackers and the process group; call after any collective post-training work (the summary)."""
        self.acc.wait_for_everyone()
        self.acc.end_training()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # without it, gloo DDP runs on CPU intermittently abort (SIGABRT) at exit

    def _batches(self, dl):
        """Map-style shards are equal by construction. Streams may differ by a batch between ranks: every rank then
        stops the epoch when any rank runs out, so no rank waits in an all-reduce that others never join."""
        if not self.streaming or self.world == 1:
            yield from dl
            return
        it = iter(dl)
        while True:
            batch = next(it, None)
            out = self.acc.reduce(torch.tensor([float(batch is None)], device=self.acc.device), "max")
            if out.item() > 0:
                return
            yield batch

    def _log(self, window: list[dict], t0: float) -> None:
        acc = self.acc
        keys = sorted({k for w in window for k in w})
        local = torch.tensor([np.nanmean([w.get(k, np.nan) for w in window]) for k in keys], device=acc.device)
        glob = acc.reduce(local, "mean") if self.world > 1 else local
        rec = {k: round(float(v), 6) for k, v in zip(keys, glob.tolist())}
        rec.update(step=self.step, epoch=self.epoch, lr=self.lr_scheduler.get_last_lr()[0],
                   wall_s=round(time.time() - t0, 1), bad_items=len(self._gather_bad()),
                   **{k: self.metrics[k] for k in ("skipped_nonfinite", "skipped_all_dropped") if k in self.metrics})
        self.metrics.update({k: rec[k] for k in keys})
        acc.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=self.step)
        if acc.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _export_final(self) -> None:
        acc = self.acc
        final = self.run_dir / "final"
        tmp = self.run_dir / "final.tmp"  # written whole, then renamed: a killed export never looks complete
        bad = self._gather_bad()
        full = self.pipeline() if self.fsdp else None  # the gather is a collective: every rank takes part
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.ema is not None:
                self.ema.store(self.params)
                self.ema.copy_to(self.params)
            if self.cfg.train.mode == "lora":
                from diffusers import StableDiffusionPipeline

                StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=self._lora_state(),
                                                          safe_serialization=True)
                (tmp / "base_model.txt").write_text(str(self.model_path) + "\n")
            else:
                (full if full is not None else self.pipeline()).save_pretrained(tmp)
            if self.ema is not None:
                self.ema.restore(self.params)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            loaders.write_bad_items(bad, self.run_dir / "bad_items.json")
            self.metrics["bad_items"] = len(bad)
        acc.wait_for_everyone()


def _drop_metrics_after(run_dir: Path, step: int) -> None:
    """On resume, log lines past the checkpoint's step (written before a kill) would be logged again: move them to
    metrics.discarded.jsonl (kept, not lost), so metrics.jsonl holds each step once."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            (keep if json.loads(line).get("step", 0) <= step else drop).append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            drop.append(line)
    if drop:
        with open(run_dir / "metrics.discarded.jsonl", "a") as f:
            f.writelines(drop)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _flat(cfg: Config) -> dict:
    out = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(asdict(cfg), "")
    return out


def train(cfg: Config, hooks: Optional[Hooks] = None) -> dict:
    trainer = Trainer(cfg, hooks)
    try:
        return trainer.train()
    finally:
        trainer.close()
