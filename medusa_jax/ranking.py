"""The heads' candidate order, one rule for the decode loop and the step simulator: best logit first, equal logits
by lower column (token id, or draft-vocabulary column) first, as `jax.lax.top_k` orders them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_candidates(logits: jax.Array, k: int) -> jax.Array:
    """logits `[..., V]` -> the columns `[..., k]` of the k best, rank 0 first."""
    return jax.lax.top_k(logits, k)[1]


def candidate_rank(logits: jax.Array, cols: jax.Array) -> jax.Array:
    """logits `[..., V]`, columns `[...]` -> each column's rank `[...]` in `top_candidates`' order (0 = best)."""
    target = jnp.take_along_axis(logits, cols[..., None], axis=-1)
    lower = jnp.arange(logits.shape[-1]) < cols[..., None]
    return ((logits > target) | ((logits == target) & lower)).sum(-1)


__all__ = ["candidate_rank", "top_candidates"]
