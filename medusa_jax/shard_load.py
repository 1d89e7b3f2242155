"""Reading a backbone checkpoint straight into device arrays, one device slice at a time.

`read_backbone_sharded` first builds the abstract params (shapes from the checkpoint's headers, checked with
`checkpoint`'s error messages) and their target shardings, then makes each param with
`jax.make_array_from_callback`. The slice a device holds is read from the file: memory-mapped safetensors slices,
layer by layer for the stacked `[N, ...]` params, HF `[out, in]` weights read as the transposed slice, each cast to the
param dtype as it is read. GGUF tensors are dequantized one at a time (llama.cpp's q/k permutation needs a whole
tensor) and written into the converted-params cache (`checkpoint.cached_gguf`'s entry) on the way; a cached entry is
read by slices. The host holds one param's slices in the param dtype plus one float32 tensor, never the whole model.
Only the slices of addressable devices are read: with several processes, each reads its own devices' slices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import checkpoint
from medusa_jax.checkpoint import CheckpointError
from medusa_jax.config import ModelConfig

Index = tuple[tuple[int, int], ...]  # (start, stop) per axis of a param or tensor


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor as it lands in a param: `shape` is ours (after the transform `tf`); `layer` is set for a
    tensor stored stacked `[N, ...]` in the file (the params cache), of which this is one layer."""

    file: str
    name: str
    shape: tuple[int, ...]
    tf: str | None = None
    layer: int | None = None
    ref: int = -1  # the GGUF tensor's position in the file

    @property
    def transposed(self) -> bool:
        return self.tf is not None and len(self.shape) == 2


def read_backbone_sharded(
    path: str,
    param_dtype,
    shardings: Callable[[dict, ModelConfig], dict] | None = None,
    on_unknown: Callable[[str, np.ndarray], None] | None = None,
) -> tuple[ModelConfig, dict]:
    """(config, params) of a GGUF file or an HF directory, the params as `jax.Array`s of `param_dtype`.

    shardings: None (each param on the default device, as `jnp.asarray` places it) or a callable that takes the
    abstract params (a nested dict of `jax.ShapeDtypeStruct`: `embed/embedding [V, E]`, `layers/attn/q_proj/kernel
    [N, E, H*D]`, ..., see `checkpoint.param_shapes`) and the checkpoint's config, and returns the same tree of
    `jax.sharding.Sharding`s.
    on_unknown(name, float32 array) receives the HF tensors the conversion table does not know (a Medusa-2
    checkpoint's `medusa_head.*`). Errors are `checkpoint.read_backbone`'s CheckpointErrors."""
    dtype = np.dtype(jnp.dtype(param_dtype))
    if path.endswith(".gguf"):
        source = gguf_source(path)
    elif os.path.isdir(path):
        source = HFSource(path, on_unknown)
    else:
        raise CheckpointError(f"{path} is not a .gguf file or a model directory")
    try:
        abstract = {}
        for key, item in source.items.items():
            shape = (len(item), *item[0].shape) if isinstance(item, list) else item.shape
            checkpoint.set_path(abstract, key, jax.ShapeDtypeStruct(shape, dtype))
        checkpoint._check_complete(abstract, source.cfg)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        targets = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings(abstract, source.cfg))
        placed = []
        for (path_keys, leaf), sharding in zip(leaves, targets):
            key = tuple(k.key for k in path_keys)
            placed.append(build_param(source, source.items[key], leaf.shape, dtype, sharding))
        source.finish()
    finally:
        source.close()
    return source.cfg, jax.tree_util.tree_unflatten(treedef, placed)


# ---------------------------------------------------------------------------------------------- one param
def normalize(index, shape) -> Index:
    """A device's index (a tuple of slices, as `Sharding.addressable_devices_indices_map` gives it) as ints."""
    out = []
    for s, dim in zip(index, shape):
        start, stop, step = s.indices(dim)
        if step != 1:
            raise ValueError(f"strided shard index {index}")
        out.append((start, stop))
    return tuple(out)


def as_slices(index: Index) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in index)


def build_param(source, item, shape, dtype, sharding) -> jax.Array:
    """One param of `shape` as a `dtype` array with `sharding` (None: the default device). Each distinct slice of
    the addressable devices is read once; a stacked param (`item` a list of per-layer tensors) layer by layer."""
    full = tuple((0, d) for d in shape)
    if sharding is None:
        indices = [full]
    else:
        indices = list(dict.fromkeys(normalize(ix, shape) for ix in sharding.addressable_devices_indices_map(shape).values()))  # fmt: skip
    bufs = [np.empty([b - a for a, b in ix], dtype) for ix in indices]
    if isinstance(item, list):
        for layer, t in enumerate(item):
            want = [i for i, ix in enumerate(indices) if ix[0][0] <= layer < ix[0][1]]
            pieces = source.read(t, [indices[i][1:] for i in want])
            for i, piece in zip(want, pieces):
                bufs[i][layer - indices[i][0][0]] = cast(piece, dtype)
    else:
        for buf, piece in zip(bufs, source.read(item, indices)):
            buf[...] = cast(piece, dtype)
    if sharding is None:
        return jax.device_put(bufs[0])
    by_index = dict(zip(indices, bufs))
    return jax.make_array_from_callback(shape, sharding, lambda ix: by_index[normalize(ix, shape)], dtype=dtype)


def cast(piece: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`piece` ready to assign into a `dtype` buffer: other float formats go through float32, as the whole-array
    path (float32 numpy, then `jnp.asarray(a, dtype)`) converts them."""
    return piece if piece.dtype in (np.float32, dtype) else piece.astype(np.float32)


def read_slices(t: Tensor, indices: list[Index]) -> list[np.ndarray]:
    """The slices `indices` (over `t.shape`) of a safetensors tensor, from one memory-mapped open of its file."""
    if not indices:
        return []
    from safetensors import safe_open

    try:
        with safe_open(t.file, framework="np") as f:
            sl = f.get_slice(t.name)
            out = []
            for ix in indices:
                s = as_slices(ix)
                if t.layer is not None:
                    out.append(sl[(slice(t.layer, t.layer + 1), *s)][0])
                elif t.transposed:
                    out.append(sl[s[1], s[0]].T)
                else:
                    out.append(sl[s])
            return out
    except Exception as e:
        raise checkpoint.unreadable(t.file, e) from e


# ---------------------------------------------------------------------------------------------- sources
class HFSource:
    """An HF directory's safetensors files: `items` maps each params path to its tensor (or per-layer tensors)."""

    def __init__(self, path: str, on_unknown=None):
        from safetensors import safe_open

        self.cfg = checkpoint.hf_config(path)
        compiled = checkpoint.compile_table(checkpoint.HF_TABLE)
        flat: dict = {}
        for file in checkpoint.safetensors_files(path):
            try:
                with safe_open(file, framework="np") as f:
                    names = list(f.keys())
                    shapes = [f.get_slice(name).get_shape() for name in names]
            except Exception as e:  # truncated or corrupt file
                raise checkpoint.unreadable(file, e) from e
            for name, raw in zip(names, shapes):
                hit = checkpoint.match(compiled, name)
                if hit is None:
                    if on_unknown is not None:
                        on_unknown(name, read_whole(file, name))
                    continue
                key, layer, tf = hit
                checkpoint.check_heads_fit(name, raw, tf, self.cfg)
                t = Tensor(file, name, checkpoint.converted_shape(raw, tf), tf)
                checkpoint.put(flat, key, layer, t, self.cfg, name)
        self.items = finish_plan(flat)

    read = staticmethod(read_slices)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_whole(file: str, name: str) -> np.ndarray:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="np") as f:
            return checkpoint._to_float32(f, name)
    except Exception as e:
        raise checkpoint.unreadable(file, e) from e


def finish_plan(flat: dict) -> dict:
    """`flat` (params path -> tensor, or per-layer list) with every stack complete and of one shape."""
    for key, val in flat.items():
        if isinstance(val, list):
            checkpoint.check_stack(key, [None if t is None else t.shape for t in val])
    return flat


class CacheSource:
    """A converted-params cache entry (our layout, float32, layer params stored stacked `[N, ...]`)."""

    def __init__(self, entry: str):
        from safetensors import safe_open

        with open(os.path.join(entry, checkpoint.CONFIG_FILE)) as f:
            self.cfg = ModelConfig.from_dict(json.load(f))
        file = os.path.join(entry, checkpoint.PARAMS_FILE)
        self.items: dict = {}
        with safe_open(file, framework="np") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                shape = tuple(f.get_slice(name).get_shape())
                key = tuple(name.split("/"))
                if key[0] == "layers" and shape:
                    self.items[key] = [Tensor(file, name, shape[1:], layer=i) for i in range(shape[0])]
                else:
                    self.items[key] = Tensor(file, name, shape)
        abstract: dict = {}
        for key, item in self.items.items():
            shape = (len(item), *item[0].shape) if isinstance(item, list) else item.shape
            checkpoint.set_path(abstract, key, jax.ShapeDtypeStruct(shape, np.float32))
        checkpoint._check_complete(abstract, self.cfg)

    read = staticmethod(read_slices)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def gguf_source(path: str):
    """A readable cache entry of the GGUF file's converted params, else the file itself (which fills the entry)."""
    entry = checkpoint.gguf_cache_entry(path)
    if os.path.exists(os.path.join(entry, checkpoint.PARAMS_FILE)):
        try:
            return CacheSource(entry)
        except Exception:  # unreadable entry (a foreign or damaged file): convert again and replace it
            import shutil

            shutil.rmtree(entry, ignore_errors=True)
    return GGUFSource(path, entry)


class GGUFSource:
    """A GGUF file, dequantized one tensor at a time; each converted float32 tensor is also written into a new cache
    entry (published when every tensor was written)."""

    def __init__(self, path: str, entry: str):
        self.path = path
        self.reader, table, self.cfg = checkpoint.open_gguf(path)
        compiled = checkpoint.compile_table(table)
        flat: dict = {}
        for i, t in enumerate(self.reader.tensors):
            hit = checkpoint.match(compiled, t.name)
            if hit is None:
                continue
            key, layer, tf = hit
            raw = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
            checkpoint.check_heads_fit(t.name, raw, tf, self.cfg)
            checkpoint.put(flat, key, layer, Tensor(path, t.name, checkpoint.converted_shape(raw, tf), tf, ref=i),
                           self.cfg, t.name)  # fmt: skip
        self.items = finish_plan(flat)
        self.writer = CacheWriter(entry, self.cfg, self.items)

    def read(self, t: Tensor, indices: list[Index]) -> list[np.ndarray]:
        if not indices and not self.writer.active:
            return []
        arr = checkpoint.dequantize_tensor(self.reader.tensors[t.ref], self.path)
        raw = t.shape[::-1] if t.transposed else t.shape
        if arr.shape != raw:
            raise CheckpointError(f"cannot dequantize {t.name} in {self.path}: got shape {list(arr.shape)}")
        if t.tf == "unpermute_q":
            arr = checkpoint._unpermute(arr, self.cfg.num_heads)
        elif t.tf == "unpermute_k":
            arr = checkpoint._unpermute(arr, self.cfg.num_kv_heads)
        arr = np.ascontiguousarray(arr.T if t.transposed else arr, np.float32)
        self.writer.write(t, arr)
        return [arr[as_slices(ix)] for ix in indices]

    def finish(self) -> None:
        self.writer.publish()

    def close(self) -> None:
        self.writer.discard()


class CacheWriter:
    """Writes converted float32 tensors, one at a time, into a new params cache entry (`checkpoint.PARAMS_FILE`, a
    safetensors file in our layout, layer params stacked `[N, ...]`). A cache that cannot be written is skipped."""

    def __init__(self, entry: str, cfg: ModelConfig, items: dict):
        from medusa_jax import cache

        self.entry, self.cfg, self.file = entry, cfg, None
        self.tmp = cache.new_dir(entry)
        if self.tmp is None:
            return
        header, self.offsets, offset = {}, {}, 0
        for key, item in sorted(items.items()):
            t = item[0] if isinstance(item, list) else item
            shape = (len(item), *t.shape) if isinstance(item, list) else t.shape
            size = 4 * int(np.prod(shape, dtype=np.int64))
            header["/".join(key)] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            for layer, u in enumerate(item if isinstance(item, list) else [item]):
                self.offsets[u.name] = offset + layer * 4 * int(np.prod(u.shape, dtype=np.int64))
            offset += size
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        self.todo = set(self.offsets)
        try:
            self.file = open(os.path.join(self.tmp, checkpoint.PARAMS_FILE), "wb")  # noqa: SIM115 (kept open)
            self.file.write(struct.pack("<Q", len(text)) + text)
            self.base = 8 + len(text)
            self.file.truncate(self.base + offset)
        except OSError:
            self.discard()

    @property
    def active(self) -> bool:
        return self.file is not None

    def write(self, t: Tensor, arr: np.ndarray) -> None:
        if self.file is None or t.name not in self.todo:
            return
        try:
            self.file.seek(self.base + self.offsets[t.name])
            arr.tofile(self.file)
            self.todo.discard(t.name)
        except OSError:  # a full or read-only disk: load without caching
            self.discard()

    def publish(self) -> None:
        from medusa_jax import cache

        if self.file is None or self.todo:
            return self.discard()
        try:
            self.file.close()
            self.file = None
            with open(os.path.join(self.tmp, checkpoint.CONFIG_FILE), "w") as f:
                json.dump(self.cfg.to_dict(), f)
        except OSError:
            return self.discard()
        cache.publish_dir(self.tmp, self.entry)
        self.tmp = None

    def discard(self) -> None:
        from medusa_jax import cache

        if self.file is not None:
            self.file.close()
            self.file = None
        cache.discard(self.tmp)
        self.tmp = None
