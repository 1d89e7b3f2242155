"""Lossless tree sampling: recursive rejection sampling keeps the base model's distribution (chi-square tests
against the exact probabilities of a tiny model), while a wrong rule (accept every candidate) is caught."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_medusa import random_prompts, tiny_model

from medusa_jax.medusa_decode import tree_children
from medusa_jax.tree import build_buffers

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


def sample(model, **kw):
    res = model.generate([PROMPT] * N, max_new_tokens=3, temperature=TEMPERATURE, tree=TREE, topk=5,
                         batch_size=N, mode="medusa", seed=11, **kw)  # fmt: skip
    out = np.array([r.output_ids for r in res])
    steps = np.array([r.steps for r in res])
    return out, steps


def pvalues(out: np.ndarray, exact, top: int = 3) -> list[float]:
    """p-values of: the first token; the second given each of the `top` most frequent first tokens; the third
    given each of the `top` most frequent two-token prefixes."""
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
