"""The GGUF tokenizer rebuilt without torch (against transformers' own GGUF tokenizer), and the on-disk caches of
tokenizers and converted params: atomic, shared by racing first runs, rebuilt when damaged."""

from __future__ import annotations

import os

import numpy as np
import pytest

from medusa_jax import cache, checkpoint, tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_gguf(path: str, context: int = 128) -> None:
    """A 2-layer Llama GGUF with a byte-level BPE vocabulary: 3 control tokens, 256 bytes, a few merges."""
    import gguf

    alphabet = tokenizer._byte_alphabet()
    tokens = SPECIALS + [alphabet[b] for b in range(256)]
    merges = ["h e", "l l", "he ll", "Ġ w", "o r"]
    tokens += [m.replace(" ", "") for m in merges]
    v, e, f, heads, kv, layers = len(tokens), 16, 32, 2, 1, 2
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_embedding_length(e)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_context_length(context)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(e // heads)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (v - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (v, e), "output_norm.weight": (e,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_q.weight": (e, e), f"blk.{i}.attn_k.weight": (e // heads * kv, e),
                   f"blk.{i}.attn_v.weight": (e // heads * kv, e), f"blk.{i}.attn_output.weight": (e, e),
                   f"blk.{i}.ffn_gate.weight": (f, e), f"blk.{i}.ffn_up.weight": (f, e),
                   f"blk.{i}.ffn_down.weight": (e, f), f"blk.{i}.attn_norm.weight": (e,),
                   f"blk.{i}.ffn_norm.weight": (e,)}  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("MEDUSA_JAX_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path)
    return path


def leftovers(root) -> list[str]:
    """Temporary build directories left in the cache."""
    return [n for _, dirs, _ in os.walk(root) for n in dirs if n.startswith(".")]


def test_smollm2_tokenizer_matches_transformers(tmp_path, monkeypatch):
    """The embedded model's tokenizer, rebuilt from GGUF metadata (no torch), against transformers' GGUF tokenizer
    (which needs torch): ids, decoding and the chat template, built fresh and read back from the cache."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    monkeypatch.setenv("MEDUSA_JAX_CACHE", str(tmp_path))
    path = checkpoint.default_gguf()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    built, cached = tokenizer.load_tokenizer(path), tokenizer.load_tokenizer(path)
    texts = ["Hello world", "  two leading spaces\tand a tab\n\nand lines", "<|im_start|>user\nhi<|im_end|>",
             "émoji 🤖, 中文, ñ", "it's 12345678 I'LL", "<repo_name> x", ""]  # fmt: skip
    for tok in (built, cached):
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (
            ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref))  # fmt: skip
        for text in texts:
            ids = ref(text)["input_ids"]
            assert tok(text)["input_ids"] == ids, text
            for skip in (False, True):
                assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        chat = [{"role": "user", "content": "Name three rivers."}, {"role": "assistant", "content": "Nile, Amazon."},
                {"role": "user", "content": "Which is longest?"}]  # fmt: skip
        for msgs in (chat[:1], chat, [{"role": "system", "content": "Be brief."}] + chat):
            for gen in (False, True):
                a = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
                assert a == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
                assert tokenizer.encode_prompt(tok, "Why?", False, "Be brief.") == tokenizer.encode_prompt(
                    ref, "Why?", False, "Be brief.")  # fmt: skip


def test_saved_tokenizer_loads_without_the_model_registry(tmp_path, monkeypatch):
    """A directory holding a tokenizer saved from ours (transformers' generic class) loads without AutoTokenizer's
    config lookup, which imports torch (the CLI's startup): the same ids, specials and chat template as AutoTokenizer
    gives. A directory naming a model-specific class, or remote code, still goes through AutoTokenizer."""
    import json
    import subprocess
    import sys

    from transformers import AutoTokenizer

    monkeypatch.setenv("MEDUSA_JAX_CACHE", str(tmp_path / "cache"))
    saved = tmp_path / "tok"
    tokenizer.load_tokenizer(checkpoint.default_gguf()).save_pretrained(saved)
    assert tokenizer.declares_generic_class(str(saved))
    ours, ref = tokenizer.load_tokenizer(str(saved)), AutoTokenizer.from_pretrained(str(saved))
    assert type(ours) is type(ref)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, len(ours)) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref))  # fmt: skip
    for text in ["Hello world", "  two  spaces\tand a tab\n\nlines", "<|im_start|>user\nhi<|im_end|>", "émoji 🤖"]:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    assert tokenizer.encode_prompt(ours, "Why?", False, "Be brief.") == tokenizer.encode_prompt(
        ref, "Why?", False, "Be brief.")  # fmt: skip
    probe = (
        "import sys; from medusa_jax.tokenizer import load_tokenizer; load_tokenizer(sys.argv[1]); "
        "print(sorted(m for m in ('torch', 'transformers.models.auto.tokenization_auto') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", probe, str(saved)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
    config = saved / "tokenizer_config.json"
    declared = json.loads(config.read_text())
    for changed in ({"tokenizer_class": "GPT2Tokenizer"}, {"auto_map": {"AutoTokenizer": ["x.Tok", None]}}):
        config.write_text(json.dumps(declared | changed))
        assert not tokenizer.declares_generic_class(str(saved)), changed


def test_tiny_gguf_tokenizer_and_cache_entry(tiny_gguf, tmp_path):
    tok = tokenizer.load_tokenizer(tiny_gguf)
    assert tok("hello world")["input_ids"] == tok.convert_tokens_to_ids(["hell", "o", "Ġw", "or", "l", "d"])
    assert tok.decode(tok("<|im_start|>hello")["input_ids"], skip_special_tokens=True) == "hello"
    assert tokenizer.encode_prompt(tok, "hi", raw=False)[:1] == [1]  # the chat template's <|im_start|>
    entries = os.listdir(tmp_path / "cache" / "tokenizers")
    assert len(entries) == 1 and leftovers(tmp_path / "cache") == []
    again = tokenizer.load_tokenizer(tiny_gguf)  # from the cache
    assert again("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_racing_first_runs_share_the_tokenizer_cache(tiny_gguf, tmp_path, monkeypatch):
    """Another process publishes the entry while this one is still building it: both succeed, one entry stays,
    no temporary directory is left behind."""
    build = tokenizer.gguf_tokenizer

    def racing(path):
        out = build(path)
        monkeypatch.setattr(tokenizer, "gguf_tokenizer", build)
        tokenizer.load_tokenizer(path)  # the other process: converts and publishes first
        return out

    monkeypatch.setattr(tokenizer, "gguf_tokenizer", racing)
    tok = tokenizer.load_tokenizer(tiny_gguf)
    assert tok("hello")["input_ids"] == tok.convert_tokens_to_ids(["hell", "o"])
    assert len(os.listdir(tmp_path / "cache" / "tokenizers")) == 1
    assert leftovers(tmp_path / "cache") == []


def test_publish_dir_loses_the_race_cleanly(tmp_path):
    final = str(tmp_path / "entry")
    first, second = cache.new_dir(final), cache.new_dir(final)
    for d, text in ((first, "a"), (second, "b")):
        with open(os.path.join(d, "f"), "w") as f:
            f.write(text)
    assert cache.publish_dir(first, final) and cache.publish_dir(second, final)
    assert (tmp_path / "entry" / "f").read_text() == "a" and sorted(os.listdir(tmp_path)) == ["entry"]


def test_params_cache_matches_and_recovers(tiny_gguf, tmp_path):
    """Converted params are cached (keyed by the file): equal to a fresh conversion; a damaged entry is rebuilt;
    a changed file gets a new entry."""
    cfg, ref = checkpoint.load_gguf(tiny_gguf)
    for _ in range(2):  # convert and publish, then read the entry
        got_cfg, got = checkpoint.read_backbone(tiny_gguf)
        assert got_cfg == cfg
        assert sorted(checkpoint._flatten(got), key=str).__len__() == len(list(checkpoint._flatten(ref)))
        for (k, a), (k2, b) in zip(sorted(checkpoint._flatten(ref)), sorted(checkpoint._flatten(got))):
            assert k == k2 and a.dtype == b.dtype and np.array_equal(a, b), k
    (entry,) = os.listdir(tmp_path / "cache" / "params")
    params_file = tmp_path / "cache" / "params" / entry / checkpoint.PARAMS_FILE
    params_file.write_bytes(params_file.read_bytes()[:100])  # half-written / damaged
    _, got = checkpoint.read_backbone(tiny_gguf)
    assert np.array_equal(got["embed"]["embedding"], ref["embed"]["embedding"])
    assert params_file.stat().st_size > 100 and leftovers(tmp_path / "cache") == []
    os.utime(tiny_gguf, ns=(1, 1))  # a changed source file: a new key
    checkpoint.read_backbone(tiny_gguf)
    assert len(os.listdir(tmp_path / "cache" / "params")) == 2
