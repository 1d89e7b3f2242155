"""Peak host memory and time of loading a generated bfloat16 Llama checkpoint (HF safetensors, 5 shards, >= 1 GB) onto
8 simulated CPU devices with a 1x8 tensor sharding, and onto one device: the sharded reader
(`shard_load.read_backbone_sharded`) vs the whole-array path (`checkpoint.read_backbone` float32 numpy, then
`jnp.asarray(a, dtype)`, placed with the same shardings). Each load runs in a fresh process; memory is VmRSS/VmHWM above the baseline after jax started.
Run: PYTHONPATH=. python experiments/load_memory.py [DIR] (the checkpoint is written to DIR, default a new /tmp
folder, and deleted afterwards)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

V, E, FF, N, H = 32000, 2048, 5632, 9, 16  # 594M params: 1.19 GB in bfloat16
SHARDS = 5
MiB = 1 << 20


def write_checkpoint(path: str) -> int:
    """A random bfloat16 Llama in HF layout, `SHARDS` files with an index; returns the largest tensor's float32 bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    shapes = {"model.embed_tokens.weight": (V, E), "lm_head.weight": (V, E), "model.norm.weight": (E,)}
    for i in range(N):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{name}_proj.weight"] = (E, E)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (FF, E)
        shapes[f"{p}mlp.down_proj.weight"] = (E, FF)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (E,)
    rng = np.random.default_rng(0)
    total = sum(int(np.prod(s)) for s in shapes.values())
    weight_map, shard, done, k = {}, {}, 0, 1
    for j, (name, shape) in enumerate(shapes.items()):
        shard[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        done += int(np.prod(shape))
        if done >= total * k / SHARDS or j == len(shapes) - 1:
            file = f"model-{k:05d}-of-{SHARDS:05d}.safetensors"
            save_file(shard, os.path.join(path, file))
            weight_map.update(dict.fromkeys(shard, file))
            shard, k = {}, k + 1
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg = {"model_type": "llama", "vocab_size": V, "hidden_size": E, "intermediate_size": FF, "num_hidden_layers": N,
           "num_attention_heads": H, "num_key_value_heads": H, "max_position_embeddings": 4096}  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return 4 * max(int(np.prod(s)) for s in shapes.values())


def worker(mode: str, path: str, dtype: str) -> None:
    """One load in this (fresh) process; prints the memory and time as JSON."""

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    import jax
    import jax.numpy as jnp

    from medusa_jax import checkpoint, shard_load
    from medusa_jax.sharding import make_mesh, param_shardings

    mesh = make_mesh(1, 1, 8)
    jax.block_until_ready(jax.device_put(np.ones(8), jax.sharding.NamedSharding(mesh, jax.P())))
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM restarts from the current RSS
        f.write("5")
    base = status("VmRSS")
    t0 = time.perf_counter()
    one = mode.endswith("one device")
    if mode.startswith("sharded"):
        shardings = None if one else lambda t, c: param_shardings(t, mesh)
        _, params = shard_load.read_backbone_sharded(path, dtype, shardings)
    else:
        _, np_params = checkpoint.read_backbone(path)
        if one:
            params = jax.tree.map(lambda a: jnp.asarray(a, dtype), np_params)
        else:
            shard = param_shardings(np_params, mesh)
            params = jax.tree.map(lambda a, s: jax.device_put(jnp.asarray(a, dtype), s), np_params, shard)
        del np_params
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    out = {"peak": status("VmHWM") - base, "after": status("VmRSS") - base, "seconds": seconds}
    out["param_bytes"] = sum(a.nbytes for a in jax.tree.leaves(params))
    print(json.dumps(out))


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="load_memory.")
    path = os.path.join(root, "llama-bf16")
    try:
        t0 = time.perf_counter()
        largest = write_checkpoint(path)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        print(f"checkpoint: {size / 1e9:.2f} GB bfloat16, {SHARDS} shards, written in {time.perf_counter() - t0:.0f} s;"
              f" largest tensor {largest / MiB:.0f} MiB in float32")  # fmt: skip
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        print("| path | peak RSS above baseline | resident after load | bound: resident + 1.5 x largest f32 | load s |")
        print("| --- | --- | --- | --- | --- |")
        for mode in ("sharded 1x8", "whole-array 1x8", "sharded one device", "whole-array one device"):
            cmd = [sys.executable, __file__, "--worker", mode, path, "bfloat16"]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            bound = r["after"] + 1.5 * largest
            print(f"| {mode} | {r['peak'] / MiB:.0f} MiB | {r['after'] / MiB:.0f} MiB (params {r['param_bytes'] / MiB:.0f}"
                  f" MiB) | {bound / MiB:.0f} MiB ({'within' if r['peak'] <= bound else 'over'}) | {r['seconds']:.1f} |")  # fmt: skip
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if len(sys.argv) <= 1:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
    else:
        main()
