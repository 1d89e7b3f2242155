"""Medusa decoding heads: K heads on the backbone's final-norm hidden state.

Head k (0-based here; the paper's head k+1) predicts the token k+2 positions after the current one, i.e. k+1 past
the base lm_head's next-token guess. Each head is `num_layers` ResBlocks `h + SiLU(W h + b)` (own weights per layer)
then a vocabulary projection: its own (`proj`, initialized from the base lm_head) or the base lm_head itself
(`shared_lm_head`, the reference implementation's "version 2" layout).

Params (stacked over heads): `blocks/kernel` `[K, NL, E, E]`, `blocks/bias` `[K, NL, E]`, `proj/kernel` `[K, E, V]`
(absent when shared).
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

    def to_dict(self):
        return dataclasses.asdict(self)


def heads_config_of(params: dict) -> HeadsConfig:
    k, nl = params["blocks"]["kernel"].shape[:2]
    return HeadsConfig(int(k), int(nl), "proj" not in params)


def base_lm_head(backbone_params: dict) -> jax.Array:
    """The base model's output projection `[E, V]` (the transposed embedding when tied)."""
    if "lm_head" in backbone_params:
        return backbone_params["lm_head"]["kernel"]
    return backbone_params["embed"]["embedding"].T


def heads_hidden(params: dict, hidden: jax.Array, dtype=None) -> jax.Array:
    """hidden `[..., E]` -> per-head features after the ResBlocks `[K, ..., E]`."""
    dtype = dtype or hidden.dtype
    w = params["blocks"]["kernel"].astype(dtype)
    bias = params["blocks"]["bias"].astype(dtype)
    x = jnp.broadcast_to(hidden.astype(dtype), (w.shape[0], *hidden.shape))
    for j in range(w.shape[1]):
        y = jnp.einsum("k...e,kef->k...f", x, w[:, j]) + bias[:, j].reshape((w.shape[0],) + (1,) * (x.ndim - 2) + (-1,))
        x = x + jax.nn.silu(y)
    return x


def heads_logits(params: dict, hidden: jax.Array, lm_head: jax.Array, dtype=None) -> jax.Array:
    """hidden `[..., E]` -> float32 head logits `[K, ..., V]`. `lm_head` `[E, V]` is used when the heads share it."""
    dtype = dtype or hidden.dtype
    x = heads_hidden(params, hidden, dtype)
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
    return params


def attach_draft_vocab(params: dict, lm_head: jax.Array, ids) -> dict:
    """Heads that draft from a reduced vocabulary `ids` `[Vd]` (the tokens the model emits most, as in FR-Spec): the
    decode loop then projects the heads onto these Vd columns only. `heads_logits` (and `forward`) still cover the
    full vocabulary. Greedy output is unchanged (the base model verifies every candidate); only which tokens can be
    proposed changes."""
    ids = np.asarray(ids, np.int32)
    kernel = params["proj"]["kernel"][:, :, ids] if "proj" in params else jnp.asarray(lm_head)[:, ids]
    return dict(params, draft={"ids": jnp.asarray(ids), "kernel": kernel})


def draft_logits(params: dict, hidden: jax.Array, lm_head: jax.Array, dtype=None) -> tuple[jax.Array, jax.Array | None]:
    """hidden `[..., E]` -> (float32 logits `[K, ..., Vd]`, token ids of the Vd columns `[Vd]` or None for the full
    vocabulary)."""
    if "draft" not in params:
        return heads_logits(params, hidden, lm_head, dtype), None
    dtype = dtype or hidden.dtype
    x = heads_hidden(params, hidden, dtype)
    kernel = params["draft"]["kernel"].astype(dtype)
    spec = "k...e,kev->k...v" if kernel.ndim == 3 else "k...e,ev->k...v"
    return jnp.einsum(spec, x, kernel).astype(jnp.float32), params["draft"]["ids"]
