"""MemorizationCallback: measure memorization during training with the GUARD engine, on every rank.

Every `eval.every_n_epochs` epochs and/or `eval.every_n_steps` steps (and at the end when `eval.at_end`), each
rank generates its share of the prompt set with the *current* weights (an in-memory pipeline, no save/reload)
through `guidance.engine` for each configured method (default cfg and guard); results are gathered and the main
process scores them and writes `<run>/memorization/<tag>/{metrics.json, grid_<method>.png}` and logs the numbers
to the trackers. All ranks take part, so no rank sits in a collective while rank 0 generates alone (the
NCCL-timeout trap of the diffusers examples). Train mode, attention processors and the global RNG are restored.
Early warning: when the duplicated (or all) captions' copy rate exceeds `eval.copy_rate_limit`, a warning is
written and, with `eval.stop_on_limit`, every rank stops training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image

from guard_train.eval.command import report_html
from guard_train.eval.evaluate import Evaluator, grid, load_reference
from guard_train.guidance.engine import GuidanceEngine
from guard_train.metrics.aligners import default_aligner
from guard_train.metrics.embed import get_embedder
from guard_train.training.hooks import Callback


class MemorizationCallback(Callback):
    measures_memorization = True  # what the Trainer checks for when cfg.eval asks for one

    def __init__(self, cfg):
        self.cfg = cfg  # EvalConfig
        self.ref = self.pset = None
        self.history: list[dict] = []

    def on_train_begin(self, state) -> None:
        c = self.cfg  # the reference set: eval.reference, else the run's generated dataset (with its manifest)
        ref = c.reference or str(Path(state.run_dir) / "data")
        self.ref, self.pset = load_reference(ref, c.prompts, c.prompts_per_group, c.seed,
                                             flags=("eval.reference", "eval.prompts"))
        if state.accelerator.is_main_process:
            d = Path(state.run_dir) / "memorization"
            d.mkdir(parents=True, exist_ok=True)
            self.pset.to_jsonl(d / "prompts.jsonl")

    def on_step_end(self, state) -> None:
        if self.cfg.every_n_steps and state.step % self.cfg.every_n_steps == 0:
            self.evaluate(state, f"step_{state.step:06d}")

    def on_epoch_end(self, state) -> None:
        if self.cfg.every_n_epochs and (state.epoch) % self.cfg.every_n_epochs == 0:
            self.evaluate(state, f"epoch_{state.epoch:03d}")

    def on_train_end(self, state) -> None:
        if self.cfg.at_end:
            self.evaluate(state, "final")

    def evaluate(self, state, tag: str) -> dict:
        acc = state.accelerator
        pipe = state.pipeline()
        unet = pipe.unet
        was_training, procs, rng = unet.training, dict(unet.attn_processors), torch.get_rng_state()
        unet.eval()
        out: dict = {"tag": tag, "step": state.step, "epoch": state.epoch, "methods": {}}
        t0 = time.perf_counter()
        try:
            engine = GuidanceEngine(pipe, max_batch=self.cfg.max_batch, scheduler=self.cfg.scheduler, eta=self.cfg.eta)
            params = {"guidance_scale": self.cfg.guidance_scale} if self.cfg.guidance_scale > 0 else {}
            main = acc.is_main_process
            ev = Evaluator(self.pset, self.ref, self._embedder() if main else None, self.cfg.images_per_prompt,
                           self.cfg.steps, self.cfg.seed, self.cfg.copy_threshold, self._aligner() if main else None)
            for method in self.cfg.methods:
                m = ev.measure(engine, method, acc, detect=(method == "cfg"), **params)
                images = m.images
                if main:
                    out["methods"][method] = m.metrics
                    d = Path(state.run_dir) / "memorization" / tag
                    d.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(grid(images, self.pset, self.ref, self.cfg.images_per_prompt)).save(
                        d / f"grid_{method}.png")
        finally:
            unet.set_attn_processor(procs)
            unet.train(was_training)
            torch.set_rng_state(rng)
        out["wall_s"] = round(time.perf_counter() - t0, 3)  # lets a benchmark take evaluation out of training cost
        stop = [False]
        if acc.is_main_process:
            d = Path(state.run_dir) / "memorization" / tag
            (d / "metrics.json").write_text(json.dumps(out, indent=1))
            acc.log({f"memorization/{m}/{g}/{k}": v for m, r in out["methods"].items()
                     for g, gm in r["groups"].items() for k, v in gm.items() if isinstance(v, (int, float))},
                    step=state.step)
            self.history.append(out)
            self._write_report(Path(state.run_dir) / "memorization")
            stop[0] = self._check_limit(out, Path(state.run_dir))
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            stop = broadcast_object_list(stop)
        if stop[0] and self.cfg.stop_on_limit:
            state.should_stop = True
        return out

    def _write_report(self, d: Path) -> None:
        """report.html over every evaluation so far (copy rate vs alignment; copy rate across steps/epochs)."""
        rows = [{"checkpoint": h["tag"], "method": m, "metrics": r}
                for h in self.history for m, r in h["methods"].items()]
        backend = rows[0]["metrics"]["backend"] if rows else "?"
        (d / "report.html").write_text(report_html(rows, backend, []))

    def summary_table(self) -> str:
        """The last evaluation: copy rate per method and caption group (printed at the end of a training run)."""
        if not self.history:
            return ""
        h = self.history[-1]
        lines = [f"memorization callback ({h['tag']}, step {h['step']}) — copy rate = share of generations whose "
                 f"top-1 {next(iter(h['methods'].values()))['backend']} similarity to a training image > "
                 f"{self.cfg.copy_threshold}:"]
        groups = [g for g in ("duplicated", "unique", "held_out") if g in next(iter(h["methods"].values()))["groups"]]
        lines.append(f"{'method':<12}" + "".join(f"{g:>14}" for g in groups) + f"{'lab align (dup)':>17}")
        for m, r in h["methods"].items():
            lines.append(f"{m:<12}" + "".join(f"{r['groups'][g]['copy_rate']:>14.2f}" for g in groups)
                         + f"{r['groups'][groups[0]].get('lab_alignment', float('nan')):>17.2f}")
        return "\n".join(lines)

    def _check_limit(self, out: dict, run_dir: Path) -> bool:
        if not self.cfg.copy_rate_limit:
            return False
        for m, r in out["methods"].items():
            g = r["groups"].get("duplicated", r["groups"]["all"])
            if g["copy_rate"] > self.cfg.copy_rate_limit:
                with open(run_dir / "memorization" / "warnings.jsonl", "a") as f:
                    f.write(json.dumps({"tag": out["tag"], "method": m, "copy_rate": g["copy_rate"],
                                        "limit": self.cfg.copy_rate_limit}) + "\n")
                return True
        return False

    def _embedder(self):
        return get_embedder(self.cfg.backend)

    def _aligner(self):
        return default_aligner()

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, d: dict) -> None:
        self.history = d.get("history", [])
