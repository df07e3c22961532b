"""The synthetic world (dspt_jax.data.synthetic) and the cached tiny-CLIP pretraining (dspt_jax.pretrain).

Oracles are independent of the code under test: closed-form shape areas, colours composited by hand, the
real tokenizer, a float64 numpy InfoNCE, the pipeline's normalization constants read from its source, and
counts / mtimes for the cache. Pretraining uses the reduced recipe RECIPES["small"] (seconds) in tmp_path.
"""

import dataclasses
import math
import os
import pathlib
import re

import jax
import numpy as np
import optax
import pytest

from dspt_jax import pretrain as P
from dspt_jax import tokenizer as tok_lib
from dspt_jax.data import datasets
from dspt_jax.data import synthetic as S
from dspt_jax.models import prompt as prompt_lib
from dspt_jax.models.loading import load_clip

SMALL = P.RECIPES["small"]


# ---------------------------------------------------------------------------------------------------------
# The world.


def test_world_is_deterministic_per_seed():
    x1, y1 = S.make_split(3, seed=5)
    x2, y2 = S.make_split(3, seed=5)
    x3, y3 = S.make_split(3, seed=6)
    assert x1.dtype == np.uint8 and x1.shape == (90, 32, 32, 3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert np.mean(x1 != x3) > 0.5 and not np.array_equal(y1, y3)
    # Splits of one seed are independent streams; pretraining batches are a function of (seed, step).
    assert not np.array_equal(S.make_split(3, 5, stream=1)[0], S.make_split(3, 5, stream=2)[0])
    a, ca = S.pretraining_batch(0, 7, 16)
    b, cb = S.pretraining_batch(0, 7, 16)
    c, cc = S.pretraining_batch(0, 8, 16)
    np.testing.assert_array_equal(a, b)
    assert ca == cb and ca != cc and np.mean(a != c) > 0.5


def test_downstream_task_is_balanced_and_registered_by_name():
    info = S.register(seed=0, train_per_class=4, test_per_class=2, name="synthetic_test_small")
    k = len(S.DOWNSTREAM_COLOURS) * len(S.DOWNSTREAM_SHAPES)
    assert info.num_classes == k == 30 and info.template == "a photo of a {}."
    for split, per_class in (("train", 4), ("test", 2)):
        arr = info.arrays[split]
        assert arr.images.shape == (k * per_class, 32, 32, 3)
        np.testing.assert_array_equal(np.bincount(arr.labels, minlength=k), np.full(k, per_class))
    # Same seed, same pixels as make_split; train and test differ.
    np.testing.assert_array_equal(info.arrays["train"].images, S.make_split(4, 0, stream=1)[0])
    assert "synthetic" in datasets.GENERATED and datasets.GENERATED["synthetic"] == "dspt_jax.data.synthetic"


def test_class_names_are_prompt_ready_and_fit_coop_prompts():
    names = S.classnames()
    assert len(set(names)) == 30
    assert all(re.fullmatch(r"[a-z]+ [a-z]+", n) for n in names)
    for a, b in S.CONFUSABLE:  # the confusable pairs really are in the task
        assert any(a in n.split() for n in names) and any(b in n.split() for n in names)
    context = P.RECIPES["default"].context_length
    for position in prompt_lib.CLASS_TOKEN_POSITIONS:
        spec = prompt_lib.build_prompt_spec(
            names, n_ctx=16, class_token_position=position, context_length=context
        )
        assert spec.eot_index.max() < context
    # The zero-shot prompts fit the text tower too.
    ids = tok_lib.tokenize([S.DOWNSTREAM_TEMPLATE.format(n) for n in names])
    assert ids.argmax(-1).max() < context


def test_captions_are_well_formed_and_true():
    rng = np.random.default_rng(0)
    scenes = S.sample_scenes(rng, 3000, S.WEB_DOMAIN)
    caps = S.captions(scenes, rng)
    colours = set(S.COLOUR_NAMES)
    for i, cap in enumerate(caps):
        assert S.CAPTION_PATTERN.match(cap), cap
        words = cap[:-1].split(" ")
        for art, nxt in zip(words, words[1:]):
            if art in ("a", "an"):
                assert art == ("an" if nxt[0] in "aeiou" else "a"), cap
        shape = S.SHAPES[scenes.shape[i]]
        k = words.index(shape)  # the main object comes first, ending in its shape
        said = [w for w in words[:k] if w in colours]
        assert said in ([], [S.COLOUR_NAMES[scenes.colour[i]]]), cap
        assert "medium" not in words
    # The end token of the captions reaches every position a CoOp prompt puts it at (n_ctx=16: up to 21) ...
    eot = P.tokenize_captions(caps, 32).argmax(-1)
    prompt_eot = prompt_lib.build_prompt_spec(S.classnames(), n_ctx=16).eot_index
    assert set(range(prompt_eot.min(), prompt_eot.max() + 1)) <= set(eot.tolist())
    assert eot.min() <= 5
    # ... and never passes the training caption length.
    assert eot.max() < P.RECIPES["default"].caption_length


def test_where_phrase_and_article_by_hand():
    assert S.where_phrase(np.array([0.2, 0.2])) == "in the top left corner"
    assert S.where_phrase(np.array([0.5, 0.8])) == "on the bottom"
    assert S.where_phrase(np.array([0.5, 0.5])) == "in the center"
    assert S.with_article("orange star") == "an orange star" and S.with_article("red star") == "a red star"


@pytest.mark.parametrize(
    "shape,area",
    [
        ("circle", math.pi),
        ("ring", math.pi * (1.0 - 0.5**2)),
        ("square", (2 * 0.82) ** 2),
        ("diamond", 2 * 1.15**2),
        ("hexagon", 1.5 * math.sqrt(3)),  # regular hexagon, circumradius 1
        ("triangle", 0.75 * math.sqrt(3) * 1.2**2),  # equilateral, circumradius 1.2
        ("cross", 2 * (0.6 * 1.9) - 0.6**2),
    ],
)
def test_rendered_shape_area_matches_closed_form(shape, area):
    size, radius = 256, 0.3  # 77 px radius: the one-pixel soft edge is a small error
    cov = S._coverage(
        np.array([S.SHAPES.index(shape)]), np.array([[0.5, 0.5]]), np.array([radius]), np.array([0.3]), size
    )
    measured = cov.sum() / (radius * size) ** 2
    assert measured == pytest.approx(area, rel=0.01)


def test_render_composites_colours_as_specified():
    # No noise, clutter or texture: the object's center pixel is its colour times the cast, the corner the
    # background; with desaturation every pixel moves towards its own gray value.
    dom = dataclasses.replace(
        S.WEB_DOMAIN,
        clutter=(0, 0),
        noise_std=0.0,
        bg_blotch=0.0,
        cast_jitter=0.0,
        texture_probs=(1, 0, 0, 0),
        cast=(1.1, 1.0, 0.8),
        desaturate=0.25,
    )
    scenes = S.sample_scenes(np.random.default_rng(1), 4, dom, shape=np.zeros(4, int), colour=np.arange(4))
    scenes = dataclasses.replace(
        scenes, center=np.full((4, 2), 0.5), radius=np.full(4, 0.3), bg=np.full((4, 2, 3), 100.0)
    )
    img = S.render(scenes, 32)
    for i in range(4):
        want = scenes.rgb[i] * np.array([1.1, 1.0, 0.8])
        want = want + 0.25 * (want.mean() - want)
        np.testing.assert_allclose(img[i, 16, 16], np.clip(np.round(want), 0, 255), atol=1)
        bg = np.array([110.0, 100.0, 80.0])
        bg = bg + 0.25 * (bg.mean() - bg)
        np.testing.assert_allclose(img[i, 0, 0], np.round(bg), atol=1)


def test_hue_rotation_is_a_rotation_about_gray():
    m = S.hue_rotation(120.0)  # a third of a turn permutes the primaries: red -> green -> blue
    np.testing.assert_allclose(m @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(m @ [0, 1, 0], [0, 0, 1], atol=1e-12)
    r = S.hue_rotation(-25.0)
    np.testing.assert_allclose(r @ [1, 1, 1], [1, 1, 1], atol=1e-12)  # grays stay gray
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(S.hue_rotation(25.0), r.T, atol=1e-12)


def test_target_domain_differs_from_web_domain():
    web, _ = S.make_split(4, 0, domain=S.WEB_DOMAIN)
    target, _ = S.make_split(4, 0, domain=S.TARGET_DOMAIN)
    assert target.mean() < web.mean() - 20  # darker scenes
    # Same scenes rendered with and without the target camera's hue shift differ only by the rotation.
    rng = np.random.default_rng(0)
    dom = dataclasses.replace(S.TARGET_DOMAIN, noise_std=0.0, desaturate=0.0)
    scenes = S.sample_scenes(rng, 8, dom)
    plain = S.render(dataclasses.replace(scenes, domain=dataclasses.replace(dom, hue_shift=0.0))).astype(
        float
    )
    turned = S.render(scenes).astype(float)
    want = np.clip(plain @ S.hue_rotation(S.TARGET_DOMAIN.hue_shift).T, 0, 255)
    assert np.abs(turned - want).mean() < 1.0 and np.abs(turned - plain).mean() > 5


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="image_size"):
        S.render(S.sample_scenes(np.random.default_rng(0), 1, S.WEB_DOMAIN), 4)
    with pytest.raises(ValueError, match="per_class"):
        S.make_split(0, 0)
    with pytest.raises(ValueError, match="unknown shape"):
        S.shape_sdf("heart", np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="batch_size"):
        P.PretrainRecipe(batch_size=1)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        P.PretrainRecipe(image_size=30, patch_size=4)
    for scale in (0.5, -1.0, 101.0):
        with pytest.raises(ValueError, match="logit_scale"):
            P.PretrainRecipe(logit_scale=scale)
    with pytest.raises(ValueError, match="synthetic:small"):
        P.resolve_model_source("synthetic:nope")


# ---------------------------------------------------------------------------------------------------------
# Pretraining pieces.


def test_fast_caption_tokenization_equals_the_tokenizer():
    _, caps = S.pretraining_batch(3, 0, 200)
    np.testing.assert_array_equal(P.tokenize_captions(caps, 32), tok_lib.tokenize(caps, 32))


def test_contrastive_loss_matches_float64_reference():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    log_scale = 1.3
    a = img / np.linalg.norm(img, axis=1, keepdims=True)
    b = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = math.exp(log_scale) * a @ b.T

    def xent(z):  # row i's target is column i
        z = z - z.max(1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(1)) - np.diag(z))

    want = 0.5 * (xent(logits) + xent(logits.T))
    got = P.contrastive_loss(img.astype(np.float32), txt.astype(np.float32), np.float32(log_scale))
    assert float(got) == pytest.approx(want, rel=1e-5)
    # Perfectly matched, orthogonal pairs at the largest temperature scale: 5 * exp(-100) per direction.
    assert float(P.contrastive_loss(np.eye(6), np.eye(6), np.float32(math.log(100)))) < 1e-30


def test_update_rule_is_optax_adamw():
    # Three steps of our rule against optax.adamw with the same (masked) decay and clipping.
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
        "token_embedding": {"embedding": rng.normal(size=(5, 4))},
        "logit_scale": np.float64(2.0),
    }
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    mask = jax.tree.map(lambda x: False, params)
    mask["dense"]["kernel"] = True  # decay on weight matrices only
    ref = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(0.01, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, mask=mask),
    )
    tx = P.adam_transform(1.0)
    grads = [
        jax.tree.map(lambda x: np.asarray(rng.normal(size=np.shape(x)), np.float32), params) for _ in range(3)
    ]

    @jax.jit
    def run(params):
        ours, theirs = params, params
        s_ours, s_theirs = tx.init(params), ref.init(params)
        for g in grads:
            u, s_ours = tx.update(g, s_ours, ours)
            ours = P.adamw_apply(ours, u, 0.01, 0.1)
            u, s_theirs = ref.update(g, s_theirs, theirs)
            theirs = optax.apply_updates(theirs, u)
        return ours, theirs

    ours, theirs = run(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, theirs)
    assert not np.allclose(ours["dense"]["kernel"], params["dense"]["kernel"])


def test_learning_rate_schedule_by_hand():
    r = dataclasses.replace(SMALL, steps=110, warmup_steps=10, learning_rate=1.0)
    assert P.learning_rate(r, 0) == pytest.approx(0.1)
    assert P.learning_rate(r, 9) == pytest.approx(1.0)
    assert P.learning_rate(r, 10) == pytest.approx(1.0)
    assert P.learning_rate(r, 60) == pytest.approx(0.5)
    assert P.learning_rate(r, 110) == pytest.approx(0.0, abs=1e-12)


def test_normalization_equals_the_pipeline():
    from dspt_jax.data import config as data_config

    # One definition, shared with the tf.data pipeline.
    assert P.CLIP_MEAN is data_config.CLIP_MEAN and P.CLIP_STD is data_config.CLIP_STD
    x = np.array([[[[0, 128, 255]]]], np.uint8)
    want = (np.array([0, 128, 255]) / 255 - np.array(P.CLIP_MEAN)) / np.array(P.CLIP_STD)
    np.testing.assert_allclose(P.normalize_images(x)[0, 0, 0], want, rtol=1e-6)


def test_recipe_hash_covers_every_field_and_the_versions(monkeypatch):
    base = P.PretrainRecipe()
    assert P.recipe_hash(base) == P.recipe_hash(P.PretrainRecipe())
    seen = {P.recipe_hash(base)}
    for f in dataclasses.fields(base):
        value = getattr(base, f.name)
        for new in (value * 2, value + 1, value // 2):  # the first valid recipe with another value
            try:
                changed = dataclasses.replace(base, **{f.name: type(value)(new)})
            except ValueError:
                continue
            if new != value:
                break
        assert getattr(changed, f.name) != value
        seen.add(P.recipe_hash(changed))
    assert len(seen) == 1 + len(dataclasses.fields(base))
    h = P.recipe_hash(base)
    monkeypatch.setattr(P, "VERSION", P.VERSION + 1)
    assert P.recipe_hash(base) != h
    monkeypatch.undo()
    monkeypatch.setattr(S, "WORLD_VERSION", S.WORLD_VERSION + 1)
    assert P.recipe_hash(base) != h


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DSPT_JAX_CACHE", str(tmp_path))
    assert P.checkpoint_dir(SMALL) == str(tmp_path / "synthetic_clip" / P.recipe_hash(SMALL))
    monkeypatch.delenv("DSPT_JAX_CACHE")
    assert P.cache_root() == os.path.expanduser("~/.cache/dspt_jax")
    # Other sources pass through untouched.
    for source in ("openai/clip-vit-base-patch16", "random:tiny", "/some/dir", "synthetics"):
        assert P.resolve_model_source(source) == source


# ---------------------------------------------------------------------------------------------------------
# The reduced pretraining, once for the tests below.


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Runs ensure_pretrained_clip(SMALL) in a fresh cache, recording every pretraining it triggers."""
    cache = str(tmp_path_factory.mktemp("cache"))
    runs = []
    real = P.pretrain

    def counting(recipe=None, progress=True, **kw):
        clip, history = real(recipe, progress=progress, **kw)
        runs.append((recipe, clip, history))
        return clip, history

    mp = pytest.MonkeyPatch()
    mp.setattr(P, "pretrain", counting)
    directory = P.ensure_pretrained_clip(SMALL, progress=False, cache_dir=cache)
    yield {"cache": cache, "dir": directory, "runs": runs}
    mp.undo()


def test_contrastive_loss_falls_during_pretraining(built):
    losses = np.asarray(built["runs"][0][2]["losses"])
    assert losses.shape == (SMALL.steps,) and np.isfinite(losses).all()
    # Ends clearly below both its start and chance (log batch: features that ignore their inputs).
    assert losses[-10:].mean() < losses[:5].mean() - 0.5
    assert losses[-10:].mean() < math.log(SMALL.batch_size) - 0.4
    # The temperature was held at the recipe's fixed value (CLIP's 100), bit for bit.
    trained = built["runs"][0][1]
    assert SMALL.logit_scale == 100.0
    assert trained.params["logit_scale"] == np.float32(math.log(100.0))


def test_learned_temperature_starts_at_clips_init_and_moves():
    recipe = dataclasses.replace(SMALL, steps=3, warmup_steps=1, logit_scale=0.0)
    assert P.clip_config(recipe).logit_scale_init_value == pytest.approx(math.log(1 / 0.07), abs=1e-4)
    clip, _ = P.pretrain(recipe, progress=False)
    # Three Adam steps of size ~lr move the log-scale by ~1e-2; it stays within CLIP's cap.
    assert 1e-4 < abs(float(clip.params["logit_scale"]) - math.log(1 / 0.07)) < 0.1


def test_checkpoint_round_trips_through_load_clip_bit_for_bit(built):
    _, trained, _ = built["runs"][0]
    assert sorted(os.listdir(built["dir"])) == ["config.json", "flax_model.msgpack", "recipe.json"]
    loaded = load_clip(built["dir"])
    assert loaded.config == trained.config == P.clip_config(SMALL)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, trained.params)
    images = P.normalize_images(S.make_split(1, 0)[0][:8])
    ids = tok_lib.tokenize([S.DOWNSTREAM_TEMPLATE.format(n) for n in S.classnames()], SMALL.context_length)
    np.testing.assert_array_equal(
        np.asarray(loaded.encode_image(images)), np.asarray(trained.encode_image(images))
    )
    np.testing.assert_array_equal(np.asarray(loaded.encode_text(ids)), np.asarray(trained.encode_text(ids)))


def test_cache_is_reused_and_rebuilt_when_the_recipe_changes(built, monkeypatch):
    runs, cache = built["runs"], built["cache"]
    assert runs[0][0] == SMALL
    before = len(runs)  # other tests of this module may have pretrained meanwhile (not through the cache)
    weights = os.path.join(built["dir"], "flax_model.msgpack")
    mtime = os.stat(weights).st_mtime_ns
    assert P.ensure_pretrained_clip(SMALL, progress=False, cache_dir=cache) == built["dir"]
    monkeypatch.setenv("DSPT_JAX_CACHE", cache)
    assert P.resolve_model_source("synthetic:small", progress=False) == built["dir"]
    assert len(runs) == before and os.stat(weights).st_mtime_ns == mtime
    other = dataclasses.replace(SMALL, seed=1, steps=3)
    d2 = P.ensure_pretrained_clip(other, progress=False, cache_dir=cache)
    assert d2 != built["dir"] and len(runs) == before + 1 and runs[-1][0] == other
    read = lambda d: pathlib.Path(d, "flax_model.msgpack").read_bytes()
    assert read(d2) != read(built["dir"])
    # Only the two finished checkpoints (and their lock files) are in the cache: no temporary leftovers.
    entries = sorted(e for e in os.listdir(os.path.join(cache, "synthetic_clip")) if not e.endswith(".lock"))
    assert entries == sorted([P.recipe_hash(SMALL), P.recipe_hash(other)])


def test_interrupted_pretraining_leaves_no_cache_entry(monkeypatch, tmp_path):
    def interrupted(recipe=None, progress=True, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.ensure_pretrained_clip(SMALL, progress=False, cache_dir=str(tmp_path))
    left = [e for e in os.listdir(tmp_path / "synthetic_clip") if not e.endswith(".lock")]
    assert left == []
