"""`recipe=NAME key.sub=value …` → a validated Config. Errors are `ConfigError` (exit code 2 in the CLI)."""

from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from guard_train.config.params import NONE_WORDS, ParamValueError, base_type, check_dataclass, type_hints
from guard_train.config.paths import PathError, check_lora_input, check_run_name
from guard_train.config.schema import Config
from guard_train.guidance.strategies import METHODS
from guard_train.training.mitigations import active as active_mitigations
from guard_train.training.mitigations import check as check_mitigations

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
ALIASES = {"resume": "run.resume", "output_dir": "run.output_dir", "overwrite": "run.overwrite"}


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


def _closest(key: str, schema: type = Config) -> str:
    keys = all_keys(schema)
    m = difflib.get_close_matches(key, keys, n=1, cutoff=0.5) or difflib.get_close_matches(
        key.split(".")[-1], [k.split(".")[-1] for k in keys], n=1, cutoff=0.6
    )
    if not m:
        return ""
    full = next((k for k in keys if k == m[0] or k.endswith("." + m[0])), m[0])
    return f" Did you mean {full!r}?"


def _schema_type(key: str, schema: type = Config):
    """The declared type of a dotted key (None when the key is unknown: the merge reports it)."""
    cls: object = schema
    for part in key.split("."):
        hints = type_hints(cls) if isinstance(cls, type) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _is_str_key(key: str, schema: type) -> bool:
    return base_type(_schema_type(key, schema))[0] is str


def _override_layer(over: dict[str, str], schema: type) -> DictConfig:
    """The command line as a config layer. A string key keeps the user's text as typed: YAML would read
    `train.mixed_precision=no` as the boolean false; an optional one reads none/null as None."""
    layer = OmegaConf.from_dotlist([f"{k}={v}" for k, v in over.items() if not _is_str_key(k, schema)])
    for k, v in over.items():
        if _is_str_key(k, schema):
            none = base_type(_schema_type(k, schema))[1] and v.strip().lower() in NONE_WORDS
            OmegaConf.update(layer, k, None if none else v, force_add=True)
    return layer


def _load_recipe(recipe: str, schema: type) -> DictConfig:
    path = recipe_path(recipe)
    try:
        rec = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}" if mark else str(e).strip()[:200]
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML ({where}); fix the file or pick another "
                          f"recipe") from None
    if rec is None or not isinstance(rec, DictConfig):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping of sections (model:, data:, train: …)")
    _recipe_bools_as_strings(rec, schema)
    return rec


def _recipe_bools_as_strings(rec: DictConfig, schema: type, prefix: str = "") -> None:
    """YAML 1.1 reads `mixed_precision: no` as false; for a string key whose allowed values include "no", that is
    what the user wrote (accelerate's spelling)."""
    for k in list(rec.keys()):
        key, v = f"{prefix}{k}", rec[k]
        if isinstance(v, DictConfig):
            _recipe_bools_as_strings(v, schema, key + ".")
        elif isinstance(v, bool) and _is_str_key(key, schema) and "no" in _choices(key, schema):
            rec[k] = "yes" if v else "no"


def _choices(key: str, schema: type) -> tuple:
    section, _, name = key.rpartition(".")
    cls = _schema_type(section, schema) if section else schema
    f = next((f for f in fields(cls) if f.name == name), None) if isinstance(cls, type) else None
    rng = f.metadata.get("range") if f is not None and f.metadata else None
    return rng.choices if rng else ()


def load_config(args: list[str], schema: type[Config] = Config) -> Config:
    """Compose schema defaults ← recipe file ← overrides, then validate. Pure: writes nothing. `schema` is Config
    or a subclass that adds sections (the lab's: guard_train/lab/config.py, which the CLI uses)."""
    over = _parse_overrides(args)
    recipe = over.pop("recipe", "tiny")
    base = OmegaConf.structured(schema)
    rec = _load_recipe(recipe, schema)
    merged = base
    for src, layer in (("recipe " + recipe, rec), ("command line", _override_layer(over, schema))):
        try:
            merged = OmegaConf.merge(merged, layer)
        except ConfigKeyError as e:
            key = f"{e.full_key}" if getattr(e, "full_key", None) else str(e)
            raise ConfigError(f"unknown config key {key!r} (from {src}).{_closest(key, schema)}{_lab_hint(key, schema)}"
                              ) from None
        except ValidationError as e:
            raise ConfigError(
                f"wrong type for {e.full_key!r} (from {src}): {e.msg.splitlines()[0]}. "
                f"Expected {_type_name(e.full_key, schema)}."
            ) from None
    merged.recipe = Path(recipe).stem
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def _lab_hint(key: str, schema: type) -> str:
    if schema is Config and key.split(".")[:2] == ["data", "lab"]:
        return " (the lab's keys belong to the lab's schema: guard_train.lab.config.load_config, as the CLI uses)"
    return ""


def _type_name(key: str, schema: type) -> str:
    obj: object = schema()
    for part in key.split("."):
        obj = getattr(obj, part, None)
    return type(obj).__name__ if obj is not None else "a value of the documented type"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    try:  # every key's declared range (schema.py) and finiteness
        check_dataclass(cfg)
    except ParamValueError as e:
        raise ConfigError(str(e)) from None
    t, d = cfg.train, cfg.data
    _check(t.max_steps > 0 or t.epochs > 0, "set train.max_steps > 0 or train.epochs > 0")
    _check(not (t.v_weight_cap and t.snr_gamma), "set train.v_weight_cap or train.snr_gamma, not both")
    _check(t.timestep_bias_begin < t.timestep_bias_end,
           f"train.timestep_bias_begin must be >= 0 and < train.timestep_bias_end, "
           f"got {t.timestep_bias_begin}, {t.timestep_bias_end}")
    _check(not t.init_lora or t.mode == "lora", "train.init_lora needs train.mode=lora")
    _check(not t.fsdp or (t.mode == "full" and not t.ema and t.optimizer == "adamw"),
           "train.fsdp=true shards a full fine-tune: it needs train.mode=full, train.ema=false and "
           "train.optimizer=adamw")
    if t.init_lora:
        _check(Path(t.init_lora).exists(), f"train.init_lora: {t.init_lora} does not exist (a LoRA dir with "
               "pytorch_lora_weights.safetensors, or the .safetensors file)")
        _check_input(lambda: check_lora_input(t.init_lora, "train.init_lora"))
    from diffusers.optimization import SchedulerType

    names = [x.value for x in SchedulerType]
    _check(t.lr_scheduler in names, f"train.lr_scheduler {t.lr_scheduler!r} is not one of {names}")
    _check(d.resolution % 8 == 0, f"data.resolution must be a multiple of 8, got {d.resolution}")
    try:
        d.validate()
    except ValueError as e:
        raise ConfigError(f"data.{e}") from None
    try:
        check_mitigations(cfg.mitigation)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    samplers = [m.section for m in active_mitigations(cfg.mitigation) if m.sets_sampler]
    _check(not (d.streaming and samplers),
           f"weighted sampling (mitigation.{', '.join(samplers)}) needs a map-style dataset: set data.streaming=false")
    e = cfg.eval
    _check(min(e.every_n_epochs, e.every_n_steps, e.prompts_per_group - 1, e.images_per_prompt - 1, e.steps - 1,
               e.max_batch - 1) >= 0,
           "eval.every_n_* must be >= 0 and eval.prompts_per_group, images_per_prompt, steps, max_batch >= 1")
    _check(0.0 < e.copy_threshold < 1.0, f"eval.copy_threshold must be in (0, 1), got {e.copy_threshold}")
    _check(0.0 <= e.copy_rate_limit <= 1.0,
           f"eval.copy_rate_limit must be in [0, 1] (0 = off), got {e.copy_rate_limit}")

    bad = [x for x in e.methods if x not in METHODS]
    _check(not bad, f"eval.methods {bad} unknown; methods: {', '.join(METHODS)}")
    if not d.generated():
        _check(bool(d.path), f"data.path is required for data.source={d.source}: point it at your dataset "
                             f"(a local directory or file; nothing is downloaded at run time)")
        _check(any(Path(p).exists() for p in _expand(d.path)),
               f"data.path {d.path!r} does not exist. Give a local copy of the dataset (e.g. LAION-10k as "
               f"parquet or an img2dataset output folder); nothing is downloaded at run time.")
    _check_model_path(cfg.model.path)
    if e.wants_callback():
        _check(d.generated() or bool(e.reference),
               "the memorization callback (eval.every_n_epochs / every_n_steps / at_end) needs its reference set: set "
               "eval.reference to a dataset of the training images (a dir with a manifest.jsonl, or an imagefolder / "
               "parquet plus eval.prompts), or use a generated dataset (data.source=lab); or turn it off with "
               "eval.every_n_steps=0 eval.every_n_epochs=0 eval.at_end=false")
        if e.reference:
            _check(Path(e.reference).exists(), f"eval.reference {e.reference!r} does not exist (a dataset dir with a "
                   "manifest.jsonl, or an imagefolder / parquet of the training images)")
            _check(bool(e.prompts) or (Path(e.reference) / "manifest.jsonl").exists(),
                   f"eval.reference {e.reference!r} has no manifest.jsonl to take prompt groups from: set eval.prompts "
                   "(a .txt, one prompt per line, or .jsonl)")
        _check(not e.prompts or Path(e.prompts).is_file(), f"eval.prompts {e.prompts!r} is not a file (a .txt, one "
               "prompt per line, or .jsonl of {\"prompt\", \"group\", \"owner\"})")
    _check(cfg.run.resume in ("", "latest") or Path(cfg.run.resume).is_dir(),
           f"run.resume must be '', 'latest' or an existing checkpoint directory, got {cfg.run.resume!r}")
    _check_input(lambda: check_run_name(cfg.run.name, cfg.run.output_dir))


def _check_input(fn) -> None:
    """A path check of config/paths.py, its refusal as a ConfigError (exit 2)."""
    try:
        fn()
    except PathError as e:
        raise ConfigError(str(e)) from None


def _expand(path: str) -> list[str]:
    import glob

    return glob.glob(path) or [path]


def _check_model_path(path: str, key: str = "model.path") -> None:
    """A local diffusers dir, or a hub id that is already in the local HF cache (offline use). `key` names the
    setting in the message (the config key, or a CLI flag such as --model)."""
    p = Path(path)
    if p.is_dir():
        _check((p / "model_index.json").exists() or (p / "unet").is_dir(),
               f"{key} {path!r} is a directory but not a diffusers Stable Diffusion layout "
               f"(no model_index.json). Save one with pipe.save_pretrained(dir).")
        return
    _check(not p.exists(), f"{key} {path!r} is a file; point it at a diffusers SD directory (model_index.json, "
                           f"unet/, vae/, …)")
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/"))
    if looks_like_hub_id:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(path, "model_index.json")
        _check(isinstance(hit, str),
               f"{key} {path!r} is not a local directory and is not in the local Hugging Face cache. "
               f"On a machine with access run `huggingface-cli download {path}` (or save the pipeline with "
               f"save_pretrained) and point model.path at the directory.")
        return
    raise ConfigError(f"{key} {path!r} does not exist. Point it at a diffusers SD directory "
                      f"(the embedded default is models/tiny-sd).")


def check_model_arg(path: str, flag: str = "--model") -> str:
    """A CLI flag naming a base model: the same rule as model.path (resolved like it); returns the resolved path."""
    resolved = resolve_model_path(path)
    _check_model_path(resolved, flag)
    return resolved


def resolve_model_path(path: str) -> str:
    """Relative model paths are tried against the CWD first, then the repository root."""
    if Path(path).exists() or os.path.isabs(path):
        return path
    alt = RECIPES_DIR.parent / path
    return str(alt) if alt.exists() else path
