import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "models" / "tiny-sd"
PY = sys.executable


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny SD (same architecture as the committed base), saved in diffusers layout."""
    from itertools import islice

    from guard_train.lab.codec import PatchPCACodec
    from guard_train.lab.dataset import pretrain_stream
    from guard_train.lab.pretrain import to_tensor
    from guard_train.lab.tiny_sd import build_tiny_sd, clip_tokenizer

    d = tmp_path_factory.mktemp("tiny_sd")
    imgs = [im for im, _ in islice(pretrain_stream(5), 64)]
    codec = PatchPCACodec().fit(to_tensor(imgs))
    pipe = build_tiny_sd(codec, clip_tokenizer(d / "work"), seed=0)
    pipe.save_pretrained(d / "model")
    return d / "model"


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def small_lab_args(out: Path, model: Path, **extra) -> list[str]:
    """Overrides for a seconds-long run: 16 instances, 4 of them ×4, batch 4."""
    args = {
        "recipe": "tiny_nomit", "model.path": str(model), "run.output_dir": str(out), "run.report_to": "none",
        "run.log_every": 1, "summary.enabled": "false", "train.batch_size": 4, "train.lr_warmup_steps": 0,
        "data.lab.num_instances": 16, "data.lab.held_out": 0, "data.lab.dup_fraction": 0.25,
        "data.lab.dup_repeats": 4, "train.checkpoint_every": 0,
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
