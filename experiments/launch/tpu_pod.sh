#!/usr/bin/env bash
# Train one stage on a Cloud TPU pod slice: every host runs the same command.
#
#   export TPU_NAME=my-v5e-32 ZONE=us-west4-a PROJECT=my-project
#   export WORKDIR=/mnt/runs/multitask DATA_DIR=/mnt/tfds
#   SETUP=1 experiments/launch/tpu_pod.sh configs/multitask_synthetic.py   # first time
#   experiments/launch/tpu_pod.sh configs/multitask_synthetic.py --config.num_steps=20000
#
# SETUP=1 copies the committed tree (git archive HEAD) to every host and
# installs it with jax[tpu] in a virtual environment there. Each run starts
# `uem-ich train` on all hosts with config.distributed=on: on Cloud TPU VMs
# jax.distributed finds the coordinator and the process ids by itself. Each
# process reads only its shard of the data and the hosts train in lockstep.
#
# WORKDIR and DATA_DIR must be mounted at the same path on every host (a
# Filestore NFS share, or a bucket mounted with gcsfuse). All hosts write the
# checkpoint of a multi-host run together, and all of them read the dataset. Run `uem-ich build-dataset` once into DATA_DIR first.
# A maintenance event sends SIGTERM: the run saves the step in progress and
# exits with status 143, and the same command resumes it.
#
# NOTE: written from the Cloud TPU and JAX documentation; the multi-host code
# path is tested with two CPU processes (tests/test_train_multidevice.py), not
# on a pod.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE}"
: "${PROJECT:?set PROJECT}"
: "${WORKDIR:?set WORKDIR to a folder mounted on every host}"
: "${DATA_DIR:?set DATA_DIR to the TFDS data folder mounted on every host}"
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config="$1"
shift
remote_dir="${REMOTE_DIR:-uem-ich-jax}"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker=all --command="$1"
}

if [[ "${SETUP:-0}" == 1 ]]; then
  archive="$(mktemp -d)/uem-ich-jax.tar.gz"
  git archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:uem-ich-jax.tar.gz" \
    --zone="$ZONE" --project="$PROJECT" --worker=all
  on_all_hosts "mkdir -p $remote_dir && tar -xzf uem-ich-jax.tar.gz -C $remote_dir \
    && cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
fi

# Accelerator defaults: bfloat16 compute (parameters, losses and norms stay
# float32) and lax.conv for depthwise convolutions. Later overrides win.
overrides=(
  "--config.distributed=on"
  "--config.data.data_dir=$DATA_DIR"
  "--config.model.dtype=bfloat16"
  "--config.model.depthwise=conv"
  "$@"
)
on_all_hosts "cd $remote_dir && .venv/bin/uem-ich train --config=$(printf '%q' "$config") \
  --workdir=$(printf '%q' "$WORKDIR") $(printf '%q ' "${overrides[@]}")"
