"""Medusa candidate trees: named trees and the static index buffers used by tree attention.

A tree is given as Medusa ``medusa_choices``: a list of paths, each a list of top-k ranks, one rank per
Medusa head (``[0]`` = top-1 of head 0, ``[0, 1]`` = top-2 of head 1 under it, ...). Every prefix of a
path must itself be a path. Node 0 is the root (the base model's own next token); the other nodes are
the paths sorted by ``(len, path)``, exactly as in the reference ``generate_medusa_buffers``
(FasterDecoding/Medusa, ``medusa/model/utils.py``), whose buffers ``build_buffers`` reproduces.

Shipped trees live in ``medusa_jax/trees/*.json``: the Medusa reference trees (``mc_sim_7b_63`` and the
per-model trees of FasterDecoding/Medusa ``medusa/model/medusa_choices.py``, Apache-2.0, copied
verbatim) and small CPU trees ``cpu_{4,8,16,32}`` (the first N paths of ``mc_sim_7b_63`` in its listed
order, which is prefix-closed for these N). ``chain_N`` (top-1 only, depth N) is generated.

A tree may also carry a *lookup chain* (``lookup=N``): N more nodes after the heads' nodes, a chain hanging
from the root, whose tokens are not the heads' guesses but the tokens that followed the latest earlier
occurrence of the context's last n-gram (``medusa_jax.lookup``, prompt-lookup drafting). The verification,
the acceptance rules and the cache update treat them like any other path.

This module imports only numpy and the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "DynamicTree",
    "TreeBuffers",
    "build_buffers",
    "dynamic_tree",
    "get_tree",
    "list_trees",
    "max_depth",
    "validate_choices",
]

Path_ = tuple[int, ...]
_CHAIN_RE = re.compile(r"chain_([1-9][0-9]*)")
_CHAIN_LISTED = range(1, 6)
_DYNAMIC_RE = re.compile(r"dynamic_([1-9][0-9]*)(?:_d([1-9][0-9]*))?(?:_k([1-9][0-9]*))?")
DYNAMIC_DEPTH = 6  # `dynamic_N`'s drafting depth
DYNAMIC_TOPK = 10  # `dynamic_N`'s children per expanded node (and nodes expanded per depth)


def _fmt(path) -> str:
    return str(list(path))


def _is_list_like(x) -> bool:
    return hasattr(x, "__iter__") and not isinstance(x, str | bytes | dict)


def validate_choices(
    choices: Sequence[Sequence[int]], topk: int | None = None, num_heads: int | None = None
) -> tuple[Path_, ...]:
    """Checks ``choices`` and returns them as a tuple of int tuples sorted by ``(len, path)``.

    Raises ``ValueError`` naming the offending path for: a non-list entry or non-int rank, an empty
    path, a negative rank, a rank ``>= topk`` (if given), a path longer than ``num_heads`` (if given), a
    duplicate path, or a path whose parent (the path minus its last rank) is missing.
    """
    if not _is_list_like(choices):
        raise ValueError(f"choices must be a list of paths (lists of ints), got {type(choices).__name__}")
    paths: list[Path_] = []
    seen: set[Path_] = set()
    for raw in choices:
        items = list(raw) if _is_list_like(raw) else [None]
        if not all(isinstance(r, int | np.integer) and not isinstance(r, bool) for r in items):
            raise ValueError(f"path {raw!r} is not a list of ints")
        path = tuple(int(r) for r in items)
        if not path:
            raise ValueError("empty path [] (the root is implicit; every path needs at least one rank)")
        if min(path) < 0:
            raise ValueError(f"path {_fmt(path)} has a negative rank")
        if topk is not None and max(path) >= topk:
            raise ValueError(f"path {_fmt(path)} has rank {max(path)} >= topk={topk}")
        if num_heads is not None and len(path) > num_heads:
            raise ValueError(f"path {_fmt(path)} has depth {len(path)} > num_heads={num_heads}")
        if path in seen:
            raise ValueError(f"duplicate path {_fmt(path)}")
        seen.add(path)
        paths.append(path)
    for path in paths:
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(f"path {_fmt(path)} is not prefix-closed: its parent {_fmt(path[:-1])} is missing")
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


def max_depth(choices: Sequence[Sequence[int]]) -> int:
    """Longest path length D in ``choices`` (0 for an empty tree)."""
    return max((len(p) for p in choices), default=0)


@dataclasses.dataclass(frozen=True, eq=False)
class TreeBuffers:
    """Static tree buffers (read-only numpy arrays); L = num_nodes (incl. root), D = depth, P = leaves.

    Fields (reference names in brackets):
      choices: the paths, sorted by ``(len, path)``; node ``i >= 1`` is ``choices[i - 1]``.
      topk: number of candidates taken from each Medusa head.
      attn_mask: ``[L, L]`` float32 0/1; ``attn_mask[i, j] = 1`` iff j is i or an ancestor of i
        (the root is an ancestor of all) [``medusa_attn_mask[0, 0]``].
      tree_indices: ``[L]`` int32; index of each node's token in the flat candidate vector
        ``[base_top1, head0_top0..topk-1, head1_top0.., ...]``: 0 for the root, else
        ``topk * (depth - 1) + rank + 1``.
      position_ids: ``[L]`` int32; depth of each node (root 0) [``medusa_position_ids``].
      retrieve_indices: ``[P, D + 1]`` int32; one row per leaf (leaves in reverse sorted order, then the
        lookup chain's leaf), the node ids from the root to the leaf, padded with -1.
      lookup: number of lookup-chain nodes (ids ``len(choices) + 1 ..``; their ``tree_indices`` continue
        the flat candidate vector after the heads' candidates: ``topk * head_depth + 1 + j``).
    Equality and hash depend only on ``(choices, topk, lookup)``, so instances can be static ``jax.jit`` args.
    """

    choices: tuple[Path_, ...]
    topk: int
    attn_mask: np.ndarray
    tree_indices: np.ndarray
    position_ids: np.ndarray
    retrieve_indices: np.ndarray
    lookup: int = 0

    @property
    def num_nodes(self) -> int:
        """L: number of tree nodes including the root (and the lookup chain)."""
        return len(self.choices) + 1 + self.lookup

    @property
    def head_depth(self) -> int:
        """Number of Medusa heads the tree uses (its longest rank path)."""
        return max_depth(self.choices)

    @property
    def depth(self) -> int:
        """D: longest path length (heads' paths and the lookup chain)."""
        return max(self.head_depth, self.lookup)

    @property
    def num_paths(self) -> int:
        """P: number of root-to-leaf paths (rows of ``retrieve_indices``)."""
        return self.retrieve_indices.shape[0]

    def _key(self):
        return (self.choices, self.topk, self.lookup)

    def __eq__(self, other):
        return isinstance(other, TreeBuffers) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        chain = f", lookup={self.lookup}" if self.lookup else ""
        return f"TreeBuffers(num_nodes={self.num_nodes}, depth={self.depth}, topk={self.topk}{chain})"


def build_buffers(
    choices: Sequence[Sequence[int]], topk: int = 10, num_heads: int | None = None, lookup: int = 0
) -> TreeBuffers:
    """Builds the tree buffers for ``choices`` (see ``TreeBuffers``), matching the reference
    ``generate_medusa_buffers`` element for element (with its ``TOPK`` = ``topk``) when ``lookup`` is 0;
    ``lookup=N`` appends an N-node lookup chain under the root.

    An empty ``choices`` (root only, which the reference rejects) gives L=1, D=0 and
    ``retrieve_indices == [[0]]``. Raises ``ValueError`` as ``validate_choices``.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if isinstance(lookup, bool) or not isinstance(lookup, int | np.integer) or lookup < 0:
        raise ValueError(f"lookup (the lookup chain's length) must be an int >= 0, got {lookup!r}")
    lookup = int(lookup)
    paths = validate_choices(choices, topk=topk, num_heads=num_heads)
    node = {p: i + 1 for i, p in enumerate(paths)}
    heads_n, hd = len(paths) + 1, max_depth(paths)
    n, d = heads_n + lookup, max(hd, lookup)

    attn_mask = np.eye(n, dtype=np.float32)
    attn_mask[:, 0] = 1
    tree_indices = np.zeros(n, np.int32)
    position_ids = np.zeros(n, np.int32)
    for p, i in node.items():
        attn_mask[i, [node[p[:c]] for c in range(1, len(p))]] = 1
        tree_indices[i] = topk * (len(p) - 1) + p[-1] + 1
        position_ids[i] = len(p)
    chain = np.arange(heads_n, n)
    for j, i in enumerate(chain):
        attn_mask[i, chain[:j]] = 1
        tree_indices[i] = topk * hd + 1 + j
        position_ids[i] = j + 1

    parents = {p[:-1] for p in paths}
    leaves = [p for p in reversed(paths) if p not in parents]
    rows = [[node[leaf[:c]] for c in range(1, len(leaf) + 1)] for leaf in leaves] + ([chain.tolist()] if lookup else [])
    retrieve = np.full((max(len(rows), 1), d + 1), -1, np.int32)
    retrieve[:, 0] = 0
    for r, row in enumerate(rows):
        retrieve[r, 1 : len(row) + 1] = row

    for a in (attn_mask, tree_indices, position_ids, retrieve):
        a.setflags(write=False)
    return TreeBuffers(paths, topk, attn_mask, tree_indices, position_ids, retrieve, lookup)


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """A tree drafted anew each step from the drafter's own confidence (EAGLE-2's dynamic tree), for drafters that
    condition on their path (a feature drafter). Static shapes, per-step structure:

    expand: depth 1 is the `topk` best tokens after the root; at each further depth the `beam` drafted nodes of the
            last depth with the highest path score (the sum of their path's draft log-probabilities) draft `topk`
            children each, for `head_depth` depths in all;
    rerank: the `size` drafted nodes with the highest path scores form the tree (a child never scores above its
            parent, so they form a tree), in drafting order: parents before children, siblings in rank order.
    The tree's parents and depths are arrays of each step (`[B, L]`); the lookup chain (`lookup` nodes) hangs from
    the root after the drafted nodes, as in `TreeBuffers`. Named `dynamic_N[_dD][_kK]` (`dynamic_tree`).
    """

    size: int  # drafted nodes verified each step (the tree has size + 1 + lookup nodes)
    head_depth: int  # drafting depth
    topk: int = 10  # children drafted per expanded node
    beam: int = 10  # nodes expanded per depth
    lookup: int = 0

    def __post_init__(self):
        for name in ("size", "head_depth", "topk", "beam"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"dynamic tree: {name} must be an int >= 1, got {v!r}")
        if isinstance(self.lookup, bool) or not isinstance(self.lookup, int | np.integer) or self.lookup < 0:
            raise ValueError(f"lookup (the lookup chain's length) must be an int >= 0, got {self.lookup!r}")
        if self.beam > self.topk:
            raise ValueError(f"dynamic tree: beam {self.beam} > topk {self.topk} (depth 1 has only topk nodes)")
        if self.size > self.pool:
            raise ValueError(
                f"dynamic tree: {self.size} nodes > the {self.pool} drafted at depth {self.head_depth} "
                f"(topk {self.topk}, beam {self.beam}): ask for fewer nodes or a deeper tree"
            )

    @property
    def pool(self) -> int:
        """Drafted candidates per step, of which `size` are kept: topk at depth 1, beam * topk at each further one."""
        return self.topk + (self.head_depth - 1) * self.beam * self.topk

    @property
    def num_nodes(self) -> int:
        return self.size + 1 + self.lookup

    @property
    def depth(self) -> int:
        return max(self.head_depth, self.lookup)

    @property
    def max_children(self) -> int:
        """The most children a node can have (the root: topk drafts and the lookup chain's first node)."""
        return self.topk + (1 if self.lookup else 0)

    def __repr__(self):
        chain = f", lookup={self.lookup}" if self.lookup else ""
        return f"DynamicTree(size={self.size}, depth={self.head_depth}, topk={self.topk}, beam={self.beam}{chain})"


def dynamic_tree(name: str, lookup: int = 0) -> DynamicTree | None:
    """`dynamic_N[_dD][_kK]` -> its DynamicTree: N nodes, D deep (default 6), K children per expanded node and K
    nodes expanded per depth (default 10); None for any other name."""
    m = _DYNAMIC_RE.fullmatch(str(name))
    if m is None:
        return None
    k = int(m.group(3) or DYNAMIC_TOPK)
    return DynamicTree(int(m.group(1)), int(m.group(2) or DYNAMIC_DEPTH), k, k, lookup)


def _tree_dir():
    return resources.files(__name__.rpartition(".")[0]).joinpath("trees")


def list_trees() -> list[str]:
    """Names accepted by ``get_tree``: shipped JSON trees and ``chain_1`` .. ``chain_5`` (sorted). Dynamic trees
    (``dynamic_N[_dD][_kK]``: ``dynamic_tree``) are named apart: they have no fixed paths."""
    shipped = [f.name[:-5] for f in _tree_dir().iterdir() if f.name.endswith(".json")]
    return sorted(shipped + [f"chain_{n}" for n in _CHAIN_LISTED])


def _load_json(text: str, where: str) -> list[list[int]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tree file {where}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"tree file {where}: expected a list of lists of ints, got {type(data).__name__}")
    try:
        validate_choices(data)
    except ValueError as e:
        raise ValueError(f"tree file {where}: {e}") from None
    return [list(p) for p in data]


def get_tree(name_or_path: str | Path) -> list[list[int]]:
    """Returns the tree ``choices`` (list of paths, in the file's order) for a name from
    ``list_trees()`` (``chain_N`` works for any N >= 1) or a path to a JSON file holding a list of
    lists of ints. Raises ``ValueError`` for an unknown name or a bad file (naming the file)."""
    name = str(name_or_path)
    if m := _CHAIN_RE.fullmatch(name):
        return [[0] * k for k in range(1, int(m.group(1)) + 1)]
    shipped = _tree_dir().joinpath(f"{name}.json")
    if "/" not in name and "\\" not in name and not name.endswith(".json") and shipped.is_file():
        return _load_json(shipped.read_text(), f"{name}.json")
    path = Path(name_or_path)
    if path.is_file():
        return _load_json(path.read_text(), str(path))
    raise ValueError(f"unknown tree {name!r}: not a file and not one of {list_trees()}")
