#!/bin/bash
# The GPU figures of the speed and run-axis work in one command, for a session lent an NVIDIA machine.
#
# That machine's image (docs: the device tool's KINDS.md) has Python 3.12 with jax (CUDA), flax, optax,
# orbax, chex, absl, torch and transformers, and reaches no network; it lacks ml_collections and ftfy, which
# travel as pure-Python wheels, and TensorFlow (too large to carry), so the trainer and the sweep cannot run
# there: the bench can (the model, the loss and the step import without TensorFlow). Here, once, in the
# repository's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl ml_collections==1.1.0 ftfy==6.3.1 wcwidth==0.9.4
# then through the device tool, carrying .whl, with a timeout of about 540 s:
#   bash benchmarks/gpu_check.sh
# It writes its logs to $OUT (or /tmp/gpu_check). What it measures:
#   1. our step beside the PyTorch CoOp step (on the GPU as well), ViT-B/16, 100 classes, batch 32, both
#      image-feature modes, float32 and bfloat16, and the whole 200-epoch Caltech101-shaped run estimated in
#      each mode (computed, cached, views:10, views:50);
#   2. 36 runs trained in one step (a grid of 6 noise rates x 3 seeds x 2 losses, 3 input streams) and that
#      grid's wall time estimated in each mode, against 36 runs one after another.
# Extra arguments go to both benches (a dry run on a CPU: PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
# --backbone=tiny --batch_size=8 --steps=1 --repeats=1).
set -uo pipefail
py=${PYTHON:-python3}
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --target /tmp/dspt_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/dspt_site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  "$py" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__,
torch.cuda.is_available())"; } 2>&1 | tee "$out/device.txt"
timeout 300 "$py" -m dspt_jax.bench --reference --estimate=caltech101 --dtype=float32,bfloat16 --steps=10 \
  --repeats=3 "$@" 2>&1 | grep -v "^I0000\|^WARNING: All log" | tee "$out/bench.log"
timeout 200 "$py" -m dspt_jax.bench --runs=1,36 --estimate=caltech101 --steps=10 --repeats=3 "$@" 2>&1 \
  | grep -v "^I0000\|^WARNING: All log" | tee "$out/grid.log"
