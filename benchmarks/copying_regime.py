"""Training arms in the copying regime (issue 20, item 1): every mitigation arm fine-tunes the same base with the
same LoRA, steps and seed on a lab shaped like SD's situation (few duplicated instances among hundreds of unique
ones), and the memorization callback measures each arm at the same steps with the standard copy rule.

    python benchmarks/copying_regime.py --out runs/copying [--steps 8000] [--eval-every 2000] [--parallel 6] \
        [--arms plain,entropy_filter,...] [--checkpoint-every 1000] [--resume] [--dry] [--mode full [--lr 1e-4]]

Design, fixed before running:
* Base `models/tiny-sd-v` (v-prediction, zero terminal SNR) and the LoRA shape that made its committed memorizing
  LoRA copy (rank 32 on attention, proj, feed-forward and resnet convs; lr 1e-3; plain v-loss): what is known to
  copy on this model. `--mode full` fine-tunes the whole UNet instead (lr 1e-4, a fifth of the base's pretraining
  peak; run dirs `<arm>__full`), the issue's "LoRA and full where the CPU allows".
* Lab: 420 instances from cells split 2×2 (`data.lab.cell_split=2`), 2 % of them (8) planted ×16 (half near
  copies), 16 held-out captions: duplicates are 24 % of the 540 training rows.
* Arms: `lab_bench.TRAIN_ARMS` (plain, entropy filter, magnitude filter, duplicate-aware sampling, the default pair,
  caption randomisation), each the same overrides plus its own.
* Measurement: `MemorizationCallback` every `--eval-every` steps with CFG at guidance `--guidance` on 8 duplicated,
  8 unique and 8 held-out captions × `--images` (40: 320 duplicated-caption generations per arm and step);
  copy rate = top-1 SSCD over every training row > 0.5 with a Wilson interval.
Arms run as separate processes (`--parallel` at once); each writes its run dir under `--out/runs/`. At the end
(or at `--deadline-s`), every evaluation of every arm is gathered into `--out/arms.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from guard_train.lab.bench import TRAIN_ARMS, _slug  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = "[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2]"
LAB = {"num_instances": 420, "cell_split": 2, "dup_fraction": 0.02, "dup_repeats": 16, "held_out": 16}


LR = {"lora": 1e-3, "full": 1e-4}  # full: a fifth of the base's pretraining peak (5e-4), fixed before running


def run_name(arm: str, mode: str) -> str:
    """Run directory of an arm: full fine-tunes live beside the LoRA runs of the same arm, never over them."""
    return _slug(arm) + ("__full" if mode == "full" else "")


def overrides(arm: str, a: argparse.Namespace) -> list[str]:
    lora = {"train.lora_rank": 32, "train.lora_alpha": 32, "train.lora_targets": TARGETS} if a.mode == "lora" else {}
    kv = {"recipe": "tiny_nomit", "model.path": a.model, "train.mode": a.mode, **lora,
          "train.learning_rate": learning_rate(a), "train.max_steps": a.steps, "train.batch_size": 16,
          "train.checkpoint_every": a.checkpoint_every,
          "train.checkpoints_total_limit": 1, "train.seed": a.seed,
          "run.output_dir": str(Path(a.out) / "runs"), "run.name": run_name(arm, a.mode),
          **({"resume": "latest"} if a.resume else {"run.overwrite": "true"}),
          "run.report_to": "none", "summary.enabled": "false",
          "eval.every_n_steps": a.eval_every, "eval.methods": "[cfg]", "eval.guidance_scale": a.guidance,
          "eval.prompts_per_group": a.prompts, "eval.images_per_prompt": a.images, "eval.steps": a.gen_steps,
          "eval.max_batch": a.max_batch, **{f"data.lab.{k}": v for k, v in LAB.items()}, **TRAIN_ARMS[arm]}
    if a.clusters and TRAIN_ARMS[arm].get("mitigation.dup_sampling.enabled") == "true":
        kv["mitigation.dup_sampling.clusters"] = a.clusters  # made beforehand (the GPU machine has no faiss)
    if a.dry:
        kv.update({"data.lab.num_instances": 24, "data.lab.dup_fraction": 0.25, "data.lab.dup_repeats": 4,
                   "data.lab.held_out": 2, "mitigation.entropy_filter.warmup_steps": 2,
                   "mitigation.magnitude_filter.warmup_steps": 2, "train.lr_warmup_steps": 0})
    return [f"{k}={v}" for k, v in kv.items()]


def gather(out: Path, arms: list[str], mode: str = "lora") -> dict:
    """Every evaluation of every arm (memorization/<tag>/metrics.json), with the run's wall time per step."""
    res: dict = {}
    for arm in arms:
        run = out / "runs" / run_name(arm, mode)
        evals = []
        for m in sorted(run.glob("memorization/*/metrics.json")):
            h = json.loads(m.read_text())
            evals.append({"tag": h["tag"], "step": h["step"], "wall_s_eval": h.get("wall_s"),
                          "groups": h["methods"]["cfg"]["groups"],
                          "detection_auroc": h["methods"]["cfg"].get("detection_auroc_duplicated_vs_unique")})
        log = run / "metrics.jsonl"
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
        res[arm] = {"evals": sorted(evals, key=lambda e: e["step"]), "last_log": lines[-1] if lines else {},
                    "train_wall_s": train_wall(lines), "finished": (run / "final").exists()}
    return res


def train_wall(lines: list[dict]) -> float:
    """Training wall time over every segment of a run: a resumed run's clock restarts at 0 (its lines continue the
    kept ones), so each segment ends where `wall_s` drops, and the segments add up."""
    walls = [x["wall_s"] for x in lines if "wall_s" in x]
    return sum(a for a, b in zip(walls, walls[1:] + [0.0]) if b < a)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/copying")
    ap.add_argument("--model", default="models/tiny-sd-v")
    ap.add_argument("--arms", default=",".join(TRAIN_ARMS))
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--gen-steps", type=int, default=25)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("lora", "full"), default="lora", help="LoRA (rank 32) or full UNet fine-tune")
    ap.add_argument("--lr", type=float, default=None, help=f"learning rate (default per mode: {LR})")
    ap.add_argument("--parallel", type=int, default=6)
    ap.add_argument("--clusters", default="", help="clusters.jsonl of this lab for the duplicate-aware arms "
                    "(default: each such arm runs dedup at start, which needs faiss)")
    ap.add_argument("--deadline-s", type=float, default=0.0, help="kill the arms still running after this many s")
    ap.add_argument("--checkpoint-every", type=int, default=1000, help="a resumable checkpoint every N steps (0: none)")
    ap.add_argument("--resume", action="store_true", help="continue each arm from its latest checkpoint (evaluations "
                    "already written stay; the resumed run equals an uninterrupted one)")
    ap.add_argument("--dry", action="store_true", help="a 24-instance lab: checks the plumbing")
    a = ap.parse_args(argv)
    if a.lr is not None and not a.lr > 0:
        ap.error(f"--lr must be > 0 (got {a.lr}); leave it out for the mode's default {LR[a.mode]}")
    return a


def learning_rate(a: argparse.Namespace) -> float:
    return LR[a.mode] if a.lr is None else a.lr


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    arms = a.arms.split(",")
    unknown = [x for x in arms if x not in TRAIN_ARMS]
    if unknown:
        print(f"unknown arm(s) {unknown}; arms: {list(TRAIN_ARMS)}", file=sys.stderr)
        return 2
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    queue, running = list(arms), {}
    while queue or running:
        while queue and len(running) < a.parallel:
            arm = queue.pop(0)
            log = open(out / "logs" / f"{run_name(arm, a.mode)}.log", "w")
            running[arm] = (subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides(arm, a)], cwd=ROOT,
                                             stdout=log, stderr=subprocess.STDOUT), log, time.perf_counter())
            print(f"[copying] started {arm}", flush=True)
        for arm, (p, log, ts) in list(running.items()):
            if p.poll() is not None:
                log.close()
                print(f"[copying] {arm} exited {p.returncode} after {time.perf_counter() - ts:.0f}s", flush=True)
                del running[arm]
        if a.deadline_s and time.perf_counter() - t0 > a.deadline_s:
            for arm, (p, log, _) in running.items():
                p.kill()
                log.close()
                print(f"[copying] deadline: killed {arm}", flush=True)
            running.clear()
            queue.clear()
        time.sleep(2)
    shape = {"lora_rank": 32, "lora_targets": TARGETS} if a.mode == "lora" else {}
    res = {"design": {"model": a.model, "lab": LAB, "mode": a.mode, **shape, "lr": learning_rate(a),
                      "steps": a.steps, "eval_every": a.eval_every, "guidance": a.guidance, "prompts": a.prompts,
                      "images": a.images, "gen_steps": a.gen_steps, "seed": a.seed, "dry": a.dry},
           "wall_s": time.perf_counter() - t0, "arms": gather(out, arms, a.mode),
           "command": "python benchmarks/copying_regime.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    try:
        import torch

        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    (out / "arms.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
