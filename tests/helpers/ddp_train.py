"""Launched by tests/test_multiproc.py under `accelerate launch` (2 processes): trains a few steps and writes, per
rank, the world size, a hash of the trained weights and the dataset ids it trained on.
`DROP=rank0` makes rank 0 drop every sample and rank 1 drop every sample on odd micro-steps (so both ranks drop
everything on odd micro-steps only)."""

import hashlib
import json
import os
import sys

import torch

from guard_train.lab.config import load_config
from guard_train.training.hooks import Callback, Hooks
from guard_train.training.loop import Trainer


class Record(Callback):
    def __init__(self):
        self.ids: list[int] = []

    def __call__(self, ctx):  # also a loss-weighting hook: records ids, drops per DROP
        self.ids += ctx.ids.tolist()
        w = torch.ones(len(ctx.ids))
        if os.environ.get("DROP") == "rank0":
            calls = len(self.ids) // len(ctx.ids)
            if ctx.accelerator.process_index == 0 or calls % 2 == 1:
                w[:] = 0
        return w

    def on_train_end(self, state):
        unet = state.accelerator.unwrap_model(state.pipeline().unet)
        h = hashlib.sha256()
        for k, v in sorted(unet.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        r = state.accelerator.process_index
        out = {"rank": r, "world": state.accelerator.num_processes, "hash": h.hexdigest(), "ids": self.ids,
               "metrics": state.metrics}
        (state.run_dir / f"rank{r}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    rec = Record()
    t = Trainer(load_config(sys.argv[1:]), Hooks(loss_weighting=[rec], callbacks=[rec]))
    t.train()
    t.close()
