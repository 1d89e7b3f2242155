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


# ---------------------------------------------------------------------------------------------- failures
def fail_on_call(monkeypatch, name: str, n: int, exc: type, donate: bool):
    """Patch `session.<name>` (start_medusa or continue_medusa) so that its n-th call fails: after consuming its
    input (running, then deleting the donated cache/state, as a device error after donation would) or before
    running (as Ctrl-C during the first compile would)."""
    import jax

    import medusa_jax.session as session_mod

    real, calls = getattr(session_mod, name), []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) != n:
            return real(*args, **kw)
        if donate:
            real(*args, **kw)
            for leaf in jax.tree.leaves(args[4]):  # the donated cache (start) or state (continue)
                leaf.delete()
        raise exc("injected fault")

    monkeypatch.setattr(session_mod, name, flaky)


@pytest.mark.parametrize(
    "name,n,exc,donate,expect",
    [
        ("continue_medusa", 2, RuntimeError, True, "reset"),
        ("continue_medusa", 2, KeyboardInterrupt, False, "intact"),
        ("start_medusa", 1, RuntimeError, True, "reset"),
    ],
    ids=["chunk-fails-after-donation", "interrupt-before-chunk", "prefill-fails-after-donation"],
)
def test_a_failed_generation_leaves_the_session_intact_or_reset(monkeypatch, name, n, exc, donate, expect):
    m = tiny_model(vocab=16, heads=2, seed=1)
    s = Session(m, tree=TREE, topk=4, chunk_steps=3)
    p1, p2 = random_prompts(2, 16, seed=9)
    out1, _ = collect(s, p1, 20)
    turn2, got = p1 + out1 + p2, []
    fail_on_call(monkeypatch, name, n, exc, donate)
    with pytest.raises(exc) as err:
        for chunk in s.stream_ids(turn2, 20):
            got += chunk
    monkeypatch.undo()
    after_ids, recovery = list(s.ids), getattr(s, "recovery", None)
    # the next turn is right: equal to a fresh generation over the whole conversation
    turn3 = turn2 + got + p1[:4]
    out3, _ = collect(s, turn3, 20)
    assert out3 == m.generate([turn3], max_new_tokens=20, mode="ar")[0].output_ids
    # and the session said what it kept
    assert recovery == expect and expect in " ".join(err.value.__notes__)
    if expect == "intact":
        assert got and after_ids == turn2 + got and s.last_reused == len(turn2 + got)
    else:
        assert after_ids == [] and s.last_reused == 0
    assert s.recovery is None  # the later turn did not fail


def test_closing_the_stream_early_keeps_what_was_yielded():
    m = tiny_model(vocab=16, heads=2, seed=1)
    s = Session(m, tree=TREE, topk=4, chunk_steps=3)
    p1, p2 = random_prompts(2, 16, seed=9)
    stream = s.stream_ids(p1, 20)
    first = next(stream)
    stream.close()
    assert s.ids == p1 + first and s.last_new == len(first)
    follow = p1 + first + p2
    out, _ = collect(s, follow, 20)
    assert s.last_reused == len(p1 + first)  # the cache held the closed turn, chunk included
    assert out == m.generate([follow], max_new_tokens=20, mode="ar")[0].output_ids


def test_session_fits_what_generate_fits():
    """The session refuses a conversation exactly when `check_fits` refuses the same prompt in `generate`."""
    m = tiny_model(vocab=16, heads=2, seed=1)
    m.max_cache = 60
    s = Session(m, tree=TREE, topk=4, chunk_steps=3)
    extra = s.tree.num_nodes + 1
    ids = (random_prompts(1, 16, seed=4)[0] * 40)[: m.max_cache - 20 - extra]  # fits exactly
    m.check_fits(len(ids), 20, extra)
    out, _ = collect(s, ids, 20)
    assert out == m.generate([ids], max_new_tokens=20, mode="ar")[0].output_ids
    with pytest.raises(ValueError, match="cache positions"):
        m.check_fits(len(ids) + 1, 20, extra)
    with pytest.raises(ValueError, match="reset"):
        list(s.stream_ids(ids + [1], 20))
    assert s.ids == ids + out  # the refused call changed nothing


class ToyTokenizer:
    """A chat template over a 16-token vocabulary (messages framed by tokens 0 and 1)."""

    chat_template = "toy"
    eos_token_id = None

    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=True):
        ids = [t for msg in msgs for t in [1, *(ord(c) % 14 + 2 for c in msg["content"]), 0]]
        return ids + [1] * add_generation_prompt

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t) for t in ids)


def test_chat_cli_reports_a_failed_turn_in_one_line(monkeypatch, capsys):
    import io

    import decode

    m = tiny_model(vocab=16, heads=2, seed=1)
    m.tokenizer = ToyTokenizer()
    args = decode.build_parser().parse_args(["--chat", "--max-new-tokens", "20"])
    monkeypatch.setattr(decode, "medusa_kwargs", lambda a: dict(tree=TREE, topk=4, chunk_steps=3))
    fail_on_call(monkeypatch, "continue_medusa", 2, RuntimeError, True)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhello again\nexit\n"))
    decode.chat(m, "medusa", args)
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if "(error: " in line]
    assert len(errors) == 1 and "injected fault" in errors[0] and "reset" in errors[0], out
    assert "Traceback" not in out
    # the turn after the failure answers as a fresh session would
    fresh = Session(m, tree=TREE, topk=4, chunk_steps=3)
    monkeypatch.undo()
    expected = "".join(fresh.chat("hello again", 20))
    assert f"assistant> {expected}\n(" in out, out
