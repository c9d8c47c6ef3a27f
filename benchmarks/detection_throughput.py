"""First-step detection throughput ÷ a plain CFG UNet forward on the same batch, measured in one run.

    python benchmarks/detection_throughput.py [--batch 32] [--repeats 20]

Detection at the first step (Wen's magnitude, Ren's E) needs the CFG pair of predictions plus the cross-attention
token mass: the engine's recording path (explicit attention in every cross-attention layer). Ratio = time of a
plain CFG forward (SDPA) ÷ time of the recording forward; goal (issue) ≥ 0.9. Interleaved repeats, medians.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402

from guard_train.config.loader import resolve_model_path  # noqa: E402
from guard_train.guidance.engine import GuidanceEngine  # noqa: E402
from guard_train.guidance.strategies import get_strategy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/tiny-sd")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="results/detection_throughput.json")
    a = ap.parse_args()
    eng = GuidanceEngine.from_pretrained(resolve_model_path(a.model))
    prompts = [f"a red circle on a cat photo {i}" for i in range(a.batch)]
    ctx = eng._context(prompts, list(range(a.batch)), prompts, 1, list(range(a.batch)), 50, None, None)
    cfg = get_strategy("cfg")
    t = ctx.timesteps[0]
    plain, rec = [], []
    with torch.no_grad():
        for _ in range(a.repeats + 2):
            eng.clear_attention()
            t0 = time.perf_counter()
            eng.predict(ctx.latents0, t, cfg.branches(0, int(t), ctx), cfg)
            plain.append(time.perf_counter() - t0)
            eng.record_mass = set(eng.layers)
            t0 = time.perf_counter()
            eps = eng.predict(ctx.latents0, t, cfg.branches(0, int(t), ctx), cfg)
            _ = (eps["cond"] - eps["uncond"]).flatten(1).norm(dim=1), eng.last_mass
            rec.append(time.perf_counter() - t0)
    p, r = statistics.median(plain[2:]), statistics.median(rec[2:])
    out = {"batch_prompts": a.batch, "plain_cfg_forward_s": p, "first_step_detection_s": r,
           "throughput_ratio_detection_over_plain": round(p / r, 3)}
    return emit(out, a.out)


if __name__ == "__main__":
    sys.exit(main())
