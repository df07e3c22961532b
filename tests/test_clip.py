"""The Linen CLIP against independent references: transformers' PyTorch CLIPModel and a genuine FlaxCLIPModel."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the oracle: the test extra installs it; a missing oracle must fail, not skip
import transformers
from tiny_clip import scrambled_clip, tiny_config

from dspt_jax import load_clip, tokenize
from dspt_jax.models import clip_logits, init_clip, save_clip
from dspt_jax.models.loading import CheckpointNotFoundError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "flax_clip_tiny")

# Two deliberately different tiny architectures: activations, widths, depths, patching and eos id differ.
HF_CONFIGS = {
    "quick_gelu": dict(
        text_config=dict(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=20,
            hidden_act="quick_gelu",
            eos_token_id=98,
            bos_token_id=97,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=40,
            intermediate_size=50,
            num_hidden_layers=3,
            num_attention_heads=5,
            image_size=30,
            patch_size=6,
            hidden_act="quick_gelu",
        ),
        projection_dim=16,
        logit_scale_init_value=3.1,
    ),
    "gelu": dict(
        text_config=dict(
            vocab_size=61,
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=12,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            eos_token_id=60,
            bos_token_id=59,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=36,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
        ),
        projection_dim=20,
        logit_scale_init_value=1.7,
    ),
}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _hf_model(name, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(**HF_CONFIGS[name])).eval()
    with torch.no_grad():  # move every tensor off its trivial init (LN at 1/0, zero biases) so a mix-up shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(name, seed=0):
    cfg = HF_CONFIGS[name]
    t, v = cfg["text_config"], cfg["vision_config"]
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(3, 3, v["image_size"], v["image_size"])).astype(np.float32)
    n, length = 4, t["max_position_embeddings"]
    ids = rng.integers(1, t["bos_token_id"], size=(n, length))
    ids[:, 0] = t["bos_token_id"]
    for row, eot in enumerate([3, length - 1, 7, 5]):
        ids[row, eot] = t["eos_token_id"]
        ids[row, eot + 1 :] = 0
    return pixels, ids


def _hf_outputs(model, pixels, ids):
    with torch.no_grad():
        px, tok = torch.tensor(pixels), torch.tensor(ids)
        img = model.get_image_features(pixel_values=px)
        txt = model.get_text_features(input_ids=tok)
        img = getattr(img, "pooler_output", img)  # transformers 5 returns an output object
        txt = getattr(txt, "pooler_output", txt)
        logits = model(input_ids=tok, pixel_values=px).logits_per_image
    return img.numpy(), txt.numpy(), logits.numpy()


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_bin"])
def test_parity_with_transformers_pytorch(tmp_path, name, safe):
    model = _hf_model(name)
    model.save_pretrained(tmp_path)
    if (
        not safe
    ):  # transformers 5 only writes safetensors; a pytorch_model.bin is this torch.save of the state
        os.remove(tmp_path / "model.safetensors")
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert set(os.listdir(tmp_path)) == {"config.json", "model.safetensors" if safe else "pytorch_model.bin"}
    clip = load_clip(str(tmp_path))
    assert clip.config.text.hidden_act == name
    pixels, ids = _inputs(name)
    want_img, want_txt, want_logits = _hf_outputs(model, pixels, ids)

    img = clip.encode_image(pixels.transpose(0, 2, 3, 1))
    txt = clip.encode_text(ids)
    logits, _ = clip_logits(img, txt, clip.params["logit_scale"])
    assert _rel(img, want_img) < 1e-5
    assert _rel(txt, want_txt) < 1e-5
    assert _rel(logits, want_logits) < 1e-5
    assert clip.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)


def test_genuine_flax_checkpoint_fixture():
    """A flax_model.msgpack written by transformers 4.57.6 FlaxCLIPModel (see make_flax_clip_fixture.py)."""
    want = np.load(os.path.join(FIXTURE, "expected.npz"))
    clip = load_clip(FIXTURE)
    assert clip.config.projection_dim == 24  # the top-level value, not the sub-configs' stale 512
    img = clip.encode_image(want["pixel_values_nchw"].transpose(0, 2, 3, 1))
    txt = clip.encode_text(want["input_ids"])
    logits, logits_t = clip_logits(img, txt, clip.params["logit_scale"])
    assert clip.logit_scale == pytest.approx(float(want["logit_scale"]), rel=1e-6)
    assert _rel(img, want["image_features"]) < 1e-5
    assert _rel(txt, want["text_features"]) < 1e-5
    assert _rel(logits, want["logits_per_image"]) < 1e-5
    assert _rel(logits_t, want["logits_per_text"]) < 1e-5


def test_prompt_path_matches_full_sentence_and_truncation_is_exact():
    """Context set to the embeddings of real words == encode_text of the whole sentence, cut or not."""
    clip = scrambled_clip(tiny_config(), seed=3)
    classnames = [
        "cat",
        "golden retriever",
        "Faces_easy",
        "sea lion",
        "a very long class name with many words",
    ]
    context = "a photo of a"
    ids = tokenize([f"{context} {c}." for c in classnames])
    n_ctx = len(tokenize(context)[0].nonzero()[0]) - 2
    # CoOp's assembly: [SOS] + context embeddings + class-name/"."/[EOS] embeddings from "X X X X name.".
    placeholder_ids = tokenize([" ".join(["X"] * n_ctx) + f" {c}." for c in classnames])
    emb = np.array(clip.token_embeddings(placeholder_ids))
    ctx_emb = np.asarray(clip.token_embeddings(tokenize(context)))[0, 1 : 1 + n_ctx]
    emb[:, 1 : 1 + n_ctx] = ctx_emb
    eot = placeholder_ids.argmax(-1)
    assert (eot == ids.argmax(-1)).all()

    want = np.asarray(clip.encode_text(ids))
    full = np.asarray(clip.encode_text_embeddings(emb, eot))
    cut = int(eot.max()) + 1
    short = np.asarray(clip.encode_text_embeddings(emb[:, :cut], eot))
    assert cut < 20  # the cut really removes most of the 77 positions
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(short, full, rtol=1e-5, atol=1e-6)
    # Sanity of the oracle: a different context does change the features.
    emb[:, 1] += np.random.default_rng(0).normal(size=emb.shape[-1])  # not a constant: LayerNorm erases those
    assert _rel(clip.encode_text_embeddings(emb, eot), want) > 1e-2


def test_encode_text_truncation_matches_untruncated_module():
    clip = scrambled_clip(tiny_config(), seed=1)
    ids = tokenize(["a photo of a dog.", "an example of a much longer caption, with commas, numbers 1 2 3."])
    full = clip.module.apply({"params": clip.params}, ids, method="encode_text")  # all 77 positions
    np.testing.assert_allclose(clip.encode_text(ids), full, rtol=1e-5, atol=1e-6)


def test_bfloat16_towers_stay_close():
    cfg = tiny_config(vocab_size=500)
    clip32 = init_clip(cfg, rng=0)
    clip16 = init_clip(cfg, rng=0, dtype=jnp.bfloat16)
    pixels = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    a, b = clip32.encode_image(pixels), clip16.encode_image(pixels)
    assert b.dtype == jnp.float32
    assert 0 < _rel(b, a) < 5e-2


def test_save_and_load_round_trip(tmp_path):
    clip = init_clip(tiny_config(vocab_size=300), rng=5)
    save_clip(clip, str(tmp_path))
    again = load_clip(str(tmp_path))
    assert again.config == clip.config
    pixels = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(again.encode_image(pixels), clip.encode_image(pixels))


def _tamper(tmp_path, fn):
    model = _hf_model("gelu")
    model.save_pretrained(tmp_path)
    from safetensors.numpy import load_file, save_file

    path = os.path.join(tmp_path, "model.safetensors")
    state = load_file(path)
    fn(state)
    save_file(state, path)


def test_missing_key_is_named(tmp_path):
    _tamper(tmp_path, lambda s: s.pop("vision_model.pre_layrnorm.bias"))
    with pytest.raises(ValueError, match=r"missing parameters: vision_model/pre_layrnorm/bias"):
        load_clip(str(tmp_path))


def test_unexpected_key_is_named(tmp_path):
    _tamper(tmp_path, lambda s: s.__setitem__("text_model.extra_head.weight", np.zeros((2, 2), np.float32)))
    with pytest.raises(ValueError, match=r"unexpected parameters: text_model/extra_head/kernel"):
        load_clip(str(tmp_path))


def test_wrong_shape_is_named(tmp_path):
    def shrink(s):
        s["text_projection.weight"] = s["text_projection.weight"][:-1]

    _tamper(tmp_path, shrink)
    with pytest.raises(
        ValueError, match=r"text_projection/kernel: checkpoint \(24, 19\) vs model \(24, 20\)"
    ):
        load_clip(str(tmp_path))


def test_directory_without_weights(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(tiny_config().to_hf_dict(), f)
    with pytest.raises(FileNotFoundError, match="flax_model.msgpack, model.safetensors, pytorch_model.bin"):
        load_clip(str(tmp_path))


@pytest.mark.parametrize("mode", ["hf_hub_offline", "unreachable"])
def test_hub_id_offline_fails_fast_with_instructions(tmp_path, monkeypatch, mode):
    from huggingface_hub import constants

    if mode == "hf_hub_offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:  # nothing listens on port 9 of loopback: the probe is refused at once, like a machine with no network
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(CheckpointNotFoundError) as info:
        load_clip("openai/clip-vit-base-patch16", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "hf download openai/clip-vit-base-patch16" in message
    assert "load_clip('clip_weights/openai/clip-vit-base-patch16')" in message
    assert ("HF_HUB_OFFLINE" in message) == (mode == "hf_hub_offline")


def test_hub_id_served_from_local_cache_when_offline(tmp_path, monkeypatch):
    """A populated hub cache is used without any network (the path users take after copying a cache)."""
    from huggingface_hub import constants

    model = _hf_model("quick_gelu")
    snapshot = tmp_path / "models--someone--tiny-clip" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    (tmp_path / "models--someone--tiny-clip" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-clip" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    clip = load_clip("someone/tiny-clip", cache_dir=str(tmp_path))
    pixels, ids = _inputs("quick_gelu")
    want_img, _, _ = _hf_outputs(model, pixels, ids)
    assert _rel(clip.encode_image(pixels.transpose(0, 2, 3, 1)), want_img) < 1e-5
    assert clip.source == "someone/tiny-clip"


@pytest.mark.parametrize("causal,with_prefix", [(True, False), (True, True), (False, False)])
def test_pooled_last_block_equals_slicing_the_full_output(causal, with_prefix):
    """`pool_index` computes only the pooled token in the last block: the same values as running every
    token through it and reading that token, for causal (text, with and without a shared prefix) and
    bidirectional (vision) towers."""
    from dspt_jax.models.clip import Encoder

    kwargs = dict(hidden_size=32, intermediate_size=64, num_heads=4, act="quick_gelu", eps=1e-5, causal=causal)
    encoder = Encoder(3, kwargs)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 7, 32)), jnp.float32)
    prefix = jnp.asarray(rng.normal(size=(1, 4, 32)), jnp.float32) if with_prefix else None
    pool = jnp.asarray([6, 0, 3, 5, 2] if causal else [0] * 5, jnp.int32)
    params = encoder.init(jax.random.key(0), x, prefix)
    full = encoder.apply(params, x, prefix)
    full = full[0] if with_prefix else full
    pooled = encoder.apply(params, x, prefix, pool_index=pool)
    assert pooled.shape == (5, 32)
    expected = np.asarray(full)[np.arange(5), np.asarray(pool)]
    np.testing.assert_allclose(np.asarray(pooled), expected, rtol=1e-5, atol=1e-5)


def test_pooling_without_blocks_reads_the_token():
    from dspt_jax.models.clip import Encoder

    kwargs = dict(hidden_size=8, intermediate_size=16, num_heads=2, act="quick_gelu", eps=1e-5, causal=True)
    encoder = Encoder(0, kwargs)
    x = jnp.arange(2 * 3 * 8, dtype=jnp.float32).reshape(2, 3, 8)
    pooled = encoder.apply(encoder.init(jax.random.key(0), x), x, pool_index=jnp.asarray([2, 0]))
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(x)[[0, 1], [2, 0]])
