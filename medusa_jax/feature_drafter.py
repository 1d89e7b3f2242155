"""A feature-level drafter (EAGLE's kind): one decoder layer that predicts the backbone's next final-norm feature
from the features and tokens so far, autoregressively down the tree.

Entry i (sequence position i) fuses the backbone's feature f_i with the token after it:
`x_i = f_i + [e(t_{i+1}); f_i] W + b` (W zero at init). One Llama decoder layer (the backbone's layer shapes; init
from its last layer with the output projections zeroed, so it starts as the identity) runs causally over the entries
with RoPE at their positions; its output at entry i, g_{i+1}, is the predicted feature f_{i+1}, and the backbone's
(tied) vocabulary projection of it, over the draft vocabulary when one is attached, ranks token t_{i+2}.

Drafting (`FeatureState` in the decode loop's carry): the drafter keeps its own one-layer K/V cache `[B, S, KH, D]`
of true entries (backbone features of accepted tokens). Each step first writes the entries the last step accepted,
the last one completed with the new root (one block forward, which also gives depth 1's feature); then depth by
depth, each tree node with children runs the layer on `fuse(parent's predicted feature, its own token)` at its
position, attending to the cache and its own path's entries: its children are that node's own top-k.

Training (`unroll`, "training-time test"): level 1 is the causal pass over the true entries; level k feeds each
position's level k-1 prediction with the true token t_{i+k} and attends to the true prefix and the same anchor's
earlier levels: the inputs the drafter sees at depth k in the decode loop on the accepted path.

Params: `feature/fuse/{kernel [2E, E], bias [E]}`, `feature/layer/...` (a `medusa_jax.model.DecoderLayer`'s
params, unstacked), optionally `draft/{ids [Vd], kernel [E, Vd]}` (`heads.attach_draft_vocab`).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.config import ModelConfig
from medusa_jax.heads import base_lm_head, root_embedding
from medusa_jax.model import apply_rope, matmul, rope_tables

FEATURE = "feature"


def is_feature(params: dict | None) -> bool:
    """Whether these are a feature drafter's params."""
    return params is not None and FEATURE in params


def init_feature_drafter(backbone: dict, seed: int = 0, scale: float = 0.0, dtype=jnp.float32) -> dict:
    """A new drafter from the backbone's params: its last layer with `o_proj` and `down_proj` zero (the identity) and
    the fuse weights zero (`scale=0`), so it starts by predicting each feature as itself. `scale > 0`: every weight
    perturbed by N(0, scale²) (tests of the decode loop)."""
    rng = np.random.default_rng(seed)
    layer = jax.tree.map(lambda x: np.array(x[-1], np.float32), backbone["layers"])
    if not scale:
        layer["attn"]["o_proj"]["kernel"][:] = 0.0
        layer["mlp"]["down_proj"]["kernel"][:] = 0.0
    e = layer["mlp"]["down_proj"]["kernel"].shape[-1]
    fuse = {"kernel": np.zeros((2 * e, e), np.float32), "bias": np.zeros((e,), np.float32)}
    tree = {"fuse": fuse, "layer": layer}
    if scale:
        tree = jax.tree.map(lambda x: x + rng.normal(0.0, scale, x.shape).astype(np.float32), tree)
    return {FEATURE: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)}


def _dense(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    y = matmul(cfg, "...e,ef->...f", x, p["kernel"])
    return y + p["bias"].astype(jnp.float32) if "bias" in p else y


def _norm(cfg: ModelConfig, scale: jax.Array, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.rms_norm_eps) * scale.astype(jnp.float32)


def fuse(cfg: ModelConfig, params: dict, feat: jax.Array, emb: jax.Array) -> jax.Array:
    """feat, emb `[..., E]` (a feature and the embedding of the token after it) -> the entry `[..., E]` (float32)."""
    fp = params[FEATURE]["fuse"]
    e = emb.shape[-1]
    y = matmul(cfg, "...e,ef->...f", emb, fp["kernel"][:e]) + matmul(cfg, "...e,ef->...f", feat, fp["kernel"][e:])
    return feat.astype(jnp.float32) + y + fp["bias"].astype(jnp.float32)


def project(cfg: ModelConfig, params: dict, x: jax.Array, positions: jax.Array):
    """Entries x `[B, T, E]` at positions `[B, T]` -> q `[B, T, H, D]`, k, v `[B, T, KH, D]` (float32, RoPE'd)."""
    lp = params[FEATURE]["layer"]
    b, t, _ = x.shape
    h = _norm(cfg, lp["input_norm"]["scale"], x)
    q = _dense(cfg, lp["attn"]["q_proj"], h).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = _dense(cfg, lp["attn"]["k_proj"], h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = _dense(cfg, lp["attn"]["v_proj"], h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    cos, sin = rope_tables(cfg, positions)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend(q, ks, vs, mask, ko=None, vo=None) -> jax.Array:
    """q `[B, Q, H, D]` over shared keys/values ks, vs `[B, KH, S, D]` where mask `[B, Q, S]`, and (optionally) each
    query's own ko, vo `[B, Q, M, KH, D]` (all seen) -> `[B, Q, H * D]` (float32)."""
    b, nq, h, d = q.shape
    kh = ks.shape[1]
    q = q.reshape(b, nq, kh, h // kh, d).astype(jnp.float32)
    prec = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bqkgd,bksd->bqkgs", q, ks.astype(jnp.float32), precision=prec) / math.sqrt(d)
    s = jnp.where(mask[:, :, None, None, :], s, -1e30)
    if ko is not None and ko.shape[2]:
        so = jnp.einsum("bqkgd,bqmkd->bqkgm", q, ko.astype(jnp.float32), precision=prec) / math.sqrt(d)
        s = jnp.concatenate([s, so], axis=-1)
    p = jax.nn.softmax(s, axis=-1)
    n = ks.shape[2]
    out = jnp.einsum("bqkgs,bksd->bqkgd", p[..., :n], vs.astype(jnp.float32), precision=prec)
    if ko is not None and ko.shape[2]:
        out = out + jnp.einsum("bqkgm,bqmkd->bqkgd", p[..., n:], vo.astype(jnp.float32), precision=prec)
    return out.reshape(b, nq, h * d)


def finish(cfg: ModelConfig, params: dict, x: jax.Array, attn: jax.Array) -> jax.Array:
    """The layer's rest: entries x `[..., E]` + o_proj(attn), then + MLP -> the predicted features `[..., E]`."""
    lp = params[FEATURE]["layer"]
    x = x + _dense(cfg, lp["attn"]["o_proj"], attn)
    h = _norm(cfg, lp["post_attn_norm"]["scale"], x)
    m = lp["mlp"]
    return x + _dense(cfg, m["down_proj"], jax.nn.silu(_dense(cfg, m["gate_proj"], h)) * _dense(cfg, m["up_proj"], h))


def vocab_logits(params: dict, backbone: dict, g: jax.Array, dtype="float32") -> tuple[jax.Array, jax.Array | None]:
    """Predicted features `[..., E]` -> (float32 logits `[..., Vd]`, the Vd columns' token ids or None: the full
    vocabulary through the backbone's output projection)."""
    if "draft" in params:
        kernel, ids = params["draft"]["kernel"], params["draft"]["ids"]
    else:
        kernel, ids = base_lm_head(backbone), None
    out = jnp.einsum("...e,ev->...v", g.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    return out, ids


def embed(backbone: dict, tokens: jax.Array) -> jax.Array:
    """Token ids `[...]` (-1: none, as 0) -> their input embeddings `[..., E]`."""
    return root_embedding(backbone, jnp.maximum(tokens, 0))


def shifted(tokens: jax.Array, by: int) -> jax.Array:
    """tokens `[B, T]` -> `[B, T]` with token t+by at t (0 past the end)."""
    pad = jnp.zeros((tokens.shape[0], by), tokens.dtype)
    return jnp.concatenate([tokens, pad], axis=1)[:, by : by + tokens.shape[1]]


def unroll(cfg: ModelConfig, params: dict, backbone: dict, feats, tokens, depth: int, anchors=None) -> jax.Array:
    """Teacher-forced drafting ("training-time test"). feats `[B, T, E]` (the backbone's features), tokens `[B, T]`,
    anchors `[B, A]` (positions to draft from; None: every position) -> predicted features `[depth, B, A, E]`:
    level k at anchor t is what the decode loop's depth-k node on the accepted path computes when the cache ends at
    t (its logits rank token t+k+1). Every position's entry is a key; only the anchors' levels are computed."""
    b, t, _ = feats.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    anchors = pos if anchors is None else anchors.astype(jnp.int32)
    padded = jnp.concatenate([tokens, jnp.zeros((b, depth + 1), tokens.dtype)], axis=1)
    x = fuse(cfg, params, feats, embed(backbone, shifted(tokens, 1)))
    q, k, v = project(cfg, params, x, pos)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KH, T, D]
    seen = jnp.arange(t)[None, None, :] <= anchors[:, :, None]  # [B, A, T]: the true prefix
    at = lambda a: jnp.take_along_axis(a, anchors.reshape(b, -1, *(1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    g = finish(cfg, params, at(x), attend(at(q), k, v, seen))
    outs, ko, vo = [g], [], []
    for level in range(2, depth + 1):
        y = fuse(cfg, params, g, embed(backbone, jnp.take_along_axis(padded, anchors + level, axis=1)))
        qy, ky, vy = project(cfg, params, y, anchors + level - 1)
        ko.append(ky)
        vo.append(vy)
        g = finish(cfg, params, y, attend(qy, k, v, seen, jnp.stack(ko, 2), jnp.stack(vo, 2)))
        outs.append(g)
    return jnp.stack(outs)


@flax.struct.dataclass
class FeatureState:
    """The drafter's part of the decode loop's carry. B rows, S slots, P = the tree's depth + 1."""

    k: jax.Array  # [B, KH, S, D] the drafter's keys: entry i (true features) at slot i (slots last but one: a
    v: jax.Array  # [B, KH, S, D]  TPU pads the last two dimensions to its tiles)
    feats: jax.Array  # [B, P, E] pending: the features of the last accepted tokens (entries not yet written)
    tokens: jax.Array  # [B, P] the token after each pending feature (the last one is the next root: unknown yet)
    count: jax.Array  # [B] pending entries (they sit at positions lengths - count .. lengths - 1)


def empty_state(cfg: ModelConfig, batch: int, slots: int, pending: int) -> FeatureState:
    kv = jnp.zeros((batch, cfg.num_kv_heads, slots, cfg.head_dim), jnp.float32)
    return FeatureState(kv, kv, jnp.zeros((batch, pending, cfg.hidden_size), jnp.float32),
                        jnp.zeros((batch, pending), jnp.int32), jnp.zeros((batch,), jnp.int32))  # fmt: skip


def write_block(cfg, params, backbone, st: FeatureState, start, feats, next_tokens, predict: bool = True):
    """Entries of feats `[B, T, E]` and their next tokens `[B, T]` at positions `start[b] + t`: their K/V written to
    the drafter's cache, each attending to the slots up to its own -> (state, predicted features `[B, T, E]`, or
    None without `predict`: the K/V alone, no attention)."""
    b, t, _ = feats.shape
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    x = fuse(cfg, params, feats, embed(backbone, next_tokens))
    q, k, v = project(cfg, params, x, pos)
    rows = jnp.arange(b)[:, None]
    ck = st.k.at[rows, :, pos].set(k, mode="drop")  # [B, T] rows and slots: k `[B, T, KH, D]` in place
    cv = st.v.at[rows, :, pos].set(v, mode="drop")
    if not predict:  # the prompt's entries: only their K/V are needed, no attention over the cache
        return st.replace(k=ck, v=cv), None
    mask = jnp.arange(ck.shape[2])[None, None, :] <= pos[:, :, None]
    g = finish(cfg, params, x, attend(q, ck, cv, mask))
    return st.replace(k=ck, v=cv), g


def prompt_start(cfg, params, backbone, st: FeatureState, start, tokens) -> FeatureState:
    """Before the backbone's prefill of tokens `[B, T]` at slots `start` `[B]` on: the pending entries before `start`
    (a conversation's earlier turn) completed with the first prompt token and written."""
    j = jnp.arange(st.tokens.shape[1])[None, :]
    done = jnp.where(j == st.count[:, None] - 1, tokens[:, :1], st.tokens)
    st, _ = write_block(cfg, params, backbone, st, start - st.count, st.feats, done, predict=False)
    return st


def prompt_chunk(cfg, params, backbone, st: FeatureState, start, tokens, off, hidden) -> FeatureState:
    """During the prefill: the entries of prompt tokens `off .. off + c - 1` (hidden `[B, c, E]`, the backbone's
    features of that chunk of tokens `[B, T]`) written at positions `start + off` on."""
    nxt = jax.lax.dynamic_slice_in_dim(shifted(tokens, 1), off, hidden.shape[1], axis=1)
    st, _ = write_block(cfg, params, backbone, st, start + off, hidden, nxt, predict=False)
    return st


def prompt_end(st: FeatureState, last) -> FeatureState:
    """After the prefill: the last prompt token's feature `last` `[B, E]` pending (its next token: the root)."""
    feats = jnp.zeros_like(st.feats).at[:, 0].set(last.astype(st.feats.dtype))
    b = last.shape[0]
    return st.replace(feats=feats, tokens=jnp.zeros_like(st.tokens), count=jnp.ones((b,), jnp.int32))


def begin_step(cfg, params, backbone, st: FeatureState, lengths, root) -> tuple[FeatureState, jax.Array]:
    """Step start: the pending entries written, the last one completed with the root `[B]` -> (state, the root's
    predicted feature `[B, E]`: depth 1's)."""
    j = jnp.arange(st.tokens.shape[1])[None, :]
    last = st.count[:, None] - 1
    tokens = jnp.where(j == last, root[:, None], st.tokens)
    st, g = write_block(cfg, params, backbone, st, lengths - st.count, st.feats, tokens)
    return st, jnp.take_along_axis(g, last[:, :, None], axis=1)[:, 0]


def _top(logits: jax.Array, ids, k: int):
    """logits `[..., Vd]` -> (the k best log-probabilities `[..., k]`, their token ids)."""
    logp, idx = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
    return logp, (idx if ids is None else ids[idx]).astype(jnp.int32)


def draft_dynamic(cfg, params, backbone, ck, cv, lengths, g_root, tree, dtype="float32"):
    """A dynamic tree (`medusa_jax.tree.DynamicTree`) drafted after `begin_step` over the drafter's cache ck, cv
    `[B, KH, S, D]` (its first `lengths` `[B]` slots): depth 1 from the root's predicted feature g_root `[B, E]`; at each further depth the `beam` most confident nodes of the last one run the layer on
    `fuse(parent's predicted feature, own token)` at their position, attending to the cache and their own path's
    entries, and draft `topk` children each; the `size` best of all drafts by path score (summed log-probabilities)
    form the tree. -> (tokens `[B, size]`, valid `[B, size]`, parent `[B, size]` (tree node ids, 0 = the root),
    depth `[B, size]`); the nodes are in drafting order (parents first, siblings in rank order)."""
    b, k, w = g_root.shape[0], tree.topk, tree.beam
    logits, ids = vocab_logits(params, backbone, g_root, dtype)
    score, tok = _top(logits, ids, k)  # [B, k]
    scores, tokens, parents, depths = [score], [tok], [jnp.full((b, k), -1, jnp.int32)], [np.full(k, 1, np.int32)]
    front = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))  # the frontier's ids in the pool
    f_score, f_tok = score[:, :w], tok[:, :w]
    f_feat = jnp.broadcast_to(g_root[:, None].astype(jnp.float32), (b, w, g_root.shape[-1]))  # their parents' features
    pk = jnp.zeros((b, w, 0, cfg.num_kv_heads, cfg.head_dim), jnp.float32)  # their paths' entries (K/V)
    pv = pk
    seen = jnp.arange(ck.shape[2])[None, None, :] < lengths[:, None, None]
    mask = jnp.broadcast_to(seen, (b, w, seen.shape[-1]))
    rows = jnp.arange(b)[:, None]
    offset = k
    for d in range(2, tree.head_depth + 1):
        x = fuse(cfg, params, f_feat, embed(backbone, f_tok))  # the frontier's entries, at depth d-1
        q, kk, vv = project(cfg, params, x, jnp.broadcast_to(lengths[:, None] + d - 2, (b, w)))
        pk, pv = jnp.concatenate([pk, kk[:, :, None]], 2), jnp.concatenate([pv, vv[:, :, None]], 2)
        g = finish(cfg, params, x, attend(q, ck, cv, mask, pk, pv))  # [B, W, E]
        logits, ids = vocab_logits(params, backbone, g, dtype)
        score, tok = _top(logits, ids, k)  # [B, W, k]
        score = (f_score[:, :, None] + score).reshape(b, w * k)
        tok = tok.reshape(b, w * k)
        scores.append(score)
        tokens.append(tok)
        parents.append(jnp.repeat(front, k, axis=1))
        depths.append(np.full(w * k, d, np.int32))
        if d < tree.head_depth:  # the next frontier: the beam best of this depth
            f_score, pick = jax.lax.top_k(score, w)
            slot = pick // k  # each one's parent in the frontier
            f_tok = tok[rows, pick]
            f_feat, pk, pv = g[rows, slot], pk[rows, slot], pv[rows, slot]
            front = offset + pick
        offset += w * k
    score, tok, parent = (jnp.concatenate(a, axis=1) for a in (scores, tokens, parents))
    depth = jnp.asarray(np.concatenate(depths))
    keep = jnp.sort(jax.lax.top_k(score, tree.size)[1], axis=1)  # [B, size] pool ids, in drafting order
    node = jnp.full(score.shape, -1, jnp.int32).at[rows, keep].set(jnp.arange(1, tree.size + 1, dtype=jnp.int32))
    par = parent[rows, keep]
    par_node = jnp.where(par < 0, 0, node[rows, jnp.maximum(par, 0)])  # -1: a parent left out (ties only)
    return tok[rows, keep], par_node >= 0, jnp.maximum(par_node, 0), depth[keep]


def end_step(st: FeatureState, hidden, path_nodes, path_tokens, count, live) -> FeatureState:
    """After acceptance: the accepted path's features (hidden `[B, L, E]` at path_nodes `[B, P]`) and next tokens
    (path_tokens `[B, P]` shifted by one) become pending, `count` `[B]` of them (rows not `live` keep theirs)."""
    feats = jnp.take_along_axis(hidden, path_nodes[:, :, None], axis=1).astype(st.feats.dtype)
    tokens = shifted(path_tokens.astype(jnp.int32), 1)
    keep = lambda new, old: jnp.where(live.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
    return st.replace(feats=keep(feats, st.feats), tokens=keep(tokens, st.tokens), count=keep(count, st.count))


__all__ = [
    "FeatureState",
    "begin_step",
    "draft_dynamic",
    "empty_state",
    "end_step",
    "init_feature_drafter",
    "is_feature",
    "prompt_chunk",
    "prompt_end",
    "prompt_start",
    "unroll",
    "vocab_logits",
]


# ------------------------------------------------------------------------------------------- on disk
# torch-layout tensor names (`[out, in]` weights), as EAGLE's drafters name theirs: `fc` fuses [e(t); f]
_LAYER_NAMES = {
    ("attn", "q_proj"): "self_attn.q_proj",
    ("attn", "k_proj"): "self_attn.k_proj",
    ("attn", "v_proj"): "self_attn.v_proj",
    ("attn", "o_proj"): "self_attn.o_proj",
    ("mlp", "gate_proj"): "mlp.gate_proj",
    ("mlp", "up_proj"): "mlp.up_proj",
    ("mlp", "down_proj"): "mlp.down_proj",
}
FEATURE_TENSOR = "fc.weight"  # the tensor that marks a feature drafter's file


def to_tensors(params: dict) -> dict[str, np.ndarray]:
    """A feature drafter's params -> named tensors (torch layout, the params' dtype)."""
    f = params[FEATURE]
    c = np.ascontiguousarray
    out = {"fc.weight": c(np.asarray(f["fuse"]["kernel"]).T), "fc.bias": c(np.asarray(f["fuse"]["bias"]))}
    lp = f["layer"]
    for (group, name), tname in _LAYER_NAMES.items():
        for key, suffix in (("kernel", "weight"), ("bias", "bias")):
            if key in lp[group][name]:
                x = np.asarray(lp[group][name][key])
                out[f"layers.0.{tname}.{suffix}"] = c(x.T if key == "kernel" else x)
    out["layers.0.input_layernorm.weight"] = c(np.asarray(lp["input_norm"]["scale"]))
    out["layers.0.post_attention_layernorm.weight"] = c(np.asarray(lp["post_attn_norm"]["scale"]))
    return out


def from_tensors(tensors: dict[str, np.ndarray]) -> dict:
    """Named tensors (`to_tensors`' layout) -> a feature drafter's params (numpy); KeyError names a missing one."""
    t = lambda name: np.asarray(tensors[name])  # noqa: E731
    layer: dict = {"attn": {}, "mlp": {}}
    for (group, name), tname in _LAYER_NAMES.items():
        layer[group][name] = {"kernel": t(f"layers.0.{tname}.weight").T}
        if f"layers.0.{tname}.bias" in tensors:
            layer[group][name]["bias"] = t(f"layers.0.{tname}.bias")
    layer["input_norm"] = {"scale": t("layers.0.input_layernorm.weight")}
    layer["post_attn_norm"] = {"scale": t("layers.0.post_attention_layernorm.weight")}
    return {FEATURE: {"fuse": {"kernel": t("fc.weight").T, "bias": t("fc.bias")}, "layer": layer}}
