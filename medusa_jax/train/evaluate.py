"""Dev-set evaluation: each head's top-1 / top-5 accuracy on the dev answers and, for Medusa-2, how far the trained
backbone moved from the original (KL and greedy agreement)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import sharding as sh
from medusa_jax.config import ModelConfig
from medusa_jax.feature_drafter import is_feature
from medusa_jax.heads import base_lm_head, root_embedding, uses_root
from medusa_jax.train.backbone import current_backbone
from medusa_jax.train.config import Config
from medusa_jax.train.feature_loss import feature_counts
from medusa_jax.train.losses import base_logits, eval_counts, forward_hidden, jnp_roots, jnp_targets, path_embedding


@functools.partial(jax.jit, static_argnums=0)
def _flat_counts(dtype, hd, lm, emb, x, t, w, r):
    """Per-head (top-1 hits, top-5 hits, count) `[3, K]` on precomputed hidden states `x` `[M, E]`."""
    root_emb = root_embedding({"embed": emb}, r) if uses_root(hd) else None
    path_emb = path_embedding({"embed": emb}, hd, t)
    return jnp.stack(eval_counts(hd, x, lm, t, w, dtype, root_emb=root_emb, path_emb=path_emb))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _seq_counts(mc: ModelConfig, k: int, bb, hd, x, m):
    """Per-head (top-1 hits, top-5 hits, count) `[3, K]` on sequences `x`, `m` `[B, L]`."""
    hidden = forward_hidden(mc, bb, x)
    t, w = jnp_targets(x, m, k)
    root_emb = root_embedding(bb, jnp_roots(x)) if uses_root(hd) else None
    path_emb = path_embedding(bb, hd, t)
    return jnp.stack(
        eval_counts(hd, hidden, base_lm_head(bb), t, w, mc.jnp_dtype, root_emb=root_emb, path_emb=path_emb)
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _feature_counts(mc: ModelConfig, k: int, bb, hd, x, m):
    """A feature drafter's per-depth (top-1 hits, top-5 hits, count) `[3, K]` at every position of `x`, `m`."""
    return feature_counts(mc, hd, bb, forward_hidden(mc, bb, x), x, m, k)


@functools.partial(jax.jit, static_argnums=0)
def _drift(mc: ModelConfig, student, teacher, x, m):
    """(Σ KL(p_original ‖ p_trained), Σ [argmax equal], count) over the answer positions' next-token predictions."""
    w = m[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(base_logits(mc, student, forward_hidden(mc, student, x))[:, :-1])
    tlogp = jax.nn.log_softmax(base_logits(mc, teacher, forward_hidden(mc, teacher, x))[:, :-1])
    kl = (jnp.exp(tlogp) * (tlogp - logp)).sum(-1)
    same = jnp.argmax(logp, -1) == jnp.argmax(tlogp, -1)
    return jnp.stack([(kl * w).sum(), (same * w).sum(), w.sum()])


def evaluate(cfg: Config, mc: ModelConfig, trainable, frozen, dev, mesh, flat: bool, batch_rows: int = 8) -> dict:
    """Per-head top-1 / top-5 accuracy on the dev answers (dev arrays are replicated on every device); for Medusa-2
    also `kl`, the mean KL(p_original ‖ p_trained) of the next-token distributions over the answer positions, and
    `agree`, the fraction of those positions where both models' greedy token is the same."""
    rep = sh.replicated(mesh)
    dev = tuple(sh.shard_global(np.asarray(x), rep) for x in dev)
    k = cfg.heads.num_heads
    heads = trainable["heads"]
    teacher = None
    if flat:
        h, tg, ws, rt = dev
        lm = sh.shard_global(np.asarray(base_lm_head(frozen["backbone"])), rep)
        emb = frozen["backbone"]["embed"]
        tot = np.zeros((3, k))
        for i in range(0, len(h), 512):
            sl = slice(i, i + 512)
            tot += np.asarray(jax.device_get(_flat_counts(mc.jnp_dtype, heads, lm, emb, h[sl], tg[sl], ws[sl], rt[sl])))
    else:
        ids, mask = dev
        backbone = current_backbone(cfg, trainable, frozen)
        # Medusa-2: how far the trained backbone moved from the original on the dev answers
        teacher = frozen.get("backbone") if cfg.train.mode == "medusa2" else None
        tot, drift = np.zeros((3, k)), np.zeros(3)
        counts = _feature_counts if is_feature(heads) else _seq_counts
        heads = dict(heads, draft=frozen["draft"]) if "draft" in frozen else heads  # a drafter's draft vocabulary
        batch_rows = 1 if is_feature(heads) else batch_rows  # every position at every depth: [K, 1, L, V] logits
        for i in range(0, len(ids), batch_rows):
            x, m = ids[i : i + batch_rows], mask[i : i + batch_rows]
            tot += np.asarray(jax.device_get(counts(mc, k, backbone, heads, x, m)))
            if teacher is not None:
                drift += np.asarray(jax.device_get(_drift(mc, backbone, teacher, x, m)))
    n = np.maximum(tot[2], 1)
    out = {"top1": (tot[0] / n).round(4).tolist(), "top5": (tot[1] / n).round(4).tolist(), "positions": int(tot[2][0])}
    if teacher is not None:
        out.update(kl=round(float(drift[0] / max(drift[2], 1)), 5), agree=round(float(drift[1] / max(drift[2], 1)), 4))
    return out
