"""CoOp prompt tuning of a frozen CLIP with DSPT or a baseline loss: state, jitted steps, loop, evaluation.

`train_and_evaluate(config, workdir)` is the whole run: zero-shot CLIP with the dataset's template, prompt
tuning on the (noisy) few-shot set, evaluation of the tuned prompt, `results.json`. The model, losses and
steps here import without TensorFlow; the data pipeline (TensorFlow) is imported inside the run only.

Parameters are two subtrees, {"prompt": ..., "clip": ...}. The optimizer is an `optax.multi_transform` with
CoOp's SGD on "prompt" and `set_to_zero` on "clip" (no optimizer state), and the gradient is taken with
respect to the prompt only, so the frozen towers cost no weight gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from dspt_jax import checkpointing, features, files, losses, methods, metrics, sharding
from dspt_jax import config as config_lib
from dspt_jax import tokenizer as tok_lib
from dspt_jax import model_source
from dspt_jax.models import prompt as prompt_lib
from dspt_jax.models.clip import CLIPModule, l2_normalize
from dspt_jax.models.loading import CLIP

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
log = logging.getLogger("dspt_jax")


def log_to_stdout() -> None:
    """Progress lines of the `dspt_jax` logger on stdout (absl owns the root logger, so attach directly).
    `train_and_evaluate` calls it unless the logger already has a handler (give it one to log elsewhere)."""
    if any(getattr(h, "_dspt_console", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler._dspt_console = True
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a step, and the checkpoint of that step is saved (already logged)."""

    exit_status = 130  # 128 + SIGINT, the shell's status of a Ctrl-C


class TrainingPreempted(TrainingInterrupted):
    """SIGTERM (a scheduler's or Cloud TPU's notice of preemption) stopped training after a step, on every
    host at the same step, and the checkpoint of that step is saved: rerun the same command to resume."""

    exit_status = 143  # 128 + SIGTERM: `launch/` scripts rerun the command on this status


@flax.struct.dataclass
class TrainState:
    """What training changes. One run's, or R runs' (`make_runs_step`: a leading run axis on every field but
    `step`, since the runs advance together)."""

    step: jax.Array
    prompt: dict
    opt_state: Any
    first_bad_step: jax.Array  # -1 while every loss has been finite; else the first step that was not


# ---------------------------------------------------------------------------------------------------------
# Configuration checks: cheap, before any weights or data are touched.


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for settings that cannot work, naming the field and the valid choices."""
    from dspt_jax.data import datasets, noise  # numpy only

    if config.data.name not in datasets.OWN_DATA_NAMES:
        datasets.canonical_name(config.data.name)  # unknown name -> ValueError listing the valid ones
    for loss in (config.loss, *config.get("compare_losses", ())):
        losses.get_loss_fn(loss, gce_q=config.gce_q)
    methods.get_method(config)
    noise.NoiseSpec(
        kind=config.noise.kind,
        rate=config.noise.rate,
        num_flips=config.noise.num_flips,
        transition=config.noise.transition,
    )
    noise.check_seed(config.seed)
    if features.parse_mode(config.image_features).augmented and not config.data.augment:
        raise ValueError(
            f"config.image_features={config.image_features!r} encodes augmented views, and config.data.augment "
            "is False: use image_features='cached' for features of the unaugmented images"
        )
    p = config.prompt
    prompt_lib.context_layout(p.n_ctx, p.csc, p.ctx_init, p.ctx_init_mode)
    if p.class_token_position not in prompt_lib.CLASS_TOKEN_POSITIONS:
        raise ValueError(
            f"config.prompt.class_token_position must be one of "
            f"{prompt_lib.CLASS_TOKEN_POSITIONS}, got {p.class_token_position!r}"
        )
    if config.model.compute_dtype not in DTYPES:
        raise ValueError(
            f"config.model.compute_dtype must be one of {sorted(DTYPES)}, got {config.model.compute_dtype!r}"
        )
    for field in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps", "checkpoint_every_steps"):
        if config[field] is not None and config[field] < 1:
            raise ValueError(f"config.{field} must be >= 1, got {config[field]}")
    if config.max_steps is not None and config.max_steps < 0:
        raise ValueError(f"config.max_steps must be >= 0, got {config.max_steps}")


class InputsNotFoundError(FileNotFoundError):
    """The run's model or data is not there; the message lists every missing input, each with its fix."""


def check_inputs(config: ml_collections.ConfigDict, check_model: bool = True) -> None:
    """Checks that the CLIP checkpoint and the dataset are there before any work (no weights or images are
    read), and reports both when both are missing, rather than the second only after the first is fixed."""
    from dspt_jax.data import pipeline  # TensorFlow lives there

    problems = []
    if check_model:
        try:
            model_source.check_source(config.model.source)
        except FileNotFoundError as e:
            problems.append(
                f"Model {config.model.source!r}: {e}\n(On the command line a local copy is "
                "--config.model.source=<its folder>.)"
            )
    try:
        pipeline.check_data(data_config(config))
    except (FileNotFoundError, ConnectionError) as e:  # not prepared, or cannot be prepared here
        problems.append(f"Dataset {config.data.name!r}: {e}")
    if problems:
        raise InputsNotFoundError(
            f"{len(problems)} input(s) of this run are missing:\n\n" + "\n\n".join(problems)
        )


def data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.data plus the run-level seed and noise, in the form the data layer takes."""
    cfg = ml_collections.ConfigDict(config.data.to_dict())
    cfg.seed = config.seed
    cfg.noise = ml_collections.ConfigDict(config.noise.to_dict())
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Optimizer.


def coop_lr_schedule(
    optim: ml_collections.ConfigDict, num_epochs: int, steps_per_epoch: int
) -> optax.Schedule:
    """Per-epoch learning rate as CoOp/Dassl: `warmup_lr` for the W warmup epochs, then cosine annealing over
    `num_epochs` restarted after the warmup (Dassl's warmup recount): epoch e >= W trains at
    0.5 * lr * (1 + cos(pi * (e - W) / num_epochs)), so the first epoch after warmup gets the full lr."""

    def schedule(step):
        epoch = step // steps_per_epoch
        cosine = 0.5 * optim.lr * (1 + jnp.cos(jnp.pi * (epoch - optim.warmup_epochs) / num_epochs))
        return jnp.where(epoch < optim.warmup_epochs, optim.warmup_lr, cosine)

    return schedule


def make_optimizer(
    config, steps_per_epoch: int, num_epochs: int | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """CoOp's SGD on the prompt, nothing on CLIP. `num_epochs` None: `config_lib.resolve_epochs(config)`."""
    if num_epochs is None:
        num_epochs, _ = config_lib.resolve_epochs(config)
    schedule = coop_lr_schedule(config.optim, num_epochs, steps_per_epoch)
    sgd = optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay),  # L2 as torch SGD's weight_decay
        optax.sgd(schedule, momentum=config.optim.momentum),
    )
    tx = optax.multi_transform(
        {"train": sgd, "frozen": optax.set_to_zero()}, {"prompt": "train", "clip": "frozen"}
    )
    return tx, schedule


# ---------------------------------------------------------------------------------------------------------
# Steps.


def logits_from_features(clip_params, image_features, class_features):
    scale = jnp.exp(clip_params["logit_scale"].astype(jnp.float32))
    return scale * l2_normalize(image_features) @ l2_normalize(class_features).T


# The batch entries that hold images: pixels (`computed`) or precomputed features (`cached`, `views:N`).
IMAGE_KEYS = ("image", "image_features")


def batch_image_features(module: CLIPModule, clip_params, batch) -> jax.Array:
    """The batch's image features: precomputed ones (`image_features`, an image-feature cache) or the
    image tower on `image`. Either way a constant of the prompt's gradient."""
    if "image_features" in batch:
        return batch["image_features"].astype(jnp.float32)
    return jax.lax.stop_gradient(module.apply({"params": clip_params}, batch["image"], method="encode_image"))


def make_runs_step(
    module: CLIPModule,
    spec: prompt_lib.PromptSpec,
    objectives,
    tx,
    *,
    shared_prefix: bool = True,
    class_sharding=None,
):
    """One step of R independent runs at once: (state, clip_params, frozen_embeds, loss_ids, batch, stream_ids)
    -> (state, metrics).

    Every field of `state` but `step` and every entry of `batch` carry a leading run axis R (its own prompt,
    optimizer state, examples, labels and mask); `loss_ids` int [R] picks each run's objective from
    `objectives` (no recompiling per loss). An objective is a method's (`methods.Objective`: `methods.plain`
    of a loss for plain prompt tuning); its `batch` is the run's batch with any per-example columns of its
    method. The images (`image`, or precomputed `image_features`) may instead carry a leading stream axis S
    with `stream_ids` int [R] naming each run's stream: runs that read the same images (a sweep's noise rates
    and losses of one seed) share one image-tower pass. `stream_ids` None: the images are per run (S = R).
    The runs share the frozen CLIP, the prompt layout and the learning-rate schedule, and nothing else: each
    run's update is exactly its own step alone (`make_train_step` is the R = 1 case). The text tower sees the
    R x K prompts as one batch. Metrics are [R].
    `shared_prefix` and `class_sharding`: how the text tower encodes the class prompts
    (`prompt.class_features`); neither changes the result beyond float rounding.
    """
    objectives = tuple(objectives)

    def per_example_loss(loss_id, logits_of, image_features, labels, batch):
        branches = [functools.partial(o, logits_of) for o in objectives]
        if len(branches) == 1:
            return branches[0](image_features, labels, batch)
        return jax.lax.switch(loss_id, branches, image_features, labels, batch)

    def one_run(prompt, opt_state, first_bad_step, loss_id, image_features, batch, step, clip_params, frozen_embeds):
        def loss_of(prompt):
            class_features = prompt_lib.class_features(
                module,
                clip_params,
                frozen_embeds,
                prompt["ctx"],
                spec,
                shared_prefix=shared_prefix,
                class_sharding=class_sharding,
            )
            logits_of = functools.partial(logits_from_features, clip_params, class_features=class_features)
            per_example, logits = per_example_loss(loss_id, logits_of, image_features, batch["label"], batch)
            loss = losses.masked_mean(per_example, batch["mask"])
            return loss, logits

        (loss, logits), grad = jax.value_and_grad(loss_of, has_aux=True)(prompt)
        # set_to_zero ignores its input: the zeros stand in for CLIP's (never computed) gradient and are
        # dead code after jit.
        grads = {"prompt": grad, "clip": jax.tree.map(jnp.zeros_like, clip_params)}
        updates, opt_state = tx.update(grads, opt_state, {"prompt": prompt, "clip": clip_params})
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        bad = (first_bad_step < 0) & ~jnp.isfinite(loss)
        step_metrics = {
            "loss": loss,
            "train_accuracy": losses.masked_mean(correct, batch["mask"]),
            "grad_norm": optax.global_norm(grad),
        }
        new = (optax.apply_updates(prompt, updates["prompt"]), opt_state, jnp.where(bad, step, first_bad_step))
        return new, step_metrics

    def runs_step(state: TrainState, clip_params, frozen_embeds, loss_ids, batch, stream_ids=None):
        images = {k: v for k, v in batch.items() if k in IMAGE_KEYS}
        batch = {k: v for k, v in batch.items() if k not in IMAGE_KEYS}
        image_features = jax.vmap(lambda x: batch_image_features(module, clip_params, x))(images)  # [S, B, D]
        if stream_ids is not None:
            image_features = image_features[stream_ids]  # [R, B, D]
        (prompt, opt_state, first_bad_step), step_metrics = jax.vmap(
            one_run, in_axes=(0, 0, 0, 0, 0, 0, None, None, None)
        )(state.prompt, state.opt_state, state.first_bad_step, loss_ids, image_features, batch, state.step,
          clip_params, frozen_embeds)
        new_state = state.replace(
            step=state.step + 1, prompt=prompt, opt_state=opt_state, first_bad_step=first_bad_step
        )
        return new_state, step_metrics

    return runs_step


def make_train_step(
    module: CLIPModule,
    spec: prompt_lib.PromptSpec,
    loss_fn,
    tx,
    *,
    shared_prefix: bool = True,
    class_sharding=None,
):
    """The step of one run: (state, clip_params, frozen_embeds, batch) -> (state, metrics), with `state` and
    `batch` as one run has them (no run axis), and a plain loss (logits, labels) -> [B]. It is
    `make_runs_step` with R = 1."""
    runs_step = make_runs_step(
        module,
        spec,
        (methods.plain(loss_fn),),
        tx,
        shared_prefix=shared_prefix,
        class_sharding=class_sharding,
    )

    def train_step(state: TrainState, clip_params, frozen_embeds, batch):
        runs, step_metrics = runs_step(
            stack_runs([state]), clip_params, frozen_embeds, jnp.zeros(1, jnp.int32), _stack([batch])
        )
        return _run_state(runs, 0), _take(step_metrics, 0)

    return train_step


def _true_labels(rows) -> np.ndarray:
    """Evaluation targets: the clean label where known, else the split's own label."""
    return np.where(rows["clean_label"] >= 0, rows["clean_label"], rows["label"])


def _class_prompts(template: str, classnames) -> list[str]:
    return [template.format(c.replace("_", " ")) for c in classnames]


# ---------------------------------------------------------------------------------------------------------
# Workdir files.


def _write_json(path: str, obj) -> None:
    """Written by process 0 only, atomically (`files.write_json`)."""
    if jax.process_index() == 0:
        files.write_json(path, obj)


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# Fields that do not change what a run computes: a workdir may be resumed with other values for them.
OPERATIONAL_FIELDS = frozenset(
    {
        "max_steps",
        "log_every_steps",
        "checkpoint_every_steps",
        "eval_batch_size",
        "eval_every_epochs",
        "zero_shot",
        "eval_train",
        "data.data_dir",
        "data.download",
        "model.shared_prefix",
        "model.shard_classes",
        "model.remat_text",
    }
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _as_json(obj):
    return json.loads(json.dumps(obj, default=files.json_default))


def config_mismatches(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """The fields of a workdir's saved config.json that differ from `config` (operational fields aside;
    fields only one side has are options added or removed since, not a different setting)."""
    want, got = _flatten(_as_json(config.to_dict())), _flatten(saved)
    return [
        f"{key}: workdir has {got[key]!r}, this run {want[key]!r}"
        for key in sorted(want.keys() & got.keys())
        if key not in OPERATIONAL_FIELDS and got[key] != want[key]
    ]


def _check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a workdir holding a run of another setting; writes nothing."""
    saved_path = files.join(workdir, "config.json")
    if files.exists(saved_path):  # resuming: it must be the same experiment
        problems = config_mismatches(files.read_json(saved_path), config)
        if problems:
            raise ValueError(
                f"{workdir} holds a run with a different setting ({'; '.join(problems)}). Use another "
                "workdir, or delete this one to start over."
            )


class WorkdirNotWritableError(OSError):
    """The run cannot write into its workdir (disk full, quota, read-only, permissions). Nothing good was
    overwritten (every file is written to a temporary name first), so the same command resumes once the
    cause is fixed."""


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _check_writable(workdir: str) -> None:
    """Refuses a local workdir that cannot be created or written, before anything is computed. (A bucket's
    permissions show at the first write, which fails before anything is overwritten.)"""
    if files.is_remote(workdir):
        return
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK) or not os.path.isdir(existing):
        raise WorkdirNotWritableError(
            errno.EACCES, f"workdir {workdir!r} cannot be written ({existing} is not a writable directory): "
            "choose another --workdir or fix its permissions")


def _last_checkpoint(workdir: str) -> str:
    steps = sorted(int(d) for d in files.listdir(files.join(workdir, "checkpoints")) if d.isdigit())
    return f"its last checkpoint, step {steps[-1]}, is intact" if steps else "it has no checkpoint yet"


@contextlib.contextmanager
def _reporting_write_failures(workdirs):
    """Turns a failed write in a workdir (disk full and the like) into WorkdirNotWritableError, whose message
    names the file, the cause, the checkpoint a rerun resumes from and what to do."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS or isinstance(e, WorkdirNotWritableError):
            raise
        where = "; ".join(f"{w}: {_last_checkpoint(w)}" for w in workdirs)
        raise WorkdirNotWritableError(
            e.errno, f"cannot write {e.filename or 'into the workdir'}: {os.strerror(e.errno)}. Nothing written "
            f"before was overwritten ({where}). Free space or fix the permissions, then rerun the same command "
            "to resume.") from e


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The workdir's config.json, written once the run is set up: a run refused before leaves no trace."""
    _write_json(files.join(workdir, "config.json"), config.to_dict())


def train_batch_size(config, train_size: int, n_dev: int) -> tuple[int, int]:
    """(global batch, real examples per step): CoOp's batch, or the whole training set in one step when it is
    smaller (1-2 shots on small datasets), then padded with masked rows to a multiple of the device count,
    so that every device count trains on the same examples."""
    real = min(config.batch_size, train_size)
    if real < 1:
        raise ValueError("the training set is empty")
    if real < config.batch_size:
        log.warning(
            "The training set has %d examples, fewer than batch_size=%d: each step trains on all %d.",
            train_size,
            config.batch_size,
            real,
        )
    return math.ceil(real / n_dev) * n_dev, real


class _StopSignals:
    """Turns Ctrl-C (SIGINT) and SIGTERM (preemption) into a flag checked between steps, so the state is never
    caught mid-update (the train step donates its input state) and a checkpoint of the last finished step can
    always be written. With several processes the flag is agreed on at log steps (see `requested`); a
    second Ctrl-C aborts at once, and on one host of several that leaves the others waiting in their next
    collective. `preempted`: a SIGTERM was among the signals. `sigterm=False` leaves SIGTERM to whoever
    handles it already (JAX's preemption service, see `_jax_preemption_service`)."""

    def __init__(self, sigterm: bool = True):
        self.raised = False
        self.preempted = False
        self._signals = (signal.SIGINT, signal.SIGTERM) if sigterm else (signal.SIGINT,)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self._signals}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGTERM:
            self.preempted = True
            if not self.raised:
                log.warning("SIGTERM (preemption?): stopping after this step (with several hosts: at the next "
                            "log step, all together) and saving a checkpoint.")
            self.raised = True
            return
        if self.raised:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.raised = True
        log.warning(
            "Ctrl-C: stopping after this step (with several hosts: at the next log step, all together) "
            "and saving a checkpoint (Ctrl-C again to abort)."
        )

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        return False

    def requested(self, sync_point: bool) -> bool:
        """Whether to stop after the current step. Ctrl-C on any host stops every host at the same step: a
        host going on alone would hang in the next collective (a checkpoint save, an evaluation). The hosts
        agree at `sync_point`s (log steps, where they sync anyway); a single process stops at once."""
        if jax.process_count() == 1:
            return self.raised
        if not sync_point:
            return False
        # 0: go on, 1: Ctrl-C, 2: SIGTERM somewhere; every host takes the most urgent.
        code = np.int32(self.raised) + np.int32(self.preempted)
        agreed = int(np.max(multihost_utils.process_allgather(code)))
        self.preempted |= agreed == 2
        return agreed > 0


def _jax_preemption_service(step: int) -> bool:
    """Whether JAX's preemption service runs (a multi-process run after `jax.distributed.initialize`, with
    `jax_enable_preemption_service` on, its default). It then owns SIGTERM: the host that gets one tells the
    others through the coordination service, and `multihost_utils.reached_preemption_sync_point` turns True on
    every host at the same step. Calling it with `step` (the first step of the loop, the same on every host)
    is the protocol's first call."""
    if jax.process_count() == 1:
        return False
    try:
        multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the service is disabled
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# The run's phases: set up, zero-shot, train, evaluate, write results.


@dataclasses.dataclass
class Run:
    """Everything a run's phases share, fixed once set up (the training state lives apart)."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    clip: CLIP
    module: CLIPModule
    clip_params: Any  # on the devices, replicated
    task: Any  # dspt_jax.data.pipeline.Task
    layout: prompt_lib.ContextLayout
    spec: prompt_lib.PromptSpec
    frozen_embeds: jax.Array  # token embeddings of the prompts, on the devices
    feature_mode: features.FeatureMode
    num_epochs: int
    epochs_rule: str
    batch_size: int  # global rows per step, padded to a multiple of the devices
    examples_per_step: int  # real examples per step
    steps_per_epoch: int
    total_steps: int

    @property
    def repl(self):
        return sharding.replicated(self.mesh)


def setup_run(config: ml_collections.ConfigDict, workdir: str, clip: CLIP | None, clip_params=None) -> Run:
    """Loads CLIP (unless given) and the task, and fixes the prompt layout and the schedule's numbers.
    `clip_params`: `clip.params` already on the devices (runs trained together share one copy)."""
    from dspt_jax.data import pipeline  # TensorFlow lives there

    mesh = sharding.make_mesh()
    n_dev = mesh.devices.size
    sharding.check_batch_size(config.batch_size, mesh)
    if clip is None:
        clip = model_source.load_clip(config.model.source, dtype=DTYPES[config.model.compute_dtype])
    elif clip.dtype != DTYPES[config.model.compute_dtype]:
        raise ValueError(
            f"the CLIP passed in computes in {clip.dtype}, the config asks for {config.model.compute_dtype}"
        )
    if clip.config.vision.image_size != config.data.image_size:
        raise ValueError(
            f"config.data.image_size={config.data.image_size} but the CLIP at "
            f"{config.model.source!r} takes {clip.config.vision.image_size} px images."
        )
    task = pipeline.load_task(data_config(config), workdir=workdir, process_index=jax.process_index())
    log.info(
        "Task %s: %d classes, %d train / %d test examples; CLIP %s on %d device(s)",
        task.name,
        task.num_classes,
        task.train_size,
        task.test_size,
        config.model.source,
        n_dev,
    )
    log.info("Splits: %s", task.splits)
    if task.test_as_coop is False:
        log.warning(
            "NOT COMPARABLE with CoOp-protocol tables: %s's test images on %s differ from CoOp's split "
            "(split_zhou_*.json). Put CoOp's split file where docs/DATA.md says (data.coop_root or $DATA) "
            "or set data.split_file.",
            task.name,
            task.splits,
        )
    batch_size, examples_per_step = train_batch_size(config, task.train_size, n_dev)
    steps_per_epoch = pipeline.steps_per_epoch(task, batch_size, examples_per_step)
    num_epochs, epochs_rule = config_lib.resolve_epochs(config)
    total_steps = num_epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    p = config.prompt
    layout = prompt_lib.context_layout(p.n_ctx, p.csc, p.ctx_init, p.ctx_init_mode)
    for note in layout.notes:
        log.info("Prompt: %s", note)
    spec = prompt_lib.build_prompt_spec(task.classnames, layout.n_ctx, p.class_token_position)
    vocab = clip.config.text.vocab_size
    if int(spec.token_ids.max()) >= vocab:  # an embedding lookup out of range would read NaN, not fail
        raise ValueError(
            f"the CLIP at {config.model.source!r} has a vocabulary of {vocab} tokens, but the class prompts "
            f"use token ids up to {int(spec.token_ids.max())} (CLIP's tokenizer has 49408): use a checkpoint "
            "with CLIP's vocabulary"
        )
    repl = sharding.replicated(mesh)
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        clip=clip,
        module=CLIPModule(clip.config, dtype=clip.dtype, remat_text=config.model.remat_text),
        clip_params=jax.device_put(clip.params, repl) if clip_params is None else clip_params,
        task=task,
        layout=layout,
        spec=spec,
        frozen_embeds=jax.device_put(clip.token_embeddings(spec.token_ids), repl),
        feature_mode=features.parse_mode(config.image_features),
        num_epochs=num_epochs,
        epochs_rule=epochs_rule,
        batch_size=batch_size,
        examples_per_step=examples_per_step,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def create_train_state(run: Run, tx: optax.GradientTransformation) -> TrainState:
    """The initial prompt (seeded by config.seed) and optimizer state, replicated over the mesh."""
    prompt = prompt_lib.init_context(
        jax.random.key(run.config.seed),
        run.spec,
        run.clip.config.text.hidden_size,
        csc=run.layout.csc,
        init_embeddings=prompt_lib.init_embeddings(run.clip, run.layout),
    )
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        prompt=prompt,
        opt_state=tx.init({"prompt": prompt, "clip": run.clip.params}),
        first_bad_step=jnp.full((), -1, jnp.int32),
    )
    return jax.device_put(state, run.repl)


class Evaluator:
    """Image features of the run's splits, encoded once and reused by every evaluation (zero-shot, per-epoch,
    final), and predictions against any class features."""

    def __init__(self, run: Run, shared: Evaluator | None = None, same_train: Evaluator | None = None):
        """`shared`: the evaluator of a run trained together with this one (`train_runs`: the same dataset,
        model, prompt layout and mesh), whose compiled programs and test and validation features this one
        reuses. `same_train`: the evaluator of a run of the same training set and seed (an input stream's
        first run), whose training-split features this one reuses with its own labels."""
        self._run = run
        self._shared = shared
        self._same_train = same_train
        if shared is not None:
            self._batch_size, self._encode, self._text = shared._batch_size, shared._encode, shared._text
        else:
            n_dev = run.mesh.devices.size
            self._batch_size = math.ceil(run.config.eval_batch_size / n_dev) * n_dev  # equal rows per device
            self._encode = jax.jit(
                lambda cp, images: run.module.apply({"params": cp}, images, method="encode_image"),
                in_shardings=(run.repl, sharding.batch_sharding(run.mesh)),
                out_shardings=sharding.batch_sharding(run.mesh),
            )
            self._text = jax.jit(
                lambda cp, fe, pr: prompt_lib.class_features(
                    run.module, cp, fe, pr["ctx"], run.spec, shared_prefix=run.config.model.shared_prefix
                ),
                out_shardings=run.repl,
            )
        self._rows: dict[str, dict] = {}

    def encoded(self, split: str, view=None) -> dict:
        """The split's image features (test transform, or an augmented training view), labels and ids."""
        from dspt_jax.data import pipeline

        if self._shared is not None and split != "train":
            return self._shared.encoded(split, view)
        if view is None and split in self._rows:
            return self._rows[split]
        if self._same_train is not None and split == "train" and view is None:
            rows = self._same_train.encoded(split)
            ex = self._run.task.train
            at = _example_positions(ex.ids)[rows["id"]]
            self._rows[split] = {**rows, "label": ex.labels[at].astype(rows["label"].dtype),
                                 "clean_label": ex.clean[at].astype(rows["clean_label"].dtype)}
            return self._rows[split]
        batches = pipeline.eval_batches(
            self._run.task,
            split,
            global_batch_size=self._batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            view=view,
        )
        rows = features.encode_split(self._encode, self._run.clip_params, batches, self._run.mesh)
        if view is None:
            self._rows[split] = rows
        return rows

    def class_features(self, prompt) -> jax.Array:
        return self._text(self._run.clip_params, self._run.frozen_embeds, prompt)

    def predict(self, class_features, split: str) -> dict:
        rows = self.encoded(split)
        return {**rows, "pred": features.predict(rows["features"], sharding.gather(class_features))}

    def metrics(self, class_features, split: str = "test") -> dict:
        rows = self.predict(class_features, split)
        return metrics.classification_metrics(_true_labels(rows), rows["pred"], self._run.task.num_classes)


def zero_shot_phase(run: Run, evaluator: Evaluator) -> dict | None:
    """Zero-shot CLIP with the dataset's template on the test split (read back when resuming)."""
    if not run.config.zero_shot:
        return None
    path = files.join(run.workdir, "zero_shot.json")
    if files.exists(path):  # a resumed run: computed before the interruption
        return files.read_json(path)
    t0 = time.time()
    task = run.task
    prompts = tok_lib.tokenize(_class_prompts(task.template, task.classnames))
    zero_shot = evaluator.metrics(jax.device_put(run.clip.encode_text(prompts), run.repl))
    zero_shot["template"] = task.template
    _write_json(path, zero_shot)
    log.info(
        "Zero-shot CLIP (%r): test accuracy %.4f, macro-F1 %.4f (%.1fs)",
        task.template,
        zero_shot["accuracy"],
        zero_shot["macro_f1"],
        time.time() - t0,
    )
    return zero_shot


def training_features(config, task, mode: features.FeatureMode, workdir: str, encoded, clip_params) -> np.ndarray:
    """The training set's image features [views, M, D] in `task.train` order, from the workdir's cache when
    its key matches, else encoded (`encoded(split, view)`, `Evaluator.encoded`) and saved by process 0. All
    hosts take the same branch (they encode together), so they agree on the cache before using it."""
    from dspt_jax.data import pipeline

    ex = task.train
    key = features.cache_key(
        model=config.model.source,
        weights=features.weights_fingerprint(clip_params),
        compute_dtype=config.model.compute_dtype,
        dataset=task.dataset_id,
        ids=ex.ids,
        image_size=task.image_size,
        crop_scale=task.crop_scale,
        mode=mode,
        seed=config.seed,
    )
    path = features.cache_path(workdir, mode)
    bank = features.load(path, key)
    usable = bank is not None
    if jax.process_count() > 1:
        usable = bool(np.all(multihost_utils.process_allgather(np.int32(usable))))
    if usable:
        log.info("Training image features (%s) reused from %s", mode, path)
        return bank
    t0 = time.time()
    if mode.augmented:
        task.train_payloads()  # read the images once for all views (a tfds split is not re-read per view)
        views = [pipeline.View(config.seed, v, mode.views) for v in range(mode.views)]
    else:
        views = [None]
    bank = np.stack([features.in_order(encoded("train", view), ex.ids) for view in views])
    log.info("Encoded %d view(s) of %d training images (%s) in %.1fs", len(views), len(ex), mode, time.time() - t0)
    if jax.process_index() == 0:
        features.save(path, key, bank)
    return bank


def training_input(run: Run, evaluator: Evaluator, start_step: int):
    """The endless training batches from `start_step` on: image features from the bank (cached, views:N)
    or augmented images (computed)."""
    from dspt_jax.data import pipeline

    common = dict(
        global_batch_size=run.batch_size,
        examples_per_step=run.examples_per_step,
        seed=run.config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if run.feature_mode.cached:
        bank = training_features(
            run.config, run.task, run.feature_mode, run.workdir, evaluator.encoded, run.clip_params
        )
        return pipeline.train_feature_batches(run.task, bank, **common)
    return pipeline.train_batches(run.task, augment=run.config.data.augment, **common)


def training_objective(config, verbose: bool = False) -> str:
    """The loss of plain prompt tuning (`method=coop`), else the method's name."""
    if config.method == "coop":
        return f"loss {config.loss}" if verbose else config.loss
    return f"method {config.method}" if verbose else config.method


def _json_number(x):
    """A float for results.json (which has no NaN): None when not a number."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _selection_path(run: Run, epoch: int) -> str:
    return files.join(run.workdir, "method", f"epoch_{epoch:04d}.npz")


def _read_selection(path: str) -> tuple[dict, dict]:
    """(per-example columns, stats) of a saved selection."""
    saved = files.read_npz(path)
    return {k: v for k, v in saved.items() if k != "stats"}, json.loads(str(saved["stats"]))


def _selection_record(run: Run, epoch: int, stats: dict) -> dict:
    """One entry of results.json["selections"]."""
    return {"epoch": epoch + 1, "step": epoch * run.steps_per_epoch, **stats}


def epoch_selection(run: Run, evaluator: Evaluator, method: methods.Method, prompt, epoch: int,
                    mid_epoch: bool) -> tuple[dict, dict]:
    """The per-example columns `method.select` makes for `epoch` (in `task.train` order) and their stats.

    Computed from the class probabilities of every training example under `prompt` on unaugmented images,
    and saved in <workdir>/method/epoch_NNNN.npz; read back from there when the epoch was selected before
    (a run resumed in the middle of the epoch trains on the same selection)."""
    path = _selection_path(run, epoch)
    if files.exists(path):
        return _read_selection(path)
    if mid_epoch:
        log.warning("No saved %s selection of epoch %d in %s: recomputed from the resumed prompt.",
                    method.name, epoch + 1, run.workdir)
    ex = run.task.train
    image_features = features.in_order(evaluator.encoded("train"), ex.ids)
    logits = logits_from_features(run.clip_params, jnp.asarray(image_features), evaluator.class_features(prompt))
    logits = np.asarray(logits, np.float64)  # softmax in float64: no probability underflows to 0 (log p)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))

    def previous(e: int):
        path = _selection_path(run, e)
        return _read_selection(path) if 0 <= e < epoch and files.exists(path) else None

    context = methods.SelectContext(epoch=epoch, seed=run.config.seed, previous=previous)
    columns, stats = method.select(np.exp(log_probs), ex.labels, ex.clean, context)
    stats = {k: _json_number(v) for k, v in stats.items()}
    log.info("%s selection for epoch %d%s: %s", method.name, epoch + 1, f" ({run.workdir})" if run.workdir else "",
             ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
    if jax.process_index() == 0:
        files.write_npz(path, stats=json.dumps(stats), **columns)
    return columns, stats


def saved_selections(run: Run, epochs: int) -> list[dict]:
    """The stats of the selections saved for the first `epochs` epochs (those a resumed run has done)."""
    paths = [(epoch, _selection_path(run, epoch)) for epoch in range(epochs)]
    return [_selection_record(run, epoch, _read_selection(path)[1]) for epoch, path in paths
            if files.exists(path)]


def _example_positions(ids: np.ndarray) -> np.ndarray:
    """A lookup table: example id -> its position in `ids`."""
    ids = np.asarray(ids, np.int64)
    lookup = np.zeros(int(ids.max()) + 1 if len(ids) else 1, np.int64)
    lookup[ids] = np.arange(len(ids))
    return lookup


def _run_rows(item: dict, labels: np.ndarray, columns: dict, positions: np.ndarray) -> dict:
    """A run's part of a step's host batch, without the images: its own labels and per-example columns of
    the rows of `item` (a batch of its input stream), found by example id (`positions`: id -> position in the
    run's `task.train`, whose `labels` these are), and the stream's padding mask."""
    rows = positions[item["id"]]
    return {"label": labels[rows], "mask": item["mask"], **{name: column[rows] for name, column in columns.items()}}


def _take(tree, r: int):
    """Run r's slice of a tree with a leading run axis."""
    return jax.tree.map(lambda x: x[r], tree)


def _stack(trees, xp=jnp):
    """Trees of equal structure -> one tree with a leading axis (`xp=np`: on the host)."""
    return jax.tree.map(lambda *xs: xp.stack(xs), *trees)


def stack_runs(states: list[TrainState]) -> TrainState:
    """Single-run states at one step -> the R-run state (`make_runs_step`)."""
    return TrainState(
        step=states[0].step,
        prompt=_stack([s.prompt for s in states]),
        opt_state=_stack([s.opt_state for s in states]),
        first_bad_step=jnp.stack([s.first_bad_step for s in states]),
    )


def _run_state(state: TrainState, r: int) -> TrainState:
    """Run r's single-run state out of the R-run state."""
    return state.replace(
        prompt=_take(state.prompt, r), opt_state=_take(state.opt_state, r), first_bad_step=state.first_bad_step[r]
    )


def _restore(runs: list[Run], checkpointers, states: list[TrainState]) -> list[TrainState]:
    """Each run's state at the latest step that every run has a readable checkpoint of (runs trained together
    save together; a kill between two runs' saves leaves the older common step), or the initial states.
    An unreadable checkpoint (a partial write, a damaged file) is skipped for the previous one, with a
    warning naming both steps; when none can be read, training starts over and says so."""
    common = sorted(set.intersection(*(set(c.steps) for c in checkpointers)), reverse=True)
    where = runs[0].workdir if len(runs) == 1 else f"{len(runs)} workdirs"
    if not common:
        if any(c.steps for c in checkpointers):
            log.warning("The runs' checkpoints have no step in common: every run starts over.")
        return states
    for i, step in enumerate(common):
        try:
            restored = [c.restore(s, step) for c, s in zip(checkpointers, states)]
        except Exception as e:  # noqa: BLE001 -- whatever orbax raises for a damaged checkpoint
            fallback = f"the previous one, step {common[i + 1]}" if i + 1 < len(common) else "none left"
            log.warning("Checkpoint of step %d in %s cannot be read (%s: %.200s); trying %s.",
                        step, where, type(e).__name__, e, fallback)
            continue
        log.info("Resumed from %s at step %d", where, step)
        for c in checkpointers:  # the unreadable ones, and any step not every run reached
            for newer in (s for s in c.steps if s > step):
                c.delete(newer)
        return restored
    log.warning("No checkpoint in %s can be read: training starts over from step 0.", where)
    return states


def input_stream(run: Run) -> tuple:
    """What a run's training images depend on: runs with equal keys read the same images in the same order
    with the same augmentation (the noise flips labels, not the draw), each with its own labels."""
    return run.config.seed, run.task.train.ids.tobytes()


def jit_runs_step(run: Run, objectives, tx):
    """`make_runs_step` for runs set up like `run`, jitted over its mesh: the batch's examples split over the
    devices, everything else replicated; the state is donated."""
    mesh, config = run.mesh, run.config
    split_classes = config.model.shard_classes and mesh.devices.size > 1
    return jax.jit(
        make_runs_step(
            run.module,
            run.spec,
            objectives,
            tx,
            shared_prefix=config.model.shared_prefix,
            class_sharding=sharding.batch_sharding(mesh) if split_classes else None,
        ),
        in_shardings=(run.repl, run.repl, run.repl, run.repl, sharding.run_batch_sharding(mesh), run.repl),
        out_shardings=(run.repl, run.repl),
        donate_argnums=(0,),
    )


class _RunInputs:
    """The training batches of runs trained together, on the devices. Runs of one seed and training set (a
    sweep's noise rates and losses: the noise flips labels, not the draw) read the same images in the same
    order with the same augmentation: one input pipeline, and one image-tower pass per step, per such stream
    (`input_stream`); each run looks its own labels and per-example columns up by example id."""

    def __init__(self, runs: list[Run], evaluators: list[Evaluator], start_step: int):
        lead = runs[0]
        keys = [input_stream(r) for r in runs]
        streams = list(dict.fromkeys(keys))
        self._stream_of = [streams.index(k) for k in keys]
        self.stream_ids = jax.device_put(jnp.asarray(self._stream_of, jnp.int32), lead.repl)
        self._pipelines = [training_input(runs[r], evaluators[r], start_step) for r in map(keys.index, streams)]
        self._positions = [_example_positions(run.task.train.ids) for run in runs]  # example id -> row of its task
        self._labels = [run.task.train.labels.astype(np.int32) for run in runs]
        self._image_key = "image_features" if lead.feature_mode.cached else "image"
        self._mesh, self._sharding = lead.mesh, sharding.run_batch_sharding(lead.mesh)
        self.wait_s = 0.0  # host time blocked getting batches onto the devices, in all

    @property
    def num_streams(self) -> int:
        return len(self._pipelines)

    def next(self, columns: list[dict]) -> dict:
        """The next step's batch, [R, rows, ...] ([S, rows, ...] for the images of the S streams): each
        run's labels, padding mask and `columns[r]` (its method's per-example columns, in task order)."""
        t0 = time.time()
        items = [next(it) for it in self._pipelines]
        local = _stack([_run_rows(items[s], self._labels[r], columns[r], self._positions[r])
                        for r, s in enumerate(self._stream_of)], np)  # this host's rows, on the host
        local[self._image_key] = np.stack([item[self._image_key] for item in items])
        batch = sharding.to_global(local, self._mesh, self._sharding)
        self.wait_s += time.time() - t0
        return batch

    def close(self) -> None:
        # Shut the endless pipelines down now, not whenever they are collected (a teardown at an unknown later
        # moment; each one used to wait for tf.data's autotuning thread, now off: sources.without_autotune).
        for it in self._pipelines:
            it.close()


class _Logbook:
    """What the training loop reports, per run: a log line and a metrics.jsonl record per log window, the
    per-epoch test accuracies (kept for results.json) and the methods' selection stats."""

    def __init__(self, runs: list[Run], step: int):
        self._runs = runs
        self.writers = [metrics.MetricWriter(r.workdir, enabled=jax.process_index() == 0, resume_step=step)
                        for r in runs]
        spe = runs[0].steps_per_epoch
        # A resumed run: the evaluations made before its checkpoint, as metrics.jsonl kept them (process 0, the
        # one that writes results.json); the one at the checkpoint's own step came after the save, so it is
        # made again (the writer does not log it twice).
        self.epoch_evals = [
            [{"step": rec["step"], "epoch": rec["step"] // spe, "test_accuracy": rec["test_accuracy"]}
             for rec in writer.records if "test_accuracy" in rec and rec["step"] < step]
            for writer in self.writers
        ]
        self._window, self._start, self._step, self._wait_s = [], time.time(), step, 0.0

    def start_clock(self) -> None:
        """The first window's rate counts from now (after the set-up's evaluations)."""
        self._start = time.time()

    def add(self, step_metrics) -> None:
        self._window.append(step_metrics)  # still on the devices: read at the window's end

    def write_window(self, step: int, lr: float, wait_s: float) -> None:
        """The window that ends at `step`: each run's mean metrics, the rate and the share of the window spent
        waiting for input (`wait_s`: the input's total wait so far)."""
        lead, runs = self._runs[0], self._runs
        host = jax.device_get(self._window)  # a host sync
        elapsed = max(time.time() - self._start, 1e-9)
        rate = (step - self._step) / elapsed
        common = dict(lr=lr, steps_per_sec=rate, epoch=(step - 1) // lead.steps_per_epoch,
                      input_wait_fraction=(wait_s - self._wait_s) / elapsed)
        for r, (run, writer) in enumerate(zip(runs, self.writers)):
            scalars = {k: float(np.mean([m[k][r] for m in host])) for k in host[0]}
            writer.write(step, {**scalars, **common})
            log.info(
                "%sstep %d/%d  epoch %d/%d  loss %.4f  train_acc %.3f  lr %.2e  %.2f steps/s  ETA %s",
                f"[{run.workdir}] " if len(runs) > 1 else "",
                step,
                lead.total_steps,
                common["epoch"] + 1,
                lead.num_epochs,
                scalars["loss"],
                scalars["train_accuracy"],
                lr,
                rate,
                _format_eta((lead.total_steps - step) / rate),
            )
        self._window, self._start, self._step, self._wait_s = [], time.time(), step, wait_s

    def write_evaluation(self, r: int, step: int, accuracy: float) -> None:
        epoch = step // self._runs[0].steps_per_epoch
        self.epoch_evals[r].append({"step": step, "epoch": epoch, "test_accuracy": accuracy})
        self.writers[r].write(step, {"test_accuracy": accuracy})
        log.info("%sepoch %d: test accuracy %.4f", f"[{self._runs[r].workdir}] " * (len(self._runs) > 1), epoch,
                 accuracy)

    def write_selection(self, r: int, step: int, stats: dict) -> None:
        self.writers[r].write(step, {f"selection_{k}": v for k, v in stats.items() if v is not None})

    def close(self) -> None:
        for w in self.writers:
            w.close()


def _check_finite(runs: list[Run], state: TrainState) -> None:
    """Raises FloatingPointError if a run has seen a non-finite loss. A host sync: at log and checkpoint steps."""
    bad = np.asarray(state.first_bad_step)
    for r in np.flatnonzero(bad >= 0)[:1]:
        run = runs[r]
        raise FloatingPointError(
            f"Non-finite loss at step {bad[r]} (loss={run.config.loss}, compute_dtype="
            f"{run.config.model.compute_dtype}). Try compute_dtype=float32 or a lower config.optim.lr; "
            f"the last finite checkpoint is in {run.workdir}/checkpoints."
        )


def _save(checkpointers, state: TrainState, step: int, force: bool = False) -> None:
    """Each run's checkpoint of `step` (its slice of the R-run state) in its own workdir."""
    for r, ckpt in enumerate(checkpointers):
        ckpt.save(step, _run_state(state, r), force=force)


def _evaluate_epoch(evaluators: list[Evaluator], state: TrainState, step: int, logbook: _Logbook) -> None:
    """Each run's test accuracy under its current prompt, logged as of `step`."""
    for r, evaluator in enumerate(evaluators):
        acc = evaluator.metrics(evaluator.class_features(_take(state.prompt, r)))["accuracy"]
        logbook.write_evaluation(r, step, acc)


def _select_epoch(runs: list[Run], evaluators: list[Evaluator], run_methods, state: TrainState, step: int,
                  logbook: _Logbook, selections: list[list]) -> list[dict]:
    """Each run's per-example columns for the epoch of `step` (`epoch_selection`); its stats go to
    `selections` and, at the epoch's first step, to metrics.jsonl (a run resumed mid-epoch logged them then)."""
    spe = runs[0].steps_per_epoch
    epoch, into = divmod(step, spe)
    columns = []
    for r, (run, evaluator, method) in enumerate(zip(runs, evaluators, run_methods)):
        cols, stats = epoch_selection(run, evaluator, method, _take(state.prompt, r), epoch, mid_epoch=into != 0)
        columns.append(cols)
        selections[r].append(_selection_record(run, epoch, stats))
        if into == 0:
            logbook.write_selection(r, step, stats)
    return columns


def train_phase(runs: list[Run], evaluators: list[Evaluator], states: list[TrainState], tx, schedule):
    """The training loop of R runs trained together by one jitted step (`make_runs_step`; R = 1 for a single
    run), from their checkpoint (or `states`) to `total_steps`: per run its log lines, metrics.jsonl,
    checkpoints and per-epoch evaluations, in its own workdir; Ctrl-C saves every run's checkpoint, then
    raises TrainingInterrupted. The runs share the mesh, CLIP, prompt layout and schedule (`check_group`).
    Returns each run's final single-run state and loop facts."""
    lead = runs[0]
    config, total, spe = lead.config, lead.total_steps, lead.steps_per_epoch
    run_methods = [methods.get_method(r.config) for r in runs]
    keys = sorted({m.key for m in run_methods}, key=repr)  # each distinct objective compiled in once
    objectives = [next(m.objective for m in run_methods if m.key == k) for k in keys]
    loss_ids = jnp.asarray([keys.index(m.key) for m in run_methods], jnp.int32)
    selecting = run_methods[0].select is not None  # runs trained together share their method (check_group)
    train_step = jit_runs_step(lead, objectives, tx)
    checkpointers = [
        checkpointing.Checkpointer(files.join(r.workdir, "checkpoints"), r.config.checkpoint_every_steps)
        for r in runs
    ]
    state = jax.device_put(stack_runs(_restore(runs, checkpointers, states)), lead.repl)
    step = int(state.step)
    # A resumed run: the earlier epochs' selections, as they were made.
    selections = [saved_selections(run, step // spe) if selecting else [] for run in runs]
    columns = [{} for _ in runs]  # the current epoch's per-example columns of each run's method
    inputs = _RunInputs(runs, evaluators, step)
    logbook = _Logbook(runs, step)
    log.info(
        "Training %d steps (%d per epoch, %d epochs by %s, batch %d), %s, image features %s%s, from step %d",
        total, spe, lead.num_epochs, lead.epochs_rule, lead.examples_per_step,
        training_objective(config, verbose=True) if len(runs) == 1 else f"{len(runs)} runs together",
        lead.feature_mode, f" ({inputs.num_streams} input streams)" if len(runs) > 1 else "", step,
    )
    every = spe * config.eval_every_epochs  # steps between evaluations; 0: none
    if every and 0 < step < total and step % every == 0:
        _evaluate_epoch(evaluators, state, step, logbook)
    logbook.start_clock()
    loop_start = time.time()
    try:
        jax_preemption = _jax_preemption_service(step)
        with _StopSignals(sigterm=not jax_preemption) as stop:
            interrupted, selected_epoch = False, -1
            while step < total and not interrupted:
                if selecting and step // spe != selected_epoch:
                    columns = _select_epoch(runs, evaluators, run_methods, state, step, logbook, selections)
                    selected_epoch = step // spe
                batch = inputs.next(columns)
                state, step_metrics = train_step(state, lead.clip_params, lead.frozen_embeds, loss_ids, batch,
                                                 inputs.stream_ids)
                step += 1
                logbook.add(step_metrics)
                log_step = step % config.log_every_steps == 0 or step == total
                if log_step:
                    _check_finite(runs, state)
                    logbook.write_window(step, float(schedule(step - 1)), inputs.wait_s)
                if checkpointers[0].should_save(step):
                    _check_finite(runs, state)  # never checkpoint a state that has seen a non-finite loss
                    _save(checkpointers, state, step)
                if every and step < total and step % every == 0:
                    _evaluate_epoch(evaluators, state, step, logbook)
                interrupted = stop.requested(log_step)
                if jax_preemption and not interrupted and multihost_utils.reached_preemption_sync_point(step):
                    # True on every host at this same step: a SIGTERM reached one of them.
                    log.warning("Preemption notice (JAX's preemption service): every host stops at step %d and "
                                "saves a checkpoint.", step)
                    stop.raised = stop.preempted = interrupted = True
            _check_finite(runs, state)
            if checkpointers[0].latest_step != step:
                _save(checkpointers, state, step, force=True)
            if interrupted or stop.requested(True):
                log.warning("%s at step %d; checkpoint saved, rerun with the same workdir to resume.",
                            "Preempted" if stop.preempted else "Interrupted", step)
                raise TrainingPreempted if stop.preempted else TrainingInterrupted
    finally:
        inputs.close()
        for c in checkpointers:
            c.close()
        logbook.close()
    loop_s = time.time() - loop_start
    loop = {
        "steps": step,
        "train_loop_s": loop_s,
        # Share of the training loop (its evaluations and checkpoints included) that the host spent getting
        # the next batches onto the devices: near 1, training is input-bound; near 0, the step is the bottleneck.
        "input_wait_fraction": inputs.wait_s / max(loop_s, 1e-9),
        "runs_together": len(runs),
        "input_streams": inputs.num_streams,
    }
    return [(_run_state(state, r), {**loop, "epoch_evals": logbook.epoch_evals[r], "selections": selections[r]})
            for r in range(len(runs))]


def evaluate_phase(run: Run, evaluator: Evaluator, state: TrainState) -> tuple[dict, dict | None]:
    """Saves the learned prompt (prompt.npz) and evaluates it: test metrics, and (config.eval_train) how it
    sees its own noisy training set."""
    task, spec = run.task, run.spec
    if jax.process_index() == 0:  # the learned prompt, reusable without orbax
        files.write_npz(
            files.join(run.workdir, "prompt.npz"),
            ctx=np.asarray(jax.device_get(state.prompt["ctx"])),
            classnames=np.asarray(task.classnames),
            token_ids=spec.token_ids,
            ctx_positions=spec.ctx_positions,
            eot_index=spec.eot_index,
        )
    class_features = evaluator.class_features(state.prompt)
    final = evaluator.metrics(class_features)
    log.info(
        "Tuned prompt (%s): test accuracy %.4f, macro-F1 %.4f", training_objective(run.config), final["accuracy"],
        final["macro_f1"],
    )
    if not run.config.eval_train:
        return final, None
    rows = evaluator.predict(class_features, "train")
    flipped = (rows["clean_label"] >= 0) & (rows["label"] != rows["clean_label"])
    diag = metrics.train_set_diagnostics(rows["pred"], rows["label"], rows["clean_label"], flipped)
    log.info(
        "Training set: clean-label accuracy %s, flipped examples fitted %d/%d",
        "n/a" if diag["accuracy_clean_labels"] is None else f"{diag['accuracy_clean_labels']:.4f}",
        diag["fitted_flipped"],
        diag["num_flipped"],
    )
    return final, diag


def results_record(run: Run, zero_shot, final, train_diag, loop: dict, wall_time_s: float) -> dict:
    """results.json: what was run (setting, splits, prompt, schedule) and what came out."""
    config, task = run.config, run.task
    return {
        "dataset": task.name,
        "num_classes": task.num_classes,
        "shots": config.data.shots,
        # Which train/val/test splits were used, and whether the test set is CoOp's protocol's.
        "splits": {"source": task.splits, "test_as_coop": task.test_as_coop,
                   # Image files of your own data left out as unreadable (data.bad_images="skip"); logged by name.
                   "skipped_images": len(getattr(task, "skipped_images", ()))},
        "method": config.method,
        # What tables name the run by: the loss of plain prompt tuning, else the method (whose own losses
        # replace config.loss; see dspt_jax/methods).
        "loss": training_objective(config),
        "gce_q": config.gce_q if config.method == "coop" and config.loss == "gce" else None,
        "noise": {
            "kind": config.noise.kind,
            "rate": config.noise.rate,
            "num_flips": config.noise.num_flips,
            # Relative to the workdir, so that a workdir can be moved or compared with another.
            "record": files.relative_to(getattr(task, "record_path", None), run.workdir),
        },
        "seed": config.seed,
        "model": config.model.source,
        # The context as trained (CoOp's ctx_init layout may set n_ctx and csc; see context_layout).
        "prompt": {**config.prompt.to_dict(), "n_ctx": run.layout.n_ctx, "csc": run.layout.csc},
        "steps": loop["steps"],
        "epochs": run.num_epochs,
        "epochs_rule": run.epochs_rule,
        "epochs_completed": loop["steps"] / run.steps_per_epoch,
        "batch_size": run.examples_per_step,
        # How training images reached the loss; anything but "computed" departs from CoOp's protocol.
        "image_features": str(run.feature_mode),
        "zero_shot": zero_shot,
        "final": final,
        "epoch_evals": loop["epoch_evals"],
        # Per epoch, what the method's selection kept (size; precision and recall against the clean labels).
        "selections": loop["selections"] or None,
        "train": train_diag,
        "wall_time_s": wall_time_s,
        "train_loop_s": loop["train_loop_s"],
        "input_wait_fraction": loop["input_wait_fraction"],
        # How many runs one jitted step trained together (sweep --vectorize); 1: this run alone. Of those,
        # runs of one seed shared an input stream (the same images, each with its own labels).
        "runs_together": loop["runs_together"],
        "input_streams": loop["input_streams"],
    }


# Settings that runs trained together may differ in; everything else must be equal (`check_group`).
RUN_AXIS_FIELDS = ("seed", "loss", "gce_q", "noise.")


def check_group(configs) -> None:
    """Raises ValueError unless the configs differ only in seed, loss and noise (and operational fields):
    the runs then share the data shapes, prompt layout, schedule and CLIP that one jitted step needs."""
    first = _flatten(_as_json(configs[0].to_dict()))
    for i, config in enumerate(configs[1:], 1):
        other = _flatten(_as_json(config.to_dict()))
        diff = [
            key for key in sorted(first.keys() | other.keys())
            if not key.startswith(RUN_AXIS_FIELDS) and key not in OPERATIONAL_FIELDS
            and first.get(key) != other.get(key)
        ]
        if diff:
            raise ValueError(
                f"runs trained together may differ in {', '.join(RUN_AXIS_FIELDS)}* only; run {i} differs from "
                f"run 0 in {', '.join(diff)}"
            )


def _check_runs_match(runs: list[Run]) -> None:
    """The tasks the runs drew must give them the same shapes (a per-class noise may leave a class short)."""
    lead = runs[0]
    for run in runs[1:]:
        facts = ("steps_per_epoch", "total_steps", "batch_size", "examples_per_step", "num_epochs")
        diff = [f for f in facts if getattr(run, f) != getattr(lead, f)]
        if diff or not np.array_equal(run.spec.token_ids, lead.spec.token_ids):
            raise ValueError(
                f"{run.workdir} cannot train together with {lead.workdir}: their tasks differ in "
                f"{', '.join(diff) or 'class prompts'}; train them one by one"
            )


def train_runs(configs, workdirs, clip: CLIP | None = None) -> list[dict]:
    """Trains R runs of one setting that differ only in seed, noise and loss together, one jitted step for
    all (`make_runs_step`), each with its own few-shot draw, labels, data order, prompt and workdir; writes
    and returns each run's results, exactly as `train_and_evaluate` would for that run alone (to float
    rounding; tests/test_runs.py). `clip`: as in `train_and_evaluate`."""
    start_time = time.time()
    if not log.handlers:  # called from Python: progress on stdout, as the command line prints it
        log_to_stdout()
    if len(configs) != len(workdirs) or not configs:
        raise ValueError(f"need one workdir per config, got {len(configs)} configs and {len(workdirs)} workdirs")
    for config in configs:
        validate_config(config)
    check_group(configs)
    check_inputs(configs[0], check_model=clip is None)
    for config in configs[1:]:  # each run draws its own training set (seed, noise): each is checked
        check_inputs(config, check_model=False)
    for config, workdir in zip(configs, workdirs):
        _check_workdir(config, workdir)
        _check_writable(workdir)
    with _reporting_write_failures(workdirs):
        lead = setup_run(configs[0], workdirs[0], clip)
        runs = [lead] + [setup_run(c, w, lead.clip, lead.clip_params) for c, w in zip(configs[1:], workdirs[1:])]
        _check_runs_match(runs)
        for config, workdir in zip(configs, workdirs):  # only now: set-up refusals leave the workdir as it was
            _write_config(config, workdir)
        streams = [input_stream(run) for run in runs]
        evaluators = []
        for r, run in enumerate(runs):
            first = streams.index(streams[r])  # the first run of its input stream
            evaluators.append(Evaluator(run, shared=evaluators[0] if r else None,
                                        same_train=evaluators[first] if first < r else None))
        zero_shots = [zero_shot_phase(run, e) for run, e in zip(runs, evaluators)]
        tx, schedule = make_optimizer(lead.config, lead.steps_per_epoch, lead.num_epochs)
        trained = train_phase(runs, evaluators, [create_train_state(run, tx) for run in runs], tx, schedule)
        all_results = []
        for run, evaluator, zero_shot, (state, loop) in zip(runs, evaluators, zero_shots, trained):
            final, train_diag = evaluate_phase(run, evaluator, state)
            results = results_record(run, zero_shot, final, train_diag, loop, time.time() - start_time)
            _write_json(files.join(run.workdir, "results.json"), results)
            all_results.append(results)
    return all_results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, clip: CLIP | None = None) -> dict:
    """Runs zero-shot evaluation, prompt tuning and final evaluation; returns (and writes) the results.

    `clip`: an already loaded CLIP for `config.model.source` (sweeps load it once for all their runs);
    None loads it. It is only read, never changed. The R = 1 case of `train_runs`.
    """
    return train_runs([config], [workdir], clip)[0]
