"""Fused attention of a step's new tokens over the KV cache, for TPUs: a Pallas kernel over the cached prefix and a
small XLA part over the new tokens, merged by their softmax statistics.

A step's T new tokens (a Medusa tree, one AR token, a prefill chunk) of row b see every cache slot before
`row_start[b]` (the prefix) and, among themselves, what the block mask lets them see (the tree mask). In XLA the
prefix part materialises `[B, H, T, slots]` float32 scores per block of slots, and the TPU compiler moves those
between HBM and VMEM: on Llama-3-8B at batch 8 with a 74-node tree that was more HBM traffic than the weights. Here:

  prefix   `prefix_attention`: one kernel per (row, block of slots), K/V blocks DMA'd into VMEM, an online softmax
           in VMEM scratch; blocks past a row's prefix are neither read (their block index repeats, so no DMA) nor
           computed. Returns the unnormalised output and the softmax max and sum per query.
  new      `new_token_attention`: the T x T part, from the step's own K/V (`[B, T, K, D]`), in XLA (small).
  merge    `merge`: the two parts' statistics combined exactly (log-sum-exp).

Shapes: B rows, T new tokens, K kv heads, G query heads per kv head, D head dim, S cache slots, N layers, C slots
per block. On a mesh the kernel runs per shard under `jax.shard_map` (rows over data, kv heads over tensor, as the
cache is sharded). `interpret=True` runs the kernel's own code on a CPU (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG_INF = -1e30  # as model.NEG_INF: finite, so that empty parts give exp(NEG_INF - m) = 0, not NaN
VMEM_LIMIT = 32 * 2**20  # scoped VMEM the kernel may use (TPU v4 and later have at least this much)
VMEM_BUDGET = 16 * 2**20  # of which its blocks and temporaries are planned to take at most this


def query_tile(tg: int, kh: int, d: int, block: int, itemsize: int) -> int:
    """Queries per tile: all T x G of a kv head when their blocks fit the VMEM budget beside two double-buffered
    K/V blocks, else the most that fit (a multiple of 8). Per query row: q and acc `[K, D]` float32, m and l
    `[K, 1]` (a lane tile of 128 each), double-buffered, and three `[C]` score rows of temporaries."""
    kv = 2 * 2 * block * kh * d * itemsize
    per_row = 2 * kh * (2 * d + 2 * 128) * 4 + 3 * block * 4
    rows = max(8, (VMEM_BUDGET - kv) // per_row // 8 * 8)
    return tg if tg <= rows else rows


def _prefix_kernel(row_start_ref, layer_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, block, precision):
    """Grid (B, query tiles, S / C); refs: q `[K, TQ, D]`, k/v `[K, C, D]`, acc `[K, TQ, D]`, m/l `[K, TQ, 1]`
    (resident over the blocks of a row's tile: the block axis is the innermost)."""
    del layer_ref
    b, j = pl.program_id(0), pl.program_id(2)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    start = row_start_ref[b]

    @pl.when(j * block < start)
    def _():
        slot = j * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        seen = slot < start  # [1, C]
        for h in range(q_ref.shape[0]):
            q, k, v = q_ref[h], k_ref[h], v_ref[h]
            s = jax.lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32)  # fmt: skip
            s = jnp.where(seen, s, NEG_INF)  # [TG, C]
            m_old = m_ref[h]  # [TG, 1]
            m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(seen, jnp.exp(s - m_new), 0.0)
            fix = jnp.exp(m_old - m_new)
            l_ref[h] = l_ref[h] * fix + jnp.sum(p, axis=1, keepdims=True)
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)  # fmt: skip
            acc_ref[h] = acc_ref[h] * fix + pv
            m_ref[h] = m_new


def prefix_attention(q, ck, cv, layer, row_start, block: int, blocks: int | None = None, precision=None,
                     interpret: bool = False):  # fmt: skip
    """q `[B, K, TG, D]` (scaled by 1/sqrt(D)), ck/cv `[N, B, S, K, D]`, layer (int32 scalar), row_start `[B]` ->
    (acc `[B, K, TG, D]`, m `[B, K, TG, 1]`, l `[B, K, TG, 1]`) float32: over slots s < row_start[b], the
    unnormalised softmax-weighted values, the scores' max and the sum of exp(score - max). blocks: how many blocks
    of `block` slots the grid covers (default all S / block)."""
    b, kh, tg, d = q.shape
    s = ck.shape[2]
    # the kernel reads [N, B, K, S, D]: blocks of (slots, head dim) tile as the TPU wants for every dtype, and the
    # compiler lays the cache out so that this transpose moves nothing
    kv = tuple(c.transpose(0, 1, 3, 2, 4) for c in (ck, cv))
    nb = blocks or s // block
    tq = query_tile(tg, kh, d, block, jnp.dtype(ck.dtype).itemsize)
    nq = -(-tg // tq)
    if nq * tq != tg:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, nq * tq - tg), (0, 0)))

    def kv_index(i, qi, j, rs, ly):
        last = jax.lax.div(jnp.maximum(rs[i] - 1, 0), block)  # blocks past the prefix repeat its last block: no DMA
        return ly[0], i, 0, jnp.minimum(j, last), 0

    kv_spec = pl.BlockSpec((None, None, kh, block, d), kv_index)
    row_spec = pl.BlockSpec((None, kh, tq, d), lambda i, qi, j, rs, ly: (i, 0, qi, 0))
    stat_spec = pl.BlockSpec((None, kh, tq, 1), lambda i, qi, j, rs, ly: (i, 0, qi, 0))
    itemsize = jnp.dtype(ck.dtype).itemsize
    cost = pl.CostEstimate(
        flops=4 * b * kh * nq * tq * d * nb * block,
        transcendentals=b * kh * nq * tq * nb * block,
        bytes_accessed=int(
            q.size * q.dtype.itemsize + 2 * b * nq * nb * block * kh * d * itemsize + b * kh * nq * tq * (d + 2) * 4
        ),  # fmt: skip
    )
    stat = jax.ShapeDtypeStruct((b, kh, nq * tq, 1), jnp.float32)
    out = pl.pallas_call(
        functools.partial(_prefix_kernel, block=block, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, nq, nb),
            in_specs=[row_spec, kv_spec, kv_spec],
            out_specs=[row_spec, stat_spec, stat_spec],
        ),  # fmt: skip
        out_shape=[jax.ShapeDtypeStruct((b, kh, nq * tq, d), jnp.float32), stat, stat],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT
        ),
        cost_estimate=cost,
        interpret=interpret,
    )(row_start.astype(jnp.int32), jnp.reshape(layer, (1,)).astype(jnp.int32), q, *kv)
    return tuple(x[:, :, :tg] for x in out)


def new_token_attention(q, k, v, block_mask, precision=None):
    """q `[B, T, K, G, D]` (scaled), the step's k, v `[B, T, K, D]`, block_mask `[B, T, T]` (bool) -> (acc
    `[B, K, G, T, D]`, m, l `[B, K, G, T, 1]`) float32, as `prefix_attention` over the new tokens."""
    s = jnp.einsum("btkgd,bjkd->bkgtj", q, k.astype(q.dtype), precision=precision, preferred_element_type=jnp.float32)
    see = block_mask[:, None, None]
    s = jnp.where(see, s, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(see, jnp.exp(s - m), 0.0)
    acc = jnp.einsum("bkgtj,bjkd->bkgtd", p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
    return acc, m, jnp.sum(p, axis=-1, keepdims=True)


def merge(a, b):
    """Two parts' (acc, m, l) -> the normalised attention output (float32)."""
    (acc1, m1, l1), (acc2, m2, l2) = a, b
    m = jnp.maximum(m1, m2)
    f1, f2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
    total = l1 * f1 + l2 * f2
    return (acc1 * f1 + acc2 * f2) / jnp.where(total > 0, total, 1.0)


def fused_attention(q, k, v, ck, cv, layer, row_start, block_mask, block: int, blocks: int | None = None,
                    precision=None, mesh=None, interpret: bool = False):  # fmt: skip
    """Attention of the step's queries q `[B, T, K, G, D]` (unscaled) over the cache prefix (slots before
    row_start `[B]` of layer `layer` of ck/cv `[N, B, S, K, D]`) and the step's own k, v `[B, T, K, D]` under
    block_mask `[B, T, T]` -> `[B, T, K, G, D]` float32. On `mesh` the kernel runs per shard (rows over data, kv
    heads over tensor, as `sharding.kv_cache_sharding` splits the cache)."""
    bsz, t, kh, g, d = q.shape
    q = q * (1.0 / d**0.5)
    qk = q.transpose(0, 2, 1, 3, 4).reshape(bsz, kh, t * g, d)  # [B, K, T*G, D]: query (t, g) at t * G + g
    run = functools.partial(prefix_attention, block=block, blocks=blocks, precision=precision, interpret=interpret)
    if mesh is None:
        pre = run(qk, ck, cv, layer, row_start)
    else:
        from jax.sharding import PartitionSpec as P

        from medusa_jax.sharding import kv_cache_sharding

        cspec = kv_cache_sharding(mesh, ck.shape).spec
        rows, heads = cspec[1], cspec[3]
        qspec, sspec = P(rows, heads, None, None), P(rows, heads, None, None)
        pre = jax.shard_map(
            lambda q_, ck_, cv_, ly, rs: run(q_, ck_, cv_, ly, rs), mesh=mesh,
            in_specs=(qspec, cspec, cspec, P(), P(rows)), out_specs=(qspec, sspec, sspec), check_vma=False,
        )(qk, ck, cv, jnp.asarray(layer, jnp.int32), row_start.astype(jnp.int32))  # fmt: skip
    parts = tuple(x.reshape(bsz, kh, t, g, -1).transpose(0, 1, 3, 2, 4) for x in pre)  # [B, K, G, T, .]
    out = merge(parts, new_token_attention(q, k, v, block_mask, precision))  # [B, K, G, T, D]
    return out.transpose(0, 3, 1, 2, 4)


__all__ = ["fused_attention", "merge", "new_token_attention", "prefix_attention"]
