"""Streaming generation and multi-turn chat, batch 1, with the KV cache kept on device between turns.

The decode loop runs in chunks of `chunk_steps` steps (`medusa_decode.continue_medusa`); after each chunk the host
reads the tokens accepted so far and yields the new text, so nothing inside a chunk goes through the host. Without
heads (or with `mode="ar"`) the same loop runs with a root-only tree, which is plain autoregressive decoding.

A conversation keeps `ids`, the tokens whose K/V sit in the cache. A new turn renders the whole conversation through
the chat template, reuses the longest common prefix with `ids` (normally everything: only the new user turn and the
assistant header are prefilled) and rolls the cache back to that prefix when the template re-tokenizes differently.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.drafters import stateful_drafter
from medusa_jax.generation import bucket
from medusa_jax.medusa_decode import (
    MedusaLoop,
    MedusaState,
    Thresholds,
    continue_medusa,
    settled_cache,
    start_medusa,
)
from medusa_jax.model import KVCache
from medusa_jax.options import GenerateOptions, batch_key
from medusa_jax.plan import plan_decoding
from medusa_jax.sampling import SamplingParams
from medusa_jax.sharding import to_host


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def alive(tree) -> bool:
    """Whether every array of `tree` still holds data (not donated or deleted, no failed computation behind it)."""
    try:
        leaves = jax.tree.leaves(tree)
        if any(x.is_deleted() for x in leaves):
            return False
        jax.block_until_ready(leaves)
        return True
    except Exception:
        return False


class Session:
    """Batch-1 streaming generation over one growing KV cache.

    mode: "medusa" (default when the model has heads) or "ar". acceptance: greedy (temperature 0), else
    "rejection" (default, keeps the base model's distribution) or "typical". lookup: the lookup chain's length
    (default: `model.default_lookup(1)` when no tree is named, else none); the chain drafts from the whole conversation.
    seed: the n-th generation of the session samples from `fold_in(PRNGKey(seed), n)`: the same seed and the same
    calls give the same output.

    After a failed generation (an error or an interrupt inside the decode loop) `recovery` says what was kept:
    "intact" (`ids` and the cache hold the input and the tokens yielded before the failure) or "reset" (the failure
    took the donated cache with it: nothing is cached, the next call prefills its whole input; `messages` are kept).
    The exception carries the same as a note. None after a generation that did not fail."""

    def __init__(
        self,
        model,
        mode: str | None = None,
        tree=None,
        acceptance: str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        posterior_threshold: float = 0.09,
        posterior_alpha: float = 0.3,
        topk: int = 10,
        chunk_steps: int = 4,
        lookup: int | None = None,
    ):
        opts = GenerateOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, acceptance=acceptance,
                               lookup=lookup, topk=topk, posterior_threshold=posterior_threshold,
                               posterior_alpha=posterior_alpha)  # fmt: skip
        greedy = opts.greedy
        self.model = model
        self.plan = plan_decoding(model, 1, mode=mode, tree=tree, lookup=lookup, acceptance=acceptance, greedy=greedy,
                                  topk=topk)  # fmt: skip
        self.heads = model.heads if self.plan.mode == "medusa" else None
        self.tree = self.plan.tree
        self.acceptance = self.plan.acceptance
        self.sp = SamplingParams.make(temperature if not greedy else 1.0, top_k, top_p)
        self.th = Thresholds(jnp.float32(posterior_threshold), jnp.float32(posterior_alpha))
        self.chunk_steps = max(1, int(chunk_steps))
        self.seed = seed
        self.generations = 0  # generations started: the next one's key is batch_key(seed, generations)
        self.recovery: str | None = None  # after a failed generation: "intact" or "reset" (see the class doc)
        self.cache: KVCache | None = None
        self.ids: list[int] = []  # tokens whose K/V are in the cache
        self.draft = None  # a feature drafter's state after `ids` (its own cache; None: rebuilt from the input)
        self.last_steps = 0  # decoding steps of the latest generation
        self.last_prefill = 0  # tokens prefilled by the latest generation
        self.last_reused = 0  # tokens of its input whose K/V came from the cache
        self.last_new = 0  # tokens it generated
        self.messages: list[dict] = []

    # ----------------------------------------------------------------------------------------------- low level
    def reset(self) -> None:
        """Forget the conversation (the cache buffer is kept for reuse)."""
        self.ids = []
        self.draft = None
        self.messages = []
        self.recovery = None

    def _ensure_slots(self, need: int, padded: int) -> None:
        """need: the cache positions the generation can use, checked against the model's context as `check_fits`
        checks `generate`'s; padded: the buffer slots it touches (the prefill and the tree are padded)."""
        if need > self.model.max_cache:
            raise ValueError(
                f"the conversation needs {need} cache positions, more than the model's {self.model.max_cache}: "
                "reset it (or lower max_new_tokens)"
            )
        if self.cache is not None and self.cache.slots >= padded:
            return
        slots = bucket(padded, 256)
        if slots > self.model.max_cache:  # near the context limit: only the padding may outgrow it
            slots = max(self.model.max_cache, -(-padded // 64) * 64)
        fresh = KVCache.zeros(self.model.cfg, 1, slots, mesh=self.model.mesh)
        if self.cache is not None and self.ids:  # keep what is cached: copy it into the bigger buffer
            old = self.cache.slots
            fresh = KVCache(fresh.k.at[:, :, :old].set(self.cache.k), fresh.v.at[:, :, :old].set(self.cache.v))
        self.cache = fresh

    def _recover(self, err: BaseException, candidates) -> None:
        """After a failure: keep the first (ids, cache or loop state) of `candidates` whose buffers survived, else
        reset."""
        for ids, held in candidates:
            if held is None or not alive(held):
                continue
            try:
                cache = settled_cache(held) if isinstance(held, MedusaState) else held
            except Exception:  # a buffer lost on the device: try the next candidate
                continue
            self.ids, self.cache, self.recovery = ids, cache, "intact"
            err.add_note(f"the session is intact: its cache holds {len(ids)} tokens")
            return
        self.ids, self.cache, self.recovery = [], None, "reset"
        err.add_note("the session's KV cache was lost and reset: the next call prefills its whole input")

    def stream_ids(self, ids: list[int], max_new_tokens: int = 128) -> Iterator[list[int]]:
        """Continue from `ids` (the full token sequence so far: its cached prefix is reused, the rest prefilled) and
        yield the new tokens chunk by chunk. On return, and when the consumer closes the generator early,
        `self.ids` = ids + the tokens yielded. On a failure see `recovery` (class doc)."""
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        GenerateOptions(max_new_tokens=max_new_tokens)  # raises OptionError (a ValueError)
        extra = self.tree.num_nodes + 1 if self.heads is not None else 0  # as `generate` (root only: no tree)
        keep = min(common_prefix(self.ids, ids), len(ids) - 1)  # at least one token to prefill
        stateful = self.heads is not None and stateful_drafter(self.heads, self.tree) is not None
        draft = self.draft if stateful and keep == len(self.ids) else None
        if stateful and draft is None:  # a stateful drafter continues only where its last turn ended: else from 0
            keep = 0
        new = ids[keep:]
        t = bucket(len(new), 16)
        out_len = bucket(max_new_tokens, 16)
        self._ensure_slots(len(ids) + max_new_tokens + extra, keep + t + out_len + self.tree.num_nodes + 1)
        self.last_prefill, self.last_reused, self.last_new, self.last_steps = len(new), keep, 0, 0
        self.recovery = None
        loop = MedusaLoop(self.tree, out_len, self.cache.slots, self.acceptance, self.model.eos_ids, self.model.mesh)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, : len(new)] = new
        history = None
        if self.tree.lookup:  # the lookup chain drafts from the whole conversation
            history = np.full((1, self.cache.slots), -1, np.int32)
            history[0, :keep] = ids[:keep]
        key = batch_key(self.seed, self.generations)
        self.generations += 1
        cfg, params, heads = self.model.cfg, self.model.params, self.heads
        max_new = jnp.int32(max_new_tokens)
        old_ids, cache = self.ids, self.cache
        self.ids, self.cache, self.draft = list(ids[:keep]), None, None  # the cache is donated into the state
        if draft is not None and draft.k.shape[2] != loop.slots:  # the cache grew: the drafter's too
            grow = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, loop.slots - x.shape[2]), (0, 0)))  # noqa: E731
            draft = draft.replace(k=grow(draft.k), v=grow(draft.v))
        try:
            start, toks, lengths = self.model.host_inputs(np.int32([keep]), tokens, np.int32([len(new)]))
            hist = None if history is None else self.model.host_inputs(history)[0]
            state = start_medusa(cfg, loop, params, heads, cache, start, toks, lengths, max_new, key, hist, draft)
        except BaseException as e:
            self._recover(e, [(old_ids, cache)])
            raise
        got: list[int] = []  # the tokens yielded so far; `state` holds exactly their K/V after the input's
        nxt = None
        try:
            while True:
                nxt = continue_medusa(
                    cfg, loop, params, heads, state, max_new, self.sp, self.th, jnp.int32(self.chunk_steps)
                )
                n, done, steps, out = (to_host(x)[0] for x in (nxt.num_out, nxt.done, nxt.steps, nxt.out))
                chunk = [int(x) for x in out[len(got) : int(n)]]
                state, nxt = nxt, None
                got += chunk
                self.ids, self.last_new, self.last_steps = list(ids) + got, len(got), int(steps)
                if chunk:
                    yield chunk
                if done:
                    break
        except GeneratorExit:  # closed early by the consumer: what it was given is in `ids`
            self.cache, self.draft = settled_cache(state, donate=True), state.draft
            raise
        except BaseException as e:
            # a later state holds K/V for `got` (and maybe more, past the tokens in `ids`: harmless, never attended)
            self._recover(e, [(list(ids) + got, nxt), (list(ids) + got, state)])
            raise
        self.cache, self.draft = settled_cache(state, donate=True), state.draft

    # ----------------------------------------------------------------------------------------------- chat
    def chat(self, user_text: str, max_new_tokens: int = 256, system: str | None = None) -> Iterator[str]:
        """One chat turn: yields the reply's text as it is generated; the turn is added to `self.messages`."""
        tok = self.model.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: chat needs an instruct/chat model")
        if not user_text.strip():
            raise ValueError("empty message")
        msgs = self.messages + [{"role": "user", "content": user_text}]
        if system and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": system}] + msgs
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        reply: list[int] = []
        yield from self.stream_text(ids, max_new_tokens, reply)
        self.messages = msgs + [{"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)}]

    def stream_text(self, ids: list[int], max_new_tokens: int, collect: list[int] | None = None) -> Iterator[str]:
        """`stream_ids`, decoded: yields text increments (held back while a multi-byte character is incomplete)."""
        tok = self.model.tokenizer
        got: list[int] = [] if collect is None else collect
        shown = ""
        for chunk in self.stream_ids(ids, max_new_tokens):
            got += chunk
            text = tok.decode(got, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            if text.startswith(shown):
                yield text[len(shown) :]
            shown = text
        text = tok.decode(got, skip_special_tokens=True)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown) :]
