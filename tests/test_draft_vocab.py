"""A heads directory's `draft_vocab.json` is checked: ids that are not distinct integers inside the model's vocabulary
give one line naming the file and what to do, at load time (they would be clamped by the gather, or read NaN rows)."""

import json

import jax
import numpy as np
import pytest
from test_medusa import tiny_model

import medusa_jax
from medusa_jax import checkpoint, shard_load
from medusa_jax.draft_vocab import FILE, read
from medusa_jax.heads_io import save_heads

BAD = {
    "past the vocabulary": ([1, 2, 16], "outside the model's vocabulary (0..15)"),
    "negative": ([3, -1], "outside"),
    "duplicated": ([4, 5, 4], "token id 4 appears more than once"),
    "a float": ([1, 2.0], "not an integer"),
    "a string": (["7"], "not an integer"),
    "a boolean": ([True], "not an integer"),
    "empty": ([], "non-empty list"),
    "not a list": ({"0": 1}, "non-empty list"),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=16, heads=2)


def heads_dir(tmp_path, model, ids):
    d = tmp_path / "heads"
    save_heads(jax.tree.map(np.asarray, model.heads), str(d))
    (d / FILE).write_text(json.dumps({"ids": ids, "size": 3}))
    return d


def load_with_heads(model, heads, monkeypatch):
    """`medusa_jax.load` of the tiny model (its backbone read from memory) with the heads directory `heads`."""
    monkeypatch.setattr(checkpoint, "resolve", lambda ckpt, *a, **k: str(ckpt))
    monkeypatch.setattr(shard_load, "read_backbone_sharded", lambda path, *a, **k: (model.cfg, model.params))
    return medusa_jax.load("tiny", heads=str(heads), tokenizer=False)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_ids_are_refused_in_one_line(case, tmp_path, model, monkeypatch):
    ids, needle = BAD[case]
    d = heads_dir(tmp_path, model, ids)
    with pytest.raises(ValueError) as e:
        load_with_heads(model, d, monkeypatch)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(d / FILE)) and needle in msg and "rebuild it" in msg, msg


def test_good_ids_load(tmp_path, model, monkeypatch):
    d = heads_dir(tmp_path, model, [5, 0, 15])
    loaded = load_with_heads(model, d, monkeypatch)
    assert np.asarray(loaded.heads["draft"]["ids"]).tolist() == [5, 0, 15]
    assert read(str(d), 2, vocab_size=16).tolist() == [5, 0]
    with pytest.raises(ValueError, match="size >= 1"):
        read(str(d), 0, vocab_size=16)
