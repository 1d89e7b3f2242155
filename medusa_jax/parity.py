"""Greedy parity: does Medusa decoding return exactly the tokens of plain autoregressive decoding?

A lossless speculative decoder at temperature 0 must reproduce the base model's greedy output token for token.
`greedy_parity` runs both modes on the same prompts and batches and reports the rows that agree and, for the others,
the first new token that differs.
"""

from __future__ import annotations


def varied_prompts(prompts: list[str], n: int) -> list[str]:
    """`n` prompts spread evenly over the lengths of `prompts` (shortest to longest), in file order."""
    if n >= len(prompts):
        return list(prompts)
    by_len = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    picks = sorted({by_len[round(j * (len(prompts) - 1) / max(n - 1, 1))] for j in range(n)})
    return [prompts[i] for i in picks]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing new token (the shorter length when one is a prefix of the other), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def greedy_parity(model, prompts: list, max_new_tokens: int, batch_size: int, **medusa_kw) -> dict:
    """Greedy AR vs greedy Medusa (`medusa_kw`: tree, lookup, ...) on `prompts`, `batch_size` rows per batch.

    Returns {"rows", "equal", "first_diff": [index or None per prompt]}."""
    ar = model.generate(prompts, max_new_tokens=max_new_tokens, mode="ar", batch_size=batch_size)
    md = model.generate(prompts, max_new_tokens=max_new_tokens, mode="medusa", batch_size=batch_size, **medusa_kw)
    diffs = [first_difference(a.output_ids, m.output_ids) for a, m in zip(ar, md)]
    return {"rows": len(diffs), "equal": sum(d is None for d in diffs), "first_diff": diffs}
