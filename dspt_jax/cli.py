"""What the command lines (`dspt_jax.main`, `dspt_jax.sweep`) share: a quiet console and refusals as messages.

* `setup_console()`: only the project's progress, warnings and errors reach the console, unless absl's
  `--verbosity` asks for more (`--verbosity=0`: absl's INFO lines and TensorFlow's C++ INFO lines too).
* `one_thread_per_tensorflow_op()`: TensorFlow runs each op of the input pipelines on one thread.
* `reporting_refusals()`: a run refused for its input (a bad config value, a missing file, one of the
  project's own errors) ends with one message on stderr and exit status 1, not a Python traceback, unless
  `--debug_tracebacks` is given. Anything else (a bug: TypeError, KeyError, ...) keeps its traceback.

Imports nothing heavy (absl only), so that the command lines can define their flags with it cheaply.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

from absl import flags
from absl import logging as absl_logging

_DEBUG_FLAG = "debug_tracebacks"

# absl's --verbosity (-3 fatal, -2 error, -1 warning, 0 info, 1+ debug) as TensorFlow's C++ level
# (TF_CPP_MIN_LOG_LEVEL: 0 everything, 1 no INFO, 2 no WARNING either, 3 no ERROR either).
_NATIVE_LEVEL = {-3: "3", -2: "2", -1: "1"}


def define_flags(flag_values: flags.FlagValues | None = None) -> None:
    """Defines --debug_tracebacks on `flag_values` (default absl's FLAGS), unless it is there already: both
    command lines define it, and both modules may be imported in one process."""
    fv = flags.FLAGS if flag_values is None else flag_values
    if _DEBUG_FLAG not in fv:
        flags.DEFINE_bool(
            _DEBUG_FLAG,
            False,
            "Print the Python traceback of an error that refuses the run (a bad config value, a missing file), "
            "not its message alone.",
            flag_values=fv,
        )


def native_log_level(verbosity: int | None) -> str:
    """TF_CPP_MIN_LOG_LEVEL for absl's --verbosity (None: not given)."""
    if verbosity is None:
        return "1"
    if verbosity >= 0:
        return "0"
    return _NATIVE_LEVEL.get(verbosity, "3")


def setup_console(flag_values: flags.FlagValues | None = None) -> None:
    """The console of a command line: the `dspt_jax` progress lines on stdout; from absl's Python logging
    (orbax, JAX, tfds) and TensorFlow's C++ logging, warnings and errors only, unless --verbosity was given.

    Call it first in main(), before anything imports TensorFlow (only `dspt_jax.data.pipeline` and the
    modules beside it do, inside the run). TensorFlow reads TF_CPP_MIN_LOG_LEVEL once, at import, where it
    logs its CPU-feature notice at INFO, which absl's C++ logging prefixes with 'All log
    messages before absl::InitializeLog() is called are written to STDERR'. Level 1, the default, hides
    INFO and nothing else: a real TensorFlow warning or error still shows (behind absl's one-line preamble,
    which cannot be hidden without hiding the warning with it). A TF_CPP_MIN_LOG_LEVEL already in the
    environment is kept, unless --verbosity is given: the flag is the explicit ask of this command.

    XLA (jaxlib) reads the same variable when JAX is imported, which is before flags are parsed (the
    package and the config files import JAX), so --verbosity cannot reach it; its INFO lines are off
    unless the environment asks for them (`TF_CPP_MIN_LOG_LEVEL=0 python -m dspt_jax.main ...`)."""
    fv = flags.FLAGS if flag_values is None else flag_values
    verbosity_given = fv["verbosity"].present
    level = native_log_level(fv["verbosity"].value if verbosity_given else None)
    if verbosity_given:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = level
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", level)
        # absl's default, INFO, would let orbax's and JAX's per-step chatter through.
        absl_logging.set_verbosity(absl_logging.WARNING)
    from dspt_jax.train import log_to_stdout  # here, not at the top: this module stays light

    log_to_stdout()


def one_thread_per_tensorflow_op() -> None:
    """TensorFlow's intra-op pool to one thread (TF_NUM_INTRAOP_THREADS=1), unless the environment sets it.

    The input pipelines already work on several examples at once (tf.data's parallel map, and `tf.map_fn`
    over the rows of a step); splitting each small op of an example (a crop, a resize, a gather) over the
    cores as well only made the threads contend with each other and with XLA's. tf.data's own per-pipeline
    limit (`threading.max_intra_op_parallelism = 1`) changed nothing measurable here: the `tf.map_fn`
    iterations run on other threads than the one it scopes. Measured on 2 CPU cores (the README's sweep of
    the synthetic world's 32 px images, 80 epochs): the sequential sweep's training loops 44 -> 37 s for 4
    points, the vectorized sweep's loop 30 -> 33 steps/s. TensorFlow reads the variable when it starts its
    runtime, so this must run before the first TensorFlow op; a program importing the library keeps its own
    setting."""
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")


def is_refusal(error: BaseException) -> bool:
    """Whether `error` refuses the run for its input, so that its message is the whole answer: a ValueError
    (config validation), a FileNotFoundError (missing data, model or split file), or one of the project's
    own error classes (each names the field or file and what to do). A ValueError can also be a bug deep in
    a library (a shape mismatch, say): the message then says how to get its traceback."""
    if isinstance(error, (ValueError, FileNotFoundError)):
        return True
    return isinstance(error, Exception) and type(error).__module__.split(".")[0] == "dspt_jax"


@contextlib.contextmanager
def reporting_refusals(ctrl_c_message: str, flag_values: flags.FlagValues | None = None):
    """Runs the body of a command line's main(); turns what it raises into a console message and an exit
    status: a refusal (`is_refusal`) -> its message on stderr, status 1 (with --debug_tracebacks, the
    traceback, which ends with the message); a stop by Ctrl-C or SIGTERM that the trainer reported -> the
    status it carries; any other Ctrl-C -> `ctrl_c_message`, status 130. Other errors propagate with their
    traceback."""
    fv = flags.FLAGS if flag_values is None else flag_values
    try:
        yield
    except KeyboardInterrupt as e:
        status = getattr(e, "exit_status", None)  # train.TrainingInterrupted: it has said where its checkpoint is
        if status is None:  # a second Ctrl-C, or one outside the training loop
            print(f"Aborted (Ctrl-C); {ctrl_c_message}", file=sys.stderr)
            status = 130
        sys.exit(status)
    except Exception as e:
        if not is_refusal(e):
            raise
        if _DEBUG_FLAG in fv and fv[_DEBUG_FLAG].value:
            traceback.print_exc()  # ends with the message; the exit status stays that of a refusal
        else:
            print(f"\nError: {e}\n(--{_DEBUG_FLAG} prints where it was raised)", file=sys.stderr)
        sys.exit(1)
