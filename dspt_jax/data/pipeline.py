"""tf.data input pipeline: a few-shot (noisy) training set and padded evaluation batches.

``load_task(cfg, workdir)`` reads the label tables of the dataset named by the config, draws the
training set with ``fewshot.select_train`` on the split's global label table (never on a host's
shard, so every host draws the same set) and writes the noise record into the workdir.
``train_batches`` / ``eval_batches`` yield numpy dicts, each host its slice of every global batch:

  image        float32 [b, S, S, 3], CLIP-normalized
  label        int32 [b]   training label (noisy for the training set), the dataset's label otherwise
  clean_label  int32 [b]   true label, -1 where unknown
  id           int64 [b]   stable example id (-1 on evaluation padding rows)
  mask         bool  [b]   False on padding rows (evaluation pads its last batch; training pads a
                           training set smaller than the batch up to a multiple of the devices)
  flipped      bool  [b]   train only: label != clean_label

Preprocessing follows CLIP / CoOp: evaluation resizes the shorter side to S (bicubic) and takes the
center crop; training takes a random resized crop (scale (0.08, 1), ratio (3/4, 4/3)) and a
horizontal flip, or the evaluation transform when augmentation is off.

Determinism: epoch e of training visits the examples in the permutation drawn from (seed, e);
the augmentation of a row depends only on (seed, global row number), so the global batch of a
step is the same whatever the number of hosts, and ``start_step`` resumes exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Any, Callable, Iterator, NamedTuple

import ml_collections
import numpy as np
import tensorflow as tf

from dspt_jax import files
from dspt_jax.data import config as config_lib
from dspt_jax.data import datasets, fewshot, noise, sources
from dspt_jax.data.config import CLIP_MEAN, CLIP_STD

# The accelerator belongs to JAX: TensorFlow here runs on the CPU only.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already started elsewhere in this process
    logging.getLogger(__name__).warning("could not hide the GPUs from TensorFlow (already initialized)")

log = logging.getLogger(__name__)

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_SHUFFLE_STREAM = 0x5348_5546  # keeps the epoch permutations apart from other uses of the seed
_VIEW_STREAM = 0x5649_4557  # and the per-epoch view draws of the image-feature cache


# ---------------------------------------------------------------------------------------------
# Preprocessing (tf, one image at a time)
# ---------------------------------------------------------------------------------------------


def _resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    # Antialiased bicubic is what PIL's bicubic resize (CLIP's transform) does when shrinking.
    out = tf.image.resize(
        tf.cast(image, tf.float32), tf.stack([height, width]), method="bicubic", antialias=True
    )
    # PIL hands back uint8: clip the bicubic overshoot and round.
    return tf.round(tf.clip_by_value(out, 0.0, 255.0))


def normalize(image: tf.Tensor) -> tf.Tensor:
    """Pixel values in [0, 255] -> (x / 255 - CLIP mean) / CLIP std, float32."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)


def resize_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """CLIP's test transform without the normalization: float32 [size, size, 3] in [0, 255].

    The shorter side becomes ``size`` (the longer one ``int(size * long / short)``, as torchvision)
    and the center crop uses torchvision's offset ``round((H - size) / 2)`` (round half to even).
    """
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = (size * long) // short
    nh = tf.where(h <= w, size, new_long)
    nw = tf.where(h <= w, new_long, size)
    resized = _resize(image, nh, nw)
    top = tf.cast(tf.round(tf.cast(nh - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(nw - size, tf.float32) / 2.0), tf.int32)
    out = resized[top : top + size, left : left + size, :]
    out.set_shape([size, size, 3])
    return out


def random_resized_crop(
    image: tf.Tensor,
    size: int,
    seed: tf.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = CROP_RATIO,
    flip: bool = True,
) -> tf.Tensor:
    """torchvision's RandomResizedCrop (+ horizontal flip), stateless: float32 [size, size, 3].

    Ten tries of an area fraction in ``scale`` and a log-uniform aspect ratio; the first box that fits
    is taken at a uniform position, else the central crop with the ratio clamped. ``seed``: int [2].
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = h * w
    target = area * tf.random.stateless_uniform([10], seeds[0], scale[0], scale[1])
    log_r = tf.random.stateless_uniform([10], seeds[1], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_r)
    cw = tf.round(tf.sqrt(target * aspect))
    ch = tf.round(tf.sqrt(target / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    u_i = tf.random.stateless_uniform([10], seeds[2])
    u_j = tf.random.stateless_uniform([10], seeds[3])
    ti = tf.floor(u_i * (h - ch + 1.0))
    tj = tf.floor(u_j * (w - cw + 1.0))
    first = tf.argmax(tf.cast(fits, tf.int32))
    # Fallback: the central crop with the aspect ratio clamped to ``ratio``.
    in_ratio = w / h
    fw = tf.where(in_ratio < ratio[0], w, tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
    fh = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    fi, fj = tf.floor((h - fh) / 2.0), tf.floor((w - fw) / 2.0)
    ok = tf.reduce_any(fits)
    box = [tf.cast(tf.where(ok, a[first], b), tf.int32)
           for a, b in ((ti, fi), (tj, fj), (ch, fh), (cw, fw))]
    crop = image[box[0] : box[0] + box[2], box[1] : box[1] + box[3], :]
    out = _resize(crop, size, size)
    if flip:
        out = tf.cond(
            tf.random.stateless_uniform([], seeds[4]) < 0.5,
            lambda: tf.reverse(out, axis=[1]),
            lambda: out,
        )
    out.set_shape([size, size, 3])
    return out


def eval_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [H, W, 3] -> CLIP test input float32 [size, size, 3]."""
    return normalize(resize_center_crop(image, size))


def train_image(image: tf.Tensor, size: int, seed: tf.Tensor, scale=(0.08, 1.0)) -> tf.Tensor:
    """uint8 [H, W, 3] -> CoOp train input (random resized crop + flip), float32 [size, size, 3]."""
    return normalize(random_resized_crop(image, size, seed, tuple(scale)))


# ---------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    """A dataset with its drawn training set, ready for ``train_batches`` / ``eval_batches``.

    Attributes:
      name, dataset_id: registry name; the id that names the noise record (adds the split file,
        the CIFAR-N column, ...).
      classnames, template, num_classes: CoOp's prompt-ready names and prompt template.
      selection: ``fewshot.TrainSelection`` over ``train_pool`` (indices into its label table).
      train: the selected examples (labels = training labels, clean = true labels or -1).
      val, test: evaluation examples (val: min(shots, 4) per class).
      train_pool: every training example the selection was drawn from.
      record, record_path: the noise record (and where it was written, if a workdir was given).
      image_size, augment, crop_scale: preprocessing defaults from the config.
      splits, test_as_coop: which splits were used, in words, and whether the test set is the one of
        CoOp's protocol (False: numbers are not comparable with CoOp-protocol tables; None: not CoOp data).
      skipped_images: the image files of your own data left out as unreadable, with why.
    """

    name: str
    dataset_id: str
    classnames: tuple[str, ...]
    template: str
    num_classes: int
    real_noise: bool
    selection: fewshot.TrainSelection
    train: sources.Examples
    val: sources.Examples
    test: sources.Examples
    train_pool: sources.Examples
    record: dict
    record_path: str | None
    image_size: int
    augment: bool
    crop_scale: tuple[float, float]
    splits: str = ""
    test_as_coop: bool | None = None
    # (path, reason) of the unreadable image files left out (data.bad_images="skip").
    skipped_images: tuple[tuple[str, str], ...] = ()
    _payloads: list | None = dataclasses.field(default=None, repr=False)

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def val_size(self) -> int:
        return len(self.val)

    @property
    def test_size(self) -> int:
        return len(self.test)

    @property
    def flipped(self) -> np.ndarray:
        return self.selection.flipped

    def examples(self, split: str) -> sources.Examples:
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; valid: 'train', 'val', 'test'")
        return getattr(self, split)

    def prompts(self) -> list[str]:
        return [self.template.format(c) for c in self.classnames]

    def train_payloads(self) -> list:
        """What the training images are read from (paths, encoded bytes or pixels), cached."""
        if self._payloads is None:
            self._payloads = self.train.pool.payloads(self.train.ids)
        return self._payloads


def _merge(base: ml_collections.ConfigDict, update: Any, where: str = "data") -> None:
    for key, value in update.items():
        if key not in base:
            raise ValueError(f"unknown config field {where}.{key}; valid: {sorted(base.keys())}")
        if isinstance(base[key], ml_collections.ConfigDict):
            _merge(base[key], value, f"{where}.{key}")
            continue
        try:
            base[key] = value
        except TypeError as e:  # ml_collections keeps each field's type
            raise ValueError(f"{where}.{key}={value!r} has the wrong type for this field ({e}); give a value of "
                             f"the type of its default") from None


def data_config(cfg: Any = None) -> ml_collections.ConfigDict:
    """``default_data_config()`` updated with ``cfg`` (a ConfigDict or dict); unknown fields fail."""
    out = config_lib.default_data_config()
    if cfg is not None:
        _merge(out, cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    if isinstance(out.shots, bool) or not isinstance(out.shots, int) or not (out.shots >= 1 or out.shots == -1):
        raise ValueError(f"data.shots must be an integer >= 1 or -1 (all), got {out.shots!r}")
    if not isinstance(out.image_size, int) or out.image_size < 1:
        raise ValueError(f"data.image_size must be a positive integer, got {out.image_size!r}")
    lo, hi = (float(x) for x in out.crop_scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {tuple(out.crop_scale)}")
    if out.bad_images not in sources.BAD_IMAGE_POLICIES:
        raise ValueError(f"data.bad_images must be one of {sources.BAD_IMAGE_POLICIES}, got {out.bad_images!r}")
    if not isinstance(out.noise.use_clean_labels, bool):
        raise ValueError(f"noise.use_clean_labels must be True or False, got {out.noise.use_clean_labels!r}")
    return out


def _noise_spec(cfg: ml_collections.ConfigDict) -> noise.NoiseSpec:
    n = cfg.noise
    return noise.NoiseSpec(kind=n.kind, rate=n.rate, num_flips=n.num_flips, transition=n.transition)


def _check_noise_for_data(name: str, real_noise: bool, spec: noise.NoiseSpec, use_clean_labels: bool) -> None:
    """Refuses a noise kind that does not fit whether the dataset ``name`` ships its own noisy labels."""
    if spec.kind == "real" and not real_noise:
        raise ValueError(
            f"noise.kind='real' trains on a dataset's own noisy labels, and {name!r} has none; "
            "datasets with real noise: cifar10n, cifar100n, food101n, csv (or set another noise.kind)"
        )
    if spec.kind == "real" and use_clean_labels:
        raise ValueError("noise.use_clean_labels=True asks for the dataset's clean labels and noise.kind='real' "
                         "for its noisy ones: set one of them")
    if real_noise and spec.kind not in ("none", "real") and not use_clean_labels:
        # Synthetic noise on data that has real noise replaces that noise: done only when asked for.
        raise ValueError(
            f"{name!r} has its own noisy labels (real noise), and noise.kind={spec.kind!r} would replace them "
            f"with synthetic noise on its clean labels. Set noise.kind='real' to train on its own labels, or "
            f"noise.use_clean_labels=True to start {spec.kind!r} from its clean labels."
        )


def _check_setting(cfg: ml_collections.ConfigDict, spec: noise.NoiseSpec) -> None:
    """Refuses, from the config alone (no data read), a noise setting that cannot work with the shots or
    with the dataset: a per-class kind that cannot be drawn, real noise where there is none (or synthetic
    noise where there is, unasked), a transition matrix of the wrong size."""
    if spec.kind in noise.PER_CLASS_KINDS:
        fewshot.flips_for(spec, cfg.shots)
    name = datasets.canonical_name(cfg.name)
    info = None if name in datasets.OWN_DATA_NAMES else datasets.get_dataset_info(name)
    real_noise = (name == "csv") if info is None else info.real_noise
    _check_noise_for_data(name, real_noise, spec, cfg.noise.use_clean_labels)
    if spec.kind == "matrix" and info is not None and spec.transition_matrix().shape[0] != info.num_classes:
        k = info.num_classes
        raise ValueError(f"noise.transition is {spec.transition_matrix().shape[0]}x"
                         f"{spec.transition_matrix().shape[0]} but {name} has {k} classes: give a {k} x {k} matrix")


def _user_classes(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the class list of ``cfg``'s dataset is the user's (your own data, an in-memory dataset) rather
    than a registry dataset's (CoOp's names, which partial or mock data may leave some classes of empty)."""
    name = datasets.canonical_name(cfg.name)
    return name in datasets.OWN_DATA_NAMES or datasets.get_dataset_info(name).kind == "arrays"


def _check_classes(src: sources.SourceData, labels: np.ndarray, shots: int, refuse_empty: bool, warn: bool) -> None:
    """Refuses (``refuse_empty``; else warns about) classes without a training example by ``labels``, the labels
    the sample is drawn by, and warns about classes with fewer than ``shots`` (CoOp's rule keeps all they have).
    ``warn`` False: no warnings (the start-up check; the load that follows gives them)."""
    k = len(src.classnames)
    counts = np.bincount(labels[labels >= 0], minlength=k)
    empty = [src.classnames[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        message = (f"{src.name}: {len(empty)} of the {k} classes have no training examples: {empty[:10]}"
                   f"{' ...' if len(empty) > 10 else ''}. Every class needs at least one training image")
        if refuse_empty:
            raise ValueError(f"{message}: add images of it, or remove the class (its folder, its rows, or its "
                             "name from the class list)")
        if warn:
            log.warning("%s (the data on disk is incomplete?)", message)
    short = np.flatnonzero(counts < shots)
    if warn and shots > 0 and short.size:
        listed = ", ".join(f"{src.classnames[c]!r}: {counts[c]}" for c in short[:10])
        log.warning("%s: %d of the %d classes have fewer training examples than data.shots=%d (%s%s); CoOp's rule "
                    "trains them on all they have. Lower data.shots to draw every class evenly.",
                    src.name, short.size, k, shots, listed, " ..." if short.size > 10 else "")


def _select(src: sources.SourceData, cfg, spec: noise.NoiseSpec, warn: bool = True) -> fewshot.TrainSelection:
    """``fewshot.select_train`` on the full training label table (every host draws the same). ``warn``: log
    what is accepted but worth knowing (False in the start-up check: the load that follows logs it)."""
    pool = src.train
    k = len(src.classnames)
    _check_noise_for_data(src.name, src.real_noise, spec, cfg.noise.use_clean_labels)
    refuse_empty = _user_classes(cfg)
    if spec.kind == "real":
        _check_classes(src, pool.labels, cfg.shots, refuse_empty, warn)
        return fewshot.select_train(pool.clean, k, cfg.shots, spec, cfg.seed, noisy_labels=pool.labels)
    if src.real_noise:
        if np.any(pool.clean < 0):
            raise ValueError(
                f"{src.name!r} ships noisy labels whose truth is not known for every training "
                f"example, so noise.kind={spec.kind!r} (which starts from clean labels) cannot be used; "
                "set noise.kind='real' to train on its own labels"
            )
        if warn:
            log.warning("%s has its own noisy labels; noise.kind=%r starts from its clean labels "
                        "(noise.kind='real' trains on the noisy ones)", src.name, spec.kind)
        _check_classes(src, pool.clean, cfg.shots, refuse_empty, warn)
        return fewshot.select_train(pool.clean, k, cfg.shots, spec, cfg.seed)
    _check_classes(src, pool.labels, cfg.shots, refuse_empty, warn)
    return fewshot.select_train(pool.labels, k, cfg.shots, spec, cfg.seed)


def _write_record(record: dict, workdir: str, process_index: int) -> str:
    path = files.join(workdir, "noise", record["name"] + ".json")
    if files.exists(path):
        # A resumed run must train on the very same labels: recompute and compare, never reuse.
        if not noise.records_equal(noise.load_record(path), record):
            raise ValueError(
                f"{path} holds other training labels than this run draws for the same setting "
                "(the data or the code changed); move it away to start afresh"
            )
    elif process_index == 0:
        noise.save_record(path, record)
    return path


def check_data(cfg: Any = None) -> None:
    """Raises what ``load_task(cfg)`` would raise, writing nothing: the trainer's start-up check, made before
    it writes into the workdir.

    Every dataset: the config's own consistency (fields, noise against shots and dataset) and whether the
    data is there (an unprepared tfds dataset, a missing folder, split file, CSV or listed image), reading no
    tfds label table. Your own data (name "folder" / "csv") and in-memory datasets, whose labels are cheap
    to read, are also read and drawn from, so their refusals (empty classes, a CSV's labels, a training set
    that cannot be drawn) come here; and every image file of your own data is decoded once
    (``sources.screen_images``: data.bad_images="fail" refuses the unreadable ones here, naming each).
    """
    cfg = data_config(cfg)
    spec = _noise_spec(cfg)
    _check_setting(cfg, spec)
    sources.check_available(cfg)
    if _user_classes(cfg):
        _draw(cfg, spec, check_images=True)


def _draw(cfg: ml_collections.ConfigDict, spec: noise.NoiseSpec, check_images: bool):
    """The source of ``cfg`` with its training set drawn and its validation set sampled: (source,
    selection, training examples, validation examples). ``check_images``: the start-up check (every image
    file of your own data decoded; no warnings, which the load that follows gives)."""
    src = sources.load_source(cfg, check_images=check_images)
    if len(src.test) == 0:
        raise ValueError(f"{src.name}: the test split is empty ({src.splits}); give it test images")
    sel = _select(src, cfg, spec, warn=not check_images)
    pool = src.train
    train = pool.subset(sel.indices, labels=sel.noisy, clean=sel.clean)
    if src.val is not None:
        val = src.val.subset(fewshot.sample_validation(src.val.labels, cfg.shots, cfg.seed))
    else:
        # No validation split: draw it from the training split, disjoint from the training set.
        picked = fewshot.sample_validation(pool.labels, cfg.shots, cfg.seed, exclude=sel.indices)
        val = pool.subset(picked)
    return src, sel, train, val


def load_task(cfg: Any = None, workdir: str | None = None, *, process_index: int = 0) -> Task:
    """Reads the dataset of ``cfg`` (the data config), draws the training set, records its labels.

    Args:
      cfg: ``config.data`` (fields of ``default_data_config``; missing ones take the defaults).
      workdir: where ``noise/<record_name>.json`` goes (written by process 0; if it exists, the
        freshly drawn labels must equal it).
      process_index: this host's index (only process 0 writes).
    """
    cfg = data_config(cfg)
    spec = _noise_spec(cfg)
    _check_setting(cfg, spec)
    # Every refusal comes before the record is written: a refused call leaves the workdir as it was.
    src, sel, train, val = _draw(cfg, spec, check_images=False)
    pool = src.train

    record = noise.make_record(
        src.dataset_id, "train", cfg.shots, spec, cfg.seed, num_classes=len(src.classnames),
        ids=train.ids, clean=sel.clean, noisy=sel.noisy, flipped=sel.flipped,
    )
    path = _write_record(record, workdir, process_index) if workdir else None
    return Task(
        name=src.name, dataset_id=src.dataset_id, classnames=tuple(src.classnames),
        template=src.template, num_classes=len(src.classnames), real_noise=src.real_noise,
        selection=sel, train=train, val=val, test=src.test, train_pool=pool, record=record,
        record_path=path, image_size=cfg.image_size, augment=bool(cfg.augment),
        crop_scale=tuple(float(x) for x in cfg.crop_scale), splits=src.splits, test_as_coop=src.test_as_coop,
        skipped_images=src.skipped,
    )


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def _check_hosts(global_batch_size: int, process_index: int, process_count: int) -> int:
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}"
        )
    return global_batch_size // process_count


def steps_per_epoch(task: Task, global_batch_size: int, examples_per_step: int | None = None) -> int:
    """Full global batches per pass over the training set (the last partial batch is dropped).
    ``examples_per_step``: the real examples of a step when the batch is padded (see ``train_batches``)."""
    return task.train_size // (examples_per_step or global_batch_size)


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order of the training examples in ``epoch`` (a function of (seed, epoch) only)."""
    return np.random.default_rng([int(seed), int(epoch), _SHUFFLE_STREAM]).permutation(size)


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
    opts = tf.data.Options()
    opts.deterministic = True
    return sources.without_autotune(ds.with_options(opts))


def _check_training_order(task: Task, global_batch_size, examples_per_step, seed, start_step, process_index,
                          process_count):
    """Checks the arguments that fix the order of training examples; returns (rows per host, real examples
    per step, steps per epoch)."""
    local = _check_hosts(global_batch_size, process_index, process_count)
    real = global_batch_size if examples_per_step is None else examples_per_step
    if not isinstance(real, (int, np.integer)) or not 1 <= real <= global_batch_size:
        raise ValueError(f"examples_per_step must be in [1, {global_batch_size}], got {examples_per_step!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(start_step, (int, np.integer)) or start_step < 0:
        raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
    if task.train_size < real:
        raise ValueError(f"the training set has {task.train_size} examples, fewer than {real} per step")
    return local, int(real), task.train_size // real


def _step_rows(perm: np.ndarray, j: int, real: int, first_row: int, local: int):
    """This host's rows of step ``j`` of an epoch ordered by ``perm``: (example positions, global positions,
    mask). Global positions >= ``real`` pad the batch to a multiple of the devices: they repeat the step's
    last example and are masked out of the loss, so the examples seen do not depend on the device count."""
    positions = first_row + np.arange(local, dtype=np.int64)
    ks = perm[j * real : (j + 1) * real][np.minimum(positions, real - 1)]
    return ks, positions, positions < real


def train_batches(
    task: Task,
    *,
    global_batch_size: int,
    seed: int,
    augment: bool | None = None,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
    examples_per_step: int | None = None,
) -> Iterator[dict]:
    """Endless training batches from step ``start_step`` on; this host's rows of each global batch.

    Global batch ``s`` holds rows ``(s % E) * N ... + N`` of ``epoch_permutation(seed, s // E)``
    (N = ``examples_per_step``, default the global batch B; E = ``steps_per_epoch``, the remainder of each
    epoch is dropped), then B - N padding rows with ``mask`` False (a training set smaller than the batch,
    padded to a multiple of the devices); host p yields rows ``p * B/P ... (p + 1) * B/P``. Example k of a
    step is augmented with the seed (seed, s * N + k) whatever B is. ``augment`` None takes the config's.
    """
    local, real, per_epoch = _check_training_order(task, global_batch_size, examples_per_step, seed, start_step,
                                                   process_index, process_count)
    m = task.train_size
    augment = task.augment if augment is None else bool(augment)
    size = image_size or task.image_size
    scale = task.crop_scale
    payloads = task.train_payloads()
    ex = task.train
    labels, clean, ids, flipped = ex.labels, ex.clean, ex.ids, task.flipped
    first_row = process_index * local

    spec = ex.pool.payload_spec

    def steps(from_step=int(start_step)):
        # One item per global step: this host's rows of it, as arrays (`prepare` transforms them in one
        # graph; yielding row by row made the Python generator the bottleneck of small-model training).
        step, epoch, perm = from_step, -1, None
        while True:
            e, j = divmod(step, per_epoch)
            if e != epoch:
                epoch, perm = e, epoch_permutation(seed, e, m)
            ks, positions, mask = _step_rows(perm, j, real, first_row, local)
            rows = step * real + positions  # seeds augmentation
            if spec.dtype == tf.string:
                batch_payloads = np.array([payloads[k] for k in ks], dtype=object)
            else:
                batch_payloads = np.stack([payloads[k] for k in ks])
            yield (rows, batch_payloads, labels[ks].astype(np.int64), clean[ks].astype(np.int64),
                   ids[ks].astype(np.int64), flipped[ks].astype(bool), mask)
            step += 1

    signature = (
        tf.TensorSpec([local], tf.int64),
        tf.TensorSpec([local, *spec.shape], spec.dtype),
        tf.TensorSpec([local], tf.int64),
        tf.TensorSpec([local], tf.int64),
        tf.TensorSpec([local], tf.int64),
        tf.TensorSpec([local], tf.bool),
        tf.TensorSpec([local], tf.bool),
    )
    to_image = ex.pool.to_image

    def image_of(row_and_payload):
        row, payload = row_and_payload
        image = to_image(payload)
        if augment:
            return train_image(image, size, tf.stack([tf.constant(int(seed), tf.int64), row]), scale)
        return eval_image(image, size)

    def prepare(rows, payloads, label, clean_label, example_id, flip, mask):
        # One tf.data element per step, its rows transformed inside one graph (the same per-row ops and
        # seeds as one element per row, bit for bit): 1.36x the images/s on the demo's 32 px images,
        # where per-element overhead made training wait for input.
        images = tf.map_fn(
            image_of,
            (rows, payloads),
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
            parallel_iterations=local,
        )
        return {
            "image": images,
            "label": tf.cast(label, tf.int32),
            "clean_label": tf.cast(clean_label, tf.int32),
            "id": example_id,
            "mask": mask,
            "flipped": flip,
        }

    def locate(batches_done):
        # This host's rows of the failing step (and a few after it, to be safe).
        found = itertools.islice(steps(int(start_step) + batches_done), 4)
        return _first_unreadable(ex.pool, (pair for item in found for pair in zip(item[4], item[1])))

    ds = tf.data.Dataset.from_generator(steps, output_signature=signature)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _options(ds.prefetch(2))
    return _numpy_batches(ds, what="training batches", locate=locate, pool=ex.pool)


def train_feature_batches(
    task: Task,
    features: np.ndarray,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    examples_per_step: int | None = None,
) -> Iterator[dict]:
    """``train_batches`` over precomputed image features instead of images (no TensorFlow involved).

    ``features`` [V, M, D]: V views of the M training examples, in ``task.train`` order (V = 1: one
    feature per image). Step ``s`` holds the same examples, in the same order, as step ``s`` of
    ``train_batches``; with V > 1 each example takes view ``view_draws(seed, epoch, M, V)[k]`` in that
    epoch, so every epoch sees one view of each image, drawn afresh. Yields ``image_features`` in place
    of ``image``; the other fields as ``train_batches``.
    """
    local, real, per_epoch = _check_training_order(task, global_batch_size, examples_per_step, seed, start_step,
                                                   process_index, process_count)
    m = task.train_size
    if features.ndim != 3 or features.shape[1] != m:
        raise ValueError(f"features must be [views, {m}, dim], got {features.shape}")
    ex = task.train
    first_row = process_index * local

    def batches():
        step, epoch = int(start_step), -1
        while True:
            e, j = divmod(step, per_epoch)
            if e != epoch:
                epoch, perm = e, epoch_permutation(seed, e, m)
                views = view_draws(seed, e, m, features.shape[0])
            ks, _, mask = _step_rows(perm, j, real, first_row, local)
            yield {
                "image_features": features[views[ks], ks],
                "label": ex.labels[ks].astype(np.int32),
                "clean_label": ex.clean[ks].astype(np.int32),
                "id": ex.ids[ks].astype(np.int64),
                "mask": mask,
                "flipped": task.flipped[ks].astype(bool),
            }
            step += 1

    return batches()  # a generator of its own, so that the checks above run at the call


def view_draws(seed: int, epoch: int, size: int, num_views: int) -> np.ndarray:
    """Which view of each training example (by position) epoch ``epoch`` uses: a function of
    (seed, epoch) only, so every host and every resume draws the same."""
    if num_views == 1:
        return np.zeros(size, np.int64)
    return np.random.default_rng([int(seed), int(epoch), _VIEW_STREAM]).integers(0, num_views, size)


# Defined with the sources, which refuse unreadable files of your own data up front (data.bad_images).
UnreadableImageError = sources.UnreadableImageError


_READ_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.DataLossError)


def _first_unreadable(pool: sources.Pool, items) -> tuple[int, str] | None:
    """(id, error) of the first (id, payload) in ``items`` whose image cannot be decoded, eagerly."""
    for example_id, payload in items:
        try:
            pool.to_image(tf.convert_to_tensor(payload))
        except _READ_ERRORS as e:
            return int(example_id), sources.op_error_text(e)
    return None


def _numpy_batches(
    ds: tf.data.Dataset,
    expected: int | None = None,
    what: str = "",
    locate: Callable[[int], tuple[int, str] | None] | None = None,
    pool: sources.Pool | None = None,
) -> Iterator[dict]:
    # A generator of its own, so that the checks above run when the caller asks for the iterator.
    # tf.data reports an undecodable image without saying which one; `locate(batches_done)` finds it by
    # decoding the examples of the failing batch one by one.
    count = 0
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            break
        except _READ_ERRORS as e:
            bad = locate(count) if locate else None
            if bad is None:
                raise
            example_id, message = bad
            where = pool.describe(example_id) if pool else f"example id {example_id}"
            raise UnreadableImageError(
                f"{what}: cannot read the image of {where}: {message}. Replace or remove the file "
                f"(a folder or CSV dataset), or re-prepare the dataset."
            ) from e
        count += 1
        yield batch
    if expected is not None and count != expected:
        raise RuntimeError(f"{what}: yielded {count} batches, expected {expected}; the data changed on disk?")


def num_eval_batches(task: Task, split: str, global_batch_size: int, process_count: int = 1) -> int:
    """Batches every host yields for ``split`` (the same on all hosts)."""
    local = _check_hosts(global_batch_size, 0, process_count)
    n = len(task.examples(split))
    return -(-(-(-n // process_count)) // local)


class View(NamedTuple):
    """Augmented view ``index`` (of ``count``) of every training image: the training transform (random
    resized crop + flip) seeded by ``(seed, -1 - (id * count + index))`` for the example ``id``, so a
    view depends only on (seed, example, view) and never collides with the per-row seeds of
    ``train_batches`` (which are >= 0)."""

    seed: int
    index: int
    count: int


def view_seed(view: View, example_id):
    """The stateless seed pair of ``view`` of ``example_id`` (an int or an int64 tensor)."""
    row = -1 - (example_id * view.count + view.index)
    return tf.stack([tf.constant(int(view.seed), tf.int64), tf.cast(row, tf.int64)])


def eval_batches(
    task: Task,
    split: str = "test",
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
    view: View | None = None,
) -> Iterator[dict]:
    """Every example of ``split`` exactly once over all hosts, in padded batches of B / P rows.

    Host p takes the contiguous share ``[p N / P, (p + 1) N / P)`` of the split (what
    ``tfds.split_for_jax_process`` does for a whole tfds split; tfds then reads only that slice) and
    pads it with ``mask=False`` rows (image 0, label 0, clean_label -1, id -1) to
    ``num_eval_batches`` batches, so all hosts run the same number of steps. Nothing is dropped.
    ``view``: the training transform of that augmented view instead of the test transform (the
    image-feature cache's ``views:N``).
    """
    local = _check_hosts(global_batch_size, process_index, process_count)
    if view is not None and not 0 <= view.index < view.count:
        raise ValueError(f"view index {view.index} is not in [0, {view.count})")
    ex = task.examples(split)
    n = len(ex)
    lo, hi = process_index * n // process_count, (process_index + 1) * n // process_count
    total = num_eval_batches(task, split, global_batch_size, process_count)
    size = image_size or task.image_size
    host = ex.subset(np.arange(lo, hi))
    to_image = ex.pool.to_image

    def prepare(streamed, expected):
        (example_id, payload), (want_id, label, clean_label) = streamed, expected
        with tf.control_dependencies([tf.debugging.assert_equal(example_id, want_id)]):
            if view is None:
                image = eval_image(to_image(payload), size)
            else:
                image = train_image(to_image(payload), size, view_seed(view, example_id), task.crop_scale)
        return {
            "image": image,
            "label": tf.cast(label, tf.int32),
            "clean_label": tf.cast(clean_label, tf.int32),
            "id": example_id,
            "mask": tf.constant(True),
        }

    expected = tf.data.Dataset.from_tensor_slices((host.ids, host.labels, host.clean))
    reuse = split == "train" and task._payloads is not None and isinstance(ex.pool, sources.TfdsPool)

    def cached(start, stop):  # (id, payload) of host positions [start, stop), from the training payloads
        return ((host.ids[p], task._payloads[lo + p]) for p in range(start, stop))

    if reuse:
        # Training has the encoded images in memory already: no second pass over the tfds split (which
        # re-reads every record up to the last selected one). Files and arrays are cheap to stream.
        streamed = tf.data.Dataset.from_generator(
            lambda: cached(0, hi - lo), output_signature=(tf.TensorSpec([], tf.int64), ex.pool.payload_spec)
        )
    else:
        streamed = ex.pool.stream(host.ids)
    ds = tf.data.Dataset.zip(streamed, expected)

    def locate(batches_done):
        # The failing batch and the next (not the rest of the split: an error that is not an image's,
        # such as the id check above, must not cost a pass over a large split before it is reported).
        start, stop = batches_done * local, min((batches_done + 2) * local, hi - lo)
        if reuse:
            items = cached(start, stop)
        else:
            items = ex.pool.stream(host.ids[start:stop]).as_numpy_iterator()
        return _first_unreadable(ex.pool, items)

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pad = {
        "image": tf.zeros([size, size, 3], tf.float32),
        "label": tf.constant(0, tf.int32),
        "clean_label": tf.constant(-1, tf.int32),
        "id": tf.constant(-1, tf.int64),
        "mask": tf.constant(False),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(total * local - (hi - lo)))
    ds = _options(ds.batch(local, drop_remainder=True).prefetch(2))
    return _numpy_batches(ds, total, f"{split} batches", locate=locate, pool=ex.pool)


__all__ = (
    "CLIP_MEAN",
    "CLIP_STD",
    "Task",
    "UnreadableImageError",
    "data_config",
    "epoch_permutation",
    "eval_batches",
    "eval_image",
    "load_task",
    "normalize",
    "num_eval_batches",
    "random_resized_crop",
    "resize_center_crop",
    "steps_per_epoch",
    "train_batches",
    "train_feature_batches",
    "train_image",
    "View",
    "view_draws",
    "view_seed",
)
