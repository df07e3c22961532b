#!/usr/bin/env bash
# Run dspt_jax on every worker of a Cloud TPU VM pod slice (same command on all hosts; JAX finds its peers).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/caltech.py gs://BUCKET/runs/caltech [--config.noise.rate=0.5 ...]
#
# Prerequisites on the workers: this repo checked out at ~/dspt_jax, `pip install -e ".[tpu]"`, CLIP weights
# and datasets reachable from every host (a shared bucket/NFS, or the same local path on each worker).
# The workdir must be one place that every worker sees: a gs:// bucket URL (written through etils.epath and
# orbax, with the workers' credentials), NFS, Filestore, or a bucket mounted with gcsfuse at the same path.
#
# Preemption: SIGTERM (a maintenance event) makes the run save a checkpoint on every worker at the same step
# and exit with status 143; this script then reissues the same command, which resumes from that checkpoint
# (at most DSPT_JAX_MAX_RESTARTS times, default 3).
set -euo pipefail
if [ $# -lt 4 ]; then
  # The usage text is the whole header comment above, so it cannot go stale or be cut short.
  awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0" >&2; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
# --command is one string that the worker's login shell parses again, so each argument is put in single quotes
# (a ' inside becomes '\''): it then arrives as exactly one argv entry whatever it holds (spaces, $, [], ;),
# in any POSIX shell.
quote() { local q=${1//\'/\'\\\'\'}; printf "'%s' " "$q"; }
args=$(for a in --distributed "--config=$CONFIG" "--workdir=$WORKDIR" "$@"; do quote "$a"; done)
restarts=0
while true; do
  status=0
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
    "cd ~/dspt_jax && python3 -m dspt_jax.main $args" || status=$?
  if [ "$status" -ne 143 ] || [ "$restarts" -ge "${DSPT_JAX_MAX_RESTARTS:-3}" ]; then exit "$status"; fi
  restarts=$((restarts + 1))
  echo "tpu_pod.sh: preempted (exit 143); reissuing the same command to resume (restart $restarts)" >&2
done
