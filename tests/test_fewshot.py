"""Tests of dspt_jax.data.fewshot: CoOp few-shot sampling, validation, per-class flips, select_train.

Each test builds its own label table with known class sizes; expected counts are computed by hand
(min(K, class size), min(K, 4), exactly F foreign images), not by the code under test.
"""

import numpy as np
import pytest

from dspt_jax.data import fewshot, noise

# Class c has SIZES[c] examples, interleaved so indices of a class are not contiguous.
SIZES = np.array([30, 25, 3, 40, 16, 1, 20])


def _table(sizes=SIZES, seed=0):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


def _per_class(labels, idx, k):
    return np.bincount(labels[idx], minlength=k)


# ----------------------------------------------------------------------------------------------
# sample_few_shot
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shots", [1, 2, 4, 16])
def test_k_per_class_and_small_classes_keep_all(shots):
    labels = _table()
    idx = fewshot.sample_few_shot(labels, shots, seed=1, num_classes=7)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(_per_class(labels, idx, 7), np.minimum(SIZES, shots))
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats


def test_all_shots():
    labels = _table()
    np.testing.assert_array_equal(fewshot.sample_few_shot(labels, -1, 0), np.arange(labels.size))


def test_seeds():
    labels = _table()
    a = fewshot.sample_few_shot(labels, 4, 0)
    b = fewshot.sample_few_shot(labels, 4, 0)
    c = fewshot.sample_few_shot(labels, 4, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_independent_of_global_state_dtype_and_inference():
    labels = _table()
    np.random.seed(1)
    a = fewshot.sample_few_shot(labels.astype(np.int16), 4, 3)
    np.random.seed(2)
    b = fewshot.sample_few_shot(list(labels), 4, 3, num_classes=7)
    np.testing.assert_array_equal(a, b)


def test_draw_is_uniform_within_a_class():
    # Over many seeds, each of a class's 10 images is picked with probability 2/10.
    labels = np.repeat([0, 1], 10)
    hits = np.zeros(20)
    seeds = 2000
    for s in range(seeds):
        hits[fewshot.sample_few_shot(labels, 2, s)] += 1
    sigma = np.sqrt(0.2 * 0.8 / seeds)
    np.testing.assert_allclose(hits / seeds, 0.2, atol=5 * sigma)


@pytest.mark.parametrize("shots", [0, -2, 2.0, True])
def test_bad_shots(shots):
    with pytest.raises(ValueError, match="shots"):
        fewshot.sample_few_shot(_table(), shots, 0)


def test_labels_checked_against_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        fewshot.sample_few_shot(_table(), 2, 0, num_classes=5)  # labels go up to 6


# ----------------------------------------------------------------------------------------------
# sample_validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_validation_disjoint_min_k_4(shots):
    labels = _table()
    train = fewshot.sample_few_shot(labels, shots, 1)
    val = fewshot.sample_validation(labels, shots, 1, exclude=train)
    assert np.intersect1d(train, val).size == 0
    left = SIZES - np.minimum(SIZES, shots)  # what training left of each class
    np.testing.assert_array_equal(_per_class(labels, val, 7), np.minimum(left, min(shots, 4)))


def test_validation_from_own_split_and_all():
    val_labels = _table(sizes=np.array([10, 10, 2]), seed=4)
    val = fewshot.sample_validation(val_labels, 16, 0)
    np.testing.assert_array_equal(_per_class(val_labels, val, 3), [4, 4, 2])
    np.testing.assert_array_equal(fewshot.sample_validation(val_labels, -1, 0), np.arange(22))
    everything_but = fewshot.sample_validation(val_labels, -1, 0, exclude=[0, 5])
    np.testing.assert_array_equal(everything_but, np.setdiff1d(np.arange(22), [0, 5]))


def test_validation_seeds():
    labels = _table()
    a = fewshot.sample_validation(labels, 4, 0)
    np.testing.assert_array_equal(a, fewshot.sample_validation(labels, 4, 0))
    assert not np.array_equal(a, fewshot.sample_validation(labels, 4, 1))


# ----------------------------------------------------------------------------------------------
# sample_per_class_flips
# ----------------------------------------------------------------------------------------------


def _check_flips(labels, k, shots, f, kind, seed):
    idx, noisy, flipped = fewshot.sample_per_class_flips(labels, shots, f, kind, seed, num_classes=k)
    clean = labels[idx]
    assert np.unique(idx).size == idx.size  # each image at most once
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(flipped, noisy != clean)
    for c in range(k):
        mine = noisy == c
        assert mine.sum() == shots
        assert (mine & flipped).sum() == f  # exactly F foreign images per class
        assert np.all(clean[mine & ~flipped] == c)
        if kind == "pairflip":
            assert np.all(clean[mine & flipped] == (c + 1) % k)
    return idx, noisy, flipped


@pytest.mark.parametrize("kind", noise.PER_CLASS_KINDS)
@pytest.mark.parametrize("f", [0, 2, 4, 8, 12, 16])
def test_per_class_exact_flips(kind, f):
    k, shots = 6, 16
    labels = _table(sizes=np.full(k, 40), seed=2)
    _check_flips(labels, k, shots, f, kind, seed=3)


def test_symflip_sources_uniform_over_other_classes():
    k, shots, f = 3, 3000, 2000
    labels = _table(sizes=np.full(k, 5000), seed=6)
    idx, noisy, flipped = _check_flips(labels, k, shots, f, "symflip", seed=0)
    clean = labels[idx]
    sigma = np.sqrt(0.25 / f)
    for c in range(k):
        src = clean[(noisy == c) & flipped]
        assert not np.any(src == c)
        frac = np.bincount(src, minlength=k) / f
        expected = np.full(k, 0.5)
        expected[c] = 0.0
        np.testing.assert_allclose(frac, expected, atol=5 * sigma)


def test_per_class_seeds():
    labels = _table(sizes=np.full(5, 30))
    a = fewshot.sample_per_class_flips(labels, 8, 2, "symflip", 0)
    b = fewshot.sample_per_class_flips(labels, 8, 2, "symflip", 0)
    c = fewshot.sample_per_class_flips(labels, 8, 2, "symflip", 1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_per_class_small_class_keeps_its_images_and_still_gets_f():
    labels = _table(sizes=np.array([30, 2, 30, 30]), seed=1)
    idx, noisy, flipped = fewshot.sample_per_class_flips(labels, 8, 2, "symflip", 0)
    assert ((noisy == 1) & ~flipped).sum() == 2  # class 1 has only 2 images, both kept
    assert ((noisy == 1) & flipped).sum() == 2
    assert ((noisy == 0) & ~flipped).sum() == 6


def test_per_class_too_few_images_raises():
    labels = np.repeat(np.arange(3), 5)
    with pytest.raises(ValueError, match="pairflip"):
        # class 1 keeps 4 of its 5 for itself and cannot give 4 to class 0
        fewshot.sample_per_class_flips(labels, 8, 4, "pairflip", 0)


@pytest.mark.parametrize(
    "shots, f, kind",
    [(8, 9, "symflip"), (8, -1, "symflip"), (-1, 2, "symflip"), (8, 2, "sym"), (8, 2, "bogus")],
)
def test_per_class_bad_args(shots, f, kind):
    with pytest.raises(ValueError):
        fewshot.sample_per_class_flips(_table(), shots, f, kind, 0)


# ----------------------------------------------------------------------------------------------
# select_train
# ----------------------------------------------------------------------------------------------


def _clean_world(k=5, per=40, seed=9):
    return _table(sizes=np.full(k, per), seed=seed)


def _consistent(sel, labels):
    np.testing.assert_array_equal(sel.clean, labels[sel.indices])
    np.testing.assert_array_equal(sel.flipped, sel.noisy != sel.clean)
    for arr in (sel.indices, sel.clean, sel.noisy):
        assert arr.dtype == np.int64
    assert sel.flipped.dtype == np.bool_


def test_select_none_is_clean_few_shot():
    labels = _clean_world()
    sel = fewshot.select_train(labels, 5, 16, noise.NoiseSpec(), seed=0)
    _consistent(sel, labels)
    np.testing.assert_array_equal(sel.indices, fewshot.sample_few_shot(labels, 16, 0))
    np.testing.assert_array_equal(sel.noisy, sel.clean)
    assert not sel.flipped.any()


@pytest.mark.parametrize("kind", noise.LABEL_KINDS)
def test_select_label_kinds_keep_the_sample_and_add_exact_noise(kind):
    labels = _clean_world()
    sel = fewshot.select_train(labels, 5, 16, noise.NoiseSpec(kind, 0.5), seed=2)
    _consistent(sel, labels)
    # Same images as the clean run: noise draws from its own stream.
    np.testing.assert_array_equal(sel.indices, fewshot.sample_few_shot(labels, 16, 2))
    expected, _ = noise.corrupt_labels(sel.clean, 5, kind, 0.5, 2)
    np.testing.assert_array_equal(sel.noisy, expected)
    if kind != "sym_incl":
        assert sel.flipped.sum() == int(0.5 * 80)


@pytest.mark.parametrize("kind", noise.PER_CLASS_KINDS)
def test_select_per_class(kind):
    labels = _clean_world()
    sel = fewshot.select_train(labels, 5, 16, noise.NoiseSpec(kind, rate=0.25), seed=1)
    _consistent(sel, labels)
    for c in range(5):
        assert ((sel.noisy == c) & sel.flipped).sum() == 4  # int(0.25 * 16)
        assert (sel.noisy == c).sum() == 16
    sel2 = fewshot.select_train(labels, 5, 16, noise.NoiseSpec(kind, num_flips=4), seed=1)
    np.testing.assert_array_equal(sel.indices, sel2.indices)
    np.testing.assert_array_equal(sel.noisy, sel2.noisy)


def test_select_matrix():
    labels = _clean_world()
    t = np.array([[0.0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]])
    sel = fewshot.select_train(labels, 5, 8, noise.NoiseSpec("matrix", transition=t), seed=0)
    _consistent(sel, labels)
    np.testing.assert_array_equal(sel.noisy, (sel.clean + 1) % 5)
    with pytest.raises(ValueError, match="classes"):
        fewshot.select_train(labels, 5, 8, noise.NoiseSpec("matrix", transition=np.eye(3)), seed=0)


def test_select_real_noise():
    k = 4
    clean = _table(sizes=np.full(k, 30), seed=3)
    real = clean.copy()
    real[::3] = (real[::3] + 2) % k  # the dataset's own noisy labels
    clean_partly_unknown = clean.copy()
    clean_partly_unknown[1::5] = -1
    sel = fewshot.select_train(clean_partly_unknown, k, 8, noise.NoiseSpec("real"), seed=0, noisy_labels=real)
    # Sampled by the noisy labels, trained on them, no synthetic noise on top.
    np.testing.assert_array_equal(sel.indices, fewshot.sample_few_shot(real, 8, 0))
    np.testing.assert_array_equal(sel.noisy, real[sel.indices])
    np.testing.assert_array_equal(sel.clean, clean_partly_unknown[sel.indices])
    known = sel.clean >= 0
    np.testing.assert_array_equal(sel.flipped, known & (sel.noisy != sel.clean))
    assert sel.flipped.any() and (~known).any()
    # Clean labels entirely unknown.
    sel = fewshot.select_train(None, k, -1, noise.NoiseSpec("real"), seed=0, noisy_labels=real)
    np.testing.assert_array_equal(sel.noisy, real)
    assert np.all(sel.clean == -1) and not sel.flipped.any()


def test_select_refuses_mixing_real_and_synthetic():
    labels = _clean_world()
    with pytest.raises(ValueError, match="noisy_labels"):
        fewshot.select_train(labels, 5, 8, noise.NoiseSpec("sym", 0.5), 0, noisy_labels=labels)
    with pytest.raises(ValueError, match="noisy_labels"):
        fewshot.select_train(labels, 5, 8, noise.NoiseSpec("real"), 0)


def test_select_seed_zero_is_a_seed():
    labels = _clean_world()
    spec = noise.NoiseSpec("sym", 0.5)
    a = fewshot.select_train(labels, 5, 8, spec, 0)
    b = fewshot.select_train(labels, 5, 8, spec, 0)
    c = fewshot.select_train(labels, 5, 8, spec, 1)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.noisy, b.noisy)
    assert not np.array_equal(a.indices, c.indices)


def test_select_checks_num_classes():
    labels = _clean_world()
    with pytest.raises(ValueError, match="num_classes"):
        fewshot.select_train(labels, 4, 8, noise.NoiseSpec(), 0)
    sel = fewshot.select_train(labels, None, 8, noise.NoiseSpec("asym", 1.0), 0)
    np.testing.assert_array_equal(sel.noisy, (sel.clean + 1) % 5)  # K inferred as 5
