"""The lookup chain: context n-gram drafts (prompt lookup) verified with the tree; greedy output unchanged."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_medusa import random_prompts, tiny_model

from medusa_jax.lookup import lookup_draft
from medusa_jax.medusa_decode import resolve_tree, tree_children
from medusa_jax.simulate import lookup_continuation
from medusa_jax.tree import build_buffers


def test_draft_matches_python_reference():
    rng = np.random.default_rng(0)
    b, s, size = 8, 40, 5
    for _ in range(20):
        seq = rng.integers(0, 4, (b, s))
        lengths = rng.integers(0, s - 1, b)
        root = rng.integers(0, 4, b)
        seq[0, :3] = -1  # unknown slots (a chat's history not given) never match
        draft, valid = lookup_draft(jnp.asarray(seq, jnp.int32), jnp.asarray(lengths), jnp.asarray(root), size)
        draft, valid = np.asarray(draft), np.asarray(valid)
        for r in range(b):
            ctx = [int(t) for t in seq[r, : lengths[r]]] + [int(root[r])]
            if r == 0:
                ctx = ctx[3:] if lengths[r] >= 3 else ctx[lengths[r] :]
            assert draft[r][valid[r]].tolist() == lookup_continuation(ctx, size, 3)
            assert (draft[r][~valid[r]] == root[r]).all() and valid[r].tolist() == sorted(valid[r], reverse=True)


def test_chain_buffers():
    t = build_buffers([[0], [1], [0, 0]], topk=2, lookup=3)
    assert (t.num_nodes, t.head_depth, t.depth, t.num_paths) == (7, 2, 3, 3)
    assert t.position_ids.tolist() == [0, 1, 1, 2, 1, 2, 3]
    assert t.tree_indices.tolist()[4:] == [5, 6, 7]  # after root + 2 heads x topk 2
    assert t.attn_mask[6].tolist() == [1, 0, 0, 0, 1, 1, 1] and t.attn_mask[3].tolist() == [1, 1, 0, 1, 0, 0, 0]
    assert t.retrieve_indices[-1].tolist() == [0, 4, 5, 6]
    assert tree_children(t)[0].tolist() == [1, 2, 4]  # the chain's first node: the root's last child
    plain = build_buffers([[0], [1], [0, 0]], topk=2)
    assert t != plain and hash(t) != hash(plain) and "lookup=3" in repr(t)
    assert resolve_tree(plain, 2, lookup=3) == t and resolve_tree(t, 2) is t
    with pytest.raises(ValueError, match="lookup"):
        build_buffers([[0]], lookup=-1)


@pytest.mark.parametrize("tree", [[], [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]], ids=["lookup-only", "tree"])
def test_greedy_output_unchanged_and_repeats_accepted(tree):
    m = tiny_model(vocab=16, heads=3, seed=1)
    prompts = random_prompts(5, 16, seed=3)
    prompts[0] = [3, 4, 5, 6, 7] * 4  # a prompt that repeats itself
    ar = m.generate(prompts, max_new_tokens=40, mode="ar")
    without = m.generate(prompts, max_new_tokens=40, mode="medusa", tree=tree, topk=4, lookup=0)
    chained = m.generate(prompts, max_new_tokens=40, mode="medusa", tree=tree, topk=4, lookup=6)
    single = m.generate(prompts[:1], max_new_tokens=40, mode="medusa", tree=tree, topk=4, lookup=6)
    assert [r.output_ids for r in chained] == [r.output_ids for r in ar]
    assert single[0].output_ids == ar[0].output_ids and single[0].steps == chained[0].steps
    assert sum(r.steps for r in chained) < sum(r.steps for r in without)  # the chain drafts accepted tokens
    if not tree:
        assert [r.steps for r in without] == [r.new_tokens for r in ar]  # root only: one token per step
