"""`guard-train lab --size smoke`: every training and inference arm, 2 seeds, end to end (plumbing, not numbers)."""

import json

from guard_train.eval.lab_bench import INFER_ARMS, TRAIN_ARMS, _slug, run_lab, verdict


def test_smoke_lab_runs_every_arm_and_reuses_finished_cells(tmp_path, tiny_sd_dir):
    out = tmp_path / "lab"
    res = run_lab("smoke", out, model=str(tiny_sd_dir), progress=lambda *_: None)
    t = res["table"]
    assert list(t["train"]) == list(TRAIN_ARMS) and list(t["infer"]) == list(INFER_ARMS)
    for kind, cost in (("train", "cost_vs_plain"), ("infer", "cost_vs_cfg")):
        for arm, row in t[kind].items():
            s = row["stats"]
            assert s["duplicated.copy_rate"]["n"] == 2 and 0 <= s["duplicated.copy_rate"]["mean"] <= 1, arm
            assert 0 < s["duplicated.top1_mean"]["mean"] <= 1 and s[cost]["mean"] > 0, arm
            assert s["duplicated.lab_alignment"]["n"] == 2, arm
    assert t["train"]["plain"]["stats"]["cost_vs_plain"]["mean"] == 1.0 and t["train"]["plain"]["verdict"] == "reference"
    assert any(k.startswith("auroc.") for k in t["train"]["plain"]["stats"])
    assert t["infer"]["guard"]["stats"]["duplicated.localized_similarity_mean"]["n"] == 2  # end-token mask recorded
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("train__*.json")]
    assert len(cells) == 12 and all([p["step"] for p in c["over_training"]] == [4, 8] for c in cells)
    md = (out / "lab-results.md").read_text()
    assert res["backend"] in md and all(f"| {a} |" in md for a in [*TRAIN_ARMS, *INFER_ARMS])
    assert (out / "tradeoff.png").stat().st_size > 0 and (out / "over_training.png").stat().st_size > 0
    grids = {p.name for p in (out / "grids").glob("*.png")}
    assert grids == {f"train_{_slug(a)}.png" for a in TRAIN_ARMS} | {f"infer_{_slug(m)}.png" for m in INFER_ARMS}
    again = run_lab("smoke", out, model=str(tiny_sd_dir), progress=lambda *_: None)  # nothing recomputed
    assert again["cells_reused"] == again["cells_total"] == 36 and (out / "lab-results.md").read_text() == md


def test_verdict_compares_means_beyond_the_seed_spread():
    ref = {"duplicated.copy_rate": {"mean": 0.5, "std": 0.05}, "duplicated.top1_mean": {"mean": 0.6, "std": 0.02}}
    assert verdict({"duplicated.copy_rate": {"mean": 0.2, "std": 0.05}}, ref) == "lower copy_rate (helps)"
    assert verdict({"duplicated.copy_rate": {"mean": 0.45, "std": 0.05}}, ref).startswith("no measurable effect")
    assert verdict({"duplicated.copy_rate": {"mean": 0.7, "std": 0.0}}, ref) == "higher copy_rate (worse)"
    zero = {"duplicated.copy_rate": {"mean": 0.0, "std": 0.0}, "duplicated.top1_mean": {"mean": 0.5, "std": 0.01}}
    ref0 = {"duplicated.copy_rate": {"mean": 0.0, "std": 0.0}, "duplicated.top1_mean": {"mean": 0.6, "std": 0.01}}
    assert verdict(zero, ref0) == "lower top1_mean (helps)"  # no copies anywhere: the continuous score decides


def test_inference_arms_on_the_committed_memorizing_lora_use_its_own_lab(tmp_path, tiny_sd_dir):
    """The full size's inference arms run on a LoRA: its training lab is rebuilt from its lab_config.json and the
    prompts come from there; cells remember the LoRA's weights fingerprint."""
    import pytest

    from guard_train.eval.lab_bench import ROOT

    lora = ROOT / "models" / "tiny-sd-memorized-lora"
    with pytest.raises(ValueError, match="expected a LoRA dir"):
        run_lab("smoke", tmp_path / "bad", model=str(tiny_sd_dir), infer_model=str(tmp_path), progress=print)
    assert not (tmp_path / "bad").exists()  # bad input writes nothing
    out = tmp_path / "lab"
    res = run_lab("smoke", out, seeds=[0], arms=["plain"], methods=["cfg", "guard"], model=str(tiny_sd_dir),
                  infer_model=str(lora), progress=lambda *_: None)
    assert json.loads((out / "infer_lab" / "lab_config.json").read_text()) == \
        json.loads((lora / "lab_config.json").read_text())
    cell = json.loads((out / "cells" / "infer__guard__s0.json").read_text())
    assert cell["key"]["infer_model"] == str(lora) and len(cell["key"]["infer_weights"]) == 16
    assert [cell["metrics"]["groups"][g]["n_images"] for g in ("duplicated", "unique", "held_out")] == [4, 4, 4]
    assert set(res["table"]["infer"]) == {"cfg", "guard"} and "on the base, its own training lab" in \
        (out / "lab-results.md").read_text()
