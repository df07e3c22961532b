#!/usr/bin/env bash
# Run dspt_jax on every worker of a Cloud TPU VM pod slice (same command on all hosts; JAX finds its peers).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/caltech.py /mnt/shared/runs/caltech [--config.noise.rate=0.5 ...]
#
# Prerequisites on the workers: this repo checked out at ~/dspt_jax, `pip install -e ".[tpu]"`, CLIP weights
# and datasets reachable from every host (a shared bucket/NFS, or the same local path on each worker).
# The workdir must be one directory that every worker sees (NFS, Filestore, or a bucket mounted with gcsfuse at
# the same path on each worker): checkpoints, metrics and results are written with local file I/O, and
# gs:// URLs are refused.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n 2,8p "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ~/dspt_jax && python3 -m dspt_jax.main --distributed --config=$CONFIG --workdir=$WORKDIR $*"
