"""OpenAI-format CLIP checkpoints on disk: OpenAI's `.pt` files by name, any OpenAI-named file, open_clip folders.

Three ways in, all ending in `(CLIPConfig, flat parameter tree)` through `openai_format`:

  * a name (`"RN50"`, `"ViT-B/16"`, ... see `OPENAI_MODELS`): OpenAI's released file (`RN50.pt`) looked up in
    `clip_dir()`, i.e. `$DSPT_JAX_CLIP_DIR`, else `<project cache>/clip` (`~/.cache/dspt_jax/clip`). Its
    SHA-256 (part of OpenAI's download URL) is checked, so a truncated download is caught. Nothing is
    downloaded here: a missing file is an error that says which URL to fetch and where to put it.
  * a file: a TorchScript archive (OpenAI's `.pt`), a `torch.save` state dict (`.pt`, `.pth`, `.bin`), or a
    `.safetensors` file, with OpenAI's tensor names. Torch files are read by `torch_files` (no torch needed,
    nothing pickled is executed).
  * an open_clip / timm hub folder: `open_clip_config.json` beside `open_clip_model.safetensors` or
    `open_clip_pytorch_model.bin` (e.g. `timm/resnet50_clip.openai`, `timm/vit_base_patch16_clip_224.openai`).
    The activation follows the config's `model_cfg.quick_gelu` (absent means GELU, as in open_clip).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from dspt_jax import cache
from dspt_jax.models import openai_format
from dspt_jax.models.clip import CLIPConfig

CLIP_DIR_ENV = "DSPT_JAX_CLIP_DIR"
_URL_ROOT = "https://openaipublic.azureedge.net/clip/models"

# name -> (file name, SHA-256 of the file). OpenAI's URL is f"{_URL_ROOT}/{sha256}/{file}".
OPENAI_MODELS = {
    "RN50": ("RN50.pt", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"),
    "RN101": ("RN101.pt", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599"),
    "RN50x4": ("RN50x4.pt", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd"),
    "RN50x16": ("RN50x16.pt", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa"),
    "RN50x64": ("RN50x64.pt", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c"),
    "ViT-B/32": ("ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    "ViT-B/16": ("ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "ViT-L/14": ("ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
    "ViT-L/14@336px": ("ViT-L-14-336px.pt", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"),
}
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_WRAPPER_PREFIXES = ("state_dict.", "model.", "module.")


def clip_dir() -> str:
    """Where OpenAI's files are looked up by name: $DSPT_JAX_CLIP_DIR, else <project cache>/clip."""
    return os.path.expanduser(os.environ.get(CLIP_DIR_ENV) or os.path.join(cache.cache_root(), "clip"))


def url(name: str) -> str:
    file, sha = OPENAI_MODELS[name]
    return f"{_URL_ROOT}/{sha}/{file}"


def named_file(name: str) -> str:
    """The path where OpenAI's file for `name` is expected (it may not exist)."""
    return os.path.join(clip_dir(), OPENAI_MODELS[name][0])


def missing_file_message(name: str) -> str:
    path = named_file(name)
    return (
        f"CLIP {name!r} is OpenAI's {OPENAI_MODELS[name][0]}, expected at {path} (the folder is "
        f"${CLIP_DIR_ENV}, else {os.path.join(cache.cache_root(), 'clip')}). It is not there. On a machine "
        f"with network, run\n    curl -L -o {OPENAI_MODELS[name][0]} {url(name)}\n"
        f"and copy the file to {path}; or pass a file's path as the source."
    )


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def check_named_file(name: str) -> str:
    """Returns the path of OpenAI's file for `name` after checking its SHA-256; raises ValueError when the
    file differs from OpenAI's (an interrupted download), FileNotFoundError (with `missing_file_message`)
    when there is none."""
    path = named_file(name)
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_file_message(name))
    got, want = _sha256(path), OPENAI_MODELS[name][1]
    if got != want:
        raise ValueError(
            f"{path} is not OpenAI's {OPENAI_MODELS[name][0]}: SHA-256 {got}, expected {want} (an interrupted "
            f"or corrupted download?). Fetch it again from {url(name)}."
        )
    return path


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    from dspt_jax.models import torch_files

    return torch_files.read_torch_file(path)


def _convert(state: dict, source: str, *, quick_gelu: bool) -> tuple[CLIPConfig, dict[str, np.ndarray]]:
    # Training scripts wrap the weights: {"state_dict": ...}, {"model": ...}, DataParallel's "module.".
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state, stripped = {k[len(prefix):]: v for k, v in state.items()}, True
    try:
        config = openai_format.config_from_state_dict(state, quick_gelu=quick_gelu)
        return config, openai_format.state_dict_to_flax(state)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"{source} is not an OpenAI-architecture CLIP (ModifiedResNet or ViT with OpenAI's tensor "
            f"names): {e}"
        ) from e


def read_file(path: str) -> tuple[CLIPConfig, dict[str, np.ndarray]]:
    """An OpenAI-named checkpoint file (TorchScript archive, torch.save state dict or safetensors)."""
    return _convert(_read_tensors(path), path, quick_gelu=True)


def is_open_clip_directory(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, OPEN_CLIP_CONFIG))


def read_open_clip_directory(directory: str) -> tuple[CLIPConfig, dict[str, np.ndarray]]:
    """An open_clip / timm hub folder (`open_clip_config.json` + weights) of an OpenAI-architecture CLIP."""
    with open(os.path.join(directory, OPEN_CLIP_CONFIG)) as f:
        model_cfg = json.load(f).get("model_cfg", {})
    weights = [w for w in OPEN_CLIP_WEIGHTS if os.path.isfile(os.path.join(directory, w))]
    if not weights:
        raise FileNotFoundError(
            f"{directory} has {OPEN_CLIP_CONFIG} but no weights: expected one of {', '.join(OPEN_CLIP_WEIGHTS)}."
        )
    path = os.path.join(directory, weights[0])
    config, flat = _convert(_read_tensors(path), path, quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    if "embed_dim" in model_cfg and int(model_cfg["embed_dim"]) != config.projection_dim:
        raise ValueError(
            f"{path}: embedding width {config.projection_dim} from the tensors, {model_cfg['embed_dim']} in "
            f"{OPEN_CLIP_CONFIG}."
        )
    return config, flat
