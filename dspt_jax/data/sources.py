"""Where examples come from: tfds builders, CoOp split files, image folders, CSVs, in-memory arrays.

Every source is turned into the same shape: for each of train / val (optional) / test an
``Examples`` table (stable int64 ids, given labels, clean labels) plus a ``Pool`` that can read the
image of any id. Only label tables are read up front; images are read by the input pipeline.

Example ids are stable: the position of the example in the canonical (unshuffled) order of its tfds
split (with the splits of a builder laid end to end when a CoOp split file mixes them), or its index
in the sorted file list, the CoOp split file or the CSV.

Nothing here downloads: a tfds dataset that is not prepared fails at once with the dataset name,
the expected directory and the command that prepares it (unless ``config.download`` is True).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from typing import Any, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dspt_jax.cache import cache_root
from dspt_jax.data import datasets as ds_lib

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_TABLE_BATCH = 8192


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset is not on disk (and downloading was not asked for)."""


class UnreadableImageError(ValueError):
    """An example's image cannot be read or decoded (a corrupt, truncated, empty or missing image file, or
    undecodable image bytes in a tfds record)."""


# ---------------------------------------------------------------------------------------------
# Image pools: read the image of an example id
# ---------------------------------------------------------------------------------------------


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, 3] (JPEG with the accurate IDCT, as PIL)."""
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


class Pool:
    """Images addressed by example id.

    ``stream(ids)`` is a tf.data.Dataset of (id int64, payload) in the order of the sorted ``ids``;
    ``payloads(ids)`` the same payloads as a Python list (kept in memory for training);
    ``to_image(payload)`` turns a payload into uint8 [H, W, 3] inside tf.data.
    """

    payload_spec: tf.TensorSpec = tf.TensorSpec([], tf.string)

    def stream(self, ids: np.ndarray) -> tf.data.Dataset:
        raise NotImplementedError

    def payloads(self, ids: np.ndarray) -> list:
        raise NotImplementedError

    def to_image(self, payload: tf.Tensor) -> tf.Tensor:
        return decode_image(payload)

    def describe(self, example_id: int) -> str:
        """Where example ``example_id`` comes from, for error messages."""
        return f"example id {int(example_id)}"


class FilePool(Pool):
    """Image files; the payload is the path (the file is read when the example is used)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = np.asarray([os.fspath(p) for p in paths], dtype=object)

    def stream(self, ids):
        ids = np.asarray(ids, np.int64)
        paths = self.paths[ids].astype(str) if ids.size else np.zeros((0,), str)
        return tf.data.Dataset.from_tensor_slices((ids, tf.constant(paths, tf.string)))

    def payloads(self, ids):
        return [str(p) for p in self.paths[np.asarray(ids, np.int64)]]

    def to_image(self, payload):
        return decode_image(tf.io.read_file(payload))

    def describe(self, example_id):
        return f"example id {int(example_id)}, file {self.paths[int(example_id)]}"


class ArrayPool(Pool):
    """In-memory uint8 images [N, H, W, 3]; the payload is the pixel array itself."""

    def __init__(self, images: np.ndarray):
        self.images = images
        self.payload_spec = tf.TensorSpec([None, None, 3], tf.uint8)

    def stream(self, ids):
        ids = np.asarray(ids, np.int64)
        images = self.images

        def gen():
            for i in ids:
                yield i, images[i]

        return tf.data.Dataset.from_generator(
            gen, output_signature=(tf.TensorSpec([], tf.int64), self.payload_spec)
        )

    def payloads(self, ids):
        return [self.images[i] for i in np.asarray(ids, np.int64)]

    def to_image(self, payload):
        return payload


def without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` without tf.data's autotuning thread: deleting an iterator waits for that thread's next wake-up,
    which backs off to seconds (measured: 3-13 s per training pipeline closed, after 60-300 steps). AUTOTUNE
    then means tf.data's default parallelism (the CPU count, at most 16); the demo's steps/s are the same.
    Every pipeline of this package goes through it."""
    opts = tf.data.Options()
    opts.autotune.enabled = False
    return ds.with_options(opts)


def _read_config() -> tfds.ReadConfig:
    # One file at a time: examples come in the canonical order, so positions are stable ids.
    return tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)


def _image_decoders(builder) -> dict:
    return {
        k: tfds.decode.SkipDecoding()
        for k, f in builder.info.features.items()
        if isinstance(f, tfds.features.Image)
    }


class TfdsPool(Pool):
    """Examples of a tfds builder; ``parts`` are its splits laid end to end: (name, offset, size)."""

    def __init__(self, builder, parts: Sequence[tuple[str, int, int]], image_feature: str = "image"):
        self.builder = builder
        self.parts = list(parts)
        self.image_feature = image_feature

    def _split(self, split: str) -> tf.data.Dataset:
        return self.builder.as_dataset(
            split=split, shuffle_files=False, decoders=_image_decoders(self.builder),
            read_config=_read_config(),
        )

    def stream(self, ids):
        ids = np.asarray(ids, np.int64)
        key = self.image_feature
        out = None
        for name, offset, size in self.parts:
            local = ids[(ids >= offset) & (ids < offset + size)] - offset
            if local.size == 0:
                continue
            first, last = int(local[0]), int(local[-1])
            if last - first + 1 == local.size:
                # A contiguous run (a whole split, or one host's share of it): tfds reads just it.
                split = name if (first == 0 and last == size - 1) else f"{name}[{first}:{last + 1}]"
                part = self._split(split).enumerate(start=offset + first)
                part = part.map(lambda i, ex: (i, ex[key]))
            else:
                member = np.zeros(last + 1, bool)
                member[local] = True
                member_t = tf.constant(member)
                part = self._split(name).take(last + 1).enumerate()
                part = part.filter(lambda i, ex: tf.gather(member_t, i))
                part = part.map(lambda i, ex, o=offset: (i + o, ex[key]))
            out = part if out is None else out.concatenate(part)
        if out is None:
            out = tf.data.Dataset.from_tensor_slices(
                (tf.zeros([0], tf.int64), tf.zeros([0], tf.string))
            )
        return out

    def describe(self, example_id):
        for name, offset, size in self.parts:
            if offset <= example_id < offset + size:
                return (f"example id {int(example_id)}: tfds {self.builder.name} "
                        f"{name}[{int(example_id) - offset}] in {self.builder.data_dir}")
        return f"example id {int(example_id)} (not in {self.builder.name})"

    def payloads(self, ids):
        ids = np.asarray(ids, np.int64)
        found = {}
        for i, data in without_autotune(self.stream(ids)).as_numpy_iterator():
            found[int(i)] = data
        missing = [int(i) for i in ids if int(i) not in found]
        if missing:
            raise ValueError(f"{self.builder.name}: {len(missing)} examples not found, e.g. ids {missing[:5]}")
        return [found[int(i)] for i in ids]


# ---------------------------------------------------------------------------------------------
# Image files that cannot be read (your own data: data.bad_images)
# ---------------------------------------------------------------------------------------------

BAD_IMAGE_POLICIES = ("fail", "skip")
_IMAGE_CHECK_VERSION = 1
_LISTED = 10  # unreadable files named in a message; the rest are counted


def op_error_text(error: tf.errors.OpError) -> str:
    """The first line of a TensorFlow op error, without the graph-function and op names around it."""
    text = str(error.message).strip().splitlines()[0] if str(error.message).strip() else type(error).__name__
    return re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", text).strip()


def _decode_error(path: str) -> str:
    """Why ``path`` does not decode, in the pipeline's own words (eager, one file)."""
    try:
        decode_image(tf.io.read_file(path))
    except tf.errors.OpError as e:
        return f"cannot be decoded (truncated, or not an image): {op_error_text(e)}"
    return "could not be decoded when checked (read error?), decodes now"


def _decode_all(paths: Sequence[str]) -> dict[str, str]:
    """{path: reason} for the files that ``decode_image`` (the pipeline's decoder) refuses; each file is
    decoded once, in parallel inside tf.data, and only the failures are decoded again to get the reason."""
    if not paths:
        return {}
    ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), tf.constant(list(paths))))
    # The shape depends on the decoded pixels, so the decode cannot be optimized away.
    ds = ds.map(lambda i, p: (i, tf.shape(decode_image(tf.io.read_file(p)))[0]),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ok = np.zeros(len(paths), bool)
    for i, _ in without_autotune(ds.ignore_errors()).as_numpy_iterator():
        ok[i] = True
    return {paths[i]: _decode_error(paths[i]) for i in np.flatnonzero(~ok)}


def _cached_decode_failures(files: list[tuple[str, int, int]]) -> dict[str, str]:
    """``_decode_all`` over (path, size, mtime_ns) ``files``, kept in the project cache (``image_checks/``)
    under a hash of the whole list: a run over unchanged files decodes nothing; any change decodes all."""
    key = json.dumps([_IMAGE_CHECK_VERSION, files], separators=(",", ":"))
    path = os.path.join(cache_root(), "image_checks", hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        with open(path) as f:
            return {str(p): str(reason) for p, reason in json.load(f)}
    except (OSError, ValueError, TypeError):  # absent, partial or foreign: decode again
        pass
    failures = _decode_all([p for p, _, _ in files])
    tmp = None
    try:  # temporary name + rename: concurrent runs and a crash never leave half a file under the name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump(sorted(failures.items()), f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:  # a read-only or full cache costs time on the next run, never this one
        log.warning("could not cache the image check at %s: %s", path, e)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return failures


def find_unreadable(paths: Sequence[str]) -> list[tuple[int, str]]:
    """(position, reason) of every file of ``paths`` that the input pipeline cannot turn into an image:
    missing, not a file, empty (0 bytes), or refused by the decoder (truncated, not an image). Grey-scale,
    CMYK, 16-bit and palette images decode (to 8-bit RGB) and pass. Decoding results are cached by the
    name, size and mtime of the files (see ``_cached_decode_failures``)."""
    found: dict[int, str] = {}
    files = []
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            found[i] = "missing (no such file)"
            continue
        if not stat.S_ISREG(st.st_mode):
            found[i] = "not a regular file"
        elif st.st_size == 0:
            found[i] = "empty file (0 bytes)"
        else:
            files.append((str(p), int(st.st_size), int(st.st_mtime_ns)))
    failures = _cached_decode_failures(files)
    # By position, not by name: a CSV may list one file twice.
    found.update((i, failures[str(p)]) for i, p in enumerate(paths) if str(p) in failures)
    return sorted(found.items())


def _listing(items: Sequence[tuple[str, str]]) -> str:
    lines = [f"  {p}: {reason}" for p, reason in items[:_LISTED]]
    if len(items) > _LISTED:
        lines.append(f"  ... and {len(items) - _LISTED} more")
    return "\n".join(lines)


def screen_images(src: "SourceData", what: str, policy: str, report: bool = True) -> "SourceData":
    """``src`` (your own data: one FilePool) with its unreadable image files found (``find_unreadable``) and,
    by ``policy`` (data.bad_images), refused ("fail": UnreadableImageError naming each file) or left out of
    every split ("skip": logged, and listed in ``src.skipped``). Example ids are unchanged, so the ids of
    the readable files do not depend on which files are broken. A source none of whose files can be read
    is refused whatever the policy: its folder or paths are wrong, not its images. ``report``: log the
    skipped files (the start-up check does not: the load that follows logs them)."""
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.bad_images must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
    parts = {k: getattr(src, k) for k in ("train", "val", "test") if getattr(src, k) is not None}
    ids = np.unique(np.concatenate([ex.ids for ex in parts.values()]))
    paths = [str(p) for p in src.train.pool.paths[ids]]
    bad = find_unreadable(paths)
    if not bad:
        return src
    items = [(paths[i], reason) for i, reason in bad]
    if len(bad) == ids.size:
        raise UnreadableImageError(
            f"{what}: none of its {ids.size} image files can be read:\n{_listing(items)}\nCheck data.folder "
            "(relative paths start there) and the paths."
        )
    if policy == "fail":
        raise UnreadableImageError(
            f"{what}: {len(bad)} of its {ids.size} image files cannot be read:\n{_listing(items)}\nReplace or "
            "delete these files, or set data.bad_images='skip' to train and evaluate without them (each "
            "skipped file is then logged, and counted)."
        )
    if report:
        log.warning("%s: leaving out %d of its %d image files, which cannot be read (data.bad_images='skip'):\n%s",
                    what, len(bad), ids.size, _listing(items))
    bad_ids = ids[[i for i, _ in bad]]
    kept = {k: ex.subset(np.flatnonzero(~np.isin(ex.ids, bad_ids))) for k, ex in parts.items()}
    return dataclasses.replace(src, **kept, skipped=tuple(items))


# ---------------------------------------------------------------------------------------------
# Label tables
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Examples:
    """One split: ids (sorted, unique), given labels (noisy for real-noise data), clean labels.

    ``clean`` is -1 where unknown. For data without label noise ``clean == labels``.
    """

    pool: Pool
    ids: np.ndarray
    labels: np.ndarray
    clean: np.ndarray

    def __post_init__(self):
        self.ids = np.asarray(self.ids, np.int64)
        self.labels = np.asarray(self.labels, np.int64)
        self.clean = np.asarray(self.clean, np.int64)
        n = self.ids.shape[0]
        if self.labels.shape != (n,) or self.clean.shape != (n,):
            raise ValueError(f"ids, labels, clean differ in length: {n}, {self.labels.shape}, {self.clean.shape}")
        if n > 1 and np.any(np.diff(self.ids) <= 0):
            raise ValueError("example ids must be sorted and unique")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def subset(self, positions: Any, labels: Any = None, clean: Any = None) -> "Examples":
        """The examples at ``positions`` (sorted), optionally with replaced labels."""
        pos = np.asarray(positions, np.int64)
        return Examples(
            self.pool,
            self.ids[pos],
            self.labels[pos] if labels is None else labels,
            self.clean[pos] if clean is None else clean,
        )


@dataclasses.dataclass
class SourceData:
    """A dataset ready for few-shot selection."""

    name: str
    dataset_id: str  # names the noise record: dataset plus what changes its examples
    classnames: tuple[str, ...]
    template: str
    real_noise: bool
    train: Examples
    val: Examples | None
    test: Examples
    # Which splits these are, in words (set by `load_source`), and whether the test set is the one of
    # CoOp's protocol (None: data CoOp never used, e.g. your own folder).
    splits: str = ""
    test_as_coop: bool | None = None
    # (path, reason) of the image files left out as unreadable (data.bad_images="skip").
    skipped: tuple[tuple[str, str], ...] = ()


def coop_carve(labels: np.ndarray, num_classes: int, seed: int) -> tuple[np.ndarray, ...]:
    """CoOp's split of data without one: per class 50% train, 20% val, rest test (seeded, fixed).

    Returns sorted positions (train, val, test). Python's round, as CoOp.
    """
    parts = ([], [], [])
    for c in range(num_classes):
        pos = np.flatnonzero(labels == c)
        pos = np.random.default_rng([int(seed), c]).permutation(pos)
        n_train, n_val = round(pos.size * 0.5), round(pos.size * 0.2)
        parts[0].append(pos[:n_train])
        parts[1].append(pos[n_train : n_train + n_val])
        parts[2].append(pos[n_train + n_val :])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts)


def _norm_key(path: str) -> str:
    return path.replace("\\", "/").lstrip("/").lower()


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# tfds
# ---------------------------------------------------------------------------------------------


def default_data_dir(data_dir: str | None) -> str:
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _builder(info: ds_lib.DatasetInfo, cfg: Any):
    """The tfds builder of ``info`` in the config's data_dir, prepared or not."""
    if info.tfds_name.startswith("coop_"):
        from dspt_jax.data import builders  # noqa: F401  (registers the local builders)
    return tfds.builder(info.tfds_name, data_dir=default_data_dir(cfg.get("data_dir")))


def tfds_builder(info: ds_lib.DatasetInfo, cfg: Any):
    """The prepared tfds builder of ``info``; fails fast (no network) if it is not prepared."""
    builder = _builder(info, cfg)
    data_dir = default_data_dir(cfg.get("data_dir"))
    name = info.tfds_name
    if builder.is_prepared():
        return builder
    if cfg.get("download"):  # fails within seconds without network, with the command to run elsewhere
        from dspt_jax.data import prepare

        return prepare.prepare_builder(info.name, builder, cfg.get("folder"))
    how = info.prepare.format(data_dir=data_dir)
    coop = ""
    if info.coop_split_file:
        coop = (
            f"\nOr use CoOp's own files, without tfds: $DATA/{info.coop_dir}/{info.coop_split_file} and "
            f"$DATA/{info.coop_dir}/{info.coop_image_dir} are found with DATA set (or data.coop_root=$DATA), "
            f"or set data.folder and data.split_file to them."
        )
    raise DatasetNotPreparedError(
        f"Dataset '{info.name}' (tfds '{name}') is not prepared: expected it in "
        f"{builder.data_dir}\nNothing is downloaded here (data.download=False). Prepare it with:\n"
        f"  {how}{coop}\nSee docs/DATA.md."
    )


def _tfds_table(builder, split: str, fields: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns ``fields`` of every example of ``split``, in canonical order (images not decoded).

    Reading them means reading every record of the split (the images are in the same records), which
    for ImageNet's train split is the whole 140 GB; so the columns are kept in the project cache
    (``tfds_tables/``), keyed by the builder directory, the split, the fields and the name, size and
    mtime of every file of the prepared dataset: rebuilding or touching the data invalidates them.
    """
    fields = list(dict.fromkeys(fields))
    path = _table_cache_path(builder, split, fields)
    if path:
        try:
            with np.load(path, allow_pickle=False) as f:
                table = {k: f[k] for k in fields}
            log.info("%s %s: label table from the cache (%s)", builder.name, split, path)
            return table
        except Exception:  # noqa: BLE001 -- absent, truncated, empty or foreign: read the split, rewrite it
            pass
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders=_image_decoders(builder), read_config=_read_config()
    )
    ds = without_autotune(ds.map(lambda ex: {k: ex[k] for k in fields}).batch(_TABLE_BATCH).prefetch(1))
    cols = {k: [] for k in fields}
    for batch in ds.as_numpy_iterator():
        for k in fields:
            cols[k].append(batch[k])
    table = {
        k: np.concatenate(v) if v else np.zeros((0,), object if k != "label" else np.int64)
        for k, v in cols.items()
    }
    if path:
        _write_table(path, table)
    return table


_TABLE_CACHE_VERSION = 1


@functools.lru_cache(maxsize=64)
def _data_fingerprint(data_dir: str) -> tuple | None:
    """(name, size, mtime) of every file of a prepared tfds dataset directory, listed once per process
    (one stat per shard: ~1100 for ImageNet, slow on GCS); None without record files."""
    try:
        files = []
        for name in sorted(tf.io.gfile.listdir(data_dir)):
            st = tf.io.gfile.stat(os.path.join(data_dir, name))
            if not st.is_directory:
                files.append((name, int(st.length), int(st.mtime_nsec)))
    except (tf.errors.OpError, OSError):
        return None
    if not any(".tfrecord" in n or ".array_record" in n for n, _, _ in files):
        return None
    return tuple(files)


def _table_cache_path(builder, split: str, fields: Sequence[str]) -> str | None:
    """Where the cached columns of (builder, split, fields) live; None when the dataset has no record
    files to fingerprint (tfds' mock data in tests, for example): then nothing is cached."""
    files = _data_fingerprint(str(builder.data_dir))
    if files is None:
        return None
    key = json.dumps(
        {"v": _TABLE_CACHE_VERSION, "dir": str(builder.data_dir), "split": split, "fields": list(fields),
         "files": files},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return os.path.join(cache_root(), "tfds_tables", f"{builder.name}-{digest}.npz")


def _write_table(path: str, table: dict[str, np.ndarray]) -> None:
    # Text columns (file names) are stored as bytes arrays so that loading needs no pickle. Written to a
    # temporary name, synced and renamed: concurrent runs (hosts of a pod, a sweep) and a crash never
    # leave half a file under the final name.
    def as_bytes(x):
        return x if isinstance(x, bytes) else str(x).encode("utf-8")

    arrays = {k: (np.asarray([as_bytes(x) for x in v], dtype=bytes) if v.dtype == object else v)
              for k, v in table.items()}
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared cache
        os.replace(tmp, path)
        tmp = None
    except OSError as e:  # a read-only or full cache costs speed, never the run
        log.warning("could not cache the label table at %s: %s", path, e)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _tfds_source(info: ds_lib.DatasetInfo, cfg: Any) -> SourceData:
    builder = tfds_builder(info, cfg)
    source_names = builder.info.features["label"].names
    to_class = info.map_source_labels(source_names)
    label_column = None
    if info.noisy_columns:
        label_column = cfg.get("label_column") or info.noisy_columns[0]
        if label_column not in builder.info.features or label_column == "label":
            raise ValueError(
                f"{info.name}: label_column {label_column!r} is not a noisy label column; valid: "
                f"{list(info.noisy_columns)}"
            )
    dataset_id = info.name + (f"-{label_column}" if label_column else "")
    if cfg.get("split_file"):
        return _tfds_with_split_file(info, cfg, builder, to_class, dataset_id)

    def read(split: str, offset: int = 0, noisy: bool = False):
        fields = ["label"] + ([label_column] if noisy else [])
        table = _tfds_table(builder, split, fields)
        n = table["label"].shape[0]
        clean = to_class[table["label"].astype(np.int64)]
        given = to_class[table[label_column].astype(np.int64)] if noisy else clean
        keep = np.flatnonzero((clean >= 0) & (given >= 0))  # classes CoOp drops
        return n, keep + offset, given[keep], clean[keep]

    splits = [info.train_split] + [s for s in (info.val_split, info.test_split) if s]
    parts, tables, offset = [], {}, 0
    for split in splits:
        n, ids, given, clean = read(split, offset, noisy=bool(label_column) and split == info.train_split)
        parts.append((split, offset, n))
        tables[split] = (ids, given, clean)
        offset += n
    pool = TfdsPool(builder, parts)
    train = Examples(pool, *tables[info.train_split])
    val = Examples(pool, *tables[info.val_split]) if info.val_split else None
    if info.test_split:
        test = Examples(pool, *tables[info.test_split])
    else:
        tr, va, te = coop_carve(train.clean, info.num_classes, cfg.get("split_seed", 0))
        train, val, test = train.subset(tr), train.subset(va), train.subset(te)
        dataset_id += f"-carve{cfg.get('split_seed', 0)}"
    return SourceData(info.name, dataset_id, info.classnames, info.template, info.real_noise,
                      train, val, test)


def read_split_file(path: str) -> tuple[dict, dict[int, str]]:
    """CoOp's split_zhou json -> ({"train"|"val"|"test": [(path, label)]}, {label: prompt-ready name})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path} does not exist (data.split_file)")
    with open(path) as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise ValueError(
                f"{path}: not a JSON file ({e}); data.split_file must be a CoOp split_zhou_*.json"
            ) from None
    missing = [k for k in ("train", "val", "test") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: not a CoOp split file (data.split_file), missing the parts {missing}; it needs "
                         '"train", "val" and "test" lists of [path, label, classname]')
    names: dict[int, str] = {}
    out = {}
    for part in ("train", "val", "test"):
        entries = []
        for item in data[part]:
            if len(item) != 3:
                raise ValueError(f"{path}: {part} entry {item!r} is not [path, label, classname]; fix that entry")
            p, y, c = item
            y = int(y)
            if y < 0:
                raise ValueError(f"{path}: negative label {y} in {part} (entry {item!r}); labels are 0..K-1")
            if names.setdefault(y, c) != c:
                raise ValueError(f"{path}: label {y} named both {names[y]!r} and {c!r}; one class name per label")
            entries.append((str(p), y))
        out[part] = entries
    return out, {y: c.replace("_", " ") for y, c in names.items()}


def _split_file_names(info: ds_lib.DatasetInfo | None, path: str) -> tuple[dict, tuple[str, ...]]:
    """The split file's entries and the class names (the registry's, overridden by the file's)."""
    entries, names = read_split_file(path)
    if info is None:
        k = max(names) + 1 if names else 0
        if sorted(names) != list(range(k)) or k < 2:
            gaps = sorted(set(range(k)) - set(names))
            raise ValueError(
                f"{path}: labels must be 0..K-1 (K >= 2) when the dataset is not registered, each with its class "
                f"name; found {len(names)} label(s){f', without {gaps[:10]}' if gaps else ''}: renumber the "
                "labels 0..K-1"
            )
        own = tuple(names[i] for i in range(k))
        ds_lib.check_distinct_names(own, str(path), "give each label its own class name in the split file")
        return entries, own
    if sorted(names) != list(range(info.num_classes)):
        # Training the registry's classes on a file of other classes would make up names for the rest.
        raise ValueError(
            f"{path} has {len(names)} classes (labels {min(names, default=None)}..{max(names, default=None)}), "
            f"{info.name} has {info.num_classes}: it is not {info.name}'s split file. To train the file's own "
            "classes, use data.name='folder' with data.folder (the image root) and this data.split_file."
        )
    diff = [(y, c, info.classnames[y]) for y, c in sorted(names.items()) if c != info.classnames[y]]
    if diff:
        # CoOp takes its prompts from the split file, so the file's names win.
        log.warning("%s: split file names differ from the registry at %d classes, using the "
                    "file's: %s", info.name, len(diff), diff[:5])
    merged = tuple(names.get(i, c) for i, c in enumerate(info.classnames))
    if info.label_rule != "sorted":  # ImageNet's CLIP names repeat two on purpose (told apart by index)
        ds_lib.check_distinct_names(merged, str(path), "give each label its own class name in the split file")
    return entries, merged


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _tfds_with_split_file(info, cfg, builder, to_class, dataset_id) -> SourceData:
    """CoOp's split file over a tfds builder: its entries are matched by file name (a builder without
    file names was refused by `_check_fields`)."""
    entries, names = _split_file_names(info, cfg.split_file)
    source_names = builder.info.features["label"].names
    splits = list(builder.info.splits.keys()) or [info.train_split, info.test_split]
    order = {"train": 0, "validation": 1, "val": 1, "test": 2}
    splits = sorted(splits, key=lambda s: (order.get(s, 3), s))
    key_of, parts, offset = {}, [], 0
    for split in splits:
        table = _tfds_table(builder, split, ["label", info.file_feature])
        n = table["label"].shape[0]
        for j in range(n):
            key = info.file_key.format(
                label=source_names[table["label"][j]], file=_text(table[info.file_feature][j]), split=split
            )
            key_of[_norm_key(key)] = offset + j
        parts.append((split, offset, n))
        offset += n
    pool = TfdsPool(builder, parts)
    out, missing = {}, 0
    for part in ("train", "val", "test"):
        rows = []
        for p, y in entries[part]:
            i = key_of.get(_norm_key(p))
            if i is None:
                missing += 1
            else:
                rows.append((i, y))
        rows.sort()
        ids = np.array([r[0] for r in rows], np.int64)
        labels = np.array([r[1] for r in rows], np.int64)
        out[part] = Examples(pool, ids, labels, labels)
    if missing:
        log.warning("%s: %d split-file entries have no tfds example (skipped); the split is not "
                    "exactly CoOp's", info.name, missing)
    return SourceData(info.name, f"{dataset_id}-{_stem(cfg.split_file)}", names, info.template,
                      False, out["train"], out["val"], out["test"])


# ---------------------------------------------------------------------------------------------
# Files: CoOp split file + folder, your own folder, CSV, Food-101N
# ---------------------------------------------------------------------------------------------


def _require_dir(path: str | None, what: str) -> str:
    if not path:
        raise ValueError(f"{what}: data.folder is not set; set it to the image folder (docs/DATA.md)")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: folder {path} does not exist (data.folder; see docs/DATA.md for the layout)")
    return path


def _split_file_folder_source(info, cfg, name) -> SourceData:
    """CoOp exactly: the split file's paths under CoOp's image folder, read as files."""
    root = _require_dir(cfg.folder, f"{name} with split_file")
    entries, names = _split_file_names(info, cfg.split_file)
    paths, parts, offset = [], {}, 0
    for part in ("train", "val", "test"):
        items = entries[part]
        paths += [os.path.join(root, p) for p, _ in items]
        labels = np.array([y for _, y in items], np.int64)
        parts[part] = (np.arange(offset, offset + len(items), dtype=np.int64), labels)
        offset += len(items)
    for part in ("train", "test"):
        first = entries[part][0][0] if entries[part] else None
        if first and not os.path.isfile(os.path.join(root, first)):
            raise FileNotFoundError(
                f"{name}: {os.path.join(root, first)} (first {part} entry of {cfg.split_file}) does "
                f"not exist; data.folder must be the image folder the split file's paths start from"
            )
    pool = FilePool(paths)
    ex = {k: Examples(pool, ids, y, y) for k, (ids, y) in parts.items()}
    template = info.template if info else "a photo of a {}."
    return SourceData(name, f"{name}-{_stem(cfg.split_file)}", names, template, False,
                      ex["train"], ex["val"], ex["test"])


def _list_images(folder: str) -> list[str]:
    return sorted(
        f for f in os.listdir(folder)
        if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, f))
    )


def _class_dirs(folder: str, skip: Sequence[str] = ()) -> list[str]:
    return sorted(
        d for d in os.listdir(folder)
        if not d.startswith(".") and d not in skip and os.path.isdir(os.path.join(folder, d))
    )


def _folder_source(cfg) -> SourceData:
    """Your own images: root/<class>/*.jpg, optional root/test/<class>/ and root/val/<class>/.

    root/train/<class>/ is accepted too. Without a test part, CoOp's 50/20/30 rule carves one.
    Class names are the sorted training folder names with "_" as spaces.
    """
    root = _require_dir(cfg.get("folder"), "name='folder'")
    train_dir = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    classes = _class_dirs(train_dir, skip=("train", "val", "test"))
    if len(classes) < 2:
        raise ValueError(
            f"name='folder': {train_dir} needs at least 2 class folders, found {classes}; put each class's "
            "images in a folder named after the class (data.folder/<class>/*.jpg, see docs/DATA.md)"
        )
    names = tuple(c.replace("_", " ") for c in classes)
    ds_lib.check_distinct_names(names, f"name='folder': the class folders of {train_dir} ('_' reads as a space)",
                                "rename or merge those folders")
    index = {c: i for i, c in enumerate(classes)}
    paths, tables = [], {}
    for part, folder in (("train", train_dir), ("val", os.path.join(root, "val")),
                         ("test", os.path.join(root, "test"))):
        if part != "train" and not os.path.isdir(folder):
            continue
        labels = []
        start = len(paths)
        for c in classes if part == "train" else _class_dirs(folder):
            if c not in index:
                raise ValueError(
                    f"{folder}/{c}: class not among the training classes {classes}; rename the folder to its "
                    f"training class, or add {train_dir}/{c}/ with training images"
                )
            files = _list_images(os.path.join(folder, c))
            paths += [os.path.join(folder, c, f) for f in files]
            labels += [index[c]] * len(files)
        tables[part] = (np.arange(start, len(paths), dtype=np.int64), np.array(labels, np.int64))
    pool = FilePool(paths)
    ex = {k: Examples(pool, ids, y, y) for k, (ids, y) in tables.items()}
    dataset_id = f"folder-{_stem(root)}"
    if "test" not in ex:
        tr, va, te = coop_carve(ex["train"].labels, len(classes), cfg.get("split_seed", 0))
        train = ex["train"]
        ex = {"train": train.subset(tr), "val": train.subset(va), "test": train.subset(te)}
        dataset_id += f"-carve{cfg.get('split_seed', 0)}"
    return SourceData("folder", dataset_id, names, "a photo of a {}.", False,
                      ex["train"], ex.get("val"), ex["test"])


def _csv_source(cfg) -> SourceData:
    """Your own data with its own (noisy) labels: a CSV with a header ``path,label[,clean_label][,split]``.

    label / clean_label are class names; classes are the sorted names found in the file. split is
    train (default), val or test; test rows are needed. Relative paths start at data.folder, else
    at the CSV's folder. Train labels are the noisy labels, clean_label (empty = unknown) the truth.
    """
    path = os.path.expanduser(cfg.csv)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"name='csv': data.csv {path} does not exist")
    base = os.path.expanduser(cfg.get("folder") or os.path.dirname(os.path.abspath(path)))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []
    if not rows or not {"path", "label"} <= set(columns):
        raise ValueError(
            f"{path} (data.csv): needs a header with columns path,label[,clean_label][,split] and at least one "
            f"row; found columns {columns} and {len(rows)} rows"
        )
    has_clean = "clean_label" in columns
    # Surrounding spaces are never part of a class name ("cat " would otherwise be a class of its own).
    label = [(r.get("label") or "").strip() for r in rows]
    clean_label = [(r.get("clean_label") or "").strip() if has_clean else "" for r in rows]
    split_of = [(r.get("split") or "train").strip().lower() for r in rows]
    for i, r in enumerate(rows):
        if split_of[i] not in ("train", "val", "test"):
            raise ValueError(f"{path} row {i + 2}: split {split_of[i]!r} not in train, val, test; fix the split column")
        if not r.get("path") or not label[i]:
            raise ValueError(f"{path} row {i + 2}: empty {'path' if not r.get('path') else 'label'}; every row needs "
                             "a path and a class name in label")
    names = sorted(set(label) | {c for c in clean_label if c})
    # Classes are the names the file uses; one no training row is labelled with cannot be trained: a name
    # that appears only in evaluation rows or as a clean_label is a typo more often than a class.
    trained = {c for c, split in zip(label, split_of) if split == "train"}
    for c in names:
        if c not in trained:
            row = next(i for i in range(len(rows)) if c in (label[i], clean_label[i]))
            column = "label" if label[row] == c else "clean_label"
            raise ValueError(
                f"{path} row {row + 2}: {column} {c!r} is not the label of any training row (classes are the "
                f"{len(trained)} labels of the training rows); fix the name (a typo?) or add training rows of {c!r}"
            )
    shown = tuple(n.replace("_", " ") for n in names)
    ds_lib.check_distinct_names(shown, f"{path} (data.csv; '_' reads as a space)", "use one spelling per class")
    index = {c: i for i, c in enumerate(names)}
    paths, tables = [], {"train": ([], [], []), "val": ([], [], []), "test": ([], [], [])}
    for i, r in enumerate(rows):
        split = split_of[i]
        p = r["path"] if os.path.isabs(r["path"]) else os.path.join(base, r["path"])
        paths.append(p)
        given = index[label[i]]
        if clean_label[i]:
            clean = index[clean_label[i]]
        else:
            # Evaluation rows are the truth; unknown truth on training rows.
            clean = given if split != "train" else -1
        for col, v in zip(tables[split], (i, given, clean)):
            col.append(v)
    if not tables["test"][0]:
        raise ValueError(f"{path}: no rows with split=test; the test set must be given: add test rows (data.csv)")
    pool = FilePool(paths)
    ex = {k: Examples(pool, *v) for k, v in tables.items() if v[0] or k == "train"}
    return SourceData("csv", f"csv-{_stem(path)}", shown, "a photo of a {}.", True,
                      ex["train"], ex.get("val"), ex["test"])


def _food101n_source(info, cfg) -> SourceData:
    """Food-101N: noisy web images in class folders (data.folder); test = Food-101's test (tfds).

    meta/verified_train.tsv, when present, gives the truth of its verified images: verified
    correct -> clean = label; otherwise clean is unknown (-1).
    """
    root = _require_dir(cfg.get("folder"), "food101n")
    image_dir = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else root
    builder = tfds_builder(info, cfg)  # fail fast on the test set before listing 310k files
    index = {c: i for i, c in enumerate(info.classnames)}
    paths, labels, keys = [], [], []
    for folder in _class_dirs(image_dir):
        name = info.rename(folder)
        if name not in index:
            raise ValueError(f"food101n: folder {folder!r} is not a Food-101 class")
        for f in _list_images(os.path.join(image_dir, folder)):
            paths.append(os.path.join(image_dir, folder, f))
            labels.append(index[name])
            keys.append(f"{folder}/{f}")
    labels = np.array(labels, np.int64)
    clean = np.full(labels.shape, -1, np.int64)
    verified = os.path.join(root, "meta", "verified_train.tsv")
    if os.path.isfile(verified):
        pos = {k: i for i, k in enumerate(keys)}
        with open(verified) as f:
            for line in f:
                parts = line.strip().split("\t")
                if len(parts) == 2 and parts[1] == "1" and parts[0] in pos:
                    clean[pos[parts[0]]] = labels[pos[parts[0]]]
    train = Examples(FilePool(paths), np.arange(len(paths), dtype=np.int64), labels, clean)
    to_class = info.map_source_labels(builder.info.features["label"].names)
    table = _tfds_table(builder, info.test_split, ["label"])
    y = to_class[table["label"]]
    test = Examples(TfdsPool(builder, [(info.test_split, 0, y.size)]), np.arange(y.size), y, y)
    return SourceData(info.name, info.name, info.classnames, info.template, True, train, None, test)


def _array_source(info) -> SourceData:
    out = {}
    for part, split in info.arrays.items():
        n = split.labels.shape[0]
        clean = split.clean if split.clean is not None else split.labels
        out[part] = Examples(ArrayPool(split.images), np.arange(n), split.labels, clean)
    return SourceData(info.name, info.name, info.classnames, info.template, info.real_noise,
                      out["train"], out.get("val"), out["test"])


def coop_files(info: ds_lib.DatasetInfo, cfg: Any) -> tuple[str | None, str | None]:
    """(split file, image folder) of CoOp's layout for ``info`` under ``data.coop_root`` (default: the
    environment variable DATA, CoOp's ``$DATA``): ``<root>/<coop_dir>/<coop_split_file>`` and
    ``<root>/<coop_dir>/<coop_image_dir>``, each None when absent."""
    root = cfg.get("coop_root") or os.environ.get("DATA")
    if not root or not info.coop_split_file:
        return None, None
    base = os.path.join(os.path.expanduser(root), info.coop_dir)
    split_file = os.path.join(base, info.coop_split_file)
    folder = os.path.join(base, info.coop_image_dir)
    return (split_file if os.path.isfile(split_file) else None), (folder if os.path.isdir(folder) else None)


def _resolve_split_file(info: ds_lib.DatasetInfo | None, cfg: Any) -> Any:
    """``cfg`` with ``split_file="auto"`` resolved: CoOp's split file where docs/DATA.md says it lives
    (``coop_files``), its image folder too when ``data.folder`` is unset and the folder exists (CoOp's
    own files, no tfds needed); None when there is none (the source's own splits)."""
    if cfg.get("split_file") != "auto":
        return cfg
    cfg = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") else dict(cfg)
    split_file, folder = coop_files(info, cfg) if info is not None and info.kind == "tfds" else (None, None)
    cfg["split_file"] = split_file
    if split_file and folder and not cfg.get("folder"):
        cfg["folder"] = folder
    return cfg


def _describe_splits(src: SourceData, info: ds_lib.DatasetInfo | None, cfg: Any) -> SourceData:
    """``src`` with ``splits`` (in words) and ``test_as_coop`` set."""
    split_file, folder = cfg.get("split_file"), cfg.get("folder")
    if info is None or info.kind in ("arrays", "food101n"):
        what = {"folder": f"the folder {folder}", "csv": f"the CSV {cfg.get('csv')}"}.get(src.name, src.name)
        splits = f"split file {split_file} over {folder}" if split_file else f"the splits of {what}"
        return dataclasses.replace(src, splits=splits, test_as_coop=None)
    if split_file:
        where = f"images from {folder}" if folder else f"matched to tfds '{info.tfds_name}' by file name"
        return dataclasses.replace(src, splits=f"CoOp's split file {split_file} ({where})", test_as_coop=True)
    return dataclasses.replace(src, splits=f"tfds '{info.tfds_name}' splits", test_as_coop=info.tfds_test_is_coops)


def _check_fields(name: str, info: ds_lib.DatasetInfo | None, cfg: Any) -> None:
    """Refuses data fields that do not apply to the dataset, from the config alone (nothing is read)."""
    if name == "csv" and not cfg.get("csv"):
        raise ValueError("name='csv' needs data.csv (a CSV of path,label[,clean_label][,split])")
    if name != "csv" and cfg.get("csv"):
        raise ValueError(f"data.csv is only used with name='csv', got name={name!r}; unset data.csv or set "
                         "data.name='csv'")
    column = cfg.get("label_column")
    if column and (info is None or not info.noisy_columns):
        with_columns = sorted(n for n, i in ds_lib.DATASETS.items() if i.noisy_columns)
        raise ValueError(f"data.label_column={column!r} picks the noisy label column of {with_columns}; "
                         f"{name!r} has none: unset data.label_column")
    if column and column not in info.noisy_columns:
        raise ValueError(f"{info.name}: label_column {column!r} is not a noisy label column; valid: "
                         f"{list(info.noisy_columns)} (data.label_column)")
    if info is None:
        return
    if info.kind == "arrays" and (cfg.get("split_file") or cfg.get("folder")):
        raise ValueError(f"{name!r} is an in-memory dataset; data.split_file / data.folder do not apply: unset them")
    if info.kind != "tfds":
        return
    if cfg.get("folder") and not cfg.get("split_file") and not cfg.get("download"):
        raise ValueError(
            f"data.folder with name={name!r} needs data.split_file (CoOp's split_zhou json); for a "
            f"folder of your own classes use name='folder'"
        )
    if cfg.get("split_file") and not cfg.get("folder") and not info.file_key:
        raise ValueError(
            f"{info.name}: tfds '{info.tfds_name}' keeps no file names, so a split file cannot be "
            f"matched to it; set data.folder to CoOp's image folder ($DATA/{info.coop_dir}/"
            f"{info.coop_image_dir}) to read the files directly"
        )


def check_available(cfg: Any) -> None:
    """Raises what ``load_source(cfg)`` would raise for missing data (a folder, a file, an unprepared tfds
    dataset, an image a CoOp split file names) and for data fields that do not apply, reading no label
    table (a split file, a small JSON, is read): the trainer's up-front check."""
    name = ds_lib.canonical_name(cfg.name)
    info = None if name in ("folder", "csv") else ds_lib.get_dataset_info(name)
    cfg = _resolve_split_file(info, cfg)
    _check_fields(name, info, cfg)
    if cfg.get("split_file") and not os.path.isfile(os.path.expanduser(cfg.split_file)):
        raise FileNotFoundError(f"split file {cfg.split_file} does not exist (data.split_file)")
    if name == "csv":
        if not os.path.isfile(os.path.expanduser(cfg.csv)):
            raise FileNotFoundError(f"data.csv {cfg.get('csv')} does not exist")
        return
    if info is not None and info.kind == "tfds" and cfg.get("split_file"):
        entries, _ = _split_file_names(info, os.path.expanduser(cfg.split_file))  # a file of other classes
    if info is not None and info.kind == "tfds" and cfg.get("split_file") and cfg.get("folder"):
        root = _require_dir(cfg.get("folder"), f"{name} with split_file")
        # One stat per listed image (CoOp's images are decoded when read, not here: they are many).
        missing = [(os.path.join(root, p), "missing") for part in ("train", "val", "test")
                   for p, _ in entries[part] if not os.path.isfile(os.path.join(root, p))]
        if missing:
            raise FileNotFoundError(
                f"{cfg.split_file} (data.split_file) names {len(missing)} image file(s) that are not under "
                f"data.folder={root}:\n{_listing(missing)}\nRestore them (CoOp's DATASETS.md says where "
                f"{name}'s images come from), or set data.folder to the folder the split file's paths start from."
            )
        return
    if name == "folder":
        _require_dir(cfg.get("folder"), "name='folder'")
        return
    if info.kind == "arrays" or (info.kind == "tfds" and cfg.get("folder") and not cfg.get("download")):
        return  # in memory; or a folder without a split file, which load_source refuses with the reason
    if info.kind == "food101n":
        _require_dir(cfg.get("folder"), "food101n")
    if not cfg.get("download"):
        tfds_builder(info, cfg)
        return
    builder = _builder(info, cfg)
    if not builder.is_prepared():  # it will be prepared: check now that it can be (network, manual files)
        from dspt_jax.data import prepare

        prepare.check_can_prepare(info.name, builder, cfg.get("folder"))


def load_source(cfg: Any, *, check_images: bool = False) -> SourceData:
    """The dataset named by ``cfg.name`` (registry entry or your own data), labels read; its ``splits``
    say which splits were used.

    The image files of your own data (name "folder" / "csv") are screened by ``screen_images`` when
    ``check_images`` (the start-up check) or when ``data.bad_images`` is "skip" (which files are left out
    must be known before the training set is drawn); otherwise an unreadable file stops the run when the
    pipeline reads it, naming it."""
    name = ds_lib.canonical_name(cfg.name)
    info = None if name in ("folder", "csv") else ds_lib.get_dataset_info(name)
    cfg = _resolve_split_file(info, cfg)
    _check_fields(name, info, cfg)
    src = _describe_splits(_load_source(name, info, cfg), info, cfg)
    if info is None:  # two different folders (or CSVs) must not share the name "folder" in results tables
        path = os.path.normpath(os.path.expanduser(cfg.folder if name == "folder" else cfg.csv))
        src = dataclasses.replace(src, name=cfg.get("display_name") or _stem(path))
        policy = cfg.get("bad_images", "fail")
        if check_images or policy != "fail":
            what = f"data.csv {cfg.csv}" if name == "csv" else f"data.folder {cfg.folder}"
            if name == "folder" and cfg.get("split_file"):
                what = f"data.split_file {cfg.split_file} over data.folder {cfg.folder}"
            src = screen_images(src, what, policy, report=not check_images)
    return src


def _load_source(name: str, info: ds_lib.DatasetInfo | None, cfg: Any) -> SourceData:
    # Fields that do not apply were refused by `_check_fields`.
    if name == "folder":
        if cfg.get("split_file"):
            return _split_file_folder_source(None, cfg, "folder")
        return _folder_source(cfg)
    if name == "csv":
        return _csv_source(cfg)
    if info.kind == "arrays":
        return _array_source(info)
    if info.kind == "food101n":
        return _food101n_source(info, cfg)
    if cfg.get("split_file") and cfg.get("folder"):
        return _split_file_folder_source(info, cfg, name)
    return _tfds_source(info, cfg)


__all__ = (
    "BAD_IMAGE_POLICIES",
    "DatasetNotPreparedError",
    "Examples",
    "SourceData",
    "Pool",
    "FilePool",
    "ArrayPool",
    "TfdsPool",
    "coop_carve",
    "decode_image",
    "find_unreadable",
    "load_source",
    "read_split_file",
    "screen_images",
    "tfds_builder",
    "UnreadableImageError",
)
