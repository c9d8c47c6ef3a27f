"""Checkpoints: `checkpoint-N.tmp/` written by all ranks, renamed by rank 0, completed by a `COMPLETE` marker.

"latest" = the highest N whose directory has the marker, so a run killed mid-save never resumes from a partial
directory; rotation deletes only complete checkpoints older than the newest K. A complete checkpoint whose files
were damaged afterwards (truncated, zero bytes) is detected before loading (`damaged`): `resume=latest` falls back
to the previous complete one with a warning (`latest_loadable`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Optional

from guard_train.config.paths import safetensors_problem

MARKER = "COMPLETE"
_PAT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _PAT.match(p.name)) and (p / MARKER).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    c = complete_checkpoints(run_dir)
    return c[-1] if c else None


def damaged(ckpt: Path) -> Optional[str]:
    """The first file of a complete checkpoint that cannot be loaded, as "path: why", or None. Cheap checks only
    (sizes, headers, zip directories), so a multi-GB checkpoint is not read twice: a zero-byte file, unparsable
    training_state.json, a safetensors file whose header or length is wrong, a torch zip without its directory
    (what truncation leaves)."""
    for f in sorted(p for p in Path(ckpt).rglob("*") if p.is_file()):
        why = _file_problem(f)
        if why:
            return f"{f}: {why}"
    return None


def _file_problem(f: Path) -> Optional[str]:
    size = f.stat().st_size
    if size == 0:
        return "zero bytes"
    if f.name == "training_state.json":
        try:
            json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return f"not valid JSON ({e})"
    elif f.suffix == ".safetensors":
        return safetensors_problem(f)
    elif f.suffix in (".bin", ".pt", ".pkl", ".pth"):
        with open(f, "rb") as fh:
            zipped = fh.read(2) == b"PK"  # torch.save's zip format; a truncated one has lost its directory
        if zipped and not zipfile.is_zipfile(f):
            return "truncated (its zip directory is missing)"
    return None


def latest_loadable(run_dir: Path) -> tuple[Optional[Path], list[str]]:
    """(the newest complete checkpoint with no damaged file, the damaged newer ones as "path: why")."""
    skipped = []
    for c in reversed(complete_checkpoints(run_dir)):
        why = damaged(c)
        if why is None:
            return c, skipped
        skipped.append(why)
    return None, skipped


def tmp_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint-{step}.tmp"


def finalize(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Rank 0 only, after every rank wrote into tmp_dir: state file, rename, marker, rotation."""
    tmp = tmp_dir(run_dir, step)
    (tmp / "training_state.json").write_text(json.dumps(state, indent=1))
    final = tmp.with_name(f"checkpoint-{step}")
    if final.exists():  # a re-save of the same step (e.g. after resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    (final / MARKER).write_text("ok\n")
    # rotation only after the new checkpoint is complete, so the newest good one is never the one deleted
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in _incomplete(run_dir, before=step):  # leftovers of a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _incomplete(run_dir: Path, before: int) -> list[Path]:
    """checkpoint-N.tmp dirs and checkpoint-N dirs without the marker, with N < `before`."""
    out = []
    for p in (Path(run_dir) / "checkpoints").iterdir():
        m = re.match(r"^checkpoint-(\d+)(\.tmp)?$", p.name)
        if m and int(m.group(1)) < before and (m.group(2) or not (p / MARKER).exists()):
            out.append(p)
    return out
