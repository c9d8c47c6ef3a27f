import json
import os
import subprocess

import numpy as np
import pytest
from conftest import PY, ROOT, read_metrics, small_lab_args


def _launch(tmp_path, model, port, env=None, **extra):
    args = small_lab_args(tmp_path, model, **extra)
    cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
           "--main_process_port", str(port), str(ROOT / "tests/helpers/ddp_train.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / extra["run.name"]
    return run, [json.loads((run / f"rank{i}.json").read_text()) for i in (0, 1)]


@pytest.mark.multiproc
def test_two_process_cpu_run(tmp_path, tiny_sd_dir):
    run, ranks = _launch(tmp_path, tiny_sd_dir, 29631, **{"run.name": "ddp", "train.max_steps": 4,
                                                          "train.checkpoint_every": 2})
    assert [x["world"] for x in ranks] == [2, 2]
    assert ranks[0]["hash"] == ranks[1]["hash"]  # DDP kept the replicas identical
    # epoch 0 = 28 items // (2 ranks x batch 4) = 3 batches per rank: disjoint shards, no id twice
    e0 = [r["ids"][:12] for r in ranks]
    assert not set(e0[0]) & set(e0[1]) and len(set(e0[0]) | set(e0[1])) == 24
    state = json.loads((run / "checkpoints/checkpoint-4/training_state.json").read_text())
    assert state["world"] == 2
    assert sorted(p.name for p in (run / "checkpoints/checkpoint-4").glob("rank_state_*.pt")) == [
        "rank_state_0.pt", "rank_state_1.pt"]
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    assert len(list(run.parent.iterdir())) == 1  # one run directory, not one per rank


@pytest.mark.multiproc
def test_all_dropped_steps_are_skipped_together(tmp_path, tiny_sd_dir):
    """Rank 0 drops everything; rank 1 only on odd micro-steps: those steps are skipped on both, no hang."""
    run, ranks = _launch(tmp_path, tiny_sd_dir, 29632, env={"DROP": "rank0"},
                         **{"run.name": "drop", "train.max_steps": 3})
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert ranks[0]["metrics"]["skipped_all_dropped"] == ranks[1]["metrics"]["skipped_all_dropped"] == 3
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


@pytest.mark.multiproc
def test_weighted_sampler_on_two_processes(tmp_path, tiny_sd_dir):
    """Injection weights (Somepalli's testbed, here 25 % of items at weight 8): disjoint positions per rank, same
    draw on both, heavy items drawn far more often."""
    run, ranks = _launch(tmp_path, tiny_sd_dir, 29633, **{
        "run.name": "w", "train.max_steps": 12, "mitigation.injection.enabled": "true",
        "mitigation.injection.fraction": 0.25, "mitigation.injection.weight": 8.0})
    w = np.load(run / "sampling_weights.npy")
    seen = np.bincount(np.array(ranks[0]["ids"] + ranks[1]["ids"]), minlength=len(w))
    heavy, light = seen[w > 1].mean(), seen[w == 1].mean()
    assert heavy > 3 * light
    from guard_train.training.mitigations.sampling import WeightedEpochSampler

    expect = []
    for r in (0, 1):  # the ids each rank saw are exactly its shard of the shared weighted draws
        s = WeightedEpochSampler(w, 0, r, 2, 4)
        ids = []
        for e in range(10):
            s.set_epoch(e)
            ids += list(s)
        expect.append(ids[: len(ranks[r]["ids"])])
    assert ranks[0]["ids"] == expect[0] and ranks[1]["ids"] == expect[1]
