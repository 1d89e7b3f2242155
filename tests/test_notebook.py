"""examples/quickstart.ipynb, executed cell by cell on a tiny random Llama with the SmolLM2 tokenizer: the
parameters cell is replaced by tiny values, shell lines (`!`, `%`) are skipped, the other cells run in order in one
namespace, in a temporary working directory."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello."]


def tiny_checkpoint(path: Path) -> str:
    """A random one-layer Llama (hidden 32) in the Hugging Face layout, with the SmolLM2 tokenizer (weights wide
    enough that greedy answers vary instead of repeating one token)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from medusa_jax.checkpoint import default_gguf
    from medusa_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(default_gguf())
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
                      initializer_range=0.2)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def tiny_heads(ckpt: str, path: Path) -> str:
    import jax
    import numpy as np

    import medusa_jax
    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.heads_io import save_heads

    params = medusa_jax.load(ckpt, tokenizer=False).params
    heads = init_heads(HeadsConfig(num_heads=2, num_layers=1), params, seed=1, scale=0.02)
    save_heads(jax.tree.map(np.asarray, heads), str(path))
    return str(path)


def code_cells(nb: dict) -> list[tuple[list[str], str]]:
    return [(c["metadata"].get("tags", []), "".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]


def without_shell(src: str) -> str:
    return "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("!", "%")))


def test_notebook_is_valid_and_clean():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
    for c in nb["cells"]:
        assert c["cell_type"] in ("markdown", "code") and isinstance(c["source"], list) and c["id"]
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None
            ast.parse(without_shell("".join(c["source"])))
    assert sum("parameters" in tags for tags, _ in code_cells(nb)) == 1


def test_notebook_runs(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    prompts_file = tmp_path / "my_prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    params = {
        "CKPT": ckpt,
        "HEADS": tiny_heads(ckpt, tmp_path / "heads"),
        "PROMPT": "Hi there.",
        "MAX_NEW_TOKENS": 5,
        "PROMPTS_FILE": str(prompts_file),
        "NUM_PROMPTS": len(PROMPTS),
        "DISTILL_TOKENS": 8,
        "TRAIN_STEPS": 3,
        "WORK_DIR": "runs/quickstart",
    }
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    cells = code_cells(nb)
    (param_src,) = [src for tags, src in cells if "parameters" in tags]
    names = {t.id for node in ast.parse(param_src).body if isinstance(node, ast.Assign) for t in node.targets}
    assert names == set(params)  # every parameter of the notebook gets a tiny value here
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ns: dict = {"__name__": "__main__"}
    for i, (tags, src) in enumerate(cells):
        src = "\n".join(f"{k} = {v!r}" for k, v in params.items()) if "parameters" in tags else without_shell(src)
        exec(compile(src, f"{NOTEBOOK.name}[code cell {i}]", "exec"), ns)

    assert ns["model"].heads is not None
    for name in ("plain", "medusa", "default"):
        res = ns[name]
        assert res.text.strip() and res.new_tokens == 5 and res.tokens_per_step >= 1, name
    assert ns["plain"].steps == 5  # plain decoding: the root-only loop, one forward and one token per step
    assert len(ns["replies"]) == 2 and all(r.strip() for r in ns["replies"])
    assert len(ns["chat"].messages) == 4  # two user turns, two answers
    run_dir = work / "runs" / "quickstart" / "run"
    assert ns["result"].step == 3 and len(ns["result"].losses) == 3 and all(loss > 0 for loss in ns["result"].losses)
    assert (run_dir / "export" / "config.json").exists()
    assert ns["trained"].heads is not None and ns["res"].new_tokens == 5 and ns["res"].tokens_per_step >= 1
    assert not os.path.exists(work / "prompts.jsonl")  # the given prompts file was used, not the sample
