"""Checkpoints: `checkpoint-N.tmp/` written by all ranks, renamed by rank 0, completed by a `COMPLETE` marker.

"latest" = the highest N whose directory has the marker, so a run killed mid-save never resumes from a partial
directory; rotation deletes only complete checkpoints older than the newest K.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

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
