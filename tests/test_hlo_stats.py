"""Hardware-independent proxies of the compiled decode step (no device run)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medusa_jax.config import ModelConfig
from medusa_jax.hlo_stats import step_stats, while_depth

SMALL = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=32, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip


def test_while_depth_counts_nested_loops():
    def inner(x):
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2.0), (0, x))[1]

    def outer(x):
        return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, inner(c[1])), (0, x))[1]

    x = jnp.ones(4)
    assert while_depth(jax.jit(outer).lower(x).compile().as_text()) == 2
    assert while_depth(jax.jit(inner).lower(x).compile().as_text()) == 1
    assert while_depth(jax.jit(lambda x: x * 2).lower(x).compile().as_text()) == 0


def test_ar_step_proxies():
    """The layer loop is one while loop (none when unrolled), and an unrolled AR step accesses at most 1.5x the bytes
    it must read (params + cache): no copy of each layer's weights or of the whole cache per step."""
    scanned = step_stats(ModelConfig(**SMALL), batch=1, slots=256)
    assert scanned["while_depth"] == 1
    s = step_stats(ModelConfig(**SMALL, scan_unroll=SMALL["num_layers"]), batch=1, slots=256)
    assert s["while_depth"] == 0 and s["fusions"] > 0
    assert s["param_bytes"] == sum(
        n * 4 for n in (4096 * 128 * 2, 2 * (128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 256 + 2 * 128), 128)
    )
    assert 0.5 < s["bytes_ratio"] <= 1.5, s
