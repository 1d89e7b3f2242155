"""Timed runs of `generate`: several configurations on the same prompts, compiled first, their repeats interleaved
(a noisy neighbour then slows every configuration alike). Used by the benchmarks and by calibration's end-to-end
check of a picked tree."""

from __future__ import annotations

import statistics
import time


def run_stats(res, dt, batch_size):
    """One timed run's results and wall seconds -> (tokens/s, tokens/step, seconds per wall step)."""
    toks = sum(r.new_tokens for r in res)
    steps = sum(r.steps for r in res)
    # a batch runs as long as its slowest row: wall steps = the sum over batches of each batch's most steps
    wall_steps = sum(max(r.steps for r in res[i : i + batch_size]) for i in range(0, len(res), batch_size))
    return toks / dt, toks / max(steps, 1), dt / max(wall_steps, 1)


def warmup_batches(model, prompts, max_new, batch_size, mode=None, kw=None) -> list[list]:
    """One batch of `prompts` per compiled program that `generate(prompts, ...)` runs: per (rows, prompt-length
    bucket) of the batches it plans. Running them compiles everything the timed runs need."""
    from medusa_jax.generation import bucket

    kw = kw or {}
    encoded = [model.encode(p) for p in prompts]
    run_mode = mode or ("medusa" if model.heads is not None else "ar")  # as generate() plans its batches
    seen: dict = {}
    for idx in model.plan_batches(encoded, max_new, run_mode, batch_size, None, kw):
        seen.setdefault((len(idx), bucket(max(len(encoded[j]) for j in idx))), [prompts[j] for j in idx])
    return list(seen.values())


def run_ours_interleaved(model, prompts, configs: dict, max_new, batch_size, repeats):
    """configs: name -> (mode, kwargs). Each is compiled first (every prompt-length bucket: `warmup_batches`), then the repeats alternate between them (so a noisy
    neighbour slows every config alike); returns ({name: medians}, {name: per-repeat tokens/s}, {name: last results})."""
    out, per_rep = {}, {n: [] for n in configs}
    runs = {n: [] for n in configs}
    last = {}
    for name, (mode, kw) in configs.items():
        t0 = time.perf_counter()
        for batch in warmup_batches(model, prompts, max_new, batch_size, mode, kw):
            model.generate(batch, max_new_tokens=max_new, mode=mode, batch_size=batch_size, **kw)
        out[name] = {"compile_s": time.perf_counter() - t0}
    for _ in range(repeats):
        for name, (mode, kw) in configs.items():
            t0 = time.perf_counter()
            res = last[name] = model.generate(prompts, max_new_tokens=max_new, mode=mode, batch_size=batch_size, **kw)
            runs[name].append(run_stats(res, time.perf_counter() - t0, batch_size))
            per_rep[name].append(runs[name][-1][0])
    for name, r in runs.items():
        tps, tpstep, step_s = (statistics.median(x) for x in zip(*r))
        out[name].update(tokens_per_s=tps, tokens_per_step=tpstep, step_ms=step_s * 1e3)
    return out, per_rep, last
