"""Reading a training run directory as a `MedusaModel` (`load(RUN_DIR)`, `decode.py --ckpt RUN_DIR`).

A run dir holds `config.yaml` (the resolved training config), `checkpoints/<step>/` (orbax) and `tokenizer/` (the
backbone's tokenizer, when it has one). `load_run` accepts
the run dir (latest checkpoint) or one step's directory, restores the trained heads (and LoRA factors or the full
backbone for Medusa-2), merges LoRA into the backbone and returns a `MedusaModel` with the heads attached. Only what
the run exports is read here: this module does not import the trainer."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.config import ModelConfig

# the random backbone of `model.ckpt: tiny` (tests and examples)
TINY = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    max_position_embeddings=512, eos_token_ids=(0,),
)  # fmt: skip
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def source_tokenizer(ckpt: str, tokenizer_src: str = ""):
    """The tokenizer of a training config's backbone (`model.tokenizer` for a "tiny" one), or None without one."""
    from medusa_jax import checkpoint
    from medusa_jax.tokenizer import has_tokenizer_files, load_tokenizer

    src = tokenizer_src if ckpt == "tiny" else ckpt
    if not src:
        return None
    path = checkpoint.resolve(None if src == "default" else src)
    if os.path.isdir(path) and not has_tokenizer_files(path):
        return None
    return load_tokenizer(path)


def read_backbone(ckpt: str, tiny_seed: int = 0, tokenizer: bool = False, tokenizer_src: str = ""):
    """A training config's `model.ckpt` -> (ModelConfig, numpy-or-jax float params, tokenizer or None, base name).
    A "tiny" random backbone speaks `tokenizer_src`'s vocabulary when one is named ("default" or a model path)."""
    if ckpt == "tiny":
        from medusa_jax.model import init_params

        mc, tok = TINY, None
        if tokenizer_src:
            tok = source_tokenizer(ckpt, tokenizer_src)
            mc = TINY.replace(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,))
        return mc, init_params(mc, seed=tiny_seed), tok if tokenizer else None, "tiny"
    from medusa_jax import checkpoint

    path = checkpoint.resolve(None if ckpt == "default" else ckpt)
    mc, params = checkpoint.read_backbone(path)
    tok = None
    if tokenizer:
        from medusa_jax.tokenizer import load_tokenizer

        tok = load_tokenizer(path)
    return mc, params, tok, ckpt if ckpt != "default" else DEFAULT_BASE


TOKENIZER_DIR = "tokenizer"  # the backbone's tokenizer, saved in the run dir when training starts


def save_tokenizer(ckpt: str, tokenizer_src: str, run: str) -> None:
    """Saves the backbone's tokenizer into `run/tokenizer/` (once; written beside it and renamed into place)."""
    from medusa_jax import cache

    final = os.path.join(run, TOKENIZER_DIR)
    if os.path.isdir(final):
        return
    tok = source_tokenizer(ckpt, tokenizer_src)
    if tok is None:
        return
    os.makedirs(run, exist_ok=True)
    tmp = cache.new_dir(final)
    if tmp is None:
        return
    try:
        tok.save_pretrained(tmp)
    except BaseException:
        cache.discard(tmp)
        raise
    cache.publish_dir(tmp, final)


def split_run_path(path: str) -> tuple[str, int | None]:
    """(run_dir, step or None) for a run dir or a step directory inside its checkpoints/."""
    path = os.path.abspath(path.rstrip("/"))
    if os.path.exists(os.path.join(path, "config.yaml")) and os.path.isdir(os.path.join(path, "checkpoints")):
        return path, None
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints" and os.path.basename(path).isdigit():
        run = os.path.dirname(parent)
        if os.path.exists(os.path.join(run, "config.yaml")):
            return run, int(os.path.basename(path))
    raise ValueError(f"{path} is not a training run dir (config.yaml + checkpoints/) or one of its step dirs")


def is_run_dir(path: str) -> bool:
    try:
        split_run_path(path)
        return True
    except (ValueError, OSError):
        return False


def read_run_config(run_dir: str) -> tuple[dict, str]:
    """The run's `config.yaml` as a plain dict (sections -> keys) and its text."""
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        text = f.read()
    conf = yaml.safe_load(text)
    if not isinstance(conf, dict):
        raise ValueError(f"{run_dir}/config.yaml is not a training config")
    return conf, text


def quiet_closed_event_loop() -> None:
    """When an orbax restore fails, a background callback may still post to its closed asyncio loop, and Python
    prints that "RuntimeError: Event loop is closed" with a traceback around our one-line error. Called before a
    restore: drops exactly that report (process-wide, installed once) from the unraisable-exception and thread
    hooks; every other report still shows."""
    import sys
    import threading

    def closed(e):
        return isinstance(e, RuntimeError) and "Event loop is closed" in str(e)

    for module, name in ((sys, "unraisablehook"), (threading, "excepthook")):
        prev = getattr(module, name)
        if getattr(prev, "_medusa_quiet", False):
            continue

        def hook(report, prev=prev):
            if not closed(report.exc_value):
                prev(report)

        hook._medusa_quiet = True
        setattr(module, name, hook)


def short_error(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, without tensorstore's spec dump, at most `limit` characters."""
    msg = " ".join(str(e).split("[tensorstore_spec")[0].split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class RunParts:
    """What a run directory holds for decoding (`medusa_jax.api.load_run` makes a `MedusaModel` of it)."""

    cfg: ModelConfig
    params: dict  # the backbone, LoRA merged (or the fine-tuned backbone)
    tokenizer: object | None
    heads: dict
    name: str  # RUN@STEP
    config: str  # the resolved training config, YAML


def read_run(path: str, dtype: str = "float32", tokenizer: bool = True, activations: str | None = None) -> RunParts:
    """The run's trained heads, backbone (LoRA merged) and tokenizer, from its latest checkpoint or one step's."""
    import orbax.checkpoint as ocp

    from medusa_jax import lora as lora_lib

    run, step = split_run_path(path)
    conf, text = read_run_config(run)
    model_conf, lora_conf = conf.get("model") or {}, conf.get("lora") or {}
    saved = os.path.join(run, TOKENIZER_DIR)
    cfg_mc, backbone, tok, _ = read_backbone(
        str(model_conf.get("ckpt", "default")),
        int(model_conf.get("tiny_seed", 0)),
        tokenizer and not os.path.isdir(saved),
        str(model_conf.get("tokenizer") or ""),
    )
    if tokenizer and os.path.isdir(saved):
        from medusa_jax.tokenizer import load_tokenizer

        tok = load_tokenizer(saved)
    with ocp.CheckpointManager(os.path.join(run, "checkpoints")) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{run} has no checkpoint yet")
        quiet_closed_event_loop()
        try:
            out = mngr.restore(step, args=ocp.args.Composite(trainable=ocp.args.StandardRestore()))
        except Exception as e:  # orbax / tensorstore: pages of spec; keep the gist
            raise ValueError(
                f"cannot read checkpoint {run}/checkpoints/{step} ({short_error(e)}): it is truncated or corrupt; "
                "pass an earlier step's directory as --ckpt, or its export/ dir as --heads"
            ) from None
    trainable = jax.tree.map(lambda a: np.asarray(a), out["trainable"])
    if "backbone" in trainable:
        backbone = trainable["backbone"]
    elif "lora" in trainable:
        rank, alpha = int(lora_conf.get("rank", 0)), float(lora_conf.get("alpha", 16.0))
        backbone = lora_lib.merge(backbone, trainable["lora"], rank, alpha)
    mc = cfg_mc.for_inference(dtype, activations)
    params = jax.tree.map(lambda a: jnp.asarray(a, mc.jnp_param_dtype), backbone)
    heads = jax.tree.map(lambda a: jnp.asarray(a, mc.jnp_param_dtype), trainable["heads"])
    from medusa_jax.draft_vocab import read_draft_vocab

    ids = read_draft_vocab(run, vocab_size=mc.vocab_size)  # a feature drafter trained on a draft vocabulary
    if ids is not None:
        from medusa_jax.heads import attach_draft_vocab, base_lm_head

        heads = attach_draft_vocab(heads, base_lm_head(params), ids)
    return RunParts(mc, params, tok, heads, f"{os.path.basename(run)}@{step}", text)
