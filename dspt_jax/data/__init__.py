"""Data layer: dataset registry, few-shot sampling, label noise and the tf.data input pipeline.

TensorFlow is imported only when the pipeline is used, so ``from dspt_jax.data import noise`` (or
``fewshot``, ``datasets``, ``config``) works without it. Modules:

* ``datasets``: registry of datasets with CoOp's class names and templates (no TensorFlow).
* ``config``: ``default_data_config()``, the fields of ``config.data``.
* ``noise``, ``fewshot``: label-noise families and few-shot sampling (numpy).
* ``pipeline``: ``load_task``, ``train_batches``, ``eval_batches`` (tf.data).
* ``sources``, ``builders``, ``prepare``: reading tfds / folders / CSVs / split files; local tfds
  builders and their preparation command.
"""

import importlib
import os

# TensorFlow's C++ INFO lines (its CPU-feature and oneDNN notices at import, which absl's C++ logging
# prefixes with "All log messages before absl::InitializeLog() ...") are noise for a JAX program; warnings
# and errors still show. TensorFlow reads the level once, at import, and is imported only below this
# package, so setting it here covers use from Python. The command lines set it earlier, from --verbosity
# (dspt_jax/cli.py); a value already in the environment wins over this default.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# On CPUs where TensorFlow turns its oneDNN kernels on by default (AVX512-VNNI/BF16 ones, such as an AMD
# EPYC of our CI), it says so at import whatever TF_CPP_MIN_LOG_LEVEL asks. The input pipeline (decode,
# crop, flip, resize) has no matmul or convolution, the ops oneDNN speeds up; off, the pipeline runs the
# same kernels on every CPU and the notice is gone. TF_ENABLE_ONEDNN_OPTS=1 in the environment keeps them.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

_LAZY = {
    "load_task": "pipeline",
    "train_batches": "pipeline",
    "eval_batches": "pipeline",
    "steps_per_epoch": "pipeline",
    "num_eval_batches": "pipeline",
    "Task": "pipeline",
    "default_data_config": "config",
    "DATASETS": "datasets",
    "DatasetInfo": "datasets",
    "get_dataset_info": "datasets",
    "register_dataset": "datasets",
    "register_array_dataset": "datasets",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
