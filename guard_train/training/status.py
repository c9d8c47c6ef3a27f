"""Per-rank status files, so a run directory says what happened to every process.

`<run>/status/rank{r}.json` holds {state, rank, pid, host, step, time[, error]} with state one of
`running` (written when training starts), `completed`, `preempted` (checkpoint saved, requeue) or `failed` (with the
error). A rank killed outright (SIGKILL, OOM killer) cannot write: its file still says `running` with a pid that no
longer exists, while its peers' files say `failed` with the collective error they saw. Writes are atomic
(tmp + rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

STATES = ("running", "completed", "preempted", "failed")


def write_status(run_dir: Path, rank: int, state: str, step: int, **extra) -> Path:
    assert state in STATES, state
    d = Path(run_dir) / "status"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"rank{rank}.json"
    rec = {"state": state, "rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "step": step,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)
    return path


def read_status(run_dir: Path) -> dict[int, dict]:
    d = Path(run_dir) / "status"
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(d.glob("rank*.json"))} if d.is_dir() else {}


def describe_failure(err: BaseException) -> str:
    """One line for the status file; names the likely cause when a collective broke (a peer died or hung)."""
    msg = f"{type(err).__name__}: {err}".strip()[:1500]
    low = msg.lower()
    if any(k in low for k in ("connection closed", "connection reset", "timed out", "timeout", "gloo", "nccl",
                              "broken pipe", "peer")):
        msg += (" — a collective with the other ranks failed: another rank probably died or hung; a rank whose "
                "status still says 'running' is the one that died. Resume with resume=latest.")
    return msg


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_exit_code(run_dir: Path) -> tuple[int, list[str]]:
    """What a scheduler should do with a run, as an exit code: 0 every rank completed, 75 every rank saved and
    stopped for preemption (requeue with resume=latest), 1 a rank failed or died, 3 still running; plus lines to print.

    Needed under `accelerate launch`: torchrun's agent exits 1 whenever a worker exits non-zero, so the workers'
    own code 75 never reaches the scheduler; the status files do.
    """
    st = read_status(run_dir)
    if not st:
        raise FileNotFoundError(f"{run_dir}/status/ has no rank*.json: not a guard-train run directory, or training "
                                f"never started (check the path, or the launcher's log)")
    world = max(int(s.get("world", 0)) for s in st.values()) or len(st)
    lines, states = [], []
    for r in range(world):
        s = st.get(r)
        if s is None:
            state = "missing"
        elif s["state"] == "running" and s.get("host") == socket.gethostname() and not _alive(int(s["pid"])):
            state = "died"  # killed without a chance to write (SIGKILL, OOM killer)
        else:
            state = s["state"]
        states.append(state)
        detail = (s or {}).get("error") or (s or {}).get("checkpoint") or ""
        lines.append(f"rank {r}: {state:<9} step {(s or {}).get('step', '?')}  {detail}".rstrip())
    if all(x == "completed" for x in states):
        return 0, lines
    if all(x == "preempted" for x in states):
        return 75, lines + ["preempted: requeue and continue with resume=latest"]
    if any(x in ("failed", "died", "missing") for x in states):
        return 1, lines
    return 3, lines
