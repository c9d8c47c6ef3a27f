"""`guard-train build-base`: pretrain the embedded tiny SD on a stream of fresh lab scenes (no duplicates).

Like SD is pretrained on LAION before anyone fine-tunes it, the tiny SD is pretrained here, offline, on an
endless stream of scenes drawn from the *pretraining* cells of the photos (disjoint from the fine-tuning lab,
see data/photos.py). The UNet and the text encoder are trained jointly (a frozen random text encoder hardly tells
captions apart: its caption embeddings are nearly identical); fine-tuning then freezes the text encoder, as SD does.

Every step sees new images, so the base learns the distribution rather than instances. Weights are kept as an EMA
(decay 0.999) and exported in diffusers layout; the run can be resumed from its own state or continued from an
exported model (e.g. the committed one) to add more pretraining time.

Why this is its own loop and not the Trainer's step: pretraining trains the text encoder jointly with the UNet (the
Trainer freezes it, as SD fine-tuning does), draws an endless single-process stream of fresh scenes (the Trainer
shards a fixed dataset into epochs across ranks), fits the codec before the first step, and keeps an EMA of both
models. The two share what defines a step's loss — the regression target (ε or v) and the per-sample loss weights
(`training/losses.py`); pretraining draws timesteps uniformly, the Trainer's default.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from guard_train.config.loader import ConfigError
from guard_train.config.params import ParamValueError, check_dataclass, ranged
from guard_train.config.paths import PathError, check_out_dir
from guard_train.data.images import to_model as to_tensor
from guard_train.lab.codec import PatchPCACodec
from guard_train.lab.dataset import all_captions, pretrain_stream
from guard_train.lab.tiny_sd import build_tiny_sd, clip_tokenizer, noise_scheduler, trim_vocabulary
from guard_train.models.loading import ModelLoadError, load_pipeline
from guard_train.models.text import token_ids
from guard_train.training.losses import diffusion_target, loss_weights

EVAL_CAPTIONS = (
    "a red circle on a cat photo",
    "a blue square on a coffee photo",
    "a yellow triangle and a green circle on a temple photo",
    "a white square on a astronaut photo".replace("a astronaut", "an astronaut"),
    "a purple circle on a flower photo",
    "an orange triangle on a motorcycle photo",
    "a black square and a red triangle on a cells photo",
    "a green triangle on a coffee photo",
)


@dataclass
class PretrainConfig:
    out: str = "models/tiny-sd"
    work: str = "runs/build-base"  # resumable trainer state (optimizer, raw weights), not committed
    steps: int = ranged(20000, ge=1)
    batch_size: int = ranged(16, ge=1)
    lr: float = ranged(5e-4, gt=0)
    warmup: int = ranged(200, ge=0)
    ema_decay: float = ranged(0.999, gt=0, lt=1)
    snr_gamma: float = ranged(5.0, ge=0)  # min-SNR-γ; 0 = off (uniform weights)
    # > 0: weight the ε-loss as a v-loss, min(1 + 1/SNR, cap) (needs snr_gamma = 0)
    v_weight_cap: float = ranged(0.0, ge=1, off=0.0)
    prediction_type: str = ""  # "" keeps the model's; "v_prediction" converts an ε base (as SD 2.0 → 2.0-v did)
    zero_terminal_snr: bool = False  # rescale the betas so t = 999 is pure noise (Lin et al. 2024); needs v
    caption_dropout: float = 0.1
    resolution: int = 64
    latent_channels: int = 16
    codec_fit_images: int = 2048
    seed: int = ranged(0, ge=0)
    save_every: int = ranged(500, ge=1)
    sample_every: int = 1000  # sample grid of EVAL_CAPTIONS every N steps and at the end; 0 = never
    time_budget_min: float = ranged(0.0, ge=0)  # stop (and export) after this many minutes; 0 = no limit
    init_from: str = ""  # continue from an exported model dir (e.g. the committed base)
    # >= 0: cosine-decay the lr from this step to lr * lr_min_ratio at `steps`
    decay_from: int = ranged(-1, ge=0, off=-1)
    lr_min_ratio: float = ranged(0.1, ge=0, le=1)


def _export(pipe: StableDiffusionPipeline, ema: EMAModel, out: Path, meta: dict) -> None:
    """Write the EMA weights as a diffusers pipeline dir, atomically (tmp dir + rename)."""
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    ema.store(params)
    ema.copy_to(params)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    # the exported model keeps only the tokens lab captions use (bit-identical conditioning; tiny_sd says why)
    meta = meta | {"vocabulary": trim_vocabulary(tmp, list(all_captions()))}
    (tmp / "build_info.json").write_text(json.dumps(meta, indent=2))
    ema.restore(params)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


@torch.no_grad()
def sample_grid(pipe: StableDiffusionPipeline, captions, path: Path, n: int = 4, steps: int = 25, cfg: float = 5.0):
    from PIL import Image

    rows = []
    for i, c in enumerate(captions):
        g = torch.Generator().manual_seed(1234 + i)
        ims = pipe(c, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=cfg, generator=g,
                   height=pipe.vae.config.sample_size, width=pipe.vae.config.sample_size, output_type="np").images
        rows.append(np.concatenate(list((ims * 255).round().astype(np.uint8)), 1))
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up, constant, then (if `decay_from` >= 0) a cosine tail down to `lr * lr_min_ratio` at `steps`.

    The tail is what turns a constant-lr model's noisy textures into cleaner ones; it is applied when a long
    pretraining is continued for a last segment (the committed base's step 8,500 → 17,000 run).
    """
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    if 0 <= cfg.decay_from <= step:
        frac = min(1.0, (step - cfg.decay_from) / max(1, cfg.steps - cfg.decay_from))
        lr = cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    return lr


def check_config(cfg: PretrainConfig) -> None:
    """Settings out of range or that cannot work together, refused before anything is built or written."""
    try:
        check_dataclass(cfg)
        # the export replaces --out: only a model directory build-base wrote (build_info.json) may be replaced
        check_out_dir(cfg.out, "--out", own_files=("build_info.json",))
    except (ParamValueError, PathError) as e:
        raise ConfigError(str(e)) from None
    if cfg.prediction_type not in ("", "epsilon", "v_prediction"):
        raise ConfigError(f"prediction_type must be 'epsilon' or 'v_prediction', got {cfg.prediction_type!r}")
    if cfg.v_weight_cap and cfg.snr_gamma:
        raise ConfigError("v_weight_cap and snr_gamma reweight the same timesteps in opposite directions: "
                         "pass --snr-gamma 0 with --v-weight-cap")
    if cfg.v_weight_cap and cfg.prediction_type == "v_prediction":
        raise ConfigError("a v-prediction loss already carries the v weight; drop --v-weight-cap")
    if cfg.zero_terminal_snr and cfg.prediction_type != "v_prediction":
        raise ConfigError("zero terminal SNR leaves an ε-model nothing to predict at t = 999 (ε = x_t): "
                         "pass --prediction-type v_prediction with --zero-terminal-snr")
    if cfg.v_weight_cap and not cfg.v_weight_cap >= 1:
        raise ConfigError(f"v_weight_cap must be 0 (off) or >= 1, got {cfg.v_weight_cap}")


def set_schedule(pipe: StableDiffusionPipeline, cfg: PretrainConfig) -> None:
    """Give the pipeline's scheduler the requested prediction type / zero-terminal-SNR betas, so the export (and
    every fine-tune and sampler that loads it) trains and samples with them. Zero terminal SNR samples with
    'trailing' spacing, so sampling starts at t = 999 where training now sees pure noise."""
    conf = dict(pipe.scheduler.config)
    if cfg.prediction_type:
        conf["prediction_type"] = cfg.prediction_type
    if cfg.zero_terminal_snr:
        conf.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if conf.get("rescale_betas_zero_snr") and conf["prediction_type"] != "v_prediction":
        raise ConfigError("zero terminal SNR leaves nothing to predict for an ε-model at t = 999 (ε = x_t); "
                         "use it with --prediction-type v_prediction")
    if cfg.v_weight_cap and conf["prediction_type"] != "epsilon":
        raise ConfigError(f"{cfg.init_from or 'this model'} is a {conf['prediction_type']} model: its loss already "
                         "carries the v weight; drop --v-weight-cap")
    if conf != dict(pipe.scheduler.config):
        pipe.scheduler = type(pipe.scheduler).from_config(conf)


def build_base(cfg: PretrainConfig) -> Path:
    check_config(cfg)
    if cfg.init_from and not (Path(cfg.init_from) / "model_index.json").is_file():
        raise ConfigError(f"--init-from {cfg.init_from}: no model_index.json there; pass a model dir exported by "
                          "build-base (e.g. models/tiny-sd)")
    torch.manual_seed(cfg.seed)
    out, work = Path(cfg.out), Path(cfg.work)
    t0 = time.time()
    state_path = work / "trainer_state.pt"
    if cfg.init_from:
        try:  # use_safetensors=True (load_pipeline): pickled weights could run code, and are refused
            pipe = load_pipeline(cfg.init_from)
        except ModelLoadError as e:
            raise ConfigError(f"--init-from: {e}") from None
        info = Path(cfg.init_from) / "build_info.json"  # absent on a model build-base did not make
        prev = json.loads(info.read_text()) if info.is_file() else {}
    else:
        work.mkdir(parents=True, exist_ok=True)
        tok = clip_tokenizer(work)
        fit_imgs = [im for im, _ in islice(pretrain_stream(cfg.seed + 10_000, cfg.resolution), cfg.codec_fit_images)]
        codec = PatchPCACodec(latent_channels=cfg.latent_channels, sample_size=cfg.resolution).fit(to_tensor(fit_imgs))
        pipe = build_tiny_sd(codec, tok, seed=cfg.seed)
        prev = {}
    set_schedule(pipe, cfg)  # may refuse the loaded model's schedule: before anything is written
    work.mkdir(parents=True, exist_ok=True)
    unet, te, codec, tok = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    unet.train()
    te.train()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=cfg.ema_decay)
    sched = noise_scheduler(pipe)
    step = 0
    if state_path.exists() and not cfg.init_from:
        st = torch.load(state_path, weights_only=True)
        unet.load_state_dict(st["unet"])
        te.load_state_dict(st["te"])
        opt.load_state_dict(st["opt"])
        ema.load_state_dict(st["ema"])
        step = st["step"]
        if (out / "build_info.json").exists():  # the export written with this state: carry its history forward
            old = json.loads((out / "build_info.json").read_text())
            prev = {"wall_s_total": old.get("wall_s_total", 0), "segments": old.get("segments", [])}
    start_step = step
    prior_steps = int(prev.get("total_steps", 0))
    stream = pretrain_stream(cfg.seed, cfg.resolution, start=step * cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed + step)
    bar = tqdm(total=cfg.steps, initial=step, desc="build-base", mininterval=30)
    losses: list[float] = []

    def meta() -> dict:
        return {
            **asdict(cfg),
            "steps_this_run": step,
            "total_steps": prior_steps + step,
            "wall_s_this_run": round(time.time() - t0, 1),
            "wall_s_total": round(float(prev.get("wall_s_total", 0)) + time.time() - t0, 1),
            "final_loss_ema100": float(np.mean(losses[-100:])) if losses else None,
            "segments": [*prev.get("segments", []), {"steps": f"{prior_steps + start_step}-{prior_steps + step}",
                                                     "wall_s": round(time.time() - t0, 1),
                                                     "decay_from": cfg.decay_from, "init_from": cfg.init_from,
                                                     "lr": cfg.lr, "snr_gamma": cfg.snr_gamma,
                                                     "v_weight_cap": cfg.v_weight_cap,
                                                     "prediction_type": sched.config.prediction_type,
                                                     "zero_terminal_snr": bool(
                                                         sched.config.get("rescale_betas_zero_snr"))}],
            "torch": torch.__version__,
        }

    while step < cfg.steps:
        batch = list(islice(stream, cfg.batch_size))
        caps = [c if torch.rand((), generator=gen) > cfg.caption_dropout else "" for _, c in batch]
        ids = token_ids(tok, caps)
        with torch.no_grad():
            z = codec.encode(to_tensor([im for im, _ in batch])).latent_dist.sample() * codec.config.scaling_factor
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],), generator=gen)
        pred = unet(sched.add_noise(z, noise, t), t, te(ids)[0]).sample
        w = loss_weights(sched, t, cfg.snr_gamma, cfg.v_weight_cap)
        target = diffusion_target(sched, z, noise, t)
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
            with open(work / "loss.jsonl", "a") as f:
                f.write(json.dumps({"step": prior_steps + step, "loss": float(np.mean(losses[-100:])),
                                    "wall_s": round(time.time() - t0, 1)}) + "\n")
        out_of_time = cfg.time_budget_min and (time.time() - t0) > 60 * cfg.time_budget_min
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            _export(pipe, ema, out, meta())
            torch.save({"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
                        "ema": ema.state_dict(), "step": step}, str(state_path) + ".tmp")
            os.replace(str(state_path) + ".tmp", state_path)
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps or out_of_time):
            p = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, local_files_only=True,
                                                        use_safetensors=True)
            p.set_progress_bar_config(disable=True)
            sample_grid(p, EVAL_CAPTIONS, work / f"samples_{prior_steps + step:06d}.png")
        if out_of_time:
            break
    bar.close()
    return out
