#!/usr/bin/env bash
# The GPU benchmark in one call: ours against diffusers/pytorch-fid on the same GPU, float32
# and bfloat16, one table with MFU (benchmarks/bench_gpu.py; --write puts it in RESULTS.md).
#
#   bash benchmarks/gpu.sh [--write] [bench_gpu.py flags]
#
# Online it installs, into the current Python, the CUDA builds of JAX and PyTorch plus this
# repository and its PyTorch peers. Offline (a lent machine that reaches no registry), put the
# wheels of what that machine lacks in .whl/ first (pip download ... -d .whl, for its Python
# and platform); they are installed into /tmp/site and put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 XLA_PYTHON_CLIENT_PREALLOCATE=false

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
elif ! "$PY" -c 'import jax, torch, diffusers; assert jax.default_backend() == "gpu" and torch.cuda.is_available()' 2>/dev/null; then
  "$PY" -m pip install -q --upgrade "jax[cuda12]" torch
  "$PY" -m pip install -q -e . diffusers transformers pytorch-fid
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

"$PY" - <<'PY'
import jax, torch
print('JAX', jax.__version__, jax.devices(), '| torch', torch.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')
assert jax.default_backend() == 'gpu', 'JAX sees no GPU: install jax[cuda12] (or cuda13) for this driver'
assert torch.cuda.is_available(), 'PyTorch sees no GPU: install a CUDA build of torch'
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
"$PY" benchmarks/bench_gpu.py --device cuda "$@"
