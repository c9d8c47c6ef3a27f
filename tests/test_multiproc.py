import json
import subprocess

import pytest

from conftest import PY, ROOT, read_metrics, small_lab_args


@pytest.mark.multiproc
def test_two_process_cpu_run(tmp_path, tiny_sd_dir):
    args = small_lab_args(tmp_path, tiny_sd_dir, **{"run.name": "ddp", "train.max_steps": 4, "train.checkpoint_every": 2})
    cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
           "--main_process_port", "29631", str(ROOT / "tests/helpers/ddp_train.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "ddp"
    ranks = [json.loads((run / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [x["world"] for x in ranks] == [2, 2]
    assert ranks[0]["hash"] == ranks[1]["hash"]  # DDP kept the replicas identical
    state = json.loads((run / "checkpoints/checkpoint-4/training_state.json").read_text())
    assert state["world"] == 2
    assert sorted(p.name for p in (run / "checkpoints/checkpoint-4").glob("rank_state_*.pt")) == [
        "rank_state_0.pt", "rank_state_1.pt"]
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    assert len(list(run.parent.iterdir())) == 1  # one run directory, not one per rank
