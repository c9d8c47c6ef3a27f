"""The embedded tiny Stable Diffusion: real diffusers/transformers components, made small.

Layout mirrors SD 1.x so that every method that picks layers by block has layers to pick:
UNet2DConditionModel with cross-attention in down (2 blocks × 2 layers), mid (1) and up (2 blocks × 3 layers)
= 11 attn2 modules (SD 1.x has 16); CLIPTextModel + the real CLIP BPE tokenizer (77 tokens, BOS 49406,
EOS = PAD = 49407 like SD 1.x); DDPM/DDIM schedulers with SD's betas; and `PatchPCACodec` in the VAE slot.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from guard_train.lab.codec import PatchPCACodec

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


def unet_config(latent_channels: int = 16, sample_size: int = 16, text_dim: int = 64) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads (SD 1.x: 8)
        norm_num_groups=8,
    )


def text_config(vocab_size: int = 49408, hidden: int = 64) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode map (needed to rebuild vocab.json)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe_files(out_dir: str | Path) -> Path:
    """Write vocab.json + merges.txt of OpenAI's CLIP BPE (49408 tokens) from the copy that ships in the
    open-clip-torch wheel (installed --no-deps by scripts/setup.sh). Raises with the fix if it is missing."""
    spec = importlib.util.find_spec("open_clip")
    src = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz" if spec else None
    if src is None or not src.exists():
        raise FileNotFoundError(
            "The CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) was not found. It ships inside the "
            "open-clip-torch wheel: `pip install --no-deps open-clip-torch==3.3.0` (scripts/setup.sh does this)."
        )
    merges = gzip.open(src).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def clip_tokenizer(work_dir: str | Path) -> CLIPTokenizer:
    d = clip_bpe_files(Path(work_dir) / "clip_bpe")
    # transformers 5's CLIPTokenizer is tokenizers-backed and takes `vocab`/`merges` (paths or objects).
    return CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"), model_max_length=77)


def build_tiny_sd(codec: PatchPCACodec, tokenizer: CLIPTokenizer, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised tiny SD around a fitted codec (pretraining then makes it draw lab scenes)."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(vocab_size=len(tokenizer)))
    px = codec.config.sample_size
    unet = UNet2DConditionModel(
        **unet_config(codec.config.latent_channels, px // codec.config.patch_size, text_encoder.config.hidden_size)
    )
    return StableDiffusionPipeline(
        vae=codec, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def noise_scheduler(pipe_or_dir) -> DDPMScheduler:
    """The training scheduler (DDPM) with the pipeline's betas, as SD's training scripts use."""
    cfg = pipe_or_dir.scheduler.config if hasattr(pipe_or_dir, "scheduler") else DDPMScheduler.load_config(
        Path(pipe_or_dir) / "scheduler"
    )
    return DDPMScheduler.from_config(cfg)
