"""Tokenizers through transformers' AutoTokenizer; GGUF tokenizers are converted once and cached on disk."""

from __future__ import annotations

import hashlib
import os


def cache_dir() -> str:
    return os.environ.get("MEDUSA_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "medusa_jax"))


def load_tokenizer(path: str):
    """AutoTokenizer for a model directory or a .gguf file (converted once, then read from the cache)."""
    from transformers import AutoTokenizer

    if not path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(path)
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = os.path.join(cache_dir(), "tokenizers", key)
    if os.path.exists(os.path.join(cached, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    try:
        tmp = f"{cached}.tmp{os.getpid()}"
        tok.save_pretrained(tmp)
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home only costs the conversion next time
    return tok


def encode_prompt(tok, prompt: str, raw: bool, system: str | None = None) -> list[int]:
    """Token ids for one prompt: through the chat template (with the generation prompt) unless `raw`."""
    if raw:
        return tok(prompt, add_special_tokens=True)["input_ids"]
    if not getattr(tok, "chat_template", None):
        raise ValueError("this tokenizer has no chat template: pass raw=True (--raw) to feed prompts as plain text")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
