"""benchmarks/tradeoff_report.py --validated: a method's setting is chosen on the validation captions only and its
copy rate is read on the test captions only (issue 20: no tuning on the test set)."""

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import tradeoff_report as tr  # noqa: E402

from guard_train.metrics.copy import wilson  # noqa: E402


def _point(curve: str, value: float, per_caption: list[tuple[int, float]], n: int = 10) -> dict:
    """A sweep row with 4 duplicated captions, `n` images each: (copies, lab alignment) per caption in order."""
    rows = [{"prompt": f"c{i}", "group": "duplicated", "copies": k, "lab_alignment": a}
            for i, (k, a) in enumerate(per_caption)]
    rows.append({"prompt": "u", "group": "unique", "copies": 0, "lab_alignment": 0.9})  # not a duplicated caption
    return {"curve": curve, "method": curve, "knob": "g" if curve == "cfg" else "s", "value": value,
            "duplicated": {"n_images": n * len(per_caption)}, "per_prompt_dup": rows}


def test_setting_is_chosen_on_validation_and_reported_on_test():
    # captions 0, 2 are validation; 1, 3 test. CFG's validation alignment (0.6 + 0.4) / 2 = 0.5
    cfg = _point("cfg", 3.0, [(8, 0.6), (7, 0.5), (9, 0.4), (6, 0.5)])
    strong = _point("m", 2.0, [(0, 0.3), (0, 0.3), (0, 0.3), (0, 0.3)])  # fewest copies, alignment too low
    good = _point("m", 1.0, [(1, 0.5), (5, 0.2), (1, 0.5), (4, 0.2)])  # validation 2 copies at 0.5: chosen
    weak = _point("m", 0.5, [(3, 0.7), (0, 0.9), (3, 0.7), (0, 0.9)])  # 6 validation copies at 0.7
    low = _point("never", 1.0, [(0, 0.1)] * 4)
    md, out = tr.validated({"cfg": [cfg], "m": [strong, good, weak], "never": [low]}, 3.0)
    m = out["m"]["1.0"]
    assert m["value"] == 1.0  # chosen on validation, although its test captions copy more than `weak`'s
    assert m["test"] == {"alignment": pytest.approx(0.2), "copies": 9, "n": 20, "captions": 2}
    assert m["ci95"] == list(wilson(9, 20))
    # at 0.9× the target (0.45) the same point wins on validation copies
    assert out["m"]["0.9"]["value"] == 1.0
    assert out["never"]["1.0"] == {"reached": False, "best_validation_alignment": pytest.approx(0.1)}
    assert "m (s) | 1× | s = 1.0 | 45.0 % [" in md and "never reaches (best 0.100)" in md


def test_sweeps_without_per_prompt_rows_are_refused():
    row = _point("cfg", 3.0, [(1, 0.5)] * 4)
    del row["per_prompt_dup"]
    with pytest.raises(ValueError, match="no per-prompt rows"):
        tr.validated({"cfg": [row]}, 3.0)


def test_sweep_finds_the_lab_beside_a_built_lora_or_in_a_training_runs_data(tmp_path):
    import tradeoff

    built = tmp_path / "built"
    built.mkdir()
    (built / "lab_config.json").write_text("{}")
    assert tradeoff.lab_config_dir(built) == built
    final = tmp_path / "run" / "final"  # a training run: run/final/ weights, run/data/lab_config.json
    final.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no lab_config.json"):
        tradeoff.lab_config_dir(final)
    assert tradeoff.main(["--lora", str(final), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert not (tmp_path / "w").exists() and not (tmp_path / "o.jsonl").exists()  # nothing half-written
    (tmp_path / "run" / "data").mkdir()
    (tmp_path / "run" / "data" / "lab_config.json").write_text("{}")
    assert tradeoff.lab_config_dir(final) == tmp_path / "run" / "data"
