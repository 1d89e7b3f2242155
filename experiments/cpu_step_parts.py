"""Micro-benchmark behind the CPU step-cost study: forward of L tokens, vocabulary projection rows, heads,
compaction on SmolLM2 at batch B (argv[1]). Run: PYTHONPATH=. python experiments/cpu_step_parts.py 1"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp

import medusa_jax
from medusa_jax.heads import base_lm_head, draft_logits
from medusa_jax.medusa_decode import compact_cache
from medusa_jax.model import KVCache, Transformer, causal_mask

m = medusa_jax.load()
cfg, params, heads = m.cfg, m.params, m.heads
tf = Transformer(cfg)
lm = base_lm_head(params)


def timeit(f, *a, n=10):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
slots = 256
cache = KVCache.zeros(cfg, B, slots)
lengths = jnp.full((B,), 100, jnp.int32)


@jax.jit
def fwd(tokens, mask, cache, lengths):
    pos = lengths[:, None] + jnp.arange(tokens.shape[1])[None]
    h, c = tf.apply({"params": params}, tokens, pos, mask, cache, lengths)
    return h, c


for L in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32):
    toks = jnp.ones((B, L), jnp.int32)
    print(f"B{B} forward L={L}: {timeit(fwd, toks, causal_mask(L), cache, lengths):.1f} ms", flush=True)


@jax.jit
def logits(h):
    return tf.apply({"params": params}, h, method=tf.logits)


for r in (1, 2, 3, 6, 17):
    print(f"B{B} lm logits rows={r}: {timeit(logits, jnp.ones((B, r, cfg.hidden_size))):.1f} ms", flush=True)


@jax.jit
def hd(h):
    root_emb = jnp.ones_like(h) if "root" in heads else None
    lg, ids = draft_logits(heads, h, lm, cfg.jnp_matmul_dtype, root_emb)
    return jax.lax.top_k(lg, 10)


print(f"B{B} heads(draft)+topk: {timeit(hd, jnp.ones((B, cfg.hidden_size))):.1f} ms")


@jax.jit
def amax(x):
    return jnp.argmax(x, -1)


print(f"B{B} argmax rows=3: {timeit(amax, jnp.ones((B, 3, cfg.vocab_size))):.2f} ms")


@jax.jit
def cc(cache, lengths, nodes):
    return compact_cache(cache, lengths, nodes)


print(f"B{B} compact D=2: {timeit(cc, cache, lengths, jnp.ones((B, 3), jnp.int32)):.1f} ms")
