"""Trees sized to the hardware: measured head accuracies x measured step costs -> the best tree per batch size.

1. `rank_accuracy`: the model answers held-out prompts greedily; on those answers, the share of positions where head
   k's rank-r candidate is the token k+2 ahead (`acc[k, r]`, over the draft vocabulary when the heads have one).
2. `grow_tree`: the paper's construction. A node's expected acceptance is the product of the rank accuracies on its
   path; nodes are added best first (a child never beats its parent, so every prefix of the order is a valid tree).
   The tokens per step of each grown tree, alone and with a lookup chain, are then computed exactly on the same
   answers (`medusa_jax.simulate`: the decode loop's own step count, not an estimate).
3. `step_costs`: seconds per step of the real decode loop for trees of 1..64 nodes (each without and with the lookup
   chain) at a batch size, and of the same loop without tree or heads (autoregressive), all over a KV cache of the
   same size (`step_slots`), the repeats taken round-robin across them (a burst of load on a shared machine then
   hits one repeat of each option, not all repeats of one).
4. `choose`: per batch size, the tree and chain maximizing tokens/step / cost, or no tree at all (AR) when none is
   expected to beat AR by `MIN_GAIN` (1.15: a margin over the step costs' run-to-run noise).
5. `confirm`: a picked tree must also decode the prompts end to end at least `CONFIRM_GAIN` (1.05) times as fast as
   AR (interleaved runs of `generate`), or the batch size gets AR.

`python -m medusa_jax.bench --calibrate --heads DIR --prompts-file F` writes `DIR/calibration-<device>-<dtype>.json`;
`medusa_jax.load(..., heads=DIR)` then decodes each batch with the tree (and chain) chosen for its size on that kind
of device.
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

from medusa_jax.lookup import DEFAULT_LOOKUP

TREE_SIZES = (1, 2, 4, 8, 16, 32, 64)  # non-root nodes


def device_key(dtype: str) -> str:
    """`cpu-float32`, `nvidia_h200-bfloat16`, ...: which calibration file applies to this process."""
    kind = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    return f"{re.sub(r'[^a-z0-9]+', '_', str(kind).lower()).strip('_')}-{dtype}"


def calibration_path(heads_dir: str, dtype: str) -> str:
    return os.path.join(heads_dir, f"calibration-{device_key(dtype)}.json")


# ---------------------------------------------------------------------------------------------- accuracy
def greedy_answers(model, prompts: list, max_new_tokens: int = 64, batch_size: int = 8) -> list:
    """The model's greedy answers to `prompts`, each with its `head_ranks`: `simulate.answer_ranks` output."""
    from medusa_jax.simulate import answer_ranks

    res = model.generate(prompts, max_new_tokens=max_new_tokens, mode="ar", batch_size=batch_size)
    return answer_ranks(model, [(r.prompt_ids, r.output_ids) for r in res])


def accuracy_of(ranked: list, topk: int = 10) -> dict:
    """acc `[K, topk]` from `greedy_answers`: P(head k's rank-r candidate = the token k+2 ahead), over the positions
    where the heads run (the last prompt token on) and the token k+2 ahead exists."""
    k = ranked[0][2].shape[0]
    hits = np.zeros((k, topk))
    total = np.zeros(k)
    for seq, n_p, rk in ranked:
        for h in range(k):
            v = rk[h, n_p - 1 : len(seq) - h - 2]
            total[h] += len(v)
            hits[h] += np.bincount(np.minimum(v, topk), minlength=topk + 1)[:topk]
    acc = hits / np.maximum(total, 1)[:, None]
    return {"acc": acc.round(5).tolist(), "positions": total.astype(int).tolist(), "prompts": len(ranked)}


def rank_accuracy(model, prompts: list, max_new_tokens: int = 64, topk: int = 10, batch_size: int = 8) -> dict:
    """acc `[K, topk]`: P(head k's rank-r candidate = the token k+2 ahead) on the model's own greedy answers."""
    return accuracy_of(greedy_answers(model, prompts, max_new_tokens, batch_size), topk)


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
def step_slots(prompt_len: int, trees, iters: int = 8) -> int:
    """KV-cache slots that hold `prompt_len` prompt tokens and the steps `step_timer` runs with any of `trees`. Step
    costs to be compared must be measured at one slot count: attention runs over all slots, so a tree step timed over
    a bigger cache than the plain step it is compared with would look dearer than it is."""
    from medusa_jax.generation import bucket

    p = bucket(prompt_len, 16)
    return max(bucket(p + (iters + 1) * (t.depth + 1) + t.num_nodes + 1, 64) for t in trees)


def step_timer(model, prompt_ids: list[int], batch: int, tree, heads, iters: int = 8, *, slots: int):
    """A function timing the real decode loop (candidates, tree forward, acceptance, cache compaction) at `batch`
    rows: each call prefills `prompt_ids` into a fresh KV cache of `slots` slots (`step_slots` of all the trees
    compared, so that they are timed over equal caches), runs `iters` steps and returns seconds per step (the
    prefill untimed). Compiled here, so calls time no compilation. `heads=None` with a root-only tree is the
    autoregressive step."""
    from medusa_jax.generation import bucket
    from medusa_jax.medusa_decode import MedusaLoop, Thresholds, continue_medusa, start_medusa
    from medusa_jax.model import KVCache
    from medusa_jax.sampling import SamplingParams

    need = step_slots(len(prompt_ids), [tree], iters)
    if slots < need:
        raise ValueError(f"step_timer: {slots} slots do not hold the prompt and the steps timed ({need} needed)")
    p = bucket(len(prompt_ids), 16)
    loop = MedusaLoop(tree, 16, slots, "greedy", ())  # no EOS: rows never finish
    tokens = np.zeros((batch, p), np.int32)
    tokens[:, : len(prompt_ids)] = prompt_ids
    lengths = jnp.full((batch,), len(prompt_ids), jnp.int32)
    sp, th = SamplingParams.make(1.0), Thresholds(jnp.float32(0.09), jnp.float32(0.3))
    big = jnp.int32(1 << 30)
    args = (model.cfg, loop, model.params, heads)

    def fresh():
        return start_medusa(*args, KVCache.zeros(model.cfg, batch, slots), jnp.zeros((batch,), jnp.int32),
                            jnp.asarray(tokens), lengths, big, jax.random.PRNGKey(0))  # fmt: skip

    jax.block_until_ready(continue_medusa(*args, fresh(), big, sp, th, jnp.int32(1)))  # compile

    def run() -> float:
        state = jax.block_until_ready(fresh())
        t0 = time.perf_counter()
        jax.block_until_ready(continue_medusa(*args, state, big, sp, th, jnp.int32(iters)))
        return (time.perf_counter() - t0) / iters

    return run


def step_costs(model, prompt_ids: list[int], batch: int, options: dict, iters: int = 8, repeats: int = 3, *,
               slots: int) -> dict:  # fmt: skip
    """{key: (tree, heads)} -> {key: median seconds per step} (`step_timer`). The repeats go round-robin over the
    options, so that a burst of load on a shared machine costs each option at most one of its repeats instead of
    every repeat of whichever option it hit."""
    timers = {k: step_timer(model, prompt_ids, batch, tree, heads, iters, slots=slots) for k, (tree, heads) in
              options.items()}  # fmt: skip
    times: dict = {k: [] for k in options}
    for _ in range(repeats):
        for k, run in timers.items():
            times[k].append(run())
    return {k: statistics.median(t) for k, t in times.items()}


MIN_GAIN = 1.15  # step-cost ratios on a shared machine move by 15-20% between runs: a tree must promise more


def choose(expected: dict, cost: dict, min_gain: float = MIN_GAIN) -> tuple:
    """expected tokens per step / cost per option (a tree size, or (size, chain length); the first key is AR: 1 token
    per AR step) -> (best option, expected tokens/s per option). A tree is chosen only when it is expected to be at
    least `min_gain` times as fast as AR, so that measurement noise alone does not pick one."""
    rate = {n: expected[n] / cost[n] for n in cost}
    ar = next(iter(cost))
    best = max(rate, key=rate.get)
    return (best if rate[best] >= min_gain * rate[ar] else ar), rate


CONFIRM_GAIN = 1.05  # a tree the step costs pick must also decode this much faster, end to end, than AR


def confirm(model, prompts: list, batch: int, tree, max_new_tokens: int = 64, repeats: int = 3) -> dict:
    """End-to-end check of a pick: `generate` with `tree` (TreeBuffers) against plain decoding on `prompts` (repeated
    to at least `batch`, and at least 4, rows; run `batch` rows at a time), both compiled first, the repeats
    alternating between them (`timing.run_ours_interleaved`). -> {"ar_tokens_per_s", "tree_tokens_per_s", "ratio"}.
    The step costs price one step of each alone; this sees everything a decode runs (prefill, the steps' real mix
    of accepted lengths, every compiled piece), which on a CPU has come out well below their estimate."""
    from medusa_jax.timing import run_ours_interleaved

    rows = [prompts[i % len(prompts)] for i in range(max(batch, 4))]
    configs = {"ar": ("ar", {}), "tree": ("medusa", {"tree": tree})}
    out, _, _ = run_ours_interleaved(model, rows, configs, max_new_tokens, batch, repeats)
    ar, tr = out["ar"]["tokens_per_s"], out["tree"]["tokens_per_s"]
    return {"ar_tokens_per_s": round(ar, 2), "tree_tokens_per_s": round(tr, 2), "ratio": round(tr / ar, 3)}


def calibrate(model, prompts: list, batch_sizes=(1, 8, 32), sizes=TREE_SIZES, max_new_tokens: int = 64,
              lookup: int = DEFAULT_LOOKUP, min_gain: float = MIN_GAIN, log=print,
              budget_s: float | None = None, repeats: int = 3, confirm_gain: float = CONFIRM_GAIN) -> dict:  # fmt: skip
    """The whole calibration (see the module docstring); returns the JSON-able result. lookup: the chain length
    tried beside each tree (0: trees alone); min_gain: the expected speedup over AR a tree needs (`choose`).
    budget_s: seconds for the whole calibration. The step costs are measured in two passes over the batch sizes: AR
    and every other tree size (1, 4, 16, 64), then the other sizes (2, 8, 32); a measurement that the slowest one so
    far at its batch size says would end past the budget is left out (listed under "skipped"), and each batch size's
    choice is made among the measured options. Each option is timed `repeats` times, the later repeats round-robin
    over all the options measured (`step_costs`), and its median is used. A tree picked this way is then checked
    end to end (`confirm`) and kept only if it decodes at least `confirm_gain` times as fast as AR (0: no check)."""
    from medusa_jax.simulate import tokens_per_step
    from medusa_jax.tree import build_buffers

    t0 = time.perf_counter()
    ranked = greedy_answers(model, prompts, max_new_tokens)
    accuracy = accuracy_of(ranked)
    log(f"head accuracy by rank (top-1 per head): {[round(a[0], 3) for a in accuracy['acc']]}")
    paths, _ = grow_tree(accuracy["acc"], max(sizes))
    chains = (0, lookup) if lookup else (0,)
    trees = {(n, c): build_buffers(paths[:n], topk=10, lookup=c) for n in sizes if n <= len(paths) for c in chains}
    expected = {(0, 0): 1.0, **{o: tokens_per_step(ranked, t)["tokens_per_step"] for o, t in trees.items()}}
    prompt_ids = [int(i) for i in ranked[0][0][: ranked[0][1]]]
    root_only = build_buffers([], topk=1)

    def per_chain(values: dict, c: int, fmt) -> dict:  # {(n, c): x} -> {"n": x} for one chain length (AR as 0)
        return {str(n): fmt(x) for (n, cc), x in values.items() if cc == c or n == 0}

    out = {"device": device_key(model.cfg.param_dtype), "accuracy": accuracy, "lookup": lookup, "min_gain": min_gain,
           "expected_tokens_per_step": per_chain(expected, 0, lambda x: round(float(x), 4)),
           "order": paths, "by_batch": {}}  # fmt: skip
    if lookup:
        out["expected_tokens_per_step_lookup"] = per_chain(expected, lookup, lambda x: round(float(x), 4))
    log("tokens per step (exact, on these answers): " + ", ".join(f"{n}+{c}:{e:.2f}" for (n, c), e in expected.items()))
    slots = step_slots(len(prompt_ids), [root_only, *trees.values()])  # every option timed over the same cache
    out["step_slots"], out["repeats"] = slots, repeats
    ns = sorted({n for n, _ in trees})
    passes = [[(0, 0)] + [(n, c) for n in ns[::2] for c in chains], [(n, c) for n in ns[1::2] for c in chains]]
    timers: dict = {}  # (batch, option) -> step_timer
    times: dict = {}  # (batch, option) -> seconds per step, one per repeat
    last: dict = {}  # (batch, option) -> seconds the last measurement took (prefill and compile included)
    slowest: dict = {b: 0.0 for b in batch_sizes}
    skipped: dict = {}

    def over_budget(seconds: float) -> bool:
        return budget_s is not None and time.perf_counter() - t0 + seconds > budget_s

    for o, b in [(o, b) for options in passes for b in batch_sizes for o in options]:
        if o != (0, 0) and over_budget(slowest[b]):
            skipped.setdefault(str(b), []).append(list(o))
            continue
        t1 = time.perf_counter()
        tree, heads = (root_only, None) if o == (0, 0) else (trees[o], model.heads)
        timers[b, o] = step_timer(model, prompt_ids, b, tree, heads, slots=slots)
        times[b, o] = [timers[b, o]()]
        last[b, o] = time.perf_counter() - t1
        slowest[b] = max(slowest[b], last[b, o])
    for _ in range(repeats - 1):  # the other repeats round-robin over every option measured (see step_costs)
        for key, run in timers.items():
            if not over_budget(last[key]):
                t1 = time.perf_counter()
                times[key].append(run())
                last[key] = time.perf_counter() - t1
    costs: dict = {b: {o: statistics.median(t) for (bb, o), t in times.items() if bb == b} for b in batch_sizes}
    for b in batch_sizes:
        cost = dict(sorted(costs[b].items()))
        (best, chain), rate = choose(expected, cost, min_gain)
        v = {
            "step_ms": per_chain(cost, 0, lambda x: round(x * 1e3, 3)),
            "expected_tokens_per_s": per_chain(rate, 0, lambda x: round(x, 2)),
            "best_size": int(best),
            "tree": paths[:best],
            "lookup": int(chain),
        }
        if lookup:
            v["step_ms_lookup"] = per_chain(cost, lookup, lambda x: round(x * 1e3, 3))
            v["expected_tokens_per_s_lookup"] = per_chain(rate, lookup, lambda x: round(x, 2))
        out["by_batch"][str(b)] = v
        log(f"batch {b}: step ms " + ", ".join(f"{n}+{c}:{x * 1e3:.1f}" for (n, c), x in cost.items())
            + f" -> best {best} nodes + chain {chain} "
            + f"({'AR' if best == 0 else f'{rate[(best, chain)] / rate[(0, 0)]:.2f}x AR expected'})")  # fmt: skip
        if best and confirm_gain:
            v["confirmed"] = check = confirm(model, prompts, b, trees[best, chain], max_new_tokens, repeats)
            check["kept"] = check["ratio"] >= confirm_gain
            if not check["kept"]:
                v.update(best_size=0, tree=[], lookup=0)
            log(f"batch {b}: end to end {check['tree_tokens_per_s']:.1f} against AR {check['ar_tokens_per_s']:.1f} "
                f"tokens/s ({check['ratio']:.2f}x) -> {'keep the tree' if check['kept'] else 'AR'}")  # fmt: skip
    if budget_s is not None:
        out["budget_s"] = budget_s
        out["skipped"] = skipped
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def read_calibration(heads_dir: str, dtype: str) -> dict | None:
    path = calibration_path(heads_dir, dtype)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cal = json.load(f)
        for b, v in cal["by_batch"].items():
            lookup = v.get("lookup", 0)
            if int(b) <= 0 or not isinstance(v["tree"], list):
                raise ValueError(f"batch {b!r}: not a positive batch size with a list of tree paths")
            if isinstance(lookup, bool) or not isinstance(lookup, int) or not 0 <= lookup <= 256:
                raise ValueError(f"batch {b!r}: lookup {lookup!r} is not a chain length in 0..256")
        if not cal["by_batch"]:
            raise ValueError("no batch sizes")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise ValueError(f"{path}: unreadable calibration ({e}); delete it or rerun --calibrate") from None
    return cal


def _nearest(cal: dict, batch: int) -> dict:
    """The calibrated choice for the nearest calibrated batch size (the larger one on a tie)."""
    sizes = sorted(int(b) for b in cal["by_batch"])
    return cal["by_batch"][str(min(sizes, key=lambda s: (abs(np.log(s) - np.log(batch)), -s)))]


def tree_for_batch(cal: dict, batch: int) -> list[list[int]]:
    """The calibrated tree for this batch size ([]: no tree, AR steps)."""
    return _nearest(cal, batch)["tree"]


def lookup_for_batch(cal: dict, batch: int) -> int:
    """The calibrated lookup-chain length for this batch size (0 in calibrations made before the chain existed)."""
    return int(_nearest(cal, batch).get("lookup", 0))


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
    chain = cal.get("lookup", 0)
    for b, v in cal["by_batch"].items():
        sizes = [int(n) for n in v["expected_tokens_per_s"]]
        (line,) = ax.plot(sizes, list(v["expected_tokens_per_s"].values()), marker="o",
                          label=f"tokens/s, batch {b} (per row)")  # fmt: skip
        if "expected_tokens_per_s_lookup" in v:
            w = v["expected_tokens_per_s_lookup"]
            ax.plot([int(n) for n in w], list(w.values()), marker="s", ls="--", color=line.get_color(),
                    label=f"tokens/s, batch {b}, + {chain}-node lookup chain")  # fmt: skip
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("tree nodes (0 = autoregressive)")
    ax.set_ylabel("expected tokens/s per row")
    ax2 = ax.twinx()
    for key, style, what in (("expected_tokens_per_step", "k--", "heads' tree"),
                             ("expected_tokens_per_step_lookup", "k-.", "tree + lookup chain")):  # fmt: skip
        if key in cal:
            e = cal[key]
            ax2.plot([int(n) for n in e], list(e.values()), style, label=f"tokens per step, {what}")
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
