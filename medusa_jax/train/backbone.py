"""The model side of a run: its backbone (dtype and remat of the config), the trainable pytree (heads, and LoRA
factors or the whole backbone for Medusa-2) and the backbone those make."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from medusa_jax.heads import HeadsConfig, init_heads
from medusa_jax.lora import init_lora, merge
from medusa_jax.run_io import TINY, read_backbone
from medusa_jax.train.config import Config, from_dict

__all__ = ["TINY", "build_backbone", "config_from_run", "current_backbone", "heads_config", "init_trainable"]


def build_backbone(cfg: Config, tokenizer: bool = False):
    """(ModelConfig with the run's dtype/remat, float params, tokenizer or None, base model name)."""
    m = cfg.model
    mc, params, tok, name = read_backbone(m.ckpt, m.tiny_seed, tokenizer, m.tokenizer)
    mc = mc.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    params = jax.tree.map(lambda a: jnp.asarray(a, mc.jnp_param_dtype), params)
    return mc, params, tok, name


def heads_config(cfg: Config) -> HeadsConfig:
    h = cfg.heads
    return HeadsConfig(h.num_heads, h.num_layers, h.shared_lm_head, h.root_token or h.sequential, h.sequential)


def deepen(heads: dict, num_layers: int, source: str = "heads.init") -> dict:
    """Heads with `num_layers` ResBlocks from heads with as many or fewer: the added blocks get zero weights and bias,
    so each is the identity (`h + SiLU(0)`) and the heads compute what they did; training then grows them."""
    kernel, bias = heads["blocks"]["kernel"], heads["blocks"]["bias"]
    k, have, e = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
    if have > num_layers:
        raise ValueError(f"{source} has {have} ResBlocks per head, more than heads.num_layers={num_layers}: set "
                         f"heads.num_layers={have} or more")  # fmt: skip
    if have == num_layers:
        return heads
    extra = num_layers - have
    blocks = {"kernel": jnp.concatenate([kernel, jnp.zeros((k, extra, e, e), kernel.dtype)], axis=1),
              "bias": jnp.concatenate([bias, jnp.zeros((k, extra, e), bias.dtype)], axis=1)}  # fmt: skip
    return dict(heads, blocks=blocks)


def init_trainable(cfg: Config, backbone: dict) -> dict:
    hc = heads_config(cfg)
    if cfg.heads.feature:  # a feature drafter: from heads.init, else from the backbone's last layer
        from medusa_jax.feature_drafter import init_feature_drafter, is_feature

        if cfg.heads.init:
            from medusa_jax.heads_io import read_heads

            heads, _ = read_heads(cfg.heads.init)
            if not is_feature(heads):
                raise ValueError(f"heads.init {cfg.heads.init} holds Medusa heads, not a feature drafter")
            heads = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), heads)
        else:
            heads = init_feature_drafter(backbone, seed=cfg.train.seed)
    elif cfg.heads.init:
        from medusa_jax.heads_io import read_heads

        heads, _ = read_heads(cfg.heads.init)
        heads = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), heads)
        k, e = heads["blocks"]["kernel"].shape[0], heads["blocks"]["kernel"].shape[-1]
        if hc.root_token and "root" not in heads:  # plain heads -> root_token heads (zero U: the same outputs)
            heads["root"] = {"kernel": jnp.zeros((k, e, e), jnp.float32)}
        if hc.sequential and "path" not in heads:  # -> sequential heads (zero P: the same outputs)
            heads["path"] = {"kernel": jnp.zeros((k, k - 1, e, e), jnp.float32)}
        elif "root" in heads and not hc.root_token:
            raise ValueError(f"heads.init {cfg.heads.init} holds root_token heads: set heads.root_token=true")
        heads = deepen(heads, hc.num_layers, cfg.heads.init)
    else:
        heads = init_heads(hc, backbone, seed=cfg.train.seed)
    out = {"heads": heads}
    if cfg.train.mode == "medusa2":
        if cfg.lora.rank:
            out["lora"] = init_lora(backbone, cfg.lora.targets, cfg.lora.rank, seed=cfg.train.seed)
        else:
            out["backbone"] = backbone
    return out


def current_backbone(cfg: Config, trainable: dict, frozen: dict) -> dict:
    if "backbone" in trainable:
        return trainable["backbone"]
    return merge(frozen["backbone"], trainable.get("lora"), cfg.lora.rank, cfg.lora.alpha)


def config_from_run(run_dir: str) -> Config:
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        return from_dict(yaml.safe_load(f))
