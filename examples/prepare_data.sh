#!/bin/bash
# Score a corpus (or a config's data.mixture) with the proxy model as a SLURM job array: one
# tools/prepare_data.py worker per array task. Task i of N scores shards i, i+N, ...; the last
# task to finish writes manifest.json. The result is the same for any N.
#   mkdir -p logs && RPT_RUNS_ROOT=/scratch/$USER/rpt sbatch --array=0-7 examples/prepare_data.sh \
#       --config configs/math_mixture_cpu.yaml --proxy /models/DeepSeek-R1-Distill-Qwen-1.5B
# GPU nodes: add --gpus-per-task=1 (SLURM gives each worker its own GPU).
#
# Output directory (never inside the repository): RPT_DATA_OUT, else $RPT_RUNS_ROOT/data/<name>,
# else $SCRATCH/megatron-rpt/data/<name>, where <name> is RPT_DATA_NAME or the --config file's
# name. It does not depend on the job id: resubmitting the same command after a kill or a crash
# resumes it (finished shards are kept, a run with other inputs or proxy is refused). SIGUSR1
# before the time limit stops the worker (it loses at most the shard in flight) and requeues
# the task. A preflight (prepare_data.py --check) validates the arguments, config and inputs
# first (RPT_PREFLIGHT=0 skips it). RPT_PYTHON picks the python (default: python).
#SBATCH --job-name=rpt-prepare
#SBATCH --array=0-1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "${RPT_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/examples/lib/launch.sh"

# The output directory of this data set (stable across resubmissions).
_rpt_data_out() {
  local name=$1 root
  if [[ -n "${RPT_DATA_OUT:-}" ]]; then
    echo "$RPT_DATA_OUT"
    return 0
  fi
  root=${RPT_RUNS_ROOT:-${SCRATCH:+$SCRATCH/megatron-rpt}}
  if [[ -z "$root" ]]; then
    echo "[rpt] error: no output directory: set RPT_DATA_OUT (this data set) or RPT_RUNS_ROOT or SCRATCH" \
      "(a large shared file system); prepared data is not written into the repository" >&2
    return 2
  fi
  echo "$root/data/$name"
}

rpt_prepare() {
  local repo
  repo=$(_rpt_repo) || return 2
  cd "$repo" || return 2
  rpt_export_env
  local name=${RPT_DATA_NAME:-} prev="" arg
  for arg in "$@"; do
    if [[ -z "$name" && "$prev" == --config ]]; then
      name=$(basename "$arg" .yaml)
    fi
    prev=$arg
  done
  name=${name:-${SLURM_JOB_NAME:-prepared}}
  local out
  out=$(_rpt_data_out "$name") || return 2
  local python=${RPT_PYTHON:-python}
  local -a args=("$@" --out "$out" --no-progress)
  echo "[rpt] $(date '+%F %T') prepare_data task ${SLURM_ARRAY_TASK_ID:-0} of ${SLURM_ARRAY_TASK_COUNT:-1}" \
    "(job ${SLURM_JOB_ID:-local}, restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): out $out"
  if [[ "${RPT_PREFLIGHT:-1}" != 0 ]] && ! "$python" tools/prepare_data.py "${args[@]}" --check; then
    echo "[rpt] error: the preflight failed (line above); fix the arguments or the config (RPT_PREFLIGHT=0" \
      "skips it)" >&2
    return 1
  fi
  trap '_rpt_on_signal USR1' USR1
  trap '_rpt_on_signal TERM' TERM
  trap '_rpt_on_signal INT' INT
  "$python" tools/prepare_data.py "${args[@]}" &
  _RPT_STEP_PID=$!
  local rc=0
  _rpt_wait "$_RPT_STEP_PID" || rc=$?
  _RPT_STEP_PID=""
  trap - USR1 TERM INT
  if [[ "$_RPT_STOP_SIGNAL" == USR1 && -n "${SLURM_JOB_ID:-}" ]]; then
    echo "[rpt] $(date '+%F %T') stopped for the time limit (exit $rc); requeueing task $SLURM_JOB_ID, which" \
      "resumes $out"
    scontrol requeue "$SLURM_JOB_ID" || {
      echo "[rpt] error: scontrol requeue failed; resubmit the same command to resume" >&2
      return 1
    }
    return 0
  fi
  echo "[rpt] $(date '+%F %T') prepare_data finished with exit code $rc"
  return "$rc"
}

rpt_prepare "$@"
