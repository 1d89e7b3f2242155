"""Memory: what a batch needs, how much there is, and how much a run used.

`batch_bytes` estimates what one generation batch allocates beyond the params: its KV cache plus the largest
temporaries of one prefill chunk or one decode step (attention scores `[B, H, T, S]` float32, the verify logits
`[B, nodes, V]`, per-layer cache slices). It is an upper bound on XLA's `memory_analysis()` temporaries for the
jitted generate call (tests/test_memory.py checks it), and `plan_batches` uses it to size batches to a budget.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Sequence

from medusa_jax.config import ModelConfig

BUDGET_FRACTION = 0.5  # of the memory available when a run starts, for the KV cache and temporaries


def kv_bytes(cfg: ModelConfig, batch: int, slots: int) -> int:
    """The KV cache `[N, B, S, K, D]`, K and V."""
    return 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * cfg.jnp_dtype.itemsize


def logits_bytes(cfg: ModelConfig, batch: int, nodes: int) -> int:
    """One step's float32 base logits `[B, nodes, V]`."""
    return batch * nodes * cfg.vocab_size * 4


def batch_bytes(cfg: ModelConfig, batch: int, prompt_len: int, slots: int, nodes: int = 1) -> int:
    """Estimated bytes one generation batch allocates beyond the params: KV cache + the larger of one prefill chunk's
    and one decode step's temporaries. prompt_len: the padded prompt length; nodes: tokens verified per step (the
    tree's nodes; 1 for AR)."""
    from medusa_jax.generation import prefill_chunk

    h, e, act = cfg.num_heads, cfg.hidden_size, cfg.jnp_dtype.itemsize
    layer_kv = kv_bytes(cfg, batch, slots) // cfg.num_layers
    qkvo = e * cfg.head_dim * (2 * h + 2 * cfg.num_kv_heads)
    layer_params = (qkvo + 3 * e * cfg.intermediate_size) * cfg.jnp_param_dtype.itemsize  # sliced per layer

    def forward(t: int) -> int:  # one forward of t new tokens per row over the cache
        scores = 3 * batch * h * t * slots * 4  # scores, masked scores, probabilities
        mask = batch * t * slots * 5  # the [B, T, S] bool mask and its int32 gather indices
        acts = batch * t * (3 * cfg.intermediate_size + 8 * e) * max(act, 4)
        return scores + mask + acts + 2 * layer_kv + 2 * layer_params  # + this layer's cache slice and weights

    chunk = prefill_chunk(cfg, batch, prompt_len, slots)
    prefill = forward(chunk) + batch * prompt_len * 4 * e
    step = forward(nodes) + 2 * logits_bytes(cfg, batch, nodes) + 8 * batch * slots * 4  # + the lookup's [B, S]
    return kv_bytes(cfg, batch, slots) + max(prefill, step)


def available_bytes() -> int:
    """Memory free for a new batch: the accelerator's free memory, else the host's available memory."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_budget() -> int:
    """The default budget for one batch's cache and temporaries: `BUDGET_FRACTION` of the available memory."""
    return int(available_bytes() * BUDGET_FRACTION)


def plan_batches(lengths: Sequence[int], cap: int, fits: Callable[[int, int], bool]) -> list[list[int]]:
    """Group prompts into batches: indices into `lengths` (prompt lengths) per batch, in run order.

    All prompts form one batch when they are at most `cap` and `fits(batch, longest)`; otherwise prompts are sorted by
    length and each batch takes the next ones while it stays within `cap` prompts and `fits` (a prompt that does not
    fit even alone runs alone)."""
    n = len(lengths)
    if n <= cap and fits(n, max(lengths)):
        return [list(range(n))]
    batches: list[list[int]] = []
    cur: list[int] = []
    for j in sorted(range(n), key=lambda j: lengths[j]):
        if cur and (len(cur) >= cap or not fits(len(cur) + 1, lengths[j])):
            batches.append(cur)
            cur = []
        cur.append(j)
    return batches + [cur]


def parse_bytes(text: str) -> int:
    """'8G', '512M', '2.5GB', '1000000' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 8G, 512M)") from None
    if value <= 0:
        raise ValueError(f"memory size must be > 0, got {text!r}")
    return int(value * scale)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory() -> dict:
    """Peak memory so far: host RSS, and on an accelerator its `memory_stats()` peak. Values in bytes."""
    import jax

    out = {"host_peak_rss": peak_rss_bytes()}
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
            if key in stats:
                out[f"device_{key}"] = int(stats[key])
    return out


__all__ = [
    "available_bytes",
    "batch_bytes",
    "default_budget",
    "kv_bytes",
    "logits_bytes",
    "parse_bytes",
    "peak_memory",
    "peak_rss_bytes",
    "plan_batches",
]
