"""Turning logits into tokens: greedy, temperature, top-k, top-p. Sampling knobs are traced scalars (no recompile
when they change); only `greedy` is static."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SamplingParams:
    """Scalars: temperature (> 0 when sampling), top_k (0 = off), top_p (1.0 = off)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def make(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
        return cls(
            jnp.asarray(max(temperature, 1e-6), jnp.float32),
            jnp.asarray(top_k, jnp.int32),
            jnp.asarray(top_p, jnp.float32),
        )


def process_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Temperature-scaled logits `[..., V]` with everything outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / sp.temperature
    v = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, v), v)
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (cum_before < sp.top_p) & (jnp.arange(v) < k)
    # the smallest logit that survives both filters
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    cutoff = jnp.maximum(cutoff, kth)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample(logits: jax.Array, rng: jax.Array, sp: SamplingParams, greedy: bool) -> jax.Array:
    """logits `[B, V]` -> tokens `[B]` (int32)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, process_logits(logits, sp), axis=-1).astype(jnp.int32)
