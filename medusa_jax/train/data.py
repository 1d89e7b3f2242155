"""Training data: distilled rows (`medusa_jax.train.distill`) or synthetic sequences, turned into fixed-shape
batches whose order is a pure function of the step (so a restart resumes the exact stream).

A sequence batch: `input_ids` `[B, L]` int32, `loss_mask` `[B, L]` (1 on answer tokens; 0 on prompt and padding).
Targets are derived in the loss: the base model at position t predicts token t+1, Medusa head k predicts t+k+2.
"""

from __future__ import annotations

import os

import numpy as np

from medusa_jax.train.config import Config


def synthetic_rows(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Learnable toy sequences: arithmetic progressions mod (vocab - 1) after a 4-token 'prompt'."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        start, step = rng.integers(1, vocab - 1), rng.integers(1, 4)
        ids = ((start + step * np.arange(length)) % (vocab - 1) + 1).astype(np.int32)
        mask = np.ones(length, np.int32)
        mask[:4] = 0
        rows.append({"input_ids": ids.tolist(), "loss_mask": mask.tolist()})
    return rows


def load_data_rows(cfg: Config, vocab: int, dev: bool = False) -> list[dict]:
    """All training (or dev) rows, the parts of `data.path` concatenated in order."""
    return [row for part in load_data_parts(cfg, vocab, dev) for row in part]


def load_data_parts(cfg: Config, vocab: int, dev: bool = False) -> list[list[dict]]:
    """The rows of each comma-separated directory of `data.path` (one part for synthetic data), rows with empty
    answers skipped, `data.num_rows` applied to the concatenation."""
    if cfg.data.kind == "synthetic":
        n = cfg.data.synthetic_rows if not dev else cfg.data.synthetic_dev_rows
        return [synthetic_rows(n, cfg.data.synthetic_len, vocab, seed=cfg.train.seed + (1000 if dev else 0))]
    from medusa_jax.train.distill import load_rows

    path = check_path(cfg, dev)
    parts = [load_rows(part.strip()) for part in path.split(",") if part.strip()]
    if cfg.data.num_rows and not dev:
        left, cut = cfg.data.num_rows, []
        for rows in parts:
            cut.append(rows[:left])
            left -= len(cut[-1])
        parts = [rows for rows in cut if rows]
    total = sum(len(rows) for rows in parts)
    if not total:
        raise ValueError(f"no rows in {path}")
    parts = [[r for r in rows if any(r["loss_mask"][: cfg.data.max_len])] for rows in parts]
    kept = sum(len(rows) for rows in parts)
    if not kept:
        raise ValueError(f"{path}: all {total} rows have empty answers (no loss_mask=1 within data.max_len)")
    if kept < total:
        print(f"{path}: skipped {total - kept} of {total} rows with empty answers")
    return [rows for rows in parts if rows]


def check_path(cfg: Config, dev: bool = False) -> str:
    """`data.path` (or `data.dev_path`), refused when it holds dev data and is used for training."""
    from medusa_jax.train.distill import prompts_of

    path = cfg.data.dev_path if dev else cfg.data.path
    if "dev_prompts" in path or (not dev and cfg.data.dev_path and cfg.data.dev_path in path.split(",")):
        raise ValueError(f"data.path {path!r} looks like dev data: never train on it")
    made_from_dev = [p for p in path.split(",") if "dev_prompts" in os.path.basename(prompts_of(p.strip()))]
    if made_from_dev and not dev:
        raise ValueError(f"data.path {made_from_dev[0]!r} holds answers to dev_prompts: never train on it")
    return path


def pack(rows: list[dict], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> right-padded `[N, max_len]` ids and loss mask (cut at max_len)."""
    n = len(rows)
    ids = np.zeros((n, max_len), np.int32)
    mask = np.zeros((n, max_len), np.int32)
    for i, r in enumerate(rows):
        x = r["input_ids"][:max_len]
        ids[i, : len(x)] = x
        mask[i, : len(x)] = r["loss_mask"][:max_len]
    return ids, mask


def batch_indices(step: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Global row indices of step `step`: consecutive slices of a per-epoch permutation (seeded by the epoch)."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        perm = np.random.default_rng(seed * 100003 + epoch).permutation(n)
        take = min(batch - len(out), n - pos)
        out.extend(perm[pos : pos + take].tolist())
    return np.asarray(out, np.int64)


def head_targets(ids: np.ndarray, mask: np.ndarray, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position t: targets `[..., L, K]` = ids[t+k+2] and weights (1 where that token is an answer token)."""
    n, length = ids.shape
    tgt = np.zeros((n, length, num_heads), np.int32)
    w = np.zeros((n, length, num_heads), np.float32)
    for k in range(num_heads):
        s = k + 2
        if s < length:
            tgt[:, : length - s, k] = ids[:, s:]
            w[:, : length - s, k] = mask[:, s:]
    return tgt, w
