"""Trees sized to the hardware: measured head accuracies x measured step costs -> the best tree per batch size.

1. `rank_accuracy`: the model answers held-out prompts greedily; on those answers, the share of positions where head
   k's rank-r candidate is the token k+2 ahead (`acc[k, r]`, over the draft vocabulary when the heads have one).
2. `grow_tree`: the paper's construction. A node's expected acceptance is the product of the rank accuracies on its
   path; nodes are added best first (a child never beats its parent, so every prefix of the order is a valid tree),
   and E[tokens per step](N) = 1 + the sum over the first N nodes.
3. `step_cost`: seconds per step of the real decode loop for trees of 1..64 nodes at a batch size, and of the same
   loop without tree or heads (autoregressive).
4. `choose`: per batch size, N maximizing E[tokens/step](N) / cost(N), or no tree at all (AR) when nothing beats it.

`python -m medusa_jax.bench --calibrate --heads DIR --prompts-file F` writes `DIR/calibration-<device>-<dtype>.json`;
`medusa_jax.load(..., heads=DIR)` then decodes each batch with the tree chosen for its size on that kind of device.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

TREE_SIZES = (1, 2, 4, 8, 16, 32, 64)  # non-root nodes


def device_key(dtype: str) -> str:
    """`cpu-float32`, `nvidia_h200-bfloat16`, ...: which calibration file applies to this process."""
    kind = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    return f"{re.sub(r'[^a-z0-9]+', '_', str(kind).lower()).strip('_')}-{dtype}"


def calibration_path(heads_dir: str, dtype: str) -> str:
    return os.path.join(heads_dir, f"calibration-{device_key(dtype)}.json")


# ---------------------------------------------------------------------------------------------- accuracy
def rank_accuracy(model, prompts: list, max_new_tokens: int = 64, topk: int = 10, batch_size: int = 8) -> dict:
    """acc `[K, topk]`: P(head k's rank-r candidate = the token k+2 ahead) on the model's own greedy answers."""
    from medusa_jax.simulate import head_ranks

    res = model.generate(prompts, max_new_tokens=max_new_tokens, mode="ar", batch_size=batch_size)
    k = model.heads_config.num_heads
    hits = np.zeros((k, topk))
    total = np.zeros(k)
    for r in res:
        seq = list(r.prompt_ids) + list(r.output_ids)
        n_p, n = len(r.prompt_ids), len(seq)
        rk = head_ranks(model, seq)  # [K, n]
        for h in range(k):  # the heads run at positions t >= n_p - 1 (the last prompt token, then the answer)
            v = rk[h, n_p - 1 : n - h - 2]
            total[h] += len(v)
            hits[h] += np.bincount(np.minimum(v, topk), minlength=topk + 1)[:topk]
    acc = hits / np.maximum(total, 1)[:, None]
    return {"acc": acc.round(5).tolist(), "positions": total.astype(int).tolist(), "prompts": len(res)}


# ---------------------------------------------------------------------------------------------- trees
def grow_tree(acc, max_nodes: int = 64) -> tuple[list[list[int]], list[float]]:
    """(paths in the order added, expected tokens per step after each addition: 1 + sum of path products)."""
    acc = np.asarray(acc, np.float64)
    k, topk = acc.shape
    heap = [(-acc[0, r], (r,)) for r in range(topk)]
    heapq.heapify(heap)
    paths, expected, e = [], [], 1.0
    while heap and len(paths) < max_nodes:
        neg, path = heapq.heappop(heap)
        paths.append(list(path))
        e += -neg
        expected.append(e)
        if len(path) < k:
            for r in range(topk):
                heapq.heappush(heap, (neg * acc[len(path), r], (*path, r)))
    return paths, expected


# ---------------------------------------------------------------------------------------------- cost
def step_cost(model, prompt_ids: list[int], batch: int, tree, heads, iters: int = 8, repeats: int = 3) -> float:
    """Median seconds per step of the real decode loop (candidates, tree forward, acceptance, cache compaction) at
    `batch` rows, after a prefill of `prompt_ids`. `heads=None` with a root-only tree is the autoregressive step."""
    from medusa_jax.generation import bucket
    from medusa_jax.medusa_decode import MedusaLoop, Thresholds, continue_medusa, start_medusa
    from medusa_jax.model import KVCache
    from medusa_jax.sampling import SamplingParams

    p = bucket(len(prompt_ids), 16)
    grow = (repeats + 1) * iters * (tree.depth + 1)
    slots = bucket(p + grow + tree.num_nodes + 1, 64)
    loop = MedusaLoop(tree, 16, slots, "greedy", ())  # no EOS: rows never finish
    tokens = np.zeros((batch, p), np.int32)
    tokens[:, : len(prompt_ids)] = prompt_ids
    lengths = jnp.full((batch,), len(prompt_ids), jnp.int32)
    sp, th = SamplingParams.make(1.0), Thresholds(jnp.float32(0.09), jnp.float32(0.3))
    big = jnp.int32(1 << 30)
    args = (model.cfg, loop, model.params, heads)
    state = start_medusa(*args, KVCache.zeros(model.cfg, batch, slots), jnp.zeros((batch,), jnp.int32),
                         jnp.asarray(tokens), lengths, big, jax.random.PRNGKey(0))  # fmt: skip
    state = jax.block_until_ready(continue_medusa(*args, state, big, sp, th, jnp.int32(1)))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = jax.block_until_ready(continue_medusa(*args, state, big, sp, th, jnp.int32(iters)))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def choose(expected: dict[int, float], cost: dict[int, float]) -> tuple[int, dict[int, float]]:
    """expected / cost per tree size (0 = AR: 1 token per AR step) -> (best size, expected tokens/s per size)."""
    rate = {n: expected[n] / cost[n] for n in cost}
    return max(rate, key=rate.get), rate


def calibrate(model, prompts: list, batch_sizes=(1, 8, 32), sizes=TREE_SIZES, max_new_tokens: int = 64,
              log=print) -> dict:  # fmt: skip
    """The whole calibration (see the module docstring); returns the JSON-able result."""
    from medusa_jax.tree import build_buffers

    t0 = time.perf_counter()
    accuracy = rank_accuracy(model, prompts, max_new_tokens=max_new_tokens)
    log(f"head accuracy by rank (top-1 per head): {[round(a[0], 3) for a in accuracy['acc']]}")
    paths, exp = grow_tree(accuracy["acc"], max(sizes))
    expected = {0: 1.0, **{n: float(exp[n - 1]) for n in sizes if n <= len(paths)}}
    trees = {n: build_buffers(paths[:n], topk=10) for n in expected if n}
    prompt_ids = model.encode(prompts[0]) if isinstance(prompts[0], str) else list(prompts[0])
    root_only = build_buffers([], topk=1)
    exp_json = {str(n): round(float(e), 4) for n, e in expected.items()}
    out = {"device": device_key(model.cfg.dtype), "accuracy": accuracy, "expected_tokens_per_step": exp_json,
           "order": paths, "by_batch": {}}  # fmt: skip
    for b in batch_sizes:
        cost = {0: step_cost(model, prompt_ids, b, root_only, None)}
        for n, tb in trees.items():
            cost[n] = step_cost(model, prompt_ids, b, tb, model.heads)
        best, rate = choose(expected, cost)
        out["by_batch"][str(b)] = {
            "step_ms": {str(n): round(c * 1e3, 3) for n, c in cost.items()},
            "expected_tokens_per_s": {str(n): round(r, 2) for n, r in rate.items()},
            "best_size": int(best),
            "tree": paths[:best],
        }
        log(f"batch {b}: step ms " + ", ".join(f"{n}:{c * 1e3:.1f}" for n, c in cost.items())
            + f" -> best {best} nodes ({'AR' if best == 0 else f'{rate[best] / rate[0]:.2f}x AR expected'})")  # fmt: skip
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def read_calibration(heads_dir: str, dtype: str) -> dict | None:
    path = calibration_path(heads_dir, dtype)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cal = json.load(f)
        {int(b): v["tree"] for b, v in cal["by_batch"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable calibration ({e}); delete it or rerun --calibrate") from None
    return cal


def tree_for_batch(cal: dict, batch: int) -> list[list[int]]:
    """The calibrated tree for the nearest calibrated batch size (the larger one on a tie)."""
    sizes = sorted(int(b) for b in cal["by_batch"])
    b = min(sizes, key=lambda s: (abs(np.log(s) - np.log(batch)), -s))
    return cal["by_batch"][str(b)]["tree"]


def plot(cal: dict, path: str) -> bool:
    """PNG: expected tokens/s (from measured step costs) and tokens per step against tree size. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for b, v in cal["by_batch"].items():
        sizes = [int(n) for n in v["expected_tokens_per_s"]]
        ax.plot(sizes, list(v["expected_tokens_per_s"].values()), marker="o", label=f"tokens/s, batch {b} (per row)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("tree nodes (0 = autoregressive)")
    ax.set_ylabel("expected tokens/s per row")
    ax2 = ax.twinx()
    e = cal["expected_tokens_per_step"]
    ax2.plot([int(n) for n in e], list(e.values()), "k--", label="tokens per step (expected)")
    if "measured" in cal:
        m = cal["measured"]
        ax2.plot([int(n) for n in m], [x["tokens_per_step"] for x in m.values()], "k:", marker="x",
                 label="tokens per step (measured)")  # fmt: skip
    ax2.set_ylabel("tokens per step")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [x.get_label() for x in lines], fontsize=7, loc="upper left")
    ax.set_title(f"Medusa tree size on {cal['device']}")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True
