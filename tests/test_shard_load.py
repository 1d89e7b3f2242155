"""Loading a checkpoint straight into device shards (`medusa_jax.shard_load`): the same params as the whole-array
path, on 8 simulated CPU devices with a tensor-sharded mesh (HF safetensors in bfloat16 and float32, and the embedded
GGUF); peak host memory near the placed params; with two processes each reads only its own devices' slices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
from conftest import xla_env


def write_llama(path, vocab=64, hidden=32, inter=48, layers=3, heads=4, kv_heads=2, dtype="float32", shards=2,
                seed=0, extra=None) -> dict:  # fmt: skip
    """A random Llama checkpoint in HF layout (`[out, in]` weights) as `shards` safetensors files with an index, and
    its config.json; `extra` adds named tensors (e.g. Medusa heads). Returns the config dict."""
    import ml_dtypes
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    d = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (heads * d, hidden), p + "self_attn.k_proj.weight":
                       (kv_heads * d, hidden), p + "self_attn.v_proj.weight": (kv_heads * d, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * d), p + "mlp.gate_proj.weight": (inter, hidden),
                       p + "mlp.up_proj.weight": (inter, hidden), p + "mlp.down_proj.weight": (hidden, inter),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})  # fmt: skip
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    total = sum(int(np.prod(s)) for s in shapes.values())
    weight_map, shard, size, k = {}, {}, 0, 1

    def flush():
        nonlocal shard, k
        name = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file(shard, os.path.join(path, name))
        weight_map.update(dict.fromkeys(shard, name))
        shard, k = {}, k + 1

    items = list(shapes.items()) + [(n, None) for n in extra or {}]
    for name, shape in items:
        arr = extra[name] if shape is None else rng.standard_normal(shape, np.float32) * 0.5
        shard[name] = np.ascontiguousarray(arr.astype(np_dtype))
        size += arr.size
        if k < shards and size >= total * k / shards:
            flush()
    if shard:
        flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg = {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "head_dim": d, "max_position_embeddings": 128, "tie_word_embeddings": False}  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return cfg


def run_workers(tmp_path, script, args, nproc=1, devices=8, timeout=300, env=None):
    """Runs `script` in `nproc` fresh processes with `devices` simulated CPU devices each; returns their stdout's last
    lines as JSON."""
    path = tmp_path / "worker.py"
    path.write_text(script)
    env = xla_env(devices, MEDUSA_JAX_CACHE=str(tmp_path / "cache"), **(env or {}))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(path), str(nproc), str(i), str(port), *args],
            env=env,
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(nproc)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.loads(log.strip().splitlines()[-1]) for log in logs]


EQUAL = textwrap.dedent(
    """
    import json, os, sys
    import jax, numpy as np
    from medusa_jax import checkpoint, shard_load
    from medusa_jax.sharding import make_mesh, param_shardings
    mesh = make_mesh(1, 1, 8)
    shard = lambda tree, cfg=None: param_shardings(tree, mesh)
    res = {}

    def compare(name, old, new, dtype):
        flat_old = dict(checkpoint._flatten(old))
        flat_new = dict(checkpoint._flatten(new))
        assert flat_old.keys() == flat_new.keys(), (name, flat_old.keys() ^ flat_new.keys())
        split = 0
        for k, a in flat_old.items():
            b = flat_new[k]
            want = np.asarray(jax.numpy.asarray(a, dtype))  # the whole-array path: float32 numpy -> dtype
            assert b.dtype == want.dtype and b.shape == want.shape, (name, k, b.dtype, b.shape)
            assert np.array_equal(np.asarray(b).view(np.uint8), want.view(np.uint8)), (name, k)
            split += len({str(s.index) for s in b.addressable_shards}) > 1
        res[name] = {"leaves": len(flat_old), "split": split}

    for path in sys.argv[4:]:
        gguf = path.endswith(".gguf")
        old_cfg, old = checkpoint.load_gguf(path) if gguf else checkpoint.read_backbone(path)
        assert not gguf or not os.path.exists(checkpoint.gguf_cache_entry(path))
        for dtype in ("float32", "bfloat16"):
            for sharded in (True, False):  # GGUF: the first load converts the file (and fills the cache)
                cfg, new = shard_load.read_backbone_sharded(path, dtype, shard if sharded else None)
                assert cfg == old_cfg
                if sharded:
                    want = shard(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), new))
                    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(new), jax.tree.leaves(want)))
                compare(f"{path.split('/')[-1]}:{dtype}:{sharded}", old, new, dtype)
        if gguf:  # a Medusa-2 head set with LoRA beside it: merged into the placed (sharded) params
            from medusa_jax.api import load, shipped_heads
            from medusa_jax.lora import merge_adapter
            heads = shipped_heads("smollm2_medusa2")
            model = load(path, heads=heads, tokenizer=False, mesh=mesh)
            compare("lora", merge_adapter(old, heads, np.float32), model.params, "float32")
    print(json.dumps(res))
    """
)


def test_sharded_load_equals_whole_array_load(tmp_path):
    """HF safetensors (bf16 and f32 files, 2 shards with an index) and the embedded GGUF (converted, then from the
    params cache): `read_backbone_sharded` on a 1x8 tensor mesh (and on one device) gives exactly the params of
    `read_backbone` + `jnp.asarray(a, dtype)`."""
    from medusa_jax.checkpoint import default_gguf

    paths = []
    for dtype in ("bfloat16", "float32"):
        paths.append(str(tmp_path / f"hf-{dtype}"))
        write_llama(paths[-1], vocab=72, hidden=64, inter=96, layers=3, heads=8, kv_heads=4, dtype=dtype)
    gguf = default_gguf()
    (res,) = run_workers(tmp_path, EQUAL, [*paths, gguf])
    assert len(res) == 13
    for name, r in res.items():
        assert r["leaves"] >= 10, name
        if name.endswith("True"):
            assert r["split"] >= 5, (name, r)  # most params are really split over the devices
    # load(mesh=...) splits attention by whole heads: SmolLM2's 9 and 3 heads stay whole on 8 devices, while the
    # embedding and the three MLP matrices are split
    assert res["lora"]["split"] == 4, res["lora"]


def test_cache_written_by_the_sharded_reader_reads_back(tmp_path, monkeypatch):
    """The converted-params cache entry the sharded reader writes (tensor by tensor) is the one `read_backbone`
    reads, and holds the same arrays as a fresh conversion; a damaged entry is converted again."""
    from test_tokenizer_cache import write_tiny_gguf

    from medusa_jax import checkpoint, shard_load

    monkeypatch.setenv("MEDUSA_JAX_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path)
    cfg, ref = checkpoint.load_gguf(path)
    got_cfg, got = shard_load.read_backbone_sharded(path, "float32")
    entry = checkpoint.gguf_cache_entry(path)
    cached_cfg, cached = checkpoint.read_params_entry(entry)
    assert got_cfg == cfg == cached_cfg
    for (k, a), (k2, b), (k3, c) in zip(*(sorted(checkpoint._flatten(t)) for t in (ref, got, cached))):
        assert k == k2 == k3 and np.array_equal(a, np.asarray(b)) and np.array_equal(a, c), k
    params_file = os.path.join(entry, checkpoint.PARAMS_FILE)
    with open(params_file, "r+b") as f:
        f.truncate(100)
    _, again = shard_load.read_backbone_sharded(path, "float32")
    assert np.array_equal(np.asarray(again["embed"]["embedding"]), ref["embed"]["embedding"])
    assert os.path.getsize(params_file) > 100 and not [n for n in os.listdir(tmp_path / "cache" / "params") if
                                                        n.startswith(".")]  # fmt: skip


def test_load_keeps_errors_and_medusa2_heads(tmp_path):
    """Through `medusa_jax.load`: the whole-array path's messages for a missing layer tensor and a shape that does
    not fit the config; a Medusa-2 checkpoint's `medusa_head.*` tensors still become the model's heads."""
    import pytest

    import medusa_jax
    from medusa_jax.checkpoint import CheckpointError, read_backbone

    rng = np.random.default_rng(1)
    heads = {f"medusa_head.{k}.0.linear.weight": rng.standard_normal((32, 32), np.float32) for k in range(2)}
    heads |= {f"medusa_head.{k}.0.linear.bias": np.zeros(32, np.float32) for k in range(2)}
    heads |= {f"medusa_head.{k}.1.weight": rng.standard_normal((64, 32), np.float32) for k in range(2)}
    good = str(tmp_path / "good")
    write_llama(good, extra=heads)
    model = medusa_jax.load(good, dtype="bfloat16", tokenizer=False)
    assert model.heads is not None and model.params["layers"]["mlp"]["up_proj"]["kernel"].dtype == "bfloat16"
    assert model.forward([[1, 2, 3]]).logits.shape == (1, 3, 64)

    bad = str(tmp_path / "bad")
    write_llama(bad, shards=1)
    from safetensors.numpy import load_file, save_file

    file = os.path.join(bad, "model-00001-of-00001.safetensors")
    t = load_file(file)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, file)
    with pytest.raises(CheckpointError) as old:
        read_backbone(bad)
    with pytest.raises(CheckpointError) as new:
        medusa_jax.load(bad, tokenizer=False)
    assert str(new.value) == str(old.value) and "missing layers/mlp/up_proj/kernel for layers [1]" in str(old.value)
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"]
    for i in range(3):
        t[f"model.layers.{i}.mlp.up_proj.weight"] = np.zeros((40, 32), np.float32)
    save_file(t, file)
    with pytest.raises(CheckpointError) as old:
        read_backbone(bad)
    with pytest.raises(CheckpointError) as new:
        medusa_jax.load(bad, tokenizer=False)
    assert str(new.value) == str(old.value) and "config implies [3, 32, 48]" in str(old.value)
    with open(file, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="cannot read .*model-00001-of-00001.safetensors"):
        medusa_jax.load(bad, tokenizer=False)


MEMORY = textwrap.dedent(
    """
    import json, os, sys, time
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    import jax, jax.numpy as jnp, numpy as np
    from medusa_jax import checkpoint, shard_load
    from medusa_jax.sharding import make_mesh, param_shardings
    mode, path, dtype = sys.argv[4], sys.argv[5], sys.argv[6]
    mesh = make_mesh(1, 1, 8)
    jax.block_until_ready(jax.device_put(np.ones(8), jax.sharding.NamedSharding(mesh, jax.P())))  # backends up
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) restarts from here
        f.write("5")
    base = status("VmRSS")
    t0 = time.perf_counter()
    if mode == "new":
        cfg, params = shard_load.read_backbone_sharded(path, dtype, lambda t, c: param_shardings(t, mesh))
    else:  # the whole-array path: float32 numpy, then placed
        cfg, np_params = checkpoint.read_backbone(path)
        shard = param_shardings(np_params, mesh)
        params = jax.tree.map(lambda a, s: jax.device_put(jnp.asarray(a, dtype), s), np_params, shard)
        del np_params
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    print(json.dumps({"base": base, "peak": status("VmHWM"), "after": status("VmRSS"), "seconds": seconds,
                      "param_bytes": sum(a.nbytes for a in jax.tree.leaves(params))}))
    """
)


def largest_tensor_f32(path: str) -> int:
    from safetensors import safe_open

    from medusa_jax.checkpoint import safetensors_files

    most = 0
    for file in safetensors_files(path):
        with safe_open(file, framework="np") as f:
            for name in f.keys():  # noqa: SIM118
                most = max(most, 4 * int(np.prod(f.get_slice(name).get_shape())))
    return most


def measure_load(tmp_path, path, mode="new", dtype="bfloat16") -> dict:
    """Peak and resident host memory (bytes above the baseline after jax started) and seconds of one load of `path`
    with a 1x8 tensor mesh, in a fresh process."""
    (r,) = run_workers(tmp_path, MEMORY, [mode, path, dtype])
    return r


def test_peak_host_memory_stays_near_the_placed_params(tmp_path):
    """Loading a ~170 MB bfloat16 checkpoint (5 shards) onto a 1x8 tensor mesh peaks at most at the resident params
    plus 1.5x the largest tensor in float32 (the whole-array path: ~2x the model in float32)."""
    path = str(tmp_path / "ckpt")
    write_llama(path, vocab=16000, hidden=1024, inter=2816, layers=4, heads=16, kv_heads=16, dtype="bfloat16",
                shards=5)  # fmt: skip
    largest = largest_tensor_f32(path)
    r = measure_load(tmp_path, path)
    peak, after = r["peak"] - r["base"], r["after"] - r["base"]
    assert after >= 0.9 * r["param_bytes"]  # the params really are resident (the measurement sees them)
    slack = 16 << 20
    assert peak <= after + 1.5 * largest + slack, (peak >> 20, after >> 20, largest >> 20)


PROCESSES = textwrap.dedent(
    """
    import json, sys
    nproc, pid, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)
    import numpy as np
    from medusa_jax import checkpoint, shard_load
    from medusa_jax.sharding import make_mesh, param_shardings
    reads = []
    real = shard_load.read_slices

    def counting(t, indices):
        reads.extend((t.name, ix) for ix in indices)
        return real(t, indices)

    shard_load.read_slices = counting
    shard_load.HFSource.read = staticmethod(counting)
    mesh = make_mesh(1, 2, 4)
    shardings = lambda tree, cfg: param_shardings(tree, mesh)
    cfg, params = shard_load.read_backbone_sharded(path, "float32", shardings)
    _, old = checkpoint.read_backbone(path)
    hf = {("embed", "embedding"): "model.embed_tokens.weight", ("lm_head", "kernel"): "lm_head.weight",
          ("norm", "scale"): "model.norm.weight"}
    want = set()
    for k, a in checkpoint._flatten(params):
        ref = dict(checkpoint._flatten(old))[k]
        for s in a.addressable_shards:  # this process's shards hold the right values
            assert np.array_equal(np.asarray(s.data), ref[s.index]), k
        for ix in a.sharding.addressable_devices_indices_map(a.shape).values():
            ix = shard_load.normalize(ix, a.shape)
            if k[0] != "layers":
                want.add((hf[k], ix))
                continue
            for layer in range(*ix[0]):
                want.add((f"{layer}:{k}", ix[1:]))

    names = {}  # HF tensor name -> "layer:params path"
    compiled = checkpoint.compile_table(checkpoint.HF_TABLE)
    for name, _ in reads:
        key, layer, _ = checkpoint.match(compiled, name)
        names[name] = name if layer is None else f"{layer}:{key}"
    got = [(names[n], ix) for n, ix in reads]
    assert len(got) == len(set(got)), "a slice was read twice"
    assert set(got) == want, (sorted(set(got) ^ want)[:5])
    print(json.dumps({"reads": len(got), "devices": jax.device_count(), "local": jax.local_device_count(),
                      "indices": sorted(str(ix) for _, ix in got)}))
    """
)


def test_each_process_reads_only_its_devices_slices(tmp_path):
    """Two processes (4 CPU devices each) on a 2x4 (fsdp x tensor) mesh: each reads exactly the slices of its own
    devices, each once, and its shards equal the whole-array path's."""
    import pytest

    if sys.platform != "linux":
        pytest.skip("gloo CPU collectives")
    path = str(tmp_path / "ckpt")
    write_llama(path, vocab=64, hidden=32, inter=48, layers=2, heads=4, kv_heads=4)
    r0, r1 = run_workers(tmp_path, PROCESSES, [path], nproc=2, devices=4)
    assert r0["devices"] == r1["devices"] == 8 and r0["local"] == 4
    assert r0["reads"] > 20 and r1["reads"] > 20
    assert r0["indices"] != r1["indices"]  # different slices
