"""A complete checkpoint whose files are damaged afterwards (truncated, zero bytes): `resume=latest` falls back to
the previous complete checkpoint with a warning, or exits 2 naming the file when none is intact. The files are
really written (safetensors, torch zip, JSON) and really truncated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, small_lab_args
from safetensors.torch import save_file

from guard_train.config.loader import ConfigError
from guard_train.lab.config import load_config
from guard_train.training import checkpoint as ckpt


def _checkpoint(run_dir: Path, step: int) -> Path:
    d = run_dir / "checkpoints" / f"checkpoint-{step}"
    d.mkdir(parents=True)
    save_file({"w": torch.arange(256, dtype=torch.float32)}, d / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.zeros(256)}}}, d / "optimizer.bin")
    torch.save({"gen": torch.zeros(16, dtype=torch.uint8), "items": 0}, d / "rank_state_0.pt")
    (d / "training_state.json").write_text(json.dumps({"step": step, "world": 1}))
    (d / ckpt.MARKER).write_text("ok\n")
    return d


def _truncate(f: Path, keep: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("victim,keep,why", [("model.safetensors", 0.5, "truncated"),
                                             ("optimizer.bin", 0.5, "truncated"),
                                             ("rank_state_0.pt", 0.0, "zero bytes"),
                                             ("training_state.json", 0.5, "not valid JSON")])
def test_a_damaged_newest_checkpoint_is_skipped(tmp_path, victim, keep, why):
    run = tmp_path / "run"
    _checkpoint(run, 2)
    newest = _checkpoint(run, 4)
    assert ckpt.damaged(newest) is None and ckpt.latest_loadable(run) == (newest, [])
    _truncate(newest / victim, keep)
    last, skipped = ckpt.latest_loadable(run)
    assert last == run / "checkpoints" / "checkpoint-2"
    assert len(skipped) == 1 and str(newest / victim) in skipped[0] and why in skipped[0]


def test_resume_latest_warns_and_falls_back_or_exits_2_naming_the_file(tmp_path, capsys):
    from guard_train.training.loop import _decide_run_dir

    run = tmp_path / "x"
    _checkpoint(run, 2)
    newest = _checkpoint(run, 4)
    _truncate(newest / "model.safetensors")
    cfg = load_config(["recipe=tiny", f"run.output_dir={tmp_path}", "run.name=x", "resume=latest"])
    assert _decide_run_dir(cfg) == (str(run), str(run / "checkpoints" / "checkpoint-2"))
    err = capsys.readouterr().err
    assert "warning: skipping a damaged checkpoint" in err and str(newest / "model.safetensors") in err
    (run / "checkpoints" / "checkpoint-2" / "optimizer.bin").write_bytes(b"")  # now none is intact
    with pytest.raises(ConfigError, match="optimizer.bin: zero bytes"):
        _decide_run_dir(cfg)
    explicit = load_config(["recipe=tiny", f"run.output_dir={tmp_path}", f"resume={newest}"])
    with pytest.raises(ConfigError, match="model.safetensors: truncated"):  # resume=<path> of a damaged one
        _decide_run_dir(explicit)


@pytest.mark.slow
def test_a_real_run_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(tmp_path, tiny_sd_dir, capsys):
    """End to end: a real run's checkpoint-4 optimizer state truncated; resume=latest continues from checkpoint-2."""
    from guard_train.cli import train_main

    args = small_lab_args(tmp_path, tiny_sd_dir, **{"run.name": "r", "train.checkpoint_every": 2,
                                                      "train.checkpoints_total_limit": 2})
    assert train_main([*args, "train.max_steps=4"]) == 0
    run = tmp_path / "r"
    _truncate(run / "checkpoints" / "checkpoint-4" / "optimizer.bin")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    capsys.readouterr()
    assert train_main([*args, "train.max_steps=5", "resume=latest"]) == 0
    out = capsys.readouterr()
    assert "skipping a damaged checkpoint" in out.err and "optimizer.bin" in out.err
    assert "resumed from" in out.out and "checkpoint-2 at step 2" in out.out
    assert [m["step"] for m in read_metrics(run)][-3:] == [3, 4, 5]
