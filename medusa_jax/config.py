"""Static model configuration: a frozen, hashable dataclass read from HF config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
INFERENCE_DTYPES = ("float32", "bfloat16", "float16")
AUTO_ATTENTION_BLOCK = 512  # cache slots per attention block (`ModelConfig.attention_block_for`)
MIN_ATTENTION_BLOCK = 64


def check_numerics(dtype: str, activations: str | None = None) -> None:
    """ValueError unless both name a dtype `load()` decodes in."""
    for name, value in (("dtype", dtype), ("activations", activations or "float32")):
        if value not in INFERENCE_DTYPES:
            raise ValueError(f"{name} must be one of {', '.join(INFERENCE_DTYPES)}, got {value!r}")


# Backbones by hub id, as their Hugging Face config.json (enough to plan and compile for them without a download).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "lmsys/vicuna-7b-v1.3": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                                rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "meta-llama/Meta-Llama-3-70B-Instruct": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                                 num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                                 rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
}  # fmt: skip
KNOWN_ALIASES = {"vicuna-7b": "lmsys/vicuna-7b-v1.3", "llama-3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
                 "llama-3-70b": "meta-llama/Meta-Llama-3-70B-Instruct"}  # fmt: skip


def known_config(name: str) -> ModelConfig | None:
    """The ModelConfig of a known backbone (hub id, its base-model id, or a short alias), else None."""
    name = KNOWN_ALIASES.get(name.lower(), name)
    hf = KNOWN_CONFIGS.get(name) or KNOWN_CONFIGS.get(f"{name}-Instruct")
    return None if hf is None else ModelConfig.from_hf(dict(hf, model_type="llama"))


def default_dtype(backend: str | None = None) -> tuple[str, str]:
    """(the weights' dtype `load()` uses when none is given, why): float32 on CPUs, bfloat16 on accelerators (half
    the weight memory and traffic; float32 activations and KV cache keep greedy Medusa output equal to plain
    decoding)."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend == "cpu":
        return "float32", "float32 weights, the default on CPUs; --dtype bfloat16 halves their memory"
    return "bfloat16", (
        f"bfloat16 weights with float32 activations and KV cache, the default on {backend}; --dtype float32 for "
        "full-precision weights"
    )


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False  # Llama `attention_bias` also puts a bias on o_proj
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # activations: residual stream, norms, attention, KV cache
    param_dtype: str = "float32"  # weights as stored
    matmul_dtype: str | None = None  # inputs of the weight matmuls (None: dtype); they accumulate in float32
    matmul_passes: int = 1  # wider activations enter matmul_dtype matmuls split into this many parts (model.matmul)
    precision: str = "default"  # jax.lax precision of float32 matmuls ("highest": no TF32 on GPUs)
    remat: bool = False  # rematerialize each layer in the backward pass
    scan_unroll: int = 1  # layers per while-loop iteration (num_layers: no loop; see Transformer)
    row_writes: str = "auto"  # KV writes of more rows than are unrolled: "loop", "scatter" (auto: scatter on TPUs)
    attention_block: int = -1  # cache slots per block of attention over the cache, read up to the live length
    #                            (0: every slot in one pass; -1: auto, see `attention_block_for`)
    attention_blocks_unrolled: int = 0  # cost measurement only: this many blocks, unrolled, whatever the live length
    attention_kernel: str = "auto"  # blockwise attention over the cache: "pallas" (`tree_attention`, TPUs), "xla",
    #                                 "interpret" (the Pallas kernel's code run by XLA: tests); auto: pallas on TPUs

    @property
    def scatter_rows(self) -> bool:
        """Whether many rows' KV writes are one scatter (TPUs: their compiler fails on the row loop at batches above
        16) rather than a loop of in-place row writes (CPUs, GPUs: a batched scatter copied the whole cache)."""
        if self.row_writes != "auto":
            return self.row_writes == "scatter"
        import jax

        return jax.default_backend() == "tpu"

    @property
    def attention_kernel_used(self) -> str:
        """The blockwise attention's implementation: the Pallas kernel on TPUs (auto), XLA elsewhere."""
        if self.attention_kernel != "auto":
            return self.attention_kernel
        import jax

        return "pallas" if jax.default_backend() == "tpu" else "xla"

    def attention_block_for(self, slots: int) -> int:
        """Slots per block of the attention over a cache of `slots` (0: all slots in one pass). Blockwise, attention
        reads the cache only up to the longest row's live length (an online softmax over blocks in a loop whose trip
        count is the live length's): a step at length L in a cache of S slots pays for L. Auto: blocks of up to 512
        slots on TPUs and CPUs; one pass on GPUs, where each iteration of a device loop waits on the host. The block
        is the largest divisor of `slots` up to the size asked for, and at least 64 slots (else one pass)."""
        block = self.attention_block
        if block < 0:
            import jax

            block = 0 if jax.default_backend() == "gpu" else AUTO_ATTENTION_BLOCK
        if block <= 0 or slots <= block:
            return 0
        return next((d for d in range(block, MIN_ATTENTION_BLOCK - 1, -1) if slots % d == 0), 0)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_matmul_dtype(self):
        return jnp.dtype(self.matmul_dtype or self.dtype)

    def for_inference(self, dtype: str = "float32", activations: str | None = None) -> ModelConfig:
        """The numerics `load()` decodes with. dtype: the weights and the inputs of their matmuls. activations: the
        residual stream, norms, attention and KV cache, float32 unless given. Float32 activations keep greedy
        Medusa output equal to plain decoding with bfloat16 weights: a verification forward of many tokens and a
        one-token step sum in different orders, and bfloat16 activations (above all a bfloat16 KV cache) round
        those float32 differences into whole bfloat16 steps. So do bfloat16 matmul inputs: float32 activations enter
        the bfloat16 matmuls in two parts (~16 mantissa bits; `model.matmul`). Float32 matmuls run at full precision
        (no TF32)."""
        check_numerics(dtype, activations)
        act = activations or "float32"
        return self.replace(
            dtype=act, param_dtype=dtype, matmul_dtype=dtype, matmul_passes=2, precision="highest", remat=False
        )

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face `config.json` dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
        `rope_parameters`)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: medusa_jax supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope.update({k: v for k, v in legacy.items() if k not in rope})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
            )
        elif rope_type not in ("default", None):
            raise ValueError(f"unsupported rope_type {rope_type!r}: medusa_jax supports 'default' and 'llama3'")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
        )
