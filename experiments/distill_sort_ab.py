"""Interleaved A/B of self-distillation throughput: `generate()` with the prompts
grouped by length (one call over several batches) against batches in file order (one call per batch).

    PYTHONPATH=. python experiments/distill_sort_ab.py   # 96 prompts of runs/calib_prompts.jsonl, batch 32, 64 tokens
"""

import statistics
import time

import medusa_jax
from medusa_jax.prompts import read_prompts

m = medusa_jax.load(heads=False)
ps = read_prompts("runs/calib_prompts.jsonl", 96)  # held out from distillation
B, N = 32, 64


def unsorted():
    return [
        r for i in range(0, len(ps), B) for r in m.generate(ps[i : i + B], max_new_tokens=N, mode="ar", batch_size=B)
    ]


def grouped():
    return m.generate(ps, max_new_tokens=N, mode="ar", batch_size=B)


unsorted()
grouped()  # compile every shape once
res = {"file order": [], "by length": []}
for rep in range(3):
    for name, fn in (("file order", unsorted), ("by length", grouped)):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        res[name].append(sum(r.new_tokens for r in out) / dt)
        print(name, rep, round(res[name][-1], 1), "tok/s", flush=True)
ratios = [b / a for a, b in zip(res["file order"], res["by length"])]
print(
    "median tok/s",
    {k: round(statistics.median(v), 1) for k, v in res.items()},
    "ratio per repeat",
    [round(r, 2) for r in ratios],
    "median",
    round(statistics.median(ratios), 2),
)
