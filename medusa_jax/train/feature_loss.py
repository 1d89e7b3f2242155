"""Training a feature drafter (`medusa_jax.feature_drafter`): the "training-time test" unroll from a few anchors per
row, cross-entropy at every depth against the answer's tokens (optionally mixed with the base model's own
distribution, as the heads' soft labels). Shapes: ids/mask `[B, L]`, A anchors per row, K depths, V vocabulary."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medusa_jax import feature_drafter as fd
from medusa_jax.heads import draft_columns


def sample_anchors(mask, count: int, key):
    """Up to `count` distinct positions per row whose depth-1 target (token t+2) is an answer token, drawn at random
    -> (anchors `[B, A]`, valid `[B, A]`: false where the row has fewer)."""
    b, length = mask.shape
    ok = jnp.concatenate([mask[:, 2:] > 0, jnp.zeros((b, min(2, length)), bool)], axis=1)
    score = jnp.where(ok, jax.random.gumbel(key, (b, length)), -jnp.inf)
    top, anchors = jax.lax.top_k(score, min(count, length))
    return anchors.astype(jnp.int32), jnp.isfinite(top)


def depth_targets(ids, mask, anchors, valid, depth: int):
    """Level k's (1-based) targets at each anchor t: token t+k+1 and its weight (an answer token) -> `[K, B, A]` x 2."""
    b = ids.shape[0]
    pad = jnp.zeros((b, depth + 2), ids.dtype)
    ids_p, mask_p = jnp.concatenate([ids, pad], 1), jnp.concatenate([mask, pad.astype(mask.dtype)], 1)
    idx = anchors[None] + jnp.arange(2, depth + 2)[:, None, None]  # [K, B, A]
    take = lambda a: jax.vmap(lambda i: jnp.take_along_axis(a, i, axis=1))(idx)  # noqa: E731
    return take(ids_p), take(mask_p).astype(jnp.float32) * valid[None]


def feature_loss(mc, drafter, backbone, hidden, ids, mask, depth, decay, anchors, valid, teacher=None, soft=0.0):
    """-> (Σ_k decay^(k-1) CE_k, per-depth loss `[K]`, per-depth top-1 `[K]`). hidden `[B, L, E]` the backbone's
    features; teacher: the base logits `[B, L, V]` (soft labels: its distribution over token t+k+1 at t+k)."""
    g = fd.unroll(mc, drafter, backbone, hidden, ids, depth, anchors)  # [K, B, A, E]
    logits, cols = fd.vocab_logits(drafter, backbone, g, mc.jnp_matmul_dtype)  # [K, B, A, Vd]
    tgt, w = depth_targets(ids, mask, anchors, valid, depth)
    if cols is not None:  # a draft vocabulary: targets outside it count as misses, not as loss
        tgt = draft_columns(cols, mc.vocab_size)[tgt]
        w = w * (tgt >= 0)
        tgt = jnp.maximum(tgt, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    nll = logz - jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    if teacher is not None and soft:
        pos = jnp.minimum(anchors[None] + jnp.arange(1, depth + 1)[:, None, None], ids.shape[1] - 1)
        t_logits = jax.vmap(lambda i: jnp.take_along_axis(teacher, i[..., None], axis=1))(pos)  # [K, B, A, V]
        if cols is not None:
            t_logits = t_logits[..., cols]
        p_t = jax.nn.softmax(jax.lax.stop_gradient(t_logits).astype(jnp.float32), axis=-1)
        nll = (1.0 - soft) * nll + soft * (logz - (p_t * logits).sum(-1))
    denom = jnp.maximum(w.sum((1, 2)), 1.0)
    per = (nll * w).sum((1, 2)) / denom
    acc = ((jnp.argmax(logits, -1) == tgt) * w).sum((1, 2)) / denom
    lam = decay ** jnp.arange(depth, dtype=jnp.float32)
    return (lam * per).sum(), per, acc


def feature_counts(mc, drafter, backbone, hidden, ids, mask, depth: int, topk: int = 5):
    """Dev counts at every position: per depth (top-1 hits, top-k hits, count) `[3, K]`."""
    b, length = ids.shape
    anchors = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    g = fd.unroll(mc, drafter, backbone, hidden, ids, depth, anchors)
    logits, cols = fd.vocab_logits(drafter, backbone, g, mc.jnp_matmul_dtype)
    tgt, w = depth_targets(ids, mask, anchors, jnp.ones((b, length), bool), depth)
    if cols is not None:
        tgt = draft_columns(cols, mc.vocab_size)[tgt]
    picked = jnp.take_along_axis(logits, jnp.maximum(tgt, 0)[..., None], axis=-1)
    rank = jnp.where(tgt >= 0, (logits > picked).sum(-1), logits.shape[-1])
    return jnp.stack([((rank < 1) * w).sum((1, 2)), ((rank < topk) * w).sum((1, 2)), w.sum((1, 2))])
