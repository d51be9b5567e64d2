#!/bin/bash
# The CPU test mode on one machine: 2 ranks on gloo, any recipe, any overrides.
#   launch/local_cpu.sh --config configs/digits_mlp.yaml trainer.epochs=3
set -euo pipefail
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc-per-node="${NPROC:-2}" \
  -m ddp_trainer.train trainer.device=cpu "$@"
