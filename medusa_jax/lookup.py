"""Context lookup drafts (prompt-lookup decoding) for a tree's lookup chain.

Small models repeat themselves and their prompts: names, list markers, whole phrases. The draft for the N nodes of
the chain is what followed the latest earlier occurrence of the context's last n-gram (n = `NGRAM` down to 1, the
longest that occurs wins), the root included as the context's last token. It costs a few integer compares over the
token buffer, runs inside the jitted loop, and is verified like any other tree path, so the output does not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NGRAM = 3  # longest n-gram matched (3, 2, then 1): on SmolLM2's dev answers n = 1..4 draft equally well
DEFAULT_LOOKUP = 10  # lookup-chain nodes when the caller names no tree (docs/BENCHMARKS.md)


def lookup_draft(seq: jax.Array, lengths: jax.Array, root: jax.Array, size: int, ngram: int = NGRAM):
    """seq `[B, S]` the tokens so far by cache slot (-1 where unknown; slots >= lengths are ignored), lengths `[B]`,
    root `[B]` (the next token, at slot `lengths`). Returns (draft `[B, size]` int32, valid `[B, size]` bool): the
    tokens after the latest earlier occurrence of the last n-gram ending with the root; a slot with no draft token
    holds the root and is invalid (never accepted)."""
    b, s = seq.shape
    rows = jnp.arange(b)
    ctx = seq.at[rows, lengths].set(root, mode="drop")
    pos = jnp.arange(s)[None, :]
    follow = jnp.full((b,), -1, jnp.int32)  # slot of the first draft token (-1: no match yet)
    for n in range(ngram, 0, -1):
        first = lengths - n + 1  # slot of the pattern's first token
        match = (pos + n <= lengths[:, None]) & (first >= 0)[:, None]  # the occurrence ends before the root's slot
        for j in range(n):
            want = jnp.take_along_axis(ctx, jnp.clip(first + j, 0, s - 1)[:, None], axis=1)  # [B, 1]
            here = jnp.concatenate([ctx[:, j:], jnp.full((b, j), -1, ctx.dtype)], axis=1)
            match = match & (here == want) & (want >= 0)
        latest = jnp.max(jnp.where(match, pos, -1), axis=1)
        follow = jnp.where((follow < 0) & (latest >= 0), latest + n, follow)
    slots = follow[:, None] + jnp.arange(size)[None, :]  # [B, size]
    draft = jnp.take_along_axis(ctx, jnp.clip(slots, 0, s - 1), axis=1)
    valid = (follow >= 0)[:, None] & (slots <= lengths[:, None]) & (draft >= 0)
    valid = jnp.cumprod(valid.astype(jnp.int32), axis=1).astype(bool)  # a chain: nothing after a gap
    return jnp.where(valid, draft, root[:, None]).astype(jnp.int32), valid


def write_tokens(seq: jax.Array, lengths: jax.Array, tokens: jax.Array, count: jax.Array) -> jax.Array:
    """seq `[B, S]` with `tokens[b, :count[b]]` (`tokens` `[B, T]`) written at slots `lengths[b]` on."""
    b, t = tokens.shape
    slot = lengths[:, None] + jnp.arange(t)[None, :]
    slot = jnp.where(jnp.arange(t)[None, :] < count[:, None], slot, seq.shape[1])  # out of range: dropped
    return seq.at[jnp.arange(b)[:, None], slot].set(tokens, mode="drop")


__all__ = ["DEFAULT_LOOKUP", "NGRAM", "lookup_draft", "write_tokens"]
