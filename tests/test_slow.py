"""README command 1 end to end on the committed base (10 minutes): CI's second step, `pytest -m slow`. The plain
recipe's memorization check is a benchmark (benchmarks/tiny_recipes.py), keeping this step short."""

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

