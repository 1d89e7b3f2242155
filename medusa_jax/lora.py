"""Functional LoRA for the scanned (stacked) layer kernels: a separate params pytree of factors, merged before
`model.apply` as W + (alpha / r) A @ B, so the model code is unchanged.

LoRA params: `{"attn": {"q_proj": {"lora_a": [N, in, r], "lora_b": [N, r, out]}, ...}, "mlp": {...}}`. B starts at
zero (the merged model equals the base model at init)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GROUP = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip
HF_GROUP = {"attn": "self_attn", "mlp": "mlp"}


def init_lora(backbone: dict, targets, rank: int, seed: int = 0, dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {}
    for t in targets:
        g = GROUP[t]
        w = backbone["layers"][g][t]["kernel"]
        n, fan_in, fan_out = w.shape
        a = rng.normal(0.0, 1.0 / np.sqrt(fan_in), (n, fan_in, rank))
        out.setdefault(g, {})[t] = {
            "lora_a": jnp.asarray(a, dtype),
            "lora_b": jnp.zeros((n, rank, fan_out), dtype),
        }
    return out


def merge(backbone: dict, lora: dict | None, rank: int, alpha: float) -> dict:
    """The backbone params with each LoRA target's kernel replaced by W + (alpha/r) A @ B."""
    if not lora:
        return backbone
    scale = alpha / rank
    layers = dict(backbone["layers"])
    for g, mods in lora.items():
        group = dict(layers[g])
        for t, f in mods.items():
            w = group[t]["kernel"]
            delta = jnp.einsum("nir,nro->nio", f["lora_a"].astype(jnp.float32), f["lora_b"].astype(jnp.float32))
            group[t] = {**group[t], "kernel": (w.astype(jnp.float32) + scale * delta).astype(w.dtype)}
        layers[g] = group
    return {**backbone, "layers": layers}


def to_peft_tensors(lora: dict) -> dict[str, np.ndarray]:
    """PEFT adapter layout: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `[r, in]`, `lora_B`
    `[out, r]` (torch Linear orientation)."""
    out = {}
    for g, mods in lora.items():
        for t, f in mods.items():
            a, b = np.asarray(f["lora_a"], np.float32), np.asarray(f["lora_b"], np.float32)
            for i in range(a.shape[0]):
                base = f"base_model.model.model.layers.{i}.{HF_GROUP[g]}.{t}"
                out[f"{base}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
                out[f"{base}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return out


def from_peft_tensors(tensors: dict[str, np.ndarray]) -> dict:
    per: dict = {}
    for name, x in tensors.items():
        parts = name.split(".")
        i, g, t, which = int(parts[4]), parts[5], parts[6], parts[7]
        grp = "attn" if g == "self_attn" else "mlp"
        key = "lora_a" if which == "lora_A" else "lora_b"
        per.setdefault(grp, {}).setdefault(t, {}).setdefault(key, {})[i] = np.asarray(x).T
    return {
        g: {t: {k: jnp.asarray(np.stack([v[i] for i in sorted(v)])) for k, v in f.items()} for t, f in mods.items()}
        for g, mods in per.items()
    }


def merge_adapter(params: dict, path: str, dtype) -> dict:
    """`params` with the PEFT-layout LoRA adapter in `path` (`adapter_config.json` + `adapter_model.safetensors`, as
    the trainer exports it) merged in, as `dtype` arrays. A new pytree; `params` is not changed."""
    import json
    import os

    from safetensors.numpy import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        conf = json.load(f)
    lora = from_peft_tensors(load_file(os.path.join(path, "adapter_model.safetensors")))
    merged = merge(params, lora, int(conf["r"]), float(conf["lora_alpha"]))
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), merged)
