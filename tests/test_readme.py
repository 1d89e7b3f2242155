"""The README's Python blocks run as written (in order, one namespace), with `medusa_jax.load` answering every call
with a tiny random Llama with 5 Medusa heads (the blocks' arguments are still checked against `load`'s
signature)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama GGUF (byte-level BPE vocabulary of 264 tokens, chat template), loaded by the real
    `load`, with 5 random Medusa heads."""
    import os

    from test_tokenizer_cache import write_tiny_gguf

    from medusa_jax import api
    from medusa_jax.heads import HeadsConfig, init_heads

    path = str(tmp_path_factory.mktemp("readme") / "tiny.gguf")
    write_tiny_gguf(path, context=1024)
    os.environ.setdefault("MEDUSA_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    model = api.load(path, heads=False)
    model.heads = init_heads(HeadsConfig(num_heads=5, num_layers=1), model.params, seed=1, scale=0.02)
    return model


def test_readme_python_blocks_run(tiny_model, monkeypatch, capsys):
    import medusa_jax
    from medusa_jax import api

    real = inspect.signature(api.load)

    def fake_load(*args, **kwargs):
        real.bind(*args, **kwargs)  # a README call with a wrong argument fails here
        return tiny_model

    monkeypatch.setattr(medusa_jax, "load", fake_load, raising=False)
    monkeypatch.setattr(api, "load", fake_load)
    blocks = python_blocks()
    assert len(blocks) >= 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102
    res, chat = scope["res"], scope["chat"]
    assert len(res) == len(scope["prompts"]) and all(r.new_tokens >= 1 for r in res)
    assert scope["out"].logits.shape == (1, 3, tiny_model.cfg.vocab_size)
    # the README's chat claim: the second turn reuses the cached tokens it shares with the first turn's prompt and
    # reply, and prefills the rest
    tok = tiny_model.tokenizer
    first = tok.apply_chat_template(chat.messages[:1], add_generation_prompt=True, tokenize=True)
    first = list(first["input_ids"] if hasattr(first, "keys") else first)
    both = tok.apply_chat_template(chat.messages[:3], add_generation_prompt=True, tokenize=True)
    both = list(both["input_ids"] if hasattr(both, "keys") else both)
    assert chat.last_reused + chat.last_prefill == len(both)
    assert len(first) // 2 < chat.last_reused < len(both)
    assert f"{chat.last_prefill} {chat.last_reused}" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    """`.ci/run` installs and tests with the README's quick-start test command (its pip calls quiet)."""
    readme = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1).splitlines()[1]
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci.replace("pip install -q ", "pip install ") == readme, (ci, readme)
    assert " -n 2 " in readme  # the suite runs on both cores
