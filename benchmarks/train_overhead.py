"""Training-step time with each filter ÷ without, measured in one run.

    python benchmarks/train_overhead.py [--steps 60] [--out docs/measurements/train_overhead.json]

Three trainers (plain, entropy filter, magnitude filter) on the same lab, model (models/tiny-sd, full fine-tune,
batch 16) and seed. Rounds interleave the arms micro-step by micro-step, so load on the machine hits all arms
alike; each arm's time is the median of its step times after its filter's warm-up; ratio = arm ÷ plain.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402

from guard_train.callbacks import build_callbacks  # noqa: E402
from guard_train.lab.config import load_config  # noqa: E402
from guard_train.training.loop import Trainer  # noqa: E402

ARMS = {
    "plain": [],
    "entropy_filter": ["mitigation.entropy_filter.enabled=true", "mitigation.entropy_filter.warmup_steps=5"],
    "magnitude_filter": ["mitigation.magnitude_filter.enabled=true", "mitigation.magnitude_filter.warmup_steps=5"],
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    trainers, its, times = {}, {}, {k: [] for k in ARMS}
    for name, extra in ARMS.items():
        cfg = load_config(["recipe=tiny", f"run.output_dir={tmp}", f"run.name={name}", "run.report_to=none",
                           "summary.enabled=false", *extra])
        t = Trainer(cfg, build_callbacks(cfg))
        t.setup()
        trainers[name], its[name] = t, t.batches()
    for k in range(a.steps + 10):
        for name, t in trainers.items():
            batch = next(its[name])
            t0 = time.perf_counter()
            t.micro_step(batch)
            if k >= 10:  # after warm-up (filters calibrate over 5 micro-steps)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"setting": "tiny SD full fine-tune, batch 16, 64 px, cached latents",
           "timed_steps_per_arm": a.steps, "median_step_s": med,
           "ratio_vs_plain": {k: round(med[k] / med["plain"], 3) for k in med}}
    return emit(out, a.out)


if __name__ == "__main__":
    sys.exit(main())
