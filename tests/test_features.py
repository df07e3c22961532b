"""Image-feature modes: cached features equal a fresh encode of the same images, each drawn view equals a fresh
encode of that view, the order of training examples is the image pipeline's, and a run resumes on its cache."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from dspt_jax import features, sharding, train
from dspt_jax.data import pipeline
from dspt_jax.models import load_clip

sys.path.insert(0, os.path.dirname(__file__))
from test_train import read_jsonl, smoke_config  # noqa: E402


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    config = smoke_config()
    task = pipeline.load_task(train.data_config(config), workdir=str(tmp_path_factory.mktemp("task")))
    clip = load_clip(config.model.source)
    mesh = sharding.make_mesh()
    encode_jit = jax.jit(lambda p, x: clip.module.apply({"params": p}, x, method="encode_image"))

    def encoded(split, view=None):
        batches = pipeline.eval_batches(task, split, global_batch_size=16, view=view)
        return features.encode_split(encode_jit, clip.params, batches, mesh)

    return config, task, clip, encoded


def test_modes_parse_and_bad_ones_fail():
    assert features.parse_mode("computed") == features.FeatureMode("computed", 0)
    assert features.parse_mode("cached") == features.FeatureMode("cached", 1)
    assert features.parse_mode("views:10") == features.FeatureMode("views", 10)
    assert str(features.parse_mode("views:3")) == "views:3"
    for bad in ("view:3", "views:0", "views:", "cache", ""):
        with pytest.raises(ValueError, match="computed | cached | views:N"):
            features.parse_mode(bad)


def _train_features(config, task, encoded, mode, workdir):
    return train.training_features(config, task, features.parse_mode(mode), str(workdir), encoded)


def test_cached_features_and_logits_equal_encoding_the_same_batch(setting, tmp_path):
    config, task, clip, encoded = setting
    bank = _train_features(config, task, encoded, "cached", tmp_path)
    assert bank.shape == (1, task.train_size, clip.config.projection_dim)
    from_cache = pipeline.train_feature_batches(task, bank, global_batch_size=8, seed=config.seed, start_step=5)
    from_images = pipeline.train_batches(task, global_batch_size=8, seed=config.seed, augment=False, start_step=5)
    class_features = np.random.default_rng(0).normal(size=(task.num_classes, clip.config.projection_dim))
    for _ in range(3):  # steps 5, 6, 7: across an epoch boundary (4 steps per epoch)
        cached, fresh = next(from_cache), next(from_images)
        np.testing.assert_array_equal(cached["id"], fresh["id"])
        for field in ("label", "clean_label", "mask", "flipped"):
            np.testing.assert_array_equal(cached[field], fresh[field])
        encoded_now = np.asarray(clip.encode_image(fresh["image"]))
        np.testing.assert_allclose(cached["image_features"], encoded_now, rtol=1e-5, atol=1e-6)
        scale = clip.logit_scale
        np.testing.assert_allclose(
            train.logits_from_features(clip.params, cached["image_features"], class_features),
            train.logits_from_features(clip.params, encoded_now, class_features),
            rtol=1e-5,
            atol=1e-4 * scale,
        )
    from_images.close()


def test_each_drawn_view_equals_a_fresh_encode_of_that_view(setting, tmp_path):
    config, task, clip, encoded = setting
    views = 3
    bank = _train_features(config, task, encoded, f"views:{views}", tmp_path)
    assert bank.shape[:2] == (views, task.train_size)
    assert not np.allclose(bank[0], bank[1])  # distinct augmentations
    position = {int(i): k for k, i in enumerate(task.train.ids)}
    payloads = task.train_payloads()
    batches = pipeline.train_feature_batches(task, bank, global_batch_size=8, seed=config.seed)
    drawn = []
    for step in range(8):  # two epochs
        batch = next(batches)
        draws = pipeline.view_draws(config.seed, step // 4, task.train_size, views)
        images, want = [], []
        for example_id, feature in zip(batch["id"], batch["image_features"]):
            k = position[int(example_id)]
            view = pipeline.View(config.seed, int(draws[k]), views)
            image = task.train.pool.to_image(payloads[k])
            seed = pipeline.view_seed(view, int(example_id))
            images.append(pipeline.train_image(image, task.image_size, seed, task.crop_scale).numpy())
            want.append(feature)
            drawn.append(int(draws[k]))
        np.testing.assert_allclose(np.asarray(clip.encode_image(np.stack(images))), want, rtol=1e-5, atol=1e-6)
    assert set(drawn) == {0, 1, 2}


def test_feature_batches_split_over_hosts_like_image_batches(setting):
    config, task, _, _ = setting
    bank = np.random.default_rng(0).normal(size=(2, task.train_size, 5)).astype(np.float32)
    whole = pipeline.train_feature_batches(task, bank, global_batch_size=8, seed=3, start_step=2)
    halves = [
        pipeline.train_feature_batches(task, bank, global_batch_size=8, seed=3, start_step=2, process_index=p,
                                       process_count=2)
        for p in (0, 1)
    ]
    for _ in range(6):
        w, (a, b) = next(whole), [next(h) for h in halves]
        for field in w:
            np.testing.assert_array_equal(w[field], np.concatenate([a[field], b[field]]))


def test_cache_file_is_reused_only_for_the_same_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.full((1, 4, 2), len(calls), np.float32)

    path = str(tmp_path / "f" / "train_cached.npz")
    key = {"model": "m", "ids_sha1": "abc"}
    a, reused = features.load_or_compute(path, key, compute, write=True)
    assert not reused and len(calls) == 1
    b, reused = features.load_or_compute(path, key, compute, write=True)
    assert reused and len(calls) == 1 and np.array_equal(a, b)
    c, reused = features.load_or_compute(path, {**key, "model": "other"}, compute, write=True)
    assert not reused and c[0, 0, 0] == 2
    with open(path, "wb") as f:  # a truncated file is recomputed, not trusted
        f.write(b"PK\x03\x04 truncated")
    _, reused = features.load_or_compute(path, key, compute, write=True)
    assert not reused and len(calls) == 3
    assert not [n for n in os.listdir(tmp_path / "f") if "tmp" in n]


def test_cached_run_resumes_on_its_cache_and_reaches_the_same_prompt(tmp_path, monkeypatch):
    straight = train.train_and_evaluate(smoke_config(image_features="cached"), str(tmp_path / "straight"))
    assert straight["image_features"] == "cached" and straight["steps"] == 12
    assert os.path.exists(tmp_path / "straight" / "features" / "train_cached.npz")
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(smoke_config(image_features="cached", max_steps=6), workdir)
    reuses = []
    original = features.load_or_compute

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        reuses.append(out[1])
        return out

    monkeypatch.setattr(features, "load_or_compute", spy)
    resumed = train.train_and_evaluate(smoke_config(image_features="cached"), workdir)
    assert reuses == [True]
    np.testing.assert_allclose(
        np.load(os.path.join(workdir, "prompt.npz"))["ctx"],
        np.load(tmp_path / "straight" / "prompt.npz")["ctx"],
        rtol=1e-5,
        atol=1e-7,
    )
    assert resumed["final"]["accuracy"] == straight["final"]["accuracy"]
    losses = {l["step"]: l["loss"] for l in read_jsonl(tmp_path / "straight" / "metrics.jsonl")}
    for line in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        assert line["loss"] == pytest.approx(losses[line["step"]], rel=1e-5)
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    assert on_disk["image_features"] == "cached"


def test_views_run_end_to_end(tmp_path):
    results = train.train_and_evaluate(smoke_config(image_features="views:2"), str(tmp_path))
    assert results["image_features"] == "views:2" and results["steps"] == 12
    assert os.path.exists(tmp_path / "features" / "train_views2.npz")
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(np.isfinite(l["loss"]) for l in lines)
