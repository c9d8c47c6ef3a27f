#!/usr/bin/env bash
# Build models/tiny-sd-memorized-lora: a LoRA of the committed base fine-tuned *plainly* (recipe=tiny_nomit, no
# mitigations) and longer than the 10-minute job, so that it memorizes the lab's planted duplicates. Inference-time
# methods, detection and tests use it as "a model that really copies" without retraining.
# Usage: bash scripts/build_memorized_lora.sh [STEPS]   (default 2500; ~12 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-2500}
NAME=memorized-lora-build
.venv/bin/accelerate launch --config_file accelerate_configs/cpu_1proc.yaml train.py recipe=tiny_nomit \
  train.mode=lora train.lora_rank=16 train.lora_alpha=16 train.learning_rate=1e-3 train.max_steps="$STEPS" \
  train.checkpoint_every=0 run.name="$NAME" run.overwrite=true run.report_to=none summary.max_prompts=8 \
  summary.images_per_prompt=4 | tee "/tmp/$NAME.log"
OUT=models/tiny-sd-memorized-lora
rm -rf "$OUT" && mkdir -p "$OUT"
cp "runs/$NAME/final/pytorch_lora_weights.safetensors" "$OUT/"
cp "runs/$NAME/data/lab_config.json" "$OUT/"
cp "runs/$NAME/summary.json" "$OUT/summary.json"
.venv/bin/python - "$NAME" "$STEPS" <<'PY'
import json, sys, subprocess
name, steps = sys.argv[1], int(sys.argv[2])
m = [json.loads(l) for l in open(f"runs/{name}/metrics.jsonl")]
info = {"base_model": "models/tiny-sd", "recipe": "tiny_nomit", "mode": "lora", "rank": 16, "learning_rate": 1e-3,
        "steps": steps, "train_wall_s": m[-1]["wall_s"], "final_loss": m[-1]["loss"],
        "command": f"bash scripts/build_memorized_lora.sh {steps}",
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
json.dump(info, open("models/tiny-sd-memorized-lora/build_info.json", "w"), indent=1)
print(json.dumps(info, indent=1))
PY
