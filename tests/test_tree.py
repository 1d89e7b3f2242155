"""Tests for medusa_jax.tree: buffers vs. a torch port of the reference, validation, named trees."""

import ast
import json
import random
from pathlib import Path

import numpy as np
import pytest

import medusa_jax.tree as tree_mod
from medusa_jax.tree import TreeBuffers, build_buffers, get_tree, list_trees, max_depth, validate_choices

try:
    import torch
except ImportError:  # the oracle tests need torch (in the `test` extra); the rest do not
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


# --- Test oracle -------------------------------------------------------------------------------------
# Verbatim port of `pad_path` and `generate_medusa_buffers` from FasterDecoding/Medusa,
# medusa/model/utils.py (https://github.com/FasterDecoding/Medusa, Apache-2.0 licence).
# Changes: the module constant TOPK became a `TOPK` argument, the device move is dropped (CPU only),
# comments are trimmed. The logic is otherwise unchanged.
def pad_path(path, length, pad_value=-2):
    return path + [pad_value] * (length - len(path))


def generate_medusa_buffers(medusa_choices, TOPK=10):
    # Sort the medusa_choices based on their lengths and then their values
    sorted_medusa_choices = sorted(medusa_choices, key=lambda x: (len(x), x))
    medusa_len = len(sorted_medusa_choices) + 1

    # Initialize depth_counts to keep track of how many choices have a particular depth
    depth_counts = []
    prev_depth = 0
    for path in sorted_medusa_choices:
        depth = len(path)
        if depth != prev_depth:
            depth_counts.append(0)
        depth_counts[depth - 1] += 1
        prev_depth = depth

    # Create the attention mask for Medusa
    medusa_attn_mask = torch.eye(medusa_len, medusa_len)
    medusa_attn_mask[:, 0] = 1
    start = 0
    for i in range(len(depth_counts)):
        for j in range(depth_counts[i]):
            cur_medusa_choice = sorted_medusa_choices[start + j]
            # retrieve ancestor position
            if len(cur_medusa_choice) == 1:
                continue
            ancestor_idx = []
            for c in range(len(cur_medusa_choice) - 1):
                ancestor_idx.append(sorted_medusa_choices.index(cur_medusa_choice[: c + 1]) + 1)
            medusa_attn_mask[j + start + 1, ancestor_idx] = 1
        start += depth_counts[i]

    # Generate tree indices for the Medusa structure
    medusa_tree_indices = torch.zeros(medusa_len, dtype=torch.long)
    medusa_tree_indices[0] = 0
    start = 0
    for i in range(len(depth_counts)):
        for j in range(depth_counts[i]):
            cur_medusa_choice = sorted_medusa_choices[start + j]
            medusa_tree_indices[start + j + 1] = cur_medusa_choice[-1] + TOPK * i + 1
        start += depth_counts[i]

    # Generate position IDs for the Medusa structure
    medusa_position_ids = torch.zeros(medusa_len, dtype=torch.long)
    start = 0
    for i in range(len(depth_counts)):
        medusa_position_ids[start + 1 : start + depth_counts[i] + 1] = i + 1
        start += depth_counts[i]

    # Generate retrieval indices for Medusa structure verification
    retrieve_indices_nest = []
    retrieve_paths = []
    for i in range(len(sorted_medusa_choices)):
        cur_medusa_choice = sorted_medusa_choices[-i - 1]
        retrieve_indice = []
        if cur_medusa_choice in retrieve_paths:
            continue
        else:
            for c in range(len(cur_medusa_choice)):
                retrieve_indice.append(sorted_medusa_choices.index(cur_medusa_choice[: c + 1]))
                retrieve_paths.append(cur_medusa_choice[: c + 1])
        retrieve_indices_nest.append(retrieve_indice)
    max_length = max([len(x) for x in retrieve_indices_nest])
    retrieve_indices = [pad_path(path, max_length) for path in retrieve_indices_nest]
    retrieve_indices = torch.tensor(retrieve_indices, dtype=torch.long)
    retrieve_indices = retrieve_indices + 1
    retrieve_indices = torch.cat(
        [torch.zeros((retrieve_indices.shape[0], 1), dtype=torch.long), retrieve_indices], dim=1
    )

    # Aggregate the generated buffers into a dictionary
    medusa_buffers = {
        "medusa_attn_mask": medusa_attn_mask.unsqueeze(0).unsqueeze(0),
        "tree_indices": medusa_tree_indices,
        "medusa_position_ids": medusa_position_ids,
        "retrieve_indices": retrieve_indices,
    }
    return {k: v.clone() for k, v in medusa_buffers.items()}


# --- Trees -------------------------------------------------------------------------------------------
HAND_TREES = {
    "single": [[0]],
    "chain": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]],
    "wide": [[r] for r in range(10)],
    "irregular_unsorted": [[2, 1, 0], [1], [0, 3], [2], [0], [2, 1], [0, 0], [0, 3, 2], [2, 0], [0, 0, 1]],
    "gaps": [[0], [2], [2, 1]],
    "deep_mixed": [[0], [0, 4], [0, 4, 9], [0, 4, 9, 0], [3], [3, 3], [0, 0], [0, 4, 1]],
}


def random_tree(rng: random.Random, n: int, topk: int, depth: int) -> list[list[int]]:
    """Random prefix-closed tree with n paths: grows children of random existing nodes."""
    paths, frontier = set(), [()]
    while len(paths) < n:
        parent = rng.choice(frontier)
        if len(parent) < depth:
            child = parent + (rng.randrange(topk),)
            if child not in paths:
                paths.add(child)
                frontier.append(child)
    out = [list(p) for p in paths]
    rng.shuffle(out)
    return out


RANDOM_TREES = [
    (random_tree(random.Random(seed), n, topk, depth), topk)
    for seed, (n, topk, depth) in enumerate([(5, 3, 3), (20, 10, 5), (40, 4, 6), (63, 10, 4), (12, 2, 8)])
]

SHIPPED = list_trees()


def assert_matches_reference(choices, topk=10):
    ref = generate_medusa_buffers(choices, TOPK=topk)
    buf = build_buffers(choices, topk=topk)
    np.testing.assert_array_equal(buf.attn_mask, ref["medusa_attn_mask"][0, 0].numpy())
    np.testing.assert_array_equal(buf.tree_indices, ref["tree_indices"].numpy())
    np.testing.assert_array_equal(buf.position_ids, ref["medusa_position_ids"].numpy())
    np.testing.assert_array_equal(buf.retrieve_indices, ref["retrieve_indices"].numpy())
    # shapes and derived properties
    L, D = len(choices) + 1, max_depth(choices)
    assert (buf.num_nodes, buf.depth) == (L, D)
    assert buf.attn_mask.shape == (L, L) and buf.tree_indices.shape == buf.position_ids.shape == (L,)
    assert buf.retrieve_indices.shape == (buf.num_paths, D + 1)
    assert buf.choices == tuple(tuple(p) for p in sorted(choices, key=lambda x: (len(x), x)))


@pytest.mark.parametrize("name", HAND_TREES)
@needs_torch
def test_hand_trees_match_reference(name):
    assert_matches_reference(HAND_TREES[name])


@pytest.mark.parametrize("name", SHIPPED)
@needs_torch
def test_shipped_trees_match_reference(name):
    assert_matches_reference(get_tree(name))


@pytest.mark.parametrize("choices,topk", RANDOM_TREES)
@needs_torch
def test_random_trees_match_reference(choices, topk):
    assert_matches_reference(choices, topk=topk)


def test_small_example_values():
    buf = build_buffers([[0], [1], [0, 0]], topk=4)
    assert buf.choices == ((0,), (1,), (0, 0))
    np.testing.assert_array_equal(buf.tree_indices, [0, 1, 2, 5])
    np.testing.assert_array_equal(buf.position_ids, [0, 1, 1, 2])
    np.testing.assert_array_equal(buf.retrieve_indices, [[0, 1, 3], [0, 2, -1]])
    np.testing.assert_array_equal(buf.attn_mask, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]])


def test_root_only_tree():
    buf = build_buffers([])
    assert (buf.num_nodes, buf.depth, buf.num_paths) == (1, 0, 1)
    np.testing.assert_array_equal(buf.retrieve_indices, [[0]])


def test_hash_eq_and_readonly():
    a, b = build_buffers([[1], [0]]), build_buffers(((0,), (1,)))
    assert a == b and hash(a) == hash(b) and isinstance(a, TreeBuffers)
    assert a != build_buffers([[0], [1]], topk=5)
    assert a != build_buffers([[0]])
    with pytest.raises(ValueError):
        a.attn_mask[0, 0] = 0


@pytest.mark.parametrize(
    "choices,kwargs,match",
    [
        ([[0], [0, 1], [1, 1]], {}, r"\[1, 1\].*prefix-closed"),
        ([[0], [0, 10]], {}, r"\[0, 10\].*topk=10"),
        ([[0], [3]], {"topk": 3}, r"\[3\].*topk=3"),
        ([[0], []], {}, r"empty path \[\]"),
        ([[0], [-1]], {}, r"\[-1\].*negative"),
        ([[0], [1], [0]], {}, r"duplicate path \[0\]"),
        ([[0], [0, 0], [0, 0, 0]], {"num_heads": 2}, r"\[0, 0, 0\].*num_heads=2"),
        ([[0], [0.5]], {}, r"\[0.5\].*list of ints"),
        ([[0], [True]], {}, r"\[True\].*list of ints"),
        ([0, 1], {}, r"path 0 .*list of ints"),
    ],
)
def test_validation_errors(choices, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_buffers(choices, **kwargs)


def test_num_heads_ok_and_validate_returns_sorted():
    build_buffers([[0], [0, 0]], num_heads=2)
    assert validate_choices([[1], [0, 0], [0]]) == ((0,), (1,), (0, 0))


def test_get_tree_names():
    names = list_trees()
    for n in ["mc_sim_7b_63", "vicuna_7b_stage2", "zephyr_stage2", "cpu_4", "cpu_32", "chain_1", "chain_5"]:
        assert n in names
    mc = get_tree("mc_sim_7b_63")
    assert len(mc) == 63 and mc[:4] == [[0], [0, 0], [1], [0, 1]] and mc[-1] == [0, 7, 0]
    assert all(len(get_tree(n)) == 63 for n in names if not n.startswith(("chain_", "cpu_", "smollm2_")))
    wide = get_tree("smollm2_sequential_127")  # grown from the shipped sequential heads' accuracies
    assert len(wide) == 127 and wide[0] == [0] and build_buffers(wide, num_heads=4).depth == 4
    feature = get_tree("smollm2_feature_255")  # grown from the shipped feature drafter's accuracies, six deep
    assert len(feature) == 255 and feature[:3] == [[0], [0, 0], [1]] and build_buffers(feature, num_heads=16).depth == 6
    for k in (4, 8, 16, 32):
        assert get_tree(f"cpu_{k}") == mc[:k]
    assert get_tree("chain_3") == [[0], [0, 0], [0, 0, 0]]
    assert get_tree("chain_7")[-1] == [0] * 7
    with pytest.raises(ValueError, match="unknown tree 'nope'"):
        get_tree("nope")


def test_get_tree_json_file(tmp_path: Path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps([[1], [0], [1, 2]]))
    assert get_tree(f) == [[1], [0], [1, 2]]
    assert get_tree(str(f)) == [[1], [0], [1, 2]]


@pytest.mark.parametrize(
    "text,match",
    [
        ("[[0], [0, 1", "invalid JSON"),
        ('{"a": 1}', "expected a list"),
        ("[[0], [1, 1]]", r"\[1, 1\].*prefix-closed"),
        ('[[0], ["x"]]', "list of ints"),
    ],
)
def test_get_tree_bad_json_file(tmp_path: Path, text, match):
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        get_tree(f)
    assert str(f) in str(e.value)


def test_module_imports_only_numpy_and_stdlib():
    src = Path(tree_mod.__file__).read_text()
    roots = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= {
        "numpy",
        "__future__",
        "dataclasses",
        "json",
        "re",
        "collections",
        "importlib",
        "pathlib",
    }


def test_dynamic_tree_names_and_checks():
    from medusa_jax.medusa_decode import resolve_tree
    from medusa_jax.tree import DynamicTree, dynamic_tree

    t = dynamic_tree("dynamic_60")
    assert (t.size, t.head_depth, t.topk, t.beam, t.lookup) == (60, 6, 10, 10, 0)
    assert t.num_nodes == 61 and t.pool == 10 + 5 * 100 and t.max_children == 10
    deep = dynamic_tree("dynamic_127_d8_k16", lookup=10)
    assert (deep.size, deep.head_depth, deep.topk, deep.num_nodes, deep.max_children) == (127, 8, 16, 138, 17)
    assert deep.depth == 10  # the lookup chain is deeper than the drafts
    assert dynamic_tree("dynamic_255_k24") == DynamicTree(255, 6, 24, 24)
    assert dynamic_tree("mc_sim_7b_63") is None and dynamic_tree("dynamic_x") is None
    assert resolve_tree("dynamic_60", num_heads=16, lookup=10) == DynamicTree(60, 6, 10, 10, 10)
    assert hash(resolve_tree("dynamic_60", 16)) == hash(DynamicTree(60, 6))  # a static jit argument
    with pytest.raises(ValueError, match="dynamic tree depth 6 exceeds the drafter's 4 depths"):
        resolve_tree("dynamic_60", num_heads=4)
    with pytest.raises(ValueError, match="511 nodes > the 510 drafted"):
        dynamic_tree("dynamic_511")
    with pytest.raises(ValueError, match="beam 12 > topk 10"):
        DynamicTree(20, 3, topk=10, beam=12)
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        DynamicTree(0, 3)
