"""The feature drafter (EAGLE's kind): its state carried through the decode loop and across chat turns drafts what
its teacher-forced unroll predicts on the accepted path (the step simulator's ranks give the loop's exact steps),
greedy output stays the base model's, and a new drafter starts as the identity on features."""

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_medusa import random_prompts, tiny_model

from medusa_jax import generation
from medusa_jax.feature_drafter import init_feature_drafter, unroll
from medusa_jax.heads import attach_draft_vocab, base_lm_head, heads_config_of
from medusa_jax.session import Session
from medusa_jax.simulate import answer_ranks, tokens_per_step, walk
from medusa_jax.tree import DynamicTree, build_buffers

# every path of ranks 0-3 to depth 3 (84 nodes): deep paths are accepted often enough that a parent's entry, its
# position or its ancestors' keys going wrong changes the step counts
WIDE = [list(p) for d in range(1, 4) for p in itertools.product(range(4), repeat=d)]
DEEP = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]


def feature_model(draft=False):
    m = tiny_model(vocab=16, heads=3, seed=1)
    m.heads = init_feature_drafter(m.params, seed=2, scale=0.3)
    if draft:  # proposes from 10 of the 16 tokens
        m.heads = attach_draft_vocab(m.heads, base_lm_head(m.params), list(range(0, 16, 2)) + [1, 3])
    return m


@pytest.mark.parametrize("draft", [False, True], ids=["full-vocab", "draft-vocab"])
def test_loop_drafts_what_the_unroll_predicts(draft):
    m = feature_model(draft)
    prompts = random_prompts(6, 16, seed=3)
    prompts[0] = [3, 4, 5, 6, 7] * 4  # the lookup chain drafts from it
    ar = m.generate(prompts, max_new_tokens=40, mode="ar")
    ranked = answer_ranks(m, [(r.prompt_ids, r.output_ids) for r in ar])
    for tree, lookup in ((WIDE, 0), (DEEP, 6)):
        buffers = build_buffers(tree, topk=4, lookup=lookup)
        real = m.generate(prompts, max_new_tokens=40, mode="medusa", tree=buffers)
        assert [r.output_ids for r in real] == [r.output_ids for r in ar]
        assert [walk(seq, n, rank, buffers)[0] for seq, n, rank in ranked] == [r.steps for r in real]
        if tree is WIDE:  # depth 3 is reached: parents' entries matter
            assert tokens_per_step(ranked, buffers)["accepted_at_depth"][2] > 0.02


@pytest.mark.parametrize("draft", [False, True], ids=["full-vocab", "draft-vocab"])
def test_a_dynamic_tree_takes_the_steps_its_simulator_predicts(draft):
    """A dynamic tree (each step the most confident drafts, EAGLE-2's kind) decodes the base model's greedy tokens
    in the steps `simulate.dynamic_reach` predicts from one teacher-forced pass per answer, with a lookup chain
    too; deep nodes are accepted, so the per-step parents, depths and mask are exercised."""
    m = feature_model(draft)
    prompts = random_prompts(6, 16, seed=3)
    prompts[0] = [3, 4, 5, 6, 7] * 4
    ar = m.generate(prompts, max_new_tokens=40, mode="ar")
    pairs = [(r.prompt_ids, r.output_ids) for r in ar]
    for lookup in (0, 6):
        tree = DynamicTree(size=40, head_depth=4, topk=4, beam=4, lookup=lookup)
        real = m.generate(prompts, max_new_tokens=40, mode="medusa", tree=tree)
        assert [r.output_ids for r in real] == [r.output_ids for r in ar]
        ranked = answer_ranks(m, pairs, tree=tree)
        assert [walk(seq, n, reach, tree)[0] for seq, n, reach in ranked] == [r.steps for r in real]
        if not lookup:
            acc = tokens_per_step(ranked, tree)["accepted_at_depth"]
            assert acc[1] > 0.05 and acc[2] > 0


SPINE = [[0] * d + [j] for d in range(4) for j in range(4)]  # each depth's top-1 node expanded, 4 children each


@pytest.mark.parametrize(
    "dynamic, static",
    [
        (DynamicTree(size=20, head_depth=2, topk=4, beam=4), [list(p) for d in (1, 2) for p in itertools.product(range(4), repeat=d)]),
        (DynamicTree(size=16, head_depth=4, topk=4, beam=1), SPINE),
    ],
    ids=["every-draft-to-depth-2", "beam-1-to-depth-4"],
)  # fmt: skip
def test_a_dynamic_tree_that_keeps_every_draft_is_the_static_tree_of_its_shape(dynamic, static):
    """Kept whole, a dynamic tree is a static one: with beam = topk to depth 2 every path of ranks; with beam 1 the
    top-1 node of each depth expanded. The loop then takes the static tree's steps (the static drafter, its mask and
    its acceptance are independent code)."""
    m = feature_model()
    prompts = random_prompts(6, 16, seed=4)
    got = m.generate(prompts, max_new_tokens=40, mode="medusa", tree=dynamic)
    want = m.generate(prompts, max_new_tokens=40, mode="medusa", tree=build_buffers(static, topk=4))
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert [r.steps for r in got] == [r.steps for r in want]
    assert sum(r.new_tokens for r in want) / sum(r.steps for r in want) > 1.3


def rank_paths(parent: np.ndarray) -> list[tuple[int, ...]]:
    """A dynamic tree's drafted nodes (parents `[size]`, tree ids, 0 = the root) -> each node's path of ranks
    (its index among its parent's children, drafted in rank order)."""
    paths: dict[int, tuple[int, ...]] = {0: ()}
    kids: dict[int, int] = {}
    for node, par in enumerate(parent.tolist(), start=1):
        paths[node] = paths[par] + (kids.get(par, 0),)
        kids[par] = kids.get(par, 0) + 1
    return [paths[n] for n in range(1, len(parent) + 1)]


@pytest.mark.parametrize(
    "size, k, depth, beam",
    [(20, 4, 2, 4), (20, 4, 5, 1), (40, 4, 4, 3), (30, 4, 4, 3)],
    ids=["every-draft-to-depth-2", "beam-1-to-depth-5", "every-draft-of-beam-3-to-depth-4", "30-best-of-those"],
)
def test_dynamic_drafts_are_the_static_drafters_on_the_same_shape(size, k, depth, beam):
    """Given one drafter state (a random cache, pending entries, lengths), each row's dynamic tree holds exactly the
    tokens the static drafter drafts for the static tree of that row's shape (its nodes' rank paths), node for node:
    the frontier's features, entry positions, path keys and reselection are the static drafter's (independent
    code)."""
    from medusa_jax.drafters import DraftContext, FeatureDrafter
    from medusa_jax.feature_drafter import FeatureState

    m = feature_model()
    cfg, rng = m.cfg, np.random.default_rng(0)
    # a drafter whose guesses depend on the path (through the backbone's tied head, and with its MLP, every node of
    # the small random drafter guesses alike): weights N(0, 1), the token's part of each entry x 10, no MLP, and a
    # random output projection small enough that the best children come from several parents
    m.heads = init_feature_drafter(m.params, seed=2, scale=1.0)
    fuse, mlp = m.heads["feature"]["fuse"], m.heads["feature"]["layer"]["mlp"]
    fuse["kernel"] = fuse["kernel"].at[: cfg.hidden_size].multiply(10.0)
    mlp["down_proj"]["kernel"] = jnp.zeros_like(mlp["down_proj"]["kernel"])
    m.heads["draft"] = {"ids": jnp.arange(16, dtype=jnp.int32),
                        "kernel": jnp.asarray(rng.normal(size=(cfg.hidden_size, 16)) * 0.02, jnp.float32)}  # fmt: skip
    b, slots = 16, 40
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    st = FeatureState(normal(b, cfg.num_kv_heads, slots, cfg.head_dim), normal(b, cfg.num_kv_heads, slots, cfg.head_dim),
                      normal(b, depth + 1, cfg.hidden_size), jnp.asarray(rng.integers(0, 16, (b, depth + 1)), jnp.int32),
                      jnp.asarray(rng.integers(1, 4, b), jnp.int32))  # fmt: skip
    lengths = jnp.asarray(rng.integers(4, 8, b), jnp.int32)  # short: the path entries weigh
    root = jnp.asarray(rng.integers(0, 16, b), jnp.int32)
    ctx = DraftContext(m.params, m.heads, root, normal(b, cfg.hidden_size), jnp.zeros((b, 0), jnp.int32), lengths,
                       draft=st, cfg=cfg)  # fmt: skip
    dynamic = DynamicTree(size=size, head_depth=depth, topk=k, beam=beam)
    cand = jnp.zeros((b, dynamic.num_nodes), jnp.int32).at[:, 0].set(root)
    got, valid, _, (parent, dep) = FeatureDrafter().propose(ctx, dynamic, cand)
    assert bool(valid.all())
    shapes = set()
    for r in range(b):
        paths = rank_paths(np.asarray(parent[r]))
        static = build_buffers(paths, topk=k)
        shapes.add(tuple(sorted(paths)))
        one = lambda x, r=r: x[r : r + 1]  # noqa: E731
        row = ctx.replace(root=one(root), hidden=one(ctx.hidden), seq=one(ctx.seq), lengths=one(lengths),
                          draft=jax.tree.map(one, st))  # fmt: skip
        want, _, _ = FeatureDrafter().propose(row, static, cand[r : r + 1, : static.num_nodes])
        node = {path: i for i, path in enumerate(static.choices)}  # the static tree's nodes are sorted by path
        np.testing.assert_array_equal(got[r], want[0, [node[p] for p in paths]])
        np.testing.assert_array_equal(dep[r], [len(p) for p in paths])
    assert max(len(p) for p in paths) == depth
    if beam < k and size < dynamic.pool:
        assert len(shapes) > 1  # the rows' trees differ: drafted from each row's own confidence


def test_a_chunked_prefill_writes_the_drafters_entries_chunk_by_chunk(monkeypatch):
    """Long prompts prefill in chunks, and the drafter's prompt entries are written chunk by chunk beside the
    backbone's K/V: the loop still drafts what the unroll predicts."""
    chunks = []

    def small_chunks(cfg, batch, tokens, slots):
        chunks.append(tokens)
        return 16

    monkeypatch.setattr(generation, "prefill_chunk", small_chunks)
    m = feature_model()
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 16, size=n).tolist() for n in (40, 23, 57)]  # 64 slots: 4 chunks of 16
    ar = m.generate(prompts, max_new_tokens=21, mode="ar")
    ranked = answer_ranks(m, [(r.prompt_ids, r.output_ids) for r in ar])
    buffers = build_buffers(WIDE, topk=4)
    real = m.generate(prompts, max_new_tokens=21, mode="medusa", tree=buffers)
    assert 64 in chunks  # the prompts were prefilled in chunks
    assert [r.output_ids for r in real] == [r.output_ids for r in ar]
    assert [walk(seq, n, rank, buffers)[0] for seq, n, rank in ranked] == [r.steps for r in real]


def test_chat_turns_carry_the_drafters_cache():
    """The second turn continues from the first turn's drafter state (its pending entries completed with the new
    input's first token): its steps are those of the simulator on the whole conversation."""
    m = feature_model()
    buffers = build_buffers(WIDE, topk=4)
    s = Session(m, mode="medusa", tree=buffers, chunk_steps=3)
    p1, p2 = random_prompts(2, 16, seed=5)
    list(s.stream_ids(p1, 20))
    assert s.draft is not None
    turn2 = s.ids + p2
    out2 = [t for chunk in s.stream_ids(turn2, 24) for t in chunk]
    assert s.last_reused == len(turn2) - len(p2)  # the first turn's cache was kept
    want = m.generate([turn2], max_new_tokens=24, mode="ar")[0]
    assert out2 == want.output_ids
    ((seq, n, rank),) = answer_ranks(m, [(turn2, want.output_ids)])
    assert s.last_steps == walk(seq, n, rank, buffers)[0]
    # the drafter's cache equals that of one call on the whole conversation
    fresh = Session(m, mode="medusa", tree=buffers, chunk_steps=3)
    assert [t for chunk in fresh.stream_ids(turn2, 24) for t in chunk] == out2
    written = len(s.ids) - int(s.draft.count[0])
    np.testing.assert_allclose(s.draft.k[0, :, :written], fresh.draft.k[0, :, :written], atol=1e-3)


def test_a_new_drafter_predicts_each_feature_as_itself():
    m = tiny_model(vocab=16, heads=3, seed=1)
    heads = init_feature_drafter(m.params)
    assert heads_config_of(heads).feature
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(2, 12, m.cfg.hidden_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 16, (2, 12)), jnp.int32)
    g = unroll(m.cfg, heads, m.params, feats, tokens, 3)
    for level in range(3):
        np.testing.assert_allclose(g[level], feats, atol=1e-6)
    assert jax.tree.leaves(heads)[0].dtype == jnp.float32


def test_saved_drafter_loads_and_decodes_the_same(tmp_path):
    from medusa_jax.api import with_heads
    from medusa_jax.heads_io import read_heads, save_heads

    m = feature_model()
    save_heads(m.heads, str(tmp_path / "drafter"), "tiny")
    params, meta = read_heads(str(tmp_path / "drafter"))
    assert meta["feature"] and meta["base_model_name_or_path"] == "tiny"
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, m.heads))
    loaded = with_heads(dataclasses.replace(m, heads=None), str(tmp_path / "drafter"), "float32")
    prompts = random_prompts(2, 16, seed=6)
    a = m.generate(prompts, max_new_tokens=16, mode="medusa", tree=WIDE, topk=4)
    b = loaded.generate(prompts, max_new_tokens=16, mode="medusa", tree=WIDE, topk=4)
    assert [(r.output_ids, r.steps) for r in a] == [(r.output_ids, r.steps) for r in b]


def test_train_py_trains_a_feature_drafter(tmp_path):
    """train.py with heads.feature: the unroll's loss falls at every depth on synthetic data (on features cached
    once, as float16, and on the backbone run in each step: the same losses), the dev accuracy is reported per
    depth, and the export decodes (greedy output unchanged) with `--heads`."""
    import os

    import train as train_cli
    from medusa_jax.api import load_run, with_heads

    run = str(tmp_path / "run")
    yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    args = ["--config", yaml, f"run_dir={run}", "data.synthetic_dev_rows=4", "heads.feature=true", "train.mode=medusa1",
            "train.steps=30", "train.save_every=0", "train.lr_heads=0.01", "train.anchors=8", "train.log_every=5"]  # fmt: skip
    assert train_cli.main(args) == 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    first, last = recs[0], recs[-1]
    assert last["step"] == 30 and all(last[f"head{k}_loss"] < first[f"head{k}_loss"] for k in range(3))
    with open(os.path.join(run, "eval.json")) as f:
        assert len(json.load(f)["top1"]) == 3
    assert [n for n in os.listdir(os.path.join(run, "cache")) if n.startswith("train-feat-")]
    live = str(tmp_path / "live")
    assert train_cli.main([*args[:2], f"run_dir={live}", *args[3:], "train.precompute_hidden=false"]) == 0
    with open(os.path.join(live, "metrics.jsonl")) as f:
        live_losses = [json.loads(line)["loss"] for line in f]
    np.testing.assert_allclose(live_losses, [r["loss"] for r in recs], rtol=2e-3)
    model = load_run(run)
    assert model.heads_config.feature
    exported = with_heads(dataclasses.replace(model, heads=None), os.path.join(run, "export"), "float32")
    prompts = random_prompts(2, 64, seed=1)
    ar = model.generate(prompts, max_new_tokens=12, mode="ar")
    md = exported.generate(prompts, max_new_tokens=12, mode="medusa", tree=WIDE, topk=4)
    assert [r.output_ids for r in md] == [r.output_ids for r in ar]
    # heads.draft_vocab: trained on the 24 most frequent answer tokens, exported with them, decoded with them
    small = str(tmp_path / "small")
    assert train_cli.main([*args[:2], f"run_dir={small}", *args[3:], "heads.draft_vocab=24", "train.steps=10"]) == 0
    with open(os.path.join(small, "export", "draft_vocab.json")) as f:
        assert json.load(f)["size"] == 24
    drafted = with_heads(dataclasses.replace(model, heads=None), os.path.join(small, "export"), "float32")
    assert drafted.heads["draft"]["ids"].shape == (24,)
    md = drafted.generate(prompts, max_new_tokens=12, mode="medusa", tree=WIDE, topk=4)
    assert [r.output_ids for r in md] == [r.output_ids for r in ar]
    run_model = load_run(small)  # the run dir (decode.py --ckpt RUN) drafts from the same vocabulary
    np.testing.assert_array_equal(run_model.heads["draft"]["ids"], drafted.heads["draft"]["ids"])


def test_training_targets_are_what_the_loop_drafts():
    """The dev counts of training (`feature_counts`: level k's top-1 at every position against token t+k+1) equal
    the simulator's ranks (pinned to the decode loop above): training and decoding agree on which token each depth
    guesses."""
    from medusa_jax.simulate import head_ranks
    from medusa_jax.train.feature_loss import feature_counts
    from medusa_jax.train.losses import forward_hidden

    m = feature_model()
    seq = random_prompts(1, 16, seed=8)[0] + random_prompts(1, 16, seed=9)[0]
    ids = jnp.asarray([seq], jnp.int32)
    mask = jnp.ones_like(ids).at[:, :3].set(0)  # the answer: tokens 3 on
    counts = feature_counts(m.cfg, m.heads, m.params, forward_hidden(m.cfg, m.params, ids), ids, mask, 4)
    rank = head_ranks(m, seq, depth=4)  # [4, T]: rank of seq[t+h+2] at depth h+1
    for h in range(4):
        t = np.arange(len(seq) - h - 2)
        answer = t + h + 2 >= 3
        assert int(counts[2, h]) == answer.sum()
        assert int(counts[0, h]) == int((rank[h, t][answer] == 0).sum()) > 0
