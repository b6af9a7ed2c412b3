# shellcheck shell=bash
# The one SLURM launcher behind every examples/*.sh recipe.
#
# Owns: finding the repository, the per-job run directory (checkpoints + logs, outside the
# repository), the NCCL/CUDA environment, a preflight on every node (python -m
# megatron_rpt.preflight: config, GPUs, vllm / transformer_engine import), the torchrun
# rendezvous on every node through srun, forwarding SIGUSR1/SIGTERM to the trainer so it
# checkpoints, and requeueing the job when it was stopped for the time limit (the requeued
# job resumes with --resume auto).
#
# Two ways in:
#   * sourced by a recipe, which sets RPT_CONFIG (and NPROC_PER_NODE/GPUS_PER_NODE) and
#     calls `rpt_launch "$@"`; trailing script arguments go to the trainer:
#         mkdir -p logs && sbatch examples/rpt_14b.sh --set train.steps=10
#   * executed by srun as `bash launch.sh node -m megatron_rpt.trainer ...` on each node
#     (internal): it execs torchrun for that node.
# Outside SLURM (`bash examples/rpt_tiny_cpu.sh`) it runs one node locally, no srun.
#
# Knobs (environment; all optional):
#   RPT_REPO           repository root (default: $SLURM_SUBMIT_DIR, else the script's ..)
#   RPT_RUN_DIR        run directory (checkpoints + logs); default $RPT_RUNS_ROOT/<job-name>-<job-id>,
#                      else $SCRATCH/megatron-rpt/<job-name>-<job-id>; with neither set the launcher
#                      stops with an error: checkpoints are ~200 GB each for 14B (weights + Adam
#                      state) and never go into the repository by default. A requeued job keeps
#                      its id, so it finds its checkpoints; set RPT_RUN_DIR to continue another job.
#   RPT_RUNS_ROOT      parent directory of the run directories (a large shared file system)
#   RPT_RUNS_IN_REPO   1: default to <repo>/runs (small CPU smoke runs: rpt_tiny_cpu.sh sets it)
#   RPT_PREFLIGHT      0: skip the per-node preflight (python -m megatron_rpt.preflight)
#   RPT_EXTRA_ARGS     extra trainer arguments, word-split (e.g. "--set train.steps=2")
#   RPT_TRAIN_MODULE   python module to run (default megatron_rpt.trainer)
#   RPT_TORCHRUN       torchrun executable (default torchrun; pick the venv's one)
#   RPT_PYTHON         the python that torchrun runs (default python), to probe its torch
#   RPT_MAX_REQUEUES   stop requeueing after this many restarts (default 20)
#   RPT_SAVE_GRACE_S   seconds torchrun gives the ranks after a signal (finish the current
#                      step -- the trainer stops between steps -- and save) before SIGKILL;
#                      default 840. Each GPU recipe sets its own, at least twice the RL step
#                      time tools/plan.py estimates (a 72B step with 8k-token rollouts takes
#                      over 10 minutes), and its --signal=B:USR1@<lead> lead time above it.
#   RPT_RDZV_PORT      rendezvous port on the first node (default 20000 + job id % 10000, below
#                      Linux's ephemeral range 32768-60999 so no outgoing connection holds it;
#                      checked against this node's net.ipv4.ip_local_port_range)

# ----------------------------------------------------------------------------- environment

# Export a default unless the user already set the variable (site settings win).
_rpt_default() { if [[ -z "${!1+x}" ]]; then export "$1=$2"; fi; }

rpt_export_env() {
  # Megatron overlaps TP/SP communication with compute only when kernels are issued in
  # submission order on one hardware queue; Megatron-Core asserts on this for SP+TP overlap.
  _rpt_default CUDA_DEVICE_MAX_CONNECTIONS 1
  # A failed or hung collective tears the job down (and lets SLURM requeue it) instead of
  # every rank waiting until the wall-time limit.
  _rpt_default TORCH_NCCL_ASYNC_ERROR_HANDLING 1
  # Fewer allocator stalls with Megatron's communication streams.
  _rpt_default TORCH_NCCL_AVOID_RECORD_STREAMS 1
  # InfiniBand: a longer retry timeout survives transient fabric congestion at scale.
  _rpt_default NCCL_IB_TIMEOUT 22
  _rpt_default NCCL_DEBUG WARN
  # Site-specific, set them in your environment when the defaults pick the wrong fabric:
  #   NCCL_IB_HCA=mlx5_0,mlx5_1,...   which HCAs NCCL may use (e.g. skip the storage NIC)
  #   NCCL_SOCKET_IFNAME=ib0|eth0     interface for NCCL/gloo bootstrap traffic
  #   NCCL_IB_GID_INDEX=3             RoCE clusters
  #   NCCL_NVLS_ENABLE=0              if NVLink SHARP is flaky on your driver
  #   TORCH_FR_BUFFER_SIZE=2000       NCCL flight recorder, dumped on a collective timeout
  #                                   (TORCH_NCCL_TRACE_BUFFER_SIZE before torch 2.7)
  # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True is deliberately NOT set: vLLM's sleep
  # mode (rollout.sleep_between_phases) uses its own CUDA memory pool, which refuses it.
  _rpt_default TOKENIZERS_PARALLELISM false
  _rpt_default PYTHONUNBUFFERED 1
}

# ----------------------------------------------------------------------------- per node

# Does this torch's torchrun have --signals-to-handle (torch >= 2.8)? Reads its source
# instead of running `torchrun --help`, which would import torch (seconds).
_rpt_torchrun_handles_signals() {
  "${RPT_PYTHON:-python}" -c 'import importlib.util as u, pathlib, sys
p = pathlib.Path(u.find_spec("torch").origin).parent / "distributed" / "run.py"
sys.exit(0 if "signals_to_handle" in p.read_text() else 1)' 2>/dev/null
}

# Runs on every node (srun task). Execs torchrun so srun's forwarded signals reach it.
rpt_node() {
  local torchrun=${RPT_TORCHRUN:-torchrun}
  local nproc=${NPROC_PER_NODE:?NPROC_PER_NODE must be set by rpt_launch}
  local -a args=(
    --nnodes "${RPT_NNODES:?}" --nproc-per-node "$nproc" --node-rank "${SLURM_NODEID:-0}"
    --rdzv-id "${RPT_RDZV_ID:?}" --rdzv-backend c10d --rdzv-endpoint "${RPT_RDZV_ENDPOINT:?}"
    --max-restarts 0
  )
  echo "[rpt] node ${SLURM_NODEID:-0} ($(hostname)): torchrun ${nproc} ranks, rendezvous ${RPT_RDZV_ENDPOINT}"
  if _rpt_torchrun_handles_signals; then
    # torchrun forwards these to every rank, then waits the grace period for them to save.
    exec "$torchrun" "${args[@]}" --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
      --shutdown-timeout "${RPT_SAVE_GRACE_S:-840}" "$@"
  fi
  # Older torch: torchrun would die on SIGUSR1 (SLURM signals every process of the step)
  # and take the saving ranks with it. Start it with SIGUSR1 ignored (the trainer installs
  # its own handler) and relay the signal to its children, the ranks, ourselves.
  (trap '' USR1 && exec "$torchrun" "${args[@]}" "$@") &
  local pid=$!
  # shellcheck disable=SC2064  # expand $pid now
  trap "pkill -USR1 -P $pid" USR1
  # shellcheck disable=SC2064
  trap "pkill -TERM -P $pid" TERM INT
  _rpt_wait "$pid"
}

# wait for pid, surviving trapped signals; returns its exit status.
_rpt_wait() {
  local pid=$1 rc=0
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" && rc=0 || rc=$?
  done
  wait "$pid" 2>/dev/null && rc=0 || rc=$?
  return "$rc"
}

# Runs on every node (srun task) before the training step: the config, the GPUs and the
# packages the config needs, in the environment the ranks will use.
rpt_preflight() {
  "${RPT_PYTHON:-python}" -m megatron_rpt.preflight --gpus "${GPUS_PER_NODE:-0}" "$@"
}

# ----------------------------------------------------------------------------- batch script

_rpt_repo() {
  local candidate
  for candidate in "${RPT_REPO:-}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "${BASH_SOURCE[0]}")/../.."; do
    if [[ -n "$candidate" && -f "$candidate/megatron_rpt/__init__.py" ]]; then
      (cd "$candidate" && pwd)
      return 0
    fi
  done
  echo "[rpt] error: cannot find the megatron-rpt repository; submit from its root or set RPT_REPO" >&2
  return 2
}

# The run directory: never inside the repository unless asked (RPT_RUNS_IN_REPO=1).
_rpt_run_dir() {
  local repo=$1 name=$2 id=$3 root
  if [[ -n "${RPT_RUN_DIR:-}" ]]; then
    echo "$RPT_RUN_DIR"
    return 0
  fi
  root=${RPT_RUNS_ROOT:-${SCRATCH:+$SCRATCH/megatron-rpt}}
  if [[ -z "$root" && "${RPT_RUNS_IN_REPO:-0}" == 1 ]]; then
    root=$repo/runs
  fi
  if [[ -z "$root" ]]; then
    echo "[rpt] error: no run directory: set RPT_RUN_DIR (this run) or RPT_RUNS_ROOT or SCRATCH (a parent for" \
      "all runs) to a large shared file system; checkpoints (~200 GB each for 14B) are not written into" \
      "the repository $repo" >&2
    return 2
  fi
  echo "$root/$name-$id"
}

# The rendezvous port, outside this node's ephemeral port range (where the kernel picks the
# local ports of outgoing connections, so one may already hold it).
_rpt_rdzv_port() {
  local id=$1 port lo=32768 hi=60999 range=/proc/sys/net/ipv4/ip_local_port_range
  port=${RPT_RDZV_PORT:-$((20000 + id % 10000))}
  if [[ -r "$range" ]]; then
    read -r lo hi <"$range"
  fi
  if ((port >= lo && port <= hi)); then
    echo "[rpt] error: rendezvous port $port is inside this node's ephemeral port range $lo-$hi" \
      "(net.ipv4.ip_local_port_range); set RPT_RDZV_PORT to a free port below $lo" >&2
    return 2
  fi
  echo "$port"
}

_RPT_STOP_SIGNAL=""
_rpt_on_signal() {
  _RPT_STOP_SIGNAL=$1
  echo "[rpt] $(date '+%F %T') got SIG$1: asking the trainer to checkpoint and stop"
  if [[ -n "${_RPT_STEP_PID:-}" ]]; then
    kill -s "$1" "$_RPT_STEP_PID" 2>/dev/null || true
  fi
}

rpt_launch() {
  local repo
  repo=$(_rpt_repo) || return 2
  cd "$repo" || return 2
  local config=${RPT_CONFIG:?the recipe must set RPT_CONFIG=configs/<name>.yaml}
  if [[ ! -f "$config" ]]; then
    echo "[rpt] error: config $config not found under $repo (RPT_CONFIG)" >&2
    return 2
  fi

  local in_slurm=0
  [[ -n "${SLURM_JOB_ID:-}" ]] && in_slurm=1
  local job_id=${SLURM_JOB_ID:-local-$$}
  local job_name=${SLURM_JOB_NAME:-$(basename "$config" .yaml)}
  local run_dir
  run_dir=$(_rpt_run_dir "$repo" "$job_name" "$job_id") || return 2
  mkdir -p "$run_dir"

  export NPROC_PER_NODE=${NPROC_PER_NODE:-${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}}
  export RPT_NNODES=${SLURM_NNODES:-1}
  export RPT_RDZV_ID=$job_id
  local head=127.0.0.1
  if ((in_slurm)); then
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
  # torchrun's c10d store listens here on the first node (and sets MASTER_* for the ranks).
  local port
  port=$(_rpt_rdzv_port "${SLURM_JOB_ID:-$$}") || return 2
  export RPT_RDZV_ENDPOINT="$head:$port"
  rpt_export_env

  local -a extra=()
  if [[ -n "${RPT_EXTRA_ARGS:-}" ]]; then
    read -r -a extra <<<"$RPT_EXTRA_ARGS"
  fi
  local -a args=(
    --config "$config" --resume auto
    --set "checkpoint.dir=$run_dir/checkpoints" --set "logging.dir=$run_dir"
    "${extra[@]}" "$@"
  )
  local -a trainer=(-m "${RPT_TRAIN_MODULE:-megatron_rpt.trainer}" "${args[@]}")

  echo "[rpt] $(date '+%F %T') job $job_id (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
    "${RPT_NNODES} node(s) x ${NPROC_PER_NODE} rank(s); config $config; run dir $run_dir"
  echo "[rpt] commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"

  local lib
  lib="$repo/examples/lib/launch.sh"
  # One task per node. srun of SLURM >= 22.05 no longer inherits --cpus-per-task from
  # sbatch: pass it on, or the task (and every rank) may be bound to a single core.
  local -a step=(--nodes="$RPT_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  fi
  if [[ "${RPT_PREFLIGHT:-1}" != 0 ]]; then
    local -a preflight=(bash "$lib" preflight "${args[@]}")
    ((in_slurm)) && preflight=(srun "${step[@]}" "${preflight[@]}")
    if ! "${preflight[@]}"; then
      echo "[rpt] error: the preflight failed (lines above); fix the environment or the config before" \
        "the run starts (RPT_PREFLIGHT=0 skips it)" >&2
      return 1
    fi
  fi

  trap '_rpt_on_signal USR1' USR1
  trap '_rpt_on_signal TERM' TERM
  trap '_rpt_on_signal INT' INT
  if ((in_slurm)); then
    # The task execs torchrun, which starts NPROC_PER_NODE ranks.
    srun "${step[@]}" bash "$lib" node "${trainer[@]}" &
  else
    bash "$lib" node "${trainer[@]}" &
  fi
  _RPT_STEP_PID=$!
  local rc=0
  _rpt_wait "$_RPT_STEP_PID" || rc=$?
  _RPT_STEP_PID=""
  trap - USR1 TERM INT

  if [[ "$_RPT_STOP_SIGNAL" == USR1 ]]; then
    local restarts=${SLURM_RESTART_COUNT:-0}
    if ((in_slurm)) && ((restarts < ${RPT_MAX_REQUEUES:-20})); then
      # $rc is torchrun's: it exits non-zero after forwarding a signal even when every rank saved and
      # exited 0, so it says nothing about the checkpoint (the trainer's log does).
      echo "[rpt] $(date '+%F %T') stopped for the time limit (torchrun exit $rc after the signal);" \
        "requeueing job $job_id" \
        "(restart $((restarts + 1))); it resumes from $run_dir/checkpoints"
      if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "[rpt] error: scontrol requeue failed; resubmit with RPT_RUN_DIR=$run_dir to resume" >&2
        return 1
      fi
      return 0
    fi
    echo "[rpt] stopped by SIGUSR1 (exit $rc); not requeueing (restart ${restarts}, RPT_MAX_REQUEUES=${RPT_MAX_REQUEUES:-20})"
    return 0
  fi
  if [[ -n "$_RPT_STOP_SIGNAL" ]]; then
    echo "[rpt] stopped by SIG$_RPT_STOP_SIGNAL (torchrun exit $rc after the signal)"
    return "$rc"
  fi
  echo "[rpt] $(date '+%F %T') trainer finished with exit code $rc"
  return "$rc"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  case "${1:-}" in
    node) shift; rpt_node "$@" ;;
    preflight) shift; rpt_preflight "$@" ;;
    *) echo "usage: source examples/lib/launch.sh && rpt_launch [trainer args]  (or: launch.sh node ARGS, used by srun)" >&2
       exit 2 ;;
  esac
fi
