"""Our training loop (mitigations off) vs diffusers' LoRA example, same tiny model, data and settings: seconds per
step, measured in one run.

    python benchmarks/vs_diffusers_lora.py --script PATH/TO/diffusers/examples/text_to_image/train_text_to_image_lora.py

The example is not vendored (we do not copy its code): pass its path, e.g. from a clone of
https://github.com/huggingface/diffusers at a commit whose `check_min_version` our pinned diffusers satisfies.

Fairness:
* The example loads the VAE slot as `AutoencoderKL`, which our PCA codec is not, so both runs use a variant of the
  tiny SD whose VAE slot is a small random `AutoencoderKL` (16 latent channels, ×4 downsampling — the same latent
  shape). Weights do not matter for speed.
* Same data (the default lab as an imagefolder, read by both through 🤗 datasets / our imagefolder loader), batch
  16, 64 px, LoRA rank 4 on to_q/k/v/out, AdamW, fp32, no latent caching (the example has none), no validation,
  no checkpoints, 1 process, `accelerate launch` for both.
* torchvision: the only wheel available offline here (0.28.0, a CUDA build) cannot load its operators against
  the CPU torch, so the example runs through `benchmarks/_shims/run_example.py`, which gives it a PIL stand-in
  for `torchvision.transforms` (our code; on a machine with torchvision, pass --no-shim). The timed step (UNet
  forward/backward) does not touch it.
* Per-step time is the slope between a short and a long run of each ((wall_long − wall_short) / (N_long −
  N_short)), which removes start-up (imports, model load, dataset preparation); start-up is reported apart.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def aekl_variant(base: Path, out: Path) -> Path:
    """The tiny SD with a random AutoencoderKL in the VAE slot (same latent shape as our codec)."""
    from diffusers import AutoencoderKL

    shutil.copytree(base, out, ignore=shutil.ignore_patterns("vae", "build_info.json"))
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 32),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=1, norm_num_groups=16, sample_size=64,
                  scaling_factor=1.0).save_pretrained(out / "vae")
    idx = json.loads((out / "model_index.json").read_text())
    idx["vae"] = ["diffusers", "AutoencoderKL"]
    (out / "model_index.json").write_text(json.dumps(idx, indent=2))
    return out


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--script", required=True, help="diffusers' examples/text_to_image/train_text_to_image_lora.py")
    ap.add_argument("--base", default="models/tiny-sd")
    ap.add_argument("--short", type=int, default=10)
    ap.add_argument("--long", type=int, default=60)
    ap.add_argument("--out", default="results/vs_diffusers_lora.json")
    ap.add_argument("--no-shim", action="store_true", help="use the installed torchvision")
    a = ap.parse_args()
    script = Path(a.script)
    if not script.is_file():
        raise SystemExit(f"error: {script} not found: clone https://github.com/huggingface/diffusers and pass "
                         f"examples/text_to_image/train_text_to_image_lora.py")
    from guard_train.lab.dataset import LabConfig, build_lab, write_imagefolder

    tmp = Path(tempfile.mkdtemp(prefix="vs_diffusers_"))
    model = aekl_variant(ROOT / a.base, tmp / "model")
    data = write_imagefolder(build_lab(LabConfig()), tmp / "data") / "train"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "accelerate_configs/cpu_1proc.yaml")]

    def theirs(n: int) -> list[str]:
        shim = [] if a.no_shim else [str(ROOT / "benchmarks" / "_shims" / "run_example.py")]
        return [*launch, *shim, str(script), "--pretrained_model_name_or_path", str(model),
                "--train_data_dir", str(data),
                "--caption_column", "text", "--image_column", "image", "--resolution", "64", "--center_crop",
                "--train_batch_size", "16", "--max_train_steps", str(n), "--learning_rate", "1e-4", "--rank", "4",
                "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0", "--checkpointing_steps",
                "1000000", "--dataloader_num_workers", "0", "--output_dir", str(tmp / f"theirs_{n}"),
                "--report_to", "tensorboard", "--mixed_precision", "no"]

    def ours(n: int) -> list[str]:
        return [*launch, "train.py", "recipe=tiny_nomit", f"model.path={model}", "data.source=imagefolder",
                f"data.path={data}", "data.caption_dropout=0", "train.mode=lora", "train.lora_rank=4",
                "train.lora_alpha=4", "train.batch_size=16", f"train.max_steps={n}", "train.learning_rate=1e-4",
                "train.lr_scheduler=constant", "train.lr_warmup_steps=0", "train.cache_latents=false",
                "train.checkpoint_every=0", "summary.enabled=false", "run.report_to=tensorboard",
                f"run.output_dir={tmp}", f"run.name=ours_{n}"]

    walls = {}
    for name, make in (("diffusers_example", theirs), ("guard_train", ours)):
        for n in (a.short, a.long):
            walls[(name, n)] = timed(make(n), env)
            print(f"{name} {n} steps: {walls[(name, n)]:.1f} s", file=sys.stderr)
    per_step = {k: (walls[(k, a.long)] - walls[(k, a.short)]) / (a.long - a.short)
                for k in ("diffusers_example", "guard_train")}
    startup = {k: walls[(k, a.short)] - a.short * per_step[k] for k in per_step}
    shutil.rmtree(tmp, ignore_errors=True)
    return emit({
        "what": "seconds per LoRA training step, same tiny model (AutoencoderKL variant), data and settings",
        "diffusers_example": str(script), "steps": [a.short, a.long],
        "torchvision": "installed" if a.no_shim else "PIL stand-in (benchmarks/_shims/run_example.py)",
        "s_per_step": {k: round(v, 4) for k, v in per_step.items()},
        "startup_s": {k: round(v, 1) for k, v in startup.items()},
        "ratio_s_per_step_guard_train_over_diffusers": round(
            per_step["guard_train"] / per_step["diffusers_example"], 3),
        "walls_s": {f"{k}_{n}": round(v, 1) for (k, n), v in walls.items()},
    }, a.out)


if __name__ == "__main__":
    sys.exit(main())
