"""End-to-end runs of the real recipes on the committed base (minutes each): CI's second step, `pytest -m slow`."""

import json
import subprocess

import pytest

from conftest import PY, ROOT

pytestmark = pytest.mark.slow


def _launch(tmp_path, *args, timeout=1200):
    cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/cpu_1proc.yaml"),
           str(ROOT / "train.py"), *args, f"run.output_dir={tmp_path}", "run.report_to=none"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_readme_main_job(tmp_path):
    """README command 1 (after setup): recipe=tiny, mitigations on, ends with the summary."""
    r = _launch(tmp_path, "recipe=tiny", "run.name=main")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run directory:" in r.stdout and "memorization summary — copy metric: sscd" in r.stdout
    run = tmp_path / "main"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "final/unet", "dedup/clusters.jsonl",
              "entropy_filter_thresholds.json", "checkpoints/checkpoint-800/COMPLETE"):
        assert (run / f).exists(), f
    s = json.loads((run / "summary.json").read_text())
    assert set(s["groups"]) == {"duplicated", "unique"}


def test_plain_fine_tune_memorizes_duplicates_more_than_unique_images(tmp_path):
    """recipe=tiny_nomit: the one-step reconstruction probe (SSCD of x0 at t=200 to the training image) is higher
    for the planted duplicates than for unique images — relative, not an absolute threshold."""
    r = _launch(tmp_path, "recipe=tiny_nomit", "run.name=plain", "summary.max_prompts=8")
    assert r.returncode == 0, r.stderr[-3000:]
    g = json.loads((tmp_path / "plain" / "summary.json").read_text())["groups"]
    # measured (docs/tiny-recipe.md): median 0.498 vs 0.419, share > 0.5: 0.50 vs 0.12 — assert the direction only
    assert g["duplicated"]["probe_median"] > g["unique"]["probe_median"]
    assert g["duplicated"]["probe_above_threshold"] > g["unique"]["probe_above_threshold"]
