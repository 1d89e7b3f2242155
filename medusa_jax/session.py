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

from medusa_jax.generation import bucket
from medusa_jax.medusa_decode import (
    ACCEPTANCE,
    MedusaLoop,
    Thresholds,
    continue_medusa,
    resolve_tree,
    start_medusa,
)
from medusa_jax.model import KVCache
from medusa_jax.sampling import SamplingParams
from medusa_jax.tree import build_buffers


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    """Batch-1 streaming generation over one growing KV cache.

    mode: "medusa" (default when the model has heads) or "ar". acceptance: greedy (temperature 0), else
    "rejection" (default, keeps the base model's distribution) or "typical". lookup: the lookup chain's length
    (default: `model.default_lookup(1)` when no tree is named, else none); the chain drafts from the whole conversation."""

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
        if mode is None:
            calibrated_ar = tree is None and model.calibration is not None and not model.default_tree(1)
            mode = "medusa" if model.heads is not None and not calibrated_ar else "ar"
        if mode not in ("ar", "medusa"):
            raise ValueError(f"mode must be 'ar' or 'medusa', got {mode!r}")
        if mode == "medusa" and model.heads is None:
            raise ValueError("mode='medusa' needs Medusa heads: load(ckpt, heads=PATH)")
        greedy = temperature == 0.0
        acceptance = "greedy" if greedy else (acceptance or "rejection")
        if acceptance not in ACCEPTANCE:
            raise ValueError(f"acceptance must be one of {', '.join(ACCEPTANCE)}, got {acceptance!r}")
        self.model = model
        self.heads = model.heads if mode == "medusa" else None
        if mode == "medusa":
            if lookup is None and tree is None:
                lookup = model.default_lookup(1)
            tree = tree if tree is not None else (model.default_tree(1) or None)  # None: the backend's default
            self.tree = resolve_tree(tree, model.heads_config.num_heads, topk, lookup)
        else:
            self.tree = build_buffers([], topk=1)  # root only: autoregressive
        self.acceptance = acceptance
        self.sp = SamplingParams.make(temperature if not greedy else 1.0, top_k, top_p)
        self.th = Thresholds(jnp.float32(posterior_threshold), jnp.float32(posterior_alpha))
        self.chunk_steps = max(1, int(chunk_steps))
        self.rng = jax.random.PRNGKey(seed)
        self.cache: KVCache | None = None
        self.ids: list[int] = []  # tokens whose K/V are in the cache
        self.last_steps = 0  # decoding steps of the latest generation
        self.last_prefill = 0  # tokens prefilled by the latest generation
        self.last_reused = 0  # tokens of its input whose K/V came from the cache
        self.last_new = 0  # tokens it generated
        self.messages: list[dict] = []

    # ----------------------------------------------------------------------------------------------- low level
    def reset(self) -> None:
        """Forget the conversation (the cache buffer is kept for reuse)."""
        self.ids = []
        self.messages = []

    def _ensure_slots(self, need: int) -> None:
        if need > self.model.max_cache:
            raise ValueError(
                f"the conversation needs {need} cache positions, more than the model's {self.model.max_cache}: "
                "reset it (or lower max_new_tokens)"
            )
        if self.cache is not None and self.cache.slots >= need:
            return
        slots = min(bucket(need, 256), self.model.max_cache)
        fresh = KVCache.zeros(self.model.cfg, 1, slots)
        if self.cache is not None and self.ids:  # keep what is cached: copy it into the bigger buffer
            old = self.cache.slots
            fresh = KVCache(fresh.k.at[:, :, :old].set(self.cache.k), fresh.v.at[:, :, :old].set(self.cache.v))
        self.cache = fresh

    def stream_ids(self, ids: list[int], max_new_tokens: int = 128) -> Iterator[list[int]]:
        """Continue from `ids` (the full token sequence so far: its cached prefix is reused, the rest prefilled) and
        yield the new tokens chunk by chunk. On return `self.ids` = ids + the generated tokens."""
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        keep = min(common_prefix(self.ids, ids), len(ids) - 1)  # at least one token to prefill
        new = ids[keep:]
        self.last_prefill, self.last_reused = len(new), keep
        t = bucket(len(new), 16)
        out_len = bucket(max_new_tokens, 16)
        self._ensure_slots(keep + t + out_len + self.tree.num_nodes + 1)
        loop = MedusaLoop(self.tree, out_len, self.cache.slots, self.acceptance, self.model.eos_ids)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, : len(new)] = new
        history = None
        if self.tree.lookup:  # the lookup chain drafts from the whole conversation
            history = np.full((1, self.cache.slots), -1, np.int32)
            history[0, :keep] = ids[:keep]
        self.rng, key = jax.random.split(self.rng)
        self.ids = list(ids[:keep])  # the cache is being rewritten from here on
        cfg, params, heads = self.model.cfg, self.model.params, self.heads
        max_new = jnp.int32(max_new_tokens)
        cache, self.cache = self.cache, None  # donated into the state
        try:
            state = start_medusa(
                cfg, loop, params, heads, cache, jnp.asarray([keep], jnp.int32), jnp.asarray(tokens),
                jnp.asarray([len(new)], jnp.int32), max_new, key, history,
            )  # fmt: skip
        except BaseException:
            self.ids = []  # the cache buffer may be gone: start over next time
            raise
        sent = 0
        try:
            while True:
                state = continue_medusa(
                    cfg, loop, params, heads, state, max_new, self.sp, self.th, jnp.int32(self.chunk_steps)
                )
                n, done = (int(x) for x in jax.device_get((state.num_out[0], state.done[0])))
                if n > sent:
                    yield [int(x) for x in np.asarray(state.out[0, sent:n])]
                    sent = n
                if done:
                    break
        finally:
            out = np.asarray(state.out[0, :sent]).tolist()
            self.ids = list(ids) + out
            self.last_steps, self.last_new = int(state.steps[0]), sent
            self.cache = state.cache

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
