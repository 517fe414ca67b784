#!/usr/bin/env bash
# Launch any minitron subcommand with torchrun, on one node or many.
#
#   launch/torchrun.sh importance --load ckpt/teacher --data-path data/wiki ...
#
# Environment (multi-node: set the same values on every node, NODE_RANK per node):
#   GPUS_PER_NODE  processes per node (GPUs; on CPU hosts: ranks per host)   default 1
#   NNODES         number of nodes                                           default 1
#   NODE_RANK      this node's index, 0..NNODES-1                            default 0
#   MASTER_ADDR    host of node 0 (required when NNODES > 1)                 default localhost
#   MASTER_PORT    rendezvous port                                           default 29500
#   PYTHON         interpreter                                               default python
#   DRY_RUN=1      print the command instead of running it
set -euo pipefail

die() { echo "launch/torchrun.sh: error: $*" >&2; exit 2; }

[[ $# -gt 0 ]] || die "no minitron subcommand given (e.g. evaluate --load CKPT ...)"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
if [[ -z "${MASTER_ADDR:-}" ]]; then
  [[ "$NNODES" -eq 1 ]] || die "MASTER_ADDR is not set: export the host name of node 0 on every node"
  MASTER_ADDR=localhost
fi
[[ "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"

cmd=("$PYTHON" -m torch.distributed.run
  --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$GPUS_PER_NODE"
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"
  -m minitron_megatron "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
