"""Does a training-time filter catch the planted duplicates? Read a run's dropped samples and the lab manifest.

    python benchmarks/filter_catch.py --run runs/entropy-only --filter entropy_filter

Draws are reconstructed from the run's deterministic data order (default sampler, 1 process); only draws after the
filter's warm-up count. Per group: share of draws dropped. Precision = share of dropped samples that are planted
duplicates; recall = share of duplicate draws dropped (with the base rate — the duplicates' share of all draws —
as the chance level for precision).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402

from guard_train.lab.dataset import read_manifest  # noqa: E402
from guard_train.training.sampler import EpochShardSampler  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--filter", default="entropy_filter")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    run = Path(a.run)
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    t = cfg["train"]
    warm = cfg["mitigation"][a.filter]["warmup_steps"]
    items = read_manifest(run / "data")
    is_dup = np.array([it.is_dup for it in items])
    s = EpochShardSampler(len(items), t["seed"], 0, 1, t["batch_size"])
    draws, e = [], 0
    while len(draws) < t["max_steps"] * t["batch_size"]:
        s.set_epoch(e)
        draws += list(s)
        e += 1
    draws = np.array(draws[warm * t["batch_size"]: t["max_steps"] * t["batch_size"]])
    dropped = []
    for f in (run / "filtered").glob(f"{a.filter}_rank*.jsonl"):
        dropped += [json.loads(l)["id"] for l in f.read_text().splitlines()]
    dropped = np.array(dropped, dtype=int)
    n_dup, n_uni = int(is_dup[draws].sum()), int((~is_dup[draws]).sum())
    d_dup, d_uni = (int(is_dup[dropped].sum()) if len(dropped) else 0,
                    int((~is_dup[dropped]).sum()) if len(dropped) else 0)
    out = {"run": str(run), "filter": a.filter, "steps": t["max_steps"], "warmup_micro_steps": warm,
           "draws_after_warmup": {"duplicated": n_dup, "unique": n_uni},
           "dropped": {"duplicated": d_dup, "unique": d_uni},
           "dropped_share": {"duplicated": d_dup / max(n_dup, 1), "unique": d_uni / max(n_uni, 1)},
           "precision_dup": d_dup / max(len(dropped), 1), "base_rate_dup": n_dup / max(n_dup + n_uni, 1),
           "recall_dup": d_dup / max(n_dup, 1),
           "thresholds": json.loads((run / f"{a.filter}_thresholds.json").read_text())["thresholds"]}
    return emit(out, a.out)


if __name__ == "__main__":
    sys.exit(main())
