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
