"""Training-step time of every training arm ÷ plain, measured in one run (issue 20 item 5, issue 24).

    python benchmarks/train_overhead.py [--steps 40] [--regime tiny|copying] [--out FILE.json]

One trainer per arm (`lab.bench.TRAIN_ARMS`: plain, each registered mitigation's arm, the default pair) on the same
lab, model and seed, all built from `recipe=tiny_nomit` (no mitigation of its own: the plain arm is plain) plus the
arm's overrides. `--regime tiny`: README's job (tiny SD, full fine-tune, batch 16, cached latents); `--regime
copying`: the copying-regime arms (v base, LoRA rank 32 on attention, proj, feed-forward and resnet convs, the
420-instance lab; benchmarks/copying_regime.py). Rounds interleave the arms micro-step by micro-step, so load on
the machine hits all arms alike; an arm's time is the median of its step times after 10 warm-up micro-steps
(the filters calibrate over 5); ratio = arm ÷ plain. Evaluation is off (its cost is the callback's, measured
apart).
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

from guard_train.lab.bench import TRAIN_ARMS, _slug  # noqa: E402
from guard_train.lab.config import load_config  # noqa: E402
from guard_train.training.loop import Trainer  # noqa: E402

WARMUP = ["mitigation.entropy_filter.warmup_steps=5", "mitigation.magnitude_filter.warmup_steps=5"]
# the copying regime's settings (benchmarks/copying_regime.py), training part only
COPYING = ["model.path=models/tiny-sd-v", "train.mode=lora", "train.lora_rank=32", "train.lora_alpha=32",
           "train.lora_targets=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2]",
           "train.learning_rate=1e-3", "train.batch_size=16", "train.checkpoint_every=0",
           "data.lab.num_instances=420", "data.lab.cell_split=2", "data.lab.dup_fraction=0.02",
           "data.lab.dup_repeats=16", "data.lab.held_out=16"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--regime", choices=("tiny", "copying"), default="tiny")
    ap.add_argument("--arms", default=",".join(TRAIN_ARMS))
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    arms = a.arms.split(",")
    tmp = tempfile.mkdtemp()
    trainers, its, times = {}, {}, {k: [] for k in arms}
    base = ["recipe=tiny_nomit", f"run.output_dir={tmp}", "run.report_to=none", "summary.enabled=false",
            "train.checkpoint_every=0", *WARMUP, *(COPYING if a.regime == "copying" else [])]
    for name in arms:
        over = [f"{k}={v}" for k, v in TRAIN_ARMS[name].items()]
        t = Trainer(load_config([*base, f"run.name={_slug(name)}", *over]))
        t.setup()
        trainers[name], its[name] = t, t.batches()
    for k in range(a.steps + 10):
        for name, t in trainers.items():
            batch = next(its[name])
            t0 = time.perf_counter()
            t.micro_step(batch)
            if k >= 10:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    setting = ("tiny SD full fine-tune, batch 16, 64 px, cached latents, lab of 64 instances" if a.regime == "tiny"
               else "v base, LoRA rank 32 (attention, proj, ff, resnet convs), batch 16, 64 px, lab of 420 instances")
    out = {"regime": a.regime, "setting": setting, "timed_steps_per_arm": a.steps,
           "arms": {k: TRAIN_ARMS[k] for k in arms}, "median_step_s": {k: round(v, 4) for k, v in med.items()},
           "ratio_vs_plain": {k: round(med[k] / med["plain"], 3) for k in med}}
    return emit(out, a.out)


if __name__ == "__main__":
    sys.exit(main())
