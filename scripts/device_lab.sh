#!/usr/bin/env bash
# One accelerator call for the lab (issue 20): the training arms in the copying regime
# (benchmarks/copying_regime.py, 6 arms as parallel processes) and every inference method's trade-off sweep on the
# committed memorizing v pair (benchmarks/tradeoff.py), side by side on one GPU, inside BUDGET seconds.
#
#   bash scripts/device_lab.sh                      # on the GPU machine (the device tool), results in $OUT
#   DRY=1 OUT=/tmp/dev bash scripts/device_lab.sh   # CPU dry run: tiny sizes, same code path
#
# The GPU machine has torch, accelerate, transformers, peft, onnxruntime but not diffusers, datasets, omegaconf or
# the SSCD model: they travel as wheels in .whl/ (see docs/lab-results.md, "GPU run"). Duplicate-aware arms read
# clusters made beforehand here (runs/gpu_inputs/clusters_420.jsonl: faiss does not travel).
# Size: the tracked tree (36 MiB) plus the wheels (~30 MiB) is just over the 64 MiB a call carries; untrack the
# figures (5.8 MB, not read by this run) for the call only, then restore the index right after:
#   git rm -r -q --cached docs/figures results/figures
#   printf '/docs/figures/\n/results/figures/\n' >> .git/info/exclude
#   (device run: bash scripts/device_lab.sh; carry .whl and runs/gpu_inputs)
#   git reset -q HEAD -- docs/figures results/figures   # and drop the 2 exclude lines
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
WORK=${WORK:-/tmp/guard_train_device}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT" "$WORK"
source scripts/device_env.sh "$WORK/env.txt"
if [ "${DRY:-0}" = 1 ]; then
  C=(--steps 8 --eval-every 4 --images 2 --prompts 2 --gen-steps 3 --parallel 3 --dry)
  T=(--dry --dup-images 2 --other-images 1 --prompts-per-group 2 --steps 3)
else
  C=(--steps 6000 --eval-every 2000 --images 40 --prompts 8 --parallel 6 --max-batch 1024
     --clusters runs/gpu_inputs/clusters_420.jsonl)
  T=(--dup-images 40 --other-images 4 --max-batch 1024 --sscd-threads 6)
fi
$PY benchmarks/copying_regime.py --out "$WORK/copying" --deadline-s $((BUDGET - 40)) "${C[@]}" > "$WORK/copying.log" 2>&1 &
P1=$!
$PY benchmarks/tradeoff.py --out "$OUT/tradeoff.jsonl" --work "$WORK/tradeoff" --deadline-s $((BUDGET - 60)) "${T[@]}" \
  > "$WORK/tradeoff.log" 2>&1 &
P2=$!
wait $P1 $P2
cp "$WORK/copying/arms.json" "$OUT/arms.json" 2>/dev/null
for f in "$WORK"/copying/runs/plain/final/pytorch_lora_weights.safetensors "$WORK"/copying/runs/plain/data/lab_config.json; do
  [ -f "$f" ] && cp "$f" "$OUT/plain_$(basename "$f")"
done
tar czf "$OUT/logs.tgz" -C "$WORK" env.txt copying.log tradeoff.log copying/logs 2>/dev/null
tail -5 "$WORK/copying.log" "$WORK/tradeoff.log"
ls -la "$OUT"
