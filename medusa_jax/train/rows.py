"""Random access to distilled rows, so that each host reads only the rows of its own share of each batch.

Each shard `shard_NNNNN.jsonl` gets an index `shard_NNNNN.jsonl.index.npy` `[R, 3]` int64: per row its byte
offset, byte length and first answer position (the row length when it has no answer). `distill` writes it beside
each shard; a missing or stale one (older than its shard) is rebuilt from the shard."""

from __future__ import annotations

import json
import os

import numpy as np

INDEX_SUFFIX = ".index.npy"


def _bad_row(path: str, line: int) -> ValueError:
    return ValueError(
        f"{path}:{line}: not a distilled row (input_ids and loss_mask of equal length): delete the shard and rerun "
        "distill, which regenerates missing shards"
    )


def build_index(path: str) -> np.ndarray:
    """Scan a shard -> its index `[R, 3]` (offset, length, first answer position), written atomically beside it."""
    out, offset = [], 0
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    ok = len(row["input_ids"]) == len(row["loss_mask"])
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    raise _bad_row(path, i)
                first = next((j for j, m in enumerate(row["loss_mask"]) if m), len(row["loss_mask"]))
                out.append((offset, len(line), first))
            offset += len(line)
    index = np.asarray(out, np.int64).reshape(-1, 3)
    tmp = f"{path}{INDEX_SUFFIX}.tmp{os.getpid()}.npy"
    np.save(tmp, index)
    os.replace(tmp, path + INDEX_SUFFIX)
    return index


def shard_index(path: str) -> np.ndarray:
    """The shard's index, rebuilt when missing, unreadable or older than the shard."""
    ipath = path + INDEX_SUFFIX
    try:
        if os.path.getmtime(ipath) >= os.path.getmtime(path):
            index = np.load(ipath)
            if (
                index.ndim == 2
                and index.shape[1] == 3
                and (not len(index) or index[-1, :2].sum() <= os.path.getsize(path))
            ):
                return index
    except (OSError, ValueError):
        pass
    return build_index(path)


def shard_files(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        raise ValueError(f"data dir {data_dir} does not exist: make it with python -m medusa_jax.train.distill")
    names = sorted(n for n in os.listdir(data_dir) if n.startswith("shard_") and n.endswith(".jsonl"))
    return [os.path.join(data_dir, n) for n in names]


class RowSource:
    """The training rows of comma-separated data dirs (the first `num_rows` of their concatenation, rows without an
    answer token within `max_len` skipped), read one by one on demand. `read` counts the rows read so far."""

    def __init__(self, path: str, max_len: int, num_rows: int = 0, log=print):
        files, entries = [], []
        for part in (p.strip() for p in path.split(",") if p.strip()):
            for fp in shard_files(part):
                index = shard_index(fp)
                entries.append(np.column_stack([np.full(len(index), len(files)), index]))
                files.append(fp)
        table = np.concatenate(entries) if entries else np.zeros((0, 4), np.int64)
        if num_rows:
            table = table[:num_rows]
        if not len(table):
            raise ValueError(f"no rows in {path}")
        keep = table[:, 3] < max_len
        if not keep.any():
            raise ValueError(f"{path}: all {len(table)} rows have empty answers (no loss_mask=1 within data.max_len)")
        if not keep.all():
            log(f"{path}: skipped {int((~keep).sum())} of {len(table)} rows with empty answers")
        self.files, self.table, self.read = files, table[keep], 0

    def __len__(self) -> int:
        return len(self.table)

    def rows(self, idx) -> list[dict]:
        out = []
        for i in np.asarray(idx).reshape(-1):
            fid, offset, length, _ = self.table[i]
            with open(self.files[fid], "rb") as f:
                f.seek(offset)
                out.append(json.loads(f.read(length)))
        self.read += len(out)
        return out
