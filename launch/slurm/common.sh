#!/usr/bin/env bash
# Shared by the *.sbatch scripts: srun one task per GPU, optionally inside a container (pyxis).
#   CONTAINER_IMAGE   e.g. an NGC image with minitron installed (enroot/pyxis); empty: bare metal
#   CONTAINER_MOUNTS  e.g. /lustre:/lustre
#   REPO              repository path as seen inside the job (default: this checkout)
#   DRY_RUN=1         print the srun line (and what each task would run) instead of running
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}

minitron_srun() {
  local srun_args=(--kill-on-bad-exit=1)
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    srun_args+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO")
    [[ -z "${CONTAINER_MOUNTS:-}" ]] || srun_args+=(--container-mounts="$CONTAINER_MOUNTS")
  fi
  local cmd=(srun "${srun_args[@]}" bash "$REPO/launch/slurm/task.sh" "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    DRY_RUN=1 bash "$REPO/launch/slurm/task.sh" "$@"
  else
    "${cmd[@]}"
  fi
}
