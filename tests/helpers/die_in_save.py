"""`python tests/helpers/die_in_save.py MODE STEP train.py-args…`: train, and SIGKILL this process inside the
checkpoint save of step STEP — a real kill at the worst moment, with the files as a kill leaves them.

MODE `before_rename`: the state is in `checkpoint-STEP.tmp/` (model, optimizer, rank state), not yet renamed.
MODE `before_marker`: renamed to `checkpoint-STEP/`, the COMPLETE marker not yet written.
"""

import os
import signal
import sys
from pathlib import Path

from guard_train.training import checkpoint as ckpt

MODE, STEP = sys.argv[1], int(sys.argv[2])
_finalize = ckpt.finalize


def finalize(run_dir, step, state, keep):
    if step == STEP:
        tmp = ckpt.tmp_dir(run_dir, step)
        if MODE == "before_marker":
            os.replace(tmp, Path(run_dir) / "checkpoints" / f"checkpoint-{step}")
        os.kill(os.getpid(), signal.SIGKILL)
    return _finalize(run_dir, step, state, keep)


ckpt.finalize = finalize

if __name__ == "__main__":
    from guard_train.cli import train_main

    sys.exit(train_main(sys.argv[3:]))
