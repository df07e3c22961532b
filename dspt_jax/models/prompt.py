"""CoOp prompt learner: learned context vectors placed among the frozen token embeddings of the class prompts.

A prompt for class k is the token sequence of CoOp's `"X X ... X {classname}."` with the n_ctx "X" slots
replaced by learned vectors. Everything except the context is frozen, so the host builds once:
  * `token_ids` [K, L]: the ids of each prompt, cut to the longest end-of-text + 1 (the causal text tower
    gives identical features on the cut sequence), with a placeholder id in the context slots;
  * `ctx_positions` [K, n_ctx]: where the context slots are in each row (they move with the class-token
    position: `end` -> right after [SOS]; `front` -> after the class name; `middle` -> split around it);
  * `eot_index` [K]: the end-of-text position, where the text feature is read.
In the step, `assemble` scatters the context into the frozen embeddings of all K prompts at once (no
per-class loop) and `class_features` computes the K text features once per step, reused for the whole batch.
With a shared context and the class token at the end (CoOp's default) every prompt starts with the same
1 + n_ctx tokens; the causal text tower then gives them the same hidden states in every row, so
`class_features` encodes that prefix once and only the K short class suffixes (name, ".", [EOT]) attend to
its keys and values. Rows are cut to the tokens they need: classes whose names tokenize to fewer tokens go
through the tower in their own, shorter batch where that saves enough (`length_buckets`). With many classes
the K rows can also be split over the devices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dspt_jax import tokenizer as tok_lib

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """Host-side, static description of the K prompts (numpy arrays; see module docstring)."""

    token_ids: np.ndarray  # int32 [K, L]
    ctx_positions: np.ndarray  # int32 [K, n_ctx]
    eot_index: np.ndarray  # int32 [K]
    n_ctx: int
    class_token_position: str
    # With a shared context, positions [0, shared_prefix_len) hold the same token or the same context
    # vector in every prompt (1 + n_ctx with the class token at the end): see `class_features`.
    shared_prefix_len: int = 1

    @property
    def num_classes(self) -> int:
        return self.token_ids.shape[0]


def _shared_prefix_len(token_ids: np.ndarray, ctx_positions: np.ndarray, eot_index: np.ndarray) -> int:
    """Leading positions equal in every row when the context is shared: the same token id, or the same
    context slot. Capped so that every end-of-text token stays after the prefix."""
    k, length = token_ids.shape
    slot = np.full((k, length), -1)
    slot[np.arange(k)[:, None], ctx_positions] = np.arange(ctx_positions.shape[1])
    key = np.where(slot >= 0, -1 - slot, token_ids)  # context slot i -> -1 - i, never a token id
    same = (key == key[:1]).all(axis=0)
    n = length if same.all() else int(np.argmin(same))
    return max(1, min(n, int(eot_index.min())))


def build_prompt_spec(
    classnames,
    n_ctx: int = 16,
    class_token_position: str = "end",
    context_length: int = tok_lib.CONTEXT_LENGTH,
) -> PromptSpec:
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    if class_token_position not in CLASS_TOKEN_POSITIONS:
        raise ValueError(
            f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, got {class_token_position!r}"
        )
    if not classnames:
        raise ValueError("no class names")
    tok = tok_lib.get_tokenizer()
    placeholder = tok.encode("X")[0]
    rows, positions = [], []
    for name in classnames:
        name = name.replace("_", " ")
        # Tokenize "name." as one text, as CoOp does: a name ending in punctuation merges with the period
        # ("impala (antelope)." ends in the single token ")."). The class part is its first len(name) tokens.
        name_len = len(tok.encode(name))
        if not name_len:
            raise ValueError(f"class name {name!r} has no tokens")
        tail = tok.encode(name + ".")
        name_ids, rest = tail[:name_len], tail[name_len:]
        half = n_ctx // 2
        ctx = [placeholder] * n_ctx
        body = {
            "end": ctx + tail,
            "front": name_ids + ctx + rest,
            "middle": ctx[:half] + name_ids + ctx[half:] + rest,
        }[class_token_position]
        slots = {
            "end": list(range(n_ctx)),
            "front": list(range(name_len, name_len + n_ctx)),
            "middle": list(range(half)) + list(range(half + name_len, n_ctx + name_len)),
        }[class_token_position]
        ids = [tok.sot_token] + body + [tok.eot_token]
        if len(ids) > context_length:
            raise ValueError(
                f"prompt for class {name!r} needs {len(ids)} tokens with n_ctx={n_ctx}; the text encoder "
                f"takes {context_length}. Use a shorter class name or fewer context tokens."
            )
        rows.append(ids)
        positions.append([1 + s for s in slots])
    length = max(len(r) for r in rows)  # = max end-of-text index + 1
    token_ids = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        token_ids[i, : len(r)] = r
    ctx_positions = np.asarray(positions, np.int32)
    eot_index = np.asarray([len(r) - 1 for r in rows], np.int32)
    return PromptSpec(
        token_ids=token_ids,
        ctx_positions=ctx_positions,
        eot_index=eot_index,
        n_ctx=n_ctx,
        class_token_position=class_token_position,
        shared_prefix_len=_shared_prefix_len(token_ids, ctx_positions, eot_index),
    )


CTX_INIT_MODES = ("coop", "pad")


@dataclasses.dataclass(frozen=True)
class ContextLayout:
    """How the learned context is laid out: its length, whether each class has its own, and the token ids
    of the words it starts from (empty: random N(0, 0.02) init). `notes`: where it departs from the config
    as written (for the run's log)."""

    n_ctx: int
    csc: bool
    init_ids: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()


def context_layout(n_ctx: int, csc: bool, ctx_init: str = "", mode: str = "coop") -> ContextLayout:
    """The context of `config.prompt` (n_ctx, csc, ctx_init, ctx_init_mode), resolved.

    Without `ctx_init`: n_ctx random vectors, class-specific with `csc`. With it:
      coop (CoOp's PromptLearner): the context is exactly the init's tokens (n_ctx becomes their count) and is
        shared; `csc` is ignored, since CoOp has no class-specific context with word init.
      pad: n_ctx vectors (at least the init's token count); the words start the last slots, the others
        random, so that with the class token at the end the prompt reads "... a photo of a {class}.";
        `csc` gives every class its own copy.
    CoOp counts the words (split at spaces) and takes that many tokens; here every token of the init is
    learned. The two agree whenever each word is one token ("a photo of a"); a note says when they do not.
    """
    if mode not in CTX_INIT_MODES:
        raise ValueError(f"config.prompt.ctx_init_mode must be one of {CTX_INIT_MODES}, got {mode!r}")
    if n_ctx < 1:
        raise ValueError(f"config.prompt.n_ctx must be >= 1, got {n_ctx}")
    if not ctx_init:
        return ContextLayout(n_ctx, bool(csc))
    text = ctx_init.replace("_", " ")
    ids = tuple(tok_lib.get_tokenizer().encode(text))
    if not ids:
        raise ValueError(f"config.prompt.ctx_init={ctx_init!r} has no tokens")
    notes = []
    words = len(text.split())
    if words != len(ids):
        notes.append(
            f"ctx_init {ctx_init!r} is {words} words but {len(ids)} tokens: all {len(ids)} tokens are learned "
            f"(CoOp would learn the first {words} and keep the rest as fixed text)"
        )
    if mode == "coop":
        if n_ctx != len(ids):
            notes.append(f"ctx_init {ctx_init!r} sets the context length to its {len(ids)} tokens (n_ctx={n_ctx} "
                         "applies to random init), as CoOp")
        if csc:
            notes.append("csc is ignored with ctx_init, as CoOp: the context is shared "
                         "(ctx_init_mode='pad' gives class-specific copies)")
        return ContextLayout(len(ids), False, ids, tuple(notes))
    if len(ids) > n_ctx:
        raise ValueError(
            f"config.prompt.ctx_init={ctx_init!r} is {len(ids)} tokens, more than config.prompt.n_ctx={n_ctx} "
            "allows with ctx_init_mode='pad'; raise n_ctx or shorten ctx_init."
        )
    return ContextLayout(n_ctx, bool(csc), ids, tuple(notes))


def init_context(
    rng: jax.Array,
    spec: PromptSpec,
    embed_dim: int,
    *,
    csc: bool = False,
    init_embeddings: np.ndarray | None = None,
) -> dict:
    """The trainable prompt params: {"ctx": [n_ctx, D]} (shared) or [K, n_ctx, D] (class-specific, `csc`).

    Random N(0, 0.02) as CoOp, or, with `init_embeddings` [t, D] (token embeddings of e.g. "a photo of a",
    t <= n_ctx), the last t slots start from those words (the first n_ctx - t stay random; none with
    CoOp's layout, where t = n_ctx).
    """
    shape = (spec.num_classes, spec.n_ctx, embed_dim) if csc else (spec.n_ctx, embed_dim)
    ctx = 0.02 * jax.random.normal(rng, shape, jnp.float32)
    if init_embeddings is not None:
        t = init_embeddings.shape[0]
        if t > spec.n_ctx:
            raise ValueError(f"ctx_init has {t} tokens but n_ctx is {spec.n_ctx}")
        ctx = ctx.at[..., spec.n_ctx - t :, :].set(jnp.asarray(init_embeddings, jnp.float32))
    return {"ctx": ctx}


def init_embeddings(clip, layout: ContextLayout) -> np.ndarray | None:
    """Token embeddings [t, D] of the layout's init words (no start/end tokens), None for random init."""
    if not layout.init_ids:
        return None
    return np.asarray(clip.token_embeddings(np.asarray([layout.init_ids], np.int32))[0])


def assemble(frozen_embeds: jax.Array, ctx: jax.Array, ctx_positions: jax.Array) -> jax.Array:
    """Scatters the context into the prompts' token embeddings, all classes at once.

    frozen_embeds [K, L, D]; ctx [n_ctx, D] or [K, n_ctx, D]; ctx_positions int [K, n_ctx] -> [K, L, D].
    """
    frozen_embeds = jnp.asarray(frozen_embeds)
    k = frozen_embeds.shape[0]
    ctx = jnp.broadcast_to(ctx.astype(frozen_embeds.dtype), (k,) + ctx.shape[-2:])
    rows = jnp.arange(k)[:, None]
    return frozen_embeds.at[rows, ctx_positions].set(ctx)


def _split_at_prefix(frozen_embeds, ctx, ctx_positions: np.ndarray, n_prefix: int):
    """`assemble` cut into the shared prefix [P, D] (row 0's first P embeddings) and the K suffixes
    [K, L - P, D], without assembling the K full rows: the prefix's context slots are scattered into one
    row only, and the suffixes, frozen text unless some context slots follow the prefix (the class token in
    the middle), get just those. Same values as slicing `assemble`'s output; the gradient reaches the
    context through P + K * (late slots) rows instead of K * n_ctx (a saving that grows with the runs
    trained together)."""
    frozen_embeds = jnp.asarray(frozen_embeds)
    # The context slots are shared, so a slot is in the prefix in every row or in none: the first n_early.
    early = np.asarray(ctx_positions) < n_prefix
    n_early = int(early[0].sum())
    if not (early == (np.arange(early.shape[1]) < n_early)).all():
        raise ValueError("the shared prefix must hold the first context slots of every row")
    prefix = assemble(frozen_embeds[:1, :n_prefix], ctx[:n_early], jnp.asarray(ctx_positions[:1, :n_early]))[0]
    rows = frozen_embeds[:, n_prefix:]
    if n_early < ctx.shape[0]:
        rows = assemble(rows, ctx[n_early:], jnp.asarray(ctx_positions[:, n_early:] - n_prefix))
    return prefix, rows


# What one more batch of rows costs (its own kernels, per layer, forward and backward), as a share of the
# tokens of all K rows at the longest length: rows are grouped by length only where that saves more.
BUCKET_COST = 0.05


def length_buckets(lengths, bucket_cost: float = BUCKET_COST) -> list[np.ndarray]:
    """Rows grouped by the tokens they need (`lengths` [K]): each group is encoded at its longest length,
    padding the others. The groups (contiguous ranges of the sorted lengths) minimise the tokens encoded
    plus `bucket_cost` x K x max(lengths) per group. Returns the row indices of each group, shortest first;
    one group of all rows (in order) when grouping saves nothing."""
    lengths = np.asarray(lengths, np.int64)
    k = len(lengths)
    values, counts = np.unique(lengths, return_counts=True)
    overhead = bucket_cost * k * values[-1]
    # best[j]: the cheapest grouping of the rows with one of the j shortest distinct lengths; cut[j]: where
    # its last group starts (that group pads its rows to values[j - 1]).
    best, cut = np.zeros(len(values) + 1), np.zeros(len(values) + 1, np.int64)
    below = np.concatenate([[0], np.cumsum(counts)])  # rows with one of the first j distinct lengths
    for j in range(1, len(values) + 1):
        costs = [best[i] + (below[j] - below[i]) * values[j - 1] + overhead for i in range(j)]
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    groups, j = [], len(values)
    while j > 0:  # the groups back from the longest, each the rows of distinct lengths cut[j] .. j - 1
        groups.append(np.flatnonzero((lengths >= values[cut[j]]) & (lengths <= values[j - 1])))
        j = cut[j]
    return groups[::-1]


def text_tokens(spec: PromptSpec, shared_prefix: bool = True) -> int:
    """Tokens the text tower encodes per step for the K prompts of `spec` (`class_features` without class
    sharding): the shared prefix once, and each group of rows (`length_buckets`) at its longest length."""
    n_prefix = spec.shared_prefix_len if shared_prefix and spec.shared_prefix_len > 1 else 0
    lengths = np.asarray(spec.eot_index) + 1 - n_prefix
    return n_prefix + sum(len(g) * int(lengths[g].max()) for g in length_buckets(lengths, BUCKET_COST))


def class_features(
    module,
    clip_params,
    frozen_embeds: jax.Array,
    ctx: jax.Array,
    spec: PromptSpec,
    *,
    shared_prefix: bool = True,
    class_sharding=None,
) -> jax.Array:
    """The K class features [K, D] (projected, float32) of the prompts with context `ctx`: the text tower over
    all classes at once (one batch per group of row lengths), differentiable w.r.t. `ctx`.

    shared_prefix: with a shared context and `spec.shared_prefix_len` > 1 (the class token at the end or in
      the middle), encode the common [SOS] + context tokens once and the K class suffixes against their
      cached keys and values (`CLIPModule.encode_text_shared_prefix`): the same features for
      1 + n_ctx + K * S tokens instead of K * (1 + n_ctx + S). Otherwise the K full (cut) sequences.
      Either way, rows whose end-of-text comes earlier may be encoded in a shorter batch (`length_buckets`).
    class_sharding: a `NamedSharding` that splits the first axis over devices: the K prompts (each group of
      them) are padded to a multiple of the shard count and each device encodes its share; the features come
      back replicated.
    """
    n_prefix = spec.shared_prefix_len if shared_prefix and ctx.ndim == 2 else 1
    prefix = None
    if n_prefix > 1:  # every row's first n_prefix embeddings are row 0's
        prefix, rows = _split_at_prefix(frozen_embeds, ctx, spec.ctx_positions, n_prefix)
        eot = np.asarray(spec.eot_index) - n_prefix
    else:
        rows = assemble(frozen_embeds, ctx, jnp.asarray(spec.ctx_positions))
        eot = np.asarray(spec.eot_index)
    variables = {"params": clip_params}

    def encode(rows, eot):
        eot = jnp.asarray(eot)
        if prefix is not None:
            return module.apply(variables, prefix, rows, eot, method="encode_text_shared_prefix")
        return module.apply(variables, rows, eot, method="encode_text_embeddings")

    if class_sharding is not None:
        encode = functools.partial(_sharded, encode, class_sharding)
    groups = length_buckets(eot + 1, BUCKET_COST)
    if len(groups) == 1:
        return encode(rows, eot)
    # The causal tower gives a row the same features whatever follows its end-of-text token.
    out = jnp.concatenate([encode(rows[g, : eot[g].max() + 1], eot[g]) for g in groups])
    return out[np.argsort(np.concatenate(groups))]


def _sharded(encode, class_sharding, rows, eot: np.ndarray):
    """`encode` with the rows split over the devices: padded to a multiple of the shard count (copies of the
    first row, dropped after encoding), each device encoding its share; the features come back replicated."""
    k = rows.shape[0]
    shards = class_sharding.mesh.shape[class_sharding.spec[0]]
    pad = -k % shards
    rows = jnp.concatenate([rows, jnp.broadcast_to(rows[:1], (pad, *rows.shape[1:]))])
    eot = np.concatenate([eot, np.broadcast_to(eot[:1], (pad,))])
    rows = jax.lax.with_sharding_constraint(rows, class_sharding)
    eot = jax.lax.with_sharding_constraint(jnp.asarray(eot), class_sharding)
    out = encode(rows, eot)[:k]
    return jax.lax.with_sharding_constraint(
        out, jax.sharding.NamedSharding(class_sharding.mesh, jax.sharding.PartitionSpec())
    )
