"""Pieces every decode shares: bucketed sizes, the (chunked) prefill, the vocabulary projection, EOS and output
writes. The decode loop itself is `medusa_decode` (plain decoding is its root-only tree).

Prompts are right-padded to a bucketed length; each row has its own length, so no row attends to padding.
New token i of row b sits at cache slot (and position) `lengths[b] + i`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medusa_jax.config import ModelConfig
from medusa_jax.model import KVCache, Transformer, causal_mask


def bucket(n: int, minimum: int = 32) -> int:
    """Round a length up to a power of two (at least `minimum`), so new lengths reuse compiled code."""
    b = minimum
    while b < n:
        b *= 2
    return b


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, tokens.dtype))


PREFILL_SCORES_BYTES = 32 << 20  # one prefill pass's attention scores `[B, H, T, S]` (float32) may take this much,
PREFILL_KV_FRACTION = 1 / 16  # or this fraction of the KV cache when larger


def prefill_chunk(cfg: ModelConfig, batch: int, tokens: int, slots: int) -> int:
    """Prompt tokens per prefill pass: all `tokens` when their attention scores fit the budget (the larger of
    `PREFILL_SCORES_BYTES` and `PREFILL_KV_FRACTION` of the KV cache; or when they do not split evenly), else the
    largest power of two (at least 16) that fits."""
    kv = 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * cfg.jnp_dtype.itemsize
    budget = max(PREFILL_SCORES_BYTES, kv * PREFILL_KV_FRACTION)
    per_token = batch * cfg.num_heads * slots * 4
    if tokens * per_token <= budget:
        return tokens
    c = 16
    while 2 * c < tokens and 2 * c * per_token <= budget:
        c *= 2
    return tokens if tokens % c else c


def prefill_into(cfg: ModelConfig, params, tokens, lengths, cache: KVCache, start, chunk: int | None = None, mesh=None,
                 each_chunk=None, aux=None):  # fmt: skip
    """Write the K/V of tokens `[B, T]` (right-padded; `lengths` `[B]` real tokens) into `cache` at slots (and
    positions) `start` on (`[B]`, or a scalar for all rows). Long prompts run in chunks of `chunk` tokens (default
    `prefill_chunk`), so attention never holds more than `[B, H, chunk, S]` scores.

    mesh: the decoding mesh the cache is sharded over (`Transformer.mesh`). each_chunk: `(aux, off, hidden) -> aux`,
    called on every chunk with its offset in `tokens` and its hidden states `[B, c, E]` (a stateful drafter's writes:
    no `[B, T, E]` buffer of every hidden state is kept). Returns (hidden at each row's last token `[B, E]`, cache),
    and with `each_chunk` the final `aux` third."""
    model = Transformer(cfg, mesh)
    b, t = tokens.shape
    c = chunk or prefill_chunk(cfg, b, t, cache.slots)
    c = t if c >= t or t % c else c
    row_start = jnp.broadcast_to(start, (b,))

    def run(cache, aux, off):
        toks = jax.lax.dynamic_slice_in_dim(tokens, off, c, axis=1)
        positions = row_start[:, None] + off + jnp.arange(c)[None, :]
        hidden, cache = model.apply({"params": params}, toks, positions, causal_mask(c), cache, start + off)
        last = jnp.take_along_axis(hidden, jnp.clip(lengths - 1 - off, 0, c - 1)[:, None, None], axis=1)[:, 0]
        if each_chunk is not None:
            aux = each_chunk(aux, off, hidden)
        return cache, aux, last

    if c == t:
        cache, aux, last = run(cache, aux, 0)
    else:

        def body(carry, off):
            cache, aux, last = carry
            cache, aux, here = run(cache, aux, off)
            mine = (lengths - 1 >= off) & (lengths - 1 < off + c)
            return (cache, aux, jnp.where(mine[:, None], here, last)), None

        init = (cache, aux, jnp.zeros((b, cfg.hidden_size), cfg.jnp_dtype))
        (cache, aux, last), _ = jax.lax.scan(body, init, jnp.arange(0, t, c))
    return (last, cache, aux) if each_chunk is not None else (last, cache)


def prefill(cfg: ModelConfig, params, tokens: jax.Array, lengths: jax.Array, slots: int):
    """tokens `[B, P]` right-padded, lengths `[B]` -> (hidden at each row's last prompt token `[B, E]`, cache)."""
    cache = KVCache.zeros(cfg, tokens.shape[0], slots)
    return prefill_into(cfg, params, tokens, lengths, cache, jnp.int32(0))


def lm_logits(cfg: ModelConfig, params, hidden: jax.Array) -> jax.Array:
    model = Transformer(cfg)
    return model.apply({"params": params}, hidden, method=model.logits)


def append_tokens(out, num_out, tokens, counts, live):
    """Write `tokens[b, :counts[b]]` at `out[b, num_out[b]:]` for live rows. tokens `[B, n]`."""
    n = tokens.shape[1]
    cols = num_out[:, None] + jnp.arange(n)[None, :]
    ok = live[:, None] & (jnp.arange(n)[None, :] < counts[:, None]) & (cols < out.shape[1])
    cols = jnp.where(ok, cols, out.shape[1])  # out of range -> dropped
    rows = jnp.broadcast_to(jnp.arange(out.shape[0])[:, None], cols.shape)
    return out.at[rows, cols].set(tokens, mode="drop")
