#!/usr/bin/env bash
# One SLURM task = one rank: map SLURM's variables to torch.distributed's and run minitron.
# Started by the *.sbatch scripts through srun (one task per GPU). DRY_RUN=1 prints the mapping.
set -euo pipefail

die() { echo "launch/slurm/task.sh: error: $*" >&2; exit 2; }

for var in SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_JOB_NODELIST; do
  [[ -n "${!var:-}" ]] || die "$var is not set: run this under srun (see launch/slurm/*.sbatch)"
done

# First host of a SLURM node list: "node[01-04,07]" -> node01, "a,b" -> a.
first_host() {
  local list=$1 before_comma=${1%%,*}
  if [[ "$before_comma" == *"["* ]]; then
    local prefix=${list%%\[*} rest=${list#*\[}
    echo "${prefix}${rest%%[-,\]]*}"
  else
    echo "$before_comma"
  fi
}

if [[ -z "${MASTER_ADDR:-}" ]]; then
  if command -v scontrol >/dev/null 2>&1; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  else
    MASTER_ADDR=$(first_host "$SLURM_JOB_NODELIST")
  fi
fi
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-29500}
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
PYTHON=${PYTHON:-python}

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK MASTER_ADDR=$MASTER_ADDR" \
       "MASTER_PORT=$MASTER_PORT $PYTHON -m minitron_megatron $*"
else
  exec "$PYTHON" -m minitron_megatron "$@"
fi
