"""Compile sharded Medusa decoding for a TPU slice on this host, and report what it needs per chip.

    python -m medusa_jax.aot --model meta-llama/Meta-Llama-3-8B-Instruct --heads 4 --tree mc_sim_7b_63 \\
        --lookup 10 --batch 8 --context 4096 --mesh 1x8 --topology v5e-8 --json OUT.json

Needs libtpu (`pip install "jax[tpu]==<jax version>"`); nothing runs on a TPU: the TPU compiler compiles for the
slice's devices (`medusa_jax.topology`) from abstract inputs, so no weights are read or allocated. Per chip:
  - memory: the compiled prefill + decode loop (`generate_medusa`) at this batch and context: params, heads and the
    KV cache (from their shardings), temporaries (the compiler's, the cache included), the total against the chip's
    HBM, and the largest batch that fits (the total grows linearly with the batch: two compiles, then the predicted
    largest batch is compiled to check it). A configuration that does not fit still gets its report (`fits: false`,
    the compiler's figure).
  - traffic: the HBM bytes of one decode step at the prompt's live length (one iteration of the compiled loop,
    layer loops times their trip count, `medusa_jax.hbm_traffic`) against params + heads + the live part of the
    cache shard.
  - collectives: the all-reduces, all-gathers, ... of one step, with their bytes, and whether any gathers a weight.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medusa_jax import sharding as sh
from medusa_jax import topology
from medusa_jax.config import ModelConfig, check_numerics, known_config
from medusa_jax.hbm_traffic import Module
from medusa_jax.heads import HeadsConfig
from medusa_jax.medusa_decode import (
    DECODE_LOOP,
    MedusaLoop,
    Thresholds,
    generate_medusa,
    resolve_tree,
)
from medusa_jax.model import abstract_params
from medusa_jax.sampling import SamplingParams
from medusa_jax.tree import TreeBuffers

GIB = 1 << 30
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class AotError(ValueError):
    """Bad input for the compile report; the message says what was wrong and what to do."""


# ---------------------------------------------------------------------------------------------- inputs
def model_config(name: str) -> ModelConfig:
    """A known hub id or alias (no download), a directory with config.json, or another hub id (its config.json)."""
    cfg = known_config(name)
    if cfg is not None:
        return cfg
    from medusa_jax import checkpoint

    path = name
    if not os.path.isdir(name):
        try:
            path = checkpoint.resolve(name, patterns=["config.json"], what="the config of ")
        except checkpoint.CheckpointError as e:
            raise AotError(f"{e}; known without a download: {', '.join(sorted(_known_names()))}") from None
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise AotError(f"{path} has no config.json: pass a model directory, a hub id or one of {_known_names()}")
    try:
        with open(cfg_path) as f:
            return checkpoint.check_config(ModelConfig.from_hf(json.load(f)), cfg_path)
    except (ValueError, KeyError, TypeError) as e:
        raise AotError(f"{cfg_path}: unusable model settings ({e})") from None


def _known_names() -> list[str]:
    from medusa_jax.config import KNOWN_ALIASES, KNOWN_CONFIGS

    return sorted(KNOWN_CONFIGS) + sorted(KNOWN_ALIASES)


def abstract_heads(cfg: ModelConfig, hc: HeadsConfig, draft_vocab: int = 0) -> dict:
    """Medusa heads' params as ShapeDtypeStructs (the reference layout: each head its own vocabulary projection,
    unless `shared_lm_head`; root-token and sequential heads' extra kernels). draft_vocab: they draft from that
    many tokens (`heads.attach_draft_vocab`: the projections' columns for those tokens; 0: the full vocabulary)."""
    k, nl, e, v, dt = hc.num_heads, hc.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.jnp_param_dtype
    S = jax.ShapeDtypeStruct
    if hc.feature:  # a feature drafter: one decoder layer of the backbone's shapes and the fuse weights
        layer = jax.tree.map(lambda x: S(x.shape[1:], dt), abstract_params(cfg)["layers"])
        out = {"feature": {"fuse": {"kernel": S((2 * e, e), dt), "bias": S((e,), dt)}, "layer": layer}}
    else:
        out = {"blocks": {"kernel": S((k, nl, e, e), dt), "bias": S((k, nl, e), dt)}}
        if not hc.shared_lm_head:
            out["proj"] = {"kernel": S((k, e, v), dt)}
        if hc.root_token or hc.sequential:
            out["root"] = {"kernel": S((k, e, e), dt)}
        if hc.sequential:
            out["path"] = {"kernel": S((k, k - 1, e, e), dt)}
    if draft_vocab:
        own = "proj" in out  # heads with their own projections: one draft projection each
        out["draft"] = {
            "ids": S((draft_vocab,), jnp.int32),
            "kernel": S((k, e, draft_vocab) if own else (e, draft_vocab), dt),
        }
    return out


def with_shardings(tree, mesh: Mesh, cfg: ModelConfig):
    shardings = sh.param_shardings(tree, mesh, cfg.head_dim)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of an abstract array with a sharding."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def tree_shard_bytes(tree) -> int:
    return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def sds(shape, dtype, mesh: Mesh, spec=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec or PartitionSpec()))


@dataclasses.dataclass(frozen=True)
class Setup:
    """One configuration to compile."""

    cfg: ModelConfig
    heads: HeadsConfig | None
    tree: TreeBuffers
    batch: int
    context: int  # KV-cache slots
    prompt: int  # prefill length (bucketed)
    acceptance: str
    mesh: Mesh
    draft_vocab: int = 0  # the heads draft from this many tokens (0: the full vocabulary)

    @property
    def loop(self) -> MedusaLoop:
        max_new = max(16, self.context - self.prompt - self.tree.num_nodes - 1)
        return MedusaLoop(self.tree, max_new, self.context, self.acceptance, (2,), self.mesh)

    def replace(self, **kw) -> Setup:
        return dataclasses.replace(self, **kw)


def scalars(mesh: Mesh):
    sp = SamplingParams(*(sds((), d, mesh) for d in ("float32", "int32", "float32", "float32")), filtered=False)
    th = Thresholds(sds((), "float32", mesh), sds((), "float32", mesh))
    return sp, th


def abstract_model(s: Setup):
    params = with_shardings(abstract_params(s.cfg), s.mesh, s.cfg)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, s.cfg.jnp_param_dtype, sharding=x.sharding), params)
    heads = with_shardings(abstract_heads(s.cfg, s.heads, s.draft_vocab), s.mesh, s.cfg) if s.heads else None
    return params, heads


def lower_generate(s: Setup):
    """The whole generation (chunked prefill + the decode while_loop), lowered for the mesh's devices."""
    params, heads = abstract_model(s)
    sp, th = scalars(s.mesh)
    tokens = sds((s.batch, s.prompt), "int32", s.mesh)
    lengths = sds((s.batch,), "int32", s.mesh)
    key = sds((2,), "uint32", s.mesh)
    return generate_medusa.lower(s.cfg, s.loop, params, heads, tokens, lengths, sds((), "int32", s.mesh), sp, th, key)


# ---------------------------------------------------------------------------------------------- compiled facts
_TYPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}  # fmt: skip


def collectives(hlo_text: str) -> list[tuple[str, tuple[int, ...], int]]:
    """(op, result shape, result bytes) of each collective in an optimized HLO module (async `-start` halves
    counted once; for a tuple result, its largest array)."""
    out = []
    for line in hlo_text.splitlines():
        if "=" not in line:
            continue
        lhs, rhs = line.split("=", 1)
        m = re.match(r"\s*(\(?[^()]*?\)?|[^ ]+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", rhs)
        if not m:
            continue
        arrays = [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _TYPE.findall(m.group(1))]
        if not arrays:
            continue
        t, shape = max(arrays, key=lambda a: int(np.prod(a[1], dtype=np.int64)) * _BYTES[a[0]])
        out.append((m.group(2), shape, int(np.prod(shape, dtype=np.int64)) * _BYTES[t]))
    return out


def weight_shapes(params, heads) -> set[tuple[int, ...]]:
    """Shapes a gathered weight matrix would have: each whole, and one layer's (or one head's) slice of it (biases
    and norm scales are left out: a `[K, 1, E]` bias has the shape of the heads' gathered activations at batch 1)."""
    shapes = set()
    for path, x in jax.tree_util.tree_flatten_with_path((params, heads))[0]:
        if x.ndim >= 2 and str(getattr(path[-1], "key", "")) not in ("bias", "scale"):
            shapes.add(tuple(x.shape))
            if x.ndim >= 3:
                shapes.add(tuple(x.shape[1:]))
    return shapes


def resource_exhausted(e: Exception) -> dict | None:
    """The compiler's figures from an out-of-memory compile error, or None for other errors."""
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "exceeds" not in msg:
        return None
    nums = re.findall(r"([\d.]+)([KMGT])\b", msg)
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    vals = [float(n) * unit[u] for n, u in nums]
    first = next((line for line in msg.splitlines() if "exceed" in line), msg.splitlines()[0])
    return {"message": first.strip()[:400], "needed_bytes": vals[0] if vals else None}


def memory(s: Setup) -> dict:
    """Per-chip memory of the compiled generation at `s`: {params, heads, kv_cache, temp, total, fits, error}."""
    params, heads = abstract_model(s)
    kv_shape = (s.cfg.num_layers, s.batch, s.context, s.cfg.num_kv_heads, s.cfg.head_dim)
    kv = jax.ShapeDtypeStruct(kv_shape, s.cfg.jnp_dtype, sharding=sh.kv_cache_sharding(s.mesh, kv_shape))
    hbm = topology.chip_of(s.mesh.devices.flat[0]).hbm_bytes
    out = {"params_bytes": tree_shard_bytes(params), "heads_bytes": tree_shard_bytes(heads) if heads else 0,
           "kv_cache_bytes": 2 * shard_bytes(kv), "hbm_bytes": hbm}  # fmt: skip
    t0 = time.perf_counter()
    try:
        compiled = lower_generate(s).compile()
    except Exception as e:  # the compiler's out-of-memory verdict is a result, not a failure
        oom = resource_exhausted(e)
        if oom is None:
            raise
        needed = oom["needed_bytes"] or 0
        total = int(needed + out["params_bytes"] + out["heads_bytes"])
        return out | {"temp_bytes": int(needed), "per_chip_bytes": total, "fits": False, "compiler": oom["message"],
                      "compile_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return out | {"argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
                  "per_chip_bytes": int(total), "fits": bool(total <= hbm),
                  "compile_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


MAX_BATCH_CAP = 1024  # the search stops here: a larger batch is reported as this


def max_batch(s: Setup, first: dict) -> int:
    """The largest batch (a multiple of the data axis, at most `MAX_BATCH_CAP`) whose generation fits the chip:
    memory grows linearly with the batch, so two compiled points predict it; the prediction is compiled to check
    (and lowered until it fits)."""
    step = s.mesh.shape["data"]
    b1, m1 = s.batch, first["per_chip_bytes"]
    b2 = b1 * 2
    m2 = memory(s.replace(batch=b2))["per_chip_bytes"]
    slope = (m2 - m1) / (b2 - b1)
    cap = max(MAX_BATCH_CAP // step * step, b2)
    if slope <= 0:
        return cap
    guess = min(cap, int((first["hbm_bytes"] - (m1 - slope * b1)) // slope) // step * step)
    for _ in range(4):
        if guess < step:
            return 0
        if _fits(s.replace(batch=guess)):
            return guess
        guess = int(guess * 0.9) // step * step
    return guess


def _fits(s: Setup) -> bool:
    """Whether the generation at `s` compiles within the chip's HBM; a compiler failure at an extreme shape (the
    TPU compiler has crashed on batches of thousands of rows) counts as not fitting."""
    try:
        return memory(s)["fits"]
    except Exception:
        return False


def traffic(s: Setup) -> dict:
    """HBM bytes and collectives of one decode step per chip at live length `s.prompt` (the tree's entries on top):
    one iteration of the compiled generation's decode loop (`medusa_decode.DECODE_LOOP`), layer loops counted
    times their trip count, attention reading exactly the live blocks (`attention_blocks_unrolled`), estimated
    from the program's memory spaces (`medusa_jax.hbm_traffic`: XLA's cost analysis also counts what the TPU
    keeps on chip). Against params + heads + the part of the KV-cache shard the step must read: its live slots
    when attention is blockwise (`ModelConfig.attention_block_for`), every slot when it reads the cache in one
    pass."""
    n = s.cfg.num_layers
    block = s.cfg.attention_block_for(s.context)
    live = min(s.context, s.prompt + s.tree.num_nodes)
    measured = s.replace(cfg=s.cfg.replace(attention_blocks_unrolled=-(-live // block) if block else 0))
    mod = Module(lower_generate(measured).compile().as_text())
    body = mod.loop_named(DECODE_LOOP)
    by: collections.Counter = collections.Counter()
    bytes_step = float(mod.traffic(body, by))
    colls = [(c, times) for line, times, _ in mod.instructions(body) for c in collectives(line)]
    params, heads = abstract_model(s)
    kv_shape = (n, s.batch, s.context, s.cfg.num_kv_heads, s.cfg.head_dim)
    kv = jax.ShapeDtypeStruct(kv_shape, s.cfg.jnp_dtype, sharding=sh.kv_cache_sharding(s.mesh, kv_shape))
    live_kv = 2 * shard_bytes(kv) * live // s.context
    reference = tree_shard_bytes(params) + (tree_shard_bytes(heads) if heads else 0) + live_kv
    gathered = [shape for (op, shape, _), _ in colls if op == "all-gather" and shape in weight_shapes(params, heads)]
    per_step: dict[str, dict] = {}
    for (op, _, nbytes), times in colls:
        d = per_step.setdefault(op, {"count": 0.0, "bytes": 0.0})
        d["count"] += times
        d["bytes"] += nbytes * times
    return {"bytes_accessed_per_step": bytes_step, "reference_bytes": reference, "live_slots": live,
            "attention_block": block, "attention_kernel": s.cfg.attention_kernel_used if block else "xla", "live_kv_bytes": live_kv,
            "bytes_accessed_ratio": bytes_step / reference if reference else math.nan,
            "bytes_by_op": {k: float(v) for k, v in by.most_common(8)},
            "collectives_per_step": per_step, "weight_gathers": [list(g) for g in gathered]}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the report
def smallest_model_axis(s: Setup, chips_available: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> int | None:
    """The smallest MODEL above this mesh's (a 1xMODEL mesh) whose params, heads and two KV-cache shards (the compiled
    Medusa loop's temporaries: the cache and about as much again of activations) fit one chip, estimated from the
    shardings alone (no compile)."""
    hbm = topology.chip_of(s.mesh.devices.flat[0]).hbm_bytes
    for m in chips_available:
        if m <= s.mesh.shape["tensor"]:
            continue
        fake = _ShapeOnlyMesh({"data": 1, "fsdp": 1, "tensor": m})
        params = abstract_params(s.cfg)
        heads = abstract_heads(s.cfg, s.heads, s.draft_vocab) if s.heads else {}

        def per_chip(tree, fake=fake):
            total = 0
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
                spec = sh.spec_for(sh.logical_axes(sh.path_str(path), x.ndim), x.shape, fake, {"heads": s.cfg.head_dim})
                div = np.prod([fake.shape[a] for ax in spec if ax for a in (ax if isinstance(ax, tuple) else (ax,))])
                total += int(np.prod(x.shape, dtype=np.int64)) * s.cfg.jnp_param_dtype.itemsize // int(div)
            return total

        kv_shape = (s.cfg.num_layers, s.batch, s.context, s.cfg.num_kv_heads, s.cfg.head_dim)
        kv_spec = sh.spec_for(sh.KV_CACHE_AXES, kv_shape, fake)
        kv_div = m if kv_spec[3] else 1
        kv = 2 * int(np.prod(kv_shape, dtype=np.int64)) * s.cfg.jnp_dtype.itemsize // kv_div
        if per_chip(params) + per_chip(heads) + 2 * kv <= hbm:
            return m
    return None


@dataclasses.dataclass
class _ShapeOnlyMesh:
    shape: dict


def report(s: Setup, topology_name: str, with_max_batch: bool = True, with_traffic: bool = True) -> dict:
    chip = topology.chip_of(s.mesh.devices.flat[0])
    row = {"model_layers": s.cfg.num_layers, "hidden": s.cfg.hidden_size, "vocab": s.cfg.vocab_size,
           "heads": s.heads.num_heads if s.heads else 0, "feature_drafter": bool(s.heads and s.heads.feature), "draft_vocab": s.draft_vocab, "tree_nodes": s.tree.num_nodes, "lookup": s.tree.lookup,
           "batch": s.batch, "context": s.context, "mesh": f"{s.mesh.shape['data']}x{s.mesh.shape['tensor']}",
           "topology": topology_name, "chip": chip.name, "dtype": s.cfg.param_dtype, "activations": s.cfg.dtype,
           "acceptance": s.acceptance}  # fmt: skip
    row |= memory(s)
    if with_max_batch:
        row["max_batch"] = max_batch(s, row) if row["fits"] else _max_batch_down(s)
    if not row["fits"]:
        m = smallest_model_axis(s)
        row["suggested_mesh"] = None if m is None else f"1x{m}"
    if with_traffic:
        row |= traffic(s)
    return row


def _max_batch_down(s: Setup) -> int:
    """The largest power-of-two batch below `s.batch` that fits (0: none)."""
    b = s.batch // 2
    while b >= s.mesh.shape["data"]:
        if _fits(s.replace(batch=b)):
            return b
        b //= 2
    return 0


def describe(row: dict) -> str:
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    drafter = "a feature drafter" if row.get("feature_drafter") else f"{row['heads']} heads"
    if row.get("draft_vocab"):
        drafter += f" (draft vocabulary: {row['draft_vocab']} tokens)"
    lines = [
        f"{drafter}, {row['tree_nodes']}-node tree (lookup {row['lookup']}), batch {row['batch']} x "
        f"{row['context']} tokens, {row['dtype']} weights / {row['activations']} activations, mesh {row['mesh']} on "
        f"{row['topology']} ({row['chip']}):",
        f"  per chip: params {g(row['params_bytes'])}, heads {g(row['heads_bytes'])}, KV cache "
        f"{g(row['kv_cache_bytes'])}, temporaries {g(row['temp_bytes'])} (cache included) -> "
        f"{g(row['per_chip_bytes'])} of {g(row['hbm_bytes'])} HBM: {'fits' if row['fits'] else 'DOES NOT FIT'}",
    ]
    if not row["fits"]:
        if row.get("compiler"):
            lines.append(f"  compiler: {row['compiler']}")
        if row.get("suggested_mesh"):
            lines.append(f"  estimated to fit a {row['suggested_mesh']} mesh ({row['chip']}-{row['suggested_mesh'][2:]}"
                         " chips); compile that mesh to check")  # fmt: skip
    if "max_batch" in row:
        lines.append(f"  largest batch that fits: {row['max_batch']}")
    if "bytes_accessed_per_step" in row:
        lines.append(
            f"  one decode step at {row['live_slots']} live slots moves {g(row['bytes_accessed_per_step'])} to or from "
            f"HBM = {row['bytes_accessed_ratio']:.2f} x (params + heads + the live KV-cache shard = "
            f"{g(row['reference_bytes'])}; attention "
            + (f"in blocks of {row['attention_block']} slots" if row["attention_block"] else "over every slot")
            + f", {row['attention_kernel']})"
        )
        colls = ", ".join(f"{v['count']:.0f} {op} ({v['bytes'] / 2**20:.1f} MiB)"
                          for op, v in row["collectives_per_step"].items())  # fmt: skip
        lines.append(f"  collectives per step: {colls or 'none'}")
        lines.append(f"  weight gathers: {row['weight_gathers'] or 'none'}")
    return "\n".join(lines)


def build_setup(args) -> Setup:
    check_numerics(args.dtype, args.activations)
    cfg = model_config(args.model).for_inference(args.dtype, args.activations)
    cfg = cfg.replace(
        row_writes="scatter", attention_block=args.attention_block, attention_kernel=args.attention_kernel
    )
    topo_name, chips, _ = topology.resolve(args.topology)
    data, model = sh.parse_mesh(args.mesh)
    if data * model != chips:
        raise AotError(f"--mesh {args.mesh} has {data * model} devices but {args.topology} has {chips} chips")
    devices = topology.devices(args.topology)
    mesh = sh.make_mesh(data, 1, model, list(devices))
    hc = HeadsConfig(args.heads, 1, args.shared_lm_head, args.root_token or args.sequential, args.sequential,
                     args.feature)  # fmt: skip
    hc = hc if args.heads else None
    tree = resolve_tree(args.tree if args.heads else [], args.heads or 1, 10, args.lookup if args.heads else 0)
    if args.batch < 1 or args.context < 64:
        raise AotError("--batch must be >= 1 and --context >= 64")
    prompt = args.prompt or args.context // 2
    if prompt + tree.num_nodes + 17 > args.context:
        raise AotError(f"--prompt {prompt} leaves no room for output in --context {args.context}")
    if args.draft_vocab and not (args.heads and 0 < args.draft_vocab <= cfg.vocab_size):
        raise AotError(f"--draft-vocab {args.draft_vocab}: give 1..{cfg.vocab_size} tokens, with --heads")
    return Setup(cfg, hc, tree, args.batch, args.context, prompt, args.acceptance, mesh, args.draft_vocab)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="hub id, alias (vicuna-7b, llama-3-8b, llama-3-70b) or directory")
    ap.add_argument("--heads", type=int, default=4, help="Medusa heads (0: plain decoding)")
    ap.add_argument("--shared-lm-head", action="store_true", help="heads share the base lm_head (no own projection)")
    ap.add_argument("--root-token", action="store_true", help="root-token heads (each also sees the step's root)")
    ap.add_argument("--sequential", action="store_true", help="sequential heads (each sees its path's drafted tokens)")
    ap.add_argument("--feature", action="store_true", help="a feature drafter (one decoder layer) instead of heads")
    ap.add_argument("--draft-vocab", type=int, default=0, help="draft from this many tokens (0: the full vocabulary)")
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--lookup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096, help="KV-cache slots")
    ap.add_argument(
        "--prompt",
        type=int,
        default=0,
        help="prefill length, and the live length of the measured step (default: half the context)",
    )
    ap.add_argument(
        "--attention-block",
        type=int,
        default=-1,
        help="cache slots per attention block (0: every slot in one pass; default: 512, as on a TPU)",
    )
    ap.add_argument(
        "--attention-kernel",
        default="pallas",
        choices=["pallas", "xla"],
        help="attention over the cache: the Pallas kernel (default, as on a TPU) or XLA's ops",
    )
    ap.add_argument("--mesh", default="1x1", help="DATAxMODEL")
    ap.add_argument("--topology", default="v5e-1", help="v5e-1, v5e-8, v5p-8, v6e-8, v5e-256, or v5e:2x4")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--activations", default=None, help="float32 (default) or bfloat16")
    ap.add_argument("--acceptance", default="greedy", choices=["greedy", "typical", "rejection"])
    ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search (two more compiles)")
    ap.add_argument("--no-traffic", action="store_true", help="skip bytes and collectives per step")
    ap.add_argument("--json", default=None, help="write the report here (JSON)")
    args = ap.parse_args(argv)
    try:
        setup = build_setup(args)
    except (AotError, topology.TopologyError, ValueError) as e:
        print(f"aot: error: {e}", file=sys.stderr)
        return 2
    row = report(setup, args.topology, not args.no_max_batch, not args.no_traffic)
    print(describe(row))
    if args.json:
        from medusa_jax.cache import atomic_write_text

        atomic_write_text(args.json, json.dumps(row, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
