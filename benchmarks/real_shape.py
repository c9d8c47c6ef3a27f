"""Costs at Stable Diffusion's own shapes: random-weight models built from the SD 1.5 and SD 2.1-base component
configs (UNet 860M, AutoencoderKL, CLIP ViT-L/14 or OpenCLIP-H text encoder sizes; nothing downloaded), 512 px,
batch 1. Every ratio is measured in one run, arms interleaved round by round.

    python benchmarks/real_shape.py --size sd15 [--rounds 3] [--steps 2] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
        [--out results/real_shape_sd15_cpu.json]
    python benchmarks/real_shape.py --size tiny      # the same code on a toy config: checks the plumbing in seconds

Measured:
* a LoRA training step (rank 4 on the attention projections, fwd + bwd + AdamW) with our entropy filter on ÷ off
  (the filter reads the training forward's own attention of SD's down_blocks.1.attentions.1 — Ren et al.'s
  layer) and our magnitude filter on ÷ off (one extra no-grad forward), and peak memory of each arm (CUDA:
  max_memory_allocated; CPU: peak RSS of a child process per arm, `--memory`);
* denoising steps through the engine (the prompt encoded, `--steps` DDIM steps, no VAE decode): every method in
  `--methods` ÷ CFG;
* first-step detection (Wen's magnitude, Ren's E / D, Bright Ending's LD recorded) ÷ one plain CFG step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from _common import emit  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from guard_train.guidance.engine import GuidanceEngine  # noqa: E402
from guard_train.guidance.strategies import get_strategy  # noqa: E402
from guard_train.lab.tiny_sd import clip_tokenizer  # noqa: E402
from guard_train.models.text import encode_text  # noqa: E402
from guard_train.training.hooks import StepContext  # noqa: E402
from guard_train.training.mitigations.filters import (  # noqa: E402
    EntropyFilter,
    EntropyFilterConfig,
    MagnitudeFilter,
    MagnitudeFilterConfig,
)

ROOT = Path(__file__).resolve().parents[1]
DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# The public component configs (diffusers' unet/vae config.json of each model; transformers' CLIP text configs).
SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280), down_block_types=DOWN, up_block_types=UP)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
FILTER_LAYER = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"  # Ren et al.'s layer
SIZES = {
    "sd15": {"unet": dict(**SD_UNET, cross_attention_dim=768, attention_head_dim=8),
             "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768, hidden_act="quick_gelu"),
             "vae": SD_VAE, "px": 512, "filter_layer": FILTER_LAYER},
    "sd21": {"unet": dict(**SD_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                          use_linear_projection=True),
             "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          projection_dim=512, hidden_act="gelu"),
             "vae": SD_VAE, "px": 512, "filter_layer": FILTER_LAYER},
    # plumbing check: the same code paths on a toy UNet (seconds on a CPU)
    "tiny": {"unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                          block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                          attention_head_dim=4, norm_num_groups=8),
             "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          projection_dim=32, hidden_act="quick_gelu"),
             "vae": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=16),
             "px": 16, "filter_layer": "down_blocks.0.attentions.0.transformer_blocks.0.attn2"},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT = "a photograph of an astronaut riding a horse"


def clip_bpe() -> CLIPTokenizer:
    """CLIP's full BPE (rebuilt from the open-clip-torch wheel, as the tiny SD was); where that wheel is absent (the
    GPU machine), the tiny SD's tokenizer, trimmed to the lab's tokens. Costs do not depend on which: every prompt
    is padded to SD's 77 tokens."""
    try:
        return clip_tokenizer(tempfile.mkdtemp())
    except FileNotFoundError:
        return CLIPTokenizer.from_pretrained(ROOT / "models" / "tiny-sd" / "tokenizer")


def build(size: str, device: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    """Random weights in the real component shapes (seeded), as a pipeline the engine can drive."""
    s = SIZES[size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**s["unet"])
    vae = AutoencoderKL(**s["vae"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **s["text"]))
    tok = clip_bpe()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device, dtype)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


class TrainArm:
    """One LoRA training step of `arm` (plain, entropy_filter, magnitude_filter) on its own UNet copy."""

    def __init__(self, pipe: StableDiffusionPipeline, arm: str, layer: str, device: str, dtype: torch.dtype):
        self.pipe, self.arm, self.device = pipe, arm, device
        self.unet = UNet2DConditionModel.from_config(pipe.unet.config).to(device, dtype)
        self.unet.load_state_dict(pipe.unet.state_dict())
        self.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                         init_lora_weights="gaussian"))
        self.opt = torch.optim.AdamW([p for p in self.unet.parameters() if p.requires_grad], lr=1e-4)
        self.filter = None
        if arm == "entropy_filter":
            self.filter = EntropyFilter(EntropyFilterConfig(enabled=True, layers=[layer], warmup_steps=10**9))
            self.filter.setup(self.unet)
        elif arm == "magnitude_filter":
            self.filter = MagnitudeFilter(MagnitudeFilterConfig(enabled=True, warmup_steps=10**9))
        self.gen = torch.Generator().manual_seed(0)

    def encode(self, captions: list[str]) -> torch.Tensor:
        return encode_text(self.pipe.tokenizer, self.pipe.text_encoder, captions)

    def step(self) -> None:
        u = self.unet
        c = u.config
        z = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=self.gen).to(self.device, u.dtype)
        noise = torch.randn(z.shape, generator=self.gen).to(z)
        t = torch.randint(0, 1000, (1,), generator=self.gen).to(self.device)
        zt = self.pipe.scheduler.add_noise(z, noise, t)
        emb = self.encode([PROMPT]).to(u.dtype)
        pred = u(zt, t, emb).sample
        per = ((pred.float() - noise.float()) ** 2).flatten(1).mean(1)
        w = torch.ones_like(per)
        if self.filter is not None:
            ctx = StepContext(_NoAcc(), 0, torch.zeros(1, dtype=torch.long), [PROMPT], t, zt, emb, per, u, pred=pred,
                              encode_text=self.encode, scheduler=self.pipe.scheduler)
            w = self.filter(ctx).to(per)
        loss = (per * w).sum() / w.sum().clamp(min=1e-8)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class _NoAcc:
    """The single-process stand-in of accelerate's Accelerator that the filters' warm-up touches."""

    num_processes, is_main_process, process_index = 1, True, 0


def time_train(pipe, layer: str, arms: list[str], rounds: int, device: str, dtype) -> dict:
    runners = {a: TrainArm(pipe, a, layer, device, dtype) for a in arms}
    for r in runners.values():  # warm-up (allocator, kernels)
        r.step()
    times = {a: [] for a in arms}
    for _ in range(rounds):
        for a, r in runners.items():
            _sync(device)
            t0 = time.perf_counter()
            r.step()
            _sync(device)
            times[a].append(time.perf_counter() - t0)
    med = {a: statistics.median(v) for a, v in times.items()}
    return {"median_step_s": {a: round(v, 4) for a, v in med.items()},
            "ratio_vs_plain": {a: round(v / med["plain"], 4) for a, v in med.items()}}


def peak_train(size: str, arm: str, device: str, dtype_name: str) -> float:
    """Peak memory (GiB) of 2 training steps of one arm: CUDA's allocator peak, or a child process's peak RSS."""
    if device == "cuda":
        pipe = build(size, device, DTYPES[dtype_name])
        r = TrainArm(pipe, arm, SIZES[size]["filter_layer"], device, DTYPES[dtype_name])
        _peak_reset(device)
        r.step()
        r.step()
        return _peak(device)
    code = (f"import sys, resource; sys.argv=['x']; sys.path[:0]={[str(ROOT / 'benchmarks'), str(ROOT)]!r}; "
            f"import real_shape as m; p=m.build({size!r}, 'cpu', m.DTYPES[{dtype_name!r}]); "
            f"r=m.TrainArm(p, {arm!r}, m.SIZES[{size!r}]['filter_layer'], 'cpu', m.DTYPES[{dtype_name!r}]); "
            f"r.step(); r.step(); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) / 2**20  # KiB -> GiB


def time_denoise(pipe, methods: list[str], steps: int, rounds: int, device: str) -> dict:
    eng = GuidanceEngine(pipe, max_batch=8)
    px = SIZES_PX[id(pipe)]

    def once(method: str, record: tuple = (), k: int = steps) -> float:
        ctx = eng._context([PROMPT], [0], [PROMPT], 1, [0], k, px, px)
        strategy = get_strategy(method)
        eng.start_recording(ctx, record)
        _sync(device)
        t0 = time.perf_counter()
        try:
            strategy.prepare(ctx)
            eng.run(ctx, strategy)
        finally:
            eng.clear_attention()
        _sync(device)
        return time.perf_counter() - t0

    once("cfg", k=1)  # warm-up
    times = {m: [] for m in methods}
    det = {"cfg_1step": [], "detect_1step": []}
    for _ in range(rounds):
        for m in methods:
            times[m].append(once(m))
        det["cfg_1step"].append(once("cfg", k=1))
        det["detect_1step"].append(once("cfg", ("attention", "diff", "end_maps"), k=1))
    med = {m: statistics.median(v) for m, v in times.items()}
    dmed = {k: statistics.median(v) for k, v in det.items()}
    return {"median_s": {m: round(v, 4) for m, v in med.items()},
            "ratio_vs_cfg": {m: round(v / med["cfg"], 4) for m, v in med.items()},
            "detection": {**{k: round(v, 4) for k, v in dmed.items()},
                          "ratio": round(dmed["detect_1step"] / dmed["cfg_1step"], 4)}}


SIZES_PX: dict[int, int] = {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="sd15")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps per denoising measurement")
    ap.add_argument("--methods", default="cfg,guard,guard_attn,ren,jain_dynamic")
    ap.add_argument("--parts", default="train,denoise", help="train, denoise, memory (CPU: a child per arm)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    dtype = DTYPES[a.dtype]
    t0 = time.perf_counter()
    pipe = build(a.size, a.device, dtype)
    SIZES_PX[id(pipe)] = SIZES[a.size]["px"]
    params = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "vae", "text_encoder")}
    res: dict = {"size": a.size, "device": a.device, "dtype": a.dtype, "batch": 1, "px": SIZES[a.size]["px"],
                 "tokenizer": f"CLIP BPE, {len(pipe.tokenizer)} tokens (every prompt padded to 77)",
                 "parameters": params, "rounds": a.rounds, "goals": {
                     "entropy_filter step ÷ plain": "<= 1.03", "entropy_filter peak memory ÷ plain": "<= 1.10",
                     "guard ÷ cfg": "<= 1.50", "guard_attn, ren, jain_dynamic ÷ cfg": "<= 1.05"}}
    arms = ["plain", "entropy_filter", "magnitude_filter"]
    if "train" in parts:
        res["train"] = time_train(pipe, SIZES[a.size]["filter_layer"], arms, a.rounds, a.device, dtype)
    if "memory" in parts:
        peaks = {arm: peak_train(a.size, arm, a.device, a.dtype) for arm in arms}
        res["peak_memory_gib"] = {k: round(v, 3) for k, v in peaks.items()}
        res["peak_memory_ratio_vs_plain"] = {k: round(v / peaks["plain"], 4) for k, v in peaks.items()}
        res["peak_memory_how"] = ("torch.cuda.max_memory_allocated" if a.device == "cuda" else
                                  "peak RSS of a child process per arm (model build included)")
    if "denoise" in parts:
        res["denoise"] = time_denoise(pipe, a.methods.split(","), a.steps, a.rounds, a.device)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return emit(res, a.out)


if __name__ == "__main__":
    sys.exit(main())
