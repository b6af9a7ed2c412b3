#!/bin/bash
# RPT, the paper's recipe: DeepSeek-R1-Distill-Qwen-14B on 2 nodes x 8 H100 80GB (TP2, PP4, DP2).
# Config: configs/rpt_14b.yaml. Submit from the repository root (trailing arguments go to
# the trainer); set RPT_CKPT / RPT_TOKENIZER / RPT_HF_DIR / RPT_PROXY_MODEL / RPT_DATA and RPT_RUNS_ROOT (or
# SCRATCH: checkpoints go to $RPT_RUNS_ROOT/<job>-<id>, never into the repository) first:
#   mkdir -p logs && sbatch examples/rpt_14b.sh [--set train.steps=10 ...]
# Requeues itself at the time limit and resumes from the last checkpoint; launcher knobs
# (run dir, NCCL settings, extra args) are documented in examples/lib/launch.sh.
#SBATCH --job-name=rpt-14b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@2220
set -euo pipefail

export GPUS_PER_NODE=8
# The trainer stops between RL steps: the grace (torchrun's wait after the signal) covers one
# step plus the save, at least twice tools/plan.py's step estimate; the USR1 lead exceeds it.
export RPT_SAVE_GRACE_S=${RPT_SAVE_GRACE_S:-2100}
export RPT_CONFIG=${RPT_CONFIG:-configs/rpt_14b.yaml}

# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "${RPT_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/examples/lib/launch.sh"
rpt_launch "$@"
