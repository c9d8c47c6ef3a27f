"""Memorization-evaluation wall time on 2 processes ÷ 1 process (1 thread per process in both), one run.

    python benchmarks/callback_scaling.py [--prompts-per-group 8] [--steps 25]

Runs the same `guard-train eval` (the callback's generate + score path) on 1 and on 2 CPU processes and compares
the generation wall time it reports per image. Goal (issue): ≤ 0.6.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(args, procs: int, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    pre = [PY] if procs == 1 else [PY, "-m", "accelerate.commands.launch", "--config_file",
                                   str(ROOT / "accelerate_configs/cpu_2proc.yaml"), "--main_process_port", "29661"]
    cmd = [*pre, "-m", "guard_train.cli", "eval", *args, "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, capture_output=True)
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    return sum(r["metrics"]["wall_s_per_image"] for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts-per-group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default="results/callback_scaling.json")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([PY, "-m", "guard_train.cli", "make-lab", "--out", str(tmp / "lab")], cwd=ROOT, check=True,
                   capture_output=True)
    args = ["--reference", str(tmp / "lab"), "--methods", "cfg,guard", "--num-images", "2", "--steps", str(a.steps),
            "--prompts-per-group", str(a.prompts_per_group)]
    one = run(args, 1, tmp / "one")
    two = run(args, 2, tmp / "two")
    res = {"threads_per_process": 1,
           "wall_s_per_image_1proc": one, "wall_s_per_image_2proc": two, "ratio_2proc_over_1proc": round(two / one, 3)}
    return emit(res, a.out)


if __name__ == "__main__":
    sys.exit(main())
