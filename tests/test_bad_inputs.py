"""Bad input through the real entry points (`train.py` and every `guard-train` subcommand): exit code 2, a message
naming the offending key or path, and nothing outside the command's own output touched.

Each row runs in-process (`main(argv)` / `train_main(argv)`, what the console scripts call); a few rows run as
subprocesses for the exit-code path itself. Every row checks that the workspace is unchanged afterwards — the
sentinel file beside the outputs, the user's own folder `mine/` and its file survive, and nothing was created —
except the rows marked `writes`, which may create their own output directory only. docs/reliability.md lists the
table.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import PY, ROOT
from PIL import Image

from guard_train.lab.config import load_config

MODEL = str(ROOT / "models" / "tiny-sd")


@dataclass
class Case:
    id: str
    entry: str  # "train" (train.py) or "cli" (guard-train)
    argv: list[str]  # {w} is the workspace
    needle: str  # what the message must name (the key, the flag or the path)
    writes: str = ""  # a workspace folder the command may create (its own output); "" = nothing may be created


def _train(*over: str, out: str = "{w}/runs") -> list[str]:
    base = [f"run.output_dir={out}", "run.report_to=none", "summary.enabled=false", f"model.path={MODEL}",
            "recipe=tiny_nomit"]
    return base + list(over)


def _img_data(*over: str, out: str = "{w}/runs") -> list[str]:
    return _train("data.source=imagefolder", "eval.every_n_steps=0", *over, out=out)


GEN = ["generate", "--model", MODEL, "--prompts", "a red circle on a cat photo", "--steps", "2", "--num-images", "1"]
DET = ["detect", "--model", MODEL, "--prompts", "{w}/detect.jsonl", "--steps", "2", "--num-images", "1"]
EVAL = ["eval", "--model", MODEL, "--reference", "{w}/good", "--prompts", "{w}/prompts.txt", "--backend", "pixel",
        "--steps", "2", "--num-images", "1"]
DEDUP = ["dedup", "--data", "{w}/good", "--backend", "phash"]

CASES = [
    # train.py: output directory safety
    Case("train-name-dot-overwrite", "train", _train("run.name=.", "run.overwrite=true", out="{w}/mine"), "run.name"),
    Case("train-name-dotdot", "train", _train("run.name=../../elsewhere"), "run.name"),
    Case("train-name-absolute", "train", _train("run.name={w}/abs"), "run.name"),
    Case("train-overwrite-user-folder", "train", _train("run.name=mine", "run.overwrite=true", out="{w}"), "mine"),
    Case("train-output-dir-is-a-file", "train", _train(out="{w}/file.txt"), "run.output_dir"),
    Case("train-run-dir-is-a-file", "train", _train("run.name=file.txt", out="{w}"), "file.txt"),
    # train.py: values
    Case("train-lr-inf", "train", _train("train.learning_rate=inf"), "train.learning_rate"),
    Case("train-lr-nan", "train", _train("train.learning_rate=nan"), "train.learning_rate"),
    Case("train-log-every-0", "train", _train("run.log_every=0"), "run.log_every"),
    Case("train-lab-instances-0", "train", _train("data.lab.num_instances=0"), "data.lab.num_instances"),
    Case("train-lab-instances-abc", "train", _train("data.lab.num_instances=abc"), "data.lab.num_instances"),
    Case("train-batch-0", "train", _train("train.batch_size=0"), "train.batch_size"),
    Case("train-caption-dropout-1.5", "train", _train("data.caption_dropout=1.5"), "data.caption_dropout"),
    Case("train-adam-beta2-1", "train", _train("train.adam_beta2=1"), "train.adam_beta2"),
    Case("train-quantile-nan", "train", _train("mitigation.entropy_filter.quantile=nan"),
         "mitigation.entropy_filter.quantile"),
    Case("train-dup-fraction-neg", "train", _train("data.lab.dup_fraction=-0.1"), "data.lab.dup_fraction"),
    Case("train-mixed-precision-fp8", "train", _train("train.mixed_precision=fp8"), "train.mixed_precision"),
    Case("train-summary-steps-0", "train", _train("summary.steps=0"), "summary.steps"),
    # train.py: input files
    Case("train-recipe-not-yaml", "train", ["recipe={w}/bad.yaml"], "bad.yaml"),
    Case("train-recipe-binary", "train", ["recipe={w}/binary.yaml"], "binary.yaml"),
    Case("train-empty-imagefolder", "train", _img_data("data.path={w}/empty"), "empty"),
    Case("train-model-path-is-a-file", "train", _train("model.path={w}/file.txt"), "model.path"),
    Case("train-init-lora-not-safetensors", "train", _train("train.mode=lora", "train.init_lora={w}/badlora"),
         "train.init_lora"),
    Case("train-parquet-not-parquet", "train", _train("data.source=parquet", "data.path={w}/x.parquet",
                                                      "eval.every_n_steps=0"), "x.parquet"),
    Case("train-batch-larger-than-data", "train", _img_data("data.path={w}/good", "train.batch_size=64"),
         "train.batch_size"),
    Case("train-all-images-corrupt", "train",
         _img_data("data.path={w}/corrupt", "train.batch_size=1", "train.max_steps=2", "run.name=c",
                   out="{w}/runs_corrupt"), "bad_items.json", writes="runs_corrupt"),
    # guard-train generate
    Case("generate-guidance-nan", "cli", [*GEN, "--param", "guidance_scale=nan", "--out", "{w}/out"], "guidance_scale"),
    Case("generate-guidance-inf", "cli", [*GEN, "--param", "guidance_scale=inf", "--out", "{w}/out"], "guidance_scale"),
    Case("generate-spike-abc", "cli", [*GEN, "--param", "spike_scale=abc", "--out", "{w}/out"], "spike_scale"),
    Case("generate-param-no-eq", "cli", [*GEN, "--param", "spike_scale", "--out", "{w}/out"], "--param"),
    Case("generate-num-images-neg", "cli", [*GEN, "--num-images", "-2", "--out", "{w}/out"], "--num-images"),
    Case("generate-steps-0", "cli", [*GEN, "--steps", "0", "--out", "{w}/out"], "--steps"),
    Case("generate-max-batch-0", "cli", [*GEN, "--max-batch", "0", "--out", "{w}/out"], "--max-batch"),
    Case("generate-prompts-binary", "cli", [*GEN, "--prompts", "{w}/binary.bin", "--out", "{w}/out"], "binary.bin"),
    Case("generate-prompts-empty-file", "cli", [*GEN, "--prompts", "{w}/blank.txt", "--out", "{w}/out"], "blank.txt"),
    Case("generate-model-missing", "cli", [*GEN, "--model", "{w}/nope", "--out", "{w}/out"], "--model"),
    Case("generate-lora-not-safetensors", "cli", [*GEN, "--lora", "{w}/badlora", "--out", "{w}/out"], "--lora"),
    Case("generate-out-is-a-file", "cli", [*GEN, "--out", "{w}/file.txt"], "file.txt"),
    Case("generate-out-user-folder", "cli", [*GEN, "--out", "{w}/mine"], "mine"),
    # guard-train detect
    Case("detect-prompts-binary", "cli",
         ["detect", "--model", MODEL, "--prompts", "{w}/binary.bin", "--out", "{w}/out"], "binary.bin"),
    Case("detect-prompts-missing", "cli", ["detect", "--model", MODEL, "--prompts", "{w}/nope.jsonl", "--out",
                                           "{w}/out"], "nope.jsonl"),
    Case("detect-prompts-no-label", "cli", [*DET, "--prompts", "{w}/prompts.txt", "--out", "{w}/out"], "prompts.txt"),
    Case("detect-steps-0", "cli", [*DET, "--steps", "0", "--out", "{w}/out"], "--steps"),
    Case("detect-out-is-a-file", "cli", [*DET, "--out", "{w}/file.txt"], "file.txt"),
    # guard-train eval
    Case("eval-prompts-binary", "cli", [*EVAL, "--prompts", "{w}/binary.bin", "--out", "{w}/out"], "binary.bin"),
    Case("eval-reference-all-corrupt", "cli", [*EVAL, "--reference", "{w}/corrupt", "--out", "{w}/out"], "corrupt"),
    Case("eval-reference-missing", "cli", [*EVAL, "--reference", "{w}/nope", "--out", "{w}/out"], "nope"),
    Case("eval-reference-manifest-damaged", "cli", [*EVAL, "--reference", "{w}/badlab", "--out", "{w}/out"],
         "manifest.jsonl"),
    Case("eval-threshold-1.5", "cli", [*EVAL, "--threshold", "1.5", "--out", "{w}/out"], "--threshold"),
    Case("eval-num-images-0", "cli", [*EVAL, "--num-images", "0", "--out", "{w}/out"], "--num-images"),
    Case("eval-unknown-backend", "cli", [*EVAL, "--backend", "nope", "--out", "{w}/out"], "--backend"),
    Case("eval-unknown-method", "cli", [*EVAL, "--methods", "cfg,nope", "--out", "{w}/out"], "nope"),
    Case("eval-lora-not-safetensors", "cli", [*EVAL, "--lora", "{w}/badlora", "--out", "{w}/out"], "badlora"),
    Case("eval-out-is-a-file", "cli", [*EVAL, "--out", "{w}/file.txt"], "file.txt"),
    # guard-train dedup
    Case("dedup-all-corrupt", "cli", [*DEDUP, "--data", "{w}/corrupt", "--out", "{w}/out"], "corrupt"),
    Case("dedup-empty-folder", "cli", [*DEDUP, "--data", "{w}/empty", "--out", "{w}/out"], "empty"),
    Case("dedup-unknown-backend", "cli", [*DEDUP, "--backend", "nope", "--out", "{w}/out"], "--backend"),
    Case("dedup-threshold-nan", "cli", [*DEDUP, "--threshold", "nan", "--out", "{w}/out"], "--threshold"),
    Case("dedup-manifest-binary", "cli", [*DEDUP, "--manifest", "{w}/binary.bin", "--out", "{w}/out"], "binary.bin"),
    Case("dedup-manifest-missing", "cli", [*DEDUP, "--manifest", "{w}/nope.jsonl", "--out", "{w}/out"], "nope.jsonl"),
    Case("dedup-manifest-not-a-lab-manifest", "cli", [*DEDUP, "--manifest", "{w}/detect.jsonl", "--out", "{w}/out"],
         "detect.jsonl"),
    Case("dedup-out-user-folder", "cli", [*DEDUP, "--out", "{w}/mine"], "mine"),
    # guard-train make-lab
    Case("make-lab-instances-abc", "cli", ["make-lab", "--out", "{w}/out", "--set", "num_instances=abc"],
         "num_instances"),
    Case("make-lab-dup-fraction-2", "cli", ["make-lab", "--out", "{w}/out", "--set", "dup_fraction=2"], "dup_fraction"),
    Case("make-lab-unknown-key", "cli", ["make-lab", "--out", "{w}/out", "--set", "bogus=1"], "bogus"),
    Case("make-lab-out-is-a-file", "cli", ["make-lab", "--out", "{w}/file.txt"], "file.txt"),
    # guard-train build-base / build-scorer / lab / status
    Case("build-base-steps-0", "cli", ["build-base", "--out", "{w}/out", "--work", "{w}/work", "--steps", "0"],
         "--steps"),
    Case("build-base-lr-inf", "cli", ["build-base", "--out", "{w}/out", "--work", "{w}/work", "--lr", "inf"], "--lr"),
    Case("build-base-out-user-folder", "cli", ["build-base", "--out", "{w}/mine", "--work", "{w}/work"], "mine"),
    Case("build-scorer-out-is-a-file", "cli", ["build-scorer", "--out", "{w}/file.txt"], "file.txt"),
    Case("lab-infer-guidance-nan", "cli", ["lab", "--out", "{w}/out", "--infer-guidance", "nan"], "--infer-guidance"),
    Case("lab-out-is-a-file", "cli", ["lab", "--out", "{w}/file.txt"], "file.txt"),
    Case("status-missing-run", "cli", ["status", "{w}/nope"], "nope"),
]


def _png(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("bad_inputs")
    (w / "sentinel.txt").write_text("the user's file next to the outputs")
    (w / "mine").mkdir()
    (w / "mine" / "keep.txt").write_text("the user's own folder")
    (w / "file.txt").write_text("an existing file")
    (w / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (w / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (w / "blank.txt").write_text("\n  \n")
    (w / "bad.yaml").write_text("train: {batch_size: [1, 2\n  : :\n")
    (w / "prompts.txt").write_text("a red circle on a cat photo\n")
    (w / "detect.jsonl").write_text(json.dumps({"prompt": "a red circle", "label": 1}) + "\n")
    (w / "empty").mkdir()
    (w / "badlab").mkdir()
    (w / "badlab" / "manifest.jsonl").write_text('{"id": 0, "instance": 0, "caption": "a"}\n{"id": 1, "inst\n')
    (w / "x.parquet").write_bytes(b"not parquet" * 50)
    (w / "badlora").mkdir()
    (w / "badlora" / "pytorch_lora_weights.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}garbage")
    for name, good in (("good", True), ("corrupt", False)):
        d = w / name
        d.mkdir()
        for i in range(2):
            if good:
                _png(d / f"{i}.png", i)
            else:
                (d / f"{i}.png").write_bytes(b"not a png" * 20)
        (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"caption {i}"}) + "\n"
                                                  for i in range(2)))
    return w


def _tree(w: Path) -> dict[str, bytes]:
    return {str(p.relative_to(w)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(w.rglob("*"))}


def _point_log_handlers_at_stderr() -> None:
    """Libraries (datasets) keep the stderr of the test that first logged; capsys closes it after that test, and a
    later log line would print a "Logging error" traceback of the test harness, not of the product."""
    import logging
    import sys

    for lg in [logging.getLogger(), *[l for l in logging.root.manager.loggerDict.values()
                                      if isinstance(l, logging.Logger)]]:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler:
                h.stream = sys.stderr  # not setStream: it flushes the closed one


def _run_in_process(case: Case, argv: list[str]) -> int:
    from guard_train.cli import main, train_main

    _point_log_handlers_at_stderr()
    try:
        return train_main(argv) if case.entry == "train" else main(argv)
    except SystemExit as e:  # argparse's refusal of a flag value
        return int(e.code)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_names_it_and_touches_nothing(case: Case, workspace: Path, capsys):
    before = _tree(workspace)
    argv = [a.replace("{w}", str(workspace)) for a in case.argv]
    rc = _run_in_process(case, argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc}; stderr:\n{err[-2000:]}"
    assert "Traceback" not in err
    assert case.needle.replace("{w}", str(workspace)) in err, err[-2000:]
    after = _tree(workspace)
    assert {k: v for k, v in after.items() if k in before} == before, "a file of the workspace changed or was removed"
    new = [k for k in after if k not in before]
    assert all(case.writes and k.split("/")[0] == case.writes for k in new), f"written outside its output: {new}"
    if case.writes:  # its own run directory is marked as ours, and the file its message points to exists
        import shutil

        run_dir = workspace / case.writes / "c"
        assert (run_dir / ".guard_train_run").is_file() and (run_dir / "bad_items.json").is_file()
        shutil.rmtree(workspace / case.writes)


def test_table_is_big_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_good_values_are_accepted():
    """The opposite failure: what accelerate's and diffusers' users type must not be refused."""
    for mp in ("no", "fp16", "bf16"):
        assert load_config([f"train.mixed_precision={mp}"]).train.mixed_precision == mp
    cfg = load_config(["model.revision=none", "model.variant=null", "run.name=group/run-1"])
    assert cfg.model.revision is None and cfg.model.variant is None and cfg.run.name == "group/run-1"


def test_overwrite_replaces_only_runs_of_ours(tmp_path):
    """run.overwrite=true replaces a run directory with the marker, or one written before markers existed (its
    status/rank0.json is ours); a look-alike folder with other files is refused."""
    from guard_train.config.loader import ConfigError
    from guard_train.training.loop import _decide_run_dir

    def decide(name: str):
        cfg = load_config(["recipe=tiny", f"run.output_dir={tmp_path}", f"run.name={name}", "run.overwrite=true"])
        return _decide_run_dir(cfg)

    for name, files in (("marked", {".guard_train_run": "", "config.yaml": "old run"}),
                        ("legacy", {"status/rank0.json": json.dumps({"state": "completed", "rank": 0, "pid": 1,
                                                                       "step": 4})}),
                        ("user", {"status/rank0.json": "my notes", "config.yaml": "mine"})):
        for rel, text in files.items():
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_text(text)
    assert decide("marked") == (str(tmp_path / "marked"), None) and not (tmp_path / "marked").exists()
    assert decide("legacy") == (str(tmp_path / "legacy"), None) and not (tmp_path / "legacy").exists()
    with pytest.raises(ConfigError, match="no guard_train run created"):
        decide("user")
    assert (tmp_path / "user" / "config.yaml").read_text() == "mine"


def test_recipe_with_yaml_no_is_accepted(tmp_path):
    (tmp_path / "r.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config([f"recipe={tmp_path / 'r.yaml'}"]).train.mixed_precision == "no"


def test_dedup_reads_the_manifest_file_it_is_given(workspace: Path, tmp_path, capsys):
    """--manifest FILE is that file (it used to read manifest.jsonl from FILE's folder)."""
    from guard_train.cli import main

    (tmp_path / "truth.jsonl").write_text("".join(json.dumps({"id": i, "instance": 0}) + "\n" for i in range(2)))
    assert main([*[a.replace("{w}", str(workspace)) for a in DEDUP], "--manifest", str(tmp_path / "truth.jsonl"),
                 "--out", str(tmp_path / "d")]) == 0
    summ = json.loads((tmp_path / "d" / "dedup_summary.json").read_text())
    assert "vs_planted" in summ and (tmp_path / "d" / ".guard_train_run").is_file()


def test_subprocess_exit_codes(workspace: Path, tmp_path):
    """The exit code itself, through `python train.py` and the guard-train module: the data-loss case of issue 21
    (run.name=. with run.overwrite=true on a user's folder) and a NaN guidance scale; no traceback, no warning
    from bitsandbytes."""
    user = tmp_path / "DIR"
    user.mkdir()
    (user / "mine.txt").write_text("keep me")
    r = subprocess.run([PY, "train.py", "recipe=tiny", f"run.output_dir={user}", "run.name=.", "run.overwrite=true"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "run.name" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (user / "mine.txt").read_text() == "keep me"
    r = subprocess.run([PY, "-m", "guard_train.cli", *GEN, "--param", "guidance_scale=nan",
                        "--out", str(tmp_path / "g")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "guidance_scale" in r.stderr and not (tmp_path / "g").exists(), r.stderr[-2000:]
    assert "kernels" not in r.stderr and "Traceback" not in r.stderr


def test_bitsandbytes_kernels_warning_is_dropped(capsys):
    """What bitsandbytes' CPU backend logs on an AVX512-BF16 machine without the `kernels` package."""
    import logging

    from guard_train.cli import _quiet

    _quiet()
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install "
        "kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
    assert "kernels" not in capsys.readouterr().err
