#!/usr/bin/env bash
# The one GPU run: everything issue 11 asks a GPU to show, written to ONE JSON ($OUT/gpu.json,
# else benchmarks/results/gpu/gpu.json), in under 8 minutes on one H200 (budget 460 s for the
# stages, each with its own timeout; a cut-short run keeps what it measured). In order:
#   env       versions, device, capability, fusion flags and FP8 gate on this GPU
#   roofline  8192^3 bf16 matmul TFLOP/s and device-to-device copy GB/s (the ceilings)
#   convert   tools/convert.py verify on CUDA, hf-to-mcore on CUDA, verify of the converted checkpoint
#   train     GRPO steps on CUDA: local spec, built-in engine, bf16; tokens/s and MFU vs the matmul
#   sync      weight bridge into the engine on CUDA vs the device-to-device copy
#   rollout   built-in engine vs transformers generate on CUDA in bf16
# The stages live in benchmarks/gpu_check.py. `bash benchmarks/gpu.sh --dry-run` runs the same
# stages and entry points on the CPU with tiny sizes (tests/test_gpu_script.py runs it in CI).
#
# The machine: one GPU, Python 3.12, torch preinstalled, no network. Its image already has
# numpy, packaging, PyYAML, transformers, tokenizers, safetensors, tqdm, pyarrow, sentencepiece
# (/work/.library/device/KINDS.md lists them); megatron-core is not there and travels as a wheel
# (pure Python; its own needs -- torch, numpy, packaging -- are all on the machine). From the
# repository root, on a machine with network access:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
# which saves .whl/megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl
# (2.6 MB). Carry .whl with the working tree; this script installs every wheel there with
# --no-index into /tmp/site. A module still missing stops the script at the start, naming it.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=()
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=(--dry-run)
elif [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2
  exit 2
fi
python=${PYTHON:-python3}
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"

if ((${#dry_run[@]} == 0)) && compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# Every module the stages import, checked at once: one line naming all that are missing.
"$python" - <<'EOF'
import importlib.util, sys
needed = ["torch", "numpy", "packaging", "yaml", "transformers", "tokenizers", "safetensors", "tqdm", "pyarrow",
          "sentencepiece", "megatron.core"]
missing = [m for m in needed if importlib.util.find_spec(m.split(".")[0]) is None
           or importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"benchmarks/gpu.sh: missing Python modules {missing}; carry their wheels in .whl "
             "(see the header of benchmarks/gpu.sh for the pip download command)")
EOF

exec "$python" benchmarks/gpu_check.py --out "$out/gpu.json" "${dry_run[@]}"
