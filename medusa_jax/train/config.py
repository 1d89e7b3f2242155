"""The training config schema: frozen dataclasses, read from YAML with dotted `key=value` overrides.

Errors (unknown key, wrong type, bad value) raise `ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelSection:
    ckpt: str = "default"  # base model: HF dir, .gguf, hub id, "default" (SmolLM2-135M-Instruct) or "tiny" (random)
    dtype: str = "float32"  # compute dtype (bfloat16: bf16 compute, float32 master weights)
    param_dtype: str = "float32"
    remat: bool = False
    tiny_seed: int = 0  # seed of the random "tiny" backbone
    tokenizer: str = ""  # a "tiny" backbone's tokenizer (its vocabulary sizes the backbone): "default" or a model path


@dataclasses.dataclass(frozen=True)
class HeadsSection:
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True  # the reference "version 2" layout: the heads use the base lm_head
    root_token: bool = False  # heads also see the root token x_{t+1} (medusa_jax.heads; not the reference layout)
    sequential: bool = False  # head k also sees its path's drafted tokens x_{t+2..t+k+1} (Hydra-style; root_token too)
    feature: bool = False  # a feature drafter (EAGLE's kind, `medusa_jax.feature_drafter`); num_heads: depths trained
    draft_vocab: int = 0  # feature drafter: train on the N answer tokens the training data holds most (0: all tokens)
    init: str = ""  # start from exported heads (reference layout), e.g. a Medusa-1 run's export/


@dataclasses.dataclass(frozen=True)
class DataSection:
    kind: str = "distill"  # "distill" (a medusa_jax.train.distill directory) or "synthetic" (tiny tests)
    path: str = ""  # distilled data dir(s), comma-separated
    dev_path: str = ""  # distilled dev answers, for evaluation only
    max_len: int = 256  # sequences are cut to this many tokens
    num_rows: int = 0  # use the first N rows (0: all)
    synthetic_rows: int = 64
    synthetic_len: int = 32
    synthetic_dev_rows: int = 16  # 0: no dev evaluation on synthetic data


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 0  # 0: no LoRA (full fine-tuning of the backbone in medusa2 mode)
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    mode: str = "medusa1"  # "medusa1" (frozen backbone) or "medusa2" (backbone and heads together)
    steps: int = 100
    save_every: int = 50  # checkpoint every N steps (and at the end); 0: only at the end
    checkpoint: bool = True
    keep_checkpoints: int = 2
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate on data.dev_path only at the end
    batch_size: int = 8  # sequences per step (global, over all hosts)
    batch_tokens: int = 256  # medusa1 with precomputed hidden states: answer positions per step
    precompute_hidden: bool = True  # medusa1: run the frozen backbone once over the data
    vocab_subset: bool = False  # medusa1 precomputed: softmax over the training targets' tokens only (faster)
    lr_heads: float = 1e-3
    lr_backbone: float = 0.0  # 0: lr_heads / 4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    decay: float = 0.8  # lambda_k = decay**k
    distill_weight: float = 0.0  # heads: weight of the base model's distribution over each target (soft labels)
    hidden_noise: float = 0.0  # heads: Gaussian noise on their input hidden states, this times each state's RMS
    anchors: int = 32  # feature drafter: positions per row drafted at every depth each step
    lambda0: float = 0.2  # medusa2: weight of the heads loss
    heads_warmup_steps: int = 0  # medusa2: sine ramp of lambda0 over these steps
    backbone_loss: str = "ce"  # medusa2: "ce" on the data or "kl" to the original model
    max_bad_steps: int = 10  # steps whose loss or gradient is not finite are skipped; stop after this many
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/tiny"
    model: ModelSection = ModelSection()
    heads: HeadsSection = HeadsSection()
    data: DataSection = DataSection()
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    mesh: MeshSection = MeshSection()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora"]["targets"] = list(self.lora.targets)
        return d


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "data.kind": ("distill", "synthetic"),
    "train.mode": ("medusa1", "medusa2"),
    "train.backbone_loss": ("ce", "kl"),
}
POSITIVE = ("train.steps", "train.batch_size", "train.batch_tokens", "heads.num_heads", "heads.num_layers",
            "mesh.data", "mesh.fsdp", "mesh.tensor", "data.max_len", "train.log_every")  # fmt: skip


def _coerce(key: str, typ, value):
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    elif origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    else:
        raise ConfigError(f"{key}: unsupported type {typ}")
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name if origin is not tuple else 'a list of strings'}, got {value!r}")


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in d.items():
        key = prefix + str(k)
        if k not in names:
            raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(names))})")
        typ = hints[k]
        if dataclasses.is_dataclass(typ):
            kw[k] = _build(typ, v or {}, key + ".")
        else:
            kw[k] = _coerce(key, typ, v)
    return cls(**kw)


def _validate(cfg: Config) -> None:
    flat = flatten(cfg.to_dict())
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {flat[key]!r}")
    for key in POSITIVE:
        if flat[key] < 1:
            raise ConfigError(f"{key}: must be >= 1, got {flat[key]}")
    for key in ("train.save_every", "train.warmup_steps", "lora.rank", "data.num_rows", "train.eval_every"):
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]}")
    if not 0 < cfg.train.decay <= 1:
        raise ConfigError(f"train.decay: must be in (0, 1], got {cfg.train.decay}")
    if not 0 <= cfg.train.distill_weight <= 1:
        raise ConfigError(f"train.distill_weight: must be in [0, 1], got {cfg.train.distill_weight}")
    if not 0 <= cfg.train.hidden_noise < 10:
        raise ConfigError(f"train.hidden_noise: must be in [0, 10) (a fraction of each state's RMS), got "
                          f"{cfg.train.hidden_noise}")  # fmt: skip
    if cfg.train.lr_heads <= 0 or cfg.train.lr_backbone < 0:
        raise ConfigError("train.lr_heads must be > 0 and train.lr_backbone >= 0")
    bad = [t for t in cfg.lora.targets if t not in LORA_TARGETS]
    if bad:
        raise ConfigError(f"lora.targets: unknown module {bad[0]!r} (known: {', '.join(LORA_TARGETS)})")
    if cfg.heads.draft_vocab < 0 or (cfg.heads.draft_vocab and not cfg.heads.feature):
        raise ConfigError("heads.draft_vocab: a size >= 1 for a feature drafter (heads.feature=true), else 0")
    if cfg.heads.feature and (cfg.heads.sequential or cfg.heads.root_token):
        raise ConfigError("heads.feature: a feature drafter has no root_token or sequential heads: set them false")
    if cfg.data.kind == "distill" and not cfg.data.path:
        raise ConfigError("data.path: required with data.kind=distill")
    if not cfg.run_dir:
        raise ConfigError("run_dir: required")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def from_dict(d: dict) -> Config:
    cfg = _build(Config, d, "")
    _validate(cfg)
    return cfg


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    d = yaml.safe_load(yaml.safe_dump(d))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node, cls = d, Config
        for i, p in enumerate(parts):
            names = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
            if p not in names:
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}")
            typ = typing.get_type_hints(cls)[p]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(typ):
                    raise ConfigError(f"{key}: is a section, set one of its keys")
                node[p] = value
            else:
                if not dataclasses.is_dataclass(typ):
                    raise ConfigError(f"unknown config key {key!r}")
                if not isinstance(node.get(p), dict):
                    node[p] = {}
                node = node[p]
                cls = typ
    return d


def load_config(path: str, overrides: list[str] = ()) -> Config:
    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from e
    return from_dict(apply_overrides(d, list(overrides)))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
