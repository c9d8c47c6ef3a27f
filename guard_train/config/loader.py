"""`recipe=NAME key.sub=value …` → a validated Config. Errors are `ConfigError` (exit code 2 in the CLI)."""

from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from guard_train.config.schema import Config

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
ALIASES = {"resume": "run.resume", "output_dir": "run.output_dir", "overwrite": "run.overwrite"}
DATA_SOURCES = ("lab", "imagefolder", "parquet", "hf_disk", "webdataset", "img2dataset")


class ConfigError(ValueError):
    """A problem with the user's configuration; the message names the problem and the fix."""


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        t = f.default_factory() if callable(getattr(f, "default_factory", None)) else None  # type: ignore[misc]
        if is_dataclass(t):
            out += all_keys(type(t), prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def recipe_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    p = RECIPES_DIR / f"{name}.yaml"
    if not p.exists():
        have = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown recipe {name!r}. Available recipes: {', '.join(have)} (or a path to a .yaml file)")
    return p


def _parse_overrides(args: list[str]) -> dict[str, str]:
    out = {}
    for a in args:
        if "=" not in a or a.startswith("-"):
            raise ConfigError(f"cannot parse argument {a!r}: arguments are key=value (e.g. train.learning_rate=1e-4)")
        k, v = a.split("=", 1)
        out[ALIASES.get(k.strip(), k.strip())] = v
    return out


def _closest(key: str) -> str:
    keys = all_keys()
    m = difflib.get_close_matches(key, keys, n=1, cutoff=0.5) or difflib.get_close_matches(
        key.split(".")[-1], [k.split(".")[-1] for k in keys], n=1, cutoff=0.6
    )
    if not m:
        return ""
    full = next((k for k in keys if k == m[0] or k.endswith("." + m[0])), m[0])
    return f" Did you mean {full!r}?"


def load_config(args: list[str]) -> Config:
    """Compose schema defaults ← recipe file ← overrides, then validate. Pure: writes nothing."""
    over = _parse_overrides(args)
    recipe = over.pop("recipe", "tiny")
    base = OmegaConf.structured(Config)
    try:
        rec = OmegaConf.load(recipe_path(recipe))
    except OmegaConfBaseException as e:
        raise ConfigError(f"recipe {recipe!r} is not valid YAML: {e}") from None
    merged = base
    for src, layer in (("recipe " + recipe, rec), ("command line", OmegaConf.from_dotlist([f"{k}={v}" for k, v in over.items()]))):
        try:
            merged = OmegaConf.merge(merged, layer)
        except ConfigKeyError as e:
            key = f"{e.full_key}" if getattr(e, "full_key", None) else str(e)
            raise ConfigError(f"unknown config key {key!r} (from {src}).{_closest(key)}") from None
        except ValidationError as e:
            raise ConfigError(
                f"wrong type for {e.full_key!r} (from {src}): {e.msg.splitlines()[0]}. "
                f"Expected {_type_name(e.full_key)}."
            ) from None
    merged.recipe = Path(recipe).stem
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def _type_name(key: str) -> str:
    obj: object = Config()
    for part in key.split("."):
        obj = getattr(obj, part, None)
    return type(obj).__name__ if obj is not None else "a value of the documented type"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    t, d, s = cfg.train, cfg.data, cfg.summary
    _check(t.mode in ("lora", "full"), f"train.mode must be 'lora' or 'full', got {t.mode!r}")
    _check(t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1")
    _check(t.max_steps > 0 or t.epochs > 0, "set train.max_steps > 0 or train.epochs > 0")
    _check(t.max_steps >= 0 and t.epochs >= 0, "train.max_steps and train.epochs must be >= 0")
    _check(t.lora_rank >= 1, f"train.lora_rank must be >= 1, got {t.lora_rank}")
    _check(t.optimizer in ("adamw", "adamw8bit"), f"train.optimizer must be adamw or adamw8bit, got {t.optimizer!r}")
    _check(t.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision must be no, fp16 or bf16")
    _check(0.0 < t.ema_decay < 1.0, f"train.ema_decay must be in (0, 1), got {t.ema_decay}")
    _check(t.noise_offset >= 0 and t.snr_gamma >= 0, "train.noise_offset and train.snr_gamma must be >= 0")
    _check(t.v_weight_cap == 0 or t.v_weight_cap >= 1, f"train.v_weight_cap must be 0 (off) or >= 1, got {t.v_weight_cap}")
    _check(not (t.v_weight_cap and t.snr_gamma), "set train.v_weight_cap or train.snr_gamma, not both")
    _check(t.max_grad_norm > 0, "train.max_grad_norm must be > 0")
    _check(t.timestep_bias_strategy in ("none", "later", "earlier", "range"),
           f"train.timestep_bias_strategy must be none, later, earlier or range, got {t.timestep_bias_strategy!r}")
    _check(t.timestep_bias_multiplier > 0, f"train.timestep_bias_multiplier must be > 0, got {t.timestep_bias_multiplier}")
    _check(0.0 < t.timestep_bias_portion <= 1.0, f"train.timestep_bias_portion must be in (0, 1], got {t.timestep_bias_portion}")
    _check(0 <= t.timestep_bias_begin < t.timestep_bias_end,
           f"train.timestep_bias_begin must be >= 0 and < train.timestep_bias_end, got {t.timestep_bias_begin}, {t.timestep_bias_end}")
    _check(not t.init_lora or t.mode == "lora", "train.init_lora needs train.mode=lora")
    if t.init_lora:
        _check(Path(t.init_lora).exists(), f"train.init_lora: {t.init_lora} does not exist (a LoRA dir with "
               "pytorch_lora_weights.safetensors, or the .safetensors file)")
    _check(cfg.run.collective_timeout_s >= 10, "run.collective_timeout_s must be >= 10 (seconds)")
    _check(t.checkpoint_every >= 0 and t.checkpoints_total_limit >= 1,
           "train.checkpoint_every must be >= 0 and train.checkpoints_total_limit >= 1")
    from diffusers.optimization import SchedulerType

    names = [x.value for x in SchedulerType]
    _check(t.lr_scheduler in names, f"train.lr_scheduler {t.lr_scheduler!r} is not one of {names}")
    _check(0.0 <= d.caption_dropout < 1.0, f"data.caption_dropout must be in [0, 1), got {d.caption_dropout}")
    _check(d.resolution >= 8 and d.resolution % 8 == 0, f"data.resolution must be a multiple of 8, got {d.resolution}")
    _check(d.source in DATA_SOURCES, f"data.source must be one of {DATA_SOURCES}, got {d.source!r}")
    _check(s.backend in ("sscd", "pixel"), f"summary.backend must be sscd or pixel, got {s.backend!r}")
    _check(0.0 < s.copy_threshold < 1.0, "summary.copy_threshold must be in (0, 1)")
    _check(0 <= s.probe_timestep < 1000, "summary.probe_timestep must be in [0, 1000)")
    try:
        d.lab.validate()
    except ValueError as e:
        raise ConfigError(f"data.{e}") from None
    m = cfg.mitigation
    try:
        m.entropy_filter.validate("mitigation.entropy_filter")
        m.magnitude_filter.validate("mitigation.magnitude_filter")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(m.dup_sampling.alpha >= 0, "mitigation.dup_sampling.alpha must be >= 0")
    _check(m.dup_sampling.threshold >= 0, "mitigation.dup_sampling.threshold must be >= 0 (0 = the backend's default)")
    _check(m.dup_sampling.group_by in ("image", "caption", "both"),
           "mitigation.dup_sampling.group_by must be image, caption or both")
    _check(not (m.dup_sampling.enabled and m.injection.enabled),
           "mitigation.dup_sampling and mitigation.injection both set the data order: enable one")
    _check(m.captions.mode in ("none", "rc", "rt", "cwr"), "mitigation.captions.mode must be none, rc, rt or cwr")
    _check(0.0 <= m.captions.p <= 1.0 and m.captions.gn_lambda >= 0, "mitigation.captions.p in [0, 1], gn_lambda >= 0")
    _check(0.0 < m.injection.fraction < 1.0 and m.injection.weight > 0, "mitigation.injection.fraction in (0, 1)")
    _check(not (d.streaming and (m.dup_sampling.enabled or m.injection.enabled)),
           "weighted sampling (dup_sampling / injection) needs a map-style dataset: set data.streaming=false")
    e = cfg.eval
    _check(min(e.every_n_epochs, e.every_n_steps, e.prompts_per_group - 1, e.images_per_prompt - 1, e.steps - 1) >= 0,
           "eval.every_n_* must be >= 0 and eval.prompts_per_group, images_per_prompt, steps >= 1")
    _check(0.0 < e.copy_threshold < 1.0, f"eval.copy_threshold must be in (0, 1), got {e.copy_threshold}")
    _check(0.0 <= e.copy_rate_limit <= 1.0, f"eval.copy_rate_limit must be in [0, 1] (0 = off), got {e.copy_rate_limit}")
    from guard_train.guidance.strategies import METHODS

    bad = [x for x in e.methods if x not in METHODS]
    _check(not bad, f"eval.methods {bad} unknown; methods: {', '.join(METHODS)}")
    if m.dup_sampling.clusters:
        _check(Path(m.dup_sampling.clusters).is_file(), f"mitigation.dup_sampling.clusters "
               f"{m.dup_sampling.clusters!r} does not exist: run `guard-train dedup` first or leave it empty")
    if d.source != "lab":
        _check(bool(d.path), f"data.path is required for data.source={d.source}: point it at your dataset "
                             f"(a local directory or file; nothing is downloaded at run time)")
        _check(any(Path(p).exists() for p in _expand(d.path)),
               f"data.path {d.path!r} does not exist. Give a local copy of the dataset (e.g. LAION-10k as "
               f"parquet or an img2dataset output folder); nothing is downloaded at run time.")
    _check_model_path(cfg.model.path)
    _check((not (e.every_n_epochs or e.every_n_steps or e.at_end)) or d.source == "lab",
           "the memorization callback (eval.every_n_epochs / every_n_steps / at_end) needs data.source=lab in this "
           "version; turn it off with eval.every_n_steps=0 eval.every_n_epochs=0 eval.at_end=false")
    _check(cfg.run.resume in ("", "latest") or Path(cfg.run.resume).is_dir(),
           f"run.resume must be '', 'latest' or an existing checkpoint directory, got {cfg.run.resume!r}")


def _expand(path: str) -> list[str]:
    import glob

    return glob.glob(path) or [path]


def _check_model_path(path: str) -> None:
    """A local diffusers dir, or a hub id that is already in the local HF cache (offline use)."""
    p = Path(path)
    if p.is_dir():
        _check((p / "model_index.json").exists() or (p / "unet").is_dir(),
               f"model.path {path!r} is a directory but not a diffusers Stable Diffusion layout "
               f"(no model_index.json). Save one with pipe.save_pretrained(dir).")
        return
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/"))
    if looks_like_hub_id:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(path, "model_index.json")
        _check(isinstance(hit, str),
               f"model.path {path!r} is not a local directory and is not in the local Hugging Face cache. "
               f"On a machine with access run `huggingface-cli download {path}` (or save the pipeline with "
               f"save_pretrained) and point model.path at the directory.")
        return
    raise ConfigError(f"model.path {path!r} does not exist. Point it at a diffusers SD directory "
                      f"(the embedded default is models/tiny-sd).")


def resolve_model_path(path: str) -> str:
    """Relative model paths are tried against the CWD first, then the repository root."""
    if Path(path).exists() or os.path.isabs(path):
        return path
    alt = RECIPES_DIR.parent / path
    return str(alt) if alt.exists() else path
