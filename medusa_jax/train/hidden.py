"""Medusa-1 on a frozen backbone: its hidden states at the answer positions, computed once and cached on disk in
blocks keyed by the block's token ids, loss masks and the backbone, and the flat token arrays that go with them."""

from __future__ import annotations

import functools
import hashlib
import os

import jax
import numpy as np

from medusa_jax import sharding as sh
from medusa_jax.train import data as data_lib
from medusa_jax.train.losses import forward_hidden

HIDDEN_BLOCK_ROWS = 2048


def flat_chunks(ids: np.ndarray, mask: np.ndarray, rows_per_batch: int = 16):
    """The forward batches of `precompute_flat`, in order: (row indices, padded length); rows sorted by length."""
    lengths = np.maximum((ids != 0).cumsum(1).argmax(1) + 1, (mask > 0).cumsum(1).argmax(1) + 1)
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), rows_per_batch):
        idx = order[i : i + rows_per_batch]
        yield idx, min(int(-(-int(lengths[idx].max()) // 32) * 32), ids.shape[1])


def flat_tokens(ids: np.ndarray, mask: np.ndarray, k_heads: int, rows_per_batch: int = 16):
    """The token side of `precompute_flat` (no backbone), for the positions with at least one answer target, in its
    order: targets `[M, K]`, weights `[M, K]`, root tokens `[M]` (token t+1, what root_token heads see) and
    `teach` `[M, K]` bool: position t+k+1 (where the base model predicts head k's target) is flat index i+k+1.
    Each row's positions are contiguous, so that holds for every target but a row's last token (its predictor,
    two before the end, has no target of its own)."""
    tgt, w = data_lib.head_targets(ids, mask, k_heads)
    nxt = np.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    tg, ws, rt, te = [], [], [], []
    for idx, length in flat_chunks(ids, mask, rows_per_batch):
        wc = w[idx, :length]
        sel = wc.sum(-1) > 0
        teach = np.zeros(wc.shape, bool)
        for k in range(k_heads):
            teach[:, : length - k - 1, k] = sel[:, k + 1 :]
        tg.append(tgt[idx, :length][sel])
        ws.append(wc[sel])
        rt.append(nxt[idx, :length][sel])
        te.append((teach & (wc > 0))[sel])
    return np.concatenate(tg), np.concatenate(ws), np.concatenate(rt), np.concatenate(te)


def teacher_index(idx: np.ndarray, k_heads: int, n: int) -> np.ndarray:
    """Flat indices `[B]` -> `[B, K]` of the positions whose base distribution is head k's soft label (i+k+1; valid
    where `flat_tokens`' `teach` says so)."""
    return np.minimum(idx[:, None] + np.arange(1, k_heads + 1), n - 1)


def precompute_flat(mc, backbone, ids, mask, k_heads, mesh, rows_per_batch=16):
    """Frozen backbone over all rows -> flat arrays of the positions with at least one answer target:
    hidden `[M, E]` (float32), then targets, weights, root tokens and teacher positions (see `flat_tokens`)."""
    fwd = jax.jit(functools.partial(forward_hidden, mc), out_shardings=sh.replicated(mesh))
    params = jax.device_put(backbone, sh.param_shardings(backbone, mesh))
    _, w = data_lib.head_targets(ids, mask, k_heads)
    hid = []
    from tqdm import tqdm

    bar = tqdm(total=len(ids), desc="hidden states", unit="row", disable=jax.process_index() != 0)
    n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
    for idx, length in flat_chunks(ids, mask, rows_per_batch):
        rows = -(-len(idx) // n_dev) * n_dev
        x = np.zeros((rows, length), np.int32)
        x[: len(idx)] = ids[idx, :length]
        xg = sh.shard_global(x, sh.batch_sharding(mesh, 2))
        h = np.asarray(fwd(params, xg).addressable_data(0), np.float32)[: len(idx)]
        hid.append(h[w[idx, :length].sum(-1) > 0])
        bar.update(len(idx))
    bar.close()
    return (np.concatenate(hid), *flat_tokens(ids, mask, k_heads, rows_per_batch))


def cached_hidden(cache_dir, mc, backbone, k_heads, mesh, max_len, name, parts, block_rows=None):
    """`precompute_flat` over the rows of each data part, in blocks of at most `block_rows` rows, each block cached
    as `cache_dir/NAME-<key>.npz`, the key covering the block's token ids and loss masks, the head count (it decides
    which prompt-end positions get hidden states) and the backbone: adding a data directory computes only its rows,
    and a killed precompute resumes at the first missing block. Only the hidden states are cached; the tokens come
    from the data. Returns the concatenated (hidden, targets, weights, roots, teach) of `precompute_flat`."""
    block_rows = block_rows or HIDDEN_BLOCK_ROWS
    model_key = backbone_fingerprint(mc, backbone)
    out = []
    for rows in parts:
        ids, mask = data_lib.pack(rows, max_len)
        for i in range(0, len(ids), block_rows):
            bi, bm = ids[i : i + block_rows], mask[i : i + block_rows]
            key = f"{model_key}:{k_heads}:{data_fingerprint(bi, bm)}"
            path = os.path.join(cache_dir, f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
            hidden = _cached(path, lambda bi=bi, bm=bm: precompute_flat(mc, backbone, bi, bm, k_heads, mesh)[0], key)
            out.append((hidden, *flat_tokens(bi, bm, k_heads)))
    return tuple(np.concatenate([o[j] for o in out]) for j in range(5))


def data_fingerprint(ids: np.ndarray, mask: np.ndarray) -> str:
    """A digest of a block's token ids and loss masks (shape, dtype-independent values)."""
    h = hashlib.sha1(repr(ids.shape).encode())
    h.update(np.ascontiguousarray(ids, np.int32).tobytes())
    h.update(np.ascontiguousarray(mask, np.int8).tobytes())
    return h.hexdigest()


def backbone_fingerprint(mc, params, samples: int = 4096) -> str:
    """A digest of the model config and parameters: every leaf's path, shape and dtype, its sum and up to `samples`
    evenly strided values (cheap for a 7B model, and any other checkpoint differs in them)."""
    h = hashlib.sha1(repr(mc).encode())
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat = x.reshape(-1)
        picked = np.asarray(jax.device_get(flat[:: max(1, flat.size // samples)]), np.float32)
        h.update(f"{jax.tree_util.keystr(path)}{x.shape}{x.dtype}{float(np.asarray(flat.sum(), np.float64))}".encode())
        h.update(picked.tobytes())
    return h.hexdigest()


def _cached(path: str, compute, key: str):
    """Precomputed hidden states `[M, E]` cached at `path`, valid while its stored key matches."""
    if os.path.exists(path):
        z = np.load(path)
        if str(z["key"]) == key:
            return z["hidden"]
    out = compute()
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, hidden=out, key=key)
        os.replace(tmp, path)
    return out


def precompute_features(mc, backbone, ids, mask, mesh, out, rows_per_batch=16):
    """Frozen backbone over every row -> its features at every position, written into `out` `[N, L, E]` (float16;
    zeros past each row's padded chunk). A feature drafter attends over whole sequences, so it needs them all."""
    fwd = jax.jit(functools.partial(forward_hidden, mc), out_shardings=sh.replicated(mesh))
    params = jax.device_put(backbone, sh.param_shardings(backbone, mesh))
    n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
    for idx, length in flat_chunks(ids, mask, rows_per_batch):
        rows = -(-len(idx) // n_dev) * n_dev
        x = np.zeros((rows, length), np.int32)
        x[: len(idx)] = ids[idx, :length]
        h = fwd(params, sh.shard_global(x, sh.batch_sharding(mesh, 2))).addressable_data(0)
        out[idx, :length] = np.asarray(h, np.float32)[: len(idx)].astype(out.dtype)


def cached_features(cache_dir, mc, backbone, mesh, ids, mask, name, block_rows=None) -> list:
    """`precompute_features` of `ids`, `mask` `[N, L]` in blocks of `block_rows` rows, each cached as
    `cache_dir/NAME-feat-<key>.npy` (keyed by the block's tokens, masks and the backbone; written under a temporary
    name, then renamed) and read back memory-mapped: -> the blocks' arrays `[n_i, L, E]` (float16), in order."""
    block_rows = block_rows or HIDDEN_BLOCK_ROWS
    model_key = backbone_fingerprint(mc, backbone)
    out = []
    for i in range(0, len(ids), block_rows):
        bi, bm = ids[i : i + block_rows], mask[i : i + block_rows]
        key = f"{model_key}:features:{data_fingerprint(bi, bm)}"
        path = os.path.join(cache_dir, f"{name}-feat-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")
        if not os.path.exists(path):
            os.makedirs(cache_dir, exist_ok=True)
            tmp = path + ".tmp.npy"
            arr = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(bi), bi.shape[1], mc.hidden_size))
            arr[:] = 0
            precompute_features(mc, backbone, bi, bm, mesh, arr)
            arr.flush()
            del arr
            os.replace(tmp, path)
        out.append(np.load(path, mmap_mode="r"))
    return out
