# Sourced by the device scripts (scripts/device_*.sh): the wheels carried in .whl/ installed where the GPU machine's
# Python (torch, accelerate, transformers, peft, onnxruntime — not diffusers, datasets, omegaconf) finds them, $PY
# chosen, and the versions written to $1 (a file) and printed.
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi 2>/dev/null || echo "no GPU"; $PY -c "import torch, diffusers, transformers, accelerate, peft; \
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, \
'accelerate', accelerate.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"; } > "$1" 2>&1
cat "$1"
