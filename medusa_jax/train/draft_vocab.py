"""A reduced draft vocabulary for the Medusa heads (FR-Spec style): the tokens the model itself emits most.

On a CPU the heads' vocabulary projections (K heads x hidden x 49k for SmolLM2) cost about as much as the backbone's
step; projecting onto the Vd most frequent tokens of the model's own answers cuts that by V / Vd while losing only
the rare tokens as candidates. Greedy output is unchanged (the base model verifies every candidate).

    python -m medusa_jax.train.draft_vocab --data runs/data_smollm2 --size 8192 --out medusa_jax/head_sets/smollm2_medusa1

writes `draft_vocab.json` (`{"ids": [...most frequent first], "size": Vd, "coverage": ...}`) next to the heads;
`medusa_jax.load(..., heads=DIR)` then uses it (`draft_vocab=False` turns it off; reading: `medusa_jax.draft_vocab`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from medusa_jax.draft_vocab import FILE

__all__ = ["build", "token_counts"]


def token_counts(rows: list[dict]) -> Counter:
    """Answer-token frequencies (loss_mask == 1) of distilled rows."""
    c: Counter = Counter()
    for r in rows:
        c.update(t for t, m in zip(r["input_ids"], r["loss_mask"]) if m)
    return c


def build(counts: Counter, size: int) -> dict:
    total = sum(counts.values())
    ids = [t for t, _ in counts.most_common(size)]
    covered = sum(counts[t] for t in ids)
    return {"size": len(ids), "ids": ids, "coverage": round(covered / max(total, 1), 5), "answer_tokens": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="distilled data dir(s), comma-separated (training data only)")
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--out", required=True, help="the heads directory")
    args = ap.parse_args(argv)
    from medusa_jax.train.distill import load_rows, write_atomic

    if args.size < 1:
        print(f"--size must be >= 1, got {args.size}", file=sys.stderr)
        return 2
    try:
        rows = [r for d in args.data.split(",") if d.strip() for r in load_rows(d.strip())]
    except (OSError, ValueError) as e:
        print(f"draft_vocab: error: {e}", file=sys.stderr)
        return 2
    info = build(token_counts(rows), args.size)
    info["source"] = args.data
    write_atomic(os.path.join(args.out, FILE), json.dumps(info) + "\n")
    print(
        f"{args.out}/{FILE}: {info['size']} tokens cover {info['coverage']:.1%} of {info['answer_tokens']} answer tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
