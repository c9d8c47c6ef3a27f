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
import gc
import json
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


def paired_ratio(times: dict[str, list[float]], base: str) -> dict[str, float]:
    """Median over rounds of each arm's time ÷ the base arm's time in the same round: a slow drift of the machine
    (a shared host's load, clock changes) moves both halves of a pair alike, so it cancels where a ratio of medians
    would carry it."""
    return {a: round(statistics.median(x / b for x, b in zip(v, times[base])), 4) for a, v in times.items()}


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
            "ratio_vs_plain": {a: round(v / med["plain"], 4) for a, v in med.items()},
            "paired_ratio_vs_plain": paired_ratio(times, "plain"), "per_round_s": _rounded(times)}


def _rounded(times: dict) -> dict:
    return {k: [round(x, 4) for x in v] for k, v in times.items()}


def _proc_status_gib(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    raise KeyError(field)


def cpu_step_peak(size: str, arm: str, dtype_name: str) -> dict:
    """In this process: build the models and the arm, reset the kernel's peak-RSS mark (clear_refs 5), run 2
    training steps, and return the resident size before the steps and the peak during them (GiB). Resetting the
    mark keeps the model build's own transient peak (random init, the arm's UNet copy) out of the measurement."""
    pipe = build(size, "cpu", DTYPES[dtype_name])
    r = TrainArm(pipe, arm, SIZES[size]["filter_layer"], "cpu", DTYPES[dtype_name])
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_gib("VmRSS")
    r.step()
    r.step()
    return {"resident_before_steps": before, "peak_during_steps": _proc_status_gib("VmHWM")}


def peak_train(size: str, arm: str, device: str, dtype_name: str) -> dict:
    """Peak memory (GiB) of 2 training steps of one arm: CUDA's allocator peak, or — on the CPU — the peak RSS of a
    child process (one per arm, so arms do not share an allocator) during its steps."""
    if device == "cuda":
        pipe = build(size, device, DTYPES[dtype_name])
        r = TrainArm(pipe, arm, SIZES[size]["filter_layer"], device, DTYPES[dtype_name])
        before = torch.cuda.memory_allocated() / 2**30
        _peak_reset(device)
        r.step()
        r.step()
        return {"resident_before_steps": before, "peak_during_steps": _peak(device)}
    code = (f"import sys, json; sys.argv=['x']; sys.path[:0]={[str(ROOT / 'benchmarks'), str(ROOT)]!r}; "
            f"import real_shape as m; print(json.dumps(m.cpu_step_peak({size!r}, {arm!r}, {dtype_name!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def denoise_once(eng: GuidanceEngine, method: str, k: int, device: str, record: tuple = ()) -> float:
    """Seconds for k denoising steps of one prompt through the engine (prompt encoding included, no decode)."""
    px = SIZES_PX[id(eng.pipe)]
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


def profile_denoise(pipe, methods: list[str], device: str, top: int = 12) -> dict:
    """torch.profiler over one denoising step per method: total, the ops with the most self time, and — for each
    method after the first — the ops it calls more often than the first does (its own code's ops, as opposed to
    the UNet's ops run on more rows), to say where a method's extra cost goes."""
    from torch.profiler import ProfilerActivity, profile

    eng = GuidanceEngine(pipe, max_batch=8)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    out = {}
    for m in methods:
        denoise_once(eng, m, 1, device)  # warm-up
        with profile(activities=acts) as prof:
            denoise_once(eng, m, 1, device)
        ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        ops = {e.key: {"self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count} for e in ev}
        out[m] = {"self_cpu_total_ms": round(sum(e.self_cpu_time_total for e in ev) / 1e3, 1),
                  "top_ops": dict(list(ops.items())[:top]), "_ops": ops}
    first = out[methods[0]]["_ops"]
    for m in methods[1:]:
        # the extra calls' share of an op's self time (an op the first method never calls: all of it)
        extra = {k: {**v, "extra_calls": v["calls"] - first.get(k, {"calls": 0})["calls"],
                     "extra_ms": round(v["self_cpu_ms"] * (1 - first.get(k, {"calls": 0})["calls"] / v["calls"]), 1)}
                 for k, v in out[m]["_ops"].items() if v["calls"] > first.get(k, {"calls": 0})["calls"]}
        out[m][f"extra_ops_vs_{methods[0]}"] = {k: v for k, v in extra.items() if v["extra_ms"] >= 0.5}
        out[m][f"extra_ops_vs_{methods[0]}_ms"] = round(sum(v["extra_ms"] for v in extra.values()), 1)
    for v in out.values():
        del v["_ops"]
    return out


def time_denoise(pipe, methods: list[str], steps: int, rounds: int, device: str) -> dict:
    eng = GuidanceEngine(pipe, max_batch=8)

    def once(method: str, record: tuple = (), k: int = steps) -> float:
        return denoise_once(eng, method, k, device, record)

    u = pipe.unet
    c = u.config
    z = torch.randn(3, c.in_channels, c.sample_size, c.sample_size, device=device, dtype=u.dtype)
    emb = torch.randn(3, 77, c.cross_attention_dim, device=device, dtype=u.dtype)

    @torch.no_grad()
    def bare(b: int) -> float:  # one UNet forward on b rows, nothing of ours around it
        _sync(device)
        t0 = time.perf_counter()
        u(z[:b], 500, emb[:b])
        _sync(device)
        return time.perf_counter() - t0

    once("cfg", k=1)  # warm-up
    bare(2), bare(3)
    times = {m: [] for m in methods}
    det = {"cfg_1step": [], "detect_1step": []}
    rows = {2: [], 3: []}
    for _ in range(rounds):
        for m in methods:
            times[m].append(once(m))
        det["cfg_1step"].append(once("cfg", k=1))
        det["detect_1step"].append(once("cfg", ("attention", "diff", "end_maps"), k=1))
        for b in rows:
            rows[b].append(bare(b))
    med = {m: statistics.median(v) for m, v in times.items()}
    dmed = {k: statistics.median(v) for k, v in det.items()}
    rmed = {b: statistics.median(v) for b, v in rows.items()}
    return {"median_s": {m: round(v, 4) for m, v in med.items()},
            "ratio_vs_cfg": {m: round(v / med["cfg"], 4) for m, v in med.items()},
            "paired_ratio_vs_cfg": paired_ratio(times, "cfg"), "per_round_s": _rounded(times),
            # GUARD runs 3 UNet rows per step where CFG runs 2: the bare batch-3 ÷ batch-2 forward is its floor
            "bare_unet_forward_s": {f"batch_{b}": round(v, 4) for b, v in rmed.items()},
            "bare_batch3_over_batch2": round(rmed[3] / rmed[2], 4),
            "bare_batch3_over_batch2_paired": paired_ratio({"b2": rows[2], "b3": rows[3]}, "b2")["b3"],
            "detection": {**{k: round(v, 4) for k, v in dmed.items()},
                          "ratio": round(dmed["detect_1step"] / dmed["cfg_1step"], 4),
                          "paired_ratio": paired_ratio(det, "cfg_1step")["detect_1step"]}}


SIZES_PX: dict[int, int] = {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="sd15")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps per denoising measurement")
    ap.add_argument("--methods", default="cfg,guard,guard_attn,ren,jain_dynamic")
    ap.add_argument("--parts", default="train,denoise",
                    help="train, denoise, memory (CPU: a child per arm), profile (one step of --profile-methods)")
    ap.add_argument("--profile-methods", default="cfg,guard")
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
        mem = {arm: peak_train(a.size, arm, a.device, a.dtype) for arm in arms}
        peaks = {k: v["peak_during_steps"] for k, v in mem.items()}
        extra = {k: v["peak_during_steps"] - v["resident_before_steps"] for k, v in mem.items()}
        res["peak_memory_gib"] = {k: round(v, 3) for k, v in peaks.items()}
        res["peak_memory_ratio_vs_plain"] = {k: round(v / peaks["plain"], 4) for k, v in peaks.items()}
        res["step_memory_above_resident_gib"] = {k: round(v, 3) for k, v in extra.items()}
        res["step_memory_above_resident_ratio_vs_plain"] = {k: round(v / extra["plain"], 4) for k, v in extra.items()}
        res["peak_memory_how"] = (
            "torch.cuda.max_memory_allocated over 2 steps, reset after the build" if a.device == "cuda" else
            "peak RSS (VmHWM) of a child process per arm over 2 steps, the mark reset after the build (clear_refs)")
    if "denoise" in parts:
        res["denoise"] = time_denoise(pipe, a.methods.split(","), a.steps, a.rounds, a.device)
    if "profile" in parts:
        res["profile_one_step"] = profile_denoise(pipe, a.profile_methods.split(","), a.device)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return emit(res, a.out)


if __name__ == "__main__":
    sys.exit(main())
