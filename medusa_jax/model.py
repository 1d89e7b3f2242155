"""The Llama-family backbone as pure Flax linen modules.

Params are an explicit pytree; the KV cache is an explicit pytree passed in and returned. Attention takes explicit
positions and an explicit block mask, so AR decoding, prefill and Medusa tree verification share one code path.
Layers run under `nn.scan` (one compiled layer body).

Numerics (`ModelConfig`): weights in `param_dtype`; every weight matmul takes its inputs in `matmul_dtype` (float32
activations split over `matmul_passes` parts, see `matmul`) and sums in float32; activations (residual stream,
norms, attention, the KV cache) are in `dtype`.

Shapes: B batch, T new tokens, S cache slots, E hidden, H query heads, K kv heads, D head dim, V vocab, N layers.
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.config import ModelConfig

NEG_INF = -1e30


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values `[N, B, S, K, D]`. Slot s of row b holds the token at cache position s."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None, mesh=None) -> KVCache:
        """An empty cache; on `mesh` (a decoding mesh) created in place in its shards (`sharding.kv_cache_sharding`:
        rows over data, kv heads over tensor), inside or outside jit."""
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.jnp_dtype
        if mesh is None:
            return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        from medusa_jax.sharding import kv_cache_sharding

        s = kv_cache_sharding(mesh, shape)
        make = jax.jit(lambda: cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), out_shardings=cls(s, s))
        return make()

    def constrain(self, mesh) -> KVCache:
        """Inside jit: pin this cache to its shards on `mesh` (no-op without a mesh)."""
        if mesh is None:
            return self
        from medusa_jax.sharding import kv_cache_sharding

        s = kv_cache_sharding(mesh, self.k.shape)
        return KVCache(jax.lax.with_sharding_constraint(self.k, s), jax.lax.with_sharding_constraint(self.v, s))

    @property
    def slots(self) -> int:
        return self.k.shape[2]


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies `[D/2]`, with Llama-3 scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor
    )
    mid = (1 - smooth) * inv / sc.factor + smooth * inv
    out = jnp.where(wavelen > low_wavelen, inv / sc.factor, inv)
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_mid, mid, out)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, 1, D]` in the HF rotate-half layout."""
    freqs = positions[..., None].astype(jnp.float32) * rope_inv_freq(cfg)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, T, heads, D]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    xf = x.astype(jnp.float32)
    return (xf * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def attention_mask(block_mask: jax.Array, cache_start: jax.Array | None, slots: int | None) -> jax.Array:
    """Boolean `[B, T, S]` mask (S = T without a cache).

    block_mask `[T, T]` or `[B, T, T]`: which new tokens see which (causal for AR/prefill, the tree mask for Medusa).
    With a cache, new token t of row b sits at slot `cache_start[b] + t` and also sees every slot before
    `cache_start[b]` (the prefix).
    """
    block_mask = block_mask.astype(bool)
    if cache_start is None:
        return block_mask if block_mask.ndim == 3 else block_mask[None]
    t = block_mask.shape[-1]
    bm = jnp.broadcast_to(block_mask, (cache_start.shape[0], t, t))
    return slots_seen(bm, cache_start, jnp.arange(slots))


def slots_seen(block_mask: jax.Array, row_start: jax.Array, slot: jax.Array) -> jax.Array:
    """Which of the cache slots `slot` `[C]` each new token sees: `[B, T, C]` from block_mask `[B, T, T]` (bool) and
    row_start `[B]` (slot of row b's first new token): the prefix before it, and the new tokens the block mask lets
    it see."""
    t = block_mask.shape[-1]
    rel = slot[None, :] - row_start[:, None]  # [B, C]
    new = jnp.take_along_axis(block_mask, jnp.clip(rel, 0, t - 1)[:, None, :].repeat(t, axis=1), axis=2)
    return (rel < 0)[:, None, :] | (((rel >= 0) & (rel < t))[:, None, :] & new)


@flax.struct.dataclass
class LiveMask:
    """The attention mask of a step over a cache, for blockwise attention (`attend_live`): block_mask `[B, T, T]`
    (bool), row_start `[B]` (slot of row b's first new token), blocks: how many blocks of `block` slots hold live
    entries (int32 scalar)."""

    block_mask: jax.Array
    row_start: jax.Array
    blocks: jax.Array
    block: int = flax.struct.field(pytree_node=False)
    kernel: str = flax.struct.field(pytree_node=False, default="xla")  # `ModelConfig.attention_kernel_used`
    mesh: object = flax.struct.field(pytree_node=False, default=None)  # the decoding mesh, for the kernel


def live_mask(block_mask: jax.Array, row_start: jax.Array, block: int, kernel: str = "xla", mesh=None) -> LiveMask:
    t = block_mask.shape[-1]
    bm = jnp.broadcast_to(block_mask.astype(bool), (row_start.shape[0], t, t))
    blocks = (jnp.max(row_start).astype(jnp.int32) + t + block - 1) // block
    return LiveMask(bm, row_start.astype(jnp.int32), blocks, block, kernel, mesh)


def attend_live(
    cfg: ModelConfig, q: jax.Array, ck: jax.Array, cv: jax.Array, layer, mask: LiveMask, new=None
) -> jax.Array:
    """Attention of q `[B, T, K, G, D]` over layer `layer` of the cache (ck, cv `[N, B, S, K, D]`, the T new entries
    already written), reading only the blocks up to the longest row's live length: an online softmax over blocks of
    `mask.block` slots in a loop of `mask.blocks` iterations. -> `[B, T, K, G, D]` in `cfg.dtype`.

    Row b's query t sees slot s when s < row_start[b] (the prefix) or when s is new token j = s - row_start[b] and
    block_mask[b, t, j]. `cfg.attention_blocks_unrolled` (cost measurement) runs that many blocks unrolled instead.
    With `mask.kernel` "pallas" (or "interpret") the fused kernel of `medusa_jax.tree_attention` runs instead, on the
    prefix before row_start and the step's own K/V `new` (k, v `[B, T, K, D]`)."""
    b, t, kh, g, d = q.shape
    if mask.kernel != "xla":
        from medusa_jax.tree_attention import fused_attention

        prec = jax.lax.Precision.HIGHEST if f32_precision(cfg, q.dtype) == "highest" else None
        out = fused_attention(q, *new, ck, cv, layer, mask.row_start, mask.block_mask, mask.block,
                              cfg.attention_blocks_unrolled or None, prec, mask.mesh, mask.kernel == "interpret")  # fmt: skip
        return out.astype(cfg.jnp_dtype)
    size, f32 = mask.block, jnp.float32
    prec = f32_precision(cfg, q.dtype)
    layer, zero = jnp.asarray(layer, jnp.int32), jnp.zeros((), jnp.int32)
    scale = 1.0 / math.sqrt(d)

    def block(i, carry):
        m, total, acc = carry
        at = (i * size).astype(jnp.int32)
        kc = jax.lax.dynamic_slice(ck, (layer, zero, at, zero, zero), (1, b, size, kh, d))[0]
        vc = jax.lax.dynamic_slice(cv, (layer, zero, at, zero, zero), (1, b, size, kh, d))[0]
        s = jnp.einsum("btkgd,bskd->bkgts", q, kc.astype(q.dtype), precision=prec, preferred_element_type=f32) * scale
        see = slots_seen(mask.block_mask, mask.row_start, at + jnp.arange(size, dtype=jnp.int32))[:, None, None]
        m_new = jnp.maximum(m, jnp.max(jnp.where(see, s, NEG_INF), axis=-1))
        p = jnp.where(see, jnp.exp(s - m_new[..., None]), 0.0)
        fix = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(cfg.jnp_dtype), vc.astype(cfg.jnp_dtype), precision=prec,
                        preferred_element_type=f32)  # fmt: skip
        return m_new, total * fix + p.sum(-1), acc * fix[..., None] + pv

    carry = (jnp.full((b, kh, g, t), NEG_INF, f32), jnp.zeros((b, kh, g, t), f32), jnp.zeros((b, kh, g, t, d), f32))
    if cfg.attention_blocks_unrolled:
        for i in range(cfg.attention_blocks_unrolled):
            carry = block(jnp.int32(i), carry)
    else:
        carry = jax.lax.fori_loop(0, mask.blocks, block, carry)
    _, total, acc = carry
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).astype(cfg.jnp_dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * scale.astype(jnp.float32)).astype(self.dtype)


def f32_precision(cfg: ModelConfig, dtype) -> str | None:
    """The configured precision for float32 matmul inputs (e.g. "highest": no TF32); the backend's default else."""
    return cfg.precision if jnp.dtype(dtype) == jnp.float32 else None


def matmul(cfg: ModelConfig, spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum of activations `x` with weights `w` (e.g. "...e,ef->...f"), summed and returned in float32.

    The inputs go in as the matmul dtype. With `cfg.matmul_passes` = n > 1, activations of a wider dtype are split
    into n parts of the matmul dtype (x = x1 + x2 + ..., each the rounding of what is left), stacked as extra rows of
    one matmul and summed: n = 2 carries ~16 mantissa bits of float32 activations into bfloat16 matmuls at the weight
    traffic of one pass (the weights are read once; the rows double)."""
    dt = cfg.jnp_matmul_dtype
    prec = f32_precision(cfg, dt)
    passes = cfg.matmul_passes if x.dtype != dt and jnp.finfo(x.dtype).bits > jnp.finfo(dt).bits else 1
    if passes == 1:
        return jnp.einsum(spec, x.astype(dt), w.astype(dt), precision=prec, preferred_element_type=jnp.float32)
    fi = jnp.finfo(dt)
    rest = x.astype(jnp.float32)
    parts = []
    for _ in range(passes - 1):
        # `rest` rounded to the matmul dtype but kept in float32 by reduce_precision (the dtype's exponent and mantissa
        # bits: 8 and 7 for bfloat16; round to nearest even, as the cast), not by a cast down and back up: XLA drops a
        # float32 -> bfloat16 -> float32 convert pair as a no-op when excess precision is allowed
        # (`--xla_allow_excess_precision`, on by default: GPU and CPU then run `SimplifyFPConversions`), which would
        # make `rest - part` zero and silently leave one pass. reduce_precision is no convert pair, so that pass leaves it.
        # The part is exact in the matmul dtype and `rest - part` exact in float32.
        part = jax.lax.reduce_precision(rest, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
        parts.append(part.astype(dt))
        rest = rest - part
    parts.append(rest.astype(dt))
    lhs, rhs = spec.split(",")
    split_spec = f"z{lhs},{rhs.replace('->', '->z')}"  # z: the parts, as extra rows
    y = jnp.einsum(split_spec, jnp.stack(parts), w.astype(dt), precision=prec, preferred_element_type=jnp.float32)
    return y.sum(0)


class Dense(nn.Module):
    """`x @ kernel (+ bias)` over the last axis (param names as `nn.Dense`). Returns the activation dtype, or float32
    with `f32_out` (the vocabulary projection)."""

    cfg: ModelConfig
    features: int
    use_bias: bool = False
    f32_out: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), cfg.jnp_param_dtype)
        y = matmul(cfg, "...e,ef->...f", x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), cfg.jnp_param_dtype).astype(y.dtype)
        return y if self.f32_out else y.astype(cfg.jnp_dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv, cache_start, layer=None, moves=None):
        """x `[B, T, E]`, mask `[B, T, S]`; cache_kv None or the full (k, v) `[N, B, S, K, D]`, of which this is
        layer `layer`: only the T new entries are written (no copy of the layer's cache). moves: pending entry moves
        applied to this layer first (`move_entries`). -> (out, cache_kv)."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, kh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = Dense(cfg, h * d, cfg.qkv_bias, name="q_proj")(x).reshape(b, t, h, d)
        k = Dense(cfg, kh * d, cfg.qkv_bias, name="k_proj")(x).reshape(b, t, kh, d)
        v = Dense(cfg, kh * d, cfg.qkv_bias, name="v_proj")(x).reshape(b, t, kh, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_kv is not None:
            sc = cfg.scatter_rows
            if moves is not None:
                cache_kv = tuple(move_entries(c, layer, *moves, t, sc) for c in cache_kv)
            ck = write_cache(cache_kv[0], k, layer, cache_start, sc)
            cv = write_cache(cache_kv[1], v, layer, cache_start, sc)
            cache_kv = (ck, cv)
            if isinstance(mask, LiveMask):  # blockwise, up to the live length
                q = q.reshape(b, t, kh, h // kh, d)
                new = (k.astype(ck.dtype), v.astype(cv.dtype))  # as the cache holds them
                out = attend_live(cfg, q, ck, cv, layer, mask, new).reshape(b, t, h * d)
                return Dense(cfg, cfg.hidden_size, cfg.o_bias, name="o_proj")(out), cache_kv
            k, v = ck[layer], cv[layer]
        q = q.reshape(b, t, kh, h // kh, d)
        prec = f32_precision(cfg, q.dtype)
        scores = jnp.einsum(
            "btkgd,bskd->bkgts", q, k.astype(q.dtype), precision=prec, preferred_element_type=jnp.float32
        )
        scores = scores / math.sqrt(d)
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.jnp_dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(cfg.jnp_dtype), precision=prec).reshape(b, t, h * d)
        return Dense(cfg, cfg.hidden_size, cfg.o_bias, name="o_proj")(out), cache_kv


WRITE_UNROLL_ROWS = 16  # rows written one by one, unrolled, up to this batch; more in a loop
TPU_UNROLL_ROWS = 64  # on a TPU (`ModelConfig.scatter_rows`) up to this batch; more in one scatter
CPU_UNROLL_ROWS = 1  # on a CPU: every batch of several rows in a loop


def unrolled_rows(scatter: bool) -> int:
    """Up to how many rows cache writes are unrolled (one dynamic_update_slice per row). On a TPU a scatter into the
    cache costs copies of it (a batch of 32 SmolLM2 rows: 3.8x the cache in temporaries against 2.2x unrolled), so
    more rows are unrolled there. XLA:CPU is the other way round: unrolled row writes in the layer loop cost it more
    than a loop of in-place writes (SmolLM2 at batch 8: a plain step 88 against 41 ms, a 2-node tree step 226 against
    61 ms). Elsewhere a loop above 16 rows keeps the program from growing with the batch."""
    if scatter:
        return TPU_UNROLL_ROWS
    return CPU_UNROLL_ROWS if jax.default_backend() == "cpu" else WRITE_UNROLL_ROWS


def write_cache(cache: jax.Array, new: jax.Array, layer, start: jax.Array, scatter: bool = False) -> jax.Array:
    """cache `[N, B, S, K, D]` with new `[B, T, K, D]` written at `[layer, b, start[b]:start[b]+T]`, in place.
    start `[B]`, or a scalar when every row starts at the same slot (prefill). The caller keeps
    `start[b] + T <= S` (the cache is sized for the prompt, the output and one tree).

    Rows at different offsets are written one by one: each write touches its T entries only. (A batched scatter
    copied the whole cache per layer, and selecting the new entries into the layer's slice reads and writes that
    whole slice: several times the cache's bytes per step, measured with the TPU compiler.)"""
    new = new.astype(cache.dtype)
    if cache.shape[1] == 1 or start.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, start.reshape(-1)[0], 0, 0))
    zero = jnp.zeros((), jnp.int32)
    layer = jnp.asarray(layer, jnp.int32)

    def put(r, c):
        row = jax.lax.dynamic_slice_in_dim(new, r, 1, axis=0)[None]  # [1, 1, T, K, D]
        return jax.lax.dynamic_update_slice(c, row, (layer, r, start[r].astype(jnp.int32), zero, zero))

    b, t = new.shape[:2]
    if b <= unrolled_rows(scatter):
        for r in range(b):
            cache = put(jnp.int32(r), cache)
        return cache
    if scatter:  # many rows on a TPU: one scatter of the B * T entries (`ModelConfig.scatter_rows`)
        slots = start.astype(jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        return cache.at[layer, jnp.arange(b)[:, None], slots].set(new, unique_indices=True, mode="drop")
    return jax.lax.fori_loop(0, b, put, cache)


def move_entries(
    cache: jax.Array, layer, at: jax.Array, nodes: jax.Array, window: int, scatter: bool = False
) -> jax.Array:
    """Move layer `layer`'s entries at slots `at[b] + nodes[b, j]` to slots `at[b] + j`, in place: cache
    `[N, B, S, K, D]`, at `[B]`, nodes `[B, M]` (j <= nodes[b, j] < window).

    Medusa's accepted path (its tree nodes) becomes contiguous this way inside the next forward's layer body, where
    the cache is being updated anyway: compacting every layer between steps made the compiled loop hold three more
    copies of the cache (TPU compiler). Each row's `window` entries from `at[b]` are sliced and the path picked from
    them: a gather of single entries out of the cache made the TPU compiler copy the whole cache too."""
    if nodes.shape[1] == 1:  # one node (plain decoding): already in place
        return cache
    b = nodes.shape[0]
    layer, zero = jnp.asarray(layer, jnp.int32), jnp.zeros((), jnp.int32)
    at = at.astype(jnp.int32)

    def path_of(r, c):  # row r's path entries [1, 1, M, K, D]
        win = jax.lax.dynamic_slice(c, (layer, r, at[r], zero, zero), (1, 1, window, *c.shape[3:]))
        return jnp.take(win, jax.lax.dynamic_index_in_dim(nodes, r, 0, keepdims=False), axis=2)

    if b <= unrolled_rows(scatter):  # every row's path read first, then written (rows never overlap)
        paths = [path_of(jnp.int32(r), cache) for r in range(b)]
        for r in range(b):
            cache = jax.lax.dynamic_update_slice(cache, paths[r], (layer, jnp.int32(r), at[r], zero, zero))
        return cache
    if scatter:  # very many rows on a TPU: the paths of all rows at once, one scatter
        paths = jax.vmap(lambda r: path_of(r, cache)[0, 0])(jnp.arange(b, dtype=jnp.int32))  # [B, M, K, D]
        return write_cache(cache, paths, layer, at, scatter)

    def put(r, c):  # row r's read sees only earlier rows' writes, to other rows
        return jax.lax.dynamic_update_slice(c, path_of(r, c), (layer, r, at[r], zero, zero))

    return jax.lax.fori_loop(0, b, put, cache)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = Dense(cfg, cfg.intermediate_size, name="gate_proj")(x)
        up = Dense(cfg, cfg.intermediate_size, name="up_proj")(x)
        return Dense(cfg, cfg.hidden_size, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm block; scanned over layers. carry = (x, cache_k, cache_v) with the full `[N, ...]` cache
    (or cache None), updated in place at this layer's index."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, cos, sin, mask, cache_start, moves=None):
        cfg = self.cfg
        x, ck, cv = carry
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=name)
        kv = None if ck is None else (ck, cv)
        attn, kv = Attention(cfg, name="attn")(norm("input_norm")(x), cos, sin, mask, kv, cache_start, layer, moves)
        x = x + attn
        x = x + MLP(cfg, name="mlp")(norm("post_attn_norm")(x))
        if ck is not None:
            ck, cv = kv
        return (x, ck, cv), None


class Transformer(nn.Module):
    """The backbone. `__call__` returns the final-norm hidden states; `logits` projects them to the vocabulary."""

    cfg: ModelConfig
    mesh: object = None  # the decoding mesh (`medusa_jax.sharding`), for the Pallas attention kernel's shard_map

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.jnp_dtype,
            param_dtype=cfg.jnp_param_dtype,
            embedding_init=nn.initializers.normal(0.02),
        )
        layer = nn.remat(DecoderLayer, static_argnums=()) if cfg.remat else DecoderLayer
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=cfg.scan_unroll,
        )(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg, cfg.vocab_size, f32_out=True, name="lm_head")

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        block_mask: jax.Array,
        cache: KVCache | None = None,
        cache_start: jax.Array | None = None,
        moves: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """tokens, positions `[B, T]`; block_mask `[T, T]` or `[B, T, T]`; cache_start `[B]` (slot of the first new
        token; a scalar when all rows start at the same slot); moves (at `[B]`, nodes `[B, M]`): cache entries to move
        first, in every layer (`move_entries`). Returns hidden `[B, T, E]` and the cache with the new K/V written at
        `cache_start[b] + t`."""
        x = jnp.take(self.embed.embedding, tokens, axis=0).astype(self.cfg.jnp_dtype)  # rows, then their dtype
        cos, sin = rope_tables(self.cfg, positions)
        row_start = None if cache_start is None else jnp.broadcast_to(cache_start, tokens.shape[:1])
        block = 0 if cache is None else self.cfg.attention_block_for(cache.slots)
        if block:  # attention reads the cache blockwise, up to the live length (`attend_live`)
            mask = live_mask(block_mask, row_start, block, self.cfg.attention_kernel_used, self.mesh)
        else:
            mask = attention_mask(block_mask, row_start, None if cache is None else cache.slots)
        carry = (x, None, None) if cache is None else (x, cache.k, cache.v)
        (x, ck, cv), _ = self.layers(carry, jnp.arange(self.cfg.num_layers), cos, sin, mask, cache_start, moves)
        return self.norm(x), (None if cache is None else KVCache(ck, cv))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden `[..., E]` -> float32 logits `[..., V]`, summed in float32 also for bfloat16 weights: bfloat16
        logits (resolution 0.125 near |logit| 20) tie and flip greedy choices whenever a forward of many tokens
        (Medusa's verification) and of one token sum in a different order."""
        if not self.cfg.tie_word_embeddings:
            return self.lm_head(hidden)
        return matmul(self.cfg, "...e,ve->...v", hidden, self.embed.embedding)


def causal_mask(t: int) -> jax.Array:
    return jnp.tril(jnp.ones((t, t), bool))


def abstract_params(cfg: ModelConfig) -> dict:
    """The params pytree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    init = lambda m: m.logits(m(tokens, tokens, causal_mask(4))[0])
    return jax.eval_shape(lambda key: Transformer(cfg).init(key, method=init)["params"], jax.random.PRNGKey(0))


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random params (for tests and tiny configs)."""
    shapes = abstract_params(cfg)
    rng = np.random.default_rng(seed)  # numpy: compiling the scanned init costs seconds on CPU

    def fill(path, leaf):
        name = str(path[-1].key)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
