"""Launched by tests/test_eval.py with 1 and 2 processes: MemorizationCallback.evaluate on a fixed model."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from guard_train.callbacks.memorization import MemorizationCallback
from guard_train.config.schema import EvalConfig
from guard_train.lab.dataset import LabConfig, build_lab, write_imagefolder
from guard_train.models.loading import load_pipeline
from guard_train.training.hooks import TrainState

if __name__ == "__main__":
    model, run_dir = sys.argv[1], Path(sys.argv[2])
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.is_main_process:
        write_imagefolder(build_lab(LabConfig(num_instances=12, dup_fraction=0.25, dup_repeats=3, held_out=2)),
                          run_dir / "data")
    acc.wait_for_everyone()
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    state = TrainState(acc, 0, 0, run_dir, {}, lambda: pipe)
    cb = MemorizationCallback(EvalConfig(prompts_per_group=3, images_per_prompt=2, steps=3, methods=["cfg", "guard"]))
    cb.on_train_begin(state)
    cb.evaluate(state, "check")
    acc.wait_for_everyone()
    acc.end_training()
