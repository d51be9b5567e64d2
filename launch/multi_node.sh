#!/bin/bash
# Several nodes without SLURM: run this on every node with the same MASTER_ADDR and NNODES, and NODE_RANK
# 0..NNODES-1:
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 launch/multi_node.sh --config configs/cifar10_resnet18.yaml
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 launch/multi_node.sh --config configs/cifar10_resnet18.yaml
# Node 0 hosts the c10d rendezvous on MASTER_ADDR:MASTER_PORT (told so: torchrun's own guess joins whatever store
# holds the port, another job's, rather than fail); give each job its own RUN_ID and MASTER_PORT. LAUNCH_FLAGS go to
# ddp-launch before the script: torchrun's flags (LAUNCH_FLAGS="--nproc-per-node=4 --max-restarts=3"), --dry-run.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
hosts=false
[ "$((10#${NODE_RANK}))" -eq 0 ] && hosts=true
exec "${PYTHON:-python3}" -m ddp_trainer.cli.launch --nnodes="${NNODES}" --node-rank="${NODE_RANK}" \
  --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv-id="${RUN_ID:-ddp-trainer}" \
  --rdzv-conf="is_host=${hosts}" ${LAUNCH_FLAGS:-} -m ddp_trainer.train "$@"
