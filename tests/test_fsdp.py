"""A full fine-tune with the UNet sharded by FSDP2 across 2 CPU processes (train.fsdp=true; accelerate ignores an
FSDP config without CUDA, so the loop shards it itself), with the entropy filter and the memorization callback:
sharded checkpoints, a resume equal to the uninterrupted run, the same updates as replicated (DDP) training up to
float summation order, and a full-weight export. CI's slow step."""

import subprocess

import pytest
import torch
from conftest import PY, ROOT, read_metrics, small_lab_args
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _launch(tmp_path, model, port: int, **extra) -> subprocess.CompletedProcess:
    args = small_lab_args(tmp_path, model, **{"train.mode": "full", "train.learning_rate": 1e-4,
                                              "mitigation.entropy_filter.enabled": "true",
                                              "mitigation.entropy_filter.warmup_steps": 2,
                                              "mitigation.entropy_filter.buckets": 2, **extra})
    cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
           "--main_process_port", str(port), str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _unet(run) -> dict:
    return load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors")


def test_fsdp_full_fine_tune_checkpoint_resume_and_export(tmp_path, tiny_sd_dir):
    whole = _launch(tmp_path, tiny_sd_dir, 29651, **{"run.name": "whole", "train.fsdp": "true",
                                                      "train.max_steps": 4})
    assert whole.returncode == 0, whole.stderr[-3000:]
    part = _launch(tmp_path, tiny_sd_dir, 29652, **{"run.name": "part", "train.fsdp": "true", "train.max_steps": 2,
                                                     "train.checkpoint_every": 2, "eval.at_end": "true",
                                                     "eval.methods": "[cfg]", "eval.prompts_per_group": 1,
                                                     "eval.images_per_prompt": 1, "eval.steps": 2})
    assert part.returncode == 0, part.stderr[-3000:]
    ck = tmp_path / "part" / "checkpoints" / "checkpoint-2"
    assert (ck / "COMPLETE").exists() and any((ck / "fsdp").glob("*.distcp"))  # every rank's shard
    assert (tmp_path / "part" / "memorization" / "final" / "metrics.json").exists()  # the callback on a sharded UNet
    more = _launch(tmp_path, tiny_sd_dir, 29653, **{"run.name": "part", "train.fsdp": "true", "train.max_steps": 4,
                                                     "resume": "latest"})
    assert more.returncode == 0, more.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "part")] == [1, 2, 3, 4]
    a, b = _unet(tmp_path / "whole"), _unet(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume = uninterrupted, exactly
    ddp = _launch(tmp_path, tiny_sd_dir, 29654, **{"run.name": "ddp", "train.max_steps": 4})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    c = _unet(tmp_path / "ddp")
    base = load_file(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    moved = sum((a[k] - base[k]).norm() ** 2 for k in a) ** 0.5
    differ = sum((a[k] - c[k]).norm() ** 2 for k in a) ** 0.5
    assert moved > 0 and differ < 1e-3 * moved  # the same training, up to reduction order
