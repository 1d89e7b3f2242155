"""The training losses: Medusa heads' cross-entropy (hard or soft labels) and, for Medusa-2, the backbone's CE or
KL to the original model, weighted by lambda0. Shapes: ids/mask `[B, L]`, K heads, V vocabulary."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from medusa_jax.config import ModelConfig
from medusa_jax.feature_drafter import is_feature
from medusa_jax.heads import base_lm_head, heads_logits, is_sequential, root_embedding, uses_root
from medusa_jax.model import Transformer, causal_mask
from medusa_jax.train.backbone import current_backbone
from medusa_jax.train.config import Config
from medusa_jax.train.feature_loss import feature_loss, sample_anchors


def batch_sharded(x, axis: int = 0):
    """`x` constrained to be split over the mesh's (data, fsdp) axes along its batch axis (and the last axis over
    tensor for vocabulary-sized arrays), when the step runs under a mesh: without it, XLA may keep FSDP-sharded
    weights and gather the activations of the whole global batch on every device instead."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "fsdp" not in mesh.axis_names:
        return x
    spec = [None] * x.ndim
    spec[axis] = ("data", "fsdp")
    if x.ndim >= 3 and x.shape[-1] % mesh.shape["tensor"] == 0 and x.shape[-1] > 4 * mesh.shape["tensor"]:
        spec[-1] = "tensor" if x.shape[-1] != x.shape[axis] else None
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def jnp_roots(ids):
    """ids `[B, L]` -> the root token at each position `[B, L]` (teacher forcing: token t+1; 0 after the end)."""
    return jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)


def jnp_targets(ids, mask, k_heads):
    """ids, mask `[B, L]` -> head targets `[B, L, K]` (token t+k+2) and weights (1 where it is an answer token)."""
    b, length = ids.shape
    tg, ws = [], []
    for k in range(k_heads):
        s = k + 2
        pad = jnp.zeros((b, min(s, length)), ids.dtype)
        tg.append(jnp.concatenate([ids[:, s:], pad], axis=1)[:, :length])
        ws.append(jnp.concatenate([mask[:, s:], pad], axis=1)[:, :length])
    return jnp.stack(tg, -1), jnp.stack(ws, -1).astype(jnp.float32)


def heads_loss(heads, hidden, lm_head, tgt, w, decay, dtype, root_emb=None, teacher=None, soft=None, path_emb=None):
    """Σ_k decay^k CE(head_k(h_t), y_{t+k+2}) averaged over weighted positions; also per-head loss and top-1.
    root_emb `[..., E]`: embeddings of the tokens t+1, for root_token heads. With `teacher` (the base model's logits
    `[K, ..., V]` at position t+k+1, i.e. its distribution over y_{t+k+2}) and `soft` `[..., K]` (the weight of the
    teacher's distribution per target, 0 where it is not available), each target's loss is
    (1 - soft) · CE(one-hot y) + soft · CE(softmax(teacher)): self-distillation with soft labels. path_emb
    `[..., K-1, E]`: embeddings of the tokens t+2 .. t+K, for sequential heads (teacher forcing)."""
    logits = heads_logits(heads, hidden, lm_head, dtype, root_emb, path_emb=path_emb)  # [K, ..., V]
    if logits.ndim == 4:
        logits = batch_sharded(logits, 1)
    k = logits.shape[0]
    tgt_k, w_k = jnp.moveaxis(tgt, -1, 0), jnp.moveaxis(w, -1, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt_k[..., None], axis=-1)[..., 0]
    nll = logz - picked
    if teacher is not None:
        p_t = jax.nn.softmax(jax.lax.stop_gradient(teacher).astype(jnp.float32), axis=-1)
        soft_ce = logz - (p_t * logits).sum(-1)
        s_k = jnp.moveaxis(soft, -1, 0)
        nll = (1.0 - s_k) * nll + s_k * soft_ce
    axes = tuple(range(1, nll.ndim))
    denom = jnp.maximum(w_k.sum(axes), 1.0)
    per_head = (nll * w_k).sum(axes) / denom
    acc = ((jnp.argmax(logits, -1) == tgt_k) * w_k).sum(axes) / denom
    lam = decay ** jnp.arange(k, dtype=jnp.float32)
    return (lam * per_head).sum(), per_head, acc


def path_embedding(backbone, heads, tgt):
    """Sequential heads' teacher-forced path inputs: targets `[..., K]` (token ids t+2 .. t+K+1) -> the embeddings of
    tokens t+2 .. t+K `[..., K-1, E]`; None for other heads."""
    return root_embedding(backbone, jnp.maximum(tgt[..., :-1], 0)) if is_sequential(heads) else None


def eval_counts(heads, hidden, lm_head, tgt, w, dtype, topk=5, root_emb=None, path_emb=None):
    """Per-head (top-1 hits, top-5 hits, count) over weighted positions (`tgt` token ids)."""
    logits = heads_logits(heads, hidden, lm_head, dtype, root_emb, path_emb=path_emb)
    tgt_k, w_k = jnp.moveaxis(tgt, -1, 0), jnp.moveaxis(w, -1, 0)
    picked = jnp.take_along_axis(logits, tgt_k[..., None], axis=-1)
    rank = (logits > picked).sum(-1)  # how many tokens score above the target (cheaper than a top-k sort)
    hit1, hit5 = rank < 1, rank < topk
    axes = tuple(range(1, w_k.ndim))
    return (hit1 * w_k).sum(axes), (hit5 * w_k).sum(axes), w_k.sum(axes)


def forward_hidden(mc: ModelConfig, params, ids):
    model = Transformer(mc)
    b, t = ids.shape
    hidden, _ = model.apply({"params": params}, ids, jnp.broadcast_to(jnp.arange(t), (b, t)), causal_mask(t))
    return batch_sharded(hidden)


def base_logits(mc: ModelConfig, params, hidden):
    model = Transformer(mc)
    return batch_sharded(model.apply({"params": params}, hidden, method=model.logits))


def lambda0_at(cfg: Config, step):
    t = cfg.train
    if t.heads_warmup_steps <= 0:
        return jnp.float32(t.lambda0)
    frac = jnp.minimum(1.0, (step.astype(jnp.float32) + 1.0) / t.heads_warmup_steps)
    return t.lambda0 * jnp.sin(0.5 * math.pi * frac)


def jnp_teach(w):
    """Target weights `[B, L, K]` -> where the heads get soft labels `[B, L, K]`: the rule of `flat_tokens` (every
    target but each row's last answer token), so that both training paths compute the same loss."""
    sel = w.sum(-1) > 0
    b, length = sel.shape
    cols = [jnp.concatenate([sel[:, k + 1 :], jnp.zeros((b, min(k + 1, length)), bool)], 1) for k in range(w.shape[-1])]
    return jnp.stack(cols, -1) & (w > 0)


def shifted_teacher(logits, k_heads):
    """Base logits `[B, L, V]` -> head k's soft labels at position t, the base distribution at t+k+1 `[K, B, L, V]`
    (zeros past the end, where no head has a target)."""
    b, length, v = logits.shape
    out = []
    for k in range(k_heads):
        s = min(k + 1, length)
        out.append(jnp.concatenate([logits[:, s:], jnp.zeros((b, s, v), logits.dtype)], axis=1))
    return jnp.stack(out)


def noisy(hidden, scale: float, seed: int, step):
    """hidden `[..., E]` plus Gaussian noise of `scale` times each state's RMS (Hydra++'s input noise: heads that
    tolerate a perturbed hidden state generalise past the states they were trained on); unchanged for scale 0. The
    noise depends on the seed and the step only, so a resumed run draws the same noise."""
    if not scale:
        return hidden
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    h = hidden.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True))
    return (h + scale * rms * jax.random.normal(key, h.shape, jnp.float32)).astype(hidden.dtype)


def make_loss(cfg: Config, mc: ModelConfig, flat: bool):
    k_heads, decay, dtype = cfg.heads.num_heads, cfg.train.decay, mc.jnp_dtype
    soft, noise, seed = cfg.train.distill_weight, cfg.train.hidden_noise, cfg.train.seed

    def loss_fn(trainable, frozen, batch, step):
        heads = trainable["heads"]
        if flat:
            root_emb = root_embedding(frozen, batch["roots"]) if uses_root(heads) else None
            path_emb = root_embedding(frozen, batch["path"]) if is_sequential(heads) else None
            lm = frozen["lm_head"]["kernel"]
            teacher, sw = None, None
            if soft:  # the base model's distribution at t+k+1, from that position's cached hidden state
                teacher = jnp.einsum("bke,ev->kbv", batch["teacher_hidden"].astype(dtype), lm.astype(dtype))
                sw = soft * batch["teach"].astype(jnp.float32)
            hidden = noisy(batch["hidden"], noise, seed, step)
            hl, per, acc = heads_loss(heads, hidden, lm, batch["targets"], batch["weights"], decay, dtype, root_emb,
                                      teacher, sw, path_emb)  # fmt: skip
            return hl, {"heads_loss": hl, "head_loss": per, "head_acc": acc}
        ids, mask = batch["input_ids"], batch["loss_mask"]
        if cfg.train.mode == "medusa1":
            backbone = jax.lax.stop_gradient(frozen["backbone"])
        else:
            backbone = current_backbone(cfg, trainable, frozen)
        # a feature drafter's precomputed features (`inputs.feature_inputs`), else the backbone's forward
        hidden = batch["features"] if "features" in batch else forward_hidden(mc, backbone, ids)
        if is_feature(heads):  # a feature drafter: the training-time-test unroll from random anchors
            heads = dict(heads, draft=frozen["draft"]) if "draft" in frozen else heads
            key = jax.random.fold_in(jax.random.PRNGKey(seed + 1), step)
            anchors, valid = sample_anchors(mask, cfg.train.anchors, key)
            logits = base_logits(mc, backbone, hidden) if soft or cfg.train.mode == "medusa2" else None
            hl, per, acc = feature_loss(mc, heads, backbone, noisy(hidden, noise, seed, step), ids, mask, k_heads,
                                        decay, anchors, valid, logits, soft)  # fmt: skip
            aux = {"heads_loss": hl, "head_loss": per, "head_acc": acc}
            if cfg.train.mode == "medusa1":
                return hl, aux
            return medusa2_loss(cfg, mc, frozen, ids, mask, logits, hl, aux, step)
        tgt, w = jnp_targets(ids, mask, k_heads)
        root_emb = root_embedding(backbone, jnp_roots(ids)) if uses_root(heads) else None
        path_emb = path_embedding(backbone, heads, tgt)
        logits = base_logits(mc, backbone, hidden) if soft or cfg.train.mode == "medusa2" else None
        # soft labels: the (current) backbone's own distribution, which the decode loop verifies against
        teacher = shifted_teacher(logits, k_heads) if soft else None
        hl, per, acc = heads_loss(heads, noisy(hidden, noise, seed, step), base_lm_head(backbone), tgt, w, decay, dtype,
                                  root_emb, teacher, soft * jnp_teach(w) if soft else None, path_emb)  # fmt: skip
        aux = {"heads_loss": hl, "head_loss": per, "head_acc": acc}
        if cfg.train.mode == "medusa1":
            return hl, aux
        return medusa2_loss(cfg, mc, frozen, ids, mask, logits, hl, aux, step)

    return loss_fn


def medusa2_loss(cfg: Config, mc: ModelConfig, frozen, ids, mask, logits, hl, aux, step):
    """Medusa-2's total: the backbone's loss (CE on the data or KL to the original model) + lambda0 * the drafter's."""
    logits = logits[:, :-1]
    w1 = mask[:, 1:].astype(jnp.float32)
    denom = jnp.maximum(w1.sum(), 1.0)
    logp = jax.nn.log_softmax(logits)
    if cfg.train.backbone_loss == "ce":
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        lb = (nll * w1).sum() / denom
    else:
        teacher = jax.lax.stop_gradient(
            base_logits(mc, frozen["backbone"], forward_hidden(mc, frozen["backbone"], ids))[:, :-1]
        )
        tlogp = jax.nn.log_softmax(teacher)
        kl = (jnp.exp(tlogp) * (tlogp - logp)).sum(-1)
        lb = (kl * w1).sum() / denom
    lam0 = lambda0_at(cfg, step)
    aux.update(backbone_loss=lb, lambda0=lam0)
    return lb + lam0 * hl, aux
