"""The training loop: Medusa-1 (frozen backbone, optionally on precomputed hidden states) and Medusa-2 (LoRA or
full fine-tuning of the backbone together with the heads), sharded over a (data, fsdp, tensor) mesh, checkpointed
with orbax, resumable, exported in the reference heads layout at the end. The parts: `backbone` (model and
trainable params), `losses`, `step` (optimizer and jitted step), `inputs` + `hidden` (batches), `checkpoints`
(run dir), `evaluate`."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import sharding as sh
from medusa_jax.cache import atomic_write_text
from medusa_jax.run_io import save_tokenizer
from medusa_jax.sharding import gather_to_host
from medusa_jax.train import checkpoints as ckpt
from medusa_jax.train.backbone import build_backbone, init_trainable
from medusa_jax.train.config import Config
from medusa_jax.train.evaluate import evaluate
from medusa_jax.train.inputs import prepare_inputs
from medusa_jax.train.step import jit_step, make_optimizer, schedules

__all__ = ["Hooks", "TrainResult", "TrainingError", "TrainingInterrupted", "gather_to_host", "train"]


class TrainingError(Exception):
    """A run that cannot go on (bad data, diverged loss, unreadable checkpoint): one line for the user."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint of the last finished step was written; rerunning the same command resumes."""

    def __init__(self, step: int, run_dir: str):
        super().__init__(
            f"interrupted after step {step}: checkpoint saved in {run_dir}; rerun the same command to resume"
        )
        self.step = step


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Callbacks into the loop (tests inject faults through them). `frozen_for_step(step, frozen)` returns the
    frozen params step `step` (0-based) sees; `after_step(done)` runs after step `done` finished and was saved."""

    frozen_for_step: Callable[[int, dict], dict] | None = None
    after_step: Callable[[int], None] | None = None


@dataclasses.dataclass
class TrainResult:
    losses: list
    step: int
    eval: dict | None
    run_dir: str
    trainable: dict


class _SigintFlag:
    """Turns the first Ctrl-C into a flag the loop checks between steps (a second one interrupts at once)."""

    def __init__(self):
        self.hit = False
        self.prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.hit = True
        signal.signal(signal.SIGINT, self.prev or signal.default_int_handler)

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)


def _record(aux, done: int, k_heads: int, bad_steps: int) -> dict:
    """A metrics.jsonl line from the step's aux (host numpy)."""
    finite = lambda x: float(x) if np.isfinite(x) else None  # noqa: E731
    rec = {"step": done, "loss": finite(aux["loss"]), "heads_loss": finite(aux["heads_loss"]),
           "skipped_steps": bad_steps}  # fmt: skip
    for k in range(k_heads):
        rec[f"head{k}_loss"] = float(aux["head_loss"][k])
        rec[f"head{k}_top1"] = float(aux["head_acc"][k])
    if "backbone_loss" in aux:
        rec["backbone_loss"] = float(aux["backbone_loss"])
        rec["lambda0"] = float(aux["lambda0"])
    return rec


def train(cfg: Config, progress: bool = True, hooks: Hooks | None = None) -> TrainResult:
    from tqdm import tqdm

    hooks = hooks or Hooks()
    run_dir = cfg.run_dir
    ckpt.check_run_config(cfg, run_dir)
    is_main = jax.process_index() == 0
    mesh = sh.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    mc, backbone, _, base_name = build_backbone(cfg)
    if is_main:
        save_tokenizer(cfg.model.ckpt, cfg.model.tokenizer, run_dir)  # decode.py --ckpt RUN_DIR reads text with it
    k_heads = cfg.heads.num_heads
    inp = prepare_inputs(cfg, mc, backbone, mesh, run_dir, log=print if is_main else lambda *_: None)
    trainable = init_trainable(cfg, backbone)
    per_step = inp.per_step

    trainable_sh = sh.param_shardings(trainable, mesh)
    frozen_sh = sh.param_shardings(inp.frozen, mesh)
    trainable = jax.device_put(trainable, trainable_sh)
    frozen = jax.device_put(inp.frozen, frozen_sh)
    opt_state = jax.jit(make_optimizer(cfg).init)(trainable)
    opt_sh = sh.state_shardings(opt_state, trainable_sh, mesh)
    opt_state = jax.device_put(opt_state, opt_sh)
    batch_sh = {k: sh.batch_sharding(mesh, d) for k, d in inp.batch_dims.items()}
    jstep = jit_step(cfg, mc, inp.flat, trainable_sh, opt_sh, frozen_sh, batch_sh, sh.replicated(mesh))

    mngr = ckpt.checkpoint_manager(run_dir, cfg) if cfg.train.checkpoint else None
    start = 0
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if mngr is not None and mngr.latest_step() is not None:
        start = int(mngr.latest_step())
        ckpt.quiet_closed_event_loop()
        try:
            trainable, opt_state, meta = ckpt.restore_checkpoint(
                mngr, start, trainable, trainable_sh, opt_state, opt_sh
            )
        except Exception as e:  # orbax / tensorstore errors carry pages of spec; keep the gist
            mngr.close()
            raise TrainingError(
                f"cannot restore {run_dir}/checkpoints/{start} ({ckpt.short_error(e)}): delete that step directory to "
                "resume from an earlier checkpoint, or use a new run_dir"
            ) from None
        if meta.get("data_position") != start * per_step:
            raise RuntimeError(f"checkpoint {start}: data position {meta.get('data_position')} != {start * per_step}")
        if is_main:
            print(f"resuming {run_dir} from step {start}")
    if is_main:
        ckpt.trim_metrics(metrics_path, start)

    sc = schedules(cfg)
    bad_steps = 0
    losses = []
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and is_main), unit="step")
    mf = open(metrics_path, "a") if is_main else None  # noqa: SIM115
    t_last, tok_since = time.perf_counter(), 0
    eval_res = None

    def save(step):
        meta = {"step": step, "data_position": step * per_step, "rng_seed": cfg.train.seed}
        ckpt.save_checkpoint(mngr, step, trainable, opt_state, meta)

    sigint = _SigintFlag()
    try:
        sigint.__enter__()
        for step in range(start, cfg.train.steps):
            batch = inp.batch(step, mesh, cfg.train.seed)
            fz = hooks.frozen_for_step(step, frozen) if hooks.frozen_for_step else frozen
            trainable, opt_state, aux = jstep(trainable, opt_state, fz, batch, jnp.int32(step))
            tok_since += inp.tokens_per_step
            done = step + 1
            if bool(aux["skipped"]):
                bad_steps += 1
                if is_main:
                    tqdm.write(f"step {done}: loss or gradient not finite; update skipped ({bad_steps} so far)")
                if bad_steps > cfg.train.max_bad_steps:
                    raise TrainingError(
                        f"{bad_steps} steps with a non-finite loss or gradient (the latest at step {done}), more "
                        f"than train.max_bad_steps={cfg.train.max_bad_steps}: lower the learning rates or check the "
                        "data; the last checkpoint holds finite parameters"
                    )
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                dt = time.perf_counter() - t_last
                rec = _record(jax.device_get(aux), done, k_heads, bad_steps)
                rec.update(lr_heads=float(sc["heads"](step)), lr_backbone=float(sc["backbone"](step)),
                           grad_norm=float(aux["grad_norm"]), tokens_per_s=round(tok_since / max(dt, 1e-9), 1))  # fmt: skip
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and inp.dev is not None:
                    ev = evaluate(cfg, mc, trainable, inp.eval_frozen, inp.dev, mesh, inp.flat)
                    rec.update({f"dev_head{k}_top1": ev["top1"][k] for k in range(k_heads)})
                    rec.update({f"dev_{key}": ev[key] for key in ("kl", "agree") if key in ev})
                loss = float(aux["loss"])
                losses.append(loss)
                if mf is not None:
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                bar.set_postfix(loss=f"{loss:.3f}", top1=f"{rec['head0_top1']:.2f}")
                t_last, tok_since = time.perf_counter(), 0
            bar.update(1)
            if mngr is not None and cfg.train.save_every and done % cfg.train.save_every == 0:
                save(done)
            if hooks.after_step:
                hooks.after_step(done)
            if sigint.hit:
                if mngr is not None and mngr.latest_step() != done:
                    save(done)
                bar.close()
                raise TrainingInterrupted(done, run_dir)
        bar.close()
        final = cfg.train.steps
        if mngr is not None and mngr.latest_step() != final:
            save(final)
        if inp.dev is not None:
            eval_res = evaluate(cfg, mc, trainable, inp.eval_frozen, inp.dev, mesh, inp.flat)
            if is_main:
                with open(os.path.join(run_dir, "eval.json"), "w") as f:
                    json.dump(eval_res, f, indent=1)
                print("dev accuracy per head: top1", eval_res["top1"], "top5", eval_res["top5"])
                if "kl" in eval_res:
                    print(f"dev KL(original || trained) {eval_res['kl']}, same greedy token {eval_res['agree']:.2%}")
        host = gather_to_host(trainable)  # a collective: every process takes part
        if is_main:
            extra = {"medusa_jax_train": {"mode": cfg.train.mode, "steps": final, "dev": eval_res}}
            out = ckpt.export(cfg, run_dir, host, base_name, extra)
            vocab = os.path.join(run_dir, "draft_vocab.json")  # a feature drafter's (`heads.draft_vocab`)
            if cfg.heads.draft_vocab and os.path.exists(vocab):
                with open(vocab) as f:
                    atomic_write_text(os.path.join(out, "draft_vocab.json"), f.read())
    finally:
        sigint.__exit__()
        if mf is not None:
            mf.close()
        if mngr is not None:
            mngr.close()  # waits for an asynchronous save to finish
    return TrainResult(losses, cfg.train.steps, eval_res, run_dir, trainable)
