"""Greedy tokens per step of any tree (and lookup chain), exactly, from one teacher-forced forward per answer.

Greedy Medusa decoding of a prompt is a walk over the model's own greedy answer x: at cache length L the root is
x[L]; the heads' tree accepts its longest path whose ranks match (`head_ranks`: the rank of x[L+1+h] among head h's
candidates at position L-1, where root-token heads see x[L]); the lookup chain accepts the longest prefix of its
draft (`lookup_continuation`) that matches x[L+1:]; the step moves L on by one plus the better of the two. One
forward over prompt + answer therefore gives every step's verdict, so trees and chains that would each take
minutes of real decoding on a CPU are compared in seconds, on the same answers (`tools/simulate_steps.py`). The
step counts equal the real decode loop's (tests/test_simulate.py; on SmolLM2's dev answers, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import feature_drafter as fd
from medusa_jax.generation import bucket
from medusa_jax.heads import base_lm_head, draft_columns, draft_logits, is_sequential, root_embedding, uses_root
from medusa_jax.lookup import NGRAM
from medusa_jax.ranking import candidate_rank
from medusa_jax.tree import DynamicTree, TreeBuffers

UNPROPOSABLE = 1 << 30  # the rank of a token outside the heads' draft vocabulary


@functools.partial(jax.jit, static_argnums=(0,))
def _ranks(dtype, heads, lm, embed, hidden, targets, roots, col):
    """hidden `[T, E]`, targets `[K, T]`, roots `[T]` -> rank `[K, T]` of each target among the head's candidates
    (`ranking.candidate_rank`: the decode loop's order, ties included)."""
    root_emb = root_embedding({"embed": embed}, roots) if uses_root(heads) else None
    path_emb = None  # sequential heads: on the answer's path, the drafted tokens are the answer's (teacher forcing)
    if is_sequential(heads):
        path_emb = root_embedding({"embed": embed}, jnp.maximum(targets[:-1].T, 0))  # [T, K-1, E]
    logits, _ = draft_logits(heads, hidden, lm, dtype, root_emb, None, path_emb)  # [K, T, Vd]
    t = targets if col is None else col[targets]
    return jnp.where(t >= 0, candidate_rank(logits, jnp.maximum(t, 0)), UNPROPOSABLE)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _feature_ranks(cfg, depth, heads, params, hidden, tokens, targets, col):
    """A feature drafter's ranks: hidden `[T, E]`, tokens `[T]`, targets `[K, T]` -> `[K, T]` (`fd.unroll`: level
    h+1 at t is the depth-(h+1) node's prediction on the answer's path when the cache ends at t)."""
    g = fd.unroll(cfg, heads, params, hidden[None], tokens[None], depth)[:, 0]  # [K, T, E]
    logits, _ = fd.vocab_logits(heads, params, g, cfg.jnp_matmul_dtype)
    t = targets if col is None else col[targets]
    return jnp.where(t >= 0, candidate_rank(logits, jnp.maximum(t, 0)), UNPROPOSABLE)


FEATURE_SIM_DEPTH = 8  # depths of a feature drafter's ranks the simulator computes by default


def head_ranks(model, seq: list[int], depth: int | None = None) -> np.ndarray:
    """`[K, T]`: the rank of seq[t+h+2] among head h's candidates at position t (root-token heads see seq[t+1]), over
    the draft vocabulary when the heads have one (`UNPROPOSABLE` outside it, and where t+h+2 is past the end).
    A feature drafter's depth h+1 nodes on the answer's path stand for head h (K = `depth`, default 8)."""
    heads = model.heads
    feature = fd.is_feature(heads)
    k, n = depth or (FEATURE_SIM_DEPTH if feature else model.heads_config.num_heads), len(seq)
    targets = np.zeros((k, n), np.int32)
    for h in range(k):
        targets[h, : max(n - h - 2, 0)] = seq[h + 2 :]
    col = None
    if "draft" in heads:  # token -> its column in the draft vocabulary (-1: not proposable)
        ids = heads["draft"]["ids"]
        col = draft_columns(ids, model.cfg.vocab_size)
    hidden = model.forward([seq]).hidden[0]  # [n, E]
    pad = bucket(n, 16) - n  # a bucketed length: one compile per bucket, not per answer length
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets = np.pad(targets, ((0, 0), (0, pad)), constant_values=-1)
    roots = jnp.asarray(seq[1:] + [0] * (1 + pad), jnp.int32)  # the token after t (on greedy answers: the root at t)
    if feature:
        toks = jnp.asarray(list(seq) + [0] * pad, jnp.int32)
        rank = np.array(_feature_ranks(model.cfg, k, heads, model.params, hidden, toks, jnp.asarray(targets), col))
    else:
        lm, embed = base_lm_head(model.params), model.params["embed"]
        rank = np.array(_ranks(model.cfg.jnp_matmul_dtype, heads, lm, embed, hidden, jnp.asarray(targets), roots, col))
    rank = rank[:, :n]
    for h in range(k):
        rank[h, max(n - h - 2, 0) :] = UNPROPOSABLE
    return rank


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dynamic_trees(cfg, tree: DynamicTree, heads, params, hidden, tokens, anchors):
    """hidden `[T, E]`, tokens `[T]`, anchors `[A]` -> the dynamic tree the decode loop drafts when its cache ends
    at each anchor (`fd.draft_dynamic`'s tokens, valid, parents and depths `[A, size]`)."""
    t = hidden.shape[0]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    x = fd.fuse(cfg, heads, hidden[None], fd.embed(params, fd.shifted(tokens[None], 1)))
    q, k, v = fd.project(cfg, heads, x, pos)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [1, KH, T, D]: every true entry
    g = fd.finish(cfg, heads, x, fd.attend(q, k, v, pos[:, :, None] >= pos[:, None, :]))[0]  # [T, E]
    a = anchors.shape[0]
    ck, cv = (jnp.broadcast_to(c, (a, *c.shape[1:])) for c in (k, v))
    return fd.draft_dynamic(cfg, heads, params, ck, cv, anchors + 1, g[anchors], tree, cfg.jnp_matmul_dtype)


def dynamic_reach(model, seq: list[int], n_prompt: int, tree: DynamicTree, hidden=None) -> np.ndarray:
    """`[T]`: how deep the dynamic tree drafted when the cache ends at t holds the answer (seq[t+2], seq[t+3], ...
    down one path), for t from the prompt's last token on: a feature drafter's `tree_acc` in `walk`. hidden: the
    backbone's features of seq `[T, E]` (None: computed)."""
    n = len(seq)
    hidden = model.forward([seq]).hidden[0] if hidden is None else hidden  # [n, E]
    pad = bucket(n, 16) - n
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    toks = jnp.asarray(list(seq) + [0] * pad, jnp.int32)
    first = max(n_prompt - 1, 0)
    anchors = np.arange(first, max(n - 1, first + 1))
    anchors = np.pad(anchors, (0, bucket(len(anchors), 16) - len(anchors)), mode="edge")
    out = _dynamic_trees(model.cfg, tree, model.heads, model.params, hidden, toks, jnp.asarray(anchors, jnp.int32))
    tok, valid, parent, depth = (np.asarray(x) for x in out)
    ahead = np.full(n + tree.head_depth + 2, -1, np.int64)
    ahead[:n] = seq
    node = np.zeros(len(anchors), np.int64)  # 0: the root; drafted nodes are 1 .. size
    alive = np.ones(len(anchors), bool)
    reach = np.zeros(len(anchors), np.int32)
    for d in range(1, tree.head_depth + 1):
        want = ahead[anchors + 1 + d]
        match = (parent == node[:, None]) & (tok == want[:, None]) & valid & (depth == d)
        alive &= match.any(axis=1)
        node = np.where(alive, np.argmax(match, axis=1) + 1, node)
        reach += alive
    out = np.zeros(n, np.int32)
    out[anchors] = reach
    return out


def lookup_continuation(ctx: list[int], size: int, ngram: int = NGRAM) -> list[int]:
    """What followed the latest earlier occurrence of ctx's last n-gram (n = ngram down to 1, the longest that
    occurs wins), at most `size` tokens and never past ctx's end: the lookup chain's draft (`lookup.lookup_draft`)."""
    for n in range(ngram, 0, -1):
        for s in range(len(ctx) - n - 1, -1, -1):
            if len(ctx) > n and ctx[s : s + n] == ctx[-n:]:
                return ctx[s + n : s + n + size]
    return []


def walk(
    seq: list[int], n_prompt: int, rank: np.ndarray, tree: TreeBuffers, accepted: list | None = None
) -> tuple[int, int]:
    """Greedy decoding of the answer `seq[n_prompt:]` with `tree` -> (steps, steps' tokens that only the lookup chain
    gave, beyond what the heads' tree accepted). `accepted`, if given, gets each step's count of tree tokens
    accepted (the heads' depth reached, 0 to `tree.head_depth`)."""
    dynamic = isinstance(tree, DynamicTree)
    paths = set() if dynamic else set(tree.choices)
    n, length, steps, from_chain = len(seq), n_prompt, 0, 0
    while length < n:
        t, tree_acc = length - 1, 0
        if dynamic:  # `rank` is `dynamic_reach`'s
            tree_acc = int(rank[t])
        for d in range(1, 0 if dynamic else tree.head_depth + 1):
            if tuple(int(rank[h, t]) for h in range(d)) not in paths:
                break
            tree_acc = d
        chain_acc = 0
        if tree.lookup:
            draft = lookup_continuation(seq[: length + 1], tree.lookup)
            ahead = seq[length + 1 : length + 1 + len(draft)]
            while chain_acc < len(ahead) and draft[chain_acc] == ahead[chain_acc]:
                chain_acc += 1
        acc = min(max(tree_acc, chain_acc), n - length - 1)
        from_chain += max(0, acc - tree_acc)
        if accepted is not None:
            accepted.append(tree_acc)
        length += 1 + acc
        steps += 1
    return steps, from_chain


def answer_ranks(model, answers, depth: int | None = None, tree=None) -> list[tuple[list[int], int, np.ndarray]]:
    """answers: (prompt ids, greedy answer ids) pairs -> (sequence, prompt length, `head_ranks`) per answer; with a
    `DynamicTree` `tree`, its `dynamic_reach` instead (the drafted trees depend on the tree's settings)."""
    out = []
    for prompt_ids, output_ids in answers:
        seq = [int(i) for i in prompt_ids] + [int(i) for i in output_ids]
        if isinstance(tree, DynamicTree):
            out.append((seq, len(prompt_ids), dynamic_reach(model, seq, len(prompt_ids), tree)))
        else:
            out.append((seq, len(prompt_ids), head_ranks(model, seq, depth)))
    return out


def tokens_per_step(ranked, tree: TreeBuffers) -> dict:
    """`answer_ranks` output, a tree -> steps, tokens, tokens per step, the lookup chain's share of it, and the
    acceptance per depth: the fraction of steps whose tree accepted a head-d draft (d = 1 .. the tree's depth)."""
    steps = tokens = chain = 0
    accepted: list[int] = []
    for seq, n_prompt, rank in ranked:
        s, c = walk(seq, n_prompt, rank, tree, accepted)
        steps, tokens, chain = steps + s, tokens + len(seq) - n_prompt, chain + c
    acc = np.asarray(accepted)
    return {
        "accepted_at_depth": [
            round(float(np.mean(acc >= d)) if acc.size else 0.0, 4) for d in range(1, tree.head_depth + 1)
        ],
        "nodes": tree.num_nodes - 1,
        "steps": steps,
        "tokens": tokens,
        "tokens_per_step": round(tokens / max(steps, 1), 4),
        "lookup_tokens_per_step": round(chain / max(steps, 1), 4),
    }


__all__ = [
    "UNPROPOSABLE",
    "answer_ranks",
    "dynamic_reach",
    "head_ranks",
    "lookup_continuation",
    "tokens_per_step",
    "walk",
]
