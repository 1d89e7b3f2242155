"""Lossless tree sampling: recursive rejection sampling keeps the base model's distribution (chi-square tests
against the exact probabilities of a tiny model and of a bigram table, with top-k and top-p), while wrong rules
(accept every candidate; accept a duplicate sibling; skip the residual's renormalisation; forget the rejected tokens
at the next root) are caught by the same tests."""

import dataclasses
import functools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_medusa import random_prompts, tiny_model

from medusa_jax.medusa_decode import tree_children
from medusa_jax.tree import DynamicTree, build_buffers

TREE = [[0], [1], [2], [3], [4], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]]
PROMPT = [1, 2, 3, 4, 5]
TEMPERATURE = 0.8
N = 20_000


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; categories with expected count < 5 are pooled."""
    n = counts.sum()
    expected = n * probs / probs.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    stat = float(((counts - expected) ** 2 / np.maximum(expected, 1e-12)).sum())
    df = len(counts) - 1
    return float(jax.scipy.special.gammaincc(df / 2, stat / 2))


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=8, heads=3, seed=3)


@pytest.fixture(scope="module")
def exact(model):
    """Exact conditionals of the first three new tokens at TEMPERATURE: p1 [V], p2 [V, V], p3 [V, V, V]."""
    v = model.cfg.vocab_size
    seqs = np.array([PROMPT + [a, b] for a in range(v) for b in range(v)], np.int32)
    logits = np.asarray(model.forward(seqs).logits, np.float64) / TEMPERATURE
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    n = len(PROMPT)
    p1 = probs[0, n - 1]
    p2 = probs[::v, n]  # rows (a, 0): the distribution after a
    p3 = probs[:, n + 1].reshape(v, v, v)
    return p1, p2, p3


def sample(model, tree=TREE, **kw):
    res = model.generate([PROMPT] * N, max_new_tokens=3, temperature=TEMPERATURE, tree=tree, topk=5,
                         batch_size=N, mode="medusa", seed=11, **kw)  # fmt: skip
    out = np.array([r.output_ids for r in res])
    steps = np.array([r.steps for r in res])
    return out, steps


def pvalues(out: np.ndarray, exact, top: int = 3) -> list[float]:
    """p-values of: the first token; the second given each of the `top` most frequent first tokens; the third
    given each of the `top` most frequent two-token prefixes. The first token is the prefill's root, a plain sample
    (no rejection happens before it): its p-value checks the harness; the later ones test rejection sampling."""
    p1, p2, p3 = exact
    v = len(p1)
    ps = [chi2_pvalue(np.bincount(out[:, 0], minlength=v), p1)]
    for (a,), _ in Counter(map(tuple, out[:, :1])).most_common(top):
        sel = out[out[:, 0] == a]
        ps.append(chi2_pvalue(np.bincount(sel[:, 1], minlength=v), p2[a]))
    for (a, b), _ in Counter(map(tuple, out[:, :2])).most_common(top):
        sel = out[(out[:, 0] == a) & (out[:, 1] == b)]
        ps.append(chi2_pvalue(np.bincount(sel[:, 2], minlength=v), p3[a, b]))
    return ps


def test_rejection_sampling_keeps_the_distribution(model, exact):
    out, steps = sample(model, acceptance="rejection")
    assert out.shape == (N, 3)
    ps = pvalues(out, exact)
    assert len(ps) == 7 and min(ps) > 1e-3, ps
    assert 3 / steps.mean() > 1.0  # the tree path is exercised: more than one token per step on average
    assert (steps < 3).mean() > 0.3


def test_rejection_sampling_with_a_lookup_chain_keeps_the_distribution(model, exact):
    """The chain's drafts (what followed the root in the prompt) often repeat a head's guess that was just rejected:
    that token then has residual probability 0."""
    out, steps = sample(model, acceptance="rejection", lookup=2)
    assert min(pvalues(out, exact)) > 1e-3
    assert 3 / steps.mean() > 1.0


@pytest.fixture(scope="module")
def sequential_model():
    """The same backbone (the same exact distributions) with sequential heads: children drafted per parent."""
    return tiny_model(vocab=8, heads=3, seed=3, sequential=True)


def test_sequential_heads_rejection_sampling_keeps_the_distribution(sequential_model, exact):
    out, steps = sample(sequential_model, acceptance="rejection")
    assert min(pvalues(out, exact)) > 1e-3
    assert 3 / steps.mean() > 1.0


@pytest.fixture(scope="module")
def feature_model(model):
    from medusa_jax.feature_drafter import init_feature_drafter

    return dataclasses.replace(model, heads=init_feature_drafter(model.params, seed=2, scale=0.3))


def test_feature_drafter_rejection_sampling_keeps_the_distribution(feature_model, exact):
    """A feature drafter (its own K/V cache in the loop, each node's children from its own path) on the same
    backbone: the same exact distributions."""
    out, steps = sample(feature_model, acceptance="rejection")
    assert min(pvalues(out, exact)) > 1e-3
    assert 3 / steps.mean() > 1.0


def test_dynamic_tree_rejection_sampling_keeps_the_distribution(feature_model, exact):
    """A dynamic tree (each step's shape from the drafter's confidence, every node's children judged against that
    node's own distribution) with a lookup chain: the same exact distributions."""
    out, steps = sample(feature_model, tree=DynamicTree(size=9, head_depth=3, topk=4, beam=2), acceptance="rejection",
                        lookup=2)  # fmt: skip
    assert min(pvalues(out, exact)) > 1e-3
    assert 3 / steps.mean() > 1.0


def test_dynamic_tree_judged_by_the_wrong_parent_fails_the_same_test(feature_model, exact, monkeypatch):
    """Negative control for the dynamic tree's children table: every node's children judged against the root's
    distribution is caught."""
    from medusa_jax import medusa_decode

    wrong = mutant("logits[rows, slot[rows, cur]]", "logits[rows, slot[rows, cur * 0]]")
    monkeypatch.setattr(medusa_decode, "rejection_paths", wrong)
    medusa_decode.generate_medusa.clear_cache()
    try:
        out, _ = sample(feature_model, tree=DynamicTree(size=9, head_depth=3, topk=4, beam=2), acceptance="rejection")
    finally:
        medusa_decode.generate_medusa.clear_cache()
    assert min(pvalues(out, exact)) < 1e-6


def test_judging_children_by_the_wrong_parent_fails_the_same_test(sequential_model, exact, monkeypatch):
    """Negative control: every node's children judged against the root's distribution instead of their own
    parent's (a wrong per-parent distribution) is caught."""
    from medusa_jax import medusa_decode

    wrong = mutant("logits[rows, slot[rows, cur]]", "logits[rows, slot[rows, cur * 0]]")
    monkeypatch.setattr(medusa_decode, "rejection_paths", wrong)
    medusa_decode.generate_medusa.clear_cache()  # trace again with the mutant
    try:
        out, _ = sample(sequential_model, acceptance="rejection")
    finally:
        medusa_decode.generate_medusa.clear_cache()
    assert min(pvalues(out, exact)) < 1e-6


def test_accepting_every_candidate_fails_the_same_test(model, exact):
    out, steps = sample(model, acceptance="typical", posterior_threshold=0.0, posterior_alpha=0.0)
    assert (steps == 1).all()  # every step takes a full path
    assert min(pvalues(out, exact)) < 1e-6


def test_rejection_is_the_default_for_sampling_and_greedy_at_low_temperature(model):
    prompts = random_prompts(4, 8, seed=2)
    ar = model.generate(prompts, max_new_tokens=16, mode="ar")
    cold = model.generate(prompts, max_new_tokens=16, mode="medusa", temperature=1e-4, acceptance="rejection",
                          tree=TREE, topk=5)  # fmt: skip
    assert [r.output_ids for r in cold] == [r.output_ids for r in ar]
    kw = dict(max_new_tokens=16, mode="medusa", temperature=1.0, tree=TREE, topk=5, seed=4)
    assert [r.output_ids for r in model.generate(prompts, **kw)] == [
        r.output_ids for r in model.generate(prompts, acceptance="rejection", **kw)
    ]


def test_tree_children_in_rank_order():
    t = build_buffers([[1], [0], [0, 1], [0, 0], [2]], topk=3)
    kids = tree_children(t)
    # nodes: 0 root, 1 [0], 2 [1], 3 [2], 4 [0, 0], 5 [0, 1]
    assert kids.shape == (6, 3)
    assert kids[0].tolist() == [1, 2, 3]
    assert kids[1].tolist() == [4, 5, -1]
    assert (kids[2:] == -1).all()
    assert tree_children(build_buffers([], topk=1)).tolist() == [[-1]]


def test_residual_root_avoids_rejected_tokens():
    """After the children of a node are rejected, the next token comes from the residual distribution."""
    from medusa_jax.medusa_decode import MedusaLoop, Thresholds, choose_root
    from medusa_jax.sampling import SamplingParams

    loop = MedusaLoop(build_buffers([[0]], topk=1), 16, 64, "rejection", ())
    logits = jnp.zeros((4096, 4))  # uniform over 4 tokens
    banned = jnp.tile(jnp.array([[2]], jnp.int32), (4096, 1))
    th = Thresholds(jnp.float32(0.09), jnp.float32(0.3))
    root = np.asarray(choose_root(logits, banned, jax.random.PRNGKey(0), loop, SamplingParams.make(1.0), th))
    counts = np.bincount(root, minlength=4)
    assert counts[2] == 0 and chi2_pvalue(counts[[0, 1, 3]], np.ones(3)) > 1e-3


# --- one decode step at a time on a bigram "model": every rule of the rejection step, cheaply, at high power ---
#
# The base model is a bigram table M (the next token's logits depend on the last token only), the heads propose
# from a table H[root] and the lookup chain drafts a head-0 candidate (a duplicate sibling) on even roots and a token
# outside the heads' top-5 on odd ones. Each row starts from its own token (mixed contexts in one batch), and the loop
# below is `medusa_step`'s: root from the banned residual, candidates, verify, accept. The first emitted token is a
# plain sample (no rejection happens before it); tokens 2 and 3 come through rejection sampling.

BV, BN = 8, 16_000
BIGRAM_TREE = build_buffers([[0], [1], [2], [3], [4], [0, 0], [0, 1], [1, 0]], topk=5, lookup=2)


def bigram_tables(seed=0):
    rng = np.random.default_rng(seed)
    m = rng.normal(0, 1.2, (BV, BV)).astype(np.float32)  # M[prev] -> next-token logits
    h = (m[None] + rng.normal(0, 1.0, (2, BV, BV))).astype(np.float32)  # H[k, root]: head k's logits
    return m, h


@functools.partial(jax.jit, static_argnums=0)
def _bigram_steps(reject, sp, key):
    """3 decode steps of BN rows started from tokens row % V -> (the first 3 tokens [BN, 3], counts of the chain's
    first node: tried, accepted, a duplicate tried and a duplicate accepted, over the steps after the first)."""
    from medusa_jax.drafters import tree_candidates
    from medusa_jax.medusa_decode import MedusaLoop, Thresholds, choose_root, tree_parents

    tree, n = BIGRAM_TREE, BN
    loop = MedusaLoop(tree, 16, 64, "rejection", ())
    th = Thresholds(jnp.float32(0.09), jnp.float32(0.3))
    m, h = map(jnp.asarray, bigram_tables())
    kids = tree_children(tree)
    root_kids = kids[0][kids[0] >= 0]
    head_kids, chain1 = jnp.asarray(root_kids[:-1]), int(root_kids[-1])
    internal = jnp.asarray(tree_parents(tree)[1])
    rows = jnp.arange(n)
    start = rows.astype(jnp.int32) % BV

    def step(carry, _):
        prev, banned, out, num, key = carry
        key, k_root, k_acc = jax.random.split(key, 3)
        root = choose_root(prev, banned, k_root, loop, sp, th)
        head_logits = h[:, root]  # [K, n, V]
        dup = root % 2 == 0
        first = jnp.where(dup, jax.lax.top_k(head_logits[0], 6)[1][:, 0], jax.lax.top_k(head_logits[0], 6)[1][:, 5])
        draft = jnp.stack([first, jnp.argmax(head_logits[1], -1)], 1).astype(jnp.int32)
        cand = tree_candidates(root, head_logits, tree, None, draft)
        acc, path, nodes, banned = reject(cand, m[cand[:, internal]], loop, sp, k_acc)
        keep = jnp.arange(path.shape[1])[None] <= acc[:, None]
        slots = jnp.where(keep, num[:, None] + jnp.arange(path.shape[1])[None], out.shape[1])
        out = out.at[rows[:, None], slots].set(path, mode="drop")
        tried = ~jnp.isin(nodes[:, 1], head_kids) | (acc == 0)
        took = nodes[:, 1] == chain1
        stats = jnp.stack([tried.sum(), took.sum(), (tried & dup).sum(), (took & dup).sum()])
        return (m[path[rows, acc]], banned, out, num + acc + 1, key), stats

    init = (m[start], jnp.full((n, kids.shape[1]), -1, jnp.int32), jnp.full((n, 3 * (tree.depth + 1)), -1,
            jnp.int32), jnp.zeros((n,), jnp.int32), key)  # fmt: skip
    (_, _, out, _, _), stats = jax.lax.scan(step, init, None, length=3)
    return out[:, :3], stats[1:].sum(0)  # step 0's root is the prompt's: no rejection before it


def run_bigram(reject, sp, seed=0):
    out, stats = _bigram_steps(reject, sp, jax.random.PRNGKey(seed))
    names = ("tried", "accepted", "duplicate_tried", "duplicate_accepted")
    return np.asarray(out), dict(zip(names, np.asarray(stats).tolist(), strict=True))


def bigram_pvalues(out, sp_args) -> list[float]:
    """p-values of token 2 given token 1 and of token 3 given token 2 (pooled chi-square over the 8 contexts),
    against HF's warpers applied to the bigram table."""
    from test_sampling import hf_process

    m, _ = bigram_tables()
    probs = np.exp(hf_process(m, *sp_args).astype(np.float64))
    probs /= probs.sum(-1, keepdims=True)
    ps = []
    for i in (0, 1):
        stat, df = 0.0, 0
        for a in range(BV):
            counts = np.bincount(out[out[:, i] == a, i + 1], minlength=BV)
            expected = counts.sum() * probs[a]
            support = expected > 0
            assert counts[~support].sum() == 0, f"token outside the filtered support after {a}"
            stat += float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
            df += int(support.sum()) - 1
        ps.append(float(jax.scipy.special.gammaincc(df / 2, stat / 2)))
    return ps


def mutant(old: str, new: str):
    """`rejection_paths` with one rule broken (its source with `old` replaced by `new`)."""
    import inspect
    import textwrap

    from medusa_jax import medusa_decode

    src = textwrap.dedent(inspect.getsource(medusa_decode.rejection_paths))
    assert src.count(old) == 1, f"rejection_paths no longer contains {old!r}: update this broken variant"
    scope = dict(vars(medusa_decode))
    exec(compile(src.replace(old, new), "<mutant>", "exec"), scope)
    return scope["rejection_paths"]


BROKEN = {
    "no-zeroing-of-a-duplicate-sibling": (
        "jnp.where((rejected == tok[:, None]).any(axis=1), 0.0, p[rows, tok])", "p[rows, tok]"),
    "no-renormalised-residual": ("u[d, j] * mass < pt", "u[d, j] < pt"),
    "no-ban-at-the-next-root": ("banned = jnp.where((alive & ~took)[:, None], rejected, banned)", "pass"),
}  # fmt: skip
SAMPLING = {"plain": (TEMPERATURE, 0, 1.0), "top-k": (TEMPERATURE, 3, 1.0), "top-p": (TEMPERATURE, 0, 0.7),
            "top-k+top-p": (1.2, 4, 0.8)}  # fmt: skip


@pytest.mark.parametrize("name", list(SAMPLING))
def test_bigram_rejection_keeps_the_distribution(name):
    from medusa_jax.medusa_decode import rejection_paths
    from medusa_jax.sampling import SamplingParams

    args = SAMPLING[name]
    out, stats = run_bigram(rejection_paths, SamplingParams.make(*args))
    ps = bigram_pvalues(out, args)
    assert min(ps) > 0.01, ps
    if name == "plain":  # the chain was tried, accepted, and its duplicates of rejected head tokens never were
        assert stats["tried"] > 1000 and stats["accepted"] > 100 and stats["duplicate_tried"] > 300, stats
        assert stats["duplicate_accepted"] == 0, stats


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_rejection_rules_fail_the_same_test(name):
    from medusa_jax.sampling import SamplingParams

    out, stats = run_bigram(mutant(*BROKEN[name]), SamplingParams.make(*SAMPLING["plain"]))
    assert min(bigram_pvalues(out, SAMPLING["plain"])) < 1e-6
    if name.startswith("no-zeroing"):
        assert stats["duplicate_accepted"] > 0, stats
