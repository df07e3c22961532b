"""Loading CLIP weights: a name, a file, a local directory or a Hugging Face hub id -> a `CLIP`.

Sources, decided by what is found:
  * an OpenAI model name (`"RN50"`, `"ViT-B/16"`, ...): OpenAI's `.pt` file in `$DSPT_JAX_CLIP_DIR`
    (`openai_checkpoints`);
  * a file: an OpenAI-named checkpoint (TorchScript `.pt`, `torch.save` state dict, `.safetensors`);
  * a directory with `open_clip_config.json`: the open_clip / timm hub layout of an OpenAI-architecture CLIP;
  * a directory with `config.json` (a transformers `CLIPConfig`) and, first found wins:
    - `flax_model.msgpack`: HF `FlaxCLIPModel` params; our tree mirrors it, so it loads as is;
    - `model.safetensors` (or sharded, with `model.safetensors.index.json`): HF PyTorch `CLIPModel` names;
    - `pytorch_model.bin`: same names;
  * a hub id ("openai/clip-vit-base-patch16", "timm/resnet50_clip.openai"): the same two folder layouts.
Torch pickles are read by `torch_files`: no torch needed, nothing pickled is executed. Every tensor is
checked against the model's tree: a missing or unexpected name, or a wrong shape, is an error that names it.

Offline behaviour: with `HF_HUB_OFFLINE=1`, or when the hub endpoint cannot be reached within a few
seconds, only the local Hugging Face cache is used; if the checkpoint is not there the error says what to
download and where to put it (instead of the hub client's minute-long retry loop).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import urllib.parse
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dspt_jax.models import openai_checkpoints, torch_files
from dspt_jax.models.clip import PRESETS, CLIPConfig, CLIPModule

WEIGHT_FILES = ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PROBE_TIMEOUT_S = 3.0


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint is neither local nor reachable; the message says how to get it."""


@dataclasses.dataclass
class CLIP:
    """A frozen CLIP: its config, its params (HF FlaxCLIPModel tree) and jitted encoders.

    `encode_image` takes float32 NHWC pixels, already CLIP-normalized; `encode_text` takes int token ids
    [N, 77] from `dspt_jax.tokenize`. Both return projected float32 features, not L2-normalized.
    """

    config: CLIPConfig
    params: dict
    dtype: Any = jnp.float32
    source: str = ""

    @property
    def module(self) -> CLIPModule:
        return CLIPModule(self.config, dtype=self.dtype)

    @property
    def logit_scale(self) -> float:
        """exp of the stored log-scale (about 100 for OpenAI's checkpoints)."""
        return float(np.exp(np.asarray(self.params["logit_scale"], np.float32)))

    @functools.cached_property
    def _jitted(self):
        module = self.module

        def make(method):
            return jax.jit(lambda params, *args: module.apply({"params": params}, *args, method=method))

        names = ("encode_image", "encode_text", "encode_text_embeddings", "token_embeddings")
        return {name: make(name) for name in names}

    def encode_image(self, pixels) -> jax.Array:
        return self._jitted["encode_image"](self.params, pixels)

    def encode_text(self, token_ids) -> jax.Array:
        ids = np.asarray(token_ids)
        # Causal mask: cutting after the longest end-of-text token changes nothing but the cost. Round the
        # length up to a multiple of 8 so that few distinct shapes get compiled.
        length = int(ids.argmax(axis=-1).max()) + 1
        length = min(ids.shape[1], -(-length // 8) * 8)
        return self._jitted["encode_text"](self.params, ids[:, :length])

    def token_embeddings(self, token_ids) -> jax.Array:
        return self._jitted["token_embeddings"](self.params, token_ids)

    def encode_text_embeddings(self, token_embeds, eot_index) -> jax.Array:
        """The prompt path: token embeddings [N, L, D] (L may be cut to max(eot_index) + 1) -> [N, E]."""
        return self._jitted["encode_text_embeddings"](self.params, token_embeds, eot_index)


def init_clip(config: CLIPConfig, rng: jax.Array | int = 0, dtype=jnp.float32) -> CLIP:
    """A randomly initialised CLIP (tests, the synthetic world)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    module = CLIPModule(config, dtype=dtype)
    params = jax.jit(module.init)(rng, *_dummy_inputs(config))["params"]
    return CLIP(config, jax.tree.map(np.asarray, params), dtype, source="init")


def _dummy_inputs(config: CLIPConfig):
    v = config.vision
    # A ResNet's parameter shapes do not depend on the input size: the smallest input (one 32 px image, a
    # 1 x 1 final grid) makes `init` trace and run a fraction of the real forward pass.
    size = 32 if config.is_resnet else v.image_size
    return (
        jnp.zeros((1, size, size, v.num_channels), jnp.float32),
        jnp.zeros((1, config.text.max_position_embeddings), jnp.int32),
    )


def expected_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter path (slash-joined) of our tree with its shape, without allocating anything."""
    tree = jax.eval_shape(CLIPModule(config).init, jax.random.key(0), *_dummy_inputs(config))["params"]
    return {"/".join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree).items()}


# --------------------------------------------------------------------------------------------------------
# PyTorch (transformers CLIPModel) names -> our tree.

_EMBEDDINGS = ("token_embedding", "position_embedding")
_IGNORED_SUFFIXES = ("position_ids",)  # non-persistent buffers that old checkpoints still carry


def torch_to_flax(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames and transposes a transformers `CLIPModel` state dict into our flat slash-joined tree."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        value = np.asarray(value)
        *path, leaf = key.split(".")
        parent = path[-1] if path else ""
        if leaf == "weight":
            if parent in _EMBEDDINGS:
                leaf = "embedding"
            elif parent == "patch_embedding":  # torch OIHW -> flax HWIO
                leaf, value = "kernel", value.transpose(2, 3, 1, 0)
            elif "norm" in parent or "layrnorm" in parent:
                leaf = "scale"
            elif value.ndim == 2:  # Linear: [out, in] -> [in, out]
                leaf, value = "kernel", value.T
        out["/".join(path + [leaf])] = value
    return out


def _check_and_unflatten(flat: dict[str, np.ndarray], config: CLIPConfig, source: str) -> dict:
    want = expected_shapes(config)
    missing = sorted(set(want) - set(flat))
    unexpected = sorted(set(flat) - set(want))
    wrong = sorted(
        f"{k}: checkpoint {tuple(flat[k].shape)} vs model {want[k]}"
        for k in set(want) & set(flat)
        if tuple(flat[k].shape) != want[k]
    )
    problems = []
    if missing:
        problems.append(f"missing parameters: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected parameters: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {'; '.join(wrong)}")
    if problems:
        raise ValueError(f"Checkpoint {source} does not match its architecture: " + " | ".join(problems))
    tree = {tuple(k.split("/")): np.asarray(v, np.float32) for k, v in flat.items()}
    return flax.traverse_util.unflatten_dict(tree)


def _read_weights(directory: str) -> tuple[dict[str, np.ndarray], str]:
    """Returns our flat tree and the file it came from."""
    files = set(os.listdir(directory))
    if "flax_model.msgpack" in files:
        path = os.path.join(directory, "flax_model.msgpack")
        with open(path, "rb") as f:
            tree = flax.serialization.msgpack_restore(f.read())
        if set(tree) == {"params"}:
            tree = tree["params"]
        flat = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}
        return flat, path
    if "model.safetensors" in files or _SAFETENSORS_INDEX in files:
        from safetensors.numpy import load_file

        if "model.safetensors" in files:
            shards = ["model.safetensors"]
        else:
            with open(os.path.join(directory, _SAFETENSORS_INDEX)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard)))
        return torch_to_flax(state), os.path.join(directory, shards[0])
    if "pytorch_model.bin" in files:
        path = os.path.join(directory, "pytorch_model.bin")
        return torch_to_flax(torch_files.read_torch_file(path)), path
    raise FileNotFoundError(
        f"No weights in {directory}: expected one of {', '.join(WEIGHT_FILES)} "
        f"(found: {', '.join(sorted(files)) or 'nothing'})."
    )


def load_clip_from_directory(directory: str, dtype=jnp.float32) -> CLIP:
    """A folder in the open_clip layout (`open_clip_config.json`) or a transformers one (`config.json`)."""
    if openai_checkpoints.is_open_clip_directory(directory):
        config, flat = openai_checkpoints.read_open_clip_directory(directory)
        return CLIP(config, _check_and_unflatten(flat, config, directory), dtype, source=directory)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{directory} has no config.json (a transformers CLIPConfig) and no "
            f"{openai_checkpoints.OPEN_CLIP_CONFIG} (open_clip)."
        )
    with open(config_path) as f:
        config = CLIPConfig.from_hf_dict(json.load(f))
    flat, path = _read_weights(directory)
    params = _check_and_unflatten(flat, config, path)
    return CLIP(config, params, dtype, source=directory)


def load_clip_from_file(path: str, dtype=jnp.float32) -> CLIP:
    """One OpenAI-named checkpoint file (`RN50.pt`, a `torch.save` state dict, a `.safetensors`)."""
    config, flat = openai_checkpoints.read_file(path)
    return CLIP(config, _check_and_unflatten(flat, config, path), dtype, source=path)


def save_clip(clip: CLIP, directory: str) -> None:
    """Writes `config.json` + `flax_model.msgpack` (HF FlaxCLIPModel layout), loadable by `load_clip`."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(clip.config.to_hf_dict(), f, indent=2)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), clip.params)
    tmp = os.path.join(directory, "flax_model.msgpack.tmp")
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(params))
    os.replace(tmp, os.path.join(directory, "flax_model.msgpack"))


# --------------------------------------------------------------------------------------------------------
# Hub.


def _hub_reachable(endpoint: str) -> bool:
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # cannot probe through a proxy cheaply; let the client try
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _download_instructions(repo_id: str, why: str) -> str:
    from huggingface_hub import constants

    return (
        f"Cannot load CLIP {repo_id!r}: {why}, and it is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}). On a machine with network, run\n"
        f"    hf download {repo_id} config.json model.safetensors --local-dir clip_weights/{repo_id}\n"
        f"(or flax_model.msgpack instead of model.safetensors; for an open_clip repo such as "
        f"timm/resnet50_clip.openai: {openai_checkpoints.OPEN_CLIP_CONFIG} open_clip_model.safetensors), "
        f"copy that folder here and pass its path: "
        f"load_clip('clip_weights/{repo_id}'). Copying a populated hub cache into HF_HUB_CACHE works too."
    )


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    """Returns a local directory holding `repo_id`'s config and one weight file: open_clip's files when the
    repo has them (timm's OpenAI CLIPs also carry a timm `config.json` that is not a CLIP config), else
    transformers' `config.json` and weights."""
    from huggingface_hub import constants, hf_hub_download

    def fetch(filename, local_only):
        try:
            return hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_only
            )
        except Exception:  # missing file, missing repo, no network: callers decide what that means
            return None

    online = not constants.HF_HUB_OFFLINE and _hub_reachable(constants.ENDPOINT)
    why = (
        "HF_HUB_OFFLINE is set"
        if constants.HF_HUB_OFFLINE
        else f"the hub ({constants.ENDPOINT}) is unreachable"
    )
    layouts = (
        (openai_checkpoints.OPEN_CLIP_CONFIG, openai_checkpoints.OPEN_CLIP_WEIGHTS),
        ("config.json", WEIGHT_FILES),
    )
    for local_only in (True, False) if online else (True,):
        for config_file, weight_files in layouts:
            config = fetch(config_file, local_only)
            if config is None:
                continue
            for filename in weight_files:
                if fetch(filename, local_only) is not None:
                    return os.path.dirname(config)
    if online:
        raise CheckpointNotFoundError(
            f"{repo_id!r} on {constants.ENDPOINT} has neither config.json with one of {', '.join(WEIGHT_FILES)} "
            f"nor {openai_checkpoints.OPEN_CLIP_CONFIG} with one of {', '.join(openai_checkpoints.OPEN_CLIP_WEIGHTS)}."
        )
    raise CheckpointNotFoundError(_download_instructions(repo_id, why))


def _not_a_source(source: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{source!r} is not an OpenAI model name ({', '.join(openai_checkpoints.OPENAI_MODELS)}), a checkpoint "
        "file, a local directory or a hub id like 'openai/clip-vit-base-patch16'."
    )


def check_source(source: str, *, revision: str | None = None, cache_dir: str | None = None) -> None:
    """Raises what `load_clip(source)` would raise for a missing or unknown checkpoint, without reading
    weights (the trainer checks the model and the data before any work, and reports both). A hub id is
    looked up in the local cache (fetched when the hub is reachable)."""
    if source.startswith("random:"):
        if source.split(":", 1)[1] not in PRESETS:
            raise ValueError(f"Unknown preset in {source!r}; known: {sorted(PRESETS)}")
        return
    if source in openai_checkpoints.OPENAI_MODELS:
        if not os.path.isfile(openai_checkpoints.named_file(source)):
            raise CheckpointNotFoundError(openai_checkpoints.missing_file_message(source))
        return
    if os.path.isfile(source):
        return
    if os.path.isdir(source):
        if openai_checkpoints.is_open_clip_directory(source):
            return
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise FileNotFoundError(
                f"{source} has no config.json (a transformers CLIPConfig) and no "
                f"{openai_checkpoints.OPEN_CLIP_CONFIG} (open_clip)."
            )
        if not any(os.path.isfile(os.path.join(source, f)) for f in (*WEIGHT_FILES, _SAFETENSORS_INDEX)):
            raise FileNotFoundError(f"No weights in {source}: expected one of {', '.join(WEIGHT_FILES)}.")
        return
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise _not_a_source(source)
    _hub_snapshot(source, revision, cache_dir)


def load_clip(
    source: str, *, dtype=jnp.float32, revision: str | None = None, cache_dir: str | None = None
) -> CLIP:
    """Loads a CLIP from a name, a file, a local directory or a Hugging Face hub id.

    Args:
      source: an OpenAI model name ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16",
        "ViT-L/14", "ViT-L/14@336px": OpenAI's file in $DSPT_JAX_CLIP_DIR), a checkpoint file with OpenAI's
        tensor names, a directory (transformers or open_clip layout), a hub id
        ("openai/clip-vit-base-patch16", "timm/resnet50_clip.openai"), or "random:<preset>" (random weights
        with the shapes of `dspt_jax.models.clip.PRESETS[preset]`: "vit_b16", "vit_b32", "rn50", "rn101",
        "tiny"). The synthetic world's CLIP ("synthetic") is loaded by `dspt_jax.model_source.load_clip`.
      dtype: compute dtype of the towers (parameters stay float32).
      revision, cache_dir: passed to the hub client.
    """
    if source.startswith("random:"):
        preset = source.split(":", 1)[1]
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r} in {source!r}; known: {sorted(PRESETS)}")
        clip = init_clip(PRESETS[preset], rng=0, dtype=dtype)
        clip.source = source
        return clip
    if source in openai_checkpoints.OPENAI_MODELS:
        try:
            path = openai_checkpoints.check_named_file(source)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(str(e)) from None
        clip = load_clip_from_file(path, dtype)
    elif os.path.isfile(source):
        return load_clip_from_file(source, dtype)
    elif os.path.isdir(source):
        return load_clip_from_directory(source, dtype)
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise _not_a_source(source)
    else:
        clip = load_clip_from_directory(_hub_snapshot(source, revision, cache_dir), dtype)
    clip.source = source
    return clip
