"""Tests of dspt_jax.data.noise: the label-noise families and the noise record.

References are independent of the code under test: counts from int(rate * N) and hand-made tables,
frequencies checked against binomial tolerances, transition counts by explicit Python loops.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from dspt_jax.data import noise


def _labels(n=1000, k=10, seed=123):
    # A fixed table made independently of the module's streams.
    return np.random.default_rng(seed).integers(0, k, size=n)


# ----------------------------------------------------------------------------------------------
# Import hygiene
# ----------------------------------------------------------------------------------------------


def test_imports_without_tensorflow():
    # Block tensorflow entirely; importing noise (and fewshot) must still work.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tensorflow' or name.startswith('tensorflow.'):\n"
        "            raise ImportError('tensorflow blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dspt_jax.data.noise, dspt_jax.data.fewshot\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_random_streams_are_distinct():
    # Sampling, validation and each noise family must never share a random stream.
    assert len(set(noise.STREAMS.values())) == len(noise.STREAMS)
    a = noise.rng_for(0, "fewshot").random(4)
    b = noise.rng_for(0, "label_noise").random(4)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, noise.rng_for(0, "fewshot").random(4))
    with pytest.raises(ValueError, match="stream"):
        noise.rng_for(0, "nope")


# ----------------------------------------------------------------------------------------------
# sym / asym / sym_incl
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sym", "asym"])
@pytest.mark.parametrize("rate", [0.0, 0.125, 0.3, 0.5, 0.875, 1.0])
def test_exact_flip_count(kind, rate):
    labels = _labels(n=997, k=7)
    noisy, flipped = noise.corrupt_labels(labels, num_classes=7, kind=kind, rate=rate, seed=3)
    assert noisy.dtype == np.int64 and flipped.dtype == np.bool_
    assert int(flipped.sum()) == int(rate * 997)
    np.testing.assert_array_equal(flipped, noisy != labels)
    assert noisy.min() >= 0 and noisy.max() < 7


def test_sym_never_keeps_true_label_and_is_uniform_over_others():
    k, n = 5, 50_000
    labels = _labels(n=n, k=k, seed=7)
    noisy, flipped = noise.corrupt_labels(labels, num_classes=k, kind="sym", rate=1.0, seed=11)
    assert flipped.all()
    assert not np.any(noisy == labels)
    # Each other class should get 1/(K-1) of a class's examples (binomial, 5 sigma).
    for c in range(k):
        row = noisy[labels == c]
        freq = np.bincount(row, minlength=k) / row.size
        sigma = np.sqrt(0.25 * 0.75 / row.size)
        expected = np.full(k, 1 / (k - 1))
        expected[c] = 0.0
        np.testing.assert_allclose(freq, expected, atol=5 * sigma)


def test_asym_maps_c_to_c_plus_1_mod_k():
    k = 6
    labels = np.arange(600) % k
    noisy, flipped = noise.corrupt_labels(labels, num_classes=k, kind="asym", rate=0.5, seed=0)
    np.testing.assert_array_equal(noisy[flipped], (labels[flipped] + 1) % k)
    np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])
    # The last class wraps around to 0.
    assert np.any(labels[flipped] == k - 1)
    assert np.all(noisy[flipped & (labels == k - 1)] == 0)


def test_sym_incl_may_keep_the_true_label():
    k, n, rate = 4, 2000, 0.5
    labels = _labels(n=n, k=k, seed=5)
    kept_somewhere = False
    for seed in range(5):
        noisy, flipped = noise.corrupt_labels(labels, num_classes=k, kind="sym_incl", rate=rate, seed=seed)
        np.testing.assert_array_equal(flipped, noisy != labels)
        # Exactly int(rate*N) are re-drawn; about 1/K of them land on the true label again.
        assert flipped.sum() <= int(rate * n)
        if flipped.sum() < int(rate * n):
            kept_somewhere = True
        # Fraction changed among the re-drawn ones is (K-1)/K: 750 of 1000 expected, binomial sd ~ 13.7.
        assert abs(flipped.sum() - int(rate * n) * (k - 1) / k) < 5 * np.sqrt(1000 * 0.25 * 0.75)
    assert kept_somewhere


def test_sym_incl_selects_int_rate_n_and_redraws_over_all_k_classes():
    # The selected positions are sym's (exactly int(rate*N) of them, as sym changes every one it selects).
    # sym_incl changes only a subset of them, never anything outside; the redrawn labels are uniform over
    # all K classes, the true class included (1/K each), so fewer than int(rate*N) labels may change.
    k, n, rate, seed = 3, 30_000, 0.5, 9
    labels = _labels(n=n, k=k, seed=17)
    _, selected = noise.corrupt_labels(labels, num_classes=k, kind="sym", rate=rate, seed=seed)
    assert int(selected.sum()) == int(rate * n)
    noisy, flipped = noise.corrupt_labels(labels, num_classes=k, kind="sym_incl", rate=rate, seed=seed)
    np.testing.assert_array_equal(noisy[~selected], labels[~selected])
    assert not np.any(flipped & ~selected)
    assert 0 < flipped.sum() < selected.sum()
    # Among the selected, each class c's new labels are uniform over all K classes (binomial, 5 sigma),
    # so the share that keeps its true label is 1/K, not 0 as with sym.
    for c in range(k):
        row = noisy[selected & (labels == c)]
        sigma = np.sqrt((1 / k) * (1 - 1 / k) / row.size)
        np.testing.assert_allclose(np.bincount(row, minlength=k) / row.size, np.full(k, 1 / k), atol=5 * sigma)
    kept = int((selected & ~flipped).sum())
    assert abs(kept - selected.sum() / k) < 5 * np.sqrt(selected.sum() * (1 / k) * (1 - 1 / k))
    # A few-shot-sized case: N = 32 at rate 0.5 selects 16; with K = 2 about 8 of them change, never more than 16.
    small = np.arange(32) % 2
    changed = [int(noise.corrupt_labels(small, 2, "sym_incl", 0.5, s)[1].sum()) for s in range(20)]
    assert max(changed) <= 16 and min(changed) < 16


def test_same_selection_across_label_kinds_and_nested_rates():
    labels = _labels(n=800, k=9)
    _, f_sym = noise.corrupt_labels(labels, 9, "sym", 0.5, 4)
    _, f_asym = noise.corrupt_labels(labels, 9, "asym", 0.5, 4)
    _, f_incl = noise.corrupt_labels(labels, 9, "sym_incl", 0.5, 4)
    np.testing.assert_array_equal(f_sym, f_asym)
    assert np.all(f_sym[f_incl])  # sym_incl changes a subset of the same selection
    _, f_low = noise.corrupt_labels(labels, 9, "asym", 0.25, 4)
    assert np.all(f_sym[f_low])  # a lower rate flips a subset of a higher one


@pytest.mark.parametrize("kind", noise.LABEL_KINDS)
def test_seeds_reproduce_and_differ(kind):
    labels = _labels()
    a = noise.corrupt_labels(labels, 10, kind, 0.4, seed=0)
    b = noise.corrupt_labels(labels, 10, kind, 0.4, seed=0)
    c = noise.corrupt_labels(labels, 10, kind, 0.4, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_independent_of_global_numpy_state_and_input_dtype():
    labels = _labels()
    np.random.seed(0)
    a = noise.corrupt_labels(labels.astype(np.int32), 10, "sym", 0.5, 2)
    np.random.seed(99)
    np.random.random(10)
    b = noise.corrupt_labels(list(labels), 10, "sym", 0.5, 2)
    np.testing.assert_array_equal(a[0], b[0])


def test_rate_edge_cases():
    labels = _labels(n=100, k=3)
    for kind in noise.LABEL_KINDS:
        noisy, flipped = noise.corrupt_labels(labels, 3, kind, 0.0, 8)
        np.testing.assert_array_equal(noisy, labels)
        assert not flipped.any()
    noisy, flipped = noise.corrupt_labels(labels, 3, "asym", 1.0, 8)
    np.testing.assert_array_equal(noisy, (labels + 1) % 3)
    noisy, flipped = noise.corrupt_labels(labels, 3, "none", 0.0, 8)
    np.testing.assert_array_equal(noisy, labels)
    assert not flipped.any()
    # Two classes: sym at rate 1 must swap every label.
    two = np.array([0, 1, 1, 0, 1])
    noisy, _ = noise.corrupt_labels(two, 2, "sym", 1.0, 0)
    np.testing.assert_array_equal(noisy, 1 - two)
    # Empty input is fine.
    noisy, flipped = noise.corrupt_labels([], 3, "sym", 0.5, 0)
    assert noisy.shape == (0,) and flipped.shape == (0,)


def test_num_classes_inferred_and_checked():
    labels = np.array([0, 1, 2, 2, 1, 0, 2])
    a = noise.corrupt_labels(labels, None, "sym", 1.0, 1)
    b = noise.corrupt_labels(labels, 3, "sym", 1.0, 1)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].max() <= 2
    with pytest.raises(ValueError, match="num_classes"):
        noise.corrupt_labels(labels, 2, "sym", 0.5, 1)  # label 2 >= num_classes
    with pytest.raises(ValueError, match="num_classes"):
        noise.corrupt_labels(np.zeros(4, int), None, "sym", 0.5, 1)  # inferred K = 1
    with pytest.raises(ValueError, match="num_classes"):
        noise.corrupt_labels(labels, 1, "sym", 0.5, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="sym", rate=-0.1), "rate"),
        (dict(kind="sym", rate=1.5), "rate"),
        (dict(kind="sym", rate=float("nan")), "rate"),
        (dict(kind="bogus", rate=0.5), "unknown noise kind"),
        (dict(kind="symflip", rate=0.5), "sample_per_class_flips"),
        (dict(kind="matrix", rate=0.5), "corrupt_with_matrix"),
        (dict(kind="none", rate=0.5), "rate"),
        (dict(kind="sym", rate=0.5, seed=-1), "seed"),
        (dict(kind="sym", rate=0.5, seed=1.5), "seed"),
        (dict(kind="sym", rate=0.5, seed=None), "seed"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = dict(num_classes=3, seed=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        noise.corrupt_labels(np.array([0, 1, 2, 0]), **args)


@pytest.mark.parametrize(
    "labels",
    [np.array([0.0, 1.0]), np.array([True, False]), np.array([[0, 1]]), np.array([0, -1, 1])],
)
def test_bad_labels_raise(labels):
    with pytest.raises(ValueError):
        noise.corrupt_labels(labels, 3, "sym", 0.5, 0)


# ----------------------------------------------------------------------------------------------
# matrix
# ----------------------------------------------------------------------------------------------


def test_matrix_frequencies_match():
    t = np.array(
        [
            [0.6, 0.4, 0.0, 0.0],
            [0.1, 0.7, 0.1, 0.1],
            [0.0, 0.0, 1.0, 0.0],
            [0.25, 0.0, 0.25, 0.5],
        ]
    )
    n = 200_000
    labels = np.arange(n) % 4
    noisy, flipped = noise.corrupt_with_matrix(labels, t, seed=0)
    np.testing.assert_array_equal(flipped, noisy != labels)
    for c in range(4):
        row = noisy[labels == c]
        freq = np.bincount(row, minlength=4) / row.size
        sigma = np.sqrt(t[c] * (1 - t[c]) / row.size)
        # Zero-probability entries must be exactly zero; the rest within 5 sigma.
        assert np.all(np.abs(freq - t[c]) <= 5 * sigma + 1e-12), (c, freq, t[c])


def test_matrix_identity_and_permutation_are_deterministic():
    labels = _labels(n=300, k=3)
    noisy, flipped = noise.corrupt_with_matrix(labels, np.eye(3), seed=5)
    np.testing.assert_array_equal(noisy, labels)
    assert not flipped.any()
    perm = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)
    noisy, flipped = noise.corrupt_with_matrix(labels, perm, seed=5)
    np.testing.assert_array_equal(noisy, np.array([2, 0, 1])[labels])
    assert flipped.all()


def test_matrix_seeds():
    labels = _labels(n=500, k=3)
    t = np.full((3, 3), 1 / 3)
    a, _ = noise.corrupt_with_matrix(labels, t, 0)
    b, _ = noise.corrupt_with_matrix(labels, t, 0)
    c, _ = noise.corrupt_with_matrix(labels, t, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "t",
    [
        [[0.5, 0.4], [0.0, 1.0]],  # a row sums to 0.9
        [[1.2, -0.2], [0.0, 1.0]],  # negative entry
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # not square
        [[float("nan"), 1.0], [0.0, 1.0]],
        [[1.0]],  # K = 1
    ],
)
def test_matrix_bad_transition_raises(t):
    with pytest.raises(ValueError, match="transition"):
        noise.corrupt_with_matrix(np.array([0, 1, 0]), t, 0)


def test_matrix_labels_must_fit():
    with pytest.raises(ValueError, match="num_classes"):
        noise.corrupt_with_matrix(np.array([0, 2]), np.eye(2), 0)


# ----------------------------------------------------------------------------------------------
# NoiseSpec
# ----------------------------------------------------------------------------------------------


def test_spec_defaults_to_no_noise():
    spec = noise.NoiseSpec()
    assert spec.kind == "none" and spec.rate == 0.0 and spec.num_flips is None and spec.transition is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="sym", rate=-0.1),
        dict(kind="sym", rate=1.5),
        dict(kind="nope"),
        dict(kind="matrix"),  # missing matrix
        dict(kind="matrix", transition=[[0.5, 0.6], [0.5, 0.5]]),  # not stochastic
        dict(kind="sym", rate=0.2, transition=np.eye(2)),  # matrix with another kind
        dict(kind="sym", rate=0.2, num_flips=2),  # num_flips only per-class
        dict(kind="symflip", num_flips=-1),
        dict(kind="real", rate=0.3),  # no synthetic noise on top of real noise
        dict(kind="none", rate=0.3),
    ],
)
def test_spec_rejects_bad(kwargs):
    with pytest.raises(ValueError):
        noise.NoiseSpec(**kwargs)


def test_spec_hashable_and_flips_per_class():
    a = noise.NoiseSpec("matrix", transition=np.eye(3))
    b = noise.NoiseSpec("matrix", transition=[[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert a == b and hash(a) == hash(b)
    np.testing.assert_array_equal(a.transition_matrix(), np.eye(3))
    assert noise.NoiseSpec("symflip", rate=0.25).flips_per_class(16) == 4
    assert noise.NoiseSpec("pairflip", num_flips=8).flips_per_class(16) == 8
    assert noise.NoiseSpec("pairflip", rate=0.5, num_flips=8).flips_per_class(16) == 8
    with pytest.raises(ValueError, match="disagrees"):
        noise.NoiseSpec("pairflip", rate=0.25, num_flips=8).flips_per_class(16)


# ----------------------------------------------------------------------------------------------
# Record
# ----------------------------------------------------------------------------------------------

_BASE = dict(dataset="caltech101", split="train", shots=16, spec=noise.NoiseSpec("sym", 0.5), seed=1)


def test_record_name_readable():
    name = noise.record_name(**_BASE)
    assert name.startswith("caltech101_train_16shot_sym_r0.500_seed1_")
    assert noise.record_name(**_BASE) == name  # deterministic


@pytest.mark.parametrize(
    "field, value",
    [
        ("dataset", "oxford_pets"),
        ("split", "val"),
        ("shots", 8),
        ("shots", -1),
        ("seed", 0),
        ("seed", 2),
        ("spec", noise.NoiseSpec("asym", 0.5)),
        ("spec", noise.NoiseSpec("sym_incl", 0.5)),
        ("spec", noise.NoiseSpec("sym", 0.25)),
        ("spec", noise.NoiseSpec("sym", 0.5000001)),  # would collide at 3 decimals
        ("spec", noise.NoiseSpec("none")),
    ],
)
def test_record_name_differs_for_every_field(field, value):
    changed = dict(_BASE, **{field: value})
    assert noise.record_name(**changed) != noise.record_name(**_BASE)


def test_record_name_differs_for_flips_and_matrices():
    names = {
        noise.record_name("d", "train", 16, noise.NoiseSpec("symflip", num_flips=4), 1),
        noise.record_name("d", "train", 16, noise.NoiseSpec("symflip", num_flips=8), 1),
        noise.record_name("d", "train", 16, noise.NoiseSpec("pairflip", num_flips=4), 1),
        noise.record_name("d", "train", 16, noise.NoiseSpec("symflip", rate=0.25), 1),
        noise.record_name("d", "train", 16, noise.NoiseSpec("matrix", transition=np.eye(2)), 1),
        noise.record_name("d", "train", 16, noise.NoiseSpec("matrix", transition=[[0.5, 0.5], [0, 1]]), 1),
        noise.record_name("d", "train", 16, noise.NoiseSpec("real"), 1),
        # Underscores must not let two (dataset, split) pairs run together.
        noise.record_name("a_train", "b", 16, noise.NoiseSpec(), 1),
        noise.record_name("a", "train_b", 16, noise.NoiseSpec(), 1),
    }
    assert len(names) == 9
    for name in names:
        assert "/" not in name and " " not in name


def _hand_counts(clean, noisy, k):
    counts = np.zeros((k, k), np.int64)
    for c, y in zip(clean, noisy):
        if c >= 0:
            counts[c, y] += 1
    return counts


def test_make_record_contents():
    clean = np.array([0, 1, 2, 2, 1, 0, 2, 1])
    noisy, flipped = noise.corrupt_labels(clean, 3, "sym", 0.5, 1)
    ids = np.array([b"img/a", b"img/b", b"img/c", b"img/d", b"img/e", b"img/f", b"img/g", b"img/h"])
    rec = noise.make_record(**_BASE, num_classes=3, ids=ids, clean=clean, noisy=noisy, flipped=flipped)
    assert rec["name"] == noise.record_name(**_BASE)
    assert rec["ids"].tolist() == ["img/a", "img/b", "img/c", "img/d", "img/e", "img/f", "img/g", "img/h"]
    assert rec["realized_rate"] == 4 / 8
    np.testing.assert_array_equal(rec["transition_counts"], _hand_counts(clean, noisy, 3))
    assert rec["transition_counts"].sum() == 8
    assert np.trace(rec["transition_counts"]) == 4
    assert (rec["dataset"], rec["split"], rec["shots"], rec["kind"], rec["rate"], rec["seed"]) == (
        "caltech101", "train", 16, "sym", 0.5, 1,
    )


def test_make_record_unknown_clean_and_inconsistent_flags():
    spec = noise.NoiseSpec("real")
    clean = np.array([-1, 0, 1, -1])
    noisy = np.array([1, 1, 1, 0])
    flipped = np.array([False, True, False, False])
    rec = noise.make_record("cifar10n", "train", -1, spec, 0, num_classes=2, ids=[10, 11, 12, 13],
                            clean=clean, noisy=noisy, flipped=flipped)
    assert rec["num_known_clean"] == 2 and rec["realized_rate"] == 0.5
    np.testing.assert_array_equal(rec["transition_counts"], [[0, 1], [0, 1]])
    with pytest.raises(ValueError, match="flipped"):
        noise.make_record("cifar10n", "train", -1, spec, 0, num_classes=2, ids=[10, 11, 12, 13],
                          clean=clean, noisy=noisy, flipped=np.ones(4, bool))


@pytest.mark.parametrize("ids", [np.arange(100, 140), np.array([f"class/{i}.jpg" for i in range(40)])])
def test_record_round_trip(tmp_path, ids):
    clean = _labels(n=40, k=5)
    t = np.full((5, 5), 0.2)
    spec = noise.NoiseSpec("matrix", transition=t)
    noisy, flipped = noise.corrupt_with_matrix(clean, t, 0)
    rec = noise.make_record("dtd", "train", 8, spec, 0, num_classes=5, ids=ids, clean=clean,
                            noisy=noisy, flipped=flipped)
    path = tmp_path / "sub" / (rec["name"] + ".json")
    noise.save_record(path, rec)
    back = noise.load_record(path)
    assert noise.records_equal(rec, back)
    for key in ("clean", "noisy", "flipped", "transition_counts", "ids"):
        assert back[key].dtype == rec[key].dtype
        np.testing.assert_array_equal(back[key], rec[key])
    assert back["realized_rate"] == rec["realized_rate"]
    assert back["transition"] == [list(r) for r in spec.transition]


def test_record_load_rejects_tampered(tmp_path):
    clean = np.array([0, 1, 0, 1])
    rec = noise.make_record(**_BASE, num_classes=2, ids=[1, 2, 3, 4], clean=clean, noisy=clean,
                            flipped=np.zeros(4, bool))
    path = tmp_path / "r.json"
    noise.save_record(path, rec)
    data = json.loads(path.read_text())
    data["rate"] = 0.25  # the file now claims another setting than its name
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match"):
        noise.load_record(path)
