"""CoOp prompt learner: assembly against the tokenizer + text tower on the equivalent sentence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_clip import scrambled_clip, tiny_config

from dspt_jax import tokenize
from dspt_jax.models import prompt as prompt_lib

CLASSNAMES = ["cat", "golden_retriever", "sea lion", "Faces easy", "a rather long compound class name"]
WORDS = "a blurry photo of"  # 4 tokens


@pytest.fixture(scope="module")
def clip():
    return scrambled_clip(tiny_config(), seed=0)


@pytest.mark.parametrize(
    "position,sentence",
    [
        ("end", "{w} {c}."),
        ("front", "{c} {w}."),
        ("middle", "a blurry {c} photo of."),
    ],
)
def test_context_of_real_words_equals_the_sentence(clip, position, sentence):
    spec = prompt_lib.build_prompt_spec(CLASSNAMES, n_ctx=4, class_token_position=position)
    words = prompt_lib.init_embeddings(clip, prompt_lib.context_layout(16, False, WORDS))  # CoOp: n_ctx -> 4
    prompt = prompt_lib.init_context(jax.random.key(0), spec, 32, init_embeddings=words)
    frozen = clip.token_embeddings(spec.token_ids)
    embeds = prompt_lib.assemble(frozen, prompt["ctx"], spec.ctx_positions)
    got = clip.encode_text_embeddings(embeds, spec.eot_index)
    want = clip.encode_text(tokenize([sentence.format(w=WORDS, c=c.replace("_", " ")) for c in CLASSNAMES]))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # The spec is already cut after the longest prompt, and every row ends at its end-of-text token.
    assert spec.token_ids.shape[1] == spec.eot_index.max() + 1
    assert (spec.token_ids[np.arange(len(CLASSNAMES)), spec.eot_index] == 49407).all()


def test_names_ending_in_punctuation_tokenize_as_the_sentence(clip):
    """ "impala (antelope)." ends in the single token ")." in CoOp's whole-sentence tokenization."""
    names = ["impala (antelope)", "kite (bird of prey)", "crane (bird)"]
    spec = prompt_lib.build_prompt_spec(names, n_ctx=4, class_token_position="end")
    words = prompt_lib.init_embeddings(clip, prompt_lib.context_layout(4, False, WORDS))
    ctx = prompt_lib.init_context(jax.random.key(0), spec, 32, init_embeddings=words)["ctx"]
    embeds = prompt_lib.assemble(clip.token_embeddings(spec.token_ids), ctx, spec.ctx_positions)
    want_ids = tokenize([f"{WORDS} {n}." for n in names])
    np.testing.assert_array_equal(spec.token_ids[:, 5:], want_ids[:, 5 : spec.token_ids.shape[1]])
    np.testing.assert_allclose(
        clip.encode_text_embeddings(embeds, spec.eot_index), clip.encode_text(want_ids), rtol=2e-5, atol=2e-5
    )


def test_ctx_positions_per_class_token_position():
    # "cat" is one token, "sea lion" two.
    end = prompt_lib.build_prompt_spec(["cat", "sea lion"], n_ctx=3, class_token_position="end")
    np.testing.assert_array_equal(end.ctx_positions, [[1, 2, 3], [1, 2, 3]])
    front = prompt_lib.build_prompt_spec(["cat", "sea lion"], n_ctx=3, class_token_position="front")
    np.testing.assert_array_equal(front.ctx_positions, [[2, 3, 4], [3, 4, 5]])
    middle = prompt_lib.build_prompt_spec(["cat", "sea lion"], n_ctx=3, class_token_position="middle")
    np.testing.assert_array_equal(middle.ctx_positions, [[1, 3, 4], [1, 4, 5]])
    np.testing.assert_array_equal(end.eot_index, [6, 7])  # sot + 3 ctx + name + "." + eot


def test_assemble_matches_a_per_class_loop():
    rng = np.random.default_rng(1)
    spec = prompt_lib.build_prompt_spec(["cat", "sea lion", "x"], n_ctx=5, class_token_position="middle")
    frozen = rng.normal(size=spec.token_ids.shape + (8,)).astype(np.float32)
    for ctx in (rng.normal(size=(5, 8)), rng.normal(size=(3, 5, 8))):  # shared and class-specific
        ctx = ctx.astype(np.float32)
        want = frozen.copy()
        for k in range(3):
            want[k, spec.ctx_positions[k]] = ctx if ctx.ndim == 2 else ctx[k]
        np.testing.assert_array_equal(prompt_lib.assemble(frozen, ctx, spec.ctx_positions), want)


def test_init_context_shapes_and_word_init(clip):
    spec = prompt_lib.build_prompt_spec(CLASSNAMES, n_ctx=6)
    shared = prompt_lib.init_context(jax.random.key(0), spec, 32)["ctx"]
    assert shared.shape == (6, 32)
    assert 0.01 < float(jnp.std(shared)) < 0.03  # N(0, 0.02) as CoOp
    words = prompt_lib.init_embeddings(clip, prompt_lib.context_layout(6, True, WORDS, mode="pad"))
    csc = prompt_lib.init_context(jax.random.key(0), spec, 32, csc=True, init_embeddings=words)["ctx"]
    assert csc.shape == (len(CLASSNAMES), 6, 32)
    np.testing.assert_array_equal(csc[:, 2:], np.broadcast_to(words, (len(CLASSNAMES), 4, 32)))


def test_ctx_init_layout_is_coops_by_default():
    """CoOp's PromptLearner with CTX_INIT "a photo of a": n_ctx = 4 word vectors, shared, whatever N_CTX and
    CSC say (its class-specific branch only exists for random init)."""
    tokenizer = prompt_lib.tok_lib.get_tokenizer()
    coop = prompt_lib.context_layout(16, True, "a photo of a")
    assert (coop.n_ctx, coop.csc) == (4, False)
    assert coop.init_ids == tuple(tokenizer.encode("a photo of a"))
    assert any("csc is ignored" in n for n in coop.notes) and any("context length" in n for n in coop.notes)
    assert prompt_lib.context_layout(4, False, "a_photo_of_a").init_ids == coop.init_ids  # "_" as CoOp
    assert prompt_lib.context_layout(4, False, "a photo of a").notes == ()
    # The former behaviour, only on request: n_ctx slots, the words at the end, class-specific copies.
    pad = prompt_lib.context_layout(16, True, "a photo of a", mode="pad")
    assert (pad.n_ctx, pad.csc, pad.init_ids) == (16, True, coop.init_ids)
    # Without words both modes are the config as written.
    assert prompt_lib.context_layout(16, True) == prompt_lib.ContextLayout(16, True)
    # A word of several tokens: every token is learned, and the note says how CoOp differs.
    odd = prompt_lib.context_layout(16, False, "a photograph of an aardvark")
    assert odd.n_ctx == len(tokenizer.encode("a photograph of an aardvark")) > 5
    assert any("CoOp would learn the first 5" in n for n in odd.notes)


def test_coop_layout_params_have_coops_shapes(clip):
    """The trainable context of a CoOp word init: [4, D] and equal to the words' token embeddings."""
    spec = prompt_lib.build_prompt_spec(CLASSNAMES, n_ctx=4)
    layout = prompt_lib.context_layout(16, True, "a photo of a")
    ctx = prompt_lib.init_context(
        jax.random.key(0), spec, 32, csc=layout.csc, init_embeddings=prompt_lib.init_embeddings(clip, layout)
    )["ctx"]
    assert ctx.shape == (4, 32)
    ids = np.asarray([[49406, *layout.init_ids]], np.int32)
    np.testing.assert_array_equal(ctx, np.asarray(clip.token_embeddings(ids))[0, 1:])


def test_bad_settings_fail_clearly(clip):
    with pytest.raises(ValueError, match="n_ctx must be >= 1"):
        prompt_lib.build_prompt_spec(CLASSNAMES, n_ctx=0)
    with pytest.raises(ValueError, match="class_token_position"):
        prompt_lib.build_prompt_spec(CLASSNAMES, class_token_position="start")
    with pytest.raises(ValueError, match="4 tokens, more than config.prompt.n_ctx=3"):
        prompt_lib.context_layout(3, False, WORDS, mode="pad")
    with pytest.raises(ValueError, match="ctx_init_mode must be one of"):
        prompt_lib.context_layout(3, False, WORDS, mode="words")
    with pytest.raises(ValueError, match="needs 79 tokens"):
        prompt_lib.build_prompt_spec(["word " * 60], n_ctx=16)


def _features_and_grad(clip, spec, ctx, module=None, **kwargs):
    """Class features and d(sum of a fixed random projection of them)/d ctx."""
    frozen = clip.token_embeddings(spec.token_ids)
    probe = np.random.default_rng(3).normal(size=(spec.num_classes, 16)).astype(np.float32)
    module = module or clip.module

    def f(c):
        out = prompt_lib.class_features(module, clip.params, frozen, c, spec, **kwargs)
        return jnp.sum(out * probe), out

    (_, feats), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(ctx)
    return np.asarray(feats), np.asarray(grad)


@pytest.mark.parametrize("position,prefix_len", [("end", 1 + 6), ("middle", 1 + 3)])
def test_shared_prefix_encoding_equals_the_full_sequences(clip, position, prefix_len):
    """The prefix encoded once, the K suffixes attending to its keys and values: same features and same
    gradient w.r.t. the context as K full sequences through the tower."""
    spec = prompt_lib.build_prompt_spec(CLASSNAMES, n_ctx=6, class_token_position=position)
    assert spec.shared_prefix_len == prefix_len
    ctx = prompt_lib.init_context(jax.random.key(1), spec, 32)["ctx"] * 20  # every slot matters
    full, full_grad = _features_and_grad(clip, spec, ctx, shared_prefix=False)
    shared, shared_grad = _features_and_grad(clip, spec, ctx, shared_prefix=True)
    # The full path against the sentence oracle is test_context_of_real_words_equals_the_sentence.
    np.testing.assert_allclose(shared, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shared_grad, full_grad, rtol=1e-4, atol=1e-5)
    assert np.abs(full_grad).min() > 0  # every context coordinate has a gradient to compare


def test_shared_prefix_length_of_each_layout():
    names = ["cat", "sea lion"]
    assert prompt_lib.build_prompt_spec(names, n_ctx=4, class_token_position="end").shared_prefix_len == 5
    assert prompt_lib.build_prompt_spec(names, n_ctx=4, class_token_position="middle").shared_prefix_len == 3
    assert prompt_lib.build_prompt_spec(names, n_ctx=4, class_token_position="front").shared_prefix_len == 1
    # Class names starting with the same word share it too; the end-of-text token is never in the prefix.
    assert prompt_lib.build_prompt_spec(["sea lion", "sea cow"], n_ctx=4).shared_prefix_len == 6
    assert prompt_lib.build_prompt_spec(["cat"], n_ctx=4).shared_prefix_len == 7  # [SOS] 4 ctx "cat" "." then [EOT]


def test_class_specific_context_takes_the_full_path(clip):
    spec = prompt_lib.build_prompt_spec(CLASSNAMES, n_ctx=4)
    ctx = prompt_lib.init_context(jax.random.key(2), spec, 32, csc=True)["ctx"] * 20
    a, ga = _features_and_grad(clip, spec, ctx, shared_prefix=True)
    b, gb = _features_and_grad(clip, spec, ctx, shared_prefix=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ga, gb)


def test_text_remat_gives_the_same_features_and_gradient(clip):
    """Recomputing the text layers in the backward pass changes memory, not results (same parameter tree)."""
    from dspt_jax.models.clip import CLIPModule

    spec = prompt_lib.build_prompt_spec(CLASSNAMES, n_ctx=4)
    ctx = prompt_lib.init_context(jax.random.key(4), spec, 32)["ctx"] * 20
    plain = _features_and_grad(clip, spec, ctx)
    remat = _features_and_grad(clip, spec, ctx, module=CLIPModule(clip.config, remat_text=True))
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6, atol=1e-6)
    # Recomputed activations may be fused and summed in another order: elements of the gradient near zero
    # differ by float rounding of the large ones (measured 5e-7 against a largest element of 2.8 on an AMD
    # EPYC), so the tolerance is relative to the gradient's scale.
    scale = float(np.abs(plain[1]).max())
    np.testing.assert_allclose(remat[1], plain[1], rtol=1e-5, atol=1e-6 * scale)


def _grouping_cost(lengths, groups, bucket_cost):
    lengths = np.asarray(lengths)
    return sum(len(g) * lengths[g].max() for g in groups) + len(groups) * bucket_cost * len(lengths) * lengths.max()


def test_length_buckets_by_hand():
    # The demo's classes: 25 suffixes of 4 tokens, 5 of 5. One batch: 150 tokens + 7.5; two: 100 + 25 + 15.
    lengths = np.array([4] * 25 + [5] * 5)[np.random.default_rng(0).permutation(30)]
    groups = prompt_lib.length_buckets(lengths, 0.05)
    assert [sorted(set(lengths[g])) for g in groups] == [[4], [5]]
    assert sorted(np.concatenate(groups)) == list(range(30))
    # One short row does not pay for its own batch (4 + 145 + 15 > 150 + 7.5): all rows, in order.
    np.testing.assert_array_equal(prompt_lib.length_buckets([5] * 29 + [4], 0.05)[0], np.arange(30))
    assert len(prompt_lib.length_buckets([5] * 29 + [4], 0.05)) == 1
    assert len(prompt_lib.length_buckets([7] * 6, 0.05)) == 1
    assert len(prompt_lib.length_buckets([4] * 25 + [5] * 5, float("inf"))) == 1


def test_length_buckets_is_the_cheapest_grouping():
    """Against every partition of the distinct lengths into contiguous ranges (brute force)."""
    import itertools

    rng = np.random.default_rng(1)
    for _ in range(200):
        lengths = rng.integers(1, 9, size=rng.integers(1, 12))
        cost = float(rng.choice([0.0, 0.02, 0.1, 0.5]))
        values = np.unique(lengths)
        best = np.inf
        for cuts in itertools.product([False, True], repeat=len(values) - 1):
            ends = [v for v, c in zip(values[:-1], cuts) if c] + [values[-1]]
            lows = [-1] + ends[:-1]
            groups = [np.flatnonzero((lengths > lo) & (lengths <= hi)) for lo, hi in zip(lows, ends)]
            best = min(best, _grouping_cost(lengths, groups, cost))
        got = prompt_lib.length_buckets(lengths, cost)
        assert sorted(np.concatenate(got)) == list(range(len(lengths)))
        np.testing.assert_allclose(_grouping_cost(lengths, got, cost), best)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_rows_encoded_by_length_equal_one_batch(clip, monkeypatch, shared_prefix):
    """Rows grouped by length (CLASSNAMES: 2 to 7 tokens) give the features and context gradient of the K
    rows in one batch padded to the longest."""
    spec = prompt_lib.build_prompt_spec(CLASSNAMES, n_ctx=4)
    n_prefix = spec.shared_prefix_len if shared_prefix else 0
    assert len(prompt_lib.length_buckets(spec.eot_index + 1 - n_prefix, prompt_lib.BUCKET_COST)) > 1
    ctx = prompt_lib.init_context(jax.random.key(5), spec, 32)["ctx"] * 20
    grouped = _features_and_grad(clip, spec, ctx, shared_prefix=shared_prefix)
    monkeypatch.setattr(prompt_lib, "BUCKET_COST", float("inf"))
    one = _features_and_grad(clip, spec, ctx, shared_prefix=shared_prefix)
    np.testing.assert_allclose(grouped[0], one[0], rtol=1e-5, atol=1e-6)
    scale = float(np.abs(one[1]).max())
    np.testing.assert_allclose(grouped[1], one[1], rtol=1e-5, atol=1e-6 * scale)
    assert np.abs(one[1]).min() > 0


def test_text_tokens_by_hand():
    # [SOS] X X X X cat . [EOT] and [SOS] X X X X sea lion . [EOT]: a prefix of 5, suffixes of 3 and 4.
    spec = prompt_lib.build_prompt_spec(["cat", "sea lion"], n_ctx=4)
    assert spec.shared_prefix_len == 5 and list(spec.eot_index) == [7, 8]
    # Two batches (3 + 4 + 2 x 0.05 x 2 x 4 = 7.8) beat one (2 x 4 + 0.4 = 8.4): 5 + 3 + 4 tokens.
    assert prompt_lib.text_tokens(spec) == 12
    # Full rows of 8 and 9: 17 + 1.8 = 18.8 against 18 + 0.9 = 18.9, two batches again.
    assert prompt_lib.text_tokens(spec, shared_prefix=False) == 17
    front = prompt_lib.build_prompt_spec(["cat", "sea lion"], n_ctx=4, class_token_position="front")
    assert front.shared_prefix_len == 1 and prompt_lib.text_tokens(front) == 17
