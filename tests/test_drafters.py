"""Drafters: sequential heads draft each node's children from that node's own path; Medusa heads give every node
of a depth the same children; the drafters compose into the tree the acceptance rules judge."""

import jax
import jax.numpy as jnp
import numpy as np
from test_medusa import random_prompts, tiny_model

from medusa_jax.drafters import DraftContext, LookupChain, MedusaHeads, SequentialHeads, draft_tree, drafters_for
from medusa_jax.heads import base_lm_head, heads_logits, root_embedding
from medusa_jax.tree import build_buffers

# two or more parents at every depth, ranks up to 3
TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [1, 2], [2, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1], [1, 2, 0]]


def context(m, b=4, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, m.cfg.hidden_size)), jnp.float32)
    root = jnp.asarray(rng.integers(0, m.cfg.vocab_size, b), jnp.int32)
    return DraftContext(m.params, m.heads, root, hidden, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32))


def test_each_nodes_children_are_the_top_k_of_its_own_path():
    m = tiny_model(vocab=16, heads=3, seed=1, sequential=True)
    tree = build_buffers(TREE, topk=4)
    ctx = context(m)
    cand, valid, _, shape = draft_tree(ctx, tree)
    assert shape is None  # a static tree
    assert valid is None and cand.shape == (4, len(TREE) + 1)
    assert (cand[:, 0] == ctx.root).all()
    node = {tuple(p): i + 1 for i, p in enumerate(tree.choices)}
    emb = lambda t: root_embedding(m.params, t)  # noqa: E731
    k = 3
    for path, i in node.items():
        d = len(path)
        drafted = [cand[:, node[path[:c]]] for c in range(1, d)]  # the node's path tokens at depths 1..d-1
        pad = [jnp.zeros_like(ctx.root)] * (k - 1 - len(drafted))
        path_emb = emb(jnp.stack(drafted + pad, axis=1))  # [B, K-1, E], teacher-forced form
        logits = heads_logits(m.heads, ctx.hidden, base_lm_head(m.params), root_emb=emb(ctx.root), path_emb=path_emb)
        want = jax.lax.top_k(logits[d - 1], 4)[1][:, path[-1]]
        np.testing.assert_array_equal(cand[:, i], want, err_msg=str(path))
    # siblings' children differ: the heads really condition on the path
    assert (cand[:, node[(0, 0)]] != cand[:, node[(1, 0)]]).any()


def test_medusa_heads_give_every_node_of_a_depth_the_same_children():
    m = tiny_model(vocab=16, heads=3, seed=1, root_token=True)
    tree = build_buffers(TREE, topk=4, lookup=3)
    assert [type(d) for d in drafters_for(m.heads, tree)] == [MedusaHeads, LookupChain]
    assert [type(d) for d in drafters_for(tiny_model(16, 3, 1, True, True).heads, tree)][0] is SequentialHeads
    ctx = context(m).replace(seq=jnp.full((4, 32), -1, jnp.int32), lengths=jnp.full((4,), 5, jnp.int32))
    cand, valid, _, shape = draft_tree(ctx, tree)
    assert shape is None  # a static tree
    node = {tuple(p): i + 1 for i, p in enumerate(tree.choices)}
    np.testing.assert_array_equal(cand[:, node[(0, 0)]], cand[:, node[(1, 0)]])
    np.testing.assert_array_equal(cand[:, node[(0, 1, 0)]], cand[:, node[(1, 2, 0)]])
    assert valid.shape == cand.shape and valid[:, : len(TREE) + 1].all()  # the chain's nodes: found or not


def test_sequential_heads_decode_as_plain_greedy():
    m = tiny_model(vocab=16, heads=3, seed=1, sequential=True)
    prompts = random_prompts(5, 16, seed=3)
    ar = m.generate(prompts, max_new_tokens=24, mode="ar")
    md = m.generate(prompts, max_new_tokens=24, mode="medusa", tree=TREE, topk=4, lookup=4)
    assert [r.output_ids for r in md] == [r.output_ids for r in ar]
