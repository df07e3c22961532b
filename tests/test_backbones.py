"""OpenAI-format backbones (ModifiedResNet and ViT) against OpenAI's own model.py, from every file format.

The oracle is OpenAI's `model.py` (see `openai_reference.py`), built at toy widths with random weights and
non-trivial batch-norm statistics; our loader reads its state dict as a `torch.save` file, a TorchScript
archive, an open_clip folder and a float16 state dict, and every path must give the reference's image
features, text features and logits to relative error 1e-5.
"""

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the oracle's framework: a test dependency, a missing one must fail
from safetensors.torch import save_file

from dspt_jax import load_clip, model_source
from dspt_jax.models import clip_logits, openai_checkpoints, save_clip, torch_files
from dspt_jax.models.loading import CheckpointNotFoundError
from dspt_jax.models.resnet import ResNetConfig, resize_grid_embedding

import openai_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 49408  # CLIP's tokenizer (the trainer tokenizes class names); end-of-text is the largest id of a row

# OpenAI's CLIP(...) arguments: embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
# context_length, vocab_size, transformer_width, transformer_heads, transformer_layers. Heads are width / 64
# as in OpenAI's build_model (the ResNet's attention pool: width * 32 / 64).
ARCHS = {
    "resnet": (48, 64, (1, 2, 1, 1), 16, None, 77, VOCAB, 128, 2, 2),
    "vit": (48, 32, 2, 128, 8, 77, VOCAB, 128, 2, 2),
}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def openai_model():
    return openai_reference.load_model_module(openai_reference.CACHE_DIR)


def _reference(module, arch, seed=0):
    """OpenAI's CLIP with scrambled weights and batch-norm statistics from training-mode passes."""
    torch.manual_seed(seed)
    model = module.CLIP(*ARCHS[arch])
    with torch.no_grad():
        for p in model.parameters():  # OpenAI's init zeroes each bn3 scale: every weight must matter here
            p.add_(0.05 * torch.randn_like(p))
        if arch == "resnet":
            model.train()
            for _ in range(3):
                model.encode_image(torch.randn(4, 3, 64, 64) * 2 + 0.5)
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.normal_(1.0, 0.3)
                    m.bias.normal_(0.0, 0.3)
            assert all(
                m.running_var.min() > 0 and (m.running_mean.abs().max() > 1e-3 or m.running_var.std() > 1e-3)
                for m in model.modules()
                if isinstance(m, torch.nn.BatchNorm2d)
            )
    return model.eval()


def _inputs(arch, seed=1):
    size = ARCHS[arch][1]
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(3, 3, size, size)).astype(np.float32)  # NCHW, already normalized
    ids = rng.integers(1, VOCAB - 1, size=(4, 77))
    for row, eot in enumerate((5, 12, 30, 76)):
        ids[row, eot] = VOCAB - 1
        ids[row, eot + 1:] = 0
    return pixels, ids


def _reference_outputs(model, pixels, ids):
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(pixels))
        text = model.encode_text(torch.from_numpy(ids))
        logits, _ = model(torch.from_numpy(pixels), torch.from_numpy(ids))
    return image.numpy(), text.numpy(), logits.numpy()


def _ours(clip, pixels, ids):
    image = clip.encode_image(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    text = clip.encode_text(ids)
    logits, _ = clip_logits(image, text, clip.params["logit_scale"])
    return np.asarray(image), np.asarray(text), np.asarray(logits)


def _write(model, arch, fmt, directory) -> str:
    """The reference's weights in one of the formats `load_clip` reads; returns the source to load."""
    state = model.state_dict()
    if fmt == "state_dict":
        path = os.path.join(directory, "model.pt")
        torch.save(state, path)
        return path
    if fmt == "float16":
        path = os.path.join(directory, "model_fp16.pth")
        torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in state.items()}}, path)
        return path
    if fmt == "torchscript":  # how OpenAI released its files: a traced model
        path = os.path.join(directory, "traced.pt")
        pixels, ids = _inputs(arch)
        traced = torch.jit.trace(model, (torch.from_numpy(pixels), torch.from_numpy(ids)), check_trace=False)
        torch.jit.save(traced, path)
        return path
    if fmt == "open_clip":
        folder = os.path.join(directory, "open_clip")
        os.makedirs(folder)
        embed, size, layers, width, patch, ctx, vocab, t_width, t_heads, t_layers = ARCHS[arch]
        model_cfg = {
            "embed_dim": embed,
            "quick_gelu": True,
            "vision_cfg": {"image_size": size, "layers": layers, "width": width, "patch_size": patch},
            "text_cfg": {"context_length": ctx, "vocab_size": vocab, "width": t_width, "heads": t_heads,
                         "layers": t_layers},
        }
        with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": {}}, f)
        save_file({k: v.contiguous().clone() for k, v in state.items()},
                  os.path.join(folder, "open_clip_model.safetensors"))
        return folder
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "open_clip", "float16"])
@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_parity_with_openai_model_py(openai_model, tmp_path, arch, fmt):
    model = _reference(openai_model, arch)
    source = _write(model, arch, fmt, str(tmp_path))
    if fmt == "float16":  # the reference with the same rounded weights
        model.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                               for k, v in model.state_dict().items()})
    pixels, ids = _inputs(arch)
    want = _reference_outputs(model, pixels, ids)
    clip = load_clip(source)
    got = _ours(clip, pixels, ids)
    for name, g, w in zip(("image features", "text features", "logits"), got, want):
        assert g.shape == w.shape, name
        assert _rel(g, w) < 1e-5, (name, _rel(g, w))
    assert isinstance(clip.config.vision, ResNetConfig) == (arch == "resnet")


def test_architecture_is_read_from_the_tensors(openai_model, tmp_path):
    clip = load_clip(_write(_reference(openai_model, "resnet"), "resnet", "state_dict", str(tmp_path)))
    assert clip.config.vision == ResNetConfig(layers=(1, 2, 1, 1), width=16, num_heads=8, image_size=64)
    assert (clip.config.projection_dim, clip.config.text.hidden_size, clip.config.text.num_hidden_layers,
            clip.config.text.num_attention_heads, clip.config.text.vocab_size) == (48, 128, 2, 2, VOCAB)
    # Saved in our own layout (config.json + flax_model.msgpack) and read back: the same model.
    save_clip(clip, str(tmp_path / "ours"))
    again = load_clip(str(tmp_path / "ours"))
    assert again.config == clip.config
    jax.tree.map(np.testing.assert_array_equal, again.params, clip.params)


def test_batch_norm_uses_the_checkpoints_statistics_only(openai_model, tmp_path):
    """Inference-mode batch norm: an image's feature does not depend on the rest of its batch (batch
    statistics would make it), and training steps leave every statistic as the checkpoint has it."""
    model = _reference(openai_model, "resnet")
    clip = load_clip(_write(model, "resnet", "state_dict", str(tmp_path)))
    pixels, _ = _inputs("resnet")
    nhwc = pixels.transpose(0, 2, 3, 1)
    together = np.asarray(clip.encode_image(nhwc))
    alone = np.concatenate([np.asarray(clip.encode_image(nhwc[i:i + 1])) for i in range(len(nhwc))])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    # bfloat16 towers (batch norm folded in float32): the same directions.
    half = np.asarray(load_clip(clip.source, dtype=jnp.bfloat16).encode_image(nhwc))
    cosine = (half * together).sum(-1) / np.linalg.norm(half, axis=-1) / np.linalg.norm(together, axis=-1)
    assert cosine.min() > 0.999, cosine
    stats = clip.params["vision_model"]["layer2"]["0"]["bn3"]
    np.testing.assert_allclose(stats["mean"], model.visual.layer2[0].bn3.running_mean.numpy())
    np.testing.assert_allclose(stats["var"], model.visual.layer2[0].bn3.running_var.numpy())


def test_resnet_trains_on_a_mesh_as_on_one_device(openai_model, tmp_path):
    """The trainer on a tiny ResNet checkpoint, image tower computed every step: 1 device in process, 8 fake
    devices (batch and class prompts sharded) in a subprocess; same losses; the CLIP is untouched."""
    model = _reference(openai_model, "resnet")
    source = _write(model, "resnet", "state_dict", str(tmp_path))
    overrides = {"model.source": source, "data.image_size": 64, "num_epochs": 2, "image_features": "computed"}
    from dspt_jax import train
    from test_train import read_jsonl, smoke_config

    clip = load_clip(source)
    before = jax.tree.map(np.array, clip.params)
    one = str(tmp_path / "one")
    results = train.train_and_evaluate(smoke_config(**overrides), one, clip=clip)
    jax.tree.map(np.testing.assert_array_equal, clip.params, before)
    assert results["zero_shot"]["num_examples"] == results["final"]["num_examples"] > 0

    eight = str(tmp_path / "eight")
    script = (
        "import sys; sys.path.insert(0, 'configs'); sys.path.insert(0, 'tests'); import jax\n"
        "assert jax.device_count() == 8\n"
        "from dspt_jax import train\nfrom test_train import smoke_config\n"
        f"train.train_and_evaluate(smoke_config(**{overrides!r}), {eight!r})\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=600)
    losses_one = [r["loss"] for r in read_jsonl(os.path.join(one, "metrics.jsonl")) if "loss" in r]
    losses_eight = [r["loss"] for r in read_jsonl(os.path.join(eight, "metrics.jsonl")) if "loss" in r]
    assert len(losses_one) > 0
    np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
    with open(os.path.join(eight, "results.json")) as f:
        assert json.load(f)["zero_shot"]["accuracy"] == results["zero_shot"]["accuracy"]


def test_positional_embedding_is_interpolated_for_other_sizes(openai_model, tmp_path):
    """A ResNet checkpoint at 64 px runs on 96 px images (a 3x3 final grid instead of 2x2). Bicubic
    interpolation reproduces a linear function exactly away from the borders: checked on a linear grid."""
    clip = load_clip(_write(_reference(openai_model, "resnet"), "resnet", "state_dict", str(tmp_path)))
    out = clip.encode_image(np.random.default_rng(0).normal(size=(2, 96, 96, 3)).astype(np.float32))
    assert out.shape == (2, 48) and np.isfinite(np.asarray(out)).all()

    g, h = 8, 12
    i, j = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    pos = np.concatenate([np.full((1, 2), 7.0), np.stack([2 * i + 0.5, -j + 3.0], -1).reshape(g * g, 2)])
    np.testing.assert_array_equal(resize_grid_embedding(jnp.asarray(pos), g, g), pos)
    new = np.asarray(resize_grid_embedding(jnp.asarray(pos, jnp.float32), h, h)).reshape(-1, 2)
    assert new.shape == (1 + h * h, 2) and (new[0] == 7.0).all()
    src = (np.arange(h) + 0.5) * g / h - 0.5  # half-pixel centres, as jax.image.resize
    grid = new[1:].reshape(h, h, 2)
    inner = (src >= 1) & (src <= g - 2)  # the 4-tap cubic support stays inside the grid
    np.testing.assert_allclose(grid[inner][:, inner, 0], np.broadcast_to(2 * src[inner, None] + 0.5,
                                                                          (inner.sum(), inner.sum())), atol=1e-5)
    np.testing.assert_allclose(grid[inner][:, inner, 1], np.broadcast_to(-src[None, inner] + 3.0,
                                                                          (inner.sum(), inner.sum())), atol=1e-5)


def test_a_pickle_naming_another_global_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"visual.proj": Evil()}, protocol=2))
        z.writestr("evil/version", "3\n")
    with pytest.raises(torch_files.UnsafeCheckpointError, match="system"):
        load_clip(str(path))
    assert not marker.exists()


def test_openai_names_offline(tmp_path, monkeypatch, openai_model):
    """`load_clip("RN50")` looks in $DSPT_JAX_CLIP_DIR: missing, it fails at once naming the URL and the
    path; present, its SHA-256 is checked against OpenAI's before anything is read."""
    monkeypatch.setenv(openai_checkpoints.CLIP_DIR_ENV, str(tmp_path))
    t0 = time.perf_counter()
    for call in (load_clip, model_source.check_source):
        with pytest.raises(CheckpointNotFoundError) as e:
            call("RN50")
        assert openai_checkpoints.url("RN50") in str(e.value) and str(tmp_path / "RN50.pt") in str(e.value)
    assert time.perf_counter() - t0 < 5

    model = _reference(openai_model, "resnet")
    src = _write(model, "resnet", "torchscript", str(tmp_path))
    os.replace(src, tmp_path / "RN50.pt")
    with pytest.raises(ValueError, match="SHA-256"):
        load_clip("RN50")  # not OpenAI's file
    sha = hashlib.sha256((tmp_path / "RN50.pt").read_bytes()).hexdigest()
    monkeypatch.setitem(openai_checkpoints.OPENAI_MODELS, "RN50", ("RN50.pt", sha))
    clip = load_clip("RN50")
    assert clip.source == "RN50"
    pixels, ids = _inputs("resnet")
    want = _reference_outputs(model, pixels, ids)
    assert _rel(_ours(clip, pixels, ids)[0], want[0]) < 1e-5


@pytest.mark.parametrize("preset, args", [
    ("rn50", (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)),
    ("rn101", (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12)),
    ("vit_b16", (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)),
])
def test_random_presets_have_the_shapes_of_openais_models(openai_model, preset, args):
    """`random:<preset>` (bench, smoke runs) has exactly the tensors of OpenAI's model of that name (the
    arguments OpenAI's build_model derives from RN50.pt, RN101.pt, ViT-B-16.pt), built on the meta device."""
    from dspt_jax.models import openai_format
    from dspt_jax.models.clip import PRESETS
    from dspt_jax.models.loading import expected_shapes

    with torch.device("meta"):
        state = openai_model.CLIP(*args).state_dict()
    shapes = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in state.items()}  # no memory
    assert openai_format.config_from_state_dict(shapes) == PRESETS[preset]
    converted = openai_format.state_dict_to_flax(shapes)
    assert {k: v.shape for k, v in converted.items()} == expected_shapes(PRESETS[preset])


def test_resnet_feature_cache(tmp_path):
    """`image_features=cached` on a ResNet CLIP: the training features are encoded once into the workdir,
    under a key whose weights fingerprint tells ResNet checkpoints apart."""
    from dspt_jax import features, train
    from test_train import smoke_config

    config = smoke_config(**{"model.source": "random:tiny_rn", "image_features": "cached", "num_epochs": 1})
    clip = load_clip("random:tiny_rn")
    results = train.train_and_evaluate(config, str(tmp_path), clip=clip)
    assert results["final"]["num_examples"] > 0
    files = os.listdir(tmp_path / "features")
    assert any(f.startswith("train_cached") for f in files), files
    params = clip.params
    other = jax.tree.map(np.array, params)
    other["vision_model"]["conv1"]["kernel"][0, 0, 0, 0] += 1.0
    assert features.weights_fingerprint(params) != features.weights_fingerprint(other)
