"""Turning logits into tokens: greedy, temperature, top-k, top-p. Sampling knobs are traced scalars (no recompile
when they change); only `greedy` and whether top-k or top-p is on at all are static (without either, no sort)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SamplingParams:
    """Scalars: temperature (> 0 when sampling), top_k (0 = off), top_p (1.0 = off), and top-p's drop mass
    1 - top_p (rounded from double precision, as HF compares it). `filtered` (static, part of the jit key): whether
    top-k or top-p may drop tokens; False skips their vocabulary sort."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    drop_mass: jax.Array
    filtered: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def make(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
        return cls(
            jnp.asarray(max(temperature, 1e-6), jnp.float32),
            jnp.asarray(top_k, jnp.int32),
            jnp.asarray(top_p, jnp.float32),
            jnp.asarray(1.0 - float(top_p), jnp.float32),
            filtered=top_k > 0 or top_p < 1.0,
        )


def process_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Temperature-scaled logits `[..., V]` with everything outside top-k, then top-p, set to -inf.

    The order and cutoffs of Hugging Face's `generate` (temperature, `TopKLogitsWarper`, `TopPLogitsWarper`):
    top-k drops the logits below the k-th largest (ties with it stay); top-p then renormalises what is left,
    walks it from the least likely token up and drops tokens while their cumulative mass is <= 1 - top_p, always
    keeping the most likely one. Among equal logits at the top-p cutoff the lower token id is kept."""
    logits = logits.astype(jnp.float32) / sp.temperature
    if not sp.filtered:
        return logits
    v = logits.shape[-1]
    # ascending order, ties by descending id (so the lower id comes later and survives the cut)
    order = jnp.flip(jnp.argsort(-logits, axis=-1, stable=True), axis=-1)
    asc = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, v), v)
    kth = jnp.take_along_axis(asc, jnp.broadcast_to(v - k, logits.shape[:-1])[..., None], axis=-1)
    below_k = asc < kth
    cum = jnp.cumsum(jax.nn.softmax(jnp.where(below_k, -jnp.inf, asc), axis=-1), axis=-1)
    drop = below_k | ((cum <= sp.drop_mass) & (sp.top_p < 1.0))
    drop = drop.at[..., -1].set(False)
    # the dropped tokens are a prefix of `order`: keep token i iff it sorts at or after the first kept one
    first = jnp.sum(drop, axis=-1, keepdims=True)
    cut_val = jnp.take_along_axis(asc, first, axis=-1)
    cut_id = jnp.take_along_axis(order, first, axis=-1)
    ids = jnp.arange(v)
    keep = (logits > cut_val) | ((logits == cut_val) & (ids <= cut_id))
    return jnp.where(keep, logits, -jnp.inf)


def sample(logits: jax.Array, rng: jax.Array, sp: SamplingParams, greedy: bool) -> jax.Array:
    """logits `[B, V]` -> tokens `[B]` (int32)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, process_logits(logits, sp), axis=-1).astype(jnp.int32)
