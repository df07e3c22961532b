"""OpenAI's CLIP state-dict names (also open_clip's for the same models) -> our config and parameter tree.

OpenAI's checkpoints (`RN50.pt`, `ViT-B-16.pt`, ...) and open_clip's `open_clip_model.safetensors` of the
OpenAI weights name tensors `visual.*`, `transformer.resblocks.*`, `token_embedding.weight`,
`positional_embedding`, `ln_final.*`, `text_projection`, `logit_scale`. They carry no architecture file that
we need: every shape follows from the tensors, as in OpenAI's `build_model` (heads = width / 64, MLP 4x wide,
ResNet stage depths from the block indices, image size from the positional embedding's grid).

The mapping onto our tree (see `models/clip.py`):
  * text tower and ViT blocks: `attn.in_proj_weight` [3D, D] splits into `q_proj`/`k_proj`/`v_proj`,
    `ln_1`/`ln_2` are `layer_norm1`/`layer_norm2`, `mlp.c_fc`/`mlp.c_proj` are `mlp/fc1`/`mlp/fc2`;
    Linear weights [out, in] become kernels [in, out];
  * ViT: `visual.conv1` is the patch embedding (OIHW -> HWIO), `ln_pre`/`ln_post` are `pre_layrnorm`/
    `post_layernorm`, `visual.proj` [width, embed] is `visual_projection/kernel` as is (OpenAI computes
    `x @ proj`);
  * ModifiedResNet: the same names under `vision_model/`; batch norm `weight`/`bias`/`running_mean`/
    `running_var` are `scale`/`bias`/`mean`/`var`; `num_batches_tracked` is dropped.
"""

from __future__ import annotations

import re

import numpy as np

from dspt_jax.models.clip import CLIPConfig, TextConfig, VisionConfig
from dspt_jax.models.resnet import ResNetConfig

# Tensors in OpenAI's archives that are not weights (attributes of the scripted model).
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def is_openai_state_dict(state: dict) -> bool:
    return "text_projection" in state and "token_embedding.weight" in state and "ln_final.weight" in state


def _count(state: dict, pattern: str) -> int:
    """Number of distinct integers captured by `pattern` (a regex with one group) over the names."""
    found = {m.group(1) for k in state if (m := re.match(pattern, k))}
    return len(found)


def config_from_state_dict(state: dict, *, quick_gelu: bool = True) -> CLIPConfig:
    """The architecture of an OpenAI-named state dict, read off its shapes.

    `quick_gelu`: the text (and ViT) activation; OpenAI's weights were trained with x * sigmoid(1.702 x).
    """
    if not is_openai_state_dict(state):
        raise ValueError(
            "not an OpenAI CLIP state dict: expected text_projection, token_embedding.weight and "
            f"ln_final.weight among its {len(state)} tensors (first: {sorted(state)[:5]})"
        )
    act = "quick_gelu" if quick_gelu else "gelu"
    shape = lambda k: tuple(np.shape(state[k]))
    text_width = shape("ln_final.weight")[0]
    text = TextConfig(
        vocab_size=shape("token_embedding.weight")[0],
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        num_hidden_layers=_count(state, r"transformer\.resblocks\.(\d+)\."),
        num_attention_heads=text_width // 64,
        max_position_embeddings=shape("positional_embedding")[0],
        hidden_act=act,
        eos_token_id=shape("token_embedding.weight")[0] - 1,
    )
    embed_dim = shape("text_projection")[1]
    if "visual.proj" in state:
        width = shape("visual.conv1.weight")[0]
        patch = shape("visual.conv1.weight")[-1]
        grid = int(round((shape("visual.positional_embedding")[0] - 1) ** 0.5))
        vision = VisionConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=_count(state, r"visual\.transformer\.resblocks\.(\d+)\."),
            num_attention_heads=width // 64,
            num_channels=shape("visual.conv1.weight")[1],
            image_size=patch * grid,
            patch_size=patch,
            hidden_act=act,
        )
    elif "visual.attnpool.positional_embedding" in state:
        width = shape("visual.layer1.0.conv1.weight")[0]
        grid = int(round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5))
        vision = ResNetConfig(
            layers=tuple(_count(state, rf"visual\.layer{i}\.(\d+)\.") for i in (1, 2, 3, 4)),
            width=width,
            num_heads=width * 32 // 64,
            image_size=grid * 32,
            num_channels=shape("visual.conv1.weight")[1],
        )
    else:
        raise ValueError("OpenAI CLIP state dict with neither visual.proj (ViT) nor visual.attnpool (ResNet)")
    return CLIPConfig(text=text, vision=vision, projection_dim=embed_dim)


_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn/out_proj",
    "mlp.c_fc": "mlp/fc1",
    "mlp.c_proj": "mlp/fc2",
}
_LN_LEAVES = {"weight": "scale", "bias": "bias"}
_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _block(prefix: str, rest: str, value: np.ndarray, out: dict) -> None:
    """One tensor of a transformer block `rest` = "<i>.<module>.<leaf>" into `out` under `prefix`."""
    i, name = rest.split(".", 1)
    base = f"{prefix}/encoder/layers/{i}"
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
            out[f"{base}/self_attn/{proj}/" + ("kernel" if name.endswith("weight") else "bias")] = (
                part.T if name.endswith("weight") else part
            )
        return
    module, leaf = name.rsplit(".", 1)
    if module not in _BLOCK_RENAMES:
        raise KeyError(f"unknown transformer-block tensor {rest!r}")
    target = f"{base}/{_BLOCK_RENAMES[module]}"
    if module.startswith("ln_"):
        out[f"{target}/{_LN_LEAVES[leaf]}"] = value
    else:
        out[f"{target}/" + ("kernel" if leaf == "weight" else "bias")] = value.T if leaf == "weight" else value


def _resnet(name: str, value: np.ndarray, out: dict) -> None:
    """One `visual.*` tensor of a ModifiedResNet (name without "visual.")."""
    *path, leaf = name.split(".")
    module = path[-1]
    if leaf == "num_batches_tracked":
        return
    if name == "attnpool.positional_embedding":
        out["vision_model/attnpool/positional_embedding"] = value
        return
    is_bn = module.startswith("bn") or (path[-2:-1] == ["downsample"] and module == "1")
    if is_bn:
        leaf = _BN_LEAVES[leaf]
    elif value.ndim == 4:  # convolution OIHW -> HWIO
        leaf, value = "kernel", value.transpose(2, 3, 1, 0)
    elif leaf == "weight":  # attention pool Linear
        leaf, value = "kernel", value.T
    out["/".join(["vision_model", *path, leaf])] = value


def _vit(name: str, value: np.ndarray, out: dict) -> None:
    """One `visual.*` tensor of a ViT (name without "visual.")."""
    direct = {
        "class_embedding": "vision_model/embeddings/class_embedding",
        "positional_embedding": "vision_model/embeddings/position_embedding/embedding",
        "proj": "visual_projection/kernel",
    }
    if name in direct:
        out[direct[name]] = value
    elif name == "conv1.weight":
        out["vision_model/embeddings/patch_embedding/kernel"] = value.transpose(2, 3, 1, 0)
    elif name.startswith(("ln_pre.", "ln_post.")):
        module, leaf = name.split(".")
        layer = "pre_layrnorm" if module == "ln_pre" else "post_layernorm"  # sic: HF's spelling
        out[f"vision_model/{layer}/{_LN_LEAVES[leaf]}"] = value
    elif name.startswith("transformer.resblocks."):
        _block("vision_model", name[len("transformer.resblocks."):], value, out)
    else:
        raise KeyError(f"unknown ViT tensor visual.{name}")


def state_dict_to_flax(state: dict) -> dict[str, np.ndarray]:
    """OpenAI-named tensors -> our flat slash-joined tree (float32). Unknown names are errors."""
    out: dict[str, np.ndarray] = {}
    resnet = "visual.attnpool.positional_embedding" in state
    for key, value in state.items():
        if key in _NOT_WEIGHTS or key.endswith("attn_mask"):
            continue
        value = np.asarray(value, np.float32)
        if key.startswith("visual."):
            (_resnet if resnet else _vit)(key[len("visual."):], value, out)
        elif key.startswith("transformer.resblocks."):
            _block("text_model", key[len("transformer.resblocks."):], value, out)
        elif key == "token_embedding.weight":
            out["text_model/embeddings/token_embedding/embedding"] = value
        elif key == "positional_embedding":
            out["text_model/embeddings/position_embedding/embedding"] = value
        elif key.startswith("ln_final."):
            out[f"text_model/final_layer_norm/{_LN_LEAVES[key.split('.')[1]]}"] = value
        elif key == "text_projection":
            out["text_projection/kernel"] = value
        elif key == "logit_scale":
            out["logit_scale"] = value.reshape(())
        else:
            raise KeyError(f"unknown tensor {key!r} in an OpenAI CLIP state dict")
    return out
