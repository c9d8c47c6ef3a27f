"""benchmarks/lab_compute.py: the lab's compute is summed from each run's own records, counting the evaluation that
follows a copying arm's last log line and a continued model's own run only."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import lab_compute as lc  # noqa: E402


def _write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_account_sums_each_record_once(tmp_path):
    _write(tmp_path / "results/lab_cells/a.json", {"cell_wall_s": 10.0})
    _write(tmp_path / "results/lab_cells/b.json", {"cell_wall_s": 5.5})
    _write(tmp_path / "results/tradeoff_x.meta.json", {"wall_s": 100.0})
    evals = [{"step": 4000, "wall_s_eval": 40.0}, {"step": 8000, "wall_s_eval": 50.0}]
    # finished arm: the log's last line (step 8000) precedes the 8000-step evaluation -> 800 + 50
    # stopped arm: its last line (step 4100) already contains the 4000-step evaluation -> 420
    _write(tmp_path / "results/copying_regime_p.json", {"arms": {
        "plain": {"evals": evals, "last_log": {"step": 8000, "wall_s": 800.0}},
        "stopped": {"evals": evals[:1], "last_log": {"step": 4100, "wall_s": 420.0}},
        # resumed arm: its training time is both segments, not the resumed clock's last value
        "resumed": {"evals": evals[:1], "last_log": {"step": 4000, "wall_s": 300.0}, "train_wall_s": 700.0}}})
    _write(tmp_path / "models/base/build_info.json", {"wall_s_total": 1000.0})
    _write(tmp_path / "models/cont/build_info.json", {"wall_s_this_run": 30.0, "wall_s_total": 1030.0})
    _write(tmp_path / "models/lora/build_info.json", {"train_wall_s": 7.0, "phase2": [{"wall_s": 3.0}]})
    _write(tmp_path / "models/lab-scorer/scorer.json", {"train_wall_s": 2.0})

    acc = lc.account(tmp_path)

    assert acc["parts_s"]["copying-regime arms"] == {"copying_regime_p:plain": 850.0,
                                                     "copying_regime_p:stopped": 420.0,
                                                     "copying_regime_p:resumed": 740.0}
    assert acc["parts_s"]["models the lab runs on"] == {"base": 1000.0, "cont": 30.0, "lora": 10.0,
                                                        "lab-scorer": 2.0}
    assert acc["totals_s"] == {"lab cells (guard-train lab)": 15.5, "trade-off sweeps": 100.0,
                               "copying-regime arms": 2010.0, "models the lab runs on": 1042.0}
    assert acc["total_s"] == 15.5 + 100.0 + 2010.0 + 1042.0
