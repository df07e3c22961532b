"""Label-noise families for few-shot prompt tuning, and the record of what was done.

Pure numpy; this module must import without TensorFlow (the pipeline imports it, the tests import it
alone). Every family is named explicitly because the papers we compare with each corrupt labels
differently (rules and sources in docs/PROTOCOLS.md, section 3):

* ``sym``      exactly ``int(rate * N)`` examples, picked by a seeded permutation, get a label drawn
               uniformly from the *other* K-1 classes, so all of them change (NLPrompt).
* ``asym``     same selection; label c becomes (c + 1) % K, so all of them change (NLPrompt's "pair"
               noise).
* ``sym_incl`` same selection of ``int(rate * N)`` examples; the new label is uniform over *all* K
               classes, so about 1/K of them keep the true one and about ``rate * N * (K-1) / K``
               labels change (DivideMix / DeFT style). ``flipped`` marks only real changes.
* ``symflip``, ``pairflip``  act while sampling (they pick images of other classes), see
               :func:`dspt_jax.data.fewshot.sample_per_class_flips`.
* ``matrix``   each label c becomes j with probability T[c, j] for a user-given row-stochastic T.
* ``real``     the dataset's own noisy labels; no synthetic noise is added.
* ``none``     clean few-shot labels.

Randomness: every consumer draws from its own stream ``SeedSequence([seed, stream])`` so that, for
example, few-shot sampling and label noise never share draws, and seed 0 is an ordinary seed.
Nothing here depends on the process index or count: the same seed gives the same noise on 1 host or 64.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
import re
from typing import Any

import numpy as np

from dspt_jax import files

LABEL_KINDS = ("sym", "asym", "sym_incl")  # act on labels after sampling
PER_CLASS_KINDS = ("symflip", "pairflip")  # act while sampling (pick images)
ALL_KINDS = ("none",) + LABEL_KINDS + PER_CLASS_KINDS + ("matrix", "real")

# Independent random streams, one per consumer. Changing a number changes every draw of that
# consumer, so these are part of the reproducibility contract: never renumber them.
STREAMS = {
    "fewshot": 0,
    "validation": 1,
    "label_noise": 2,
    "per_class_flips": 3,
    "matrix": 4,
}

RECORD_FORMAT_VERSION = 1
_ROW_SUM_ATOL = 1e-6


# ----------------------------------------------------------------------------------------------
# Input checks shared with fewshot.py
# ----------------------------------------------------------------------------------------------


def check_seed(seed: Any) -> int:
    """Returns ``seed`` as a Python int; raises ValueError unless it is an integer >= 0.

    0 is a valid seed (one anchor treated it as "no seed"); there is no "no seed" here.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def rng_for(seed: int, stream: str) -> np.random.Generator:
    """The generator of one named stream (see ``STREAMS``) for ``seed``."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; valid: {sorted(STREAMS)}")
    return np.random.default_rng(np.random.SeedSequence([check_seed(seed), STREAMS[stream]]))


def as_label_array(labels: Any, name: str = "labels", allow_unknown: bool = False) -> np.ndarray:
    """Converts ``labels`` to a 1-D int64 array, rejecting floats, bools and negative values.

    With ``allow_unknown`` the value -1 is accepted and means "label not known".
    """
    arr = np.asarray(labels)
    if arr.size == 0:
        return np.zeros((0,), np.int64)  # np.asarray([]) is float64; an empty table is fine
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    low = -1 if allow_unknown else 0
    if arr.min() < low:
        bad = arr[arr < low][0]
        raise ValueError(f"{name} must be >= {low}, found {bad}")
    return arr


def resolve_num_classes(labels: np.ndarray, num_classes: int | None, name: str = "labels") -> int:
    """Checks ``num_classes`` against the labels, or infers it as ``max(labels) + 1``.

    Inference cannot see classes above the largest label present, so pass ``num_classes`` whenever
    the dataset knows it; passing it also catches labels from the wrong table.
    """
    known = labels[labels >= 0]
    if num_classes is None:
        if known.size == 0:
            raise ValueError(f"cannot infer num_classes: {name} has no known labels")
        num_classes = int(known.max()) + 1
    elif isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if known.size and known.max() >= num_classes:
        raise ValueError(
            f"{name} must be < num_classes={num_classes}, found {int(known.max())}"
        )
    return num_classes


def check_rate(rate: Any) -> float:
    """Returns ``rate`` as a float; raises ValueError unless it is a finite number in [0, 1]."""
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, numbers.Real):
        raise ValueError(f"noise.rate must be a number in [0, 1], got {rate!r}")
    rate = float(rate)
    if not (0.0 <= rate <= 1.0):  # also rejects NaN
        raise ValueError(f"noise.rate must be in [0, 1] (a fraction: 0.4, not 40), got {rate}")
    return rate


def check_transition(transition: Any) -> np.ndarray:
    """Returns ``transition`` as a float64 [K, K] row-stochastic matrix, or raises ValueError."""
    try:
        mat = np.asarray(transition, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"noise.transition must be a numeric [K, K] matrix: {e}") from None
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1] or mat.shape[0] < 2:
        raise ValueError(f"noise.transition must be a square [K, K] matrix with K >= 2, got shape {mat.shape}")
    if not np.all(np.isfinite(mat)):
        raise ValueError("noise.transition must be finite")
    if mat.min() < 0:
        raise ValueError(f"noise.transition entries must be >= 0, found {mat.min()}")
    sums = mat.sum(axis=1)
    if not np.allclose(sums, 1.0, rtol=0.0, atol=_ROW_SUM_ATOL):
        row = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(
            f"noise.transition must be row-stochastic (each row sums to 1); row {row} sums to {sums[row]}"
        )
    return mat


# ----------------------------------------------------------------------------------------------
# Label-level noise
# ----------------------------------------------------------------------------------------------


def corrupt_labels(
    labels: Any, num_classes: int | None, kind: str, rate: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupts labels with one of the label-level families ``sym``, ``asym``, ``sym_incl``.

    Exactly ``n = int(rate * N)`` positions are selected: the first n of a seeded permutation of
    range(N). Because the permutation is the first draw of the stream, the selected set for a lower
    rate is contained in the set for a higher rate with the same seed (noise levels are nested), and
    the three kinds select the same positions. ``sym`` and ``asym`` change every selected label;
    ``sym_incl`` redraws each over all K classes, so a selected label stays unchanged with
    probability 1/K and fewer than n labels may change.

    Args:
      labels: int [N] clean labels in [0, num_classes).
      num_classes: K (>= 2); None infers ``max(labels) + 1``.
      kind: "sym", "asym", "sym_incl" (or "none": a copy, rate must be 0).
      rate: fraction in [0, 1].
      seed: integer >= 0 (0 is a seed like any other).

    Returns:
      (noisy int64 [N], flipped bool [N]) with ``flipped == (noisy != labels)``: n True for ``sym``
      and ``asym``, at most n for ``sym_incl``.
    """
    clean = as_label_array(labels)
    num_classes = resolve_num_classes(clean, num_classes)
    rate = check_rate(rate)
    seed = check_seed(seed)
    if kind == "none":
        if rate != 0.0:
            raise ValueError(f"kind 'none' takes rate 0, got {rate}")
        return clean.copy(), np.zeros(clean.shape, bool)
    if kind in PER_CLASS_KINDS:
        raise ValueError(
            f"kind {kind!r} picks images while sampling; use fewshot.sample_per_class_flips "
            f"(corrupt_labels takes {('none',) + LABEL_KINDS})"
        )
    if kind == "matrix":
        raise ValueError("kind 'matrix' needs a transition matrix; use corrupt_with_matrix")
    if kind not in LABEL_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; corrupt_labels takes {('none',) + LABEL_KINDS}")

    n = clean.shape[0]
    rng = rng_for(seed, "label_noise")
    chosen = rng.permutation(n)[: int(rate * n)]
    noisy = clean.copy()
    if kind == "sym":
        # An offset in [1, K-1] added mod K is uniform over the K-1 other classes.
        offset = rng.integers(1, num_classes, size=chosen.size)
        noisy[chosen] = (clean[chosen] + offset) % num_classes
    elif kind == "asym":
        noisy[chosen] = (clean[chosen] + 1) % num_classes
    else:  # sym_incl: over all K classes, so a redrawn label may equal the true one
        noisy[chosen] = rng.integers(0, num_classes, size=chosen.size)
    return noisy, noisy != clean


def corrupt_with_matrix(labels: Any, transition: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws each noisy label j with probability ``transition[c, j]`` given its clean label c.

    Args:
      labels: int [N] clean labels in [0, K).
      transition: [K, K] row-stochastic matrix (rows sum to 1 within 1e-6, entries >= 0).
      seed: integer >= 0.

    Returns:
      (noisy int64 [N], flipped bool [N]).
    """
    mat = check_transition(transition)
    clean = as_label_array(labels)
    resolve_num_classes(clean, mat.shape[0])
    rng = rng_for(seed, "matrix")
    # Renormalise rows and pin the last cdf value at 1 so float rounding can never pick a class
    # past the last one with positive probability.
    cdf = np.cumsum(mat / mat.sum(axis=1, keepdims=True), axis=1)
    cdf[:, -1] = 1.0
    u = rng.random(clean.shape[0])
    noisy = np.empty_like(clean)
    for c in range(mat.shape[0]):
        where = clean == c
        # side="right": u in [cdf[j-1], cdf[j]) -> j, and zero-width bins are never hit.
        noisy[where] = np.searchsorted(cdf[c], u[where], side="right")
    return noisy, noisy != clean


# ----------------------------------------------------------------------------------------------
# The noise specification
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
    """What noise to apply. Validated at construction, so an invalid spec cannot exist.

    Attributes:
      kind: one of ``ALL_KINDS``; "none" by default (no synthetic noise, also for real-noise data).
      rate: fraction in [0, 1]. For per-class kinds the flips per class are ``int(rate * shots)``
        unless ``num_flips`` is given.
      num_flips: F for ``symflip`` / ``pairflip`` (exactly F foreign images per class).
      transition: [K, K] row-stochastic matrix, only with kind "matrix". Stored as a tuple of tuples
        (so the spec is hashable and compares by value); ``transition_matrix()`` gives the array.
    """

    kind: str = "none"
    rate: float = 0.0
    num_flips: int | None = None
    transition: Any = None

    def __post_init__(self):
        if self.transition is not None:
            # Normalise to a tuple of tuples of floats; validate() reports anything unusable.
            mat = check_transition(self.transition)
            object.__setattr__(
                self, "transition", tuple(tuple(float(x) for x in row) for row in mat)
            )
        if isinstance(self.rate, numbers.Real) and not isinstance(self.rate, (bool, np.bool_)):
            object.__setattr__(self, "rate", float(self.rate))
        if isinstance(self.num_flips, numbers.Integral) and not isinstance(
            self.num_flips, (bool, np.bool_)
        ):
            object.__setattr__(self, "num_flips", int(self.num_flips))
        self.validate()

    def validate(self) -> "NoiseSpec":
        """Raises ValueError on an inconsistent spec; returns self."""
        if self.kind not in ALL_KINDS:
            raise ValueError(f"unknown noise kind {self.kind!r} (noise.kind); valid kinds: {ALL_KINDS}")
        check_rate(self.rate)
        if self.num_flips is not None:
            if self.kind not in PER_CLASS_KINDS:
                raise ValueError(
                    f"noise.num_flips is only used by the kinds {PER_CLASS_KINDS}, got noise.kind="
                    f"{self.kind!r}; leave noise.num_flips unset (None)"
                )
            if isinstance(self.num_flips, (bool, np.bool_)) or not isinstance(
                self.num_flips, numbers.Integral
            ) or self.num_flips < 0:
                raise ValueError(f"noise.num_flips must be an integer >= 0, got {self.num_flips!r}")
        if self.kind == "matrix":
            if self.transition is None:
                raise ValueError("kind 'matrix' needs a transition matrix: set noise.transition (K x K)")
            check_transition(self.transition)
            if self.rate != 0.0:
                raise ValueError(
                    f"kind 'matrix' takes its noise from the matrix; rate must be 0 (noise.rate), got {self.rate}"
                )
        elif self.transition is not None:
            raise ValueError(
                f"noise.transition is only used with kind 'matrix', got noise.kind={self.kind!r}; unset it"
            )
        if self.kind in ("none", "real") and self.rate != 0.0:
            # Real-noise data get no synthetic noise unless a synthetic kind is asked for.
            raise ValueError(
                f"kind {self.kind!r} adds no synthetic noise; rate must be 0: set noise.rate=0 (got {self.rate})"
            )
        return self

    def transition_matrix(self) -> np.ndarray | None:
        """The transition matrix as float64 [K, K], or None."""
        return None if self.transition is None else np.asarray(self.transition, np.float64)

    def flips_per_class(self, shots: int) -> int:
        """F for the per-class kinds: ``num_flips`` if given, else ``int(rate * shots)``."""
        if self.kind not in PER_CLASS_KINDS:
            raise ValueError(f"flips_per_class is only for {PER_CLASS_KINDS}, got {self.kind!r}")
        if self.num_flips is not None:
            if self.rate != 0.0 and int(self.rate * shots) != self.num_flips:
                raise ValueError(
                    f"noise.num_flips={self.num_flips} disagrees with noise.rate={self.rate} at {shots} shots "
                    f"(int(rate * shots) = {int(self.rate * shots)}); set only one of them (the other 0 / None)"
                )
            return self.num_flips
        return int(self.rate * shots)


# ----------------------------------------------------------------------------------------------
# The record written to the workdir
# ----------------------------------------------------------------------------------------------


def _record_key(dataset: str, split: str, shots: int, spec: NoiseSpec, seed: int) -> dict:
    """Every field that determines the training labels, in canonical JSON-able form."""
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"dataset must be a non-empty string, got {dataset!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    if isinstance(shots, (bool, np.bool_)) or not isinstance(shots, numbers.Integral):
        raise ValueError(f"shots must be an integer, got {shots!r}")
    if not isinstance(spec, NoiseSpec):
        raise ValueError(f"spec must be a NoiseSpec, got {type(spec).__name__}")
    return {
        "dataset": dataset,
        "split": split,
        "shots": int(shots),
        "kind": spec.kind,
        "rate": float(spec.rate),
        "num_flips": spec.num_flips,
        "transition": None if spec.transition is None else [list(r) for r in spec.transition],
        "seed": check_seed(seed),
    }


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text)


def record_name(dataset: str, split: str, shots: int, spec: NoiseSpec, seed: int) -> str:
    """File-name-safe name of the record, e.g. ``caltech101_train_16shot_sym_r0.500_seed1_<hash>``.

    The readable part shows dataset, split, shots, kind, rate (and F) and seed; the trailing hash is
    over all of them plus the transition matrix, so two settings never share a name even when the
    readable part would collide (long rates, characters replaced to make the name safe).
    """
    key = _record_key(dataset, split, shots, spec, seed)
    rate = key["rate"]
    rate_text = f"{rate:.3f}" if float(f"{rate:.3f}") == rate else repr(rate)
    shots_text = "all" if key["shots"] == -1 else str(key["shots"])
    parts = [_safe(dataset), _safe(split), f"{shots_text}shot", key["kind"], f"r{rate_text}"]
    if key["num_flips"] is not None:
        parts.append(f"f{key['num_flips']}")
    parts.append(f"seed{key['seed']}")
    digest = hashlib.sha256(
        json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:12]
    parts.append(digest)
    return "_".join(parts)


def _as_ids(ids: Any) -> np.ndarray:
    """Stable example ids as an int64 or str array (bytes, as tfds gives them, are decoded)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        return arr.astype(np.int64)
    if arr.dtype.kind == "S":
        return np.array([x.decode("utf-8") for x in arr.tolist()], dtype=str)
    if arr.dtype.kind == "U":
        return arr
    if arr.dtype == object:
        vals = [x.decode("utf-8") if isinstance(x, bytes) else x for x in arr.tolist()]
        if all(isinstance(x, str) for x in vals):
            return np.array(vals, dtype=str)
    raise ValueError(f"ids must be integers or strings, got dtype {arr.dtype}")


def transition_counts(clean: Any, noisy: Any, num_classes: int) -> np.ndarray:
    """int64 [K, K]: entry (i, j) counts examples with clean label i and noisy label j.

    Examples whose clean label is unknown (-1) are left out.
    """
    clean = as_label_array(clean, "clean", allow_unknown=True)
    noisy = as_label_array(noisy, "noisy")
    if clean.shape != noisy.shape:
        raise ValueError(f"clean and noisy differ in shape: {clean.shape} vs {noisy.shape}")
    resolve_num_classes(noisy, num_classes, "noisy")
    resolve_num_classes(clean, num_classes, "clean")
    known = clean >= 0
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (clean[known], noisy[known]), 1)
    return counts


def make_record(
    dataset: str,
    split: str,
    shots: int,
    spec: NoiseSpec,
    seed: int,
    *,
    num_classes: int,
    ids: Any,
    clean: Any,
    noisy: Any,
    flipped: Any,
) -> dict:
    """The record of the training labels actually used, as a dict of plain values and arrays.

    Args:
      dataset, split, shots, spec, seed: the setting (they make up the record's name).
      num_classes: K.
      ids: [M] stable example ids (int or str) of the selected training examples.
      clean: int [M] clean labels (-1 where unknown, for real-noise data).
      noisy: int [M] training labels.
      flipped: bool [M]; must equal ``noisy != clean`` where the clean label is known, False elsewhere.

    Returns:
      dict with name, format_version, the setting's fields, num_classes, ids, clean, noisy, flipped,
      num_known_clean, realized_rate (flipped fraction among known-clean examples; None if none is
      known) and transition_counts int64 [K, K] (clean -> noisy).
    """
    name = record_name(dataset, split, shots, spec, seed)
    key = _record_key(dataset, split, shots, spec, seed)
    ids = _as_ids(ids)
    clean = as_label_array(clean, "clean", allow_unknown=True)
    noisy = as_label_array(noisy, "noisy")
    flipped = np.asarray(flipped)
    if flipped.size == 0:
        flipped = np.zeros((0,), bool)
    if flipped.dtype != np.bool_:
        raise ValueError(f"flipped must be bool, got dtype {flipped.dtype}")
    m = noisy.shape[0]
    if not (ids.shape == clean.shape == flipped.shape == (m,)):
        raise ValueError(
            f"ids, clean, noisy, flipped must have one shape; got {ids.shape}, {clean.shape}, "
            f"{noisy.shape}, {flipped.shape}"
        )
    counts = transition_counts(clean, noisy, num_classes)
    known = clean >= 0
    if not np.array_equal(flipped, known & (noisy != clean)):
        raise ValueError("flipped must equal (noisy != clean) where clean is known, False elsewhere")
    num_known = int(known.sum())
    return {
        "name": name,
        "format_version": RECORD_FORMAT_VERSION,
        **key,
        "num_classes": int(num_classes),
        "ids": ids,
        "clean": clean,
        "noisy": noisy,
        "flipped": flipped,
        "num_known_clean": num_known,
        "realized_rate": float(flipped.sum() / num_known) if num_known else None,
        "transition_counts": counts,
    }


_ARRAY_FIELDS = {"clean": np.int64, "noisy": np.int64, "flipped": np.bool_, "transition_counts": np.int64}


def save_record(path: str | os.PathLike, record: dict) -> None:
    """Writes ``record`` as JSON to ``path`` (a local path or a bucket URL) atomically; makes parent dirs."""
    out = {}
    for k, v in record.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    files.write_json(path, out, indent=None)


def load_record(path: str | os.PathLike) -> dict:
    """Reads a record written by ``save_record``; arrays come back with the dtypes of ``make_record``.

    Raises ValueError when the stored name does not match the stored setting (a hand-edited or
    foreign file), so a record can never be read as another setting's data.
    """
    rec = files.read_json(path)
    if rec.get("format_version") != RECORD_FORMAT_VERSION:
        raise ValueError(
            f"{path}: record format {rec.get('format_version')!r}, expected {RECORD_FORMAT_VERSION}"
        )
    k = rec["num_classes"]
    for field, dtype in _ARRAY_FIELDS.items():
        arr = np.asarray(rec[field], dtype=dtype)
        if field == "transition_counts":
            arr = arr.reshape(k, k)
        rec[field] = arr
    rec["ids"] = _as_ids(rec["ids"])
    spec = NoiseSpec(rec["kind"], rec["rate"], rec["num_flips"], rec["transition"])
    expected = record_name(rec["dataset"], rec["split"], rec["shots"], spec, rec["seed"])
    if rec["name"] != expected:
        raise ValueError(f"{path}: stored name {rec['name']!r} does not match its fields ({expected!r})")
    return rec


def records_equal(a: dict, b: dict) -> bool:
    """True when two records hold the same keys and values (arrays compared by value and dtype)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
                return False
            if x.dtype.kind != y.dtype.kind or not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


__all__ = (
    "LABEL_KINDS",
    "PER_CLASS_KINDS",
    "ALL_KINDS",
    "STREAMS",
    "NoiseSpec",
    "check_seed",
    "rng_for",
    "corrupt_labels",
    "corrupt_with_matrix",
    "transition_counts",
    "record_name",
    "make_record",
    "save_record",
    "load_record",
    "records_equal",
)
