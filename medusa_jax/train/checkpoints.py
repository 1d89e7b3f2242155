"""A run directory's files: orbax checkpoints (trainable params, optimizer state, data position), the config it
was started with (a resumption must match it), metrics.jsonl, and the exported heads and PEFT adapter."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from medusa_jax.lora import to_peft_tensors
from medusa_jax.run_io import quiet_closed_event_loop, short_error
from medusa_jax.train.config import Config, ConfigError, dump

__all__ = ["RESUME_FREE", "check_run_config", "checkpoint_manager", "export", "quiet_closed_event_loop",
           "restore_checkpoint", "save_checkpoint", "short_error", "trim_metrics"]  # fmt: skip

# settings that may change between a run and its resumption (they do not change the trajectory)
RESUME_FREE = {"train.save_every", "train.log_every", "train.eval_every", "train.keep_checkpoints",
               "train.checkpoint", "data.dev_path", "train.max_bad_steps",
               "mesh.data", "mesh.fsdp", "mesh.tensor"}  # fmt: skip
# (a checkpoint restores onto any mesh: a preempted pod may come back in another shape)


def checkpoint_manager(run_dir: str, cfg: Config):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep_checkpoints, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints")), options=opts)


def save_checkpoint(mngr, step, trainable, opt_state, meta):
    import orbax.checkpoint as ocp

    mngr.save(
        step,
        args=ocp.args.Composite(
            trainable=ocp.args.StandardSave(trainable),
            opt=ocp.args.StandardSave({"leaves": jax.tree.leaves(opt_state)}),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    mngr.wait_until_finished()


def restore_checkpoint(mngr, step, trainable, trainable_sh, opt_state, opt_sh):
    import orbax.checkpoint as ocp

    abstract = lambda t, s: jax.tree.map(lambda x, y: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=y), t, s)
    leaves, treedef = jax.tree.flatten(opt_state)
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            trainable=ocp.args.StandardRestore(abstract(trainable, trainable_sh)),
            opt=ocp.args.StandardRestore({"leaves": abstract(leaves, jax.tree.leaves(opt_sh))}),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return out["trainable"], jax.tree.unflatten(treedef, out["opt"]["leaves"]), out["meta"]


def check_run_config(cfg: Config, run_dir: str) -> None:
    import yaml

    from medusa_jax.train.config import flatten

    path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(path):
        with open(path) as f:
            old = flatten(yaml.safe_load(f))
        new = flatten(cfg.to_dict())
        diff = sorted(k for k in set(old) | set(new) if k not in RESUME_FREE and old.get(k) != new.get(k))
        if diff:
            k = diff[0]
            raise ConfigError(
                f"{run_dir} holds a run with another config ({k}: {old.get(k)!r} there, {new.get(k)!r} now"
                f"{f'; {len(diff) - 1} more' if len(diff) > 1 else ''}): use another run_dir or the same settings"
            )
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(dump(cfg))
        os.replace(tmp, path)


def trim_metrics(path: str, last_step: int) -> None:
    """Keep the metrics lines of steps <= `last_step` (the resumed checkpoint); a line cut short by a kill (no
    newline, not JSON) goes too."""
    if not os.path.exists(path):
        return

    def step_of(line: str) -> int | None:
        try:
            return int(json.loads(line).get("step", 0)) if line.endswith("\n") else None
        except ValueError:
            return None

    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and (step_of(ln) is not None and step_of(ln) <= last_step)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def export(cfg: Config, run_dir: str, trainable: dict, base_name: str, extra: dict) -> str:
    from safetensors.numpy import save_file

    from medusa_jax.cache import chmod_default
    from medusa_jax.heads_io import save_heads

    out = os.path.join(run_dir, "export")
    heads = jax.tree.map(lambda a: np.asarray(a, np.float32), trainable["heads"])
    save_heads(heads, out, base_name, extra_config=extra)
    if "lora" in trainable:  # the adapter in the PEFT layout, each file written under a temporary name first
        lora = jax.tree.map(np.asarray, trainable["lora"])
        st = os.path.join(out, "adapter_model.safetensors")
        save_file(to_peft_tensors(lora), st + ".tmp")
        chmod_default(st + ".tmp")
        os.replace(st + ".tmp", st)
        cfg_path = os.path.join(out, "adapter_config.json")
        with open(cfg_path + ".tmp", "w") as f:
            json.dump({"peft_type": "LORA", "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
                       "target_modules": list(cfg.lora.targets), "base_model_name_or_path": base_name}, f, indent=2)  # fmt: skip
        os.replace(cfg_path + ".tmp", cfg_path)
    return out
