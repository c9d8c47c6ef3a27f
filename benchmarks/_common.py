"""Shared by the benchmark scripts: machine description and writing a result JSON (with its command)."""

import json
import os
import platform
import sys
from pathlib import Path


def machine() -> str:
    try:
        import torch

        extra = f", torch {torch.__version__}, {torch.get_num_threads()} threads" + (
            f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    except ImportError:
        extra = ""
    return f"{platform.machine()}, {os.cpu_count()} cores{extra}"


def emit(result: dict, path: str) -> int:
    """Add the command line, print, and write `path` (if given). Returns 0 for sys.exit."""
    out = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "machine": machine(),
           **result}
    print(json.dumps(out, indent=1))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=1) + "\n")
    return 0


class LoraLab:
    """The training lab of a LoRA made by scripts/build_memorized_lora.sh, rebuilt from its lab_config.json (the
    lab is deterministic from its config): its original instances (sorted ids), the duplicated ones, as many unique
    ones, and each instance's caption."""

    def __init__(self, lora: str):
        from guard_train.lab.dataset import LabConfig, build_lab

        self.config = json.loads((Path(lora) / "lab_config.json").read_text())
        self.lab = build_lab(LabConfig(**self.config))
        self.keys = sorted(self.lab.originals)
        self.dup = sorted({it.instance for it in self.lab.items if it.is_dup})
        self.uniq = [k for k in self.keys if k not in self.dup][: len(self.dup)]
        self.caption = {it.instance: it.caption for it in self.lab.items if it.copy_kind == "original"}

    def originals(self, keys=None):
        import numpy as np

        return np.stack([self.lab.originals[k] for k in (self.keys if keys is None else keys)])
