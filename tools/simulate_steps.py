"""Greedy tokens per step of trees and lookup-chain variants on real answers (`medusa_jax.simulate`), exact and in
seconds: one forward per answer, then a walk per variant.

    PYTHONPATH=. python tools/simulate_steps.py --answers runs/dev_m1_cpu16_l10.jsonl --cache runs/sim_m1.pkl \\
        --trees cpu_16,mc_sim_7b_63 --lookups 0,10,16 [--heads smollm2_medusa2] [--branches 1,2] [--anchors 1,2]

`--answers`: a `decode.py --output` file of greedy answers (the prompts are encoded again with the chat template).
`--branches B` and `--anchors` try lookup variants the decoder does not have (docs/BENCHMARKS.md): B
chains from the B latest occurrences with different next tokens, and chains that continue the heads' top-1 path of
depth d. `--trees none` is the lookup chain alone; `--trees dynamic_255_k16` a feature drafter's dynamic tree (drafted
from every position of each answer, so the cache does not hold it).
"""

import argparse
import dataclasses
import json
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medusa_jax.lookup import NGRAM  # noqa: E402
from medusa_jax.simulate import answer_ranks, tokens_per_step  # noqa: E402
from medusa_jax.tree import build_buffers, dynamic_tree, get_tree  # noqa: E402


def lookup_drafts(ctx: list[int], size: int, branches: int) -> list[list[int]]:
    """Up to `branches` drafts after the latest occurrences of ctx's last n-gram (the longest n that occurs), each
    with a first token that no earlier draft has."""
    out, firsts = [], set()
    for n in range(NGRAM, 0, -1):
        for s in range(len(ctx) - n - 1, -1, -1):
            d = ctx[s + n : s + n + size]
            if len(ctx) > n and ctx[s : s + n] == ctx[-n:] and d and d[0] not in firsts:
                firsts.add(d[0])
                out.append(d)
                if len(out) == branches:
                    return out
        if out:
            return out
    return out


def matched(draft, seq, start):
    a = 0
    while a < len(draft) and start + a < len(seq) and draft[a] == seq[start + a]:
        a += 1
    return a


def walk_variant(seq, n_prompt, rank, choices, lookup, branches, anchors):
    paths, depth = set(choices), max((len(c) for c in choices), default=0)
    length, steps = n_prompt, 0
    while length < len(seq):
        t, acc = length - 1, 0
        for d in range(1, depth + 1):
            if tuple(int(rank[h, t]) for h in range(d)) not in paths:
                break
            acc = d
        for draft in lookup_drafts(seq[: length + 1], lookup, branches):
            acc = max(acc, matched(draft, seq, length + 1))
        for d in anchors:  # the heads' top-1 path of depth d, then a chain from the context that ends with it
            if all(int(rank[h, t]) == 0 for h in range(d)):
                for draft in lookup_drafts(seq[: length + 1 + d], lookup, 1):
                    acc = max(acc, d + matched(draft, seq, length + 1 + d))
        length += 1 + min(acc, len(seq) - length - 1)
        steps += 1
    return steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--answers", required=True, help="decode.py --output JSONL of greedy answers")
    ap.add_argument("--heads", default=None)
    ap.add_argument("--trees", default="cpu_16")
    ap.add_argument("--lookups", default="0,10")
    ap.add_argument("--branches", default="1")
    ap.add_argument("--anchors", default="", help="top-1 path depths that get a chain of their own")
    ap.add_argument("--cache", help="pickle of the answers' head ranks: written once, read on later runs")
    args = ap.parse_args()

    loaded = {}

    def model_and_answers():  # loaded once, when needed
        if not loaded:
            import medusa_jax

            m = medusa_jax.load(heads=args.heads)
            with open(args.answers) as f:
                rows = [json.loads(line) for line in f]
            loaded["m"], loaded["pairs"] = m, [(m.encode(r["prompt"]), r["output_ids"]) for r in rows]
        return loaded["m"], loaded["pairs"]

    trees = args.trees.split(",")
    static = [t for t in trees if dynamic_tree(t) is None]
    if static and args.cache and os.path.exists(args.cache):
        with open(args.cache, "rb") as f:
            k, ranked = pickle.load(f)
    elif static:
        m, pairs = model_and_answers()
        ranked, k = answer_ranks(m, pairs), m.heads_config.num_heads
        if args.cache:
            with open(args.cache, "wb") as f:
                pickle.dump((k, ranked), f)
    anchors = [int(a) for a in args.anchors.split(",") if a]
    for tree in trees:
        if (dyn := dynamic_tree(tree)) is not None:  # a feature drafter's dynamic tree: drafted from each position
            m, pairs = model_and_answers()
            for lk in map(int, args.lookups.split(",")):
                t = dataclasses.replace(dyn, lookup=lk)
                print(json.dumps(dict(tree=tree, lookup=lk) | tokens_per_step(answer_ranks(m, pairs, tree=t), t)))
            continue
        choices = [tuple(c) for c in get_tree(tree) if len(c) <= k] if tree != "none" else []
        for lk in map(int, args.lookups.split(",")):
            for br in map(int, args.branches.split(",")) if lk else [1]:
                row = dict(tree=tree, lookup=lk, branches=br, anchors=anchors)
                if br == 1 and not anchors:
                    row.update(tokens_per_step(ranked, build_buffers(choices, topk=10, lookup=lk)))
                else:
                    steps = sum(walk_variant(s, n, r, choices, lk, br, anchors) for s, n, r in ranked)
                    tokens = sum(len(s) - n for s, n, _ in ranked)
                    row.update(nodes=len(choices) + lk * (br + len(anchors)), steps=steps, tokens=tokens,
                               tokens_per_step=round(tokens / steps, 4))  # fmt: skip
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
