"""Inference wall time of every method ÷ CFG, measured in one run (rounds interleave the methods).

    python benchmarks/inference_cost.py [--model models/tiny-sd] [--steps 50] [--rounds 3]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402

from guard_train.config.loader import resolve_model_path  # noqa: E402
from guard_train.guidance.engine import GuidanceEngine  # noqa: E402
from guard_train.guidance.strategies import METHODS  # noqa: E402
from guard_train.models.loading import placement  # noqa: E402

PROMPTS = ["a red circle on a cat photo", "a blue square and a green triangle on a coffee photo",
           "a yellow triangle on a temple photo", "a white square on an astronaut photo"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/tiny-sd")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--device", default="auto", help="auto = CUDA when there is one")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    a = ap.parse_args()
    device, dtype = placement(a.device, a.dtype)
    eng = GuidanceEngine.from_pretrained(resolve_model_path(a.model), device=device, dtype=dtype)
    eng.generate(PROMPTS[:1], steps=2)  # warm-up
    times = {m: [] for m in METHODS}
    for _ in range(a.rounds):
        for m in METHODS:
            t0 = time.perf_counter()
            eng.generate(PROMPTS, method=m, num_images=a.images, steps=a.steps)
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {"device": str(eng.device), "dtype": a.dtype,
           "setting": f"{len(PROMPTS)} prompts x {a.images} images, {a.steps} DDIM steps, batched, {a.model}",
           "median_wall_s": {m: round(v, 3) for m, v in med.items()},
           "ratio_vs_cfg": {m: round(v / med["cfg"], 3) for m, v in med.items()}}
    return emit(out, a.out)


if __name__ == "__main__":
    sys.exit(main())
