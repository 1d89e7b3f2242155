"""Medusa decoding heads: K heads on the backbone's final-norm hidden state.

Head k (0-based here; the paper's head k+1) predicts the token k+2 positions after the current one, i.e. k+1 past
the base lm_head's next-token guess. Each head is `num_layers` ResBlocks `h + SiLU(W h + b)` (own weights per layer)
then a vocabulary projection: its own (`proj`, initialized from the base lm_head) or the base lm_head itself
(`shared_lm_head`, the reference implementation's "version 2" layout).

`root_token` heads (our extension, after Hydra's sequentially dependent heads) also see the root token: the base
model's next token x_{t+1}, which the decode loop knows before the heads run. Its input embedding enters the first
ResBlock, `h + SiLU(W h + U e(x_{t+1}) + b)` (U zero at init, so a new head starts as a plain Medusa head). Head k
then predicts x_{t+k+2} knowing x_{t+1}; on SmolLM2 this lifts head 1's top-1 accuracy by about a third.

`sequential` heads (Hydra-style, sequentially dependent) go on: head k also sees the tokens drafted at depths
1..k on its own tree path, `h + SiLU(W h + U e(x_{t+1}) + sum_j P_kj e(x_{t+j+1}) + b)` (P zero at init). Each tree
node's children then come from that node's own distribution (`medusa_jax.drafters`); training feeds the base
model's own answer tokens (teacher forcing: the path tokens of head k are the targets of heads 0..k-1).

Params (stacked over heads): `blocks/kernel` `[K, NL, E, E]`, `blocks/bias` `[K, NL, E]`, `proj/kernel` `[K, E, V]`
(absent when shared), `root/kernel` `[K, E, E]` (root_token heads only), `path/kernel` `[K, K-1, E, E]`
(sequential heads only; head k uses `[k, :k]`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    num_heads: int = 5
    num_layers: int = 1
    shared_lm_head: bool = False
    root_token: bool = False
    sequential: bool = False  # head k also sees the path's drafted tokens at depths 1..k (implies root_token)
    feature: bool = False  # a feature drafter (`medusa_jax.feature_drafter`): one decoder layer, any depth

    def to_dict(self):
        return dataclasses.asdict(self)


FEATURE_DEPTH = 16  # the depth of tree a feature drafter drafts (it is autoregressive: trees are cut to this)


def heads_config_of(params: dict) -> HeadsConfig:
    if "feature" in params:
        return HeadsConfig(FEATURE_DEPTH, 1, True, True, False, True)
    k, nl = params["blocks"]["kernel"].shape[:2]
    return HeadsConfig(int(k), int(nl), "proj" not in params, "root" in params, "path" in params)


def base_lm_head(backbone_params: dict) -> jax.Array:
    """The base model's output projection `[E, V]` (the transposed embedding when tied)."""
    if "lm_head" in backbone_params:
        return backbone_params["lm_head"]["kernel"]
    return backbone_params["embed"]["embedding"].T


def uses_root(params: dict | None) -> bool:
    """Whether these heads take the root token's embedding (`root_token` heads)."""
    return params is not None and "root" in params


def is_sequential(params: dict | None) -> bool:
    """Whether these heads take their path's drafted tokens (`sequential` heads)."""
    return params is not None and "path" in params


def path_term(params: dict, path_emb: jax.Array, dtype) -> jax.Array:
    """Teacher-forced path input of every head: path_emb `[..., K-1, E]` (embeddings of the tokens t+2 .. t+K) ->
    `[K, ..., E]`, head k's sum over j < k of `path_emb[j] @ P[k, j]`."""
    p = params["path"]["kernel"].astype(dtype)  # [K, K-1, E, E]
    k = p.shape[0]
    lower = jnp.asarray(np.tril(np.ones((k, max(k - 1, 0)), np.float32), -1), dtype)  # [k, j]: j < k
    return jnp.einsum("...je,kjef->k...f", path_emb.astype(dtype), p * lower[:, :, None, None])


def heads_hidden(
    params: dict,
    hidden: jax.Array,
    dtype=None,
    root_emb: jax.Array | None = None,
    layout=None,
    path_emb: jax.Array | None = None,
) -> jax.Array:
    """hidden `[..., E]` (and for root_token heads the root token's input embedding `root_emb` `[..., E]`; for
    sequential heads `path_emb` `[..., K-1, E]`, the embeddings of tokens t+2 .. t+K) -> per-head features after the
    ResBlocks `[K, ..., E]`. layout: applied to each ResBlock's output (on a device mesh, a constraint that gathers
    the few `[K, ..., E]` activations, so that the next contraction over E, and the vocabulary projection split by
    vocabulary, run without moving weights)."""
    dtype = dtype or hidden.dtype
    if is_sequential(params) and path_emb is None:
        raise ValueError("these are sequential heads: pass the path tokens' embeddings as path_emb")
    w = params["blocks"]["kernel"].astype(dtype)
    bias = params["blocks"]["bias"].astype(dtype)
    if uses_root(params) and root_emb is None:
        raise ValueError("these Medusa heads take the root token (root_token heads): pass its embedding as root_emb")
    x = jnp.broadcast_to(hidden.astype(dtype), (w.shape[0], *hidden.shape))
    for j in range(w.shape[1]):
        y = jnp.einsum("k...e,kef->k...f", x, w[:, j]) + bias[:, j].reshape((w.shape[0],) + (1,) * (x.ndim - 2) + (-1,))
        if j == 0 and uses_root(params):
            y = y + jnp.einsum("...e,kef->k...f", root_emb.astype(dtype), params["root"]["kernel"].astype(dtype))
            if is_sequential(params):
                y = y + path_term(params, path_emb, dtype)
        x = x + jax.nn.silu(y)
        if layout is not None:
            x = layout(x)
    return x


def root_embedding(backbone_params: dict, root: jax.Array) -> jax.Array:
    """Root token ids `[...]` -> their input embeddings `[..., E]` (what root_token heads take)."""
    return jnp.take(backbone_params["embed"]["embedding"], root, axis=0)


def sequence_roots(tokens: jax.Array, logits: jax.Array) -> jax.Array:
    """The root token at every position of a teacher-forced sequence: the next input token, and at the last position
    the base model's argmax. tokens `[..., T]`, base logits `[..., T, V]` -> `[..., T]`."""
    last = jnp.argmax(logits[..., -1:, :], axis=-1).astype(tokens.dtype)
    return jnp.concatenate([tokens[..., 1:], last], axis=-1)


def sequence_path(tokens: jax.Array, num_heads: int) -> jax.Array:
    """Teacher-forced path tokens of sequential heads: tokens `[..., T]` -> `[..., T, K-1]`, at t the tokens t+2 ..
    t+K (0 past the end)."""
    t = tokens.shape[-1]
    padded = jnp.concatenate([tokens, jnp.zeros((*tokens.shape[:-1], num_heads + 1), tokens.dtype)], axis=-1)
    return jnp.stack([padded[..., j + 2 : j + 2 + t] for j in range(num_heads - 1)], axis=-1).reshape(
        *tokens.shape, num_heads - 1
    )


def heads_logits(
    params: dict, hidden: jax.Array, lm_head: jax.Array, dtype=None, root_emb=None, layout=None, path_emb=None
) -> jax.Array:
    """hidden `[..., E]` -> float32 head logits `[K, ..., V]`. `lm_head` `[E, V]` is used when the heads share it;
    `root_emb` `[..., E]`: the root token's embedding, for root_token heads (ignored by plain heads); path_emb
    `[..., K-1, E]` for sequential heads (teacher forcing); layout: as in `heads_hidden`."""
    dtype = dtype or hidden.dtype
    x = heads_hidden(params, hidden, dtype, root_emb, layout, path_emb)
    if "proj" in params:
        out = jnp.einsum("k...e,kev->k...v", x, params["proj"]["kernel"].astype(dtype))
    else:
        out = jnp.einsum("k...e,ev->k...v", x, lm_head.astype(dtype))
    return out.astype(jnp.float32)


def init_heads(hc: HeadsConfig, backbone_params: dict, seed: int = 0, scale: float = 0.0, dtype=jnp.float32) -> dict:
    """New heads. As in the reference: ResBlock weights zero (`scale=0`; each head then starts as the base lm_head on
    the same hidden state), bias small uniform, projection copied from the base lm_head. `scale > 0` gives random
    ResBlock weights N(0, scale²), useful for tests of the decode loop."""
    lm = np.asarray(base_lm_head(backbone_params), dtype=np.float32)
    e = lm.shape[0]
    rng = np.random.default_rng(seed)
    kernel = (
        rng.normal(0.0, scale, (hc.num_heads, hc.num_layers, e, e))
        if scale
        else np.zeros((hc.num_heads, hc.num_layers, e, e))
    )
    bound = 1.0 / np.sqrt(e)
    params = {
        "blocks": {
            "kernel": jnp.asarray(kernel, dtype),
            "bias": jnp.asarray(rng.uniform(-bound, bound, (hc.num_heads, hc.num_layers, e)), dtype),
        }
    }
    if not hc.shared_lm_head:
        params["proj"] = {"kernel": jnp.asarray(np.broadcast_to(lm, (hc.num_heads, *lm.shape)), dtype)}
    if hc.root_token or hc.sequential:
        root = rng.normal(0.0, scale, (hc.num_heads, e, e)) if scale else np.zeros((hc.num_heads, e, e))
        params["root"] = {"kernel": jnp.asarray(root, dtype)}
    if hc.sequential:
        shape = (hc.num_heads, max(hc.num_heads - 1, 0), e, e)
        params["path"] = {"kernel": jnp.asarray(rng.normal(0.0, scale, shape) if scale else np.zeros(shape), dtype)}
    return params


def attach_draft_vocab(params: dict, lm_head: jax.Array, ids) -> dict:
    """Heads that draft from a reduced vocabulary `ids` `[Vd]` (the tokens the model emits most, as in FR-Spec): the
    decode loop then projects the heads onto these Vd columns only. `heads_logits` (and `forward`) still cover the
    full vocabulary. Greedy output is unchanged (the base model verifies every candidate); only which tokens can be
    proposed changes."""
    ids = np.asarray(ids, np.int32)
    kernel = params["proj"]["kernel"][:, :, ids] if "proj" in params else jnp.asarray(lm_head)[:, ids]
    return dict(params, draft={"ids": jnp.asarray(ids), "kernel": kernel})


def draft_columns(ids: jax.Array, vocab_size: int) -> jax.Array:
    """A draft vocabulary's token ids `[Vd]` -> each token's column in it `[V]` (-1: not in it)."""
    return jnp.full((vocab_size,), -1, jnp.int32).at[ids].set(jnp.arange(ids.shape[0], dtype=jnp.int32))


def draft_logits(
    params: dict, hidden: jax.Array, lm_head: jax.Array, dtype=None, root_emb=None, layout=None, path_emb=None
) -> tuple[jax.Array, jax.Array | None]:
    """hidden `[..., E]` (+ `root_emb` `[..., E]` for root_token heads, `path_emb` for sequential heads) -> (float32
    logits `[K, ..., Vd]`, token ids of the Vd columns `[Vd]` or None for the full vocabulary). layout: as in
    `heads_hidden`."""
    if "draft" not in params:
        return heads_logits(params, hidden, lm_head, dtype, root_emb, layout, path_emb), None
    dtype = dtype or hidden.dtype
    x = heads_hidden(params, hidden, dtype, root_emb, layout, path_emb)
    kernel = params["draft"]["kernel"].astype(dtype)
    spec = "k...e,kev->k...v" if kernel.ndim == 3 else "k...e,ev->k...v"
    return jnp.einsum(spec, x, kernel).astype(jnp.float32), params["draft"]["ids"]


def head_at_depth(
    params: dict, k: int, hidden: jax.Array, lm_head: jax.Array, dtype, root_emb, path_emb, layout=None
) -> tuple[jax.Array, jax.Array | None]:
    """Sequential head k over n tree nodes of one depth (k+1): hidden and root_emb `[B, E]` (the step's, shared by
    every node), path_emb `[B, n, k, E]` (each node's path tokens at depths 1..k) -> (float32 logits `[B, n, Vd]`,
    the Vd columns' token ids or None for the full vocabulary). Equals head k of `heads_logits` on the same path."""
    w = params["blocks"]["kernel"][k].astype(dtype)  # [NL, E, E]
    bias = params["blocks"]["bias"][k].astype(dtype)
    shared = hidden.astype(dtype) @ w[0] + bias[0] + root_emb.astype(dtype) @ params["root"]["kernel"][k].astype(dtype)
    y = shared[:, None, :]
    if k:
        y = y + jnp.einsum("bnje,jef->bnf", path_emb.astype(dtype), params["path"]["kernel"][k, :k].astype(dtype))
    x = hidden.astype(dtype)[:, None, :] + jax.nn.silu(y)  # [B, n, E]
    if layout is not None:
        x = layout(x)
    for j in range(1, w.shape[0]):
        x = x + jax.nn.silu(x @ w[j] + bias[j])
        if layout is not None:
            x = layout(x)
    if "draft" in params:
        kernel, ids = params["draft"]["kernel"], params["draft"]["ids"]
        kernel = kernel[k] if kernel.ndim == 3 else kernel
    else:
        kernel, ids = (params["proj"]["kernel"][k] if "proj" in params else lm_head), None
    return jnp.einsum("bne,ev->bnv", x, kernel.astype(dtype)).astype(jnp.float32), ids
