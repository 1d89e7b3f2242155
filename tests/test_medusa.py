"""The Medusa decode loop: greedy output equals AR greedy token for token; typical acceptance; batching."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from medusa_jax.api import MedusaModel
from medusa_jax.config import ModelConfig
from medusa_jax.heads import HeadsConfig, init_heads
from medusa_jax.medusa_decode import MedusaLoop, Thresholds, medusa_step, project_every_node, resolve_tree, start_state
from medusa_jax.model import KVCache, init_params
from medusa_jax.sampling import SamplingParams
from medusa_jax.tree import build_buffers


def tiny_model(vocab=8, heads=2, seed=0, root_token=False, sequential=False):
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    params = init_params(cfg, seed)
    params = jax.tree.map(lambda a: a * 8 if a.ndim >= 2 else a, params)  # sharper, less repetitive logits
    hp = init_heads(HeadsConfig(heads, 1, False, root_token, sequential), params, seed=seed, scale=0.3)
    if sequential:  # paths that matter: the (small) embeddings of the drafted tokens move the heads' choices
        hp["path"]["kernel"] = hp["path"]["kernel"] * 30
    return MedusaModel(cfg, params, heads=hp)


def full_tree(vocab, depth):
    """Every path of every rank: the true continuation is always in the tree, so each step accepts `depth`."""
    return [list(p) for d in range(1, depth + 1) for p in itertools.product(range(vocab), repeat=d)]


def random_prompts(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(3, 20))).tolist() for _ in range(n)]


def test_full_tree_accepts_every_head_and_matches_ar():
    m = tiny_model(vocab=8, heads=2)
    tree = build_buffers(full_tree(8, 2), topk=8, num_heads=2)
    prompts = random_prompts(5, 8)
    ar = m.generate(prompts, max_new_tokens=30, mode="ar")
    md = m.generate(prompts, max_new_tokens=30, mode="medusa", tree=tree)
    for a, b in zip(ar, md):
        assert b.output_ids == a.output_ids
        assert b.new_tokens == 30
        assert b.steps == 10  # 3 tokens per step: root + both heads, always
    assert resolve_tree(tree, 2) is tree


def test_batch_matches_batch1_and_ar_with_chain_and_branchy_trees():
    m = tiny_model(vocab=16, heads=3, seed=1)
    prompts = random_prompts(6, 16, seed=3)
    ar = m.generate(prompts, max_new_tokens=25, mode="ar")
    for tree in ([[0], [0, 0], [0, 0, 0]], [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2]]):
        batched = m.generate(prompts, max_new_tokens=25, mode="medusa", tree=tree, topk=4)
        single = [m.generate([p], max_new_tokens=25, mode="medusa", tree=tree, topk=4)[0] for p in prompts[:2]]
        assert [r.output_ids for r in batched] == [r.output_ids for r in ar]
        assert [r.output_ids for r in single] == [r.output_ids for r in ar[:2]]
        assert all(1 <= r.steps <= r.new_tokens for r in batched)
    # more prompts than one batch: batched by length internally, results in the caller's order
    by2 = m.generate(prompts, max_new_tokens=25, mode="medusa", tree=tree, topk=4, batch_size=2)
    assert [r.prompt_ids for r in by2] == prompts and [r.output_ids for r in by2] == [r.output_ids for r in ar]


def test_root_token_heads_see_the_chosen_root():
    """root_token heads: greedy output still equals AR, and each step accepts exactly what the heads' top-1 guesses
    predict when they are computed offline by `forward` (which feeds token t+1 as the root): the loop gives the
    heads the root it chose, at the last accepted node."""
    m = tiny_model(vocab=8, heads=2, seed=2, root_token=True)
    m.heads["root"]["kernel"] = m.heads["root"]["kernel"] * 10  # let the root dominate the heads' guesses
    prompts = random_prompts(4, 8, seed=5)
    ar = m.generate(prompts, max_new_tokens=30, mode="ar")
    md = m.generate(prompts, max_new_tokens=30, mode="medusa", tree=[[0], [0, 0]], topk=1)
    assert [r.output_ids for r in md] == [r.output_ids for r in ar]
    for r in md:
        seq = r.prompt_ids + r.output_ids
        guess = np.asarray(jax.numpy.argmax(m.forward([seq]).medusa_logits[:, 0], -1))  # [K, T]: tokens t+2, t+3
        pos, steps = len(r.prompt_ids) - 1, 0  # the last accepted position; its next token is the root
        while pos < len(seq) - 1:
            n = 1  # the root, then each head's guess while it matches
            while n < 3 and pos + n + 1 < len(seq) and guess[n - 1, pos] == seq[pos + n + 1]:
                n += 1
            pos, steps = pos + n, steps + 1
        assert r.steps == steps
    assert sum(r.new_tokens for r in md) > sum(r.steps for r in md)  # the heads were right some of the time


def test_eos_stops_each_row():
    m = tiny_model(vocab=8, heads=2)
    prompts = random_prompts(4, 8, seed=5)
    ar = m.generate(prompts, max_new_tokens=30, mode="ar")
    eos = ar[0].output_ids[3]
    m.cfg = m.cfg.replace(eos_token_ids=(eos,))
    ar = m.generate(prompts, max_new_tokens=30, mode="ar")
    md = m.generate(prompts, max_new_tokens=30, mode="medusa", tree=full_tree(8, 2), topk=8)
    assert [r.output_ids for r in md] == [r.output_ids for r in ar]
    assert md[0].output_ids[-1] == eos and len(md[0].output_ids) <= 4


def test_typical_acceptance():
    m = tiny_model(vocab=16, heads=2, seed=2)
    prompts = random_prompts(3, 16, seed=7)
    ar = m.generate(prompts, max_new_tokens=20, mode="ar")
    # a near-zero temperature makes the typical set the argmax: the output equals greedy
    cold = m.generate(prompts, max_new_tokens=20, mode="medusa", temperature=1e-4, acceptance="typical", topk=8)
    assert [r.output_ids for r in cold] == [r.output_ids for r in ar]
    kw = dict(max_new_tokens=20, mode="medusa", temperature=1.0, topk=8, tree=full_tree(8, 2), acceptance="typical")
    a = m.generate(prompts, seed=1, **kw)
    b = m.generate(prompts, seed=1, **kw)
    c = m.generate(prompts, seed=2, **kw)
    assert [r.output_ids for r in a] == [r.output_ids for r in b]
    assert [r.output_ids for r in a] != [r.output_ids for r in c]
    assert all(r.new_tokens == 20 for r in a)
    # with thresholds at zero every candidate is typical: each step takes a full path
    greedy_all = m.generate(prompts, seed=1, posterior_threshold=0.0, posterior_alpha=0.0, **kw)
    assert all(r.steps == 7 for r in greedy_all)  # ceil(20 / 3)


def test_tree_errors():
    m = tiny_model(vocab=8, heads=2)
    with pytest.raises(ValueError, match=r"\[0, 0, 0\]"):
        m.generate([[1, 2, 3]], max_new_tokens=4, mode="medusa", tree=[[0], [0, 0], [0, 0, 0]], topk=4)
    with pytest.raises(ValueError, match="acceptance"):
        m.generate([[1, 2, 3]], max_new_tokens=4, mode="medusa", acceptance="nope", temperature=1.0, topk=4)


@pytest.mark.parametrize("heads,batch", [("smollm2_sequential", 1), ("smollm2_feature", 1), (None, 8)])
def test_smollm2_greedy_equals_ar(smollm2, dev_prompts, heads, batch):
    """SmolLM2: Medusa greedy output equals AR greedy, at batch 1 with the shipped sequential heads (which draft each
    node's children from its own path) and the shipped feature drafter (a decoder layer with its own K/V cache in
    the loop), and at batch 8 (mixed lengths) with random root-token heads."""
    if heads:
        from medusa_jax.api import shipped_heads, with_heads

        m = with_heads(smollm2, shipped_heads(heads), "float32")
        if heads == "smollm2_sequential":
            assert "path" in m.heads and m.heads["path"]["kernel"].shape[:2] == (4, 3)
        else:
            assert "feature" in m.heads and m.heads["draft"]["ids"].shape == (8192,)
    else:
        heads = init_heads(HeadsConfig(4, 1, True), smollm2.params, seed=0, scale=0.02)
        m = MedusaModel(smollm2.cfg, smollm2.params, smollm2.tokenizer, heads=heads)
    prompts = dev_prompts[:batch]
    ar = m.generate(prompts, max_new_tokens=24, mode="ar")
    md = m.generate(prompts, max_new_tokens=24, mode="medusa", tree="cpu_8")
    assert [r.output_ids for r in md] == [r.output_ids for r in ar]
    assert batch == 1 or len({len(r.prompt_ids) for r in md}) > 2  # mixed lengths
    assert batch == 8 or md[0].steps < 0.8 * md[0].new_tokens  # the trained drafts are accepted


def test_draft_vocabulary_keeps_greedy_output_and_only_proposes_its_tokens():
    import jax.numpy as jnp

    from medusa_jax.drafters import tree_candidates
    from medusa_jax.heads import attach_draft_vocab, base_lm_head, draft_logits
    from medusa_jax.train.draft_vocab import build, token_counts

    m = tiny_model(vocab=16, heads=2, seed=1)
    prompts = random_prompts(4, 16, seed=3)
    ar = m.generate(prompts, max_new_tokens=20, mode="ar")
    rows = [{"input_ids": r.prompt_ids + r.output_ids, "loss_mask": [0] * len(r.prompt_ids) + [1] * r.new_tokens}
            for r in ar]  # fmt: skip
    info = build(token_counts(rows), 6)
    assert info["size"] == 6 and 0 < info["coverage"] <= 1 and info["answer_tokens"] == 80
    ids = info["ids"]
    m.heads = attach_draft_vocab(m.heads, base_lm_head(m.params), ids)
    md = m.generate(prompts, max_new_tokens=20, mode="medusa", tree=[[0], [1], [0, 0]], topk=2)
    assert [r.output_ids for r in md] == [r.output_ids for r in ar]
    logits, got_ids = draft_logits(m.heads, jnp.ones((3, 32)), base_lm_head(m.params))
    assert logits.shape == (2, 3, 6) and got_ids.tolist() == ids
    full = m.forward([[1, 2, 3]]).medusa_logits
    assert full.shape == (2, 1, 3, 16)  # forward still covers the full vocabulary
    cand = tree_candidates(jnp.array([15, 15, 15]), logits, build_buffers([[0], [1], [0, 0]], topk=2), got_ids)
    assert set(np.asarray(cand[:, 1:]).ravel().tolist()) <= set(ids)


def step_jaxpr(cfg, loop, params, heads, batch, sp=None):
    """The jaxpr of one `medusa_step` at `batch` rows (sampling params `sp`, default: temperature 1, no filter)."""
    tokens, lengths = jnp.ones((batch, 4), jnp.int32), jnp.full((batch,), 4, jnp.int32)
    cache = KVCache.zeros(cfg, batch, loop.slots)
    state = start_state(cfg, loop, params, heads, cache, jnp.int32(0), tokens, lengths, 20, jax.random.PRNGKey(0))
    sp, th = sp or SamplingParams.make(1.0), Thresholds(jnp.float32(0.09), jnp.float32(0.3))
    return jax.make_jaxpr(lambda s: medusa_step(cfg, loop, params, heads, s, jnp.int32(20), sp, th))(state).jaxpr


def count_eqns(jaxpr, pred) -> int:
    """Equations of `jaxpr` (nested ones included) for which `pred(eqn)` holds."""
    return sum(bool(pred(e)) + sum(count_eqns(sub, pred) for sub in jaxprs_in_params(e.params)) for e in jaxpr.eqns)


def vocabulary_projections(cfg, loop, params, heads, batch) -> int:
    """The matmuls of one `medusa_step` with the base model's tied `[V, E]` projection (its reads of that matrix)."""
    shape = (cfg.vocab_size, cfg.hidden_size)
    is_projection = lambda e: e.primitive.name == "dot_general" and any(v.aval.shape == shape for v in e.invars)
    return count_eqns(step_jaxpr(cfg, loop, params, heads, batch), is_projection)


def test_one_vocabulary_projection_per_step_when_it_saves_bytes():
    """A step projects the tree's nodes to the vocabulary in one matmul and takes the next step's logits (at the last
    accepted node) from it, unless the leaves' logits would cost more than a second read of the matrix; plain
    decoding projects once."""
    m = tiny_model(vocab=16, heads=3, seed=1)
    tree = resolve_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2]], 3, topk=4)  # 4 internal nodes, 4 leaves
    loop = MedusaLoop(tree, 16, 64, "greedy", ())
    assert project_every_node(m.cfg, 1, tree) and not project_every_node(m.cfg, 8, tree)
    assert vocabulary_projections(m.cfg, loop, m.params, m.heads, 1) == 1
    assert vocabulary_projections(m.cfg, loop, m.params, m.heads, 8) == 2
    ar = MedusaLoop(build_buffers([], topk=1), 16, 64, "greedy", ())
    assert vocabulary_projections(m.cfg, ar, m.params, None, 8) == 1


def test_no_vocabulary_sort_without_top_k_or_top_p():
    """A rejection-sampling step (lookup chain included) sorts the vocabulary only when top-k or top-p is on."""
    m = tiny_model(vocab=16, heads=3, seed=1)
    tree = resolve_tree([[0], [1], [0, 0]], 3, topk=4, lookup=3)
    loop = MedusaLoop(tree, 16, 64, "rejection", ())
    sorts = lambda sp: count_eqns(
        step_jaxpr(m.cfg, loop, m.params, m.heads, 2, sp), lambda e: e.primitive.name == "sort"
    )
    assert sorts(SamplingParams.make(0.8)) == 0
    assert sorts(SamplingParams.make(0.8, top_k=5)) > 0 and sorts(SamplingParams.make(0.8, top_p=0.9)) > 0


def test_forward_simulator_and_trailing_batches_reuse_compiled_shapes():
    """`forward` and the step simulator pad to length buckets, and a trailing smaller batch of `generate` is padded
    with done rows to the call's batch size: one compile for many lengths and batch sizes, the same results."""
    from medusa_jax.api import _forward
    from medusa_jax.medusa_decode import generate_medusa
    from medusa_jax.simulate import _ranks, head_ranks

    m = tiny_model(vocab=16, heads=2, seed=2, root_token=True)
    seqs = [random_prompts(1, 16, seed=s)[0][:n] + [1] for s, n in zip(range(6), (3, 5, 7, 9, 11, 13))]
    n_forward, n_ranks = _forward._cache_size(), _ranks._cache_size()
    for seq in seqs:
        got = m.forward([seq])
        want = _forward(m.cfg, m.params, m.heads, jnp.asarray([seq]), jnp.int32(len(seq)))  # unpadded
        for a, b in zip((got.logits, got.medusa_logits, got.hidden), want):
            assert a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)  # float32 sum order
        head_ranks(m, seq)
    assert _forward._cache_size() - n_forward == 1 + len(seqs)  # one bucket (+ the unpadded references)
    assert _ranks._cache_size() - n_ranks == 1
    prompts = random_prompts(5, 16, seed=7)
    one = m.generate(prompts, max_new_tokens=12, mode="medusa", tree=[[0], [0, 0]], topk=2)
    n_loop = generate_medusa._cache_size()
    by2 = m.generate(prompts, max_new_tokens=12, mode="medusa", tree=[[0], [0, 0]], topk=2, batch_size=2)
    assert generate_medusa._cache_size() - n_loop == 1  # batches of 2, 2 and 1 (run as 2)
    assert [(r.prompt_ids, r.output_ids, r.steps) for r in by2] == [(r.prompt_ids, r.output_ids, r.steps) for r in one]


def test_many_rows_write_by_scatter_as_by_loop(monkeypatch):
    """Above 16 rows the KV writes and the path moves are a loop of row writes (CPU, GPU); on a TPU they are unrolled
    up to 64 rows and one scatter above (its compiler fails on that loop): the loop and the scatter give the same
    tokens, here forced on the CPU at batch 20."""
    import dataclasses

    from medusa_jax import model as model_lib

    monkeypatch.setattr(model_lib, "TPU_UNROLL_ROWS", 16)  # the scatter above 16 rows, as above 64 on a TPU
    m = tiny_model(vocab=16, heads=3, seed=2)
    prompts = random_prompts(20, 16, seed=7)
    kw = dict(max_new_tokens=12, mode="medusa", tree=[[0], [1], [0, 0], [0, 1], [0, 0, 0]], batch_size=20)
    loop = dataclasses.replace(m, cfg=m.cfg.replace(row_writes="loop"))
    scat = dataclasses.replace(m, cfg=m.cfg.replace(row_writes="scatter"))
    a, b = loop.generate(prompts, **kw), scat.generate(prompts, **kw)
    assert [r.output_ids for r in a] == [r.output_ids for r in b]
    assert [r.output_ids for r in a] == [r.output_ids for r in m.generate(prompts, max_new_tokens=12, mode="ar")]
    assert sum(r.steps for r in b) < sum(r.new_tokens for r in b)
