"""Reading the reduced draft vocabulary saved beside Medusa heads (`draft_vocab.json`, FR-Spec style).

The file holds `{"ids": [...most frequent first], "size": Vd, "coverage": ...}`: the tokens the model itself emits
most. `medusa_jax.load(..., heads=DIR)` projects the heads onto them (`draft_vocab=False` turns it off). It is
built from training data by `python -m medusa_jax.train.draft_vocab`.
"""

from __future__ import annotations

import json
import numbers
import os

import numpy as np

DRAFT_VOCAB_FILE = "draft_vocab.json"  # beside the heads: a reduced vocabulary for their projections
FIX = "rebuild it with python -m medusa_jax.train.draft_vocab, or delete it (or load with draft_vocab=False)"

__all__ = ["DRAFT_VOCAB_FILE", "FILE", "check_draft_ids", "check_ids", "read", "read_draft_vocab"]


def read_draft_vocab(heads_dir: str, size: int | None = None, vocab_size: int | None = None) -> np.ndarray | None:
    """The draft vocabulary saved beside heads (its first `size` ids), or None when there is none. Its ids must be
    distinct integers in [0, vocab_size) (the model's vocabulary): anything else is a ValueError naming the file."""
    path = os.path.join(heads_dir, DRAFT_VOCAB_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            ids = json.load(f)["ids"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable draft vocabulary ({e}); {FIX}") from None
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
        raise ValueError(f"draft_vocab must be True, False or a size >= 1, got {size!r}")
    check_draft_ids(ids, vocab_size, path, FIX)
    return np.asarray(ids[: int(size)] if size else ids, np.int32)


def check_draft_ids(ids, vocab_size: int | None, path: str, fix: str) -> None:
    """Raises ValueError unless `ids` is a non-empty list of distinct integers in [0, vocab_size)."""
    if not isinstance(ids, list) or not ids:
        raise ValueError(f'{path}: "ids" must be a non-empty list of token ids; {fix}')
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f'{path}: "ids"[{i}] is {t!r}, not an integer token id; {fix}')
        if not 0 <= t < (vocab_size or 2**31):
            bound = f"the model's vocabulary (0..{vocab_size - 1})" if vocab_size else "[0, 2**31)"
            raise ValueError(f'{path}: "ids"[{i}] = {t} is outside {bound} (made for another model?); {fix}')
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        dup = next(t for t in ids if t in seen or seen.add(t))
        raise ValueError(f'{path}: token id {dup} appears more than once in "ids"; {fix}')


# short names, as `draft_vocab.read(...)`
FILE = DRAFT_VOCAB_FILE
read = read_draft_vocab
check_ids = check_draft_ids
