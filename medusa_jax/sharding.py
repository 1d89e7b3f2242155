"""Sharding: ONE table maps parameter paths to logical axes, ONE table maps logical axes to mesh axes.

Training and inference share both tables. The mesh has axes (data, fsdp, tensor). Batches are split over
(data, fsdp); parameters are split over fsdp along their "embed" dimension and over tensor along heads / mlp / vocab
(Megatron-style: column-parallel q/k/v, gate/up and the vocabulary, row-parallel o and down, so a layer costs two
all-reduces of its activations and no weight ever moves). The KV cache `[N, B, S, K, D]` is split over batch rows
(data) and kv heads (tensor). A dimension that does not divide by its mesh axes is replicated instead; attention
projections divide by whole heads (`units`), so a model whose head count does not divide the tensor axis (SmolLM2's
9 query and 3 kv heads on 8 devices) keeps its attention replicated and splits the MLP and vocabulary.

Inference meshes are written DATAxMODEL (`"1x8"`): data = DATA, fsdp = 1, tensor = MODEL. The same code runs on
one device, on simulated CPU devices, on TPU slices and GPU hosts, and (through `jax.make_array_from_callback`) on
many hosts.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",  # attention projections' fused (heads * head_dim) dimension
    "kv_heads": "tensor",  # the KV cache's kv-head dimension
    "head_dim": None,
    "vocab": "tensor",
    "layers": None,
    "medusa": None,  # the stacked Medusa heads
    "medusa_layers": None,
    "medusa_path": None,  # sequential heads: the path depth
    "embed_out": "tensor",  # second hidden dimension of a Medusa ResBlock
    "lora_rank": None,
    "norm": None,
}

# (regex on the "/"-joined param path, logical axes). First match with the leaf's number of dimensions wins. LoRA
# factors are named `<module>/lora_a` `[N, in, r]` and `<module>/lora_b` `[N, r, out]`.
PARAM_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"feature/.*kernel$", ("norm", "norm")),  # a feature drafter's one layer: small, replicated
    (r"feature/.*(bias|scale)$", ("norm",)),
    (r"embed/embedding$", ("vocab", "embed")),
    (r"attn/(q|k|v)_proj/kernel$", ("layers", "embed", "heads")),
    (r"attn/(q|k|v)_proj/bias$", ("layers", "heads")),
    (r"attn/o_proj/kernel$", ("layers", "heads", "embed")),
    (r"attn/o_proj/bias$", ("layers", "norm")),
    (r"mlp/(gate|up)_proj/kernel$", ("layers", "embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"layers/.*norm/scale$", ("layers", "norm")),
    (r"^(backbone/)?norm/scale$", ("norm",)),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"(q|k|v|gate|up)_proj/lora_a$", ("layers", "embed", "lora_rank")),
    (r"(q|k|v)_proj/lora_b$", ("layers", "lora_rank", "heads")),
    (r"o_proj/lora_a$", ("layers", "heads", "lora_rank")),
    (r"o_proj/lora_b$", ("layers", "lora_rank", "embed")),
    (r"(gate|up)_proj/lora_b$", ("layers", "lora_rank", "mlp")),
    (r"down_proj/lora_a$", ("layers", "mlp", "lora_rank")),
    (r"down_proj/lora_b$", ("layers", "lora_rank", "embed")),
    (r"blocks/kernel$", ("medusa", "medusa_layers", "embed", "embed_out")),
    (r"blocks/bias$", ("medusa", "medusa_layers", "embed_out")),
    (r"proj/kernel$", ("medusa", "embed", "vocab")),
    (r"root/kernel$", ("medusa", "embed", "embed_out")),
    (r"path/kernel$", ("medusa", "medusa_path", "embed", "embed_out")),
    (r"draft/kernel$", ("medusa", "embed", "vocab")),  # the heads' own projections onto a draft vocabulary
    (r"draft/kernel$", ("embed", "vocab")),  # shared lm_head heads: one projection
    (r"draft/ids$", ("norm",)),
]

KV_CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")  # `KVCache.k` / `.v` `[N, B, S, K, D]`


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    n = data * fsdp * tensor
    if n > len(devices):
        raise ValueError(f"mesh {data}x{fsdp}x{tensor} needs {n} devices, only {len(devices)} available")
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp, tensor), MESH_AXES)


def parse_mesh(spec) -> tuple[int, int]:
    """`"DATAxMODEL"` (e.g. `"1x8"`) or a `(data, model)` pair -> (data, model); ValueError saying what is wrong."""
    if isinstance(spec, str):
        parts = spec.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"mesh must be DATAxMODEL with two positive integers (e.g. 1x8), got {spec!r}")
        spec = tuple(int(p) for p in parts)
    if len(spec) != 2 or not all(isinstance(n, int | np.integer) and n > 0 for n in spec):
        raise ValueError(f"mesh must be (data, model) with two positive integers, got {spec!r}")
    return int(spec[0]), int(spec[1])


def inference_mesh(spec, devices=None) -> Mesh:
    """A decoding mesh: a `Mesh` as is (it must have the axes `MESH_AXES`), or `"DATAxMODEL"` / `(data, model)` ->
    data = DATA, fsdp = 1, tensor = MODEL over the first DATA * MODEL devices."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != MESH_AXES:
            raise ValueError(f"a decoding mesh needs the axes {MESH_AXES}, got {tuple(spec.axis_names)}")
        return spec
    data, model = parse_mesh(spec)
    devices = jax.devices() if devices is None else devices
    if data * model > len(devices):
        raise ValueError(
            f"mesh {data}x{model} needs {data * model} devices, but {len(devices)} are available: use a smaller mesh"
        )
    return make_mesh(data, 1, model, devices)


def path_str(path) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    return "/".join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    matched = None
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path):
            if len(axes) == ndim:
                return axes
            matched = (pattern, axes)
    if matched:
        raise ValueError(f"sharding rule {matched[0]!r} gives {len(matched[1])} axes for {path} with {ndim} dims")
    raise ValueError(f"no sharding rule for parameter {path!r}: add one to PARAM_RULES")


def spec_for(axes, shape, mesh: Mesh, units: dict[str, int] | None = None) -> PartitionSpec:
    """Logical axes -> PartitionSpec; mesh axes already used, or not dividing the dimension, are dropped. units:
    a logical axis' indivisible unit (e.g. {"heads": head_dim}: split whole heads only)."""
    used, out = set(), []
    for ax, dim in zip(axes, shape):
        rule = LOGICAL_RULES.get(ax) if ax is not None else None
        names = (rule,) if isinstance(rule, str) else tuple(rule or ())
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        unit = (units or {}).get(ax, 1)
        if not names or dim % unit or (dim // unit) % size:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def param_shardings(tree, mesh: Mesh, head_dim: int | None = None):
    """NamedShardings for a params pytree (arrays or ShapeDtypeStructs). head_dim: split attention projections by
    whole heads only (inference; a head count that does not divide the tensor axis is replicated)."""
    units = {"heads": head_dim} if head_dim else None

    def one(path, x):
        return NamedSharding(mesh, spec_for(logical_axes(path_str(path), x.ndim), x.shape, mesh, units))

    return jax.tree_util.tree_map_with_path(one, tree)


def kv_cache_sharding(mesh: Mesh, shape) -> NamedSharding:
    """The sharding of one KV-cache array `[N, B, S, K, D]`: rows over data, kv heads over tensor (when they divide)."""
    return NamedSharding(mesh, spec_for(KV_CACHE_AXES, shape, mesh))


def rows_sharding(mesh: Mesh, shape) -> NamedSharding:
    """Per-row decode state `[B, ...]`: rows over (data, fsdp) when they divide, the rest replicated."""
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(state, params_sh, mesh: Mesh):
    """Shardings of an optimizer state: a leaf whose path ends with a parameter's path gets its sharding."""
    flat = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_sh)[0]}

    def one(path, x):
        ps = path_str(path)
        for name, s in flat.items():
            if ps.endswith(name) and len(s.spec) <= x.ndim and x.ndim > 0:
                return s
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, state)


def shard_global(tree, shardings):
    """Host arrays that are identical on every process -> global jax arrays with the given shardings (each process
    places only its own devices' slices)."""

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def to_host(x) -> np.ndarray:
    """A global array -> numpy on this process: directly when this process holds all of it, else from one of its
    shards when the array is replicated (decode outputs), else gathered across processes."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def process_rows(global_rows: int) -> slice:
    """The rows of a global batch this process reads (its own shard)."""
    n, i = jax.process_count(), jax.process_index()
    if global_rows % n:
        raise ValueError(f"global batch {global_rows} does not divide over {n} processes")
    per = global_rows // n
    return slice(i * per, (i + 1) * per)


def batch_from_local(local: dict, mesh: Mesh) -> dict:
    """This process's rows of a batch -> global arrays split over (data, fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local.items()
    }


def gather_to_host(tree):
    """Global (possibly multi-process sharded) arrays -> numpy on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
