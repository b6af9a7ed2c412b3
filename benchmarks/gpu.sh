#!/usr/bin/env bash
# The benchmark set on one GPU (a lent H100/H200: Python 3.12, torch 2.x preinstalled, no internet).
# Small wheels travel with the repo: from the repository root on a machine with pip, run
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl megatron-core==0.16.1
#   (pure-Python needs such as safetensors/tokenizers/transformers likewise, when missing there)
# and carry .whl to the GPU machine. Results go to benchmarks/results/gpu/ (or $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
python3 -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA GPU'"
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

python3 benchmarks/bench_rollout.py --out "$out/bench_rollout.json"
python3 benchmarks/bench_weight_sync.py --layouts 1x1,1x1:bf16 --out "$out/bench_weight_sync.json"
python3 -m megatron_rpt.toy --out .cache/toy >/dev/null
RPT_TOY_DIR=.cache/toy python3 benchmarks/bench_train_step.py --config configs/toy_learn.yaml --steps 5 \
  --set model.params_dtype=bfloat16 --set rollout.dtype=bfloat16 --out "$out/bench_train_step.json"
python3 benchmarks/bench_data.py --out "$out/bench_data.json"
