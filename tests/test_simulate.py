"""The step simulator: from one forward per greedy answer, the same step count as the real decode loop."""

import pytest
from test_medusa import random_prompts, tiny_model

from medusa_jax.heads import attach_draft_vocab, base_lm_head
from medusa_jax.simulate import UNPROPOSABLE, answer_ranks, head_ranks, tokens_per_step, walk
from medusa_jax.tree import build_buffers

TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    "root_token,draft,sequential",
    [(False, False, False), (True, True, True)],
    ids=["plain", "sequential+draft"],
)
def test_walk_gives_the_decode_loops_steps(root_token, draft, sequential):
    """Plain heads, and sequential heads (root-token heads that also see their path) with a draft vocabulary, whose
    tree nodes draft their children from their own paths: the simulator
    teacher-forces the answer's tokens as the path, which is the loop's only on the accepted path, so the step
    counts agree only if each node's children come from that node's path."""
    m = tiny_model(vocab=16, heads=3, seed=1, root_token=root_token, sequential=sequential)
    if draft:  # heads that propose from 10 of the 16 tokens: the others are never in the tree
        m.heads = attach_draft_vocab(m.heads, base_lm_head(m.params), list(range(0, 16, 2)) + [1, 3])
    prompts = random_prompts(6, 16, seed=3)
    prompts[0] = [3, 4, 5, 6, 7] * 4  # a prompt that repeats itself: the lookup chain drafts from it
    ar = m.generate(prompts, max_new_tokens=40, mode="ar")
    ranked = answer_ranks(m, [(r.prompt_ids, r.output_ids) for r in ar])
    for tree, lookup in ((TREE, 0), (TREE, 6), ([], 6), ([[0], [0, 0]], 0)):
        buffers = build_buffers(tree, topk=4, lookup=lookup)
        real = m.generate(prompts, max_new_tokens=40, mode="medusa", tree=buffers)
        assert [r.output_ids for r in real] == [r.output_ids for r in ar]
        assert [walk(seq, n, rank, buffers)[0] for seq, n, rank in ranked] == [r.steps for r in real]
        report = tokens_per_step(ranked, buffers)
        assert report["steps"] == sum(r.steps for r in real) and report["tokens"] == sum(r.new_tokens for r in ar)
        assert (report["lookup_tokens_per_step"] > 0) == (lookup > 0)
        # acceptance per depth: non-increasing, and its sum counts the tree's accepted tokens per step
        at = report["accepted_at_depth"]
        assert len(at) == buffers.head_depth and at == sorted(at, reverse=True)
        tree_tokens = report["tokens"] - report["steps"] - report["lookup_tokens_per_step"] * report["steps"]
        assert sum(at) * report["steps"] == pytest.approx(tree_tokens, abs=0.01 * report["steps"])
        if tree and not lookup:  # the heads' tree alone accepted tokens (steps < tokens)
            assert report["steps"] < report["tokens"]


def test_ties_rank_as_the_decode_loop():
    """Heads whose logits tie exactly (each odd token's draft column copies the even one below it): the simulator
    ranks the tied tokens in the decode loop's order (lower column first), so the step counts still agree."""
    m = tiny_model(vocab=16, heads=3, seed=1)
    m.heads = attach_draft_vocab(m.heads, base_lm_head(m.params), list(range(16)))
    kernel = m.heads["draft"]["kernel"]
    kernel = kernel.at[..., 1::2].set(kernel[..., 0::2])
    m.heads = dict(m.heads, draft=dict(m.heads["draft"], kernel=kernel))
    prompts = random_prompts(3, 16, seed=3)
    ar = m.generate(prompts, max_new_tokens=24, mode="ar")
    ranked = answer_ranks(m, [(r.prompt_ids, r.output_ids) for r in ar])
    odd_targets = sum(int(t) % 2 for r in ar for t in r.output_ids)
    assert odd_targets > 10  # the answers do hit the tied tokens
    buffers = build_buffers(TREE, topk=4)
    real = m.generate(prompts, max_new_tokens=24, mode="medusa", tree=buffers)
    assert [r.output_ids for r in real] == [r.output_ids for r in ar]
    assert [walk(seq, n, rank, buffers)[0] for seq, n, rank in ranked] == [r.steps for r in real]
    assert sum(r.steps for r in real) < sum(r.new_tokens for r in real)


def test_head_ranks_of_a_forward():
    m = tiny_model(vocab=16, heads=2, seed=2)
    seq = random_prompts(1, 16, seed=4)[0] + [1, 2, 3]
    rank = head_ranks(m, seq)
    logits = m.forward([seq]).medusa_logits[:, 0]  # [K, T, V]
    n = len(seq)
    assert rank.shape == (2, n)
    for h in range(2):
        for t in range(n - h - 2):
            assert rank[h, t] == int((logits[h, t] > logits[h, t, seq[t + h + 2]]).sum())
        assert (rank[h, n - h - 2 :] == UNPROPOSABLE).all()  # no target past the end
