"""Reading and writing Medusa heads in the reference layout (FasterDecoding/Medusa).

On disk a head set is a directory with `config.json` (`medusa_num_heads`, `medusa_num_layers`,
`base_model_name_or_path`, optional `"version": "2"`) and `medusa_lm_head.safetensors` or `medusa_lm_head.pt`: the
state dict of an `nn.ModuleList` of `nn.Sequential(ResBlock * NL, nn.Linear(E, V, bias=False))`, keys
`{i}.{j}.linear.weight` `[E, E]`, `{i}.{j}.linear.bias` `[E]` for ResBlock j of head i and `{i}.{NL}.weight` `[V, E]`
for head i's projection. The "version 2" layout has no projection: the heads share the base lm_head. Medusa-2 full
checkpoints are a Hugging Face model directory whose weights also hold the same tensors prefixed `medusa_head.`.

Our extensions (`medusa_jax.heads`), which the reference implementation cannot run: root_token heads add
`{i}.root.weight` `[E, E]` per head (torch layout) and `"medusa_root_token": true` in config.json; sequential heads
also `{i}.path.{j}.weight` `[E, E]` for j < i and `"medusa_sequential": true`.

Our params (see `medusa_jax.heads`) stack the heads: `blocks/kernel` `[K, NL, E, E]` ([in, out], the transpose of
torch's Linear weight), `blocks/bias` `[K, NL, E]`, `proj/kernel` `[K, E, V]` (absent when shared), `root/kernel`
`[K, E, E]` (root_token heads only), `path/kernel` `[K, K-1, E, E]` (sequential heads only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings

import numpy as np

from medusa_jax import cache as fsio
from medusa_jax import checkpoint
from medusa_jax import feature_drafter as fd
from medusa_jax.checkpoint import CheckpointError
from medusa_jax.draft_vocab import DRAFT_VOCAB_FILE, check_draft_ids, read_draft_vocab  # noqa: F401 (their old home)
from medusa_jax.heads import FEATURE_DEPTH

HEADS_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
MEDUSA2_PREFIX = "medusa_head."
HUB_PATTERNS = ["*.json", "medusa_lm_head.*"]

# `{prefix}{head}.{layer}.linear.weight|bias` (ResBlock) or `{prefix}{head}.{layer}.weight` (projection)
_KEY = re.compile(r"^(.*?)(\d+)\.(\d+)\.(linear\.)?(weight|bias)$")
_ROOT_KEY = re.compile(r"^(\d+)\.root\.weight$")  # root_token heads: `{prefix}{head}.root.weight`
_PATH_KEY = re.compile(r"^(\d+)\.path\.(\d+)\.weight$")  # sequential heads: `{prefix}{head}.path.{j}.weight`, j < head


# ---------------------------------------------------------------------------------------------- tensors -> params
def heads_from_tensors(named_tensors: dict[str, np.ndarray], prefix: str = "") -> dict:
    """Reference-layout tensors (torch `[out, in]` weights) -> our stacked params (numpy, the tensors' dtype).

    Only names starting with `prefix` are used (e.g. `"medusa_head."` for a Medusa-2 full checkpoint). The head and
    layer counts come from the tensor names; a head set without `{i}.{NL}.weight` projections shares the base
    lm_head (no `proj` in the result)."""
    blocks: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    projs: dict[tuple[int, int], np.ndarray] = {}
    roots: dict[int, np.ndarray] = {}
    paths: dict[tuple[int, int], np.ndarray] = {}
    ignored = []
    for name, arr in named_tensors.items():
        if not name.startswith(prefix):
            continue
        r = _ROOT_KEY.match(name[len(prefix) :])
        if r:
            roots[int(r.group(1))] = np.asarray(arr)
            continue
        pm = _PATH_KEY.match(name[len(prefix) :])
        if pm:
            paths[int(pm.group(1)), int(pm.group(2))] = np.asarray(arr)
            continue
        m = _KEY.match(name[len(prefix) :])
        if not m or m.group(1):
            ignored.append(name)
            continue
        i, j, linear, kind = int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)
        if linear:
            blocks.setdefault((i, j), {})[kind] = np.asarray(arr)
        elif kind == "weight":
            projs[(i, j)] = np.asarray(arr)
        else:
            ignored.append(name)
    if not blocks and not projs:
        sample = ", ".join(list(named_tensors)[:5]) or "none"
        raise CheckpointError(
            f"no Medusa head tensors ({prefix}{{head}}.{{layer}}.linear.weight, ...) found; the tensors are: {sample}"
        )
    if ignored:
        warnings.warn(
            f"ignoring {len(ignored)} tensor(s) that are not Medusa head weights: {', '.join(ignored[:5])}",
            stacklevel=2,
        )

    heads = sorted({i for i, _ in blocks} | {i for i, _ in projs})
    num_heads = len(heads)
    if heads != list(range(num_heads)):
        raise CheckpointError(f"Medusa heads must be numbered 0..K-1, the tensors name heads {heads}")
    num_layers = max((j + 1 for _, j in blocks), default=0)
    for i in range(num_heads):
        for j in range(num_layers):
            got = blocks.get((i, j), {})
            for kind in ("weight", "bias"):
                if kind not in got:
                    raise CheckpointError(
                        f"Medusa head {i} has no {prefix}{i}.{j}.linear.{kind}: the heads have {num_layers} "
                        "ResBlock layers, so every head needs weight and bias for each"
                    )
    for i, j in projs:
        if j != num_layers:
            raise CheckpointError(
                f"unexpected tensor {prefix}{i}.{j}.weight: with {num_layers} ResBlock layers the projection of "
                f"head {i} is {prefix}{i}.{num_layers}.weight"
            )
    with_proj = sorted(i for i, _ in projs)
    if with_proj and len(with_proj) != num_heads:
        missing = sorted(set(range(num_heads)) - set(with_proj))
        raise CheckpointError(
            f"only some Medusa heads have a projection ({prefix}{{i}}.{num_layers}.weight): heads {missing} have "
            "none; either all heads have their own projection or none (sharing the base lm_head)"
        )

    if num_layers:
        hidden = blocks[(0, 0)]["weight"].shape[-1]
    elif projs:
        hidden = projs[(0, 0)].shape[-1]
    else:  # pragma: no cover - excluded above
        hidden = 0
    vocab = projs[(0, num_layers)].shape[0] if projs else None

    def check(name, arr, shape):
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"{prefix}{name} has shape {list(arr.shape)}, expected {list(shape)}")

    kernel = np.zeros((num_heads, num_layers, hidden, hidden), _dtype_of(blocks, projs))
    bias = np.zeros((num_heads, num_layers, hidden), kernel.dtype)
    for (i, j), got in blocks.items():
        check(f"{i}.{j}.linear.weight", got["weight"], (hidden, hidden))
        check(f"{i}.{j}.linear.bias", got["bias"], (hidden,))
        kernel[i, j] = got["weight"].T
        bias[i, j] = got["bias"]
    params: dict = {"blocks": {"kernel": kernel, "bias": bias}}
    if projs:
        proj = np.zeros((num_heads, hidden, vocab), kernel.dtype)
        for (i, j), w in projs.items():
            check(f"{i}.{j}.weight", w, (vocab, hidden))
            proj[i] = w.T
        params["proj"] = {"kernel": proj}
    if roots:
        if sorted(roots) != list(range(num_heads)) or not num_layers:
            raise CheckpointError(
                f"root_token heads need {prefix}{{i}}.root.weight for every head 0..{num_heads - 1} and at least one "
                f"ResBlock layer; found it for heads {sorted(roots)} with {num_layers} layer(s)"
            )
        root = np.zeros((num_heads, hidden, hidden), kernel.dtype)
        for i, w in roots.items():
            check(f"{i}.root.weight", w, (hidden, hidden))
            root[i] = w.T
        params["root"] = {"kernel": root}
    if paths:
        bad = [f"{i}.path.{j}" for i, j in paths if not (0 <= j < i < num_heads)]
        if bad or not roots:
            raise CheckpointError(
                f"sequential heads need {prefix}{{i}}.path.{{j}}.weight only for j < i < {num_heads} and root "
                f"weights for every head; found {bad or 'no root weights'}"
            )
        path = np.zeros((num_heads, num_heads - 1, hidden, hidden), kernel.dtype)
        for (i, j), w in paths.items():
            check(f"{i}.path.{j}.weight", w, (hidden, hidden))
            path[i, j] = w.T
        params["path"] = {"kernel": path}
    return params


def _dtype_of(blocks, projs) -> np.dtype:
    """The tensors' common float dtype (so a round trip is exact), else float32."""
    dtypes = {a.dtype for got in blocks.values() for a in got.values()} | {a.dtype for a in projs.values()}
    if len(dtypes) == 1:
        (dt,) = dtypes
        if np.issubdtype(dt, np.floating) or dt.name == "bfloat16":
            return dt
    return np.dtype(np.float32)


def _dims(params: dict) -> tuple[int, int, int, int | None]:
    """(K, NL, E, V or None) of a params dict (a feature drafter: its depth, 1 layer)."""
    if fd.is_feature(params):
        return FEATURE_DEPTH, 1, int(params[fd.FEATURE]["fuse"]["bias"].shape[0]), None
    k, nl, e = params["blocks"]["kernel"].shape[:3]
    v = None
    if "proj" in params:
        e, v = params["proj"]["kernel"].shape[1:]
    return int(k), int(nl), int(e), None if v is None else int(v)


# ---------------------------------------------------------------------------------------------- reading files
def _resolve(path: str) -> str:
    """A local path for a heads path or hub id (the hub download includes `medusa_lm_head.*`)."""
    return checkpoint.resolve(path, patterns=HUB_PATTERNS, what="Medusa heads ")


def _read_safetensors(file: str, prefix: str | None = None) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="np") as f:
            names = [n for n in f.keys() if prefix is None or n.startswith(prefix)]  # noqa: SIM118 (not iterable)
            return {name: f.get_tensor(name) for name in names}
    except Exception as e:  # truncated or corrupt file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read {file}: {msg}; re-download or re-save it") from e


def _read_pt(file: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{file} is a torch pickle: install torch (pip install torch) to read it, or convert it to "
            "medusa_lm_head.safetensors"
        ) from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"cannot read {file} as a plain tensor state dict ({type(e).__name__}: {msg}); it is corrupt or holds "
            "pickled objects, which are never executed: re-save it as a state dict or as safetensors"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors (got {type(state).__name__})")
    out = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the float32 upcast is exact
            t = t.float()
        out[str(name)] = t.contiguous().numpy()
    return out


def _detect_prefix(names) -> str:
    """The common name prefix before `{i}.{j}.` (e.g. `medusa_head.`), or ""."""
    prefixes = {m.group(1) for m in map(_KEY.match, names) if m}
    return prefixes.pop() if len(prefixes) == 1 else ""


def _find_medusa2_tensors(path: str) -> dict[str, np.ndarray]:
    """`medusa_head.*` tensors of the safetensors weights of an HF directory (reads only those)."""
    import glob

    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({v for k, v in weight_map.items() if k.startswith(MEDUSA2_PREFIX)})
        files = [os.path.join(path, f) for f in files]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    out: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(file, framework="np") as f:
                has = any(k.startswith(MEDUSA2_PREFIX) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
        except Exception as e:
            raise CheckpointError(f"cannot read {file}: {str(e).splitlines()[0]}; re-download or re-save it") from e
        if has:
            out.update(_read_safetensors(file, MEDUSA2_PREFIX))
    return out


def read_heads(path: str) -> tuple[dict, dict]:
    """Read a head set -> (params as numpy arrays in the file's dtype, meta).

    path: a directory with config.json + medusa_lm_head.{safetensors,pt} (or a Medusa-2 full checkpoint directory
    whose weights hold `medusa_head.*`), a `.safetensors`/`.pt` file, or a hub id. The head and layer counts come
    from the tensors; a config.json that disagrees gets a warning. meta: base_model_name_or_path, version,
    num_heads, num_layers, shared_lm_head, source."""
    local = _resolve(os.fspath(path))
    if os.path.isdir(local):
        directory = local
        files = [os.path.join(local, n) for n in HEADS_FILES if os.path.exists(os.path.join(local, n))]
        file = files[0] if files else None
    else:
        directory, file = os.path.dirname(local) or ".", local
    config = _read_config(os.path.join(directory, "config.json"))

    if file is None:
        tensors = _find_medusa2_tensors(directory)
        if not tensors:
            raise CheckpointError(
                f"{local} has no {' or '.join(HEADS_FILES)} and its weights hold no {MEDUSA2_PREFIX}* tensors: "
                "pass the directory (or file) of a Medusa head set"
            )
        prefix, source = MEDUSA2_PREFIX, directory
    else:
        if file.endswith(".safetensors"):
            tensors = _read_safetensors(file)
        elif file.endswith((".pt", ".pth", ".bin")):
            tensors = _read_pt(file)
        else:
            raise CheckpointError(f"{file} is not a .safetensors or .pt Medusa heads file")
        prefix, source = _detect_prefix(tensors), file
    if fd.FEATURE_TENSOR in tensors:  # a feature drafter (`medusa_jax.feature_drafter`)
        try:
            params = fd.from_tensors(tensors)
        except KeyError as e:
            raise CheckpointError(f"{source}: a feature drafter without the tensor {e}: rewrite it") from None
        base = config.get("base_model_name_or_path", "") or ""
        return params, {"base_model_name_or_path": base, "feature": True, "num_heads": FEATURE_DEPTH,
                        "num_layers": 1, "shared_lm_head": True, "source": source}  # fmt: skip
    try:
        params = heads_from_tensors(tensors, prefix)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from e
    k, nl, _, _ = _dims(params)
    shared = "proj" not in params

    def disagree(key, value, what):
        cfg_value = config.get(key)
        if cfg_value is not None and cfg_value != value:
            warnings.warn(
                f"{directory}/config.json says {key}={cfg_value!r} but {source} holds {what}; using the tensors",
                stacklevel=3,
            )

    if file is not None:  # a full checkpoint's config.json describes the backbone
        disagree("medusa_num_heads", k, f"{k} heads")
        disagree("medusa_num_layers", nl, f"{nl} ResBlock layer(s) per head")
        version = config.get("version")
        if version is not None and str(version) == "2" and not shared:
            warnings.warn(
                f"{directory}/config.json says version 2 (heads share the base lm_head) but {source} holds a "
                "projection per head; using the per-head projections",
                stacklevel=2,
            )
    meta = {
        "base_model_name_or_path": config.get("base_model_name_or_path", config.get("_name_or_path", "")) or "",
        "version": None if config.get("version") is None else str(config["version"]),
        "num_heads": k,
        "num_layers": nl,
        "shared_lm_head": shared,
        "root_token": "root" in params,
        "sequential": "path" in params,
        "source": source,
    }
    return params, meta


def _read_config(cfg_path: str) -> dict:
    if not os.path.exists(cfg_path):
        return {}
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from e
    return config if isinstance(config, dict) else {}


# ---------------------------------------------------------------------------------------------- against a model
def check_heads(params: dict, model, meta: dict | None = None) -> dict:
    """Check heads against `model` (hidden size, vocabulary) and cast them to its param dtype (jax arrays)."""
    import jax
    import jax.numpy as jnp

    meta = meta or {}
    _, _, e, v = _dims(params)
    cfg = model.cfg
    base = meta.get("base_model_name_or_path") or "unknown"
    source = f" ({meta['source']})" if meta.get("source") else ""
    if e != cfg.hidden_size:
        raise CheckpointError(
            f"heads{source} have hidden size {e} but the model has {cfg.hidden_size}: these heads belong to another "
            f"base model (base_model_name_or_path={base})"
        )
    if v is not None and v != cfg.vocab_size:
        raise CheckpointError(
            f"heads{source} project to a vocabulary of {v} but the model has {cfg.vocab_size}: these heads belong to "
            f"another base model or tokenizer (base_model_name_or_path={base})"
        )
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a), cfg.jnp_param_dtype), params)


def load_heads(path: str, model) -> dict:
    """read_heads(path), checked against `model` and cast to its param dtype."""
    params, meta = read_heads(path)
    return check_heads(params, model, meta)


def read_full_medusa2(path: str, dtype=np.float32) -> tuple:
    """A Medusa-2 full checkpoint (HF directory or hub id whose weights also hold `medusa_head.*`) ->
    (ModelConfig, backbone params, heads params), all numpy."""
    local = checkpoint.resolve(os.fspath(path))
    if not os.path.isdir(local):
        raise CheckpointError(f"{local} is not a Hugging Face model directory")
    found: dict[str, np.ndarray] = {}

    def collect(name, arr):
        if name.startswith(MEDUSA2_PREFIX):
            found[name] = arr

    cfg, backbone = checkpoint.load_hf_dir(local, dtype, on_unknown=collect)
    if not found:
        raise CheckpointError(f"{local} holds no {MEDUSA2_PREFIX}* tensors: it is not a Medusa-2 full checkpoint")
    try:
        heads = heads_from_tensors(found, MEDUSA2_PREFIX)
    except CheckpointError as e:
        raise CheckpointError(f"{local}: {e}") from e
    return cfg, backbone, heads


# ---------------------------------------------------------------------------------------------- writing
def heads_to_tensors(params: dict) -> dict[str, np.ndarray]:
    """Our params -> reference-layout tensors (torch `[out, in]` weights, contiguous, the params' dtype)."""
    kernel = np.asarray(params["blocks"]["kernel"])
    bias = np.asarray(params["blocks"]["bias"])
    k, nl = kernel.shape[:2]
    out = {}
    for i in range(k):
        for j in range(nl):
            out[f"{i}.{j}.linear.weight"] = np.ascontiguousarray(kernel[i, j].T)
            out[f"{i}.{j}.linear.bias"] = np.ascontiguousarray(bias[i, j])
        if "proj" in params:
            out[f"{i}.{nl}.weight"] = np.ascontiguousarray(np.asarray(params["proj"]["kernel"][i]).T)
        if "root" in params:
            out[f"{i}.root.weight"] = np.ascontiguousarray(np.asarray(params["root"]["kernel"][i]).T)
        for j in range(i if "path" in params else 0):
            out[f"{i}.path.{j}.weight"] = np.ascontiguousarray(np.asarray(params["path"]["kernel"][i, j]).T)
    return out


def save_heads(
    params: dict, out_dir: str, base_model_name_or_path: str = "", extra_config: dict | None = None, dtype=None
):
    """Write `config.json` + `medusa_lm_head.safetensors` in the reference layout into `out_dir`, in the params'
    dtype or `dtype` (e.g. "float16" halves a float32 head set; loading casts to the model's param dtype).

    Atomic: the files are written under temporary names first and moved into place with `os.replace`, so a crash
    never leaves a half-written file. `extra_config` adds keys to config.json (it cannot override the head counts,
    base model or version, which describe the tensors)."""
    from safetensors.numpy import save_file

    k, nl, _, _ = _dims(params)
    config = dict(extra_config or {})
    config.update(medusa_num_heads=k, medusa_num_layers=nl, base_model_name_or_path=base_model_name_or_path)
    if fd.is_feature(params):
        config["medusa_drafter"] = "feature"
    if "proj" not in params:
        config["version"] = "2"
    else:
        config.pop("version", None)
    for key, name in (("root", "medusa_root_token"), ("path", "medusa_sequential")):
        if key in params:
            config[name] = True
        else:
            config.pop(name, None)
    tensors = fd.to_tensors(params) if fd.is_feature(params) else heads_to_tensors(params)
    if dtype is not None:
        tensors = {name: np.ascontiguousarray(t.astype(dtype)) for name, t in tensors.items()}

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    fresh = not os.path.exists(out_dir)
    # os.mkdir (unlike tempfile.mkdtemp) honours the umask: a fresh directory is moved into place as is
    work = os.path.join(parent if fresh else out_dir, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(work)
    try:
        st_tmp = os.path.join(work, HEADS_FILES[0])
        save_file(tensors, st_tmp, metadata={"format": "pt"})
        fsio.chmod_default(st_tmp)  # safetensors writes 0600; give it the mode a plain open() would
        cfg_tmp = os.path.join(work, "config.json")
        with open(cfg_tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        for p in (st_tmp, cfg_tmp):
            fsio.fsync(p)
        if fresh:
            os.replace(work, out_dir)
            work = None
        else:
            os.replace(st_tmp, os.path.join(out_dir, HEADS_FILES[0]))
            os.replace(cfg_tmp, os.path.join(out_dir, "config.json"))
        fsio.fsync_dir(out_dir)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    stale = os.path.join(out_dir, HEADS_FILES[1])
    if os.path.exists(stale):
        warnings.warn(
            f"{stale} from an earlier head set is still there; the reference loader prefers it over the new "
            f"{HEADS_FILES[0]}: delete it",
            stacklevel=2,
        )
    return out_dir
