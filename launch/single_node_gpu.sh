#!/bin/bash
# One GPU node: one process per visible GPU (nccl), started by ddp-launch (torchrun underneath).
#   launch/single_node_gpu.sh --config configs/cifar10_resnet18.yaml
set -euo pipefail
exec "${PYTHON:-python3}" -m ddp_trainer.cli.launch --standalone -m ddp_trainer.train "$@"
