"""The optimizer (AdamW per group: heads, backbone/LoRA; warm-up + cosine schedules) and the jitted train step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from medusa_jax.config import ModelConfig
from medusa_jax.train.config import Config
from medusa_jax.train.losses import make_loss


def schedules(cfg: Config):
    t = cfg.train
    lr_b = t.lr_backbone or t.lr_heads / 4

    def sched(peak):
        warm = min(t.warmup_steps, max(t.steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(t.steps, warm + 1), peak * t.min_lr_ratio)

    return {"heads": sched(t.lr_heads), "backbone": sched(lr_b)}


def make_optimizer(cfg: Config):
    sc = schedules(cfg)
    wd = cfg.train.weight_decay

    def labels(tree):
        return {k: jax.tree.map(lambda _, k=k: "heads" if k == "heads" else "backbone", v) for k, v in tree.items()}

    return optax.chain(
        optax.clip_by_global_norm(cfg.train.grad_clip) if cfg.train.grad_clip > 0 else optax.identity(),
        optax.multi_transform(
            {
                "heads": optax.adamw(sc["heads"], weight_decay=wd),
                "backbone": optax.adamw(sc["backbone"], weight_decay=wd),
            },
            labels,
        ),
    )


def trajectory_key(cfg: Config) -> Config:
    """The config without the settings that do not change the compiled step (runs that differ only in those share
    one compilation: the step is a module-level function whose static arguments are this key)."""
    t = dataclasses.replace(cfg.train, save_every=0, log_every=1, eval_every=0, checkpoint=True, keep_checkpoints=1)
    return dataclasses.replace(cfg, run_dir="", train=t)


def train_step(cfg: Config, mc: ModelConfig, flat: bool, trainable, opt_state, frozen, batch, step):
    """One update -> (trainable, opt_state, aux). A non-finite loss or gradient skips the update (parameters and
    optimizer state stay as they were; `aux["skipped"]` says so)."""
    tx = make_optimizer(cfg)
    loss_fn = make_loss(cfg, mc, flat)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, step)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    aux = dict(aux, loss=loss, grad_norm=grad_norm, skipped=~ok)
    return keep(new_trainable, trainable), keep(new_opt, opt_state), aux


def jit_step(cfg: Config, mc: ModelConfig, flat: bool, trainable_sh, opt_sh, frozen_sh, batch_sh, rep):
    """`train_step` jitted with its shardings, donating trainable and optimizer state:
    f(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, aux); `f.lower(...)` with the same
    (possibly abstract) arguments lowers it."""
    jitted = jax.jit(
        train_step,
        static_argnums=(0, 1, 2),
        in_shardings=(trainable_sh, opt_sh, frozen_sh, batch_sh, rep),
        out_shardings=(trainable_sh, opt_sh, rep),
        donate_argnums=(3, 4),
    )
    static = (trajectory_key(cfg), mc, flat)
    mesh = rep.mesh

    class Step:
        def __call__(self, *args):
            with jax.set_mesh(mesh):
                return jitted(*static, *args)

        def lower(self, *args):
            with jax.set_mesh(mesh):
                return jitted.lower(*static, *args)

    return Step()
