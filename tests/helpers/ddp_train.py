"""Launched by tests/test_multiproc.py under `accelerate launch` (2 processes): trains a few steps and writes, per
rank, the world size and a hash of the trained weights."""

import hashlib
import json
import sys

from guard_train.config.loader import load_config
from guard_train.training.hooks import Callback, Hooks
from guard_train.training.loop import Trainer


class WeightsHash(Callback):
    def on_train_end(self, state):
        unet = state.accelerator.unwrap_model(state.pipeline().unet)
        h = hashlib.sha256()
        for k, v in sorted(unet.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        out = {"rank": state.accelerator.process_index, "world": state.accelerator.num_processes, "hash": h.hexdigest()}
        (state.run_dir / f"rank{out['rank']}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    t = Trainer(load_config(sys.argv[1:]), Hooks(callbacks=[WeightsHash()]))
    t.train()
    t.close()
