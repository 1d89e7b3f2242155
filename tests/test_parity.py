"""Our logits against HF transformers' PyTorch models on the same weights (float32, CPU), and greedy Medusa output
against greedy AR output in bfloat16.

Tiny random Llama / Mistral / Qwen2 models are created with transformers and saved as safetensors; the SmolLM2
GGUF is loaded by both. Criterion: max |ours - theirs| <= 1e-4 * max |theirs|.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import medusa_jax  # noqa: E402
from medusa_jax.config import RopeScaling  # noqa: E402

RTOL = 1e-4
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def tiny_model(config_cls, model_cls, seed: int = 0, **overrides):
    """A tiny HF model with every weight random (norm scales around 1, biases nonzero), in eval mode."""
    torch.manual_seed(seed)
    cfg = config_cls(**{**TINY, **overrides})
    model = model_cls(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.1 * noise)
    return model


def save(model, path, **kw) -> str:
    model.save_pretrained(path, safe_serialization=True, **kw)
    return str(path)


def token_ids(n: int, vocab: int = 256, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, n)).astype(np.int32)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def assert_close(ours, theirs):
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape
    scale = float(np.abs(theirs).max())
    err = float(np.abs(ours - theirs).max())
    assert err <= RTOL * scale, f"max |diff| {err:.3g} > {RTOL} * max |logit| {scale:.3g}"


def check_dir(model, path, ids):
    ours = medusa_jax.load(path, tokenizer=False)
    assert_close(ours.forward(ids).logits, hf_logits(model, ids))
    return ours


# ------------------------------------------------------------------------------------------ tiny random models
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama(tmp_path, tied):
    model = tiny_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, tie_word_embeddings=tied)
    path = save(model, tmp_path / "llama")
    names = set(_tensor_names(path))
    assert ("lm_head.weight" in names) is not tied
    ours = check_dir(model, path, token_ids(24))
    assert ours.cfg.tie_word_embeddings is tied


def test_llama3_rope_scaling(tmp_path):
    model = tiny_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, rope_scaling=dict(LLAMA3_ROPE))
    assert model.model.rotary_emb.rope_type == "llama3"  # transformers really applies the scaling
    path = save(model, tmp_path / "llama3")
    ids = token_ids(100)  # well past original_max_position_embeddings=32
    ours = check_dir(model, path, ids)
    assert ours.cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 32)
    # the scaling matters at these positions: without it our logits would be far off
    unscaled = medusa_jax.MedusaModel(ours.cfg.replace(rope_scaling=None), ours.params).forward(ids).logits
    theirs = hf_logits(model, ids)
    assert np.abs(np.asarray(unscaled) - theirs).max() > 100 * RTOL * np.abs(theirs).max()


def test_mistral(tmp_path):
    model = tiny_model(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=None)
    check_dir(model, save(model, tmp_path / "mistral"), token_ids(20))


def test_qwen2_with_qkv_bias(tmp_path):
    model = tiny_model(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, tie_word_embeddings=False)
    attn = model.model.layers[0].self_attn
    assert all(float(b.detach().abs().max()) > 0 for b in (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias))
    ours = check_dir(model, save(model, tmp_path / "qwen2"), token_ids(20))
    assert ours.cfg.qkv_bias


def test_sharded_checkpoint(tmp_path):
    model = tiny_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, seed=3)
    path = save(model, tmp_path / "sharded", max_shard_size="100KB")
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json")) and len(shards) > 1
    check_dir(model, path, token_ids(16))


def test_hub_id_from_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    model = tiny_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, seed=5)
    src = save(model, tmp_path / "src")
    cache = tmp_path / "hf" / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--name"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once at import; it is already imported by now
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    assert medusa_jax.checkpoint.resolve("org/name") == str(repo / "snapshots" / commit)
    ours = medusa_jax.load("org/name", tokenizer=False)
    ids = token_ids(12)
    assert_close(ours.forward(ids).logits, hf_logits(model, ids))
    with pytest.raises(medusa_jax.CheckpointError, match="org/missing"):
        medusa_jax.load("org/missing", tokenizer=False)


def _tensor_names(path):
    from safetensors import safe_open

    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="np") as st:
                yield from st.keys()


# ------------------------------------------------------------------------------------------ SmolLM2 (GGUF)
def test_smollm2_gguf_chat_prompt(smollm2, hf_smollm2):
    hf_model, hf_tok = hf_smollm2
    messages = [{"role": "user", "content": "Give me three tips for staying focused while studying."}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == smollm2.encode(messages[0]["content"])  # our chat template path agrees
    ids = np.asarray([ids], np.int32)
    assert_close(smollm2.forward(ids).logits, hf_logits(hf_model, ids))


# ------------------------------------------------------------------------------------------ Medusa == AR, bf16
def test_logits_accumulate_in_float32_with_bfloat16_weights():
    """The vocabulary projection of bfloat16 weights returns float32 sums, not bfloat16-rounded ones (which tie and
    flip greedy choices between Medusa's many-token verification and the one-token step)."""
    import jax.numpy as jnp

    from medusa_jax.config import ModelConfig
    from medusa_jax.model import Transformer, init_params

    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 64)), jnp.bfloat16)
    for tied in (False, True):
        cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                          num_kv_heads=2, head_dim=16, dtype="bfloat16", param_dtype="bfloat16",
                          tie_word_embeddings=tied)  # fmt: skip
        params = init_params(cfg)
        model = Transformer(cfg)
        logits = model.apply({"params": params}, hidden, method=model.logits)
        w = params["embed"]["embedding"].T if tied else params["lm_head"]["kernel"]
        exact = np.asarray(hidden, np.float32) @ np.asarray(w, np.float32)
        assert logits.dtype == jnp.float32
        assert np.abs(np.asarray(logits) - exact).max() < 1e-5 * np.abs(exact).max()


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2):
    """SmolLM2 as `load(dtype="bfloat16")` decodes it (bfloat16 weights, float32 activations and KV cache), with the
    shipped heads."""
    model = medusa_jax.load(dtype="bfloat16")
    assert model.heads is not None and model.cfg.param_dtype == "bfloat16"
    return model


@pytest.mark.parametrize("batch,n", [(1, 1), (2, 2)])
def test_smollm2_bf16_medusa_greedy_equals_ar(smollm2_bf16, dev_prompts, batch, n):
    """Greedy Medusa (trained heads, a tree and a lookup chain) returns exactly the AR tokens in bfloat16, on varied
    held-out prompts, one at a time or in one batch of two of different lengths. (With bfloat16 activations the
    verification forward of many tokens and the one-token step round differently, and rows differ:
    `activations="bfloat16"`.)"""
    from medusa_jax.parity import greedy_parity, varied_prompts

    prompts = varied_prompts(dev_prompts, 8)[:n]
    r = greedy_parity(smollm2_bf16, prompts, 20, batch, tree="cpu_16", lookup=10)
    assert r["equal"] == r["rows"], f"first differences: {r['first_diff']}"
