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


def _train_features(config, task, encoded, mode, workdir, params):
    return train.training_features(config, task, features.parse_mode(mode), str(workdir), encoded, params)


def test_cached_features_and_logits_equal_encoding_the_same_batch(setting, tmp_path):
    config, task, clip, encoded = setting
    bank = _train_features(config, task, encoded, "cached", tmp_path, clip.params)
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
    bank = _train_features(config, task, encoded, f"views:{views}", tmp_path, clip.params)
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


def test_cache_is_reused_only_for_the_same_key(setting, tmp_path):
    config, task, clip, encoded = setting
    calls = []

    def counting(split, view=None):
        calls.append(view)
        return encoded(split, view)

    def run(mode, params=clip.params, **overrides):
        cfg = config.copy_and_resolve_references()
        for k, v in overrides.items():
            cfg[k] = v
        return _train_features(cfg, task, counting, mode, tmp_path, params)

    first = run("cached")
    assert len(calls) == 1
    np.testing.assert_array_equal(run("cached"), first)  # reused
    np.testing.assert_array_equal(run("cached", seed=7), first)  # the seed changes no unaugmented feature
    assert len(calls) == 1
    other_weights = jax.tree.map(lambda x: x * 1.01, clip.params)
    run("cached", params=other_weights)  # other weights (the fingerprint is in the key): recomputed
    assert len(calls) == 2
    run("views:2")
    run("views:2")
    assert len(calls) == 2 + 2
    run("views:2", seed=7)  # other views
    assert len(calls) == 2 + 4
    path = features.cache_path(str(tmp_path), features.parse_mode("cached"))
    with open(path, "wb") as f:  # a truncated file is recomputed, not trusted
        f.write(b"PK\x03\x04 truncated")
    assert features.load(path, {}) is None
    run("cached")
    assert len(calls) == 2 + 4 + 1
    assert not [n for n in os.listdir(os.path.dirname(path)) if "tmp" in n]


def test_features_come_back_in_training_order_from_interleaved_hosts():
    """With 2 hosts, each global batch holds host 0's rows then host 1's, and each host reads its own half
    of the split: the gathered rows are interleaved; `in_order` puts them back."""
    ids = np.array([11, 3, 42, 7, 19, 5, 23, 8])
    feats = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    host0, host1 = np.arange(0, 4), np.arange(4, 8)
    gathered = np.concatenate([host0[:2], host1[:2], host0[2:], host1[2:]])  # 2 rows per host per batch
    rows = {"id": ids[gathered], "features": feats[gathered]}
    np.testing.assert_array_equal(features.in_order(rows, ids), feats)
    with pytest.raises(RuntimeError, match="encoded 7 examples"):
        features.in_order({"id": ids[gathered][:7], "features": feats[gathered][:7]}, ids)


def test_cached_run_resumes_on_its_cache_and_reaches_the_same_prompt(tmp_path, monkeypatch):
    straight = train.train_and_evaluate(smoke_config(image_features="cached"), str(tmp_path / "straight"))
    assert straight["image_features"] == "cached" and straight["steps"] == 12
    assert os.path.exists(tmp_path / "straight" / "features" / "train_cached.npz")
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(smoke_config(image_features="cached", max_steps=6), workdir)
    reuses = []
    original = features.load

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        reuses.append(out)
        return out

    monkeypatch.setattr(features, "load", spy)
    resumed = train.train_and_evaluate(smoke_config(image_features="cached"), workdir)
    assert len(reuses) == 1 and reuses[0] is not None  # the saved features were used
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
    with np.load(tmp_path / "features" / "train_views2.npz") as f:
        assert f["features"].shape[:2] == (2, results["train"]["num_examples"])
        assert json.loads(str(f["key"]))["seed"] == 1
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(np.isfinite(l["loss"]) for l in lines) and 0 <= lines[-1]["input_wait_fraction"] <= 1
    with pytest.raises(ValueError, match="use image_features='cached'"):
        train.train_and_evaluate(smoke_config(image_features="views:2", **{"data.augment": False}), str(tmp_path / "x"))
