import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import PY, ROOT, read_metrics, small_lab_args

from guard_train.callbacks import train  # the loop with the callbacks cfg.eval asks for, as train.py runs it
from guard_train.lab.config import load_config
from guard_train.training import checkpoint as ckpt
from guard_train.training.hooks import Hooks
from guard_train.training.loop import NonFiniteError, Trainer


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="SIGTERM"),
                                 pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow)])
def test_sigterm_saves_checkpoint_exits_75_and_resume_is_exact(tmp_path, tiny_sd_dir, sig):
    common = {"train.max_steps": 40, "train.learning_rate": 5e-4}
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "straight"})))
    args = small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "pre"})
    p = subprocess.Popen([PY, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(sig)
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
    with pytest.raises(NonFiniteError, match="3 non-finite losses/gradients in a row"):
        t.train()
    t.close()
    assert (tmp_path / "always" / "checkpoints" / "checkpoint-4" / "COMPLETE").exists()  # last good one kept


def _wait_for_steps(run, n, proc, limit=180):
    deadline = time.time() + limit
    m = run / "metrics.jsonl"
    while time.time() < deadline and (not m.exists() or len(m.read_text().splitlines()) < n):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)


def _final_weights(run):
    from safetensors.torch import load_file

    return load_file(run / "final/unet/diffusion_pytorch_model.safetensors")


# the default recipe's mitigations (entropy filter, duplicate-aware sampler) and EMA, so their state is covered too
_MITIGATED = {"recipe": "tiny", "train.max_steps": 24, "train.checkpoint_every": 5, "train.ema": "true",
              "train.learning_rate": 5e-4, "mitigation.entropy_filter.warmup_steps": 4,
              "mitigation.entropy_filter.buckets": 2}


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, tiny_sd_dir):
    """SIGKILL (no handler can run) after step >= 13, mid-epoch (7 batches per epoch); resume=latest replays from the
    last complete checkpoint. Same per-step loss (bitwise) at every step means the same samples in the same order:
    a skipped or repeated batch would change it."""
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **_MITIGATED, **{"run.name": "straight"})))
    args = small_lab_args(tmp_path, tiny_sd_dir, **_MITIGATED, **{"run.name": "killed"})
    run = tmp_path / "killed"
    p = subprocess.Popen([PY, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run, 13, p)
    p.kill()
    p.wait(timeout=30)
    logged = len(read_metrics(run))
    resumed_from = int(ckpt.latest_checkpoint(run).name.split("-")[1])
    assert resumed_from % 5 == 0 and resumed_from < logged <= 24, (resumed_from, logged)
    r = subprocess.run([PY, "train.py", *args, "resume=latest"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [m["step"] for m in b] == list(range(1, 25))  # each step logged once ...
    discarded = [json.loads(l) for l in (run / "metrics.discarded.jsonl").read_text().splitlines()]
    assert [m["step"] for m in discarded] == list(range(resumed_from + 1, logged + 1))  # ... the replayed ones kept
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m.get("entropy_filter_kept") for m in a] == [m.get("entropy_filter_kept") for m in b]
    assert [m["lr"] for m in a] == [m["lr"] for m in b]
    wa, wb = _final_weights(tmp_path / "straight"), _final_weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # EMA weights: bitwise equal


@pytest.mark.parametrize("mode", [pytest.param("before_rename", marks=pytest.mark.slow), "before_marker"])
def test_kill_during_checkpoint_save_resumes_from_the_last_complete_one(tmp_path, tiny_sd_dir, mode):
    common = {"train.max_steps": 12, "train.checkpoint_every": 4, "train.learning_rate": 5e-4,
              "train.checkpoints_total_limit": 1}
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "straight"})))
    args = small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "cut"})
    run = tmp_path / "cut"
    r = subprocess.run([PY, "tests/helpers/die_in_save.py", mode, "8", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    partial = run / "checkpoints" / ("checkpoint-8.tmp" if mode == "before_rename" else "checkpoint-8")
    assert (partial / "model.safetensors").exists() or any(partial.glob("*.safetensors"))  # really half-written
    assert not (partial / ckpt.MARKER).exists()
    assert ckpt.latest_checkpoint(run).name == "checkpoint-4"  # never the partial one; limit 1 kept the good one
    r = subprocess.run([PY, "train.py", *args, "resume=latest"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "checkpoint-4" in r.stdout + r.stderr
    a, b = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [m["step"] for m in b] == list(range(1, 13)) and [m["loss"] for m in a] == [m["loss"] for m in b]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-12"]  # partial one replaced


def test_retention_never_deletes_the_only_complete_checkpoint(tmp_path, monkeypatch):
    ck = tmp_path / "checkpoints"
    for name, complete in [("checkpoint-5", True), ("checkpoint-10", False), ("checkpoint-12.tmp", False)]:
        (ck / name).mkdir(parents=True)
        if complete:
            (ck / name / ckpt.MARKER).write_text("ok\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-5"  # incomplete 10 and .tmp 12 are not taken
    # a crash inside finalize (rename fails) leaves the previous complete checkpoint in place
    ckpt.tmp_dir(tmp_path, 15).mkdir()
    monkeypatch.setattr(ckpt.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ckpt.finalize(tmp_path, 15, {"step": 15}, keep=1)
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-5"
    monkeypatch.undo()
    final = ckpt.finalize(tmp_path, 15, {"step": 15}, keep=1)
    # keep=1: the old complete one goes only once 15 is complete; stale partial ones older than 15 are cleaned
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint-15"] and (final / ckpt.MARKER).exists()
    assert json.loads((final / "training_state.json").read_text()) == {"step": 15}


def _launch_2proc(args, port):
    cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
           "--main_process_port", str(port), "train.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _pid(run, rank):
    return json.loads((run / "status" / f"rank{rank}.json").read_text())["pid"]


def _fault_after_steps(p, run, inject, steps=4, timeout=90) -> float:
    """Wait for `steps` logged steps, inject the fault, wait for the job to end; seconds from fault to end. The job's
    process group is killed if it outlives `timeout` (the test then fails on its bound, not by hanging)."""
    try:
        _wait_for_steps(run, steps, p)
        inject()
        t0 = time.time()
        p.communicate(timeout=timeout)
        return time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def _status_cli(run):
    return subprocess.run([PY, "-m", "guard_train.cli", "status", str(run)], capture_output=True, text=True, timeout=60)


@pytest.mark.multiproc
def test_one_rank_dies_the_other_exits_within_a_bounded_time(tmp_path, tiny_sd_dir):
    args = small_lab_args(tmp_path, tiny_sd_dir, **{"run.name": "rf", "train.max_steps": 5000,
                                                     "train.checkpoint_every": 3})
    run = tmp_path / "rf"
    p = _launch_2proc(args, 29671)
    elapsed = _fault_after_steps(p, run, lambda: os.kill(_pid(run, 1), signal.SIGKILL))
    assert p.returncode != 0 and elapsed < 60
    st0 = json.loads((run / "status" / "rank0.json").read_text())
    assert st0["state"] == "failed" and "another rank probably died" in st0["error"]
    s = _status_cli(run)
    assert s.returncode == 1 and "rank 1: died" in s.stdout and "rank 0: failed" in s.stdout
    assert ckpt.latest_checkpoint(run) is not None  # what was saved before the failure is intact


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_process_preemption_saves_on_every_rank_then_resumes_exactly(tmp_path, tiny_sd_dir):
    """SIGTERM to the whole job (what SLURM and Kubernetes do): every rank saves and stops within 60 s. Under
    `accelerate launch` the launcher exits 1 (torchrun's agent), so `guard-train status` gives the 75 a scheduler
    requeues on; the resumed 2-process run equals an uninterrupted one."""
    common = {"train.max_steps": 30, "train.learning_rate": 5e-4, "train.checkpoint_every": 0}
    p = _launch_2proc(small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "straight"}), 29673)
    assert p.wait(timeout=300) == 0, p.communicate()[1][-3000:]
    args = small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "pre"})
    run = tmp_path / "pre"
    p = _launch_2proc(args, 29675)
    assert _fault_after_steps(p, run, lambda: os.killpg(p.pid, signal.SIGTERM)) < 60
    st = [json.loads((run / "status" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["state"] for s in st] == ["preempted", "preempted"] and st[0]["step"] == st[1]["step"] < 30
    assert ckpt.latest_checkpoint(run).name == f"checkpoint-{st[0]['step']}"
    s = _status_cli(run)
    assert s.returncode == 75 and "requeue" in s.stdout
    p = _launch_2proc(args + ["resume=latest"], 29677)
    assert p.wait(timeout=300) == 0, p.communicate()[1][-3000:]
    a, b = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [m["step"] for m in b] == list(range(1, 31)) and [m["loss"] for m in a] == [m["loss"] for m in b]
    assert _status_cli(run).returncode == 0


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_hung_rank_makes_the_other_fail_after_the_collective_timeout(tmp_path, tiny_sd_dir):
    """SIGSTOP one rank (a hang, not a death): the other's collective times out after run.collective_timeout_s,
    it records the error and exits; torchrun's agent then kills the stopped rank (after its 30 s grace)."""
    args = small_lab_args(tmp_path, tiny_sd_dir, **{"run.name": "hang", "train.max_steps": 5000,
                                                     "train.checkpoint_every": 3, "run.collective_timeout_s": 10})
    run = tmp_path / "hang"
    p = _launch_2proc(args, 29679)
    elapsed = _fault_after_steps(p, run, lambda: os.kill(_pid(run, 1), signal.SIGSTOP), timeout=120)
    assert p.returncode != 0 and elapsed < 90
    st0 = json.loads((run / "status" / "rank0.json").read_text())
    assert st0["state"] == "failed" and "Timed out" in st0["error"]


class _NanGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward: every parameter gets NaN gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _nan_grads_on(trainer, calls):
    orig, n = trainer._loss, {"i": 0}

    def loss(batch):
        out, logs = orig(batch)
        n["i"] += 1
        return (_NanGrad.apply(out) if n["i"] in calls else out), logs

    trainer._loss = loss


def test_nonfinite_gradients_with_a_finite_loss_are_skipped_and_stop_when_persistent(tmp_path, tiny_sd_dir):
    t = Trainer(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{"run.name": "g", "train.max_steps": 4})))
    _nan_grads_on(t, {2})
    t.train()
    w = {k: v.clone() for k, v in t.acc.unwrap_model(t.unet).state_dict().items()}
    t.close()
    m = read_metrics(tmp_path / "g")
    assert [x["step"] for x in m] == [1, 2, 3, 4] and m[-1]["skipped_nonfinite"] == 1
    assert all(torch.isfinite(v).all() for v in w.values())  # the NaN update never reached the weights
    t = Trainer(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{
        "run.name": "g2", "train.max_steps": 10, "train.checkpoint_every": 2, "train.max_consecutive_nonfinite": 2})))
    _nan_grads_on(t, set(range(4, 100)))
    with pytest.raises(NonFiniteError, match="last: gradients"):
        t.train()
    t.close()
    assert ckpt.latest_checkpoint(tmp_path / "g2").name == "checkpoint-2"


class _Payload:
    """Unpickling this runs `touch <marker>`: what a tampered checkpoint or .bin model could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["rank_state_0.pt", *[pytest.param(v, marks=pytest.mark.slow) for v in (
    "optimizer.bin", "ema.pt", "random_states_0.pkl")]])
def test_a_tampered_checkpoint_is_refused_not_executed(tmp_path, tiny_sd_dir, victim):
    common = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.ema": "true", "run.name": "r"}
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **common)))
    ck = ckpt.latest_checkpoint(tmp_path / "r")
    assert not list(ck.glob("*.pkl")) or all("random_states" in p.name for p in ck.glob("*.pkl"))
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, ck / victim)
    r = subprocess.run([PY, "train.py", *small_lab_args(tmp_path, tiny_sd_dir, **{**common, "train.max_steps": 6}),
                        "resume=latest"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "could not be loaded safely" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not marker.exists()


def test_pickled_model_and_lora_weights_are_refused_not_executed(tmp_path, tiny_sd_dir):
    import shutil

    from guard_train.models.loading import ModelLoadError, load_lora, load_pipeline

    marker = tmp_path / "pwned"
    bad = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, bad)
    st = next((bad / "unet").glob("*.safetensors"))
    st.unlink()
    torch.save({"x": _Payload(marker)}, bad / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_pipeline(str(bad))
    lora = tmp_path / "lora"
    lora.mkdir()
    torch.save({"x": _Payload(marker)}, lora / "pytorch_lora_weights.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_lora(load_pipeline(str(tiny_sd_dir)), str(lora))
    from guard_train.training.loop import Trainer

    with pytest.raises(ModelLoadError, match="safetensors"):
        Trainer._set_lora(None, lora)  # train.init_lora and resume read a LoRA the same way
    assert not marker.exists()


def test_sources_never_unpickle_unsafely_or_trust_remote_code():
    """Static guard beside the behavioural tests above: every torch.load in our code passes weights_only=True."""
    import re

    for f in (ROOT / "guard_train").rglob("*.py"):
        text = f.read_text()
        assert "trust_remote_code=True" not in text, f
        for call in re.findall(r"torch\.load\([^\n]*", text):
            assert "weights_only=True" in call, (f, call)


def test_a_lora_for_another_architecture_is_a_clear_error_not_a_silent_partial_load(tmp_path, tiny_sd_dir):
    from safetensors.torch import save_file

    from guard_train.models.loading import ModelLoadError, load_lora, load_pipeline

    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    good = {f"{base}.to_q.lora_A.weight": torch.zeros(4, 32), f"{base}.to_q.lora_B.weight": torch.zeros(32, 4)}
    alien = {f"{base}.to_zz.lora_A.weight": torch.zeros(4, 32), f"{base}.to_zz.lora_B.weight": torch.zeros(32, 4)}
    lora = tmp_path / "lora"
    lora.mkdir()
    save_file({**good, **alien}, lora / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelLoadError, match="to_zz"):
        load_lora(load_pipeline(str(tiny_sd_dir)), str(lora))


def test_a_lora_on_a_base_of_another_prediction_type_is_refused(tmp_path):
    """The committed v-prediction LoRA on the ε base loads without a diffusers error and draws noise: refused."""
    import shutil

    from guard_train.models.loading import ModelLoadError, load_lora, load_pipeline

    lora = ROOT / "models" / "tiny-sd-v-memorized-lora"
    with pytest.raises(ModelLoadError,
                       match=r"trained on a v_prediction model .*predicts epsilon.*--model models/tiny-sd-v"):
        load_lora(load_pipeline(str(ROOT / "models" / "tiny-sd")), str(lora))
    load_lora(load_pipeline(str(ROOT / "models" / "tiny-sd-v")), str(lora))  # its own base: fine
    bare = tmp_path / "bare"  # a LoRA without build_info.json (any other tool's) is not checked
    bare.mkdir()
    shutil.copy(lora / "pytorch_lora_weights.safetensors", bare)
    load_lora(load_pipeline(str(ROOT / "models" / "tiny-sd")), str(bare))


def test_the_base_of_a_lora_comes_from_build_info_or_a_training_runs_base_model_txt(tmp_path):
    from guard_train.models.loading import lora_base_model

    assert lora_base_model(str(ROOT / "models" / "tiny-sd-v-memorized-lora")) == "models/tiny-sd-v"
    final = tmp_path / "run" / "final"  # what the trainer exports for a LoRA run
    final.mkdir(parents=True)
    assert lora_base_model(str(final)) is None
    (final / "base_model.txt").write_text("models/tiny-sd-v\n")
    assert lora_base_model(str(final)) == "models/tiny-sd-v"
    (final / "build_info.json").write_text(json.dumps({"base_model": "other/base"}))  # the build record wins
    assert lora_base_model(str(final)) == "other/base"
