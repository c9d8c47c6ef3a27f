import json
import os
import subprocess

import pytest
from conftest import PY, ROOT, small_lab_args

from guard_train.eval.command import EvalInputError, check_gate, parse_condition


def _rows(copy):
    return [{"checkpoint": "c", "method": "cfg", "metrics": {"groups": {
        "duplicated": {"copy_rate": copy, "top1_median": 0.3}, "all": {"copy_rate": copy / 2, "top1_median": 0.2}}}}]


def test_gate_conditions():
    assert parse_condition("duplicated.copy_rate>=0.1") == ("duplicated.copy_rate", ">=", 0.1)
    assert check_gate(_rows(0.2), [parse_condition("duplicated.copy_rate>0.1")]) != []
    assert check_gate(_rows(0.2), [parse_condition("copy_rate>0.1")]) == []  # 'all' group: 0.1 is not > 0.1
    assert check_gate(_rows(0.05), [parse_condition("duplicated.copy_rate>0.1")]) == []
    with pytest.raises(EvalInputError, match="expected METRIC OP VALUE"):
        parse_condition("copy_rate is high")
    with pytest.raises(EvalInputError, match="no metric"):
        check_gate(_rows(0.1), [parse_condition("duplicated.sharpness>1")])


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    from guard_train.lab.dataset import LabConfig, build_lab, write_imagefolder

    d = tmp_path_factory.mktemp("lab")
    write_imagefolder(build_lab(LabConfig(num_instances=12, dup_fraction=0.25, dup_repeats=3, held_out=2)), d)
    return d


def _eval(args, launcher=(), timeout=300):
    return subprocess.run([*launcher, *(() if launcher else (PY,)), "-m", "guard_train.cli", "eval", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_eval_exit_codes_and_outputs(tiny_sd_dir, lab_dir, tmp_path):
    common = ["--model", str(tiny_sd_dir), "--reference", str(lab_dir), "--methods", "cfg,guard", "--num-images", "2",
              "--steps", "3", "--prompts-per-group", "2"]
    ok = _eval([*common, "--out", str(tmp_path / "ok"), "--fail-if", "duplicated.copy_rate>0.99"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    m = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert [(r["checkpoint"], r["method"]) for r in m["rows"]] == [("base", "cfg"), ("base", "guard")]
    assert set(m["rows"][0]["metrics"]["groups"]) == {"duplicated", "unique", "held_out", "all"}
    cfg_row = m["rows"][0]["metrics"]  # cfg: detection AUROC (duplicated vs unique) and localized similarity
    assert set(cfg_row["detection_auroc_duplicated_vs_unique"]) == {"wen_first", "wen_first10", "wen_all", "ren_E",
                                                                   "ren_D", "be_LD"}
    assert 0 <= cfg_row["groups"]["duplicated"]["localized_similarity_mean"] <= 1
    assert "localized_similarity_mean" not in cfg_row["groups"]["held_out"]  # no own training image
    assert m["backend"].startswith("sscd")
    html = (tmp_path / "ok" / "report.html").read_text()
    assert "data:image/png;base64" in html and "not CLIP" in html
    assert (tmp_path / "ok" / "per_prompt.csv").read_text().count("\n") == 1 + 2 * 6
    fail = _eval([*common, "--out", str(tmp_path / "fail"), "--fail-if", "all.top1_median>-1"])
    assert fail.returncode == 1 and "GATE FAILED" in fail.stderr
    for bad_ref in (str(tmp_path / "missing"), str(tmp_path)):  # missing; a directory with no images
        bad = _eval(["--model", str(tiny_sd_dir), "--reference", bad_ref, "--prompts", str(lab_dir / "held_out.jsonl"),
                     "--out", str(tmp_path / "bad")])
        assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.multiproc
def test_eval_two_processes_equals_one(tiny_sd_dir, lab_dir, tmp_path):
    common = ["--model", str(tiny_sd_dir), "--reference", str(lab_dir), "--methods", "guard", "--num-images", "2",
              "--steps", "3", "--prompts-per-group", "3"]  # 8 prompts: uneven split is padded and de-duplicated
    one = _eval([*common, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    launch = (PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
              "--main_process_port", "29641")
    two = _eval([*common, "--out", str(tmp_path / "two")], launcher=launch)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())["rows"][0]["metrics"]["groups"]
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())["rows"][0]["metrics"]["groups"]
    for g in a:
        for k in ("copy_rate", "top1_mean", "top1_median", "diversity"):
            assert a[g][k] == pytest.approx(b[g][k], abs=1e-4), (g, k)
    assert ((tmp_path / "one" / "per_prompt.csv").read_text().count("\n")
            == (tmp_path / "two" / "per_prompt.csv").read_text().count("\n"))


@pytest.mark.multiproc
def test_memorization_callback_on_two_processes(tiny_sd_dir, tmp_path):
    args = small_lab_args(tmp_path, tiny_sd_dir, **{"run.name": "cb", "train.max_steps": 3, "eval.at_end": "true",
                                                    "eval.steps": 3, "eval.prompts_per_group": 2,
                                                    "eval.methods": "[cfg,guard]"})
    cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
           "--main_process_port", "29642", str(ROOT / "train.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "cb" / "memorization" / "final" / "metrics.json").read_text())
    assert set(m["methods"]) == {"cfg", "guard"} and m["methods"]["guard"]["groups"]["all"]["n_images"] == 2 * 2 * 2
    assert (tmp_path / "cb" / "memorization" / "final" / "grid_guard.png").exists()


@pytest.mark.multiproc
def test_callback_two_processes_equals_one(tiny_sd_dir, tmp_path):
    helper = str(ROOT / "tests/helpers/callback_eval.py")
    one = subprocess.run([PY, helper, str(tiny_sd_dir), str(tmp_path / "one")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([PY, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "accelerate_configs/cpu_2proc.yaml"), "--main_process_port", "29643", helper,
                          str(tiny_sd_dir), str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one/memorization/check/metrics.json").read_text())["methods"]
    b = json.loads((tmp_path / "two/memorization/check/metrics.json").read_text())["methods"]
    for m in ("cfg", "guard"):
        for g in a[m]["groups"]:
            for k in ("copy_rate", "top1_mean", "top1_p95", "diversity"):
                assert a[m]["groups"][g][k] == pytest.approx(b[m]["groups"][g][k], abs=1e-4), (m, g, k)
    assert a["cfg"]["detection_auroc_duplicated_vs_unique"] == pytest.approx(
        b["cfg"]["detection_auroc_duplicated_vs_unique"], abs=1e-6)


def test_lab_reference_is_every_training_row(lab_dir):
    """The copy metric's reference set is every row the model trained on (planted near copies included), keyed by
    instance; each prompt's owner is its instance."""
    from guard_train.eval.evaluate import reference_and_prompts
    from guard_train.lab.dataset import read_manifest

    rows = read_manifest(lab_dir)
    ref, pset = reference_and_prompts(lab_dir, per_group=2)
    assert len(ref.images) == len(rows) > len({r.instance for r in rows})
    assert ref.keys == [r.instance for r in rows]
    dup = next(o for o, g in zip(pset.owners, pset.groups) if g == "duplicated")
    assert len(ref.own_rows(dup)) == sum(r.instance == dup for r in rows) > 1


def test_callback_on_user_data_with_the_core_schema(tiny_sd_dir, tmp_path):
    """A user's imagefolder (no lab, no manifest), the core config schema, and the memorization callback with
    eval.reference (every training image) and eval.prompts: the callback measures at the end of training."""
    import shutil

    from guard_train.callbacks import build_callbacks
    from guard_train.config.loader import ConfigError
    from guard_train.config.loader import load_config as core_load_config
    from guard_train.lab.dataset import LabConfig, build_lab, write_imagefolder
    from guard_train.training.loop import Trainer

    lab = build_lab(LabConfig(num_instances=6, dup_fraction=0.0, held_out=0))
    written = write_imagefolder(lab, tmp_path / "lab")
    data = tmp_path / "mydata"
    shutil.copytree(written / "train", data)  # only the images + metadata.jsonl: what a user has
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{lab.items[0].caption}\n{lab.items[1].caption}\n")
    base = ["recipe=lora_sd15", f"model.path={tiny_sd_dir}", "data.source=imagefolder", f"data.path={data}",
            "data.resolution=64", "train.mixed_precision=no", "train.gradient_checkpointing=false",
            "train.batch_size=3", "train.max_steps=2", "train.lr_warmup_steps=0", "train.checkpoint_every=0",
            f"run.output_dir={tmp_path / 'runs'}", "run.name=user", "run.report_to=none", "eval.at_end=true",
            "eval.steps=3", "eval.images_per_prompt=2", "eval.methods=[cfg]"]
    with pytest.raises(ConfigError, match="eval.reference"):
        core_load_config(base)
    with pytest.raises(ConfigError, match="eval.prompts"):
        core_load_config([*base, f"eval.reference={data}"])
    cfg = core_load_config([*base, f"eval.reference={data}", f"eval.prompts={prompts}"])
    assert type(cfg).__name__ == "Config"
    with pytest.raises(ConfigError, match="build_callbacks"):
        Trainer(cfg)  # eval.* asks for the callback: hooks without it are refused, not silently unmeasured
    t = Trainer(cfg, build_callbacks(cfg))
    try:
        t.train()
    finally:
        t.close()
    m = json.loads((tmp_path / "runs" / "user" / "memorization" / "final" / "metrics.json").read_text())
    g = m["methods"]["cfg"]["groups"]
    assert g["all_prompts"]["n_images"] == 2 * 2 and 0.0 <= g["all_prompts"]["copy_rate"] <= 1.0
    assert (tmp_path / "runs" / "user" / "memorization" / "prompts.jsonl").read_text().count("\n") == 2
