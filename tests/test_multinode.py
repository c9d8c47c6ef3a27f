"""Training across two "machines" on one host (accelerate's --num_machines 2, one process each, CPU/gloo): the tiny
lab with the entropy filter, duplicate-aware sampling and the memorization callback, a checkpoint, then a resume
that continues exactly where it stopped. CI's slow step."""

import os
import subprocess

import pytest
from conftest import PY, ROOT, read_metrics, small_lab_args

pytestmark = pytest.mark.slow


def _two_machines(tmp_path, model, port: int, **extra) -> list[subprocess.CompletedProcess]:
    args = small_lab_args(tmp_path, model, **extra)
    procs = []
    for rank in (0, 1):
        cmd = [PY, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs/cpu_2machines.yaml"), "--machine_rank", str(rank),
               "--main_process_port", str(port), str(ROOT / "train.py"), *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    out = []
    for p in procs:
        o, e = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return out


def test_two_machines_train_with_mitigations_and_callback_then_resume(tmp_path, tiny_sd_dir):
    common = {"run.name": "nodes", "train.checkpoint_every": 3, "mitigation.entropy_filter.enabled": "true",
              "mitigation.entropy_filter.warmup_steps": 2, "mitigation.entropy_filter.buckets": 2,
              "mitigation.dup_sampling.enabled": "true", "eval.every_n_steps": 3, "eval.methods": "[cfg]",
              "eval.prompts_per_group": 1, "eval.images_per_prompt": 1, "eval.steps": 2}
    first = _two_machines(tmp_path, tiny_sd_dir, 29641, **common, **{"train.max_steps": 3})
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-3000:] + first[1].stderr[-3000:]
    run = tmp_path / "nodes"
    ck = run / "checkpoints" / "checkpoint-3"
    assert (ck / "COMPLETE").exists()
    assert sorted(p.name for p in ck.glob("rank_state_*.pt")) == ["rank_state_0.pt", "rank_state_1.pt"]
    assert (run / "memorization").exists()  # the callback ran across both machines
    again = _two_machines(tmp_path, tiny_sd_dir, 29642, **common, **{"train.max_steps": 5, "resume": "latest"})
    assert [r.returncode for r in again] == [0, 0], again[0].stderr[-3000:] + again[1].stderr[-3000:]
    text = again[0].stdout + again[0].stderr
    assert "resumed from" in text and "checkpoint-3" in text
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5]
