import signal
import subprocess
import time

import pytest
import torch

from conftest import PY, ROOT, read_metrics, small_lab_args
from guard_train.config.loader import load_config
from guard_train.training.hooks import Hooks
from guard_train.training.loop import NonFiniteError, Trainer, train


def test_sigterm_saves_checkpoint_exits_75_and_resume_is_exact(tmp_path, tiny_sd_dir):
    common = {"train.max_steps": 40, "train.learning_rate": 5e-4}
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "straight"})))
    args = small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "pre"})
    p = subprocess.Popen([PY, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    t0 = time.time()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 75, err[-2000:]
    assert time.time() - t0 < 60
    ck = sorted((tmp_path / "pre" / "checkpoints").glob("checkpoint-*"))
    assert ck and (ck[-1] / "COMPLETE").exists() and "preempted" in out + err
    stopped_at = int(ck[-1].name.split("-")[1])
    assert 3 <= stopped_at < 40
    r = subprocess.run([PY, "train.py", *args, "resume=latest"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "straight")}
    b = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "pre")}
    assert sorted(b) == list(range(1, 41)) and all(a[k] == b[k] for k in a)


def _nan_hook(steps):
    calls = {"n": 0}

    def hook(ctx):
        calls["n"] += 1
        w = torch.ones(len(ctx.ids))
        return w * float("nan") if calls["n"] in steps else w

    return hook


def test_transient_nan_is_skipped_and_persistent_nan_stops(tmp_path, tiny_sd_dir):
    t = Trainer(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{"run.name": "once", "train.max_steps": 4})),
                Hooks(loss_weighting=[_nan_hook({2})]))
    t.train()
    t.close()
    m = read_metrics(tmp_path / "once")
    assert [x["step"] for x in m] == [1, 2, 3, 4] and m[-1]["skipped_nonfinite"] == 1
    t = Trainer(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{
        "run.name": "always", "train.max_steps": 10, "train.checkpoint_every": 2,
        "train.max_consecutive_nonfinite": 3})), Hooks(loss_weighting=[_nan_hook(set(range(5, 100)))]))
    with pytest.raises(NonFiniteError, match="3 non-finite losses in a row"):
        t.train()
    t.close()
    assert (tmp_path / "always" / "checkpoints" / "checkpoint-4" / "COMPLETE").exists()  # last good one kept
