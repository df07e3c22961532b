"""A Linen CLIP (ViT or ModifiedResNet image tower + causal text tower) whose tree mirrors HF `FlaxCLIPModel`.

Parameter names follow transformers' Flax CLIP exactly (`text_model/encoder/layers/0/self_attn/q_proj/kernel`,
`vision_model/pre_layrnorm/scale`, `visual_projection/kernel`, `logit_scale`, ...), so a `flax_model.msgpack`
written by `FlaxCLIPModel.save_pretrained` loads without renaming. transformers has no ResNet CLIP: with a
`ResNetConfig` image tower (`models/resnet.py`) `vision_model/` holds OpenAI's names and there is no
`visual_projection` (the attention pool projects to the joint space itself).

The text tower has three entry points:
  * `encode_text(input_ids)`: the usual path; the pooled feature is taken at the end-of-text token, which
    is the largest id of each row (OpenAI's convention, also HF's for the CLIP tokenizer).
  * `encode_text_embeddings(token_embeds, eot_index)`: the path CoOp prompts go through, with learned context
    vectors already placed among the token embeddings. Because attention is causal, the feature at
    `eot_index` only depends on positions <= eot_index, so callers may pass sequences cut to
    `max(eot_index) + 1` tokens: same features, a fraction of the compute.
  * `encode_text_shared_prefix(prefix, suffixes, eot_index)`: the same features for K sequences that begin
    with the same tokens (CoOp's [SOS] + shared context before every class name): the prefix is encoded once
    and every suffix attends to its keys and values, as in KV-cached decoding.
Both towers read one token per sequence (end-of-text, the class token), so their last block computes that
token only: its query, attention output and MLP (`LayerCollection`'s `pool_index`); the other tokens of the
last block feed nothing.

No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspt_jax.models.resnet import ModifiedResNet, ResNetConfig

Array = jax.Array

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


# `vision_config.model_type` of a ResNet image tower in our config.json (transformers has none).
RESNET_MODEL_TYPE = "openai_modified_resnet"


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """The architecture. Defaults are ViT-B/16 (openai/clip-vit-base-patch16); `vision` may be a
    `ResNetConfig` (OpenAI's RN50 and relatives)."""

    text: TextConfig = TextConfig()
    vision: VisionConfig | ResNetConfig = VisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        """Builds the config from a transformers `CLIPConfig` JSON dict (config.json)."""

        def pick(klass, sub):
            names = {f.name for f in dataclasses.fields(klass)}
            return klass(**{k: v for k, v in (sub or {}).items() if k in names})

        text = pick(TextConfig, d.get("text_config"))
        vision_dict = d.get("vision_config") or {}
        if vision_dict.get("model_type") == RESNET_MODEL_TYPE:
            vision = pick(ResNetConfig, vision_dict)
        else:
            # transformers' CLIPVisionConfig defaults to patch 32 (ours, ViT-B/16's 16): a config.json that
            # omits the key means 32.
            vision = pick(VisionConfig, {"patch_size": 32, **vision_dict})
        for act in (text.hidden_act, getattr(vision, "hidden_act", "relu")):
            if act not in _ACTIVATIONS:
                raise ValueError(f"Unsupported hidden_act {act!r}; known: {sorted(_ACTIVATIONS)}")
        return cls(
            text=text,
            vision=vision,
            projection_dim=int(d.get("projection_dim", 512)),
            logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)),
        )

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision, ResNetConfig)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers-compatible config.json content (enough for `CLIPModel.from_pretrained`)."""
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": {
                **dataclasses.asdict(self.text),
                "projection_dim": self.projection_dim,
                "bos_token_id": self.text.eos_token_id - 1,
                "pad_token_id": 0,
                "model_type": "clip_text_model",
            },
            "vision_config": {
                **dataclasses.asdict(self.vision),
                "projection_dim": self.projection_dim,
                "model_type": RESNET_MODEL_TYPE if self.is_resnet else "clip_vision_model",
            },
        }


def _causal_scores(scores: Array) -> Array:
    """Masks [..., q, k] attention scores so that query i sees keys <= i (q == k)."""
    l = scores.shape[-1]
    return jnp.where(jnp.tril(jnp.ones((l, l), dtype=bool)), scores, jnp.finfo(jnp.float32).min)


def _token_at(x: Array, index: Array) -> Array:
    """[N, L, D] -> [N, D]: row n's token at position index[n]."""
    return jnp.take_along_axis(x, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]


def _softmax_parts(scores: Array) -> tuple[Array, Array]:
    """softmax(scores, -1) as (numerator, denominator), float32: exp(s - max s) and its sum over the keys.

    Attention divides its weighted sum of values ([.., q, head_dim]) by the denominator instead of dividing
    the weights ([.., q, keys]): the same result to float rounding, and with ViT-B/16's 197 keys against 64
    head dims the pass over the large array is saved (the attention core of a ViT-B/16 block at batch 32 took
    39 ms instead of 113 on 2 CPU cores, see docs/SPEED.md)."""
    shifted = scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    weights = jnp.exp(shifted)
    return weights, weights.sum(axis=-1, keepdims=True)


def _normalized(weighted_sum: Array, total: Array) -> Array:
    """The softmax's division, applied after the weighted sum; keeps the sum's dtype."""
    return (weighted_sum.astype(jnp.float32) / total).astype(weighted_sum.dtype)


class Attention(nn.Module):
    """Multi-head self-attention. Scores and softmax in float32 whatever the compute dtype.

    With `prefix` ([1, P, D], a token sequence every row of `x` continues), the rows of `x` are suffixes
    [N, S, D] that attend causally to themselves and fully to the prefix's keys and values, computed once:
    KV-cached decoding of N continuations of one shared prefix. Returns (suffix, prefix) outputs then.
    With `query_index` ([N] ints), only the token at that position of each row is a query (the keys and
    values are all tokens, causally those up to it): the output is that token's [N, 1, D], and a prefix,
    if any, gets no output of its own. The last block of a tower that reads one token needs no more.
    """

    hidden_size: int
    num_heads: int
    causal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, prefix: Array | None = None, query_index: Array | None = None):
        head_dim = self.hidden_size // self.num_heads
        scale = head_dim**-0.5
        q_proj, k_proj, v_proj, out_proj = (
            nn.Dense(self.hidden_size, dtype=self.dtype, name=name)
            for name in ("q_proj", "k_proj", "v_proj", "out_proj")
        )
        # Heads first, [B, H, T, hd]: the batched matmuls of attention then have their batch dimensions
        # leading, which XLA:CPU runs far faster than the same contraction over [B, T, H, hd].
        heads = lambda u: jnp.swapaxes(u.reshape(*u.shape[:-1], self.num_heads, head_dim), -3, -2)
        merge = lambda u: out_proj(jnp.swapaxes(u, -3, -2).reshape(*u.shape[:-3], u.shape[-2], self.hidden_size))

        def mask(scores, causal):
            if not causal:
                return scores
            if query_index is None:
                return _causal_scores(scores)
            # The one query of row n sits at query_index[n]: it sees the keys up to there.
            seen = jnp.arange(scores.shape[-1])[None, :] <= query_index[:, None]
            return jnp.where(seen[:, None, None, :], scores, jnp.finfo(jnp.float32).min)

        def attend(q, k, v, causal):
            scores = mask(jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale, causal)
            weights, total = _softmax_parts(scores)
            return merge(_normalized(jnp.einsum("bhqk,bhkd->bhqd", weights.astype(self.dtype), v), total))

        if query_index is None:
            q, k, v = heads(q_proj(x)), heads(k_proj(x)), heads(v_proj(x))
        else:
            q, k, v = heads(q_proj(_token_at(x, query_index)[:, None])), heads(k_proj(x)), heads(v_proj(x))
        if prefix is None:
            return attend(q, k, v, self.causal)
        if not self.causal:
            raise ValueError("a shared prefix needs causal attention")
        kp, vp = heads(k_proj(prefix)), heads(v_proj(prefix))
        # Scores of the suffix queries against the prefix keys (no broadcast of the prefix to N rows) and
        # against their own keys (causal), one softmax over both.
        to_prefix = jnp.einsum("bhqd,hkd->bhqk", q, kp[0]).astype(jnp.float32)
        to_self = mask(jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32), True)
        weights, total = _softmax_parts(jnp.concatenate([to_prefix, to_self], axis=-1) * scale)
        weights = weights.astype(self.dtype)
        n_prefix = kp.shape[-2]
        out = jnp.einsum("bhqk,hkd->bhqd", weights[..., :n_prefix], vp[0]) + jnp.einsum(
            "bhqk,bhkd->bhqd", weights[..., n_prefix:], v
        )
        out = merge(_normalized(out, total))
        if query_index is not None:
            return out
        return out, attend(heads(q_proj(prefix)), kp, vp, True)


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = _ACTIVATIONS[self.act](x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(x)


def _layer_norm(eps: float, name: str, dtype) -> nn.LayerNorm:
    # Statistics in float32 even when the tower runs in bfloat16.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(.)).

    With `prefix` (see `Attention`), returns (x, prefix) after the block, each token through the same
    weights: the layer norms and the MLP are per token, only attention mixes the two. With `pool_index`
    ([N] ints), returns only the token at that position of each row, [N, D] (a prefix then has no output).
    """

    hidden_size: int
    intermediate_size: int
    num_heads: int
    act: str
    eps: float
    causal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, prefix: Array | None = None, pool_index: Array | None = None):
        ln1 = _layer_norm(self.eps, "layer_norm1", self.dtype)
        ln2 = _layer_norm(self.eps, "layer_norm2", self.dtype)
        attn = Attention(self.hidden_size, self.num_heads, self.causal, self.dtype, name="self_attn")
        mlp = MLP(self.hidden_size, self.intermediate_size, self.act, self.dtype, name="mlp")
        if pool_index is not None:
            pooled = _token_at(x, pool_index)
            out = attn(ln1(x), prefix=None if prefix is None else ln1(prefix), query_index=pool_index)[:, 0]
            pooled = pooled + out
            return pooled + mlp(ln2(pooled))
        if prefix is None:
            x = x + attn(ln1(x))
            return x + mlp(ln2(x))
        out, out_prefix = attn(ln1(x), prefix=ln1(prefix))
        x, prefix = x + out, prefix + out_prefix
        return x + mlp(ln2(x)), prefix + mlp(ln2(prefix))


class LayerCollection(nn.Module):
    """Holds the blocks as `layers/0`, `layers/1`, ... (HF's naming). `remat`: recompute each block's
    activations in the backward pass instead of keeping them (memory for compute; same parameters).
    `pool_index` ([N] ints): the tower's output is read at one token per row, [N, D]; the last block then
    computes that token only (its query, attention output and MLP), the same values as slicing the full
    output."""

    num_layers: int
    layer_kwargs: dict
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, prefix: Array | None = None, pool_index: Array | None = None):
        layer = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        for i in range(self.num_layers):
            block = layer(**self.layer_kwargs, name=str(i))
            if pool_index is not None and i == self.num_layers - 1:
                return block(x, prefix, pool_index)
            if prefix is None:
                x = block(x)
            else:
                x, prefix = block(x, prefix)
        if pool_index is not None:  # no blocks at all
            return _token_at(x, pool_index)
        return x if prefix is None else (x, prefix)


class Encoder(nn.Module):
    num_layers: int
    layer_kwargs: dict
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, prefix: Array | None = None, pool_index: Array | None = None):
        return LayerCollection(self.num_layers, self.layer_kwargs, self.remat, name="layers")(x, prefix, pool_index)


def _encoder(cfg, causal: bool, dtype, remat: bool = False) -> Encoder:
    return Encoder(
        cfg.num_hidden_layers,
        dict(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_attention_heads,
            act=cfg.hidden_act,
            eps=cfg.layer_norm_eps,
            causal=causal,
            dtype=dtype,
        ),
        remat,
        name="encoder",
    )


class TextEmbeddings(nn.Module):
    config: TextConfig

    def setup(self):
        init = nn.initializers.normal(0.02)
        self.token_embedding = nn.Embed(self.config.vocab_size, self.config.hidden_size, embedding_init=init)
        self.position_embedding = nn.Embed(
            self.config.max_position_embeddings, self.config.hidden_size, embedding_init=init
        )

    def tokens(self, input_ids: Array) -> Array:
        return self.token_embedding(input_ids)

    def positions(self, length: int) -> Array:
        return self.position_embedding.embedding[:length]

    def __call__(self, input_ids: Array) -> Array:
        return self.tokens(input_ids) + self.positions(input_ids.shape[1])


class TextTransformer(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.embeddings = TextEmbeddings(self.config)
        self.encoder = _encoder(self.config, causal=True, dtype=self.dtype, remat=self.remat)
        self.final_layer_norm = _layer_norm(self.config.layer_norm_eps, "final_layer_norm", self.dtype)

    def token_embeddings(self, input_ids: Array) -> Array:
        return self.embeddings.tokens(input_ids)

    def pooled_from_embeddings(self, token_embeds: Array, eot_index: Array) -> Array:
        """[N, L, D] token embeddings (no positions yet) + [N] end-of-text index -> [N, D] pooled."""
        x = token_embeds.astype(jnp.float32) + self.embeddings.positions(token_embeds.shape[1])
        return self.final_layer_norm(self.encoder(x.astype(self.dtype), pool_index=eot_index))

    def pooled_from_shared_prefix(self, prefix_embeds: Array, suffix_embeds: Array, eot_index: Array) -> Array:
        """N sequences that all start with the same P tokens: prefix [P, D] + suffixes [N, S, D] (token
        embeddings, no positions) + [N] end-of-text index within the suffix -> [N, D] pooled.

        The prefix goes through the tower once and each suffix attends to its cached keys and values: the
        same features as `pooled_from_embeddings` on the concatenated sequences (the tower is causal), for
        P + N * S tokens instead of N * (P + S).
        """
        n_prefix = prefix_embeds.shape[0]
        positions = self.embeddings.positions(n_prefix + suffix_embeds.shape[1])
        prefix = prefix_embeds.astype(jnp.float32) + positions[:n_prefix]
        suffix = suffix_embeds.astype(jnp.float32) + positions[n_prefix:]
        x = self.encoder(suffix.astype(self.dtype), prefix[None].astype(self.dtype), pool_index=eot_index)
        return self.final_layer_norm(x)

    def __call__(self, input_ids: Array) -> Array:
        eot_index = jnp.argmax(input_ids, axis=-1)
        return self.pooled_from_embeddings(self.token_embeddings(input_ids), eot_index)


class VisionEmbeddings(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg = self.config
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        class_embedding = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
        patches = nn.Conv(
            cfg.hidden_size,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size,) * 2,
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="patch_embedding",
        )(pixels)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)
        if patches.shape[1] != num_patches:
            raise ValueError(
                f"Image of shape {pixels.shape[1:3]} gives {patches.shape[1]} patches; the model was "
                f"built for {cfg.image_size}x{cfg.image_size} ({num_patches} patches)."
            )
        cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, cfg.hidden_size))
        pos = nn.Embed(
            num_patches + 1,
            cfg.hidden_size,
            embedding_init=nn.initializers.normal(0.02),
            name="position_embedding",
        ).embedding
        return jnp.concatenate([cls, patches], axis=1) + pos.astype(patches.dtype)


class VisionTransformer(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        """NHWC pixels -> [B, D] pooled (post-layernorm class token)."""
        cfg = self.config
        x = VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels.astype(self.dtype))
        x = _layer_norm(cfg.layer_norm_eps, "pre_layrnorm", self.dtype)(x)  # sic: HF's spelling
        x = _encoder(cfg, causal=False, dtype=self.dtype)(x, pool_index=jnp.zeros(x.shape[0], jnp.int32))
        return _layer_norm(cfg.layer_norm_eps, "post_layernorm", self.dtype)(x)


class CLIPModule(nn.Module):
    """Both towers, projections and `logit_scale` (stored as a log-scale, as in every CLIP checkpoint).

    All entry points return float32 projected features, not L2-normalized.
    """

    config: CLIPConfig
    dtype: Any = jnp.float32  # compute dtype of the towers
    remat_text: bool = False  # recompute text-layer activations in the backward pass (many classes)

    def setup(self):
        cfg = self.config
        self.text_model = TextTransformer(cfg.text, self.dtype, self.remat_text)
        if cfg.is_resnet:  # the attention pool ends in the joint space
            self.vision_model = ModifiedResNet(cfg.vision, cfg.projection_dim, self.dtype)
        else:
            self.vision_model = VisionTransformer(cfg.vision, self.dtype)
            self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param(
            "logit_scale", lambda _, shape: jnp.full(shape, cfg.logit_scale_init_value, jnp.float32), ()
        )

    def encode_image(self, pixels: Array) -> Array:
        pooled = self.vision_model(pixels)
        if not self.config.is_resnet:
            pooled = self.visual_projection(pooled)
        return pooled.astype(jnp.float32)

    def encode_text(self, input_ids: Array) -> Array:
        return self.text_projection(self.text_model(input_ids)).astype(jnp.float32)

    def token_embeddings(self, input_ids: Array) -> Array:
        return self.text_model.token_embeddings(input_ids)

    def encode_text_embeddings(self, token_embeds: Array, eot_index: Array) -> Array:
        pooled = self.text_model.pooled_from_embeddings(token_embeds, eot_index)
        return self.text_projection(pooled).astype(jnp.float32)

    def encode_text_shared_prefix(self, prefix_embeds: Array, suffix_embeds: Array, eot_index: Array) -> Array:
        """`encode_text_embeddings` of sequences that share their first tokens (see
        `TextTransformer.pooled_from_shared_prefix`); `eot_index` counts from the start of the suffix."""
        pooled = self.text_model.pooled_from_shared_prefix(prefix_embeds, suffix_embeds, eot_index)
        return self.text_projection(pooled).astype(jnp.float32)

    def __call__(self, pixels: Array, input_ids: Array) -> tuple[Array, Array]:
        """Returns (logits_per_image [B, N], logits_per_text [N, B]) as CLIP defines them."""
        img = self.encode_image(pixels)
        txt = self.encode_text(input_ids)
        return clip_logits(img, txt, self.logit_scale)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def clip_logits(image_features: Array, text_features: Array, log_scale: Array) -> tuple[Array, Array]:
    """exp(log_scale) * cos(image, text): [B, N] and its transpose."""
    logits = jnp.exp(log_scale) * l2_normalize(image_features) @ l2_normalize(text_features).T
    return logits, logits.T


# Architectures by name, for `load_clip("random:<name>")`: random weights with real shapes (speed and memory
# figures, smoke runs). vit_b16 / vit_b32 / rn50 / rn101 are OpenAI's ViT-B/16, ViT-B/32, RN50 and RN101
# (the shapes OpenAI's checkpoints give; a loaded checkpoint takes its shapes from its own tensors).
PRESETS = {
    "vit_b16": CLIPConfig(),
    "vit_b32": CLIPConfig(vision=VisionConfig(patch_size=32)),
    "rn50": CLIPConfig(vision=ResNetConfig(layers=(3, 4, 6, 3)), projection_dim=1024),
    "rn101": CLIPConfig(vision=ResNetConfig(layers=(3, 4, 23, 3)), projection_dim=512),
    "tiny": CLIPConfig(
        text=TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    ),
    "tiny_rn": CLIPConfig(  # a ResNet CLIP for smoke runs and tests
        text=TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision=ResNetConfig(layers=(1, 1, 1, 1), width=8, num_heads=2, image_size=32),
        projection_dim=32,
    ),
}
