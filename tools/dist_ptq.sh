#!/usr/bin/env bash
# Multi-GPU (or multi-process) PTQ, like mmdet's tools/dist_test.sh:
#   bash tools/dist_ptq.sh CONFIG NUM_PROCS [tools/ptq.py options ...]
# Calibration images are sharded over the processes, observer ranges and every
# learned parameter's gradient are averaged across them, and the standard
# distributed test loop evaluates. On CPU add --cfg-options env_cfg.dist_cfg.backend=gloo.
set -euo pipefail
CONFIG=$1
NPROCS=$2
shift 2
PORT=${PORT:-29500}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --node_rank=0 --master_addr=127.0.0.1 \
  --nproc_per_node="$NPROCS" --master_port="$PORT" tools/ptq.py "$CONFIG" --launcher pytorch "$@"
