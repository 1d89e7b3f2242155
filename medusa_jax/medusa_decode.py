"""The jitted Medusa decode loop: one `jax.lax.while_loop`, static tree buffers, nothing per step on the host.

Each step, for every row b of the batch (rows accept different lengths):
  candidates: root = the base model's next token (argmax, or sampled); the heads run on the last accepted
              node's hidden state (root_token heads also on the root's embedding), and their top-k tokens are
              gathered by `tree_indices` into L tree tokens; a lookup chain adds the tokens that followed the
              context's last n-gram earlier on (`medusa_jax.lookup`);
  verify:     one forward of the L tokens at positions `lengths[b] + depth`, tree mask over the cached prefix
              (their K/V land in slots `lengths[b] .. lengths[b] + L`);
  accept:     the longest path whose tokens the base model agrees with (greedy), finds typical enough (typical),
              or keeps under recursive rejection sampling (rejection: the output is distributed as the base model's
              own samples at the temperature);
  update:     the accepted path's tokens go to the output, and the next step's base logits and hidden state are
              taken at the last accepted node; its K/V move to contiguous slots at the start of the next step's
              verification, layer by layer (`MedusaState.moved_at`, `settled_cache` for a cache kept after the loop).
A dynamic tree (`medusa_jax.tree.DynamicTree`, a feature drafter's) is drafted anew each step: its parents and depths
come from the drafter (`drafters.StepTree`), and the mask, positions and acceptance follow them.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from medusa_jax.config import ModelConfig
from medusa_jax.drafters import DraftContext, draft_tree, stateful_drafter
from medusa_jax.generation import append_tokens, is_eos, lm_logits, prefill_into
from medusa_jax.lookup import write_tokens
from medusa_jax.model import KVCache, Transformer
from medusa_jax.sampling import SamplingParams, process_logits
from medusa_jax.tree import DynamicTree, TreeBuffers, build_buffers, dynamic_tree, get_tree

DECODE_LOOP = "decode_loop"


@dataclasses.dataclass(frozen=True)
class MedusaLoop:
    """Static, hashable loop settings (part of the jit cache key)."""

    tree: TreeBuffers
    max_new: int  # output buffer length
    slots: int  # KV-cache slots (prompt + output + one tree)
    acceptance: str  # "greedy" | "typical" | "rejection"
    eos_ids: tuple[int, ...]
    mesh: Mesh | None = None  # a decoding mesh (`medusa_jax.sharding`): the state is kept in its shards


@flax.struct.dataclass
class MedusaState:
    """The while_loop carry. B rows, K heads, V vocab."""

    cache: KVCache
    lengths: jax.Array  # [B] tokens in the cache
    logits: jax.Array  # [B, V] base logits for the next token (at the last accepted node)
    hidden: jax.Array  # [B, E] the last accepted node's hidden state (the heads' input)
    banned: jax.Array  # [B, C] tokens rejected at the last accepted node (-1 pad): the next root avoids them
    out: jax.Array  # [B, max_new] new tokens (pad -1)
    num_out: jax.Array  # [B]
    steps: jax.Array  # [B] decoding steps while the row was live
    done: jax.Array  # [B]
    rng: jax.Array
    seq: jax.Array  # [B, S] every token by cache slot, -1 unknown (the lookup chain's source; [B, 0] without one)
    # The last step's accepted path, still at its tree slots: its K/V move from slots `moved_at + moved_nodes` to
    # `moved_at + 0..D` in the next verification forward (`model.move_entries`), or by `settled_cache`.
    moved_at: jax.Array  # [B]
    moved_nodes: jax.Array  # [B, D+1]
    draft: object = None  # a stateful drafter's state (`feature_drafter.FeatureState`), else None


def constrain_state(s: MedusaState, mesh: Mesh | None) -> MedusaState:
    """Pin the loop carry to its shards on `mesh` (no-op without one): the cache as `KVCache.constrain`, per-row
    arrays by rows over data, the base logits `[B, V]` also by vocabulary over tensor (as the projection makes
    them), so the carry keeps one layout through the while_loop and nothing is gathered between steps."""
    if mesh is None:
        return s
    from medusa_jax.sharding import rows_sharding, spec_for

    def rows(x):
        return jax.lax.with_sharding_constraint(x, rows_sharding(mesh, x.shape))

    logits_sh = NamedSharding(mesh, spec_for(("batch", "vocab"), s.logits.shape, mesh))
    return s.replace(
        cache=s.cache.constrain(mesh),
        lengths=rows(s.lengths),
        logits=jax.lax.with_sharding_constraint(s.logits, logits_sh),
        hidden=rows(s.hidden),
        banned=rows(s.banned),
        out=rows(s.out),
        num_out=rows(s.num_out),
        steps=rows(s.steps),
        done=rows(s.done),
        seq=rows(s.seq),
        moved_at=rows(s.moved_at),
        moved_nodes=rows(s.moved_nodes),
        draft=None if s.draft is None else jax.tree.map(rows, s.draft),
    )


@flax.struct.dataclass
class Thresholds:
    """Typical acceptance: accept x when p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p)))."""

    posterior_threshold: jax.Array
    posterior_alpha: jax.Array


def typical_threshold(probs: jax.Array, th: Thresholds) -> jax.Array:
    """probs `[..., V]` -> threshold `[...]`."""
    entropy = -jnp.sum(probs * jnp.log(probs + 1e-5), axis=-1)
    return jnp.minimum(th.posterior_threshold, th.posterior_alpha * jnp.exp(-entropy))


def choose_root(logits, banned, rng, loop: MedusaLoop, sp: SamplingParams, th: Thresholds) -> jax.Array:
    """The base model's next token `[B]`: argmax (greedy), sampled from the typical set (typical), or sampled from
    the residual distribution left by the candidates rejected at this node (rejection; `banned` `[B, C]`)."""
    if loop.acceptance == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = process_logits(logits, sp)
    if loop.acceptance == "rejection":
        b, v = scaled.shape
        drop = (
            jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], jnp.where(banned >= 0, banned, v)].set(True, mode="drop")
        )
        residual = jnp.where(drop, -jnp.inf, scaled)
        residual = jnp.where(jnp.isfinite(residual).any(-1, keepdims=True), residual, scaled)  # never empty
        return jax.random.categorical(rng, residual, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(scaled, axis=-1)
    keep = probs >= typical_threshold(probs, th)[..., None]
    keep = keep | (probs == probs.max(axis=-1, keepdims=True))  # never an empty set
    return jax.random.categorical(rng, jnp.where(keep, scaled, -jnp.inf), axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def tree_children(tree: TreeBuffers) -> np.ndarray:
    """`[L, C]` each node's children in rank order (-1 padded; the lookup chain's first node is the root's last
    child), C = the most children of any node (at least 1)."""
    mask, depth = np.asarray(tree.attn_mask) > 0, np.asarray(tree.position_ids)
    kids: list[list[int]] = [[] for _ in range(tree.num_nodes)]
    for i in range(1, tree.num_nodes):  # node order: (len, path), so siblings come in rank order
        ancestors = np.flatnonzero(mask[i] & (np.arange(tree.num_nodes) != i))
        kids[ancestors[np.argmax(depth[ancestors])]].append(i)
    table = np.full((tree.num_nodes, max(1, max(map(len, kids)))), -1, np.int32)
    for n, ks in enumerate(kids):
        table[n, : len(ks)] = ks
    return table


@functools.lru_cache(maxsize=64)
def tree_parents(tree: TreeBuffers) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parent `[L]` (the root's is 0), internal `[Li]` the nodes with children, slot `[L]` each node's index in
    `internal` (0 for leaves)). Base logits are needed at internal nodes only (to judge their children)."""
    kids = tree_children(tree)
    parent = np.zeros(tree.num_nodes, np.int32)
    for n, row in enumerate(kids):
        parent[row[row >= 0]] = n
    internal = np.flatnonzero(kids[:, 0] >= 0).astype(np.int32)
    slot = np.zeros(tree.num_nodes, np.int32)
    slot[internal] = np.arange(len(internal), dtype=np.int32)
    return parent, internal, slot


def max_children(tree) -> int:
    """C: the most children of any node (the width of `banned`)."""
    return tree.max_children if isinstance(tree, DynamicTree) else tree_children(tree).shape[1]


def ancestor_mask(parent: jax.Array, depth: int) -> jax.Array:
    """A step tree's attention mask: parent `[B, L]` (the root's: 0), depth D -> `[B, L, L]`, True where j is i or
    an ancestor of i."""
    n = parent.shape[1]
    node = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), parent.shape)
    mask = jnp.zeros((*parent.shape, n), bool)
    for _ in range(depth + 1):
        mask = mask | (node[:, :, None] == jnp.arange(n)[None, None, :])
        node = jnp.take_along_axis(parent, node, axis=1)
    return mask


def step_children(parent: jax.Array, c: int) -> jax.Array:
    """parent `[B, L]` -> each node's children in node order `[B, L, C]` (-1 padded)."""
    b, n = parent.shape
    idx = jnp.arange(n)
    earlier = (idx[None, :] < idx[:, None]) & (idx[None, :] >= 1)  # [L, L]: j is a node before i
    rank = jnp.sum((parent[:, :, None] == parent[:, None, :]) & earlier[None], axis=-1)  # [B, L] among its siblings
    rows = jnp.arange(b)[:, None]
    kids = jnp.full((b, n, c), -1, jnp.int32)
    return kids.at[rows, parent[:, 1:], rank[:, 1:]].set(jnp.broadcast_to(idx[1:], (b, n - 1)), mode="drop")


def evaluate_step_tree(tokens, logits, shape, loop: MedusaLoop, sp: SamplingParams, th: Thresholds, valid=None):
    """`evaluate_paths` for a dynamic tree: logits `[B, L, V]` at every node, `shape` the step's `StepTree`. Each
    node is judged against its parent's distribution; a node is accepted when it and all its ancestors are; the
    deepest accepted node (ties: the highest summed log-probability) ends the path."""
    b, n = tokens.shape
    parent, depth, d = shape.parent, shape.depth, loop.tree.depth
    rows = jnp.arange(b)[:, None]
    if loop.acceptance == "greedy":
        node_ok = jnp.take_along_axis(jnp.argmax(logits, axis=-1), parent, axis=1) == tokens  # [B, L]
        score = jnp.zeros(tokens.shape, jnp.float32)
    else:
        probs = jax.nn.softmax(process_logits(logits, sp), axis=-1)  # [B, L, V]
        p = probs[rows, parent, tokens]
        node_ok = p > jnp.take_along_axis(typical_threshold(probs, th), parent, axis=1)
        score = jnp.log(p + 1e-12).at[:, 0].set(0.0)
    node_ok = node_ok.at[:, 0].set(True)
    if valid is not None:
        node_ok = node_ok & valid
    ok, ll = node_ok, score
    for _ in range(d):  # down the tree: accepted when the parent is, and the path's summed log-probability
        ok = node_ok & jnp.take_along_axis(ok, parent, axis=1)
        ll = score + jnp.take_along_axis(ll, parent, axis=1)
    reached = jnp.where(ok, depth, -1)
    best_len = reached.max(axis=1)
    best = jnp.argmax(jnp.where(reached == best_len[:, None], ll, -jnp.inf), axis=1).astype(jnp.int32)
    up = [best]  # up[j]: the node j levels above the best one
    for _ in range(d):
        up.append(jnp.take_along_axis(parent, up[-1][:, None], axis=1)[:, 0])
    up = jnp.stack(up, axis=1)  # [B, D+1]
    path_nodes = jnp.take_along_axis(up, jnp.clip(best_len[:, None] - jnp.arange(d + 1)[None, :], 0, d), axis=1)
    no_ban = jnp.full((b, max_children(loop.tree)), -1, jnp.int32)
    return best_len, jnp.take_along_axis(tokens, path_nodes, axis=1), path_nodes, no_ban


def evaluate_paths(tokens, logits, loop: MedusaLoop, sp: SamplingParams, th: Thresholds, valid=None):
    """Greedy or typical acceptance: pick each row's best path.

    tokens `[B, L]`, logits `[B, Li, V]`: base logits at the internal nodes (`tree_parents`); valid `[B, L]` (None:
    all) marks the nodes that hold a real draft (a lookup chain may be shorter than its nodes). Each node is judged
    once, against its parent's distribution (`[B, L]`), then the per-node verdicts are gathered along the paths.
    Returns (accepted speculative tokens `[B]` (0..D), path tokens `[B, D+1]`, path nodes `[B, D+1]`, banned)."""
    parent, _, slot = tree_parents(loop.tree)
    judge = jnp.asarray(slot[parent])  # [L] the logits row that judges each node
    b = tokens.shape[0]
    no_ban = jnp.full((b, max_children(loop.tree)), -1, jnp.int32)
    if loop.tree.depth == 0:  # root only (autoregressive)
        return jnp.zeros((b,), jnp.int32), tokens, jnp.zeros((b, 1), jnp.int32), no_ban
    if loop.acceptance == "greedy":
        node_ok = jnp.argmax(logits, axis=-1)[:, judge] == tokens  # [B, L]
        node_score = jnp.zeros(tokens.shape, jnp.float32)
    else:
        probs = jax.nn.softmax(process_logits(logits, sp), axis=-1)  # [B, Li, V]
        p = probs[jnp.arange(b)[:, None], judge[None, :], tokens]  # [B, L]
        node_ok = p > typical_threshold(probs, th)[:, judge]
        node_score = jnp.log(p + 1e-12)
    if valid is not None:
        node_ok = node_ok & valid
    ri = np.asarray(loop.tree.retrieve_indices)  # [P, D+1], -1 padded
    valid = jnp.asarray(ri[:, 1:] >= 0)
    nodes = jnp.asarray(np.maximum(ri, 0))
    ok = node_ok[:, nodes[:, 1:]] & valid[None]  # [B, P, D]
    score = node_score[:, nodes[:, 1:]]
    run = jnp.cumprod(ok.astype(jnp.int32), axis=-1)
    accept = run.sum(-1)  # [B, P]
    best_len = accept.max(-1)  # [B]
    # ties: the highest summed log-probability of the accepted tokens
    ll = jnp.sum(score * run, axis=-1)
    ll = jnp.where(accept == best_len[:, None], ll, -jnp.inf)
    best = jnp.argmax(ll, axis=-1)
    path_nodes = nodes[best]  # [B, D+1]
    return best_len, jnp.take_along_axis(tokens, path_nodes, axis=1), path_nodes, no_ban


def rejection_paths(tokens, logits, loop: MedusaLoop, sp: SamplingParams, rng, valid=None, shape=None):
    """Recursive rejection sampling down the tree (SpecInfer / EAGLE), lossless at any temperature.

    At an accepted node with base distribution p (temperature, top-k, top-p applied), its children are tried in
    rank order. Medusa's candidates are the heads' deterministic top-k, so each child's draft distribution is a point
    mass: child x is accepted with probability p_res(x) (= min(1, p_res(x) / q(x)) with q = δ_x), otherwise
    p_res <- norm(p_res with x removed) and the next child is tried. When all are rejected, the next token is drawn
    from the final residual: the next step's root, with the rejected tokens returned as `banned`. A child whose token
    was already rejected at this node (a lookup draft may repeat a head's guess) has residual probability 0.

    tokens `[B, L]`, logits `[B, Li, V]` at the internal nodes (a dynamic tree: `[B, L, V]` at every node, its
    `StepTree` `shape`), valid `[B, L]` (None: all) the nodes holding a draft (invalid ones are skipped). Returns
    (accepted `[B]`, path tokens `[B, D+1]`, path nodes `[B, D+1]`, banned `[B, C]`)."""
    b, n = tokens.shape
    if shape is None:
        children = jnp.broadcast_to(jnp.asarray(tree_children(loop.tree)), (b, n, max_children(loop.tree)))
        slot = jnp.broadcast_to(jnp.asarray(tree_parents(loop.tree)[2]), (b, n))
    else:
        children = step_children(shape.parent, max_children(loop.tree))
        slot = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    c = children.shape[2]
    rows = jnp.arange(b)
    u = jax.random.uniform(rng, (max(loop.tree.depth, 1), c, b))
    cur = jnp.zeros((b,), jnp.int32)
    alive = jnp.ones((b,), bool)
    banned = jnp.full((b, c), -1, jnp.int32)
    accepted = jnp.zeros((b,), jnp.int32)
    path = [cur]
    for d in range(loop.tree.depth):
        p = jax.nn.softmax(process_logits(logits[rows, slot[rows, cur]], sp), axis=-1)  # [B, V]
        kids = children[rows, cur]  # [B, C]
        mass = jnp.ones((b,), jnp.float32)
        took = jnp.zeros((b,), bool)
        nxt = cur
        rejected = jnp.full((b, c), -1, jnp.int32)
        for j in range(c):
            kid = kids[:, j]
            tok = tokens[rows, jnp.maximum(kid, 0)]
            pt = jnp.where((rejected == tok[:, None]).any(axis=1), 0.0, p[rows, tok])
            tried = (kid >= 0) & alive & ~took
            if valid is not None:
                tried = tried & valid[rows, jnp.maximum(kid, 0)]
            ok = tried & (u[d, j] * mass < pt)  # u < p(x) / mass, without dividing by a vanishing mass
            miss = tried & ~ok
            mass = jnp.where(miss, mass - pt, mass)
            rejected = rejected.at[:, j].set(jnp.where(miss, tok, -1))
            nxt = jnp.where(ok, kid, nxt)
            took = took | ok
        banned = jnp.where((alive & ~took)[:, None], rejected, banned)
        accepted = accepted + took
        alive = alive & took
        cur = nxt
        path.append(cur)
    path_nodes = jnp.stack(path, axis=1)  # [B, D+1]; after a stop the last node repeats
    return accepted, jnp.take_along_axis(tokens, path_nodes, axis=1), path_nodes, banned


UNROLL_ROWS = 16  # compaction writes up to this many rows unrolled, more in a loop


def compact_cache(cache: KVCache, lengths, path_nodes, scatter: bool = False) -> KVCache:
    """Move the K/V of each row's path nodes (slots `lengths + path_nodes`) to slots `lengths + 0..D`, in place: the
    path's `[N, B, D+1, K, Dh]` entries are gathered, then written row by row (a batched scatter, or a gather over all
    slots, would copy the whole cache)."""
    src = lengths[:, None] + path_nodes  # [B, D+1]
    b = src.shape[0]

    def move(c):  # [N, B, S, K, Dh]
        path = jnp.take_along_axis(c, src[None, :, :, None, None], axis=2)  # [N, B, D+1, K, Dh]
        zero = jnp.int32(0)

        def put(r, c):
            row = jax.lax.dynamic_slice_in_dim(path, r, 1, axis=1)
            return jax.lax.dynamic_update_slice(c, row, (zero, r, lengths[r], zero, zero))

        if b <= UNROLL_ROWS:  # a few rows: unrolled (no loop inside the step)
            for r in range(b):
                c = put(jnp.int32(r), c)
            return c
        if scatter:  # many rows on a TPU: one scatter (its compiler fails on this loop; `ModelConfig.scatter_rows`)
            dst = lengths[:, None] + jnp.arange(src.shape[1])[None, :]
            return c.at[:, jnp.arange(b)[:, None], dst].set(path, unique_indices=True, mode="drop")
        return jax.lax.fori_loop(0, b, put, c)  # many rows: a loop, so the program does not grow with the batch

    if path_nodes.shape[1] == 1:  # root only: its K/V is already in place
        return cache
    return KVCache(move(cache.k), move(cache.v))


def start_state(cfg, loop: MedusaLoop, params, heads, cache: KVCache, start, tokens, lengths, max_new, rng,
                history=None, draft=None):  # fmt: skip
    """Prefill `tokens` `[B, T]` (right-padded, `lengths` `[B]` real tokens) into `cache` at slots `start` `[B]` on
    (a scalar 0 for new prompts; the conversation so far in a chat) and set up the loop carry. history `[B, slots]`
    (or None): the tokens already in the cache, by slot (-1 unknown), for the lookup chain. draft: a feature
    drafter's state after the conversation so far (None: a new one)."""
    b = tokens.shape[0]
    row_start = jnp.broadcast_to(start, (b,))
    seq = jnp.zeros((b, 0), jnp.int32)
    if loop.tree.lookup:
        seq = jnp.full((b, loop.slots), -1, jnp.int32) if history is None else jnp.asarray(history, jnp.int32)
        seq = write_tokens(seq, row_start, tokens, lengths)
    stateful = stateful_drafter(heads, loop.tree)  # (a feature drafter: its cache over the prompt)
    if stateful is None:
        last_hidden, cache = prefill_into(cfg, params, tokens, lengths, cache.constrain(loop.mesh), start,
                                          mesh=loop.mesh)  # fmt: skip
        draft = None
    else:  # the drafter's entries written chunk by chunk, beside the backbone's K/V
        draft = stateful.start(cfg, heads, params, draft, row_start, tokens, loop.slots, loop.tree.depth + 1)
        each = lambda st, off, hidden: stateful.prefill(cfg, heads, params, st, row_start, tokens, off, hidden)  # noqa: E731
        last_hidden, cache, draft = prefill_into(cfg, params, tokens, lengths, cache.constrain(loop.mesh), start,
                                                 mesh=loop.mesh, each_chunk=each, aux=draft)  # fmt: skip
        draft = stateful.prefilled(draft, last_hidden)
    state = MedusaState(
        cache=cache,
        lengths=row_start + lengths,
        logits=lm_logits(cfg, params, last_hidden),
        hidden=last_hidden,
        banned=jnp.full((b, max_children(loop.tree)), -1, jnp.int32),
        out=jnp.full((b, loop.max_new), -1, jnp.int32),
        num_out=jnp.zeros((b,), jnp.int32),
        steps=jnp.zeros((b,), jnp.int32),
        done=jnp.broadcast_to(max_new <= 0, (b,)),
        rng=rng,
        seq=seq,
        moved_at=row_start + lengths,
        moved_nodes=jnp.broadcast_to(jnp.arange(loop.tree.depth + 1, dtype=jnp.int32), (b, loop.tree.depth + 1)),
        draft=draft,
    )
    return constrain_state(state, loop.mesh)


_settle_copy, _settle_in_place = jax.jit(compact_cache), jax.jit(compact_cache, donate_argnums=0)


def settled_cache(state: MedusaState, donate: bool = False) -> KVCache:
    """The cache with the last accepted path's K/V in place: a cache kept after the loop (the next turn's prefix).
    donate: the state's cache buffers are reused (its cache is invalid afterwards)."""
    return (_settle_in_place if donate else _settle_copy)(state.cache, state.moved_at, state.moved_nodes)


LOGIT_BYTES = 8  # a float32 logit of a node written by the projection and read once


def project_every_node(cfg: ModelConfig, batch: int, tree: TreeBuffers) -> bool:
    """Whether a step projects every tree node to the vocabulary at once (the last accepted node's logits, the next
    step's, are then among them: one read of the `[E, V]` matrix), rather than the internal nodes and afterwards the
    last accepted node (two reads). Chosen by bytes: the leaves' float32 logits `[B, leaves, V]` against one read
    of the matrix; the root-only tree (plain decoding) projects its one node either way."""
    if isinstance(tree, DynamicTree):  # its internal nodes change from step to step
        return True
    leaves = tree.num_nodes - len(tree_parents(tree)[1])
    extra = batch * (leaves - 1) * LOGIT_BYTES  # per vocabulary entry: the leaves beyond the last accepted node
    return extra <= cfg.hidden_size * cfg.jnp_param_dtype.itemsize


def medusa_step(cfg, loop: MedusaLoop, params, heads, s: MedusaState, max_new, sp, th) -> MedusaState:
    """One decoding step for every row: candidates -> verify -> accept -> cache update -> tokens."""
    tree = loop.tree
    rng, k_root, k_accept = jax.random.split(s.rng, 3)
    # 1. candidates
    root = choose_root(s.logits, s.banned, k_root, loop, sp, th)
    ctx = DraftContext(params, heads, root, s.hidden, s.seq, s.lengths, cfg.jnp_matmul_dtype, loop.mesh, s.draft, cfg)
    cand, valid, draft, shape = draft_tree(ctx, tree)  # [B, L] node 0 = root; valid None or [B, L]
    # 2. verify the whole tree in one forward, at positions length + depth under the tree mask
    model = Transformer(cfg, loop.mesh)
    if shape is None:  # a static tree
        positions = s.lengths[:, None] + jnp.asarray(tree.position_ids)[None, :]
        mask = jnp.asarray(tree.attn_mask > 0)
    else:  # a dynamic tree: this step's
        positions = s.lengths[:, None] + shape.depth
        mask = ancestor_mask(shape.parent, tree.depth)
    moves = (s.moved_at, s.moved_nodes)  # the last step's path moves to contiguous slots first, layer by layer
    hidden, cache = model.apply({"params": params}, cand, positions, mask, s.cache, s.lengths, moves)
    every_node = project_every_node(cfg, cand.shape[0], tree)  # always for a dynamic tree
    if every_node:  # one read of the [E, V] projection gives the judging rows and the next step's logits
        node_logits = model.apply({"params": params}, hidden, method=model.logits)  # [B, L, V]
        if shape is not None:  # a dynamic tree: any node may judge children
            logits = node_logits
        else:  # where a node has children
            logits = node_logits[:, tree_parents(tree)[1]] if tree.depth else None
    else:
        internal = tree_parents(tree)[1]
        logits = model.apply({"params": params}, hidden[:, internal], method=model.logits) if tree.depth else None
    # 3. accept
    if loop.acceptance == "rejection":
        acc, path_tokens, path_nodes, banned = rejection_paths(cand, logits, loop, sp, k_accept, valid, shape)
    elif shape is not None:
        acc, path_tokens, path_nodes, banned = evaluate_step_tree(cand, logits, shape, loop, sp, th, valid)
    else:
        acc, path_tokens, path_nodes, banned = evaluate_paths(cand, logits, loop, sp, th, valid)
    count = acc + 1  # the root is always kept
    d1 = path_tokens.shape[1]
    within = jnp.arange(d1)[None, :] < count[:, None]
    eos = is_eos(path_tokens, loop.eos_ids) & within
    first_eos = jnp.argmax(eos, axis=1)
    count = jnp.where(eos.any(1), first_eos + 1, count)
    count = jnp.minimum(count, max_new - s.num_out)
    live = ~s.done
    # 4. outputs (the path's K/V move in the next step's forward: `moved_at`)
    out = append_tokens(s.out, s.num_out, path_tokens, count, live)
    num_out = s.num_out + jnp.where(live, count, 0)
    seq = write_tokens(s.seq, s.lengths, path_tokens, jnp.where(live, count, 0)) if tree.lookup else s.seq
    done = s.done | eos.any(1) | (num_out >= max_new)
    # 5. the next step's logits and heads' input at the last accepted node
    last_node = jnp.take_along_axis(path_nodes, (count - 1)[:, None], axis=1)[:, 0]
    last_hidden = jnp.take_along_axis(hidden, last_node[:, None, None], axis=1)[:, 0]
    if every_node and tree.num_nodes == 1:  # plain decoding: its one node
        next_logits = node_logits[:, 0]
    elif every_node:
        next_logits = jnp.take_along_axis(node_logits, last_node[:, None, None], axis=1)[:, 0]
    else:
        next_logits = lm_logits(cfg, params, last_hidden)
    if draft is not None:  # a stateful drafter sees the accepted path (a feature drafter: its entries next step)
        draft = stateful_drafter(heads, tree).observe(draft, hidden, path_nodes, path_tokens, count, live)
    state = MedusaState(
        cache=cache,
        lengths=s.lengths + jnp.where(live, count, 0),
        logits=next_logits,
        hidden=last_hidden,
        banned=jnp.where((count == acc + 1)[:, None], banned, -1),  # a cut path continues from an accepted node
        out=out,
        num_out=num_out,
        steps=s.steps + live,
        done=done,
        rng=rng,
        seq=seq,
        moved_at=s.lengths,
        moved_nodes=path_nodes.astype(jnp.int32),
        draft=draft,
    )
    return constrain_state(state, loop.mesh)


def run_steps(cfg, loop: MedusaLoop, params, heads, state: MedusaState, max_new, sp, th, limit=None) -> MedusaState:
    """The while_loop: steps until every row is done (or `limit` steps, for streaming)."""

    def cond(carry):
        s, i = carry
        more = ~jnp.all(s.done)
        return more if limit is None else more & (i < limit)

    def body(carry):
        s, i = carry
        return medusa_step(cfg, loop, params, heads, s, max_new, sp, th), i + 1

    with jax.named_scope(DECODE_LOOP):  # names the loop in the compiled program (`medusa_jax.aot`'s traffic)
        state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
    return state


@functools.partial(jax.jit, static_argnums=(0, 1))
def generate_medusa(
    cfg: ModelConfig,
    loop: MedusaLoop,
    params,
    heads,
    tokens: jax.Array,
    lengths: jax.Array,
    max_new: jax.Array,
    sp: SamplingParams,
    th: Thresholds,
    rng: jax.Array,
):
    """Medusa generation, prefill and loop in one jitted call. tokens `[B, P]` right-padded, lengths `[B]`,
    max_new scalar, or `[B]` per row (a row with 0 is done from the start: a padding row).

    Returns (out `[B, loop.max_new]` padded with -1, num_out `[B]`, steps `[B]`)."""
    b = tokens.shape[0]
    cache = KVCache.zeros(cfg, b, loop.slots, mesh=loop.mesh)
    state = start_state(cfg, loop, params, heads, cache, jnp.int32(0), tokens, lengths, max_new, rng)
    state = run_steps(cfg, loop, params, heads, state, max_new, sp, th)
    return state.out, state.num_out, state.steps


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames=("cache",))
def start_medusa(cfg, loop: MedusaLoop, params, heads, cache, start, tokens, lengths, max_new, rng,
                 history=None, draft=None) -> MedusaState:  # fmt: skip
    """Jitted `start_state` for streaming and chat (the cache is donated and comes back inside the state)."""
    return start_state(cfg, loop, params, heads, cache, start, tokens, lengths, max_new, rng, history, draft)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames=("state",))
def continue_medusa(cfg, loop: MedusaLoop, params, heads, state: MedusaState, max_new, sp, th, limit) -> MedusaState:
    """Up to `limit` more steps (streaming: the host prints what the chunk accepted, then continues)."""
    return run_steps(cfg, loop, params, heads, state, max_new, sp, th, limit)


def default_tree_name() -> str:
    return "mc_sim_7b_63" if jax.default_backend() != "cpu" else "cpu_16"


def resolve_tree(tree, num_heads: int, topk: int = 10, lookup: int | None = None) -> TreeBuffers | DynamicTree:
    """A tree name, JSON file, list of paths, TreeBuffers or DynamicTree (`dynamic_N[_dD][_kK]`) -> the
    tree. Named default trees are cut to the heads' depth; an explicit tree deeper than the heads is an error.
    lookup: the lookup chain's length (None: a tree object's own, else none)."""
    if isinstance(tree, str) and (dyn := dynamic_tree(tree, lookup or 0)) is not None:
        tree = dyn
    if isinstance(tree, DynamicTree):
        if tree.head_depth > num_heads:
            raise ValueError(f"dynamic tree depth {tree.head_depth} exceeds the drafter's {num_heads} depths")
        return tree if lookup is None else dataclasses.replace(tree, lookup=lookup)
    if isinstance(tree, TreeBuffers):
        if tree.head_depth > num_heads:
            raise ValueError(f"tree depth {tree.head_depth} exceeds the {num_heads} Medusa heads")
        if lookup is None or lookup == tree.lookup:
            return tree
        return build_buffers(tree.choices, topk=tree.topk, num_heads=num_heads, lookup=lookup)
    if tree is None:
        choices = [p for p in get_tree(default_tree_name()) if len(p) <= num_heads]
        return build_buffers(choices, topk=topk, num_heads=num_heads, lookup=lookup or 0)
    choices = get_tree(tree) if isinstance(tree, str) else tree
    return build_buffers(choices, topk=topk, num_heads=num_heads, lookup=lookup or 0)


__all__ = [
    "MedusaLoop",
    "MedusaState",
    "Thresholds",
    "continue_medusa",
    "generate_medusa",
    "resolve_tree",
    "settled_cache",
    "start_medusa",
]
