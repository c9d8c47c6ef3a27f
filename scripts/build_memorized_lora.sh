#!/usr/bin/env bash
# Build models/tiny-sd-memorized-lora: a LoRA of the committed base fine-tuned *plainly* (recipe=tiny_nomit, no
# mitigations) and longer than the 10-minute job, so that it memorizes the lab's planted duplicates. Inference-time
# methods, detection and tests use it as "a model that really copies" without retraining.
# The LoRA is wide (rank 32 on attention, proj_in/out, feed-forward and resnet convs): attention-only LoRAs of
# rank 16 memorized the duplicates (probe, nearest neighbour) but never produced an SSCD copy (docs/base-model.md).
# Phase 2 (V_SEGMENTS, default 1): segments of 2,000 steps that continue the LoRA (train.init_lora, fresh AdamW)
# with train.v_weight_cap=200 — the ε-loss weighted as a v-loss, so the high-noise steps that set the layout are
# learned (plain ε-loss weighs their x̂₀ error by SNR ≈ 0.007): without it the LoRA copies from SDEdit starts but
# hardly from pure noise (docs/base-model.md, "Where copying breaks").
# BASE (default models/tiny-sd) is the model fine-tuned; on a v-prediction base phase 2 is skipped (its loss already
# carries the v weight; train.v_weight_cap is refused there) unless V_SEGMENTS is set. OUT (default
# models/tiny-sd-memorized-lora) is where the LoRA is written.
# CKPT_EVERY (default 1000): steps between phase-1 checkpoints (for `guard-train eval --run` or detect per checkpoint).
# EXTRA: further train.py overrides for every phase, space-separated (e.g. EXTRA="data.caption_dropout=0"); recorded.
# Usage: bash scripts/build_memorized_lora.sh [STEPS] [resume]   (default 10000 steps; ~55 min on 2 CPU cores,
#   then ~21 min per phase-2 segment). "resume" continues runs/$NAME's phase 1 from its latest checkpoint (exact: the
#   lr is constant after warm-up), e.g. to make it longer.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-10000}
NAME=${NAME:-memorized-lora-build}
BASE=${BASE:-models/tiny-sd}
[ -f "$BASE/scheduler/scheduler_config.json" ] || { echo "BASE=$BASE: no scheduler/scheduler_config.json (a diffusers model dir?)" >&2; exit 2; }
KIND=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1])).get('prediction_type','epsilon'))" \
       "$BASE/scheduler/scheduler_config.json")
if [ "$KIND" = v_prediction ]; then V_SEGMENTS=${V_SEGMENTS:-0}; else V_SEGMENTS=${V_SEGMENTS:-1}; fi
OUT=${OUT:-models/tiny-sd-memorized-lora}
# OUT is emptied before the LoRA is copied there: it must not be the run dir the LoRA is copied from
[ "$(realpath -m "$OUT")" != "$(realpath -m "runs/$NAME")" ] || { echo "OUT=$OUT is the training run dir runs/$NAME: choose another OUT (or NAME)" >&2; exit 2; }
START=run.overwrite=true
[ "${2:-}" = resume ] && START=resume=latest
RANK=32
TARGETS="[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2]"
COMMON=(recipe=tiny_nomit model.path="$BASE" train.mode=lora train.lora_rank=$RANK train.lora_alpha=$RANK "train.lora_targets=$TARGETS"
        train.learning_rate=1e-3 run.report_to=none summary.max_prompts=8 summary.images_per_prompt=4)
EXTRA=${EXTRA:-}
read -r -a EXTRA_ARGS <<< "$EXTRA"
COMMON+=("${EXTRA_ARGS[@]}")
.venv/bin/accelerate launch --config_file accelerate_configs/cpu_1proc.yaml train.py "${COMMON[@]}" \
  train.max_steps="$STEPS" train.checkpoint_every="${CKPT_EVERY:-1000}" run.name="$NAME" "$START" | tee "/tmp/$NAME.log"
LAST="runs/$NAME"
for k in $(seq 1 "$V_SEGMENTS"); do
  .venv/bin/accelerate launch --config_file accelerate_configs/cpu_1proc.yaml train.py "${COMMON[@]}" \
    train.max_steps=2000 train.checkpoint_every=0 train.v_weight_cap=200 "train.init_lora=$LAST/final" \
    run.overwrite=true run.name="$NAME-v$k" | tee "/tmp/$NAME-v$k.log"
  LAST="runs/$NAME-v$k"
done
rm -rf "$OUT" && mkdir -p "$OUT"
cp "$LAST/final/pytorch_lora_weights.safetensors" "$OUT/"
cp "runs/$NAME/data/lab_config.json" "$OUT/"
cp "$LAST/summary.json" "$OUT/summary.json"
.venv/bin/python - "$NAME" "$STEPS" "$RANK" "$TARGETS" "$V_SEGMENTS" "$BASE" "$OUT" "$KIND" "$EXTRA" <<'PY'
import json, sys, subprocess
name, steps, rank, targets, vseg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
base, out, kind, extra = sys.argv[6], sys.argv[7], sys.argv[8], sys.argv[9]
m = [json.loads(l) for l in open(f"runs/{name}/metrics.jsonl")]
wall, prev = 0.0, 0.0  # wall_s restarts at each resumed segment: sum the segments
for w in (x["wall_s"] for x in m):
    wall, prev = (wall + prev, w) if w < prev else (wall, w)
info = {"base_model": base, "base_prediction_type": kind, "recipe": "tiny_nomit", "mode": "lora", "rank": rank,
        "targets": targets.strip("[]").split(","), "learning_rate": 1e-3,
        "steps": steps, "train_wall_s": round(wall + prev, 1), "final_loss": m[-1]["loss"],
        "phase2": [{"steps": 2000, "v_weight_cap": 200, "init_lora": "previous segment's final", "wall_s":
                    json.loads(open(f"runs/{name}-v{k}/metrics.jsonl").readlines()[-1])["wall_s"]}
                   for k in range(1, vseg + 1)],
        "overrides": extra.split(),
        "command": (f"BASE={base} OUT={out} V_SEGMENTS={vseg} " + (f"EXTRA='{extra}' " if extra else "")
                    + f"bash scripts/build_memorized_lora.sh {steps}"),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
json.dump(info, open(f"{out}/build_info.json", "w"), indent=1)
print(json.dumps(info, indent=1))
PY
