"""OpenAI CLIP's ModifiedResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64) in Linen.

The architecture of "Learning Transferable Visual Models From Natural Language Supervision" (Radford et
al., 2021), section 2.4: a ResNet-D-like network that

  * starts with three 3x3 convolutions (the first with stride 2) and a 2x2 average pool instead of one 7x7
    convolution and a max pool;
  * downsamples with an average pool *before* a stride-1 convolution (in the bottleneck after its 3x3
    convolution, in the shortcut before its 1x1 convolution): anti-aliased strided convolutions;
  * ends with attention pooling: the mean of the final feature map is the query of one multi-head
    attention over [mean; every position] with a learned positional embedding, whose output projection
    (`c_proj`) maps straight to the joint embedding (no separate visual projection).

Batch norm runs in inference mode only, with the checkpoint's running statistics. They are stored in the
`params` collection beside the affine weights (`scale`, `bias`, `mean`, `var`): the CLIP is frozen here,
nothing in it is ever updated, and one collection keeps `module.apply({"params": ...})` the same for every
backbone. Convolutions and attention run in the compute dtype; batch norm is folded into one multiply-add
computed in float32.

The parameter names follow OpenAI's state dict under `vision_model/` (`visual.layer1.0.downsample.0.weight`
is `vision_model/layer1/0/downsample/0/kernel`), so converting a checkpoint is renaming and transposing.

No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

EXPANSION = 4  # a bottleneck's output channels are 4x its inner width


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """A ModifiedResNet. Defaults are RN50's; `width` is the stem's output channels (64 for RN50), the
    attention pool works on `width * 32` channels with `num_heads` heads (OpenAI: width * 32 // 64)."""

    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    num_heads: int = 32
    image_size: int = 224
    num_channels: int = 3
    batch_norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"ResNetConfig.layers must be 4 positive block counts; got {self.layers}")

    @property
    def embed_dim(self) -> int:
        """Channels of the last stage, the attention pool's width."""
        return self.width * 32


class FrozenBatchNorm(nn.Module):
    """Batch norm in inference mode: (x - mean) / sqrt(var + eps) * scale + bias over the last axis."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        mul = scale * jax.lax.rsqrt(var + self.eps)
        add = bias - mean * mul
        return x * mul.astype(self.dtype) + add.astype(self.dtype)


def _avg_pool(x: Array, k: int) -> Array:
    """torch's AvgPool2d(k): k x k windows, stride k, no padding."""
    return x if k == 1 else nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        name=name,
    )


class Downsample(nn.Module):
    """The shortcut of a bottleneck that changes shape: average pool, 1x1 convolution ("0"), batch norm
    ("1"); OpenAI's `nn.Sequential` names."""

    features: int
    stride: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _conv(self.features, 1, self.dtype, "0")(_avg_pool(x, self.stride))
        return FrozenBatchNorm(self.eps, self.dtype, name="1")(x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (average pool when strided) -> 1x1 (x4 channels), plus the shortcut, then ReLU."""

    planes: int
    stride: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bn = lambda name: FrozenBatchNorm(self.eps, self.dtype, name=name)
        out = nn.relu(bn("bn1")(_conv(self.planes, 1, self.dtype, "conv1")(x)))
        out = nn.relu(bn("bn2")(_conv(self.planes, 3, self.dtype, "conv2")(out)))
        out = bn("bn3")(_conv(self.planes * EXPANSION, 1, self.dtype, "conv3")(_avg_pool(out, self.stride)))
        shortcut = x
        if self.stride > 1 or x.shape[-1] != self.planes * EXPANSION:
            shortcut = Downsample(self.planes * EXPANSION, self.stride, self.eps, self.dtype, name="downsample")(x)
        return nn.relu(out + shortcut)


class Stage(nn.Module):
    """`blocks` bottlenecks named "0", "1", ...; the first one strides."""

    planes: int
    blocks: int
    stride: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.blocks):
            x = Bottleneck(self.planes, self.stride if i == 0 else 1, self.eps, self.dtype, name=str(i))(x)
        return x


def resize_grid_embedding(pos: Array, height: int, width: int) -> Array:
    """[1 + g*g, C] positional embedding (a leading pooled-token row, then a g x g grid) -> [1 + h*w, C].

    Bicubic interpolation of the grid (`jax.image.resize`, Keys' cubic with a = -0.5, no antialiasing), the
    leading row kept; returned unchanged when the grid already has the size. Used when the input image is
    not the size the checkpoint was trained at (the grid follows the final feature map's size).
    """
    g = int(round((pos.shape[0] - 1) ** 0.5))
    if g * g + 1 != pos.shape[0]:
        raise ValueError(f"positional embedding of {pos.shape[0]} rows is not 1 + a square grid")
    if (height, width) == (g, g):
        return pos
    grid = pos[1:].reshape(g, g, pos.shape[1]).astype(jnp.float32)
    grid = jax.image.resize(grid, (height, width, pos.shape[1]), method="bicubic")
    return jnp.concatenate([pos[:1].astype(jnp.float32), grid.reshape(height * width, -1)], axis=0)


class AttentionPool(nn.Module):
    """Multi-head attention whose single query is the mean of the feature map (plus its positional
    embedding) and whose keys and values are [mean; every position]. Softmax in float32."""

    num_heads: int
    output_dim: int
    grid_size: int  # the checkpoint's final feature map is grid_size x grid_size
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"{c} channels do not split into {self.num_heads} heads")
        head_dim = c // self.num_heads
        pos = self.param(
            "positional_embedding", nn.initializers.normal(c**-0.5), (self.grid_size**2 + 1, c), jnp.float32
        )
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        tokens = tokens + resize_grid_embedding(pos, h, w).astype(tokens.dtype)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
        q = split(dense(c, "q_proj")(tokens[:, :1]))
        k = split(dense(c, "k_proj")(tokens))
        v = split(dense(c, "v_proj")(tokens))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, c)
        return dense(self.output_dim, "c_proj")(out)


class ModifiedResNet(nn.Module):
    """NHWC pixels -> [B, output_dim] image embedding (already in the joint space)."""

    config: ResNetConfig
    output_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg = self.config
        eps = cfg.batch_norm_eps
        x = pixels.astype(self.dtype)
        stem = ((cfg.width // 2, 2), (cfg.width // 2, 1), (cfg.width, 1))
        for i, (features, stride) in enumerate(stem, start=1):
            x = _conv(features, 3, self.dtype, f"conv{i}", stride)(x)
            x = nn.relu(FrozenBatchNorm(eps, self.dtype, name=f"bn{i}")(x))
        x = _avg_pool(x, 2)
        for i, blocks in enumerate(cfg.layers):
            x = Stage(cfg.width * 2**i, blocks, 1 if i == 0 else 2, eps, self.dtype, name=f"layer{i + 1}")(x)
        return AttentionPool(cfg.num_heads, self.output_dim, cfg.image_size // 32, self.dtype, name="attnpool")(x)
