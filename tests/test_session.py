"""Streaming and multi-turn chat: chunked decoding equals one-shot generation; the KV cache is reused between turns."""

import pytest
from test_medusa import random_prompts, tiny_model

from medusa_jax.api import MedusaModel
from medusa_jax.session import Session

TREE = [[0], [1], [0, 0], [0, 1], [1, 0]]


def collect(session, ids, n):
    chunks = list(session.stream_ids(ids, n))
    return [t for c in chunks for t in c], chunks


@pytest.mark.parametrize("mode,lookup", [("ar", None), ("medusa", None), ("medusa", 6)])
def test_stream_equals_generate_and_reuses_the_cache(mode, lookup):
    m = tiny_model(vocab=16, heads=2, seed=1)
    s = Session(m, mode=mode, tree=TREE, topk=4, chunk_steps=3, lookup=lookup)
    assert s.tree.lookup == (lookup or 0)
    p1, p2 = random_prompts(2, 16, seed=9)
    out1, chunks = collect(s, p1, 20)
    assert out1 == m.generate([p1], max_new_tokens=20, mode="ar")[0].output_ids
    assert len(chunks) > 1  # streamed in pieces
    assert s.ids == p1 + out1
    # the next turn appends to what is cached: only the new tokens are prefilled
    follow = p1 + out1 + p2
    out2, _ = collect(s, follow, 20)
    assert s.last_prefill == len(p2)
    assert out2 == m.generate([follow], max_new_tokens=20, mode="ar")[0].output_ids
    # a history that diverges rolls the cache back to the common prefix
    other = p1[:3] + p2
    out3, _ = collect(s, other, 12)
    assert s.last_prefill == len(p2)
    assert out3 == m.generate([other], max_new_tokens=12, mode="ar")[0].output_ids


def test_cache_grows_and_context_limit():
    m = tiny_model(vocab=16, heads=2, seed=1)
    m.max_cache = 400
    s = Session(m, tree=TREE, topk=4)
    ids = random_prompts(1, 16, seed=4)[0]
    out, _ = collect(s, ids, 100)
    first_slots = s.cache.slots
    long = ids + out + list(range(16)) * 8
    out2, _ = collect(s, long, 100)
    assert s.cache.slots > first_slots
    assert out2 == m.generate([long], max_new_tokens=100, mode="ar")[0].output_ids
    with pytest.raises(ValueError, match="reset"):
        list(s.stream_ids(s.ids + [1] * 100, 200))
    s.reset()
    assert list(s.stream_ids(ids, 4))


def test_chat_turns_reuse_the_cache(smollm2):
    s = Session(smollm2, chunk_steps=8)
    first = "".join(s.chat("Name a color.", max_new_tokens=12))
    assert first.strip() and len(s.messages) == 2
    n_cached = len(s.ids)
    second = "".join(s.chat("And a fruit?", max_new_tokens=12))
    assert second.strip()
    assert s.last_prefill < 20 < n_cached  # only the new turn was prefilled, not the history
    # the reply equals a fresh one-shot generation over the whole templated conversation
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template(s.messages[:3], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    fresh = smollm2.generate([ids], max_new_tokens=12)[0]
    assert tok.decode(fresh.output_ids, skip_special_tokens=True) == second
    s.reset()
    assert s.messages == [] and s.ids == []


def test_chat_needs_a_template():
    m = tiny_model(vocab=16, heads=2)
    with pytest.raises(ValueError, match="chat template"):
        next(Session(m, tree=TREE, topk=4).chat("hi"))
    plain = MedusaModel(m.cfg, m.params)
    with pytest.raises(ValueError, match="needs Medusa heads"):
        Session(plain, mode="medusa")
