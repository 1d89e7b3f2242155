"""Tokenizers, without torch.

A model directory's tokenizer files are read with transformers' AutoTokenizer; when the directory declares
transformers' generic `tokenizers`-backed class (what `save_pretrained` writes for a tokenizer built here, and what
AutoTokenizer would build from it too), with that class directly: AutoTokenizer first reads the model's config
through transformers' model registry, which imports torch where it is installed (about 3 s). A GGUF file has no
tokenizer files: its vocabulary, merges, token types, special tokens and chat template are metadata, read here with
`gguf` and rebuilt as a `tokenizers` byte-level BPE wrapped in transformers' `PreTrainedTokenizerFast`
(transformers' own GGUF reader imports torch). The result is saved once under the cache dir, keyed by the file's
size, mtime and a hash.
"""

from __future__ import annotations

import json
import os

from medusa_jax import cache
from medusa_jax.cache import cache_dir  # noqa: F401  (re-exported: the cache's root)

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
SPECIALS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}  # fmt: skip
FILES = ("tokenizer.json", "medusa_tokenizer.json")  # the backend, and the wrapper's arguments
GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast")  # transformers' class for a bare `tokenizers` backend


def load_tokenizer(path: str):
    """The tokenizer of a model directory (its own files) or of a .gguf file (rebuilt once, then read from the
    cache). Raises ValueError when a directory has no usable tokenizer files."""
    if not path.endswith(".gguf"):
        if declares_generic_class(path):
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    cached = cache.entry("tokenizers", cache.file_key(path, "gguf-tokenizer-1"))
    if all(os.path.exists(os.path.join(cached, f)) for f in FILES):
        try:
            return read(cached)
        except (OSError, ValueError, KeyError):
            pass  # an unreadable entry (e.g. from another version): rebuild it below
    backend, kwargs = gguf_tokenizer(path)
    cache.store(cached, lambda tmp: write(tmp, backend, kwargs))
    return wrap(backend, kwargs)


def declares_generic_class(path: str) -> bool:
    """Whether a local model directory holds a `tokenizer.json` whose `tokenizer_config.json` names transformers'
    generic fast class (no model-specific class, no remote code): AutoTokenizer would build that class too."""
    config = os.path.join(path, "tokenizer_config.json")
    if not (os.path.isfile(config) and os.path.isfile(os.path.join(path, FILES[0]))):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            declared = json.load(f)
    except (OSError, ValueError):
        return False  # AutoTokenizer says what is wrong
    return isinstance(declared, dict) and declared.get("tokenizer_class") in GENERIC and "auto_map" not in declared


def has_tokenizer_files(path: str) -> bool:
    """Whether a model directory holds tokenizer files AutoTokenizer can read."""
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    return any(os.path.exists(os.path.join(path, n)) for n in names)


def wrap(backend, kwargs: dict):
    """A `tokenizers.Tokenizer` and its special tokens / chat template -> transformers' `PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def write(directory: str, backend, kwargs: dict) -> None:
    backend.save(os.path.join(directory, FILES[0]))
    with open(os.path.join(directory, FILES[1]), "w", encoding="utf-8") as f:
        json.dump(kwargs, f)


def read(directory: str):
    from tokenizers import Tokenizer

    with open(os.path.join(directory, FILES[1]), encoding="utf-8") as f:
        kwargs = json.load(f)
    return wrap(Tokenizer.from_file(os.path.join(directory, FILES[0])), kwargs)


def gguf_metadata(path: str) -> dict:
    """The `tokenizer.*` and `general.architecture` metadata of a GGUF file (lists as Python lists)."""
    import gguf

    reader = gguf.GGUFReader(path)
    keys = [k for k in reader.fields if k.startswith("tokenizer.") or k == "general.architecture"]
    return {k: reader.fields[k].contents() for k in keys}


def gguf_tokenizer(path: str):
    """(`tokenizers.Tokenizer`, wrapper kwargs) rebuilt from a GGUF file's metadata."""
    meta = gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path} has no tokenizer metadata: load it with tokenizer=False and pass token ids")
    if kind == "gpt2":
        backend = byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.token_type"))
    else:
        backend = transformers_backend(path, meta)
    kwargs = {name: tokens[int(meta[f"tokenizer.ggml.{key}"])] for name, key in SPECIALS.items()
              if meta.get(f"tokenizer.ggml.{key}") is not None}  # fmt: skip
    if meta.get("tokenizer.chat_template"):
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    if kind == "gpt2" and meta.get("tokenizer.ggml.add_bos_token") and "bos_token" in kwargs:
        from tokenizers import processors

        bos = kwargs["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    return backend, kwargs


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int] | None):
    """GPT-2 style byte-level BPE (llama.cpp's `gpt2` tokenizer model), as transformers builds it from a GGUF:
    control tokens whole and special, user-defined tokens whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {}
    for i, t in enumerate(tokens):  # a token outside the byte alphabet is respelled in it
        vocab[t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))] = i
    pairs = [tuple(m.split(" ")) for m in merges]
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                   fuse_unk=False)
    )  # fmt: skip
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    types = token_types or []
    control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= spelled]
    if control:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return backend


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def transformers_backend(path: str, meta: dict):
    """Other GGUF tokenizer models (sentencepiece, unigram): transformers' converter, fed our metadata (torch-free in
    transformers 5), else transformers' own GGUF reader (which needs torch)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
        except ImportError as e:
            raise ValueError(
                f"the tokenizer of {path} ({meta.get('tokenizer.ggml.model')}) needs torch with this transformers "
                f"version: pip install torch, or upgrade transformers ({e})"
            ) from None
        return tok.backend_tokenizer
    names = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {name: meta[f"tokenizer.{key}"] for key, name in names.items() if f"tokenizer.{key}" in meta}
    backend, _ = convert_gguf_tokenizer(meta.get("general.architecture", "llama"), tokenizer_dict)
    return backend


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
