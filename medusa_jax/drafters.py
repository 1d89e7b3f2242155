"""Drafters: what proposes the tree's tokens each decoding step.

A drafter fills some of the tree's nodes (`Drafter.nodes`, static) with candidate tokens from the step's context
(`DraftContext`: the root token, the last accepted node's hidden state, the tokens so far); `draft_tree` composes
the drafters of a tree into its `[B, L]` candidates (node 0 = the root). The acceptance rules (greedy, typical,
recursive rejection sampling in `medusa_jax.medusa_decode`) judge whatever is proposed against the base model and
never look inside a drafter, so adding a drafter touches no acceptance code and vice versa.

Every drafter here is deterministic given the context: a node's draft distribution is a point mass on its token,
which is what recursive rejection sampling assumes (a child x is kept with probability p_res(x)); it stays exact
whichever tokens are proposed, including children chosen per parent.

- `MedusaHeads`: Medusa's heads (and root-token heads): head k's top-k, the same for every node at depth k+1.
- `SequentialHeads`: sequentially dependent heads (`medusa_jax.heads`, `sequential`): depth by depth, head k runs
  on every node of depth k that has children, with that node's own path; its top-k are that node's children.
- `FeatureDrafter`: a feature-level drafter of EAGLE's kind (`medusa_jax.feature_drafter`): one decoder layer run
  depth by depth on each node's predicted feature and token, over its own K/V cache. It is stateful: its cache
  (`DraftContext.draft`) comes back from `propose` and is advanced after acceptance (`observe`). It also drafts
  dynamic trees (`medusa_jax.tree.DynamicTree`: the step's shape from its own confidence), returning the step's
  parents and depths (`StepTree`).
- `LookupChain`: the tokens that followed the context's last n-gram earlier on (`medusa_jax.lookup`).
"""

from __future__ import annotations

import functools
from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medusa_jax import feature_drafter as fd
from medusa_jax.heads import base_lm_head, draft_logits, head_at_depth, is_sequential, root_embedding, uses_root
from medusa_jax.lookup import lookup_draft
from medusa_jax.ranking import top_candidates
from medusa_jax.tree import DynamicTree, TreeBuffers


@flax.struct.dataclass
class DraftContext:
    """What a drafter may use. B rows, E hidden, S cache slots."""

    params: dict  # the backbone's params
    heads: dict | None  # the heads' params (None: no heads)
    root: jax.Array  # [B] the step's root token (the base model's next token)
    hidden: jax.Array  # [B, E] the last accepted node's hidden state
    seq: jax.Array  # [B, S] every token by cache slot (-1 unknown; [B, 0] without a lookup chain)
    lengths: jax.Array  # [B] tokens in the cache
    matmul_dtype: str = flax.struct.field(pytree_node=False, default="float32")
    mesh: object = flax.struct.field(pytree_node=False, default=None)
    draft: object = None  # a stateful drafter's state (`FeatureDrafter`: `feature_drafter.FeatureState`), else None
    cfg: object = flax.struct.field(pytree_node=False, default=None)  # the backbone's ModelConfig


@flax.struct.dataclass
class StepTree:
    """A dynamic tree's structure in one step (`medusa_jax.tree.DynamicTree`): each node's parent (the root's: 0)
    and depth (the root's: 0), `[B, L]`."""

    parent: jax.Array
    depth: jax.Array


def chain_shape(tree: DynamicTree, batch: int) -> StepTree:
    """The step tree's static part: the root and the lookup chain (after the drafted nodes) hanging from it; the
    drafted nodes' entries are filled by the drafter."""
    n, first = tree.num_nodes, tree.size + 1
    parent = np.zeros(n, np.int32)
    depth = np.zeros(n, np.int32)
    chain = np.arange(first, n)
    if tree.lookup:
        parent[chain] = np.concatenate([[0], chain[:-1]])
        depth[chain] = np.arange(1, tree.lookup + 1)
    b = lambda a: jnp.broadcast_to(jnp.asarray(a), (batch, n))  # noqa: E731
    return StepTree(b(parent), b(depth))


class Drafter(Protocol):
    def nodes(self, tree: TreeBuffers) -> np.ndarray:
        """The tree nodes this drafter fills `[n]` (static)."""

    def propose(self, ctx: DraftContext, tree: TreeBuffers, cand: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """-> (tokens `[B, n]` for `nodes(tree)`, valid `[B, n]` or None when every one is a real draft). `cand`
        `[B, L]`: the tree so far (the root, and the nodes of the drafters before this one). A stateful drafter
        returns its new state third; with a `DynamicTree`, the drafter also returns its nodes' `StepTree` entries
        (parents and depths `[B, n]`) fourth."""


def head_nodes(tree: TreeBuffers | DynamicTree) -> np.ndarray:
    return np.arange(1, tree.num_nodes - tree.lookup, dtype=np.int32)


def _layout(mesh):
    return None if mesh is None else (lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P())))


def medusa_tokens(head_logits: jax.Array, tree: TreeBuffers, draft_ids=None) -> jax.Array:
    """head_logits `[K, B, V]` (or `[K, B, Vd]` over the draft vocabulary `draft_ids` `[Vd]`) -> the head nodes'
    tokens `[B, n]`: node `path` holds rank `path[-1]` of head `len(path) - 1`."""
    top = top_candidates(head_logits[: tree.head_depth], tree.topk)  # [D, B, topk]
    if draft_ids is not None:
        top = draft_ids[top]
    flat = jnp.transpose(top, (1, 0, 2)).reshape(top.shape[1], -1)  # [B, D * topk], as tree_indices count
    return flat[:, jnp.asarray(tree.tree_indices[head_nodes(tree)] - 1)]


def tree_candidates(root: jax.Array, head_logits, tree: TreeBuffers, draft_ids=None, lookup=None) -> jax.Array:
    """root `[B]`, head_logits `[K, B, V]` as `medusa_tokens` (None for a tree without head nodes), lookup
    `[B, tree.lookup]` the lookup chain's draft -> tree tokens `[B, L]` (node 0 = root): Medusa's tree."""
    parts = [root[:, None]]
    if tree.head_depth:
        parts.append(medusa_tokens(head_logits, tree, draft_ids))
    if tree.lookup:
        parts.append(lookup)
    return jnp.concatenate(parts, axis=1).astype(jnp.int32)


class MedusaHeads:
    """Head k's top-k at depth k+1 for every node (Medusa; root-token heads also see the root)."""

    def nodes(self, tree):
        return head_nodes(tree)

    def propose(self, ctx, tree, cand):
        heads = ctx.heads
        root_emb = root_embedding(ctx.params, ctx.root) if uses_root(heads) else None
        logits, ids = draft_logits(heads, ctx.hidden, base_lm_head(ctx.params), ctx.matmul_dtype, root_emb,
                                   _layout(ctx.mesh))  # fmt: skip
        return medusa_tokens(logits, tree, ids), None


@functools.lru_cache(maxsize=64)
def depth_plan(tree: TreeBuffers) -> tuple:
    """Per depth d = 1..D of the heads' nodes: (children `[n]`, parents `[p]` (the distinct parents, sorted),
    each child's parent slot `[n]` and rank `[n]`, ancestors `[p, d-1]`: each parent's path nodes at depths
    1..d-1)."""
    node = {path: i + 1 for i, path in enumerate(tree.choices)}
    plan = []
    for d in range(1, tree.head_depth + 1):
        kids = [path for path in tree.choices if len(path) == d]
        parents = sorted({node.get(path[:-1], 0) for path in kids})
        slot = {p: i for i, p in enumerate(parents)}
        paths_of = {0: ()} | {node[path]: path for path in tree.choices}
        anc = np.array([[node[paths_of[p][:c]] for c in range(1, d)] for p in parents], np.int32).reshape(
            len(parents), d - 1
        )
        plan.append(
            (
                np.array([node[path] for path in kids], np.int32),
                np.array(parents, np.int32),
                np.array([slot[node.get(path[:-1], 0)] for path in kids], np.int32),
                np.array([path[-1] for path in kids], np.int32),
                anc,
            )
        )
    return tuple(plan)


class SequentialHeads:
    """Sequentially dependent heads: each node's children are the top-k of head d on that node's own path."""

    def nodes(self, tree):
        return head_nodes(tree)

    def propose(self, ctx, tree, cand):
        heads, dtype = ctx.heads, ctx.matmul_dtype
        embed = ctx.params["embed"]["embedding"]
        lm, layout = base_lm_head(ctx.params), _layout(ctx.mesh)
        root_emb = root_embedding(ctx.params, ctx.root)
        for d, (kids, _, slot, rank, anc) in enumerate(depth_plan(tree), start=1):
            path_emb = jnp.take(embed, cand[:, jnp.asarray(anc)], axis=0)  # [B, p, d-1, E]
            logits, ids = head_at_depth(heads, d - 1, ctx.hidden, lm, dtype, root_emb, path_emb, layout)
            top = top_candidates(logits, int(rank.max()) + 1)  # [B, p, r]
            if ids is not None:
                top = ids[top]
            cand = cand.at[:, jnp.asarray(kids)].set(top[:, jnp.asarray(slot), jnp.asarray(rank)])
        return cand[:, jnp.asarray(head_nodes(tree))], None


class StatefulDrafter(Drafter, Protocol):
    """A drafter with state carried through the loop (`DraftContext.draft`): `propose` returns the new state third;
    the loop sets it up around the prefill (`start`, `prefill` on each prompt chunk, `prefilled`) and shows it each
    step's accepted path (`observe`)."""

    def start(self, cfg, heads, params, state, start, tokens, slots: int, path_len: int):
        """Before the prefill of tokens `[B, T]` at slots `start` `[B]` on: the state (`state`: the conversation's
        so far, or None)."""

    def prefill(self, cfg, heads, params, state, start, tokens, off, hidden):
        """During the prefill, for each chunk of tokens from `off`: the backbone's hidden states `[B, c, E]` ->
        the state."""

    def prefilled(self, state, last):
        """After the prefill: the hidden state of each row's last prompt token `[B, E]` -> the state."""

    def observe(self, state, hidden, path_nodes, path_tokens, count, live):
        """After acceptance: the verification's hidden states `[B, L, E]`, the accepted path's nodes and tokens
        `[B, path_len]` (`count` `[B]` of them kept), rows still `live` `[B]` -> the state."""


class FeatureDrafter:
    """A feature-level drafter: depth by depth, each node with children runs the drafter's layer on its parent's
    predicted feature and its own token, attending to the drafter's cache and its own path; its top-k are its
    children. Returns its state (the cache with the last step's accepted entries written) third."""

    def nodes(self, tree):
        return head_nodes(tree)

    def start(self, cfg, heads, params, state, start, tokens, slots, path_len):
        if state is None:
            state = fd.empty_state(cfg, tokens.shape[0], slots, path_len)
        return fd.prompt_start(cfg, heads, params, state, start, tokens)

    def prefill(self, cfg, heads, params, state, start, tokens, off, hidden):
        return fd.prompt_chunk(cfg, heads, params, state, start, tokens, off, hidden)

    def prefilled(self, state, last):
        return fd.prompt_end(state, last)

    def observe(self, state, hidden, path_nodes, path_tokens, count, live):
        return fd.end_step(state, hidden, path_nodes, path_tokens, count, live)

    def propose(self, ctx, tree, cand):
        cfg, heads, params, dtype = ctx.cfg, ctx.heads, ctx.params, ctx.matmul_dtype
        st, g_root = fd.begin_step(cfg, heads, params, ctx.draft, ctx.lengths, ctx.root)
        if isinstance(tree, DynamicTree):
            tokens, valid, parent, depth = fd.draft_dynamic(
                cfg, heads, params, st.k, st.v, ctx.lengths, g_root, tree, dtype
            )
            return tokens, valid, st, (parent, depth)
        b, n = cand.shape
        feats = jnp.zeros((b, n, g_root.shape[-1]), jnp.float32).at[:, 0].set(g_root)  # each node's prediction
        kh, slots, d = st.k.shape[1:]
        nk = jnp.zeros((b, n, kh, d), jnp.float32)  # each node's entry's K/V
        nv = jnp.zeros_like(nk)
        seen = jnp.arange(slots)[None, None, :] < ctx.lengths[:, None, None]  # [B, 1, S]
        for d, (kids, parents, slot, rank, anc) in enumerate(depth_plan(tree), start=1):
            par = jnp.asarray(parents)
            if d > 1:  # the parents' entries: their parent's prediction and their own token, at depth d-1
                grand = jnp.asarray(anc[:, -2]) if d > 2 else jnp.zeros((len(parents),), jnp.int32)
                x = fd.fuse(cfg, heads, feats[:, grand], fd.embed(params, cand[:, par]))
                pos = jnp.broadcast_to(ctx.lengths[:, None] + d - 2, (b, len(parents)))
                q, k, v = fd.project(cfg, heads, x, pos)
                nk, nv = nk.at[:, par].set(k), nv.at[:, par].set(v)
                path = jnp.asarray(anc)  # [p, d-1]: the parents' paths, themselves last
                mask = jnp.broadcast_to(seen, (b, len(parents), seen.shape[-1]))
                g = fd.finish(cfg, heads, x, fd.attend(q, st.k, st.v, mask, nk[:, path], nv[:, path]))
                feats = feats.at[:, par].set(g)
            logits, ids = fd.vocab_logits(heads, params, feats[:, par], dtype)  # [B, p, Vd]
            top = top_candidates(logits, int(rank.max()) + 1)
            if ids is not None:
                top = ids[top]
            cand = cand.at[:, jnp.asarray(kids)].set(top[:, jnp.asarray(slot), jnp.asarray(rank)])
        return cand[:, jnp.asarray(head_nodes(tree))], None, st


class LookupChain:
    """The lookup chain's nodes (after the heads' nodes): prompt-lookup drafts, `valid` where one was found."""

    def nodes(self, tree):
        return np.arange(tree.num_nodes - tree.lookup, tree.num_nodes, dtype=np.int32)

    def propose(self, ctx, tree, cand):
        return lookup_draft(ctx.seq, ctx.lengths, ctx.root, tree.lookup)


def drafters_for(heads: dict | None, tree: TreeBuffers) -> tuple[Drafter, ...]:
    """The drafters of a tree: the heads' kind for its head nodes, the lookup chain for its chain."""
    out: list[Drafter] = []
    if tree.head_depth:
        if heads is None:
            raise ValueError(f"the tree has {tree.head_depth} levels of head nodes but there are no heads")
        if isinstance(tree, DynamicTree) and not fd.is_feature(heads):
            raise ValueError(
                f"{tree!r} needs a drafter that conditions on its path (a feature drafter, such as the head set "
                "smollm2_feature); with these heads use a static tree (mc_sim_7b_63, or a calibrated one)"
            )
        if fd.is_feature(heads):
            out.append(FeatureDrafter())
        else:
            out.append(SequentialHeads() if is_sequential(heads) else MedusaHeads())
    if tree.lookup:
        out.append(LookupChain())
    return tuple(out)


def stateful_drafter(heads: dict | None, tree: TreeBuffers) -> StatefulDrafter | None:
    """The tree's drafter that carries state through the loop, or None."""
    return next((d for d in drafters_for(heads, tree) if hasattr(d, "observe")), None)


def draft_tree(ctx: DraftContext, tree) -> tuple[jax.Array, jax.Array | None, object, StepTree | None]:
    """The step's candidates `[B, L]` (node 0 = the root), valid `[B, L]` (None: every node holds a draft), the
    stateful drafter's new state (`ctx.draft` when there is none) and, for a `DynamicTree`, the step's tree
    (`StepTree`; None for a static tree)."""
    b = ctx.root.shape[0]
    cand = jnp.zeros((b, tree.num_nodes), jnp.int32).at[:, 0].set(ctx.root)
    valid, state = None, ctx.draft
    shape = chain_shape(tree, b) if isinstance(tree, DynamicTree) else None
    for drafter in drafters_for(ctx.heads, tree):
        nodes = jnp.asarray(drafter.nodes(tree))
        tokens, ok, *rest = drafter.propose(ctx, tree, cand)
        if rest:
            state = rest[0]
        if len(rest) > 1:
            parent, depth = rest[1]
            shape = StepTree(shape.parent.at[:, nodes].set(parent), shape.depth.at[:, nodes].set(depth))
        cand = cand.at[:, nodes].set(tokens.astype(jnp.int32))
        if ok is not None:
            valid = jnp.ones(cand.shape, bool) if valid is None else valid
            valid = valid.at[:, nodes].set(ok)
    return cand, valid, state, shape


__all__ = [
    "DraftContext",
    "Drafter",
    "FeatureDrafter",
    "StatefulDrafter",
    "StepTree",
    "LookupChain",
    "MedusaHeads",
    "SequentialHeads",
    "draft_tree",
    "drafters_for",
    "stateful_drafter",
    "medusa_tokens",
    "tree_candidates",
]
