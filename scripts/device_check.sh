#!/usr/bin/env bash
# The GPU path in one call (issue 24, item 2), inside BUDGET seconds (default 450):
#   1. the tiny recipe on CUDA in bf16 and fp16, with the default mitigations (entropy filter + duplicate-aware
#      sampling) and the memorization callback;
#   2. the engine with every method (benchmarks/inference_cost.py: each method ÷ CFG);
#   3. the shape-real benchmarks (benchmarks/real_shape.py: SD 1.5 and SD 2.1-base component sizes, 512 px) —
#      absolute step times, peak memory, every ratio against its goal;
#   4. our LoRA loop ÷ diffusers' train_text_to_image_lora.py (benchmarks/vs_diffusers_lora.py), when the example
#      script is carried (EXAMPLE=path; it is not vendored).
# Results: JSON per part in $OUT, logs in $OUT/logs.tgz.
#
#   bash scripts/device_check.sh                        # on the GPU machine (the device tool)
#   DRY=1 OUT=/tmp/check bash scripts/device_check.sh   # CPU dry run: bf16 only, smallest sizes, same code paths
#
# The GPU machine has torch, accelerate, transformers, peft, onnxruntime but not diffusers, datasets, omegaconf:
# they travel as wheels in .whl/ (carry .whl). It has no faiss either: the duplicate-aware sampling reads clusters
# made beforehand (CLUSTERS, default runs/gpu_inputs/clusters_tiny.jsonl — the dry run writes it to $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
WORK=${WORK:-/tmp/guard_train_check}
BUDGET=${BUDGET:-450}
# the dry run's small lab makes its own clusters; the GPU run reads those of recipe=tiny's lab, made here beforehand:
#   train.py recipe=tiny train.max_steps=1 eval.every_n_steps=0 run.name=clusters …; cp …/dedup/clusters.jsonl there
if [ "${DRY:-0}" = 1 ]; then CLUSTERS=${CLUSTERS:-}; else CLUSTERS=${CLUSTERS:-runs/gpu_inputs/clusters_tiny.jsonl}; fi
EXAMPLE=${EXAMPLE:-}
mkdir -p "$OUT" "$WORK"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
source scripts/device_env.sh "$OUT/env.txt"

if [ "${DRY:-0}" = 1 ]; then
  PRECISIONS=(bf16); STEPS=4; SIZES=(tiny); ROUNDS=2; DEV=cpu
  LAB=(data.lab.num_instances=16 data.lab.dup_fraction=0.25 data.lab.dup_repeats=4 data.lab.held_out=2
       train.batch_size=4 mitigation.entropy_filter.warmup_steps=2 mitigation.entropy_filter.buckets=2)
  GEN=(--steps 3 --rounds 1 --images 1)
else
  PRECISIONS=(bf16 fp16); STEPS=200; SIZES=(sd15 sd21); ROUNDS=5; DEV=cuda
  LAB=()
  GEN=(--steps 20 --rounds 3 --images 2)
fi

# 1. the tiny recipe, one run per precision (the first one also makes the clusters when there are none)
for MP in "${PRECISIONS[@]}"; do
  SAMPLING=()
  [ -n "$CLUSTERS" ] && [ -f "$CLUSTERS" ] && SAMPLING=("mitigation.dup_sampling.clusters=$CLUSTERS")
  timeout "$(left)" $PY train.py recipe=tiny train.mixed_precision="$MP" train.max_steps=$STEPS train.lr_warmup_steps=0 \
    eval.every_n_steps=$STEPS eval.prompts_per_group=2 eval.images_per_prompt=2 eval.steps=10 summary.enabled=false \
    run.output_dir="$WORK/runs" run.name="tiny_$MP" run.overwrite=true run.report_to=none "${LAB[@]}" "${SAMPLING[@]}" \
    > "$WORK/tiny_$MP.log" 2>&1
  echo "tiny recipe $MP: exit $?" | tee -a "$OUT/summary.txt"
  [ -z "$CLUSTERS" ] && [ -f "$WORK/runs/tiny_$MP/dedup/clusters.jsonl" ] && \
    CLUSTERS="$WORK/runs/tiny_$MP/dedup/clusters.jsonl"  # the next precision reuses them
  for f in metrics.jsonl memorization/step_$(printf %06d $STEPS)/metrics.json entropy_filter_thresholds.json; do
    [ -f "$WORK/runs/tiny_$MP/$f" ] && cp "$WORK/runs/tiny_$MP/$f" "$OUT/tiny_${MP}_$(basename "$f")"
  done
done

# 2. every method through the engine (its device: CUDA when there is one)
timeout "$(left)" $PY benchmarks/inference_cost.py --model models/tiny-sd "${GEN[@]}" \
  --out "$OUT/inference_cost_tiny_$DEV.json" > "$WORK/inference_cost.log" 2>&1
echo "engine, every method: exit $?" | tee -a "$OUT/summary.txt"

# 3. shape-real costs (bf16 on CUDA: what SD fine-tuning uses; fp32 in the dry run)
DT=bf16; [ "$DEV" = cpu ] && DT=fp32
for S in "${SIZES[@]}"; do
  timeout "$(left)" $PY benchmarks/real_shape.py --size "$S" --device "$DEV" --dtype "$DT" --rounds $ROUNDS \
    --parts train,denoise,memory --out "$OUT/real_shape_${S}_${DEV}_${DT}.json" > "$WORK/real_shape_$S.log" 2>&1
  echo "real shapes $S: exit $?" | tee -a "$OUT/summary.txt"
done

# 4. our loop ÷ diffusers' LoRA example (needs the example script)
if [ -n "$EXAMPLE" ] && [ -f "$EXAMPLE" ]; then
  timeout "$(left)" $PY benchmarks/vs_diffusers_lora.py --script "$EXAMPLE" --out "$OUT/vs_diffusers_lora_$DEV.json" \
    > "$WORK/vs_diffusers.log" 2>&1
  echo "vs diffusers: exit $?" | tee -a "$OUT/summary.txt"
else
  echo "vs diffusers: skipped (EXAMPLE=path/to/train_text_to_image_lora.py not given)" | tee -a "$OUT/summary.txt"
fi
echo "wall $(( $(date +%s) - START )) s of $BUDGET" | tee -a "$OUT/summary.txt"
tar czf "$OUT/logs.tgz" -C "$WORK" --exclude=runs . 2>/dev/null
cat "$OUT/summary.txt"
