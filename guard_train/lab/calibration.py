"""Copy-metric calibration on the lab: does the metric tell a copy from a new instance of the same caption?

Rows (docs/lab.md, copy calibration): near-copy vs its original; a new instance with the same caption attributes vs the
original (what generalisation looks like); different captions; and the train–train top-2 background
(Somepalli et al.). A copy metric is only meaningful if near-copies score high and the other rows low. The
lab-calibrated threshold is the midpoint between the near-copy 5th percentile and the new-instance 95th.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from guard_train.lab.dataset import Lab, LabConfig, build_lab, near_copy, same_caption_new_instance
from guard_train.metrics.embed import Embedder, get_embedder


def calibration_table(lab: Lab, embedder: Embedder, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    origs = lab.originals
    keys = sorted(origs)
    o = np.stack([origs[k] for k in keys])
    near = np.stack([near_copy(origs[k], rng) for k in keys])
    new = np.stack([same_caption_new_instance(lab, k, rng) for k in keys])
    eo = embedder.embed(o)
    sim_near = np.sum(embedder.embed(near) * eo, 1)
    sim_new = np.sum(embedder.embed(new) * eo, 1)
    tt = eo @ eo.T
    np.fill_diagonal(tt, -np.inf)
    top2 = tt.max(1)
    diff = tt[np.triu_indices(len(keys), 1)]
    def q(x):
        return {"p5": float(np.percentile(x, 5)), "p50": float(np.median(x)), "p95": float(np.percentile(x, 95))}

    table = {"backend": embedder.name, "n": len(keys), "near_copy": q(sim_near),
             "same_caption_new_instance": q(sim_new),
             "different_images": {**q(diff), "share_above_0.5": float((diff > 0.5).mean())},
             "train_train_top2": {**q(top2), "share_above_0.5": float((top2 > 0.5).mean())}}
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(sim_near)), np.zeros(len(sim_new))]
    table["near_vs_new_auroc"] = float(roc_auc_score(y, np.r_[sim_near, sim_new]))
    table["lab_threshold"] = float((table["near_copy"]["p5"] + table["same_caption_new_instance"]["p95"]) / 2)
    return table


def main(argv: list[str] | None = None) -> int:
    """python -m guard_train.lab.calibration [--instances 96] [--cell-split 1] [--backend sscd] [--out file.json]"""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m guard_train.lab.calibration")
    p.add_argument("--instances", type=int, default=96)
    p.add_argument("--backend", default="sscd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cell-split", type=int, default=1, help="lab.cell_split: sub-cells per cell side")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    t = calibration_table(build_lab(LabConfig(num_instances=a.instances, held_out=0, seed=a.seed,
                                                     cell_split=a.cell_split)),
                          get_embedder(a.backend), seed=a.seed)
    s = json.dumps(t, indent=1)
    print(s)
    if a.out:
        Path(a.out).write_text(s + "\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
