"""Seeds: calls with different seeds share no random stream, whatever the batch size; a seed reproduces its output."""

import itertools

import jax
import pytest
from test_medusa import tiny_model

from medusa_jax.session import Session

PROMPT = [3, 1, 4, 1, 5]
NEW = 16  # tokens per row


@pytest.fixture(scope="module")
def model():
    """A flat next-token distribution at T = 1 (tiny_model's sharpening undone): two independent tokens agree with
    probability sum(p^2) < 0.07 (measured over 64 random contexts), so two independent rows agree on all 16 tokens
    with probability < 1e-18: any shared row is a shared random stream."""
    m = tiny_model(vocab=16, heads=2, seed=5)
    m.params = jax.tree.map(lambda a: a / 8 if a.ndim >= 2 else a, m.params)
    return m


def rows(model, seed, batch, mode):
    res = model.generate([PROMPT] * (2 * batch), max_new_tokens=NEW, temperature=1.0, seed=seed, batch_size=batch,
                         mode=mode, tree=[[0], [1], [0, 0]], topk=2)  # fmt: skip
    return [tuple(r.output_ids) for r in res]


@pytest.mark.parametrize("batch,mode", [(1, "ar"), (2, "medusa"), (8, "ar")])
def test_calls_with_nearby_seeds_share_no_row(model, batch, mode):
    """Two batches per call, seeds 0, 1 and `batch` (the seed whose first batch would be seed 0's second batch if
    batches were seeded by seed + offset): all rows differ from one another; the same seed reproduces its rows."""
    seeds = sorted({0, 1, batch})
    out = {s: rows(model, s, batch, mode) for s in seeds}
    every = [(s, i, r) for s in seeds for i, r in enumerate(out[s])]
    shared = [(a[:2], b[:2]) for a, b in itertools.combinations(every, 2) if a[2] == b[2]]
    assert not shared, f"(seed, row) pairs with the same sample: {shared}"
    assert rows(model, 0, batch, mode) == out[0]


def test_session_generations_have_their_own_streams(model):
    """A Session's n-th generation samples from its own stream: seeds differ, turns differ, a seed reproduces."""

    def turns(seed):
        s = Session(model, mode="ar", temperature=1.0, seed=seed)
        return [tuple(t for c in s.stream_ids(PROMPT, NEW) for t in c) for _ in range(3)]

    a, b = turns(0), turns(1)
    assert len(set(a + b)) == 6
    assert turns(0) == a
