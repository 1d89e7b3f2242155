"""Shared fixtures. The SmolLM2 models load once per session (tens of seconds each), and only when a test asks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the package need not be installed to run the tests
    sys.path.insert(0, str(REPO))


def data_dir() -> Path:
    """The shared prompt data: `$MEDUSA_JAX_DATA`, else `shared/data` next to the repository."""
    env = os.environ.get("MEDUSA_JAX_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def dev_prompts() -> list[str]:
    """The held-out prompts of `dev_prompts.jsonl` (skips when the data is not there)."""
    path = data_dir() / "dev_prompts.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found: set MEDUSA_JAX_DATA to the folder holding dev_prompts.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default, SmolLM2-135M-Instruct (GGUF), loaded with `medusa_jax.load()` in float32."""
    import medusa_jax

    return medusa_jax.load()


@pytest.fixture(scope="session")
def hf_smollm2():
    """(model, tokenizer): the same GGUF loaded by HF transformers' PyTorch model, float32, eval mode."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from medusa_jax.checkpoint import default_gguf
    from medusa_jax.tokenizer import load_tokenizer

    path = default_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    model.eval()
    return model, load_tokenizer(path)
