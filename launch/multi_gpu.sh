#!/usr/bin/env bash
# One process driving all GPUs of this host (jit shards the batch over them; no per-GPU processes needed).
#
#   launch/multi_gpu.sh configs/caltech.py runs/caltech [--config.noise.rate=0.5 ...]
#
# Multi-node: on each node (SLURM and Open MPI are detected by JAX; elsewhere give the three flags):
#   python -m dspt_jax.main --distributed --coordinator_address=host0:1234 --num_processes=2 \
#     --process_id=$RANK --config=... --workdir=<shared dir>
#
# Preemption: SIGTERM makes the run save a checkpoint and exit with status 143; this script then reruns the
# same command, which resumes from that checkpoint (at most DSPT_JAX_MAX_RESTARTS times, default 3).
set -euo pipefail
if [ $# -lt 2 ]; then
  # The usage text is the whole header comment above, so it cannot go stale or be cut short.
  awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0" >&2; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
# Keep TensorFlow (input pipeline only) off the GPUs and let XLA take what it needs.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# A SIGTERM sent to the whole process group reaches the run, which saves and exits 143; the script waits.
trap 'echo "multi_gpu.sh: SIGTERM passed on to the run" >&2' TERM
restarts=0
while true; do
  status=0
  python -m dspt_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" || status=$?
  if [ "$status" -ne 143 ] || [ "$restarts" -ge "${DSPT_JAX_MAX_RESTARTS:-3}" ]; then exit "$status"; fi
  restarts=$((restarts + 1))
  echo "multi_gpu.sh: preempted (exit 143); rerunning the same command to resume (restart $restarts)" >&2
done
