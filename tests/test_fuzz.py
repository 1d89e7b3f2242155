"""Corrupt and hostile files: seeded mutations (truncation, flipped bytes, rewritten headers and fields) of every
file the package reads. Each case must load or fail with a one-line ValueError/CheckpointError, within a time
limit and without a large allocation (a header claiming a 1 TB tensor is refused before anything is allocated);
the CLIs turn the same errors into exit status 2 without a traceback."""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

from medusa_jax.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
E, V, FF, H, KV, D = 16, 32, 32, 2, 1, 8  # a one-layer Llama
CASES_PER_KIND = 40
TIME_LIMIT_S = 5.0
MAX_RSS_GROWTH_MB = 400

BACKBONE = {
    "model.embed_tokens.weight": (V, E),
    "model.norm.weight": (E,),
    "model.layers.0.self_attn.q_proj.weight": (H * D, E),
    "model.layers.0.self_attn.k_proj.weight": (KV * D, E),
    "model.layers.0.self_attn.v_proj.weight": (KV * D, E),
    "model.layers.0.self_attn.o_proj.weight": (E, H * D),
    "model.layers.0.mlp.gate_proj.weight": (FF, E),
    "model.layers.0.mlp.up_proj.weight": (FF, E),
    "model.layers.0.mlp.down_proj.weight": (E, FF),
    "model.layers.0.input_layernorm.weight": (E,),
    "model.layers.0.post_attention_layernorm.weight": (E,),
}
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
    "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
    "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
    "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
    "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
    "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
}
HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": V,
    "hidden_size": E,
    "intermediate_size": FF,
    "num_hidden_layers": 1,
    "num_attention_heads": H,
    "num_key_value_heads": KV,
    "head_dim": D,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def tensors(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in BACKBONE.items()}


# ------------------------------------------------------------------------------------- valid files of every kind
def write_hf_dir(path: Path) -> Path:
    from safetensors.numpy import save_file

    path.mkdir()
    save_file(tensors(), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    return path


def write_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(E)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D)
    w.add_vocab_size(V)
    for name, arr in tensors().items():
        w.add_tensor(GGUF_NAMES[name], arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_heads_dir(path: Path) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    path.mkdir()
    heads = {}
    for k in range(2):
        heads[f"{k}.0.linear.weight"] = rng.normal(0, 0.1, (E, E)).astype(np.float32)
        heads[f"{k}.0.linear.bias"] = rng.normal(0, 0.1, (E,)).astype(np.float32)
        heads[f"{k}.1.weight"] = rng.normal(0, 0.1, (V, E)).astype(np.float32)
    save_file(heads, str(path / "medusa_lm_head.safetensors"))
    cfg = {"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "tiny", "version": "1"}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "draft_vocab.json").write_text(json.dumps({"size": 4, "ids": [1, 2, 3, 5], "coverage": 0.5}))
    return path


def write_calibration(path: Path) -> Path:
    from medusa_jax.calibrate import calibration_path

    path.mkdir()
    cal = {"by_batch": {"1": {"tree": [[0], [1], [0, 0]], "lookup": 2}, "8": {"tree": [], "lookup": 0}}}
    Path(calibration_path(str(path), "float32")).write_text(json.dumps(cal))
    return path


def write_shards(path: Path) -> Path:
    path.mkdir()
    for s in range(2):
        rows = [{"input_ids": [1, 2, 3, 4 + r], "loss_mask": [0, 0, 1, 1]} for r in range(3)]
        (path / f"shard_{s:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ORBAX_CASES = 16


def write_run_dir(path: Path) -> Path:
    """A training run dir as the trainer leaves it (config.yaml, an orbax checkpoint of the heads at step 2)."""
    import orbax.checkpoint as ocp

    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.model import init_params
    from medusa_jax.run_io import TINY
    from medusa_jax.train.config import dump, load_config

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [f"run_dir={path}", "train.mode=medusa1"])
    path.mkdir()
    (path / "config.yaml").write_text(dump(cfg))
    hc = HeadsConfig(cfg.heads.num_heads, cfg.heads.num_layers, False)
    heads = init_heads(hc, init_params(TINY), seed=1, scale=0.1)
    with ocp.CheckpointManager(str(path / "checkpoints")) as mngr:
        mngr.save(2, args=ocp.args.Composite(trainable=ocp.args.StandardSave({"heads": heads})))
        mngr.wait_until_finished()
    return path


# ------------------------------------------------------------------------------------- loaders (all consumers)
def load_run_dir(p):
    from medusa_jax.train.run_dir import load_run

    return load_run(str(p), tokenizer=False)


def load_hf(p):
    from medusa_jax.checkpoint import load_hf_dir

    return load_hf_dir(str(p))


def load_gguf_file(p):
    from medusa_jax.checkpoint import load_gguf

    return load_gguf(str(p))


def load_sharded(p):
    from medusa_jax.shard_load import read_backbone_sharded

    return read_backbone_sharded(str(p), "bfloat16")


def load_heads_dir(p):
    from medusa_jax.heads_io import read_heads

    return read_heads(str(p))


def load_draft(p):
    from medusa_jax import draft_vocab

    return draft_vocab.read(str(p))


def load_calibration(p):
    from medusa_jax.calibrate import lookup_for_batch, read_calibration, tree_for_batch
    from medusa_jax.tree import build_buffers

    cal = read_calibration(str(p), "float32")
    if cal is not None:
        for b in (1, 4, 64):
            build_buffers(tree_for_batch(cal, b), topk=10, lookup=lookup_for_batch(cal, b))
    return cal


def load_shards(p):
    from medusa_jax.train.data import pack
    from medusa_jax.train.distill import load_rows

    return pack(load_rows(str(p)), 8)


# ------------------------------------------------------------------------------------- mutations
HOSTILE = [None, -1, 0, 1 << 40, -(1 << 62), 1e308, float("nan"), "x", "", [], {}, [1, "a"], [[[[]]]], True, 2.5]


def mutate_bytes(data: bytes, rng: random.Random, header: int) -> bytes:
    """Truncate, or flip bytes (mostly in the first `header` bytes)."""
    if rng.random() < 0.35:
        return data[: rng.randrange(0, len(data))]
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(0, min(header, len(b))) if rng.random() < 0.7 else rng.randrange(0, len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def mutate_json(obj, rng: random.Random):
    """Replace, delete or add one field at a random depth with a hostile value."""
    obj = copy.deepcopy(obj)
    if not isinstance(obj, dict | list) or rng.random() < 0.05:
        return rng.choice(HOSTILE)
    node = obj
    while True:
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = rng.choice(keys)
        if isinstance(node[key], dict | list) and node[key] and rng.random() < 0.6:
            node = node[key]
            continue
        op = rng.random()
        if op < 0.2 and isinstance(node, dict):
            del node[key]
        elif op < 0.3 and isinstance(node, list):
            node.append(rng.choice(HOSTILE))
        else:
            node[key] = rng.choice(HOSTILE)
        break
    return obj


def rewrite_safetensors_header(data: bytes, rng: random.Random) -> bytes:
    """A header whose tensors claim other shapes, dtypes, offsets (up to a 1 TB tensor), or a bogus header length."""
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    name = rng.choice([k for k in header if k != "__metadata__"])
    op = rng.randrange(5)
    if op == 0:  # 1 TB
        header[name]["shape"] = [1 << 20, 1 << 18]
        header[name]["data_offsets"] = [0, 1 << 40]
    elif op == 1:
        header[name]["shape"] = [rng.choice([0, 3, 7, 1 << 31])] + header[name]["shape"][1:]
    elif op == 2:
        header[name]["dtype"] = rng.choice(["F16", "BF16", "I64", "U8", "F8_E4M3", "XX"])
    elif op == 3:
        a, b = header[name]["data_offsets"]
        header[name]["data_offsets"] = [b, a] if rng.random() < 0.5 else [a, a + 4 * (1 << 40)]
    else:
        text = json.dumps(header).encode()
        return struct.pack("<Q", rng.choice([0, len(text) + 9, 1 << 50])) + text + body
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def rewrite_gguf_header(data: bytes, rng: random.Random) -> bytes:
    """Counts (tensors, key/values) or one tensor's dims/type/offset rewritten, up to a 1 TB tensor."""
    b = bytearray(data)
    op = rng.randrange(4)
    if op == 0:
        struct.pack_into("<Q", b, rng.choice([8, 16]), rng.choice([0, 1000, 1 << 40]))
        return bytes(b)
    name = rng.choice(list(GGUF_NAMES.values())).encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", b, at)[0]
    if op == 1:  # the dims: 1 TB, zero, or odd
        dims = rng.choice([[1 << 20, 1 << 18], [0, 4], [3, 5]])
        for i in range(n_dims):
            struct.pack_into("<Q", b, at + 4 + 8 * i, dims[i % 2])
    elif op == 2:  # the ggml type
        struct.pack_into("<I", b, at + 4 + 8 * n_dims, rng.choice([1, 2, 8, 12, 30, 99, 1 << 30]))
    else:  # the data offset
        struct.pack_into("<Q", b, at + 8 + 8 * n_dims, rng.choice([1 << 40, 32, 3]))
    return bytes(b)


def mutate_shard_text(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    lines[i] = json.dumps(mutate_json(json.loads(lines[i]), rng))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- the cases
def kinds(tmp: Path):
    """name -> (valid file maker, the file to mutate inside what it makes (None: itself), loader, header rewriter)."""
    return {
        "safetensors": (write_hf_dir, "model.safetensors", load_hf, rewrite_safetensors_header),
        "hf-config": (write_hf_dir, "config.json", load_hf, None),
        "gguf": (write_gguf, None, load_gguf_file, rewrite_gguf_header),
        "safetensors-sharded": (write_hf_dir, "model.safetensors", load_sharded, rewrite_safetensors_header),
        "gguf-sharded": (write_gguf, None, load_sharded, rewrite_gguf_header),
        "heads-safetensors": (
            write_heads_dir,
            "medusa_lm_head.safetensors",
            load_heads_dir,
            rewrite_safetensors_header,
        ),  # fmt: skip
        "heads-config": (write_heads_dir, "config.json", load_heads_dir, None),
        "draft-vocab": (write_heads_dir, "draft_vocab.json", load_draft, None),
        "calibration": (write_calibration, "calibration_cpu_float32.json", load_calibration, None),
        "shards": (write_shards, "shard_00001.jsonl", load_shards, None),
    }


class Timeout(Exception):
    pass


def _alarm(*_):
    raise Timeout(f"over {TIME_LIMIT_S} s")


def run_case(loader, path) -> str | None:
    """None when the case loads or fails cleanly, else what went wrong."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    try:
        loader(path)
        return None
    except ValueError as e:  # CheckpointError is one
        msg = str(e)
        if not msg or "\n" in msg.strip():
            return f"{type(e).__name__} with a message that is not one line: {msg!r}"
        return None
    except BaseException:  # noqa: BLE001 - a crash of any kind is the finding
        tb = traceback.format_exc(limit=-2).strip().splitlines()
        return " | ".join(tb[-4:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_fuzz_loaders(tmp_path, monkeypatch):
    from medusa_jax.calibrate import calibration_path

    monkeypatch.setenv("MEDUSA_JAX_CACHE", str(tmp_path / "cache"))  # the sharded GGUF reader fills the params cache
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    failures, count = [], 0
    for k, (name, (make, inner, loader, rewrite)) in enumerate(kinds(tmp_path).items()):
        valid = make(tmp_path / (f"{name}-valid" if not name.startswith("gguf") else f"{name}-valid.gguf"))
        if name == "calibration":
            inner = os.path.basename(calibration_path(str(valid), "float32"))
        assert run_case(loader, valid) is None, f"{name}: the valid file does not load"
        target = valid / inner if inner else valid
        data = target.read_bytes()
        rng = random.Random(1000 + k)
        for c in range(CASES_PER_KIND):
            case = tmp_path / f"{name}-{c}"
            if valid.is_dir():
                shutil.copytree(valid, case)
                dst = case / inner
            else:
                case = case.with_suffix(".gguf")
                dst = case
            op = rng.random()
            if name == "shards" and op < 0.5:
                new = mutate_shard_text(data.decode(), rng).encode()
            elif target.suffix == ".json" and op < 0.6:
                new = json.dumps(mutate_json(json.loads(data), rng)).encode()
            elif rewrite is not None and op < 0.5:
                new = rewrite(data, rng)
            else:
                new = mutate_bytes(data, rng, header=min(len(data), 600))
            dst.write_bytes(new)
            count += 1
            why = run_case(loader, case)
            if why:
                failures.append(f"{name} case {c}: {why}")
    # orbax: flipped bytes in, truncation of, or deletion of one file of the checkpoint
    valid = write_run_dir(tmp_path / "run-valid")
    assert run_case(load_run_dir, valid) is None, "orbax: the valid run dir does not load"
    files = sorted(p.relative_to(valid) for p in (valid / "checkpoints").rglob("*") if p.is_file())
    rng = random.Random(7)
    for c in range(ORBAX_CASES):
        case = tmp_path / f"run-{c}"
        shutil.copytree(valid, case)
        dst = case / rng.choice(files)
        if rng.random() < 0.15:
            dst.unlink()
        else:
            dst.write_bytes(mutate_bytes(dst.read_bytes(), rng, header=200))
        count += 1
        why = run_case(load_run_dir, case)
        if why:
            failures.append(f"orbax {dst.relative_to(case)} case {c}: {why}")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert count >= 200
    assert not failures, f"{len(failures)} of {count} cases crashed:\n" + "\n".join(failures[:20])
    assert grown < MAX_RSS_GROWTH_MB, f"peak memory grew by {grown:.0f} MB"


def test_terabyte_headers_are_refused_before_allocating(tmp_path):
    valid = write_hf_dir(tmp_path / "hf")
    data = (valid / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["model.embed_tokens.weight"].update(shape=[1 << 20, 1 << 18], data_offsets=[0, 1 << 40])
    text = json.dumps(header).encode()
    (valid / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(valid)
    g = write_gguf(tmp_path / "m.gguf")
    b = bytearray(g.read_bytes())
    name = b"token_embd.weight"
    at = bytes(b).index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    struct.pack_into("<QQ", b, at + 4, 1 << 20, 1 << 18)
    g.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="m.gguf"):
        load_gguf_file(g)


def _cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("what", ["gguf", "safetensors"])
def test_cli_exits_2_without_a_traceback(tmp_path, what):
    """decode.py on a GGUF whose header claims a 1 TB tensor, and on a model dir with a rewritten safetensors
    header: exit status 2, one message, no traceback."""
    if what == "gguf":
        ckpt = write_gguf(tmp_path / "m.gguf")
        b = bytearray(ckpt.read_bytes())
        name = b"token_embd.weight"
        at = bytes(b).index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
        struct.pack_into("<QQ", b, at + 4, 1 << 20, 1 << 18)
        ckpt.write_bytes(bytes(b))
    else:
        ckpt = write_hf_dir(tmp_path / "hf")
        f = ckpt / "model.safetensors"
        f.write_bytes(rewrite_safetensors_header(f.read_bytes(), random.Random(3)))
    r = _cli([str(REPO / "decode.py"), "--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    said = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("decode.py: loading ")]  # progress
    assert "Traceback" not in r.stderr and len(said) == 1, r.stderr[-2000:]


@pytest.mark.parametrize(
    "change,needle",
    [({"hidden_size": 24}, "shape"), ({"intermediate_size": 0}, "positive"), ({"num_key_value_heads": 3}, "multiple"),
     ({"vocab_size": "32"}, "positive"), ({"num_attention_heads": None}, "num_heads must be")],
)  # fmt: skip
def test_settings_that_do_not_fit_the_weights(tmp_path, change, needle):
    """Well-formed JSON whose settings are unusable or disagree with the tensors: refused at load, not at the first
    forward pass."""
    d = write_hf_dir(tmp_path / "hf")
    (d / "config.json").write_text(json.dumps({**HF_CONFIG, **change}))
    with pytest.raises(CheckpointError, match=needle):
        load_hf(d)
