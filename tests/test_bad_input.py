"""The bad-input catalogue (docs/BAD_INPUT.md), one test per row, named after its row.

Each test feeds one refused (or converted) input and asserts the key words of its message: the field or the
file, and what to do. The data the tests read is made here: tiny image folders written with PIL (grey-scale,
CMYK, 16-bit, palette, truncated and empty files among them), CSVs and CoOp split files. The data layer is
called directly wherever the refusal lives there; the trainer only for the rows that are its own (a
non-finite loss, a workdir of another setting, an image size the model does not take) and to show that a
refused run leaves its workdir as it was.
"""

import json
import logging
import math
import os

import numpy as np
import pytest
from PIL import Image

from dspt_jax.data import classnames as cn
from dspt_jax.data import datasets, fewshot, noise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("cat", "dog")
SIZE = 16


# ---------------------------------------------------------------------------------------------------------
# Data the tests make


def write_image(path, mode="RGB", seed=0, size=(12, 10)):
    """A small random image in PIL mode ``mode`` at ``path`` (format from the extension); returns the path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "I;16":  # 16-bit grey: PIL writes it as a 16-bit PNG
        image = Image.new("I;16", size)
        image.frombytes(rng.integers(0, 65536, size[::-1]).astype("<u2").tobytes())
    else:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    image.save(path, quality=95) if str(path).endswith(".jpg") else image.save(path)
    return str(path)


def class_folder(root, counts=None, test=2):
    """root/<class>/<i>.png (``counts``: images per class, default 4 each) and root/test/<class>/."""
    counts = counts or {c: 4 for c in CLASSES}
    for k, (c, n) in enumerate(counts.items()):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            write_image(os.path.join(root, c, f"{i}.png"), seed=10 * k + i)
        for i in range(test):
            write_image(os.path.join(root, "test", c, f"{i}.png"), seed=100 + 10 * k + i)
    return str(root)


def write_csv(path, rows, columns=("path", "label", "clean_label", "split")):
    with open(path, "w") as f:
        f.write(",".join(columns) + "\n")
        for row in rows:
            f.write(",".join(row) + "\n")
    return str(path)


def csv_rows(clean=True):
    """Rows of a real-noise CSV over ``class_folder``'s files: one noisy training label per class."""
    rows = []
    for k, c in enumerate(CLASSES):
        for i in range(4):
            noisy = CLASSES[1 - k] if i == 0 else c
            rows.append((f"{c}/{i}.png", noisy, c if clean else "", "train"))
        rows += [(f"test/{c}/{i}.png", c, "", "test") for i in range(2)]
    return rows


def write_split_file(path, entries):
    """A CoOp split file: ``entries`` {part: [(path, label, classname)]} (missing parts empty)."""
    data = {part: [list(e) for e in entries.get(part, [])] for part in ("train", "val", "test")}
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def refused(call, *words, error=ValueError):
    """Calls ``call``, which must raise ``error`` with every one of ``words`` in its message; returns it."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in the message:\n{message}"
    return message


def data(**fields):
    """A data config for the data layer (``config.data`` plus seed and noise)."""
    return {"image_size": SIZE, **fields}


def check(**fields):
    """The trainer's start-up data check on ``fields``."""
    from dspt_jax.data import pipeline

    return pipeline.check_data(data(**fields))


def smoke_config(**overrides):
    """configs/smoke.py (a tiny random CLIP on the toy dataset) with dotted-key overrides, quiet: no zero-shot
    or training-set evaluation."""
    from test_train import smoke_config as smoke

    return smoke(**{"zero_shot": False, "eval_train": False, **overrides})


@pytest.fixture(scope="module")
def tiny_clip():
    """The smoke config's random tiny CLIP cut to one layer per tower, its weights drawn with numpy on the shapes
    flax would make: the trainer's rows need a model, not a good one, and this one costs no compilation
    (compiling flax's init took longer than the whole data part of this file)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from dspt_jax.models import CLIP, CLIPModule
    from dspt_jax.models.clip import PRESETS

    tiny = PRESETS["tiny"]
    config = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, num_hidden_layers=1),
                                 vision=dataclasses.replace(tiny.vision, num_hidden_layers=1))
    inputs = (jnp.zeros((1, 32, 32, 3), jnp.float32), jnp.zeros((1, config.text.max_position_embeddings), jnp.int32))
    shapes = jax.eval_shape(CLIPModule(config).init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    return CLIP(config, params, jnp.float32, source="random:tiny")


def snapshot(folder):
    """{relative path: (bytes, mtime_ns)} of every file under ``folder``."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


# ---------------------------------------------------------------------------------------------------------
# Names


def test_unknown_dataset():
    refused(lambda: check(name="imagenet3000"), "unknown dataset 'imagenet3000' (data.name)", "valid names",
            "caltech101", "'folder', 'csv'")


def test_unknown_loss():
    from dspt_jax import train

    refused(lambda: train.validate_config(smoke_config(loss="focal")), "Unknown loss 'focal'", "valid choices",
            "'dspt'")


def test_unknown_method():
    from dspt_jax import train

    refused(lambda: train.validate_config(smoke_config(method="nlp")), "config.method must be one of", "coop",
            "'nlp'")


def test_unknown_noise_kind():
    refused(lambda: noise.NoiseSpec(kind="symmetric"), "unknown noise kind 'symmetric' (noise.kind)",
            "valid kinds", "'sym'")


@pytest.mark.parametrize("source,words,error", [
    ("random:huge", ("Unknown preset", "'random:huge'", "known:", "tiny"), ValueError),
    ("/nonexistent/clip.pt", ("is not an OpenAI model name", "a checkpoint file, a local directory or a hub id"),
     FileNotFoundError),
    ("RN50", ("RN50.pt", "expected at", "It is not there", "curl"), FileNotFoundError),
], ids=["random_preset", "missing_path", "openai_file_absent"])
def test_unknown_model_source(source, words, error, tmp_path, monkeypatch):
    from dspt_jax import model_source

    monkeypatch.setenv("DSPT_JAX_CLIP_DIR", str(tmp_path))
    refused(lambda: model_source.check_source(source), *words, error=error)


def test_unknown_data_field():
    from dspt_jax.data import pipeline

    refused(lambda: pipeline.data_config({"shot": 4}), "unknown config field data.shot", "valid:", "'shots'")


@pytest.mark.parametrize("overrides,words", [
    ({"image_features": "feats"}, ("config.image_features='feats'", "valid: computed | cached | views:N")),
    ({"image_features": "views:4", "data.augment": False},
     ("config.image_features='views:4'", "config.data.augment is False", "use image_features='cached'")),
], ids=["unknown", "views_without_augmentation"])
def test_bad_image_features(overrides, words):
    from dspt_jax import train

    refused(lambda: train.validate_config(smoke_config(**overrides)), *words)


@pytest.mark.parametrize("overrides,words", [
    ({"prompt.n_ctx": 0}, ("config.prompt.n_ctx must be >= 1",)),
    ({"prompt.ctx_init": "a photo of a", "prompt.ctx_init_mode": "words"}, ("config.prompt.ctx_init_mode",)),
    ({"prompt.ctx_init": "a photo of a very nice", "prompt.ctx_init_mode": "pad"},
     ("more than config.prompt.n_ctx=4", "raise n_ctx or shorten ctx_init")),
    ({"prompt.class_token_position": "start"}, ("config.prompt.class_token_position must be one of",)),
    ({"model.compute_dtype": "float16"}, ("config.model.compute_dtype must be one of", "bfloat16")),
    ({"batch_size": 0}, ("config.batch_size must be >= 1",)),
    ({"num_epochs": 0}, ("config.num_epochs must be >= 1",)),
    ({"max_steps": -1}, ("config.max_steps must be >= 0",)),
], ids=["n_ctx", "ctx_init_mode", "ctx_init_too_long", "class_token_position", "compute_dtype", "batch_size",
        "num_epochs", "max_steps"])
def test_bad_prompt_model_or_schedule_setting(overrides, words):
    from dspt_jax import train

    refused(lambda: train.validate_config(smoke_config(**overrides)), *words)


def test_negative_seed():
    from dspt_jax import train

    refused(lambda: train.validate_config(smoke_config(seed=-1)), "seed must be a non-negative integer", "-1")


# ---------------------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize("rate", [1.5, -0.1, float("nan"), 40])
def test_rate_outside_0_1(rate):
    message = refused(lambda: noise.NoiseSpec(kind="sym", rate=rate), "noise.rate must be in [0, 1]")
    assert str(float(rate)) in message or (math.isnan(rate) and "nan" in message)


@pytest.mark.parametrize("kind", ["none", "real", "matrix"])
def test_rate_with_a_kind_that_takes_none(kind):
    transition = np.eye(2).tolist() if kind == "matrix" else None
    refused(lambda: noise.NoiseSpec(kind=kind, rate=0.3, transition=transition), f"kind '{kind}'",
            "rate must be 0", "noise.rate")


@pytest.mark.parametrize("spec,words", [
    (dict(kind="matrix"), ("needs a transition matrix", "set noise.transition")),
    (dict(kind="matrix", transition=[[0.5, 0.4], [0.0, 1.0]]), ("noise.transition must be row-stochastic", "row 0")),
    (dict(kind="matrix", transition=[[1.0, 0.0, 0.0]]), ("noise.transition must be a square [K, K] matrix",)),
    (dict(kind="sym", rate=0.2, transition=[[1.0, 0.0], [0.0, 1.0]]),
     ("noise.transition is only used with kind 'matrix'", "unset it")),
], ids=["missing", "not_row_stochastic", "not_square", "with_another_kind"])
def test_bad_transition_matrix(spec, words):
    refused(lambda: noise.NoiseSpec(**spec), *words)


def test_transition_matrix_of_the_wrong_size():
    refused(lambda: check(name="toy", shots=4, noise={"kind": "matrix", "transition": np.eye(3).tolist()}),
            "noise.transition is 3x3", "toy has 4 classes", "give a 4 x 4 matrix")


def test_num_flips_larger_than_shots():
    refused(lambda: check(name="toy", shots=8, noise={"kind": "symflip", "num_flips": 12}),
            "noise.num_flips must be in [0, data.shots=8]", "got 12", "lower noise.num_flips or raise data.shots")
    # The same at the sampling function itself (callers that build no config).
    refused(lambda: fewshot.sample_per_class_flips(np.repeat(np.arange(3), 8), 4, 6, "symflip", 0),
            "noise.num_flips must be in [0, data.shots=4]", "lower noise.num_flips or raise data.shots")


@pytest.mark.parametrize("fields,words", [
    (dict(shots=8, noise={"kind": "sym", "rate": 0.2, "num_flips": 2}),
     ("noise.num_flips is only used by the kinds", "leave noise.num_flips unset")),
    (dict(shots=8, noise={"kind": "pairflip", "rate": 0.5, "num_flips": 2}),
     ("noise.num_flips=2 disagrees with noise.rate=0.5 at 8 shots", "set only one of them")),
    (dict(shots=-1, noise={"kind": "symflip", "num_flips": 2}), ("needs data.shots > 0, not -1",)),
], ids=["with_another_kind", "disagrees_with_rate", "all_shots"])
def test_bad_num_flips(fields, words):
    refused(lambda: check(name="toy", **fields), *words)


@pytest.mark.parametrize("shots,words", [
    (0, ("data.shots must be an integer >= 1 or -1 (all)", "got 0")),
    (-2, ("data.shots must be an integer >= 1 or -1 (all)", "got -2")),
    (True, ("data.shots must be an integer >= 1 or -1 (all)", "got True")),
    (1.5, ("data.shots=1.5 has the wrong type", "the type of its default")),
], ids=["zero", "negative", "bool", "float"])
def test_bad_shots(shots, words):
    refused(lambda: check(name="toy", shots=shots), *words)


@pytest.mark.parametrize("fields,words", [
    (dict(image_size=0), ("data.image_size must be a positive integer",)),
    (dict(crop_scale=(0.5, 0.1)), ("data.crop_scale must satisfy 0 < lo <= hi <= 1",)),
], ids=["image_size", "crop_scale"])
def test_bad_image_size_or_crop_scale(fields, words):
    refused(lambda: check(name="toy", **fields), *words)


def test_shots_larger_than_a_class(tmp_path, caplog):
    """Accepted as CoOp does (the class trains on all it has), with a warning naming the class and the field."""
    from dspt_jax.data import pipeline

    root = class_folder(tmp_path / "imgs", {"cat": 6, "dog": 2})
    with caplog.at_level(logging.WARNING, logger="dspt_jax.data.pipeline"):
        task = pipeline.load_task(data(name="folder", folder=root, shots=4))
    assert "fewer training examples than data.shots=4 ('dog': 2)" in caplog.text
    assert "Lower data.shots" in caplog.text
    assert np.bincount(task.train.labels).tolist() == [4, 2]


def test_per_class_noise_runs_out_of_images(tmp_path):
    root = class_folder(tmp_path / "imgs", {"cat": 3, "dog": 3})
    refused(lambda: check(name="folder", folder=root, shots=4, noise={"kind": "pairflip", "num_flips": 2}),
            "pairflip: class", "no unused image left", "lower data.shots or noise.num_flips")


# ---------------------------------------------------------------------------------------------------------
# Noise against the dataset


def test_real_noise_on_a_dataset_without_it(tmp_path):
    refused(lambda: check(name="toy", shots=4, noise={"kind": "real"}), "noise.kind='real'", "'toy' has none",
            "set another noise.kind")


def test_synthetic_noise_on_real_noise_data_unasked(tmp_path):
    from dspt_jax.data import pipeline

    root = class_folder(tmp_path / "imgs")
    path = write_csv(tmp_path / "labels.csv", csv_rows())
    sym = {"kind": "sym", "rate": 0.5}
    refused(lambda: check(name="csv", csv=path, folder=root, shots=2, noise=sym),
            "has its own noisy labels (real noise)", "noise.kind='real'", "noise.use_clean_labels=True")
    # Saying so: the synthetic noise starts from the CSV's clean labels.
    task = pipeline.load_task(data(name="csv", csv=path, folder=root, shots=2, noise=dict(sym, use_clean_labels=True)))
    folders = [os.path.basename(os.path.dirname(p)) for p in task.train.pool.paths[task.train.ids]]
    np.testing.assert_array_equal(task.train.clean, [CLASSES.index(c) for c in folders])


def test_clean_labels_unknown(tmp_path):
    root = class_folder(tmp_path / "imgs")
    path = write_csv(tmp_path / "labels.csv", csv_rows(clean=False))
    refused(lambda: check(name="csv", csv=path, folder=root, shots=2,
                          noise={"kind": "sym", "rate": 0.5, "use_clean_labels": True}),
            "truth is not known for every training example", "set noise.kind='real'")


def test_clean_labels_asked_with_real_noise(tmp_path):
    root = class_folder(tmp_path / "imgs")
    path = write_csv(tmp_path / "labels.csv", csv_rows())
    refused(lambda: check(name="csv", csv=path, folder=root, noise={"kind": "real", "use_clean_labels": True}),
            "noise.use_clean_labels=True", "noise.kind='real'", "set one of them")


@pytest.mark.parametrize("name,column,words", [
    ("toy", "aggre_label", ("data.label_column='aggre_label'", "'toy' has none", "unset data.label_column")),
    ("cifar10n", "coarse", ("label_column 'coarse' is not a noisy label column", "worse_label", "data.label_column")),
], ids=["dataset_without_noisy_columns", "not_a_noisy_column"])
def test_bad_label_column(name, column, words):
    refused(lambda: check(name=name, label_column=column, noise={"kind": "real"} if name == "cifar10n" else {}),
            *words)


# ---------------------------------------------------------------------------------------------------------
# Your own data: image folders


@pytest.mark.parametrize("folder,words,error", [
    (None, ("name='folder': data.folder is not set", "set it to the image folder"), ValueError),
    ("nope", ("does not exist (data.folder", "docs/DATA.md"), FileNotFoundError),
], ids=["unset", "missing"])
def test_folder_unset_or_missing(folder, words, error, tmp_path):
    refused(lambda: check(name="folder", folder=folder and str(tmp_path / folder)), *words, error=error)


def test_folder_with_fewer_than_two_classes(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "cat" / "0.png")
    refused(lambda: check(name="folder", folder=str(root)), "needs at least 2 class folders", "['cat']",
            "put each class's images in a folder named after the class")


def test_test_class_not_a_training_class(tmp_path):
    root = class_folder(tmp_path / "imgs")
    write_image(root + "/test/bird/0.png")
    refused(lambda: check(name="folder", folder=root), "test/bird: class not among the training classes",
            "rename the folder", "add")


@pytest.mark.parametrize("where", ["folder", "array_dataset"])
def test_empty_class(where, tmp_path):
    if where == "folder":
        root = class_folder(tmp_path / "imgs")
        os.makedirs(os.path.join(root, "bird"))  # a class folder without images
        refused(lambda: check(name="folder", folder=root, shots=2), "1 of the 3 classes have no training examples",
                "['bird']", "add images of it, or remove the class")
        return
    images = np.zeros((4, 8, 8, 3), np.uint8)
    datasets.register_array_dataset("bad_input_arrays", ["a", "b", "c"], (images, [0, 1, 0, 1]), (images, [0, 1, 2, 2]))
    try:
        refused(lambda: check(name="bad_input_arrays", shots=1), "1 of the 3 classes have no training examples",
                "['c']", "its name from the class list")
    finally:
        datasets.DATASETS.pop("bad_input_arrays", None)


def test_empty_test_split(tmp_path):
    root = class_folder(tmp_path / "imgs", test=0)
    for c in CLASSES:
        os.makedirs(os.path.join(root, "test", c))
    refused(lambda: check(name="folder", folder=root, shots=2), "the test split is empty", "give it test images")


@pytest.mark.parametrize("where", ["folder", "csv", "split_file", "registered"])
def test_duplicate_class_names(where, tmp_path):
    if where == "folder":
        root = class_folder(tmp_path / "imgs", {"red_car": 2, "red car": 2, "dog": 2})
        refused(lambda: check(name="folder", folder=root, shots=1), "'red car' (classes 1, 2)",
                "appear more than once", "rename or merge those folders")
    elif where == "csv":
        root = class_folder(tmp_path / "imgs")
        rows = [("cat/0.png", "a_b", "", "train"), ("cat/1.png", "a b", "", "train"), ("dog/0.png", "dog", "", "train"),
                ("test/cat/0.png", "a b", "", "test")]
        path = write_csv(tmp_path / "labels.csv", rows)
        refused(lambda: check(name="csv", csv=path, folder=root, shots=1, noise={"kind": "real"}),
                "labels.csv (data.csv", "'a b'", "appear more than once", "use one spelling per class")
    elif where == "split_file":
        root = class_folder(tmp_path / "imgs")
        entries = {"train": [("cat/0.png", 0, "cat"), ("dog/0.png", 1, "cat")], "test": [("test/cat/0.png", 0, "cat")]}
        path = write_split_file(tmp_path / "split_zhou_Mine.json", entries)
        refused(lambda: check(name="folder", folder=root, split_file=path, shots=1), "split_zhou_Mine.json",
                "'cat' (classes 0, 1)", "give each label its own class name in the split file")
    else:
        images = np.zeros((2, 8, 8, 3), np.uint8)
        refused(lambda: datasets.register_array_dataset("bad_input_dup", ["a", "b", "a"], (images, [0, 1]),
                                                        (images, [0, 1])),
                "dataset 'bad_input_dup'", "'a' (classes 0, 2)", "rename one of them")
        assert "bad_input_dup" not in datasets.DATASETS


CONVERTED = {"grey_png": ("L", "png"), "grey_jpg": ("L", "jpg"), "cmyk_jpg": ("CMYK", "jpg"),
             "16bit_png": ("I;16", "png"), "palette_png": ("P", "png"), "rgba_png": ("RGBA", "png"),
             "grey_alpha_png": ("LA", "png")}


@pytest.mark.parametrize("mode,ext", CONVERTED.values(), ids=CONVERTED.keys())
def test_readable_image_kinds_are_converted(mode, ext, tmp_path):
    """Accepted: decoded to 8-bit RGB as PIL's convert("RGB") does (16-bit: scaled by 1/257)."""
    import tensorflow as tf

    from dspt_jax.data import pipeline, sources

    root = class_folder(tmp_path / "imgs")
    path = write_image(os.path.join(root, "cat", f"special.{ext}"), mode=mode, seed=7)
    check(name="folder", folder=root, shots=-1)  # not refused
    task = pipeline.load_task(data(name="folder", folder=root, shots=-1))
    assert path in [str(p) for p in task.train.pool.paths[task.train.ids]]
    decoded = sources.decode_image(tf.io.read_file(path)).numpy().astype(int)
    opened = Image.open(path)
    if mode == "I;16":
        want = np.repeat(np.round(np.asarray(opened, np.float64) / 257)[..., None], 3, axis=-1)
        assert np.abs(decoded - want).max() <= 1
    else:
        np.testing.assert_array_equal(decoded, np.asarray(opened.convert("RGB")))


def broken_image(kind, path):
    """Writes a broken image of ``kind`` at ``path``; returns the words its reason must hold."""
    if kind == "zero_bytes":
        open(path, "wb").close()
        return "empty file (0 bytes)"
    if kind == "not_an_image":
        with open(path, "w") as f:
            f.write("not an image")
        return "cannot be decoded (truncated, or not an image)"
    whole = write_image(path + ".whole" + os.path.splitext(path)[1], size=(40, 30))
    with open(whole, "rb") as f:
        content = f.read()
    os.remove(whole)
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2])
    return "cannot be decoded (truncated, or not an image)"


BROKEN = [("truncated_jpg", "jpg"), ("truncated_png", "png"), ("zero_bytes", "jpg"), ("not_an_image", "jpg")]


@pytest.mark.parametrize("kind,ext", BROKEN, ids=[k for k, _ in BROKEN])
def test_broken_images_fail(kind, ext, tmp_path):
    from dspt_jax.data import sources

    root = class_folder(tmp_path / "imgs")
    bad = os.path.join(root, "test", "dog", f"broken.{ext}")
    reason = broken_image(kind, bad)
    message = refused(lambda: check(name="folder", folder=root, shots=2), f"data.folder {root}",
                      "1 of its 13 image files cannot be read", f"{bad}: {reason}", "Replace or delete these files",
                      "data.bad_images='skip'", error=sources.UnreadableImageError)
    assert message.count(root + "/") == 1  # only the broken file is listed


def test_broken_images_skipped_and_counted(tmp_path, caplog):
    from dspt_jax.data import pipeline

    root = class_folder(tmp_path / "imgs")
    bad = {}
    for i, (kind, ext) in enumerate(BROKEN):
        path = os.path.join(root, CLASSES[i % 2], f"broken_{kind}.{ext}")
        bad[path] = broken_image(kind, path)
    cfg = data(name="folder", folder=root, shots=-1, bad_images="skip")
    check(**cfg)
    with caplog.at_level(logging.WARNING, logger="dspt_jax.data.sources"):
        task = pipeline.load_task(cfg)
    assert "leaving out 4 of its 16 image files, which cannot be read (data.bad_images='skip')" in caplog.text
    assert dict(task.skipped_images).keys() == bad.keys()
    for path, reason in task.skipped_images:
        assert bad[path] in reason and path in caplog.text
    assert task.train_size == 8 and task.test_size == 4  # the readable files only
    batches = pipeline.eval_batches(task, "train", global_batch_size=8)
    assert np.isfinite(next(batches)["image"]).all()  # nothing unreadable is left to stop a run


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_no_image_readable(policy, tmp_path):
    from dspt_jax.data import sources

    class_folder(tmp_path / "imgs")
    path = write_csv(tmp_path / "labels.csv", csv_rows())  # relative to data.folder, which is wrong here
    refused(lambda: check(name="csv", csv=path, folder=str(tmp_path), noise={"kind": "real"}, bad_images=policy),
            "none of its 12 image files can be read", "missing (no such file)", "Check data.folder",
            error=sources.UnreadableImageError)


def test_bad_images_value():
    refused(lambda: check(name="toy", bad_images="ignore"), "data.bad_images must be one of ('fail', 'skip')",
            "'ignore'")


# ---------------------------------------------------------------------------------------------------------
# Your own data: CSVs


@pytest.mark.parametrize("fields,words,error", [
    (dict(name="csv"), ("name='csv' needs data.csv",), ValueError),
    (dict(name="csv", csv="nope.csv"), ("data.csv", "nope.csv", "does not exist"), FileNotFoundError),
    (dict(name="toy", csv="labels.csv"), ("data.csv is only used with name='csv'", "unset data.csv"), ValueError),
], ids=["unset", "missing", "with_another_dataset"])
def test_csv_unset_missing_or_misplaced(fields, words, error):
    refused(lambda: check(**fields), *words, error=error)


def test_csv_without_its_header(tmp_path):
    path = write_csv(tmp_path / "labels.csv", [("cat/0.png", "cat")], columns=("file", "class"))
    refused(lambda: check(name="csv", csv=path, noise={"kind": "real"}), "labels.csv (data.csv)",
            "needs a header with columns path,label", "['file', 'class']")


def test_csv_bad_split_value(tmp_path):
    rows = csv_rows()
    rows[1] = rows[1][:3] + ("dev",)
    path = write_csv(tmp_path / "labels.csv", rows)
    refused(lambda: check(name="csv", csv=path, noise={"kind": "real"}), "labels.csv row 3: split 'dev'",
            "not in train, val, test", "fix the split column")


def test_csv_empty_label(tmp_path):
    rows = csv_rows()
    rows[2] = (rows[2][0], " ", "", "train")
    path = write_csv(tmp_path / "labels.csv", rows)
    refused(lambda: check(name="csv", csv=path, noise={"kind": "real"}), "labels.csv row 4: empty label",
            "every row needs a path and a class name")


@pytest.mark.parametrize("column", ["label", "clean_label"])
def test_csv_label_out_of_range(column, tmp_path):
    rows = csv_rows()
    if column == "label":
        rows.append(("test/dog/1.png", "dgo", "", "test"))  # a typo: not a class of the training rows
    else:
        rows[0] = rows[0][:2] + ("bird",) + rows[0][3:]
    path = write_csv(tmp_path / "labels.csv", rows)
    row = len(rows) + 1 if column == "label" else 2
    refused(lambda: check(name="csv", csv=path, noise={"kind": "real"}),
            f"labels.csv row {row}: {column} '{'dgo' if column == 'label' else 'bird'}'",
            "is not the label of any training row", "fix the name (a typo?) or add training rows")


def test_csv_without_test_rows(tmp_path):
    rows = [r for r in csv_rows() if r[3] != "test"]
    path = write_csv(tmp_path / "labels.csv", rows)
    refused(lambda: check(name="csv", csv=path, noise={"kind": "real"}), "no rows with split=test",
            "add test rows (data.csv)")


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_csv_missing_files(policy, tmp_path):
    from dspt_jax.data import pipeline, sources

    root = class_folder(tmp_path / "imgs")
    rows = csv_rows() + [("cat/gone.png", "cat", "cat", "train")]
    path = write_csv(tmp_path / "labels.csv", rows)
    cfg = dict(name="csv", csv=path, folder=root, shots=-1, noise={"kind": "real"}, bad_images=policy)
    missing = os.path.join(root, "cat", "gone.png")
    if policy == "fail":
        refused(lambda: check(**cfg), f"{missing}: missing (no such file)", "1 of its 13 image files cannot be read",
                "data.bad_images='skip'", error=sources.UnreadableImageError)
        return
    check(**cfg)
    task = pipeline.load_task(data(**cfg))
    assert task.skipped_images == ((missing, "missing (no such file)"),) and task.train_size == 8


# ---------------------------------------------------------------------------------------------------------
# CoOp split files


def test_split_file_missing(tmp_path):
    root = class_folder(tmp_path / "imgs")
    refused(lambda: check(name="folder", folder=root, split_file=str(tmp_path / "split.json")),
            "split.json does not exist (data.split_file)", error=FileNotFoundError)


@pytest.mark.parametrize("content,words", [
    ("{not json", ("not a JSON file", "must be a CoOp split_zhou_*.json")),
    (json.dumps({"train": []}), ("not a CoOp split file (data.split_file)", "['val', 'test']")),
    (json.dumps({"train": [["cat/0.png", 0]], "val": [], "test": []}), ("is not [path, label, classname]",
                                                                          "fix that entry")),
    (json.dumps({"train": [["cat/0.png", -1, "cat"]], "val": [], "test": []}), ("negative label -1",
                                                                                 "labels are 0..K-1")),
], ids=["not_json", "missing_parts", "bad_entry", "negative_label"])
def test_split_file_not_coops(content, words, tmp_path):
    root = class_folder(tmp_path / "imgs")
    path = tmp_path / "split_zhou_Mine.json"
    path.write_text(content)
    refused(lambda: check(name="folder", folder=root, split_file=str(path)), "split_zhou_Mine.json", *words)


def test_split_file_label_named_twice(tmp_path):
    root = class_folder(tmp_path / "imgs")
    entries = {"train": [("cat/0.png", 0, "cat"), ("cat/1.png", 0, "kitty"), ("dog/0.png", 1, "dog")]}
    path = write_split_file(tmp_path / "split_zhou_Mine.json", entries)
    refused(lambda: check(name="folder", folder=root, split_file=path), "label 0 named both 'cat' and 'kitty'",
            "one class name per label")


def test_split_file_labels_not_0_to_k(tmp_path):
    root = class_folder(tmp_path / "imgs")
    entries = {"train": [("cat/0.png", 0, "cat"), ("dog/0.png", 2, "dog")], "test": [("test/cat/0.png", 0, "cat")]}
    path = write_split_file(tmp_path / "split_zhou_Mine.json", entries)
    refused(lambda: check(name="folder", folder=root, split_file=path), "labels must be 0..K-1",
            "without [1]", "renumber the labels 0..K-1")


def test_split_file_of_other_classes(tmp_path):
    root = class_folder(tmp_path / "imgs")
    entries = {"train": [("cat/0.png", 0, "cat"), ("dog/0.png", 1, "dog")], "test": [("test/cat/0.png", 0, "cat")]}
    path = write_split_file(tmp_path / "split_zhou_Caltech101.json", entries)
    refused(lambda: check(name="caltech101", folder=root, split_file=path), "has 2 classes",
            "caltech101 has 100", "use data.name='folder'")


@pytest.mark.parametrize("where", ["own_data", "own_data_wrong_folder", "registry"])
def test_split_file_naming_missing_images(where, tmp_path):
    from dspt_jax.data import sources

    root = class_folder(tmp_path / "imgs")
    if where == "registry":  # CoOp's caltech101 folder with one image gone
        entries = {"train": [(f"{c}/a.jpg", y, c) for y, c in enumerate(cn.CALTECH101)],
                   "test": [(f"{c}/b.jpg", y, c) for y, c in enumerate(cn.CALTECH101)]}
        for part in entries.values():
            for p, _, _ in part[1:]:
                os.makedirs(os.path.join(root, os.path.dirname(p)), exist_ok=True)
                open(os.path.join(root, p), "wb").close()
        path = write_split_file(tmp_path / "split_zhou_Caltech101.json", entries)
        refused(lambda: check(name="caltech101", folder=root, split_file=path), "split_zhou_Caltech101.json",
                "names 2 image file(s) that are not under data.folder", os.path.join(root, "face", "a.jpg"),
                "Restore them", "set data.folder", error=FileNotFoundError)
        return
    entries = {"train": [("cat/0.png", 0, "cat"), ("cat/gone.png", 0, "cat"), ("dog/0.png", 1, "dog")],
               "test": [("test/cat/0.png", 0, "cat"), ("test/dog/0.png", 1, "dog")]}
    path = write_split_file(tmp_path / "split_zhou_Mine.json", entries)
    if where == "own_data":
        refused(lambda: check(name="folder", folder=root, split_file=path, shots=1),
                f"{os.path.join(root, 'cat', 'gone.png')}: missing (no such file)", "data.bad_images='skip'",
                error=sources.UnreadableImageError)
    else:
        refused(lambda: check(name="folder", folder=str(tmp_path), split_file=path, shots=1),
                "(first train entry of", "data.folder must be the image folder the split file's paths start from",
                error=FileNotFoundError)


def test_folder_of_a_registry_dataset_without_split_file(tmp_path):
    refused(lambda: check(name="caltech101", folder=str(tmp_path), split_file=None),
            "data.folder with name='caltech101' needs data.split_file", "use name='folder'")


def test_split_file_on_tfds_without_file_names(tmp_path):
    path = write_split_file(tmp_path / "split_zhou_Food101.json", {})
    refused(lambda: check(name="food101", split_file=path), "tfds 'food101' keeps no file names",
            "set data.folder to CoOp's image folder")


def test_folder_or_split_file_on_an_in_memory_dataset(tmp_path):
    refused(lambda: check(name="toy", folder=str(tmp_path), split_file=None), "'toy' is an in-memory dataset",
            "data.split_file / data.folder do not apply: unset them")


# ---------------------------------------------------------------------------------------------------------
# Registry entries and in-memory datasets


def test_array_labels_outside_the_class_list():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    refused(lambda: datasets.register_array_dataset("bad_input_range", ["a", "b"], (images, [0, 2, 0, 1]),
                                                    (images, [0] * 4)),
            "train labels must lie in [0, 2), got [0, 2]", "the class-name list has 2 names",
            "give one name per label value")
    assert "bad_input_range" not in datasets.DATASETS


def test_array_images_not_uint8():
    images = np.zeros((4, 8, 8), np.float32)
    refused(lambda: datasets.register_array_dataset("bad_input_pixels", ["a", "b"], (images, [0, 1, 0, 1]),
                                                    (images, [0] * 4)),
            "images must be uint8 [N, H, W, 3]", "float32 (4, 8, 8)", "convert them first")


@pytest.mark.parametrize("info,words", [
    (dict(name="folder", classnames=("a", "b")), ("'folder' is reserved for your own data", "pick another name")),
    (dict(name="bad_input_template", classnames=("a", "b"), template="a photo"),
     ("template must hold exactly one '{}'", "'a photo'")),
    (dict(name="bad_input_one_class", classnames=("a", "a")), ("need at least 2 distinct class names",)),
    (dict(name="dtd", classnames=("a", "b")), ("dataset 'dtd' is already registered", "pick another name")),
], ids=["reserved_name", "template", "one_class", "taken_name"])
def test_bad_registry_entry(info, words):
    refused(lambda: datasets.register_dataset(datasets.DatasetInfo(**info)), *words)


@pytest.mark.parametrize("name,labels,words", [
    ("dtd", ["banded", "plaid-ish"], ("source label 'plaid-ish'", "is not one of the 47 registry classes")),
    ("cifar10n", [str(i) for i in range(9)], ("source has 9 labels, registry 10 classes",)),
], ids=["unknown_label", "label_count"])
def test_tfds_labels_disagree_with_the_registry(name, labels, words):
    refused(lambda: datasets.get_dataset_info(name).map_source_labels(labels), *words, "prepare it again",
            f"python -m dspt_jax.data.prepare {name}")


# ---------------------------------------------------------------------------------------------------------
# Data that is not there


def test_dataset_not_prepared(tmp_path, monkeypatch):
    from dspt_jax.data import sources

    monkeypatch.delenv("DATA", raising=False)
    refused(lambda: check(name="dtd", data_dir=str(tmp_path)), "Dataset 'dtd' (tfds 'dtd') is not prepared",
            "data.download=False", f"python -m dspt_jax.data.prepare dtd --data_dir={tmp_path}",
            error=sources.DatasetNotPreparedError)


@pytest.mark.parametrize("name,words", [
    ("folder", ("your own data", "nothing to prepare")),
    ("toy", ("in-memory dataset: nothing to prepare",)),
    ("food101n", ("python -m dspt_jax.data.prepare food101",)),
], ids=["own_data", "in_memory", "food101n"])
def test_nothing_to_prepare(name, words):
    from dspt_jax.data import prepare

    refused(lambda: prepare.prepare(name), *words)


def test_manual_files_required(tmp_path):
    from dspt_jax.data import prepare

    refused(lambda: check(name="fgvc_aircraft", data_dir=str(tmp_path), download=True),
            "'fgvc_aircraft' is built from files downloaded by hand", "no --manual_dir was given",
            "variants.txt", "--manual_dir=$DATA/fgvc_aircraft", error=prepare.ManualDirRequiredError)


def test_no_network_to_download(tmp_path, monkeypatch):
    from dspt_jax.data import prepare

    monkeypatch.setattr(prepare, "_reachable", lambda host, timeout: False)
    refused(lambda: check(name="dtd", data_dir=str(tmp_path), download=True, split_file=None),
            "Cannot reach www.robots.ox.ac.uk", "On a machine with internet run",
            "python -m dspt_jax.data.prepare dtd --data_dir=D", error=prepare.NoNetworkError)


# ---------------------------------------------------------------------------------------------------------
# Training and the workdir


@pytest.fixture(scope="module")
def nonfinite_run(tmp_path_factory, tiny_clip):
    """A smoke run whose learning rate overflows the prompt after the first step: (config, workdir, error)."""
    from dspt_jax import train

    workdir = str(tmp_path_factory.mktemp("nonfinite") / "run")
    config = smoke_config(max_steps=2, **{"optim.lr": 1e30, "optim.warmup_epochs": 0})
    with pytest.raises(FloatingPointError) as info:
        train.train_and_evaluate(config, workdir, clip=tiny_clip)
    return config, workdir, str(info.value)


def test_nonfinite_loss(nonfinite_run):
    config, workdir, message = nonfinite_run
    assert "Non-finite loss at step 1" in message
    assert f"the last finite checkpoint is in {workdir}/checkpoints" in message
    assert "Try compute_dtype=float32 or a lower config.optim.lr" in message
    steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    assert max(steps, default=0) <= 1  # nothing after the non-finite step was saved
    assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_workdir_of_another_setting(nonfinite_run, tiny_clip):
    from dspt_jax import train

    config, workdir, _ = nonfinite_run
    before = snapshot(workdir)
    changed = config.copy_and_resolve_references()
    changed.loss = "ce"
    refused(lambda: train.train_and_evaluate(changed, workdir, clip=tiny_clip),
            f"{workdir} holds a run with a different setting (loss: workdir has 'dspt', this run 'ce')",
            "Use another workdir, or delete this one to start over")
    assert snapshot(workdir) == before


def test_noise_record_of_other_labels(tmp_path):
    from dspt_jax.data import pipeline

    root = class_folder(tmp_path / "imgs")
    cfg = data(name="folder", folder=root, shots=2, noise={"kind": "sym", "rate": 0.5})
    task = pipeline.load_task(cfg, workdir=str(tmp_path / "run"))
    with open(task.record_path) as f:
        record = json.load(f)
    record["noisy"] = [1 - y for y in record["noisy"]]  # the data changed since this record was written
    with open(task.record_path, "w") as f:
        json.dump(record, f)
    before = snapshot(tmp_path / "run")
    refused(lambda: pipeline.load_task(cfg, workdir=str(tmp_path / "run")),
            f"{task.record_path} holds other training labels than this run draws", "move it away to start afresh")
    assert snapshot(tmp_path / "run") == before


def test_image_size_not_the_models(tmp_path, tiny_clip):
    from dspt_jax import train

    refused(lambda: train.train_and_evaluate(smoke_config(**{"data.image_size": 64}), str(tmp_path / "run"),
                                             clip=tiny_clip),
            "config.data.image_size=64 but the CLIP at 'random:tiny' takes 32 px images")


def test_refused_run_leaves_the_workdir_alone(tmp_path, tiny_clip):
    """A refusal of the data comes from the trainer's start-up check, before it writes into the workdir: a new
    workdir is not created, and an existing one (here: of the same setting, run with another max_steps, an
    operational field the trainer would write into config.json) keeps every file as it was."""
    from dspt_jax import train

    root = class_folder(tmp_path / "imgs")
    config = smoke_config(**{"data.name": "folder", "data.folder": root, "data.shots": 2, "max_steps": 2})
    broken_image("truncated_jpg", os.path.join(root, "dog", "broken.jpg"))
    fresh = tmp_path / "fresh"
    refused(lambda: train.train_and_evaluate(config, str(fresh), clip=tiny_clip), "broken.jpg",
            "data.bad_images='skip'")
    assert not fresh.exists()
    existing = tmp_path / "existing"
    os.makedirs(existing / "checkpoints" / "2")
    with open(existing / "config.json", "w") as f:
        json.dump(smoke_config(**{"data.name": "folder", "data.folder": root, "data.shots": 2, "max_steps": 9})
                  .to_dict(), f)
    (existing / "checkpoints" / "2" / "state").write_bytes(b"a checkpoint")
    before = snapshot(existing)
    refused(lambda: train.train_and_evaluate(config, str(existing), clip=tiny_clip), "broken.jpg")
    assert snapshot(existing) == before
