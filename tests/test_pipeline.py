"""The tf.data pipeline and the sources behind it, offline, on data the tests write.

Sources: a folder of PNGs, CoOp split files, a CSV with its own noisy labels, in-memory arrays,
tfds' mock_data (caltech101, cifar10_n: real registry entries) and real tfds records of the local
FGVC-Aircraft builder prepared from a tiny folder. References: hand-computed normalized colours,
numpy slices for the center crop, PIL's bicubic resize, and the files the test wrote.
"""

import csv
import glob
import itertools
import json
import os
import pathlib
import time

import numpy as np
import pytest
from PIL import Image, ImageFilter

import tensorflow as tf  # noqa: E402 -- a core dependency: missing, these tests must fail, not skip
import tensorflow_datasets as tfds  # noqa: E402

from dspt_jax.data import classnames as cn  # noqa: E402
from dspt_jax.data import datasets as D  # noqa: E402
from dspt_jax.data import noise, pipeline, prepare, sources  # noqa: E402

SIZE = 32
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
CLASSES = ["cat_a", "dog_b", "eel_c"]
SHAPES = [(24, 36), (40, 32), (32, 32), (33, 45), (50, 38), (32, 41)]


def take(iterator, n):
    """The first n items; closes the (endless) iterator so tf.data shuts down cleanly."""
    out = list(itertools.islice(iterator, n))
    iterator.close()
    return out


def colour(k):
    """A distinct constant colour per file index k (< 64)."""
    return np.array([(37 * k + 11) % 256, (91 * k + 5) % 256, (53 * k + 200) % 256], np.uint8)


def expected_normalized(rgb):
    return (np.asarray(rgb, np.float64) / 255.0 - MEAN) / STD


def identify(image, colours):
    """Index of the constant colour an image [S, S, 3] (normalized) was made of."""
    pixel = image.reshape(-1, 3).mean(0)
    dist = [np.abs(pixel - expected_normalized(c)).max() for c in colours]
    k = int(np.argmin(dist))
    assert dist[k] < 1e-4 and np.ptp(image.reshape(-1, 3), axis=0).max() < 1e-4
    return k


def image_folder(root, classes, train_count, test_count):
    """root/<class>/{0..}.png (train_count each, random pixels) and root/test/<class>/*.png."""
    rng = np.random.default_rng(0)
    for part, count in (("", train_count), ("test", test_count)):
        for c in classes:
            d = root / part / c
            d.mkdir(parents=True)
            for i in range(count):
                h, w = SHAPES[i % len(SHAPES)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/<class>/*.png (6 each) and root/test/<class>/*.png (3 each)."""
    return image_folder(tmp_path_factory.mktemp("folder") / "imgs", CLASSES, 6, 3)


@pytest.fixture(scope="module")
def folder_task(folder):
    return pipeline.load_task({"name": "folder", "folder": folder, "shots": 4, "image_size": SIZE})


def class_of(task, ids):
    """Class index of each id from the file's folder name (what the test wrote)."""
    paths = task.train_pool.pool.paths
    return np.array([CLASSES.index(os.path.basename(os.path.dirname(paths[i]))) for i in ids])


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def test_constant_colour_normalizes_to_hand_computed_value():
    colours = [colour(k) for k in range(6)]
    images = np.stack([np.broadcast_to(c, (20, 28, 3)) for c in colours]).astype(np.uint8)
    labels = np.arange(6) % 2
    D.register_array_dataset("test_constant_colours", ["red", "blue"], (images, labels),
                             (images, labels), overwrite=True)
    try:
        task = pipeline.load_task({"name": "test_constant_colours", "shots": 3, "image_size": SIZE})
        batches = list(pipeline.eval_batches(task, "test", global_batch_size=4))
        rows = [(b["image"][r], b["id"][r]) for b in batches for r in range(4) if b["mask"][r]]
        assert len(rows) == 6
        for image, example_id in rows:
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32
            want = expected_normalized(colours[example_id])  # (c / 255 - mean) / std, by hand
            np.testing.assert_allclose(image, np.broadcast_to(want, image.shape), atol=1e-5)
        # A crop + flip of a constant image is the same constant.
        for b in take(pipeline.train_batches(task, global_batch_size=2, seed=3, augment=True), 3):
            for image, example_id in zip(b["image"], b["id"]):
                np.testing.assert_allclose(image, np.broadcast_to(
                    expected_normalized(colours[example_id]), image.shape), atol=1e-5)
    finally:
        D.DATASETS.pop("test_constant_colours")


@pytest.mark.parametrize("shape,top,left", [((32, 41), 0, 4), ((32, 43), 0, 6), ((45, 32), 6, 0),
                                            ((32, 32), 0, 0)])
def test_center_crop_offsets_follow_torchvision(shape, top, left):
    # Shorter side already 32: no resize; offsets round((d - 32) / 2) with round-half-even.
    image = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
    out = pipeline.resize_center_crop(tf.constant(image), 32).numpy()
    np.testing.assert_allclose(out, image[top : top + 32, left : left + 32].astype(np.float32), atol=1e-3)


def test_resize_shorter_side_matches_pil_bicubic():
    y, x = np.mgrid[0:90, 0:120]
    image = np.stack([(x * 2) % 256, (y * 3) % 256, (x + y) % 256], -1).astype(np.uint8)
    image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(2)))
    ours = pipeline.resize_center_crop(tf.constant(image), 45).numpy()
    # torchvision on PIL: shorter side 90 -> 45, longer int(45 * 120 / 90) = 60, crop left
    # round(15 / 2) = 8 (round half to even).
    pil = np.asarray(Image.fromarray(image).resize((60, 45), Image.BICUBIC), np.float32)[:, 8:53]
    assert ours.shape == (45, 45, 3)
    diff = np.abs(ours - pil)
    assert diff.mean() < 0.5 and diff.max() <= 1, (diff.mean(), diff.max())  # off-by-one crops: >= 1.6


def test_random_resized_crop_is_a_resized_box_of_the_image():
    # A horizontal ramp: any crop resized is still monotone along x, and values stay in range.
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (48, 1, 3))
    outs = [pipeline.random_resized_crop(tf.constant(ramp), SIZE, tf.constant([5, s], tf.int64),
                                         flip=False).numpy() for s in range(8)]
    for out in outs:
        assert out.shape == (SIZE, SIZE, 3) and out.min() >= 0 and out.max() <= 255
        row = out[SIZE // 2, :, 0]
        assert np.all(np.diff(row) >= -1)  # monotone up to bicubic ringing
    assert len({o.tobytes() for o in outs}) == 8  # different seeds, different boxes
    again = pipeline.random_resized_crop(tf.constant(ramp), SIZE, tf.constant([5, 0], tf.int64), flip=False)
    np.testing.assert_array_equal(again.numpy(), outs[0])


# ---------------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------------


def test_train_batches_shapes_labels_ids_and_epoch(folder_task):
    task = folder_task
    assert task.classnames == ("cat a", "dog b", "eel c")
    assert (task.train_size, task.test_size, task.val_size) == (12, 9, 6)  # val: 2 left per class
    assert not set(task.val.ids) & set(task.train.ids)
    batches = take(pipeline.train_batches(task, global_batch_size=4, seed=0), 6)  # two epochs
    for b in batches:
        assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["clean_label"].dtype == np.int32
        assert b["id"].dtype == np.int64 and b["mask"].all() and not b["flipped"].any()
        lo, hi = expected_normalized([0, 0, 0]).min(), expected_normalized([255, 255, 255]).max()
        assert b["image"].min() >= lo - 1e-5 and b["image"].max() <= hi + 1e-5
        np.testing.assert_array_equal(b["label"], class_of(task, b["id"]))
        np.testing.assert_array_equal(b["clean_label"], b["label"])
    epochs = [np.concatenate([b["id"] for b in batches[e * 3 : e * 3 + 3]]) for e in range(2)]
    for ids in epochs:
        assert sorted(ids.tolist()) == sorted(task.train.ids.tolist())  # each example once per epoch
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert pipeline.steps_per_epoch(task, 4) == 3


def test_augment_off_is_center_crop_and_deterministic(folder_task):
    task = folder_task
    a = take(pipeline.train_batches(task, global_batch_size=4, seed=0, augment=False), 2)
    b = take(pipeline.train_batches(task, global_batch_size=4, seed=0, augment=False), 2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        for image, example_id in zip(x["image"], x["id"]):
            raw = tf.io.decode_png(tf.io.read_file(task.train_pool.pool.paths[example_id]), channels=3)
            np.testing.assert_array_equal(image, pipeline.eval_image(raw, SIZE).numpy())


def test_augment_on_same_seed_same_batches_new_crops_each_epoch(folder_task):
    task = folder_task
    run1 = take(pipeline.train_batches(task, global_batch_size=4, seed=7, augment=True), 6)
    run2 = take(pipeline.train_batches(task, global_batch_size=4, seed=7, augment=True), 6)
    for x, y in zip(run1, run2):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    seen = {}
    differing = 0
    for step, b in enumerate(run1):
        for image, example_id in zip(b["image"], b["id"]):
            if step >= 3:  # second epoch: the same example gets another crop
                differing += not np.array_equal(seen[example_id], image)
            else:
                seen[example_id] = image
    assert differing == 12
    other = take(pipeline.train_batches(task, global_batch_size=4, seed=8, augment=True), 1)[0]
    assert not np.array_equal(other["id"], run1[0]["id"]) or not np.array_equal(other["image"], run1[0]["image"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_train_batch_independent_of_process_count(folder_task, process_count):
    single = take(pipeline.train_batches(folder_task, global_batch_size=4, seed=2), 4)
    hosts = [take(pipeline.train_batches(folder_task, global_batch_size=4, seed=2,
                                         process_index=p, process_count=process_count), 4)
             for p in range(process_count)]
    for step in range(4):
        for k in single[step]:
            joined = np.concatenate([hosts[p][step][k] for p in range(process_count)])
            np.testing.assert_array_equal(joined, single[step][k])


def test_resume_with_start_step_equals_continuing(folder_task):
    full = take(pipeline.train_batches(folder_task, global_batch_size=4, seed=5), 7)
    resumed = take(pipeline.train_batches(folder_task, global_batch_size=4, seed=5, start_step=4), 3)
    for x, y in zip(full[4:], resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_batch_checks(folder_task):
    # Checked when the iterator is made, not at the first batch.
    with pytest.raises(ValueError, match="fewer than 16 per step"):
        pipeline.train_batches(folder_task, global_batch_size=16, seed=0)
    with pytest.raises(ValueError, match="examples_per_step must be in"):
        pipeline.train_batches(folder_task, global_batch_size=4, examples_per_step=5, seed=0)
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.train_batches(folder_task, global_batch_size=4, seed=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.eval_batches(folder_task, global_batch_size=4, process_index=2, process_count=2)


@pytest.mark.parametrize("hosts", [1, 2])
def test_padded_steps_train_on_the_same_examples(folder_task, hosts):
    """A step padded to a multiple of the devices: its real rows are the unpadded step's, images (augmented
    with the same seeds) included, and the padding rows are masked out."""
    n = folder_task.train_size
    padded_batch = n + 3 + (n + 3) % 2  # room for 3-4 padding rows, divisible by both host counts
    plain = take(pipeline.train_batches(folder_task, global_batch_size=n, seed=5, augment=True), 3)
    parts = [
        take(pipeline.train_batches(folder_task, global_batch_size=padded_batch, examples_per_step=n, seed=5,
                                    augment=True, process_index=p, process_count=hosts), 3)
        for p in range(hosts)
    ]
    for s in range(3):
        step = {k: np.concatenate([part[s][k] for part in parts]) for k in plain[s]}
        assert step["mask"].tolist() == [True] * n + [False] * (padded_batch - n)
        for key in ("image", "label", "clean_label", "id", "flipped"):
            np.testing.assert_array_equal(step[key][:n], plain[s][key], err_msg=key)
    assert pipeline.steps_per_epoch(folder_task, padded_batch, examples_per_step=n) == 1


# ---------------------------------------------------------------------------------------------
# Evaluation batches
# ---------------------------------------------------------------------------------------------


def collect_eval(task, split, batch, hosts):
    per_host = [list(pipeline.eval_batches(task, split, global_batch_size=batch, process_index=p,
                                           process_count=hosts)) for p in range(hosts)]
    return per_host


@pytest.mark.parametrize("batch,hosts", [(1, 1), (2, 1), (4, 1), (4, 2), (6, 2), (6, 3), (2, 2), (8, 4)])
def test_eval_sees_every_example_once(folder_task, batch, hosts):
    task = folder_task
    per_host = collect_eval(task, "test", batch, hosts)
    counts = {len(h) for h in per_host}
    assert counts == {pipeline.num_eval_batches(task, "test", batch, hosts)}  # equal on all hosts
    ids = []
    for h in per_host:
        for b in h:
            assert b["image"].shape == (batch // hosts, SIZE, SIZE, 3)
            assert np.all(b["id"][~b["mask"]] == -1) and np.all(b["clean_label"][~b["mask"]] == -1)
            real = b["id"][b["mask"]]
            np.testing.assert_array_equal(b["label"][b["mask"]], class_of(task, real))
            ids += real.tolist()
    assert sorted(ids) == sorted(task.test.ids.tolist()) and len(ids) == len(set(ids)) == 9


def test_eval_on_val_and_train_splits(folder_task):
    for split, size in (("val", 6), ("train", 12)):
        ids = [i for b in pipeline.eval_batches(folder_task, split, global_batch_size=5)
               for i in b["id"][b["mask"]]]
        assert sorted(ids) == sorted(folder_task.examples(split).ids.tolist()) and len(ids) == size
    with pytest.raises(ValueError, match="unknown split"):
        folder_task.examples("dev")


def test_an_undecodable_image_is_named(tmp_path):
    root = tmp_path / "imgs"
    image_folder(root, ("cat", "dog"), 4, 3)
    (root / "test" / "dog" / "1.png").write_bytes(b"not an image")
    (root / "cat" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    task = pipeline.load_task({"name": "folder", "folder": str(root), "shots": 4, "image_size": SIZE})
    with pytest.raises(pipeline.UnreadableImageError, match=r"test batches: .*test/dog/1\.png: Unknown image"):
        list(pipeline.eval_batches(task, "test", global_batch_size=2))
    for _ in range(2):  # before and after training has loaded its payloads
        with pytest.raises(pipeline.UnreadableImageError, match=r"cat/2\.png: Invalid PNG"):
            list(pipeline.eval_batches(task, "train", global_batch_size=2))
        task.train_payloads()
    with pytest.raises(pipeline.UnreadableImageError, match=r"training batches: .*cat/2\.png"):
        take(pipeline.train_batches(task, global_batch_size=4, seed=0), 4)


# ---------------------------------------------------------------------------------------------
# Noise, records, CSV
# ---------------------------------------------------------------------------------------------


def test_noise_record_lands_in_workdir(folder, tmp_path):
    cfg = {"name": "folder", "folder": folder, "shots": 4, "image_size": SIZE,
           "noise": {"kind": "sym", "rate": 0.5}}
    task = pipeline.load_task(cfg, workdir=str(tmp_path))
    name = noise.record_name("folder-imgs", "train", 4, noise.NoiseSpec("sym", 0.5), 1)
    assert task.record_path == str(tmp_path / "noise" / f"{name}.json") and os.path.isfile(task.record_path)
    rec = noise.load_record(task.record_path)
    np.testing.assert_array_equal(rec["ids"], task.train.ids)
    np.testing.assert_array_equal(rec["noisy"], task.train.labels)
    np.testing.assert_array_equal(rec["clean"], class_of(task, task.train.ids))
    assert rec["flipped"].sum() == 6  # exactly int(0.5 * 12)
    b = take(pipeline.train_batches(task, global_batch_size=12, seed=0), 1)[0]
    np.testing.assert_array_equal(b["flipped"], b["label"] != b["clean_label"])
    assert b["flipped"].sum() == 6
    pipeline.load_task(cfg, workdir=str(tmp_path))  # same labels again: accepted
    with open(task.record_path) as f:
        data = json.load(f)
    data["noisy"][0] = (data["noisy"][0] + 1) % 3
    with open(task.record_path, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match="other training labels"):
        pipeline.load_task(cfg, workdir=str(tmp_path))


def test_symflip_through_the_pipeline(folder):
    task = pipeline.load_task({"name": "folder", "folder": folder, "shots": 4, "image_size": SIZE,
                               "noise": {"kind": "symflip", "num_flips": 1}})
    truth = class_of(task, task.train.ids)
    np.testing.assert_array_equal(task.train.clean, truth)
    for c in range(3):
        mine = task.train.labels == c
        assert mine.sum() == 4 and (truth[mine] != c).sum() == 1


def test_csv_source_with_its_own_noisy_labels(folder, tmp_path):
    rows = []
    for c in CLASSES:
        for i in range(6):
            noisy = CLASSES[(CLASSES.index(c) + 1) % 3] if i == 0 else c
            rows.append({"path": f"{c}/{i}.png", "label": noisy, "clean_label": c if i != 5 else "",
                         "split": "train"})
        for i in range(3):
            rows.append({"path": f"test/{c}/{i}.png", "label": c, "clean_label": "", "split": "test"})
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "clean_label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    cfg = {"name": "csv", "csv": str(path), "folder": folder, "shots": -1, "image_size": SIZE,
           "noise": {"kind": "real"}}
    task = pipeline.load_task(cfg)
    assert task.train_size == 18 and task.test_size == 9 and task.real_noise
    assert task.name == "labels"  # the CSV's name, not "csv"
    b = take(pipeline.train_batches(task, global_batch_size=18, seed=0), 1)[0]
    for label, clean, example_id, flipped in zip(b["label"], b["clean_label"], b["id"], b["flipped"]):
        row = rows[example_id]  # ids are CSV row indices
        assert CLASSES[label] == row["label"]
        assert clean == (CLASSES.index(row["clean_label"]) if row["clean_label"] else -1)
        assert flipped == (clean >= 0 and clean != label)
    assert b["flipped"].sum() == 3
    test_labels = [CLASSES[y] for t in pipeline.eval_batches(task, "test", global_batch_size=9)
                   for y in t["label"]]
    assert test_labels == [r["label"] for r in rows if r["split"] == "test"]
    with pytest.raises(ValueError, match="noise.kind='real'"):
        pipeline.load_task(dict(cfg, noise={"kind": "none"}))
    with pytest.raises(ValueError, match="has none"):
        pipeline.load_task({"name": "folder", "folder": folder, "noise": {"kind": "real"}})


# ---------------------------------------------------------------------------------------------
# CoOp split files
# ---------------------------------------------------------------------------------------------


def test_split_file_with_folder_selects_exactly_its_files(tmp_path):
    root = tmp_path / "images"
    split = {"train": [], "val": [], "test": []}
    k = 0
    for label, c in enumerate(["snow_owl", "ant"]):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.broadcast_to(colour(k), (12, 16, 3)).copy()).save(root / c / f"{i}.png")
            part = "train" if i < 3 else "val" if i < 4 else "test" if i < 6 else None  # 6, 7: unlisted
            if part:
                split[part].append([f"{c}/{i}.png", label, c])
            k += 1
    path = tmp_path / "split_zhou_Mine.json"
    path.write_text(json.dumps(split))
    task = pipeline.load_task({"name": "folder", "folder": str(root), "split_file": str(path),
                               "shots": 16, "image_size": SIZE})
    assert task.classnames == ("snow owl", "ant")
    paths = task.train_pool.pool.paths
    for part, ex in (("train", task.train), ("val", task.val), ("test", task.test)):
        assert [os.path.relpath(paths[i], root) for i in ex.ids] == [p for p, _, _ in split[part]]
        assert ex.labels.tolist() == [y for _, y, _ in split[part]]
    assert task.dataset_id == "folder-split_zhou_Mine"
    # Your own data is named by its folder (or data.display_name), so two folders never share a table row.
    assert task.name == "images" and task.test_as_coop is None
    named = pipeline.load_task({"name": "folder", "folder": str(root), "split_file": str(path), "shots": 16,
                                "image_size": SIZE, "display_name": "owls and ants"})
    assert named.name == "owls and ants"


def write_coop_eurosat(root, per_class=3):
    """CoOp's $DATA/eurosat layout: 2750/<Folder>/*.png and split_zhou_EuroSAT.json (1 train, 1 val, the
    rest test per class). Returns the split."""
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(cn.EUROSAT):
        folder = name.title().replace(" ", "")
        (root / "eurosat" / "2750" / folder).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.broadcast_to(colour(label), (12, 12, 3)).copy()).save(
                root / "eurosat" / "2750" / folder / f"{i}.png")
            split["train" if i == 0 else "val" if i == 1 else "test"].append([f"{folder}/{i}.png", label, name])
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return split


def test_coop_split_file_is_found_where_coops_layout_puts_it(tmp_path, monkeypatch):
    """split_file="auto" (the default): CoOp's split file and image folder under data.coop_root (or $DATA)
    are used, no tfds needed, and the task says so."""
    split = write_coop_eurosat(tmp_path)
    for how in ("coop_root", "env"):
        if how == "env":
            monkeypatch.setenv("DATA", str(tmp_path))
        cfg = {"name": "eurosat", "shots": 1, "image_size": SIZE}
        task = pipeline.load_task(dict(cfg, coop_root=str(tmp_path)) if how == "coop_root" else cfg)
        assert task.test_as_coop is True
        assert task.splits == (f"CoOp's split file {tmp_path}/eurosat/split_zhou_EuroSAT.json (images from "
                               f"{tmp_path}/eurosat/2750)")
        paths = task.train_pool.pool.paths
        assert [os.path.relpath(paths[i], tmp_path / "eurosat" / "2750") for i in task.test.ids] == [
            p for p, _, _ in split["test"]]
        assert task.dataset_id == "eurosat-split_zhou_EuroSAT"
    # split_file=None opts out: the tfds route, which is not prepared here.
    with pytest.raises(sources.DatasetNotPreparedError):
        pipeline.load_task({"name": "eurosat", "shots": 1, "split_file": None, "data_dir": str(tmp_path / "t")})


def test_split_file_of_other_classes_is_refused(tmp_path):
    """A 4-class split file given for caltech101 (100 classes) is refused, not trained as 100 classes."""
    root = tmp_path / "images"
    split = {"train": [], "val": [], "test": []}
    for label, c in enumerate(["w", "x", "y", "z"]):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / c / "0.png")
        for part in split:
            split[part].append([f"{c}/0.png", label, c])
    path = tmp_path / "split_zhou_Mine.json"
    path.write_text(json.dumps(split))
    with pytest.raises(ValueError, match="has 4 classes .*caltech101 has 100.*data.name='folder'"):
        pipeline.load_task({"name": "caltech101", "folder": str(root), "split_file": str(path)})
    task = pipeline.load_task({"name": "folder", "folder": str(root), "split_file": str(path), "shots": 1})
    assert task.num_classes == 4 and task.test_as_coop is None


@pytest.fixture(scope="module")
def fgvc(tmp_path_factory):
    """Real tfds records of the local FGVC-Aircraft builder, prepared from a tiny CoOp folder."""
    manual = tmp_path_factory.mktemp("fgvc_aircraft")
    (manual / "images").mkdir()
    (manual / "variants.txt").write_text("\n".join(cn.FGVC_AIRCRAFT) + "\n")
    files, k = {}, 0
    for split, per_class in (("train", 3), ("val", 2), ("test", 3)):
        lines = []
        for label in (0, 5, 7):
            for _ in range(per_class):
                name = f"{1000000 + k}"
                # PNG bytes under a .jpg name: decoding sniffs the format; colours stay exact.
                Image.fromarray(np.broadcast_to(colour(k), (10, 14, 3)).copy()).save(
                    manual / "images" / f"{name}.jpg", format="PNG")
                lines.append(f"{name} {cn.FGVC_AIRCRAFT[label]}")
                files[k] = (split, f"{name}.jpg", label)
                k += 1
        (manual / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = prepare.prepare("fgvc_aircraft", str(manual), data_dir)
    assert builder.is_prepared()
    return data_dir, files


def test_local_builder_multi_host_eval_reads_each_file_once(fgvc):
    data_dir, files = fgvc
    task = pipeline.load_task({"name": "fgvc_aircraft", "data_dir": data_dir, "shots": 2,
                               "image_size": SIZE})
    assert task.num_classes == 100 and task.train_size == 6 and task.val_size == 6
    colours = [colour(k) for k in range(len(files))]
    seen = []
    for hosts in (1, 2):
        per_host = collect_eval(task, "test", 4, hosts)  # 2 hosts: tfds slices test[0:4], test[4:9]
        assert len({len(h) for h in per_host}) == 1
        got = [(identify(img, colours), y) for h in per_host for b in h
               for img, y, m in zip(b["image"], b["label"], b["mask"]) if m]
        assert sorted(k for k, _ in got) == [k for k, v in files.items() if v[0] == "test"]
        assert all(files[k][2] == y for k, y in got)
        seen.append(sorted(got))
    assert seen[0] == seen[1]


def test_train_eval_reuses_the_training_payloads(fgvc, monkeypatch):
    # Once training has read the few-shot payloads, evaluating the train split must not read the tfds
    # source again, and must give the same batches (ids, labels, pixels) as reading it.
    data_dir, files = fgvc
    task = pipeline.load_task({"name": "fgvc_aircraft", "data_dir": data_dir, "shots": 2,
                               "image_size": SIZE, "noise": {"kind": "sym", "rate": 0.5}})
    assert task._payloads is None
    from_source = {h: collect_eval(task, "train", 4, h) for h in (1, 2)}
    task.train_payloads()

    def no_read(ids):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(task.train.pool, "stream", no_read)
    for hosts, want in from_source.items():
        got = collect_eval(task, "train", 4, hosts)
        assert [len(h) for h in got] == [len(h) for h in want]
        for gh, wh in zip(got, want):
            for g, w in zip(gh, wh):
                assert g.keys() == w.keys()
                for k in g:
                    np.testing.assert_array_equal(g[k], w[k])
    ids = [i for h in from_source[2] for b in h for i in b["id"][b["mask"]]]
    assert sorted(ids) == sorted(task.train.ids.tolist()) and len(ids) == 6


def test_label_tables_are_cached_and_invalidated_by_the_data(fgvc, monkeypatch, tmp_path):
    data_dir, _ = fgvc
    monkeypatch.setenv("DSPT_JAX_CACHE", str(tmp_path / "cache"))
    cfg = {"name": "fgvc_aircraft", "data_dir": data_dir, "shots": 2, "image_size": SIZE}
    first = pipeline.load_task(cfg)
    cached = sorted(os.listdir(tmp_path / "cache" / "tfds_tables"))
    assert len(cached) == 3 and all(n.startswith("coop_fgvc_aircraft-") for n in cached)  # train/val/test
    real_as_dataset = tfds.core.DatasetBuilder.as_dataset
    reads = []

    def counted(self, *args, **kwargs):
        reads.append(kwargs.get("split"))
        return real_as_dataset(self, *args, **kwargs)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", counted)
    again = pipeline.load_task(cfg)
    assert reads == []  # every table came from the cache
    for split in ("train", "val", "test"):
        a, b = first.examples(split), again.examples(split)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.clean, b.clean)
    # Touching one record file (a rebuilt dataset) invalidates the tables of its builder.
    record = sorted(glob.glob(os.path.join(data_dir, "**", "*.tfrecord*"), recursive=True))[0]
    st = os.stat(record)
    os.utime(record, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    sources._data_fingerprint.cache_clear()  # listed once per process; a new process sees the change
    third = pipeline.load_task(cfg)
    assert sorted(reads) == ["test", "train", "val"]
    np.testing.assert_array_equal(third.train.ids, first.train.ids)
    # A corrupt cache file (junk, cut in half, empty) is ignored and rewritten.
    table_file = sources._table_cache_path(third.train.pool.builder, "train", ["label"])
    assert table_file.startswith(str(tmp_path / "cache")) and os.path.isfile(table_file)
    good = pathlib.Path(table_file).read_bytes()
    for bad in (b"not an npz", good[: len(good) // 2], b""):
        pathlib.Path(table_file).write_bytes(bad)
        again = pipeline.load_task(cfg)
        np.testing.assert_array_equal(again.train.ids, first.train.ids)
        assert pathlib.Path(table_file).read_bytes() == good
    assert oct(os.stat(table_file).st_mode & 0o777) == oct(0o644)
    assert not [n for n in os.listdir(tmp_path / "cache" / "tfds_tables") if n.startswith(".tmp-")]


def test_split_file_on_tfds_is_matched_by_file_name(fgvc, tmp_path):
    data_dir, files = fgvc
    # CoOp-style file: a new partition of the same images across the builder's splits.
    chosen = {"train": [0, 3, 9, 10, 18], "val": [1, 19], "test": [2, 11, 20, 21, 22]}
    split = {part: [[files[k][1], files[k][2], cn.FGVC_AIRCRAFT[files[k][2]]] for k in ks]
             for part, ks in chosen.items()}
    # CoOp's files list every class; those without an image in the mock builder are skipped with a warning.
    present = {files[k][2] for ks in chosen.values() for k in ks}
    split["test"] += [[f"absent_{c}.jpg", c, name] for c, name in enumerate(cn.FGVC_AIRCRAFT) if c not in present]
    path = tmp_path / "split_zhou_FGVC.json"
    path.write_text(json.dumps(split))
    task = pipeline.load_task({"name": "fgvc_aircraft", "data_dir": data_dir, "split_file": str(path),
                               "shots": 16, "image_size": SIZE})
    colours = [colour(k) for k in range(len(files))]
    for part in ("train", "val", "test"):
        got = sorted(identify(img, colours) for b in pipeline.eval_batches(task, part, global_batch_size=4)
                     for img, m in zip(b["image"], b["mask"]) if m)
        assert got == sorted(chosen[part]), part


# ---------------------------------------------------------------------------------------------
# tfds mock data (real registry entries), missing data
# ---------------------------------------------------------------------------------------------


def write_metadata(name, data_dir, splits):
    """dataset_info.json + features.json, as a prepared dataset has them (so is_prepared() holds)."""
    builder = tfds.builder(name, data_dir=data_dir)
    os.makedirs(builder.data_dir, exist_ok=True)
    template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=builder.name,
                                             split="train", filetype_suffix="tfrecord")
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0,
                            filename_template=template.replace(split=s))
        for s, n in splits.items()]))
    builder.info.write_to_directory(builder.data_dir)


def raw_table(name, data_dir, split, fields):
    builder = tfds.builder(name, data_dir=data_dir)
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    rows = [{k: ex[k] for k in fields} for ex in ds.as_numpy_iterator()]
    return {k: np.array([r[k] for r in rows]) for k in fields}, builder.info.features["label"].names


def test_mock_caltech101(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA", raising=False)  # no CoOp layout to find: tfds' own splits
    data_dir = str(tmp_path)
    write_metadata("caltech101", data_dir, {"train": 40, "test": 40})
    with tfds.testing.mock_data(num_examples=40, data_dir=data_dir):
        task = pipeline.load_task({"name": "caltech101", "data_dir": data_dir, "shots": 1,
                                   "image_size": SIZE})
        raw, names = raw_table("caltech101", data_dir, "train", ["label"])
        eval_batches = list(pipeline.eval_batches(task, "test", global_batch_size=8))
        train = take(pipeline.train_batches(task, global_batch_size=2, seed=0), 2)
    info = D.get_dataset_info("caltech101")
    mapped = info.map_source_labels(names)[raw["label"]]
    kept = np.flatnonzero(mapped >= 0)  # background_google / faces_easy examples are dropped
    assert 0 < raw["label"].size - kept.size  # the mock data hold some: the drop path is exercised
    assert task.num_classes == 100 and task.classnames == cn.CALTECH101
    assert task.splits == "tfds 'caltech101' splits" and task.test_as_coop is False  # not CoOp's test images
    np.testing.assert_array_equal(task.train_pool.ids, kept)
    np.testing.assert_array_equal(task.train_pool.labels, mapped[kept])
    assert task.train_size == np.unique(mapped[kept]).size  # one shot per present class
    for b in train:
        np.testing.assert_array_equal(b["label"], mapped[b["id"]])
    test_ids = [i for b in eval_batches for i in b["id"][b["mask"]]]
    assert sorted(test_ids) == task.test.ids.tolist()
    assert eval_batches[0]["image"].shape == (8, SIZE, SIZE, 3)
    assert np.isfinite(eval_batches[0]["image"]).all()


def test_mock_cifar10n_label_column(tmp_path):
    data_dir = str(tmp_path)
    write_metadata("cifar10_n", data_dir, {"train": 30, "test": 30})
    cfg = {"name": "cifar10n", "data_dir": data_dir, "shots": 2, "image_size": SIZE,
           "label_column": "aggre_label", "noise": {"kind": "real"}}
    with tfds.testing.mock_data(num_examples=30, data_dir=data_dir):
        task = pipeline.load_task(cfg)
        clean_task = pipeline.load_task(dict(cfg, noise={"kind": "none"}))
        raw, _ = raw_table("cifar10_n", data_dir, "train", ["label", "aggre_label"])
        with pytest.raises(ValueError, match="label_column"):
            pipeline.load_task(dict(cfg, label_column="coarse"))
    assert task.classnames[0] == "airplane" and task.dataset_id == "cifar10n-aggre_label"
    np.testing.assert_array_equal(task.train_pool.labels, raw["aggre_label"])
    np.testing.assert_array_equal(task.train_pool.clean, raw["label"])
    np.testing.assert_array_equal(task.selection.flipped, task.train.labels != task.train.clean)
    np.testing.assert_array_equal(task.train.labels, raw["aggre_label"][task.train.ids])
    np.testing.assert_array_equal(clean_task.train.labels, raw["label"][clean_task.train.ids])


def test_mock_eurosat_without_test_split_is_carved(tmp_path):
    data_dir = str(tmp_path)
    write_metadata("eurosat/rgb", data_dir, {"train": 50})
    with tfds.testing.mock_data(num_examples=50, data_dir=data_dir):
        task = pipeline.load_task({"name": "eurosat", "data_dir": data_dir, "shots": 1,
                                   "image_size": SIZE})
        raw, names = raw_table("eurosat/rgb", data_dir, "train", ["label"])
    labels = D.get_dataset_info("eurosat").map_source_labels(names)[raw["label"]]
    carved_train, carved_val, carved_test = sources.coop_carve(labels, 10, seed=0)
    np.testing.assert_array_equal(task.train_pool.ids, carved_train)
    np.testing.assert_array_equal(task.test.ids, carved_test)
    assert set(task.val.ids) <= set(carved_val) and task.dataset_id == "eurosat-carve0"
    np.testing.assert_array_equal(task.test.labels, labels[carved_test])


def test_mock_food101n(tmp_path):
    data_dir = str(tmp_path / "tfds")
    write_metadata("food101", data_dir, {"train": 20, "validation": 20})
    root = tmp_path / "Food-101N_release"
    for c in ("baklava", "apple_pie", "cheese_plate"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / c / f"{c[:2]}{i}.jpg")
    (root / "meta").mkdir()
    (root / "meta" / "verified_train.tsv").write_text(
        "class_name/key\tverification_label\napple_pie/ap0.jpg\t1\napple_pie/ap1.jpg\t0\n"
        "cheese_plate/ch2.jpg\t1\n")
    cfg = {"name": "food101n", "folder": str(root), "data_dir": data_dir, "shots": 3,
           "image_size": SIZE, "noise": {"kind": "real"}}
    with tfds.testing.mock_data(num_examples=20, data_dir=data_dir):
        task = pipeline.load_task(cfg)
        raw, names = raw_table("food101", data_dir, "validation", ["label"])
        with pytest.raises(ValueError, match="noise.kind='real'"):
            pipeline.load_task(dict(cfg, noise={"kind": "sym", "rate": 0.2}))
    food = D.get_dataset_info("food101")
    files = [os.path.relpath(p, root / "images") for p in task.train_pool.pool.paths]
    want = [food.classnames.index(f.split("/")[0].replace("_", " ")) for f in files]
    np.testing.assert_array_equal(task.train_pool.labels, want)
    clean = dict(zip(files, task.train_pool.clean))
    assert clean["apple_pie/ap0.jpg"] == 0 and clean["apple_pie/ap1.jpg"] == -1
    assert clean["cheese_plate/ch2.jpg"] == 16 and clean["baklava/ba0.jpg"] == -1
    assert task.train_size == 9 and not task.selection.flipped.any()
    # The test set is Food-101's (tfds), its labels mapped by name (tfds order differs from CoOp's).
    np.testing.assert_array_equal(task.test.labels, food.map_source_labels(names)[raw["label"]])


def test_missing_dataset_fails_fast_with_instructions(tmp_path):
    start = time.time()
    with pytest.raises(sources.DatasetNotPreparedError) as err:
        pipeline.load_task({"name": "dtd", "data_dir": str(tmp_path)})
    assert time.time() - start < 5
    msg = str(err.value)
    assert "'dtd'" in msg and str(tmp_path / "dtd" / "3.0.1") in msg
    assert f"python -m dspt_jax.data.prepare dtd --data_dir={tmp_path}" in msg
    assert "split_zhou_DescribableTextures.json" in msg and "tfds build" not in msg
    start = time.time()
    with pytest.raises(sources.DatasetNotPreparedError, match="python -m dspt_jax.data.prepare ucf101"):
        pipeline.load_task({"name": "ucf101", "data_dir": str(tmp_path)})
    assert time.time() - start < 5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.load_task({"name": "folder", "folder": str(tmp_path / "nope")})


def test_bad_names_and_fields():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet21k'.*caltech101"):
        pipeline.load_task({"name": "imagenet21k"})
    with pytest.raises(ValueError, match="unknown config field data.shot"):
        pipeline.load_task({"name": "caltech101", "shot": 4})
    with pytest.raises(ValueError, match="needs data.split_file"):
        pipeline.load_task({"name": "caltech101", "folder": "/tmp"})
