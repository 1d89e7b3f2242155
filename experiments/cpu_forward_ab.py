"""Interleaved A/B behind the CPU step-cost study: the scanned layer loop vs fully unrolled (scan_unroll=30),
forward of L tokens with a 256-slot cache, SmolLM2, batch 1. Run: PYTHONPATH=. python experiments/cpu_forward_ab.py"""

import statistics
import time

import jax
import jax.numpy as jnp

import medusa_jax
from medusa_jax.model import KVCache, Transformer, causal_mask

m = medusa_jax.load(heads=False)
lengths = jnp.full((1,), 100, jnp.int32)
fns = {}
for unroll in (1, 30):
    cfg = m.cfg.replace(scan_unroll=unroll)
    tf = Transformer(cfg)

    def fwd(tokens, mask, cache, lengths, tf=tf):
        pos = lengths[:, None] + jnp.arange(tokens.shape[1])[None]
        return tf.apply({"params": m.params}, tokens, pos, mask, cache, lengths)

    fns[unroll] = jax.jit(fwd)
cache = KVCache.zeros(m.cfg, 1, 256)
for L in (1, 2, 5, 17):
    args = (jnp.ones((1, L), jnp.int32), causal_mask(L), cache, lengths)
    for f in fns.values():
        jax.block_until_ready(f(*args))
    res = {u: [] for u in fns}
    for _ in range(7):
        for u, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            res[u].append(time.perf_counter() - t0)
    med = {u: statistics.median(v) * 1e3 for u, v in res.items()}
    print(f"L{L}: unroll1 {med[1]:.1f}ms unroll30 {med[30]:.1f}ms ratio {med[30] / med[1]:.2f}", flush=True)
