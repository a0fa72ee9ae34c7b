#!/usr/bin/env bash
# Train one stage on all GPUs of one host: one process, one mesh over every GPU.
#
#   pip install -e . "jax[cuda13]"        # once, in the project's environment
#   WORKDIR=/data/runs/multitask DATA_DIR=/data/tfds FSDP=2 \
#     experiments/launch/multi_gpu.sh configs/multitask_synthetic.py --config.num_steps=20000
#
# The batch is split over all GPUs (config.data.batch_size is the global
# batch and must divide by the GPU count); FSDP > 1 also splits parameters and
# optimizer state over groups of FSDP GPUs, for models that do not fit one GPU
# alongside their activations. Choose which GPUs with CUDA_VISIBLE_DEVICES.
# SIGTERM saves the step in progress and exits with status 143; the same
# command resumes.
#
# NOTE: not yet run on a GPU host; the same mesh code is tested on 8 forced
# CPU devices (tests/test_train_multidevice.py).
set -euo pipefail

: "${WORKDIR:?set WORKDIR to the run folder}"
: "${DATA_DIR:?set DATA_DIR to the TFDS data folder}"
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config="$1"
shift

# Keep XLA from taking 75% of each GPU's memory before the first step, so the
# memory analysis logged before step 0 is what the run really needs.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

exec uem-ich train --config="$config" --workdir="$WORKDIR" \
  --config.distributed=off \
  --config.data.data_dir="$DATA_DIR" \
  --config.mesh.data=-1 --config.mesh.fsdp="${FSDP:-1}" \
  --config.model.dtype=bfloat16 --config.model.depthwise=conv \
  "$@"
