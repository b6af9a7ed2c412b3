#!/bin/bash
# RPT smoke run through the SLURM launch path on CPU: 1 node, 1 rank, gloo,
# configs/tiny_cpu.yaml. Same shape as the GPU recipes; the CI SLURM test runs it.
#   mkdir -p logs && sbatch examples/rpt_tiny_cpu.sh --set train.steps=2
#SBATCH --job-name=rpt-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
set -euo pipefail

export CUDA_VISIBLE_DEVICES=""   # CPU ranks over gloo even when the node has GPUs
export NPROC_PER_NODE=1
export RPT_CONFIG=${RPT_CONFIG:-configs/tiny_cpu.yaml}
export RPT_SAVE_GRACE_S=${RPT_SAVE_GRACE_S:-50}
export RPT_RUNS_IN_REPO=${RPT_RUNS_IN_REPO:-1}   # a small smoke run: runs/ in the repository is fine

# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "${RPT_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/examples/lib/launch.sh"
rpt_launch "$@"
