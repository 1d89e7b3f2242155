"""Loading a training run directory as a `MedusaModel` (for `decode.py --ckpt RUN_DIR`).

A run dir holds `config.yaml` (the resolved training config), `checkpoints/<step>/` (orbax) and `tokenizer/` (the
backbone's tokenizer, when it has one). `load_run` accepts
the run dir (latest checkpoint) or one step's directory, restores the trained heads (and LoRA factors or the full
backbone for Medusa-2), merges LoRA into the backbone and returns a `MedusaModel` with the heads attached."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


def _split(path: str) -> tuple[str, int | None]:
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
        _split(path)
        return True
    except (ValueError, OSError):
        return False


TOKENIZER_DIR = "tokenizer"  # the backbone's tokenizer, saved in the run dir when training starts


def source_tokenizer(cfg):
    """The tokenizer of the run's backbone (`model.tokenizer` for a "tiny" one), or None when it has none."""
    from medusa_jax import checkpoint
    from medusa_jax.tokenizer import has_tokenizer_files, load_tokenizer

    m = cfg.model
    src = m.tokenizer if m.ckpt == "tiny" else m.ckpt
    if not src:
        return None
    path = checkpoint.resolve(None if src == "default" else src)
    if os.path.isdir(path) and not has_tokenizer_files(path):
        return None
    return load_tokenizer(path)


def save_tokenizer(cfg, run: str) -> None:
    """Saves the backbone's tokenizer into `run/tokenizer/` (once; written beside it and renamed into place)."""
    from medusa_jax import cache

    final = os.path.join(run, TOKENIZER_DIR)
    if os.path.isdir(final):
        return
    tok = source_tokenizer(cfg)
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


def load_run(path: str, dtype: str = "float32", tokenizer: bool = True):
    """A `MedusaModel` with the run's trained heads (and merged LoRA / fine-tuned backbone)."""
    import orbax.checkpoint as ocp

    from medusa_jax.api import MedusaModel
    from medusa_jax.train import lora as lora_lib
    from medusa_jax.train.config import dump
    from medusa_jax.train.trainer import build_backbone, config_from_run, quiet_closed_event_loop

    run, step = _split(path)
    cfg = config_from_run(run)
    saved = os.path.join(run, TOKENIZER_DIR)
    cfg_mc, backbone, tok, name = build_backbone(cfg, tokenizer=tokenizer and not os.path.isdir(saved))
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
            from medusa_jax.train.trainer import short_error

            raise ValueError(
                f"cannot read checkpoint {run}/checkpoints/{step} ({short_error(e)}): it is truncated or corrupt; "
                "pass an earlier step's directory as --ckpt, or its export/ dir as --heads"
            ) from None
    trainable = jax.tree.map(lambda a: np.asarray(a), out["trainable"])
    if "backbone" in trainable:
        backbone = trainable["backbone"]
    elif "lora" in trainable:
        backbone = lora_lib.merge(backbone, trainable["lora"], cfg.lora.rank, cfg.lora.alpha)
    mc = cfg_mc.replace(dtype=dtype, param_dtype=dtype, remat=False)
    params = jax.tree.map(lambda a: jnp.asarray(a, mc.jnp_param_dtype), backbone)
    heads = jax.tree.map(lambda a: jnp.asarray(a, mc.jnp_param_dtype), trainable["heads"])
    model = MedusaModel(mc, params, tok, heads=heads, name=f"{os.path.basename(run)}@{step}")
    model.train_config = dump(cfg)
    del name
    return model
