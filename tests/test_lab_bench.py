"""`guard-train lab --size smoke`: every training and inference arm, 2 seeds, end to end (plumbing, not numbers)."""

import json
from pathlib import Path

import pytest

from guard_train.lab.bench import (
    ROOT,
    TRAIN_ARMS,
    _slug,
    infer_base,
    run_lab,
    verdict,
    weights_fingerprint,
)
from guard_train.lab.dataset import read_lab_config

ARMS, METHODS = ["plain", "entropy+dup (default)"], ["cfg", "guard"]


def test_every_training_arm_is_a_valid_run_config(tmp_path, tiny_sd_dir):
    """Each arm's overrides load as a run config (the smoke run below trains only two of them)."""
    from guard_train.lab.bench import SIZES, _overrides
    from guard_train.lab.config import load_config

    for arm in TRAIN_ARMS:
        cfg = load_config(_overrides(SIZES["smoke"], arm, 0, tmp_path, str(tiny_sd_dir)))
        assert cfg.train.max_steps == 8, arm


@pytest.mark.slow  # ~2 min on 2 cores: CI's second step, keeping the default suite under ~15 min
def test_smoke_lab_runs_arms_and_reuses_finished_cells(tmp_path, tiny_sd_dir):
    """Two training arms and two inference methods, 2 seeds each (every method runs in tests/test_engine.py)."""
    out = tmp_path / "lab"

    def run(o, **kw):
        return run_lab("smoke", o, model=str(tiny_sd_dir), arms=ARMS, methods=METHODS, **kw)

    res = run(out, progress=lambda *_: None)
    t = res["table"]
    assert list(t["train"]) == ARMS and list(t["infer"]) == METHODS
    for kind, cost in (("train", "cost_vs_plain"), ("infer", "cost_vs_cfg")):
        for arm, row in t[kind].items():
            s = row["stats"]
            assert s["duplicated.copy_rate"]["n"] == 2 and 0 <= s["duplicated.copy_rate"]["mean"] <= 1, arm
            assert 0 < s["duplicated.top1_mean"]["mean"] <= 1 and s[cost]["mean"] > 0, arm
            assert s["duplicated.lab_alignment"]["n"] == 2, arm
    assert t["train"]["plain"]["stats"]["cost_vs_plain"]["mean"] == 1.0
    assert set(t["train"]["plain"]["verdict"].values()) == {"reference"}
    assert any(k.startswith("auroc.") for k in t["train"]["plain"]["stats"])
    assert t["infer"]["guard"]["stats"]["duplicated.localized_similarity_mean"]["n"] == 2  # end-token mask recorded
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("train__*.json")]
    assert len(cells) == 4 and all([p["step"] for p in c["over_training"]] == [4, 8] for c in cells)
    md = (out / "lab-results.md").read_text()
    assert res["backend"] in md and all(f"| {a} |" in md for a in [*ARMS, *METHODS])
    head = (out / "headline.md").read_text()
    assert head.count("| train: ") == len(ARMS) and head.count("| infer: ") == len(METHODS)
    assert (out / "tradeoff.png").stat().st_size > 0 and (out / "over_training.png").stat().st_size > 0
    grids = {p.name for p in (out / "grids").glob("*.png")}
    assert grids == {f"train_{_slug(a)}.png" for a in ARMS} | {f"infer_{_slug(m)}.png" for m in METHODS}
    again = run(out, progress=lambda *_: None)  # nothing recomputed
    assert again["cells_reused"] == again["cells_total"] == 8 and (out / "lab-results.md").read_text() == md
    # cells kept elsewhere (as --docs keeps them in docs/): another output dir reuses them all ...
    moved = run(tmp_path / "lab2", progress=lambda *_: None, cells_dir=out / "cells")
    assert moved["cells_reused"] == 8 and not (tmp_path / "lab2" / "cells").exists()
    # ... but an inference cell still to make needs the plain arm's model: gone, so that plain cell is remade
    import shutil

    shutil.rmtree(json.loads((out / "cells" / "train__plain__s0.json").read_text())["final"])
    (out / "cells" / "infer__guard__s0.json").unlink()
    made = []
    remade = run(tmp_path / "lab3", progress=made.append, cells_dir=out / "cells")
    assert remade["cells_reused"] == 6 and made == ["[lab] train arm 'plain' seed 0",
                                                    "[lab] inference arm 'guard' seed 0"]


def test_verdict_judges_copy_rate_top1_and_alignment_each_beyond_the_seed_spread():
    ref = {"duplicated.copy_rate": {"mean": 0.5, "std": 0.05}, "duplicated.top1_mean": {"mean": 0.6, "std": 0.02},
           "duplicated.lab_alignment": {"mean": 0.5, "std": 0.05}}
    arm = {"duplicated.copy_rate": {"mean": 0.2, "std": 0.05}, "duplicated.top1_mean": {"mean": 0.59, "std": 0.02},
           "duplicated.lab_alignment": {"mean": 0.3, "std": 0.05}}
    # 0.2 vs 0.5: gap 0.3 > spread 0.1; 0.59 vs 0.6: gap 0.01 < 0.04; alignment 0.3 vs 0.5: gap 0.2 > 0.1
    assert verdict(arm, ref) == {"copy_rate": "lower (helps)", "top1_mean": "within seed spread",
                                 "alignment": "lower (costs quality)"}
    worse = {"duplicated.copy_rate": {"mean": 0.7, "std": 0.0}, "duplicated.lab_alignment": {"mean": 0.61, "std": 0.0}}
    assert verdict(worse, ref) == {"copy_rate": "higher (worse)", "top1_mean": "n/a", "alignment": "higher (better)"}
    # exactly at the spread is not beyond it
    edge = {"duplicated.copy_rate": {"mean": 0.4, "std": 0.05}}
    assert verdict(edge, ref)["copy_rate"] == "within seed spread"
    zero = {"duplicated.copy_rate": {"mean": 0.0, "std": 0.0}, "duplicated.top1_mean": {"mean": 0.5, "std": 0.01}}
    ref0 = {"duplicated.copy_rate": {"mean": 0.0, "std": 0.0}, "duplicated.top1_mean": {"mean": 0.6, "std": 0.01}}
    assert verdict(zero, ref0)["copy_rate"] == "no copies either side"
    assert verdict(zero, ref0)["top1_mean"] == "lower (helps)"
    one = {k: {**v, "n": 1} for k, v in zero.items()}  # one seed: no spread to be beyond
    assert verdict(one, ref0) == {"copy_rate": "no copies either side", "top1_mean": "one seed: no verdict",
                                  "alignment": "n/a"}


def test_docs_tables_are_replaced_between_their_markers():
    from guard_train.lab.bench import HEADLINE_END, HEADLINE_START, TABLE_END, TABLE_START, replace_marked

    text = f"intro\n{HEADLINE_START}\nold | table\n{HEADLINE_END}\noutro\n"
    assert replace_marked(text, "| new |", HEADLINE_START, HEADLINE_END) == \
        f"intro\n{HEADLINE_START}\n| new |\n{HEADLINE_END}\noutro\n"
    page = f"# hand-written\ncurves\n{TABLE_START}\nold\n{TABLE_END}\nmore hand-written\n"
    assert replace_marked(page, "new", TABLE_START, TABLE_END) == \
        f"# hand-written\ncurves\n{TABLE_START}\nnew\n{TABLE_END}\nmore hand-written\n"
    for bad in ("no markers here", f"{HEADLINE_END}\n{HEADLINE_START}", text + HEADLINE_END):
        with pytest.raises(ValueError, match="page needs one"):
            replace_marked(bad, "| new |", HEADLINE_START, HEADLINE_END)
    # the real pages carry the markers --docs writes between (lab-results.md's hand-written sections survive it)
    pages = {"results.md": (HEADLINE_START, HEADLINE_END), "lab-results.md": (TABLE_START, TABLE_END)}
    for page, (start, end) in pages.items():
        text = (ROOT / "docs" / page).read_text()
        assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end)


def test_cells_are_keyed_by_the_weights_not_the_path(tmp_path, tiny_sd_dir):
    import shutil

    from guard_train.lab.bench import weights_fingerprint

    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_sd_dir, copy)
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_sd_dir) and len(weights_fingerprint(copy)) == 16
    f = copy / "unet" / "diffusion_pytorch_model.safetensors"
    b = bytearray(f.read_bytes())
    b[-1] ^= 1  # one bit of one weight
    f.write_bytes(bytes(b))
    assert weights_fingerprint(copy) != weights_fingerprint(tiny_sd_dir)


def test_inference_arms_on_the_committed_memorizing_lora_use_its_own_lab(tmp_path, tiny_sd_dir):
    """The full size's inference arms run on a LoRA: its training lab is rebuilt from its lab_config.json and the
    prompts come from there; cells remember the LoRA's weights fingerprint."""
    lora = ROOT / "models" / "tiny-sd-memorized-lora"
    with pytest.raises(ValueError, match="expected a LoRA dir"):
        run_lab("smoke", tmp_path / "bad", model=str(tiny_sd_dir), infer_model=str(tmp_path), progress=print)
    assert not (tmp_path / "bad").exists()  # bad input writes nothing
    out = tmp_path / "lab"
    res = run_lab("smoke", out, seeds=[0], arms=["plain"], methods=["cfg", "guard"], model=str(tiny_sd_dir),
                  infer_model=str(lora), progress=lambda *_: None)
    # the same lab (a config written before a field existed reads with that field's default)
    assert read_lab_config(out / "infer_lab") == read_lab_config(lora)
    cell = json.loads((out / "cells" / "infer__guard__s0.json").read_text())
    assert cell["key"]["infer_model"] == str(lora) and len(cell["key"]["infer_weights"]) == 16
    assert [cell["metrics"]["groups"][g]["n_images"] for g in ("duplicated", "unique", "held_out")] == [4, 4, 4]
    assert set(res["table"]["infer"]) == {"cfg", "guard"} and "on its base `models/tiny-sd`, its own training lab" \
        in (out / "lab-results.md").read_text()
    assert cell["key"]["infer_base_weights"] == weights_fingerprint(ROOT / "models" / "tiny-sd")  # not tiny_sd_dir
    # --infer-guidance: only the inference cells are remade (the plain training cell is reused), keyed by it
    before = cell["metrics"]["groups"]["duplicated"]["top1_mean"]
    res = run_lab("smoke", out, seeds=[0], arms=["plain"], methods=["guard"], model=str(tiny_sd_dir),
                  infer_model=str(lora), infer_guidance=3.0, progress=lambda *_: None)
    cell = json.loads((out / "cells" / "infer__guard__s0.json").read_text())
    assert cell["key"]["infer_guidance"] == 3.0 and res["cells_reused"] == 1
    assert cell["metrics"]["groups"]["duplicated"]["top1_mean"] != before
    assert "every method at guidance scale 3" in (out / "lab-results.md").read_text()
    with pytest.raises(ValueError, match="infer_guidance must be > 0"):
        run_lab("smoke", tmp_path / "bad2", infer_model=str(lora), infer_guidance=0.0, progress=print)


def test_inference_arms_load_a_lora_on_its_own_base(tmp_path):
    """The v-prediction LoRA runs on models/tiny-sd-v whatever the training arms' --model; a LoRA whose recorded
    base is missing is refused before anything is written."""
    import shutil

    v = ROOT / "models" / "tiny-sd-v-memorized-lora"
    assert Path(infer_base(v, "models/tiny-sd")).resolve() == ROOT / "models" / "tiny-sd-v"
    assert infer_base(None, "models/tiny-sd") == "models/tiny-sd"  # "plain": the plain arm's own model
    bad = tmp_path / "lora"
    shutil.copytree(v, bad)
    info = json.loads((bad / "build_info.json").read_text())
    (bad / "build_info.json").write_text(json.dumps({**info, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(ValueError, match="which is not a model directory here"):
        run_lab("smoke", tmp_path / "out", infer_model=str(bad), progress=print)
    assert not (tmp_path / "out").exists()


def test_copy_rate_verdict_needs_separated_wilson_intervals():
    from guard_train.lab.bench import interval_effect, pooled_rates

    p = pooled_rates({"duplicated.copies": 22, "duplicated.own_copies": 20, "duplicated.n_images": 32})
    cfg = p["duplicated.copy_rate"]
    assert cfg["k"] == 22 and cfg["n"] == 32 and cfg["rate"] == 22 / 32
    assert p["duplicated.own_copy_rate"]["k"] == 20 and "unique.copy_rate" not in p
    rate = lambda k: pooled_rates({"duplicated.copies": k, "duplicated.n_images": 32})["duplicated.copy_rate"]  # noqa: E731
    assert interval_effect(rate(0), cfg) == "lower (helps)"  # [0, .11] vs [.51, .82]
    assert interval_effect(rate(16), cfg) == "intervals overlap"  # [.34, .66]
    assert interval_effect(cfg, rate(5)) == "higher (worse)"  # [.07, .32]
    assert interval_effect(rate(0), rate(0)) == "no copies either side"
