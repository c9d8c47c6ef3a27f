"""The embedded tiny Stable Diffusion: real diffusers/transformers components, made small.

Layout mirrors SD 1.x so that every method that picks layers by block has layers to pick:
UNet2DConditionModel with cross-attention in down (2 blocks × 2 layers), mid (1) and up (2 blocks × 3 layers)
= 11 attn2 modules (SD 1.x has 16); CLIPTextModel + the real CLIP BPE tokenizer (77 tokens, EOS = PAD like
SD 1.x); DDPM/DDIM schedulers with SD's betas; and `PatchPCACodec` in the VAE slot.

The model is built and pretrained with CLIP's full 49,408-token vocabulary; the exported model keeps only the
tokens the lab's captions use (`trim_vocabulary`): the 512 byte-level characters, the merges that spell the
lab's words, BOS and EOS. 96 % of the text encoder's weights are its token embedding, and the rows of tokens no
caption contains were never trained, so they carried no information but cost 13 MB per model. Lab captions encode
to bit-identical conditioning (checked on all 16,800 at export); any other word is spelt from smaller pieces.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.util
import json
import math
import shutil
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from guard_train.lab.codec import PatchPCACodec
from guard_train.models.text import encode_text

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


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary trimming (see the module docstring).


def _bpe_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """The merges BPE applies to one pre-token (lowest rank first, as the tokenizer does)."""
    used: set[tuple[str, str]] = set()
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        used.add(best)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return used


def _trimmed_tokenizer_spec(spec: dict, texts: list[str]) -> tuple[dict, list[int]]:
    """tokenizer.json restricted to the byte-level characters, the merges `texts` use and the special tokens;
    returns the new spec and, for each new id, the old id (the embedding rows to keep)."""
    model = spec["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    ranks = {m: r for r, m in enumerate(merges)}
    backend = Tokenizer.from_str(json.dumps(spec))
    specials = {t["content"] for t in spec["added_tokens"]}
    used: set[tuple[str, str]] = set()
    for text in texts:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            if piece in specials:
                continue
            used |= _bpe_merges([*piece[:-1], piece[-1] + model["end_of_word_suffix"]], ranks)
    suffix = model["end_of_word_suffix"]
    chars = {t for t in model["vocab"] if len(t) == 1 or (len(t) == 1 + len(suffix) and t.endswith(suffix))}
    keep = chars | {a + b for a, b in used} | specials
    old_ids = sorted(model["vocab"][t] for t in keep)  # old order: characters first, specials last
    new_id = {old: new for new, old in enumerate(old_ids)}
    out = json.loads(json.dumps(spec))
    out["model"]["vocab"] = {t: new_id[i] for t, i in model["vocab"].items() if i in new_id}
    out["model"]["merges"] = [list(m) for m in merges if m in used]
    for tok in out["added_tokens"]:
        tok["id"] = new_id[tok["id"]]
    post = out.get("post_processor") or {}
    for key in ("sep", "cls"):
        if key in post:
            post[key] = [post[key][0], new_id[post[key][1]]]
    return out, old_ids


def safetensors_digest(model_dir: str | Path) -> str:
    """sha256 over a model dir's safetensors files (relative names and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).rglob("*.safetensors")):
        h.update(f.relative_to(model_dir).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def trim_vocabulary(model_dir: str | Path, texts: list[str], batch: int = 512, encode_every: int = 16) -> dict:
    """Rewrite a tiny-SD dir's tokenizer and text encoder to the vocabulary `texts` use, in place (atomically per
    component). Raises unless every text tokenizes to the same tokens as before (so, the embedding rows being the
    old rows, it gets the same conditioning) and every `encode_every`-th text encodes to bit-identical hidden states
    (the check that the rest of the encoder and its special-token ids came across); returns what was kept, for
    build_info.json."""
    d = Path(model_dir)
    spec = json.loads((d / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    old_tok = CLIPTokenizer.from_pretrained(d / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(d / "text_encoder", use_safetensors=True).eval()
    new_spec, old_ids = _trimmed_tokenizer_spec(spec, texts)
    if len(old_ids) == len(spec["model"]["vocab"]):
        return {"vocab_size": len(old_ids), "trimmed": False}
    tmp = d / "tokenizer.trim"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(d / "tokenizer", tmp)
    (tmp / "tokenizer.json").write_text(json.dumps(new_spec, ensure_ascii=False), encoding="utf-8")
    new_tok = CLIPTokenizer.from_pretrained(tmp)
    remap = {old: new for new, old in enumerate(old_ids)}
    cfg = copy.deepcopy(encoder.config)
    cfg.vocab_size = len(old_ids)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg, key, remap[getattr(cfg, key)])
    trimmed = CLIPTextModel(cfg)
    state = encoder.state_dict()
    (emb,) = [k for k in state if k.endswith("token_embedding.weight")]
    state[emb] = state[emb][old_ids]
    trimmed.load_state_dict(state)
    trimmed.eval()
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        a, b = old_tok(chunk).input_ids, new_tok(chunk).input_ids
        if any([remap[i] for i in x] != y for x, y in zip(a, b)):
            raise RuntimeError(f"trim_vocabulary: the trimmed tokenizer splits a text differently ({chunk[0]!r}…)")
    sample = texts[::encode_every]
    for start in range(0, len(sample), batch):
        chunk = sample[start : start + batch]
        if not torch.equal(encode_text(old_tok, encoder, chunk), encode_text(new_tok, trimmed, chunk)):
            raise RuntimeError(f"trim_vocabulary: the trimmed text encoder encodes differently ({chunk[0]!r}…)")
    enc_tmp = d / "text_encoder.trim"
    shutil.rmtree(enc_tmp, ignore_errors=True)
    trimmed.save_pretrained(enc_tmp)
    before = safetensors_digest(d)
    for name, src in (("tokenizer", tmp), ("text_encoder", enc_tmp)):
        shutil.rmtree(d / name)
        src.rename(d / name)
    return {"vocab_size": len(old_ids), "trimmed_from": len(spec["model"]["vocab"]),
            "merges": len(new_spec["model"]["merges"]), "texts_tokenized": len(texts), "texts_encoded": len(sample),
            "bit_identical": True,
            "weights_before": before, "weights_after": safetensors_digest(d)}
