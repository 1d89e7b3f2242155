"""The training loop: Medusa-1 (frozen backbone, optionally on precomputed hidden states) and Medusa-2 (LoRA or
full fine-tuning of the backbone together with the heads), sharded over a (data, fsdp, tensor) mesh, checkpointed
with orbax, resumable, exported in the reference heads layout at the end."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medusa_jax.config import ModelConfig
from medusa_jax.heads import HeadsConfig, base_lm_head, heads_logits, init_heads, root_embedding, uses_root
from medusa_jax.model import Transformer, causal_mask, init_params
from medusa_jax.train import data as data_lib
from medusa_jax.train import lora as lora_lib
from medusa_jax.train import sharding as sh
from medusa_jax.train.config import Config, ConfigError, dump, from_dict

# settings that may change between a run and its resumption (they do not change the trajectory)
RESUME_FREE = {"train.save_every", "train.log_every", "train.eval_every", "train.keep_checkpoints",
               "train.checkpoint", "data.dev_path", "train.max_bad_steps"}  # fmt: skip
TINY = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    max_position_embeddings=512, eos_token_ids=(0,),
)  # fmt: skip
CRASH_ENV = "MEDUSA_JAX_TRAIN_CRASH_AT"  # tests: stop abruptly after this step (simulated kill)
SIGINT_ENV = "MEDUSA_JAX_TRAIN_SIGINT_AT"  # tests: send ourselves SIGINT (Ctrl-C) after this step
NAN_ENV = "MEDUSA_JAX_TRAIN_NAN_AT"  # tests: comma-separated steps whose loss is made NaN (fault injection)


class SimulatedKill(SystemExit):
    pass


class TrainingError(Exception):
    """A run that cannot go on (bad data, diverged loss, unreadable checkpoint): one line for the user."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint of the last finished step was written; rerunning the same command resumes."""

    def __init__(self, step: int, run_dir: str):
        super().__init__(
            f"interrupted after step {step}: checkpoint saved in {run_dir}; rerun the same command to resume"
        )
        self.step = step


class _SigintFlag:
    """Turns the first Ctrl-C into a flag the loop checks between steps (a second one interrupts at once)."""

    def __init__(self):
        self.hit = False
        self.prev = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        self.hit = True
        signal.signal(signal.SIGINT, self.prev or signal.default_int_handler)

    def __exit__(self, *exc):
        import signal

        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)


# ---------------------------------------------------------------------------------------------- model
def build_backbone(cfg: Config, tokenizer: bool = False):
    """(ModelConfig with the run's dtype/remat, float params, tokenizer or None, base model name)."""
    m = cfg.model
    tok = None
    if m.ckpt == "tiny":
        mc, name = TINY, "tiny"
        if m.tokenizer:  # the tiny random backbone speaks this tokenizer's vocabulary
            from medusa_jax.train.run_dir import source_tokenizer

            tok = source_tokenizer(cfg)
            mc = TINY.replace(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,))
            tok = tok if tokenizer else None
        params = init_params(mc, seed=m.tiny_seed)
    else:
        from medusa_jax import checkpoint

        path = checkpoint.resolve(None if m.ckpt == "default" else m.ckpt)
        mc, params = checkpoint.read_backbone(path)
        name = m.ckpt if m.ckpt != "default" else "HuggingFaceTB/SmolLM2-135M-Instruct"
        if tokenizer:
            from medusa_jax.tokenizer import load_tokenizer

            tok = load_tokenizer(path)
    mc = mc.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    params = jax.tree.map(lambda a: jnp.asarray(a, mc.jnp_param_dtype), params)
    return mc, params, tok, name


def heads_config(cfg: Config) -> HeadsConfig:
    h = cfg.heads
    return HeadsConfig(h.num_heads, h.num_layers, h.shared_lm_head, h.root_token)


def init_trainable(cfg: Config, backbone: dict) -> dict:
    hc = heads_config(cfg)
    if cfg.heads.init:
        from medusa_jax.heads_io import read_heads

        heads, _ = read_heads(cfg.heads.init)
        heads = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), heads)
        if hc.root_token and "root" not in heads:  # plain heads -> root_token heads (zero U: the same outputs)
            e = heads["blocks"]["kernel"].shape[-1]
            heads["root"] = {"kernel": jnp.zeros((heads["blocks"]["kernel"].shape[0], e, e), jnp.float32)}
        elif "root" in heads and not hc.root_token:
            raise ValueError(f"heads.init {cfg.heads.init} holds root_token heads: set heads.root_token=true")
    else:
        heads = init_heads(hc, backbone, seed=cfg.train.seed)
    out = {"heads": heads}
    if cfg.train.mode == "medusa2":
        if cfg.lora.rank:
            out["lora"] = lora_lib.init_lora(backbone, cfg.lora.targets, cfg.lora.rank, seed=cfg.train.seed)
        else:
            out["backbone"] = backbone
    return out


def current_backbone(cfg: Config, trainable: dict, frozen: dict) -> dict:
    if "backbone" in trainable:
        return trainable["backbone"]
    return lora_lib.merge(frozen["backbone"], trainable.get("lora"), cfg.lora.rank, cfg.lora.alpha)


# ---------------------------------------------------------------------------------------------- losses
def jnp_roots(ids):
    """ids `[B, L]` -> the root token at each position `[B, L]` (teacher forcing: token t+1; 0 after the end)."""
    return jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)


def jnp_targets(ids, mask, k_heads):
    """ids, mask `[B, L]` -> head targets `[B, L, K]` (token t+k+2) and weights (1 where it is an answer token)."""
    b, length = ids.shape
    tg, ws = [], []
    for k in range(k_heads):
        s = k + 2
        pad = jnp.zeros((b, min(s, length)), ids.dtype)
        tg.append(jnp.concatenate([ids[:, s:], pad], axis=1)[:, :length])
        ws.append(jnp.concatenate([mask[:, s:], pad], axis=1)[:, :length])
    return jnp.stack(tg, -1), jnp.stack(ws, -1).astype(jnp.float32)


def heads_loss(heads, hidden, lm_head, tgt, w, decay, dtype, root_emb=None, teacher=None, soft=None):
    """Σ_k decay^k CE(head_k(h_t), y_{t+k+2}) averaged over weighted positions; also per-head loss and top-1.
    root_emb `[..., E]`: embeddings of the tokens t+1, for root_token heads. With `teacher` (the base model's logits
    `[K, ..., V]` at position t+k+1, i.e. its distribution over y_{t+k+2}) and `soft` `[..., K]` (the weight of the
    teacher's distribution per target, 0 where it is not available), each target's loss is
    (1 - soft) · CE(one-hot y) + soft · CE(softmax(teacher)): self-distillation with soft labels."""
    logits = heads_logits(heads, hidden, lm_head, dtype, root_emb)  # [K, ..., V]
    k = logits.shape[0]
    tgt_k, w_k = jnp.moveaxis(tgt, -1, 0), jnp.moveaxis(w, -1, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt_k[..., None], axis=-1)[..., 0]
    nll = logz - picked
    if teacher is not None:
        p_t = jax.nn.softmax(jax.lax.stop_gradient(teacher).astype(jnp.float32), axis=-1)
        soft_ce = logz - (p_t * logits).sum(-1)
        s_k = jnp.moveaxis(soft, -1, 0)
        nll = (1.0 - s_k) * nll + s_k * soft_ce
    axes = tuple(range(1, nll.ndim))
    denom = jnp.maximum(w_k.sum(axes), 1.0)
    per_head = (nll * w_k).sum(axes) / denom
    acc = ((jnp.argmax(logits, -1) == tgt_k) * w_k).sum(axes) / denom
    lam = decay ** jnp.arange(k, dtype=jnp.float32)
    return (lam * per_head).sum(), per_head, acc


def eval_counts(heads, hidden, lm_head, tgt, w, dtype, topk=5, root_emb=None):
    """Per-head (top-1 hits, top-5 hits, count) over weighted positions."""
    logits = heads_logits(heads, hidden, lm_head, dtype, root_emb)
    tgt_k, w_k = jnp.moveaxis(tgt, -1, 0), jnp.moveaxis(w, -1, 0)
    picked = jnp.take_along_axis(logits, tgt_k[..., None], axis=-1)
    rank = (logits > picked).sum(-1)  # how many tokens score above the target (cheaper than a top-k sort)
    hit1, hit5 = rank < 1, rank < topk
    axes = tuple(range(1, w_k.ndim))
    return (hit1 * w_k).sum(axes), (hit5 * w_k).sum(axes), w_k.sum(axes)


def forward_hidden(mc: ModelConfig, params, ids):
    model = Transformer(mc)
    b, t = ids.shape
    hidden, _ = model.apply({"params": params}, ids, jnp.broadcast_to(jnp.arange(t), (b, t)), causal_mask(t))
    return hidden


def base_logits(mc: ModelConfig, params, hidden):
    model = Transformer(mc)
    return model.apply({"params": params}, hidden, method=model.logits)


def lambda0_at(cfg: Config, step):
    t = cfg.train
    if t.heads_warmup_steps <= 0:
        return jnp.float32(t.lambda0)
    frac = jnp.minimum(1.0, (step.astype(jnp.float32) + 1.0) / t.heads_warmup_steps)
    return t.lambda0 * jnp.sin(0.5 * math.pi * frac)


def jnp_teach(w):
    """Target weights `[B, L, K]` -> where the heads get soft labels `[B, L, K]`: the rule of `flat_tokens` (every
    target but each row's last answer token), so that both training paths compute the same loss."""
    sel = w.sum(-1) > 0
    b, length = sel.shape
    cols = [jnp.concatenate([sel[:, k + 1 :], jnp.zeros((b, min(k + 1, length)), bool)], 1) for k in range(w.shape[-1])]
    return jnp.stack(cols, -1) & (w > 0)


def shifted_teacher(logits, k_heads):
    """Base logits `[B, L, V]` -> head k's soft labels at position t, the base distribution at t+k+1 `[K, B, L, V]`
    (zeros past the end, where no head has a target)."""
    b, length, v = logits.shape
    out = []
    for k in range(k_heads):
        s = min(k + 1, length)
        out.append(jnp.concatenate([logits[:, s:], jnp.zeros((b, s, v), logits.dtype)], axis=1))
    return jnp.stack(out)


def make_loss(cfg: Config, mc: ModelConfig, flat: bool):
    k_heads, decay, dtype = cfg.heads.num_heads, cfg.train.decay, mc.jnp_dtype
    soft = cfg.train.distill_weight

    def loss_fn(trainable, frozen, batch, step):
        heads = trainable["heads"]
        if flat:
            root_emb = root_embedding(frozen, batch["roots"]) if uses_root(heads) else None
            lm = frozen["lm_head"]["kernel"]
            teacher, sw = None, None
            if soft:  # the base model's distribution at t+k+1, from that position's cached hidden state
                teacher = jnp.einsum("bke,ev->kbv", batch["teacher_hidden"].astype(dtype), lm.astype(dtype))
                sw = soft * batch["teach"].astype(jnp.float32)
            hl, per, acc = heads_loss(heads, batch["hidden"], lm, batch["targets"], batch["weights"], decay, dtype,
                                      root_emb, teacher, sw)  # fmt: skip
            return hl, {"heads_loss": hl, "head_loss": per, "head_acc": acc}
        ids, mask = batch["input_ids"], batch["loss_mask"]
        if cfg.train.mode == "medusa1":
            backbone = jax.lax.stop_gradient(frozen["backbone"])
        else:
            backbone = current_backbone(cfg, trainable, frozen)
        hidden = forward_hidden(mc, backbone, ids)
        tgt, w = jnp_targets(ids, mask, k_heads)
        root_emb = root_embedding(backbone, jnp_roots(ids)) if uses_root(heads) else None
        logits = base_logits(mc, backbone, hidden) if soft or cfg.train.mode == "medusa2" else None
        # soft labels: the (current) backbone's own distribution, which the decode loop verifies against
        teacher = shifted_teacher(logits, k_heads) if soft else None
        hl, per, acc = heads_loss(heads, hidden, base_lm_head(backbone), tgt, w, decay, dtype, root_emb, teacher,
                                  soft * jnp_teach(w) if soft else None)  # fmt: skip
        aux = {"heads_loss": hl, "head_loss": per, "head_acc": acc}
        if cfg.train.mode == "medusa1":
            return hl, aux
        logits = logits[:, :-1]
        w1 = mask[:, 1:].astype(jnp.float32)
        denom = jnp.maximum(w1.sum(), 1.0)
        logp = jax.nn.log_softmax(logits)
        if cfg.train.backbone_loss == "ce":
            nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            lb = (nll * w1).sum() / denom
        else:
            teacher = jax.lax.stop_gradient(
                base_logits(mc, frozen["backbone"], forward_hidden(mc, frozen["backbone"], ids))[:, :-1]
            )
            tlogp = jax.nn.log_softmax(teacher)
            kl = (jnp.exp(tlogp) * (tlogp - logp)).sum(-1)
            lb = (kl * w1).sum() / denom
        lam0 = lambda0_at(cfg, step)
        aux.update(backbone_loss=lb, lambda0=lam0)
        return lb + lam0 * hl, aux

    return loss_fn


# ---------------------------------------------------------------------------------------------- optimizer
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


# ---------------------------------------------------------------------------------------------- precompute
def flat_chunks(ids: np.ndarray, mask: np.ndarray, rows_per_batch: int = 16):
    """The forward batches of `precompute_flat`, in order: (row indices, padded length); rows sorted by length."""
    lengths = np.maximum((ids != 0).cumsum(1).argmax(1) + 1, (mask > 0).cumsum(1).argmax(1) + 1)
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), rows_per_batch):
        idx = order[i : i + rows_per_batch]
        yield idx, min(int(-(-int(lengths[idx].max()) // 32) * 32), ids.shape[1])


def flat_tokens(ids: np.ndarray, mask: np.ndarray, k_heads: int, rows_per_batch: int = 16):
    """The token side of `precompute_flat` (no backbone), for the positions with at least one answer target, in its
    order: targets `[M, K]`, weights `[M, K]`, root tokens `[M]` (token t+1, what root_token heads see) and
    `teach` `[M, K]` bool: position t+k+1 (where the base model predicts head k's target) is flat index i+k+1.
    Each row's positions are contiguous, so that holds for every target but a row's last token (its predictor,
    two before the end, has no target of its own)."""
    tgt, w = data_lib.head_targets(ids, mask, k_heads)
    nxt = np.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    tg, ws, rt, te = [], [], [], []
    for idx, length in flat_chunks(ids, mask, rows_per_batch):
        wc = w[idx, :length]
        sel = wc.sum(-1) > 0
        teach = np.zeros(wc.shape, bool)
        for k in range(k_heads):
            teach[:, : length - k - 1, k] = sel[:, k + 1 :]
        tg.append(tgt[idx, :length][sel])
        ws.append(wc[sel])
        rt.append(nxt[idx, :length][sel])
        te.append((teach & (wc > 0))[sel])
    return np.concatenate(tg), np.concatenate(ws), np.concatenate(rt), np.concatenate(te)


def teacher_index(idx: np.ndarray, k_heads: int, n: int) -> np.ndarray:
    """Flat indices `[B]` -> `[B, K]` of the positions whose base distribution is head k's soft label (i+k+1; valid
    where `flat_tokens`' `teach` says so)."""
    return np.minimum(idx[:, None] + np.arange(1, k_heads + 1), n - 1)


def precompute_flat(mc, backbone, ids, mask, k_heads, mesh, rows_per_batch=16):
    """Frozen backbone over all rows -> flat arrays of the positions with at least one answer target:
    hidden `[M, E]` (float32), then targets, weights, root tokens and teacher positions (see `flat_tokens`)."""
    fwd = jax.jit(functools.partial(forward_hidden, mc), out_shardings=sh.replicated(mesh))
    params = jax.device_put(backbone, sh.param_shardings(backbone, mesh))
    _, w = data_lib.head_targets(ids, mask, k_heads)
    hid = []
    from tqdm import tqdm

    bar = tqdm(total=len(ids), desc="hidden states", unit="row", disable=jax.process_index() != 0)
    n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
    for idx, length in flat_chunks(ids, mask, rows_per_batch):
        rows = -(-len(idx) // n_dev) * n_dev
        x = np.zeros((rows, length), np.int32)
        x[: len(idx)] = ids[idx, :length]
        xg = sh.shard_global(x, sh.batch_sharding(mesh, 2))
        h = np.asarray(fwd(params, xg).addressable_data(0), np.float32)[: len(idx)]
        hid.append(h[w[idx, :length].sum(-1) > 0])
        bar.update(len(idx))
    bar.close()
    return (np.concatenate(hid), *flat_tokens(ids, mask, k_heads, rows_per_batch))


# ---------------------------------------------------------------------------------------------- checkpoints
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


# ---------------------------------------------------------------------------------------------- run dir
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
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def export(cfg: Config, run_dir: str, trainable: dict, base_name: str, extra: dict) -> str:
    from safetensors.numpy import save_file

    from medusa_jax.heads_io import chmod_default, save_heads

    out = os.path.join(run_dir, "export")
    heads = jax.tree.map(lambda a: np.asarray(a, np.float32), trainable["heads"])
    save_heads(heads, out, base_name, extra_config=extra)
    if "lora" in trainable:  # the adapter in the PEFT layout, each file written under a temporary name first
        lora = jax.tree.map(np.asarray, trainable["lora"])
        st = os.path.join(out, "adapter_model.safetensors")
        save_file(lora_lib.to_peft_tensors(lora), st + ".tmp")
        chmod_default(st + ".tmp")
        os.replace(st + ".tmp", st)
        cfg_path = os.path.join(out, "adapter_config.json")
        with open(cfg_path + ".tmp", "w") as f:
            json.dump({"peft_type": "LORA", "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
                       "target_modules": list(cfg.lora.targets), "base_model_name_or_path": base_name}, f, indent=2)  # fmt: skip
        os.replace(cfg_path + ".tmp", cfg_path)
    return out


# ---------------------------------------------------------------------------------------------- main loop
@dataclasses.dataclass
class TrainResult:
    losses: list
    step: int
    eval: dict | None
    run_dir: str
    trainable: dict


def gather_to_host(tree):
    """Global (possibly multi-process sharded) arrays -> numpy on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def evaluate(cfg, mc, trainable, frozen, dev, mesh, flat: bool, batch_rows: int = 8) -> dict:
    """Per-head top-1 / top-5 accuracy on the dev answers (dev arrays are replicated on every device); for Medusa-2
    also `kl`, the mean KL(p_original ‖ p_trained) of the next-token distributions over the answer positions, and
    `agree`, the fraction of those positions where both models' greedy token is the same."""
    rep = sh.replicated(mesh)
    dev = tuple(sh.shard_global(np.asarray(x), rep) for x in dev)
    k = cfg.heads.num_heads
    heads = trainable["heads"]
    dtype = mc.jnp_dtype
    if flat:
        h, tg, ws, rt = dev

        @jax.jit
        def fn(hd, lm, emb, x, t, w, r):
            root_emb = root_embedding({"embed": emb}, r) if uses_root(hd) else None
            return eval_counts(hd, x, lm, t, w, dtype, root_emb=root_emb)

        lm = sh.shard_global(np.asarray(base_lm_head(frozen["backbone"])), rep)
        emb = frozen["backbone"]["embed"]
        tot = np.zeros((3, k))
        for i in range(0, len(h), 512):
            sl = slice(i, i + 512)
            tot += np.asarray(jax.device_get(fn(heads, lm, emb, h[sl], tg[sl], ws[sl], rt[sl])))
    else:
        ids, mask = dev
        backbone = current_backbone(cfg, trainable, frozen)
        # Medusa-2: how far the trained backbone moved from the original on the dev answers
        teacher = frozen.get("backbone") if cfg.train.mode == "medusa2" else None

        @jax.jit
        def fn(bb, hd, x, m):
            hidden = forward_hidden(mc, bb, x)
            t, w = jnp_targets(x, m, k)
            root_emb = root_embedding(bb, jnp_roots(x)) if uses_root(hd) else None
            return eval_counts(hd, hidden, base_lm_head(bb), t, w, dtype, root_emb=root_emb)

        tot, drift = np.zeros((3, k)), np.zeros(3)
        for i in range(0, len(ids), batch_rows):
            x, m = ids[i : i + batch_rows], mask[i : i + batch_rows]
            tot += np.asarray(jax.device_get(fn(backbone, heads, x, m)))
            if teacher is not None:
                drift += np.asarray(jax.device_get(_drift_fn(mc)(backbone, teacher, x, m)))
    n = np.maximum(tot[2], 1)
    out = {"top1": (tot[0] / n).round(4).tolist(), "top5": (tot[1] / n).round(4).tolist(), "positions": int(tot[2][0])}
    if not flat and teacher is not None:
        out.update(kl=round(float(drift[0] / max(drift[2], 1)), 5), agree=round(float(drift[1] / max(drift[2], 1)), 4))
    return out


@functools.lru_cache(maxsize=8)
def _drift_fn(mc: ModelConfig):
    """(Σ KL(p_original ‖ p_trained), Σ [argmax equal], count) over the answer positions' next-token predictions."""

    @jax.jit
    def fn(student, teacher, x, m):
        w = m[:, 1:].astype(jnp.float32)
        logp = jax.nn.log_softmax(base_logits(mc, student, forward_hidden(mc, student, x))[:, :-1])
        tlogp = jax.nn.log_softmax(base_logits(mc, teacher, forward_hidden(mc, teacher, x))[:, :-1])
        kl = (jnp.exp(tlogp) * (tlogp - logp)).sum(-1)
        same = jnp.argmax(logp, -1) == jnp.argmax(tlogp, -1)
        return jnp.stack([(kl * w).sum(), (same * w).sum(), w.sum()])

    return fn


_STEP_CACHE: dict = {}  # compiled train steps, reused by runs of the same settings in one process (tests)


def _trajectory_key(cfg: Config) -> Config:
    """The config without the settings that do not change the compiled step."""
    t = dataclasses.replace(cfg.train, save_every=0, log_every=1, eval_every=0, checkpoint=True, keep_checkpoints=1)
    return dataclasses.replace(cfg, run_dir="", train=t)


def make_step(cfg: Config, mc: ModelConfig, flat: bool, tx):
    loss_fn = make_loss(cfg, mc, flat)

    def step_fn(trainable, opt_state, frozen, batch, step, poison):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, step)
        loss = loss + poison  # 0, or NaN when a test injects a fault
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # a non-finite loss or gradient skips the update (parameters and optimizer state stay as they were)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        aux = dict(aux, loss=loss, grad_norm=grad_norm, skipped=~ok)
        return keep(new_trainable, trainable), keep(new_opt, opt_state), aux

    return step_fn


def train(cfg: Config, progress: bool = True) -> TrainResult:
    from tqdm import tqdm

    run_dir = cfg.run_dir
    check_run_config(cfg, run_dir)
    is_main = jax.process_index() == 0
    mesh = sh.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    mc, backbone, _, base_name = build_backbone(cfg)
    if is_main:
        from medusa_jax.train.run_dir import save_tokenizer

        save_tokenizer(cfg, run_dir)  # decode.py --ckpt RUN_DIR reads text with it
    flat = cfg.train.mode == "medusa1" and cfg.train.precompute_hidden
    k_heads = cfg.heads.num_heads

    parts = data_lib.load_data_parts(cfg, mc.vocab_size)
    ids, mask = data_lib.pack([row for part in parts for row in part], cfg.data.max_len)
    dev_rows = data_lib.load_data_rows(cfg, mc.vocab_size, dev=True) if (cfg.data.dev_path if cfg.data.kind == "distill" else cfg.data.synthetic_dev_rows) else None  # fmt: skip
    dev = None
    if flat:
        cache = os.path.join(run_dir, "cache")
        hidden_of = functools.partial(cached_hidden, cache, mc, backbone, k_heads, mesh, cfg.data.max_len)
        ftrain = hidden_of("train", parts)
        if dev_rows is not None:
            dev = hidden_of("dev", [dev_rows])[:4]  # hidden, targets, weights, roots
        lm = base_lm_head(backbone)
        if cfg.train.vocab_subset:  # softmax over the tokens that occur as training targets only (cheaper)
            subset = np.unique(ftrain[1][ftrain[2] > 0])
            ftrain = (
                ftrain[0],
                np.searchsorted(subset, ftrain[1]).clip(0, len(subset) - 1).astype(np.int32),
                *ftrain[2:],
            )
            lm = lm[:, subset]
            if is_main:
                print(f"vocab subset: {len(subset)} of {mc.vocab_size} tokens")
        frozen = {"lm_head": {"kernel": lm}}
        if cfg.heads.root_token:
            frozen["embed"] = backbone["embed"]
        eval_frozen = {"backbone": {k: v for k, v in backbone.items() if k in ("embed", "lm_head")}}
        n_items, per_step = len(ftrain[0]), cfg.train.batch_tokens
    else:
        if dev_rows is not None:
            dev = data_lib.pack(dev_rows, cfg.data.max_len)
        n_items, per_step = len(ids), cfg.train.batch_size
        frozen = {"backbone": backbone}
        if cfg.train.mode == "medusa2" and not cfg.lora.rank:  # full fine-tuning: the teacher only for KL
            frozen = {"backbone": jax.tree.map(jnp.copy, backbone)} if cfg.train.backbone_loss == "kl" else {}
        eval_frozen = frozen
    trainable = init_trainable(cfg, backbone)

    tx = make_optimizer(cfg)
    trainable_sh = sh.param_shardings(trainable, mesh)
    frozen_sh = sh.param_shardings(frozen, mesh)
    trainable = jax.device_put(trainable, trainable_sh)
    frozen = jax.device_put(frozen, frozen_sh)
    opt_state = jax.jit(tx.init)(trainable)
    opt_sh = sh.state_shardings(opt_state, trainable_sh, mesh)
    opt_state = jax.device_put(opt_state, opt_sh)
    rep = sh.replicated(mesh)

    batch_dims = {"hidden": 2, "targets": 2, "weights": 2, "roots": 1} if flat else {"input_ids": 2, "loss_mask": 2}
    if flat and cfg.train.distill_weight:
        batch_dims.update(teacher_hidden=3, teach=2)
    batch_sh = {k: sh.batch_sharding(mesh, d) for k, d in batch_dims.items()}
    key = (_trajectory_key(cfg), mc, flat, mesh, jax.tree.structure(trainable), jax.tree.structure(frozen))
    jstep = _STEP_CACHE.get(key)
    if jstep is None:
        jstep = _STEP_CACHE[key] = jax.jit(
            make_step(cfg, mc, flat, tx),
            in_shardings=(trainable_sh, opt_sh, frozen_sh, batch_sh, rep, rep),
            out_shardings=(trainable_sh, opt_sh, rep),
            donate_argnums=(0, 1),
        )

    mngr = checkpoint_manager(run_dir, cfg) if cfg.train.checkpoint else None
    start = 0
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if mngr is not None and mngr.latest_step() is not None:
        start = int(mngr.latest_step())
        quiet_closed_event_loop()
        try:
            trainable, opt_state, meta = restore_checkpoint(mngr, start, trainable, trainable_sh, opt_state, opt_sh)
        except Exception as e:  # orbax / tensorstore errors carry pages of spec; keep the gist
            mngr.close()
            raise TrainingError(
                f"cannot restore {run_dir}/checkpoints/{start} ({short_error(e)}): delete that step directory to "
                "resume from an earlier checkpoint, or use a new run_dir"
            ) from None
        if meta.get("data_position") != start * per_step:
            raise RuntimeError(f"checkpoint {start}: data position {meta.get('data_position')} != {start * per_step}")
        if is_main:
            print(f"resuming {run_dir} from step {start}")
    if is_main:
        trim_metrics(metrics_path, start)

    rows_slice = sh.process_rows(per_step)

    def get_batch(step):
        idx = data_lib.batch_indices(step, per_step, n_items, cfg.train.seed)[rows_slice]
        if flat:
            local = {"hidden": ftrain[0][idx], "targets": ftrain[1][idx], "weights": ftrain[2][idx],
                     "roots": ftrain[3][idx]}  # fmt: skip
            if cfg.train.distill_weight:  # hidden states at t+k+1 (the same row's, see flat_tokens)
                local.update(teacher_hidden=ftrain[0][teacher_index(idx, k_heads, n_items)], teach=ftrain[4][idx])
        else:
            local = {"input_ids": ids[idx], "loss_mask": mask[idx]}
        return sh.batch_from_local(local, mesh)

    sc = schedules(cfg)
    crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
    sigint_at = int(os.environ.get(SIGINT_ENV, "0") or 0)
    nan_at = {int(x) for x in os.environ.get(NAN_ENV, "").split(",") if x.strip()}
    bad_steps = 0
    losses = []
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and is_main), unit="step")
    mf = open(metrics_path, "a") if is_main else None  # noqa: SIM115
    t_last, tok_since = time.perf_counter(), 0
    eval_res = None

    def save(step):
        meta = {"step": step, "data_position": step * per_step, "rng_seed": cfg.train.seed}
        save_checkpoint(mngr, step, trainable, opt_state, meta)

    sigint = _SigintFlag()
    try:
        sigint.__enter__()
        for step in range(start, cfg.train.steps):
            batch = get_batch(step)
            poison = jnp.float32(np.nan if step + 1 in nan_at else 0.0)
            trainable, opt_state, aux = jstep(trainable, opt_state, frozen, batch, jnp.int32(step), poison)
            tok_since += per_step if flat else int(per_step * ids.shape[1])
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
                aux = jax.device_get(aux)
                dt = time.perf_counter() - t_last
                loss = float(aux["loss"])
                rec = {"step": done, "loss": loss if np.isfinite(loss) else None,
                       "heads_loss": float(aux["heads_loss"]) if np.isfinite(aux["heads_loss"]) else None,
                       "skipped_steps": bad_steps}  # fmt: skip
                for k in range(k_heads):
                    rec[f"head{k}_loss"] = float(aux["head_loss"][k])
                    rec[f"head{k}_top1"] = float(aux["head_acc"][k])
                if "backbone_loss" in aux:
                    rec["backbone_loss"] = float(aux["backbone_loss"])
                    rec["lambda0"] = float(aux["lambda0"])
                rec.update(lr_heads=float(sc["heads"](step)), lr_backbone=float(sc["backbone"](step)),
                           grad_norm=float(aux["grad_norm"]), tokens_per_s=round(tok_since / max(dt, 1e-9), 1))  # fmt: skip
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and dev is not None:
                    ev = evaluate(cfg, mc, trainable, eval_frozen, dev, mesh, flat)
                    rec.update({f"dev_head{k}_top1": ev["top1"][k] for k in range(k_heads)})
                    rec.update({f"dev_{key}": ev[key] for key in ("kl", "agree") if key in ev})
                losses.append(loss)
                if mf is not None:
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                bar.set_postfix(loss=f"{loss:.3f}", top1=f"{rec['head0_top1']:.2f}")
                t_last, tok_since = time.perf_counter(), 0
            bar.update(1)
            if mngr is not None and cfg.train.save_every and done % cfg.train.save_every == 0:
                save(done)
            if crash_at and done == crash_at:
                raise SimulatedKill(3)
            if sigint_at and done == sigint_at:
                import signal

                os.kill(os.getpid(), signal.SIGINT)
            if sigint.hit:
                if mngr is not None and mngr.latest_step() != done:
                    save(done)
                bar.close()
                raise TrainingInterrupted(done, run_dir)
        bar.close()
        final = cfg.train.steps
        if mngr is not None and mngr.latest_step() != final:
            save(final)
        if dev is not None:
            eval_res = evaluate(cfg, mc, trainable, eval_frozen, dev, mesh, flat)
            if is_main:
                with open(os.path.join(run_dir, "eval.json"), "w") as f:
                    json.dump(eval_res, f, indent=1)
                print("dev accuracy per head: top1", eval_res["top1"], "top5", eval_res["top5"])
                if "kl" in eval_res:
                    print(f"dev KL(original || trained) {eval_res['kl']}, same greedy token {eval_res['agree']:.2%}")
        host = gather_to_host(trainable)  # a collective: every process takes part
        if is_main:
            extra = {"medusa_jax_train": {"mode": cfg.train.mode, "steps": final, "dev": eval_res}}
            export(cfg, run_dir, host, base_name, extra)
    finally:
        sigint.__exit__()
        if mf is not None:
            mf.close()
        if mngr is not None:
            mngr.close()  # waits for an asynchronous save to finish
    return TrainResult(losses, cfg.train.steps, eval_res, run_dir, trainable)


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


HIDDEN_BLOCK_ROWS = 2048


def cached_hidden(cache_dir, mc, backbone, k_heads, mesh, max_len, name, parts, block_rows=None):
    """`precompute_flat` over the rows of each data part, in blocks of at most `block_rows` rows, each block cached
    as `cache_dir/NAME-<fingerprint>.npz`: adding a data directory computes only its rows, and a killed precompute
    resumes at the first missing block. Only the hidden states are cached; the tokens come from the data. Returns the
    concatenated (hidden, targets, weights, roots, teach) of `precompute_flat`."""
    block_rows = block_rows or HIDDEN_BLOCK_ROWS
    out = []
    for rows in parts:
        ids, mask = data_lib.pack(rows, max_len)
        for i in range(0, len(ids), block_rows):
            bi, bm = ids[i : i + block_rows], mask[i : i + block_rows]
            key = data_fingerprint(bi)
            path = os.path.join(cache_dir, f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
            hidden = _cached(path, lambda bi=bi, bm=bm: precompute_flat(mc, backbone, bi, bm, k_heads, mesh)[0], key)
            out.append((hidden, *flat_tokens(bi, bm, k_heads)))
    return tuple(np.concatenate([o[j] for o in out]) for j in range(5))


def data_fingerprint(ids: np.ndarray) -> str:
    return f"{ids.shape}:{int(np.asarray(ids, np.int64).sum() % (1 << 61))}"


def _cached(path: str, compute, key: str):
    """Precomputed hidden states `[M, E]` cached at `path`, valid while its stored key matches."""
    if os.path.exists(path):
        z = np.load(path)
        if str(z["key"]) == key:
            return z["hidden"]
    out = compute()
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, hidden=out, key=key)
        os.replace(tmp, path)
    return out


def config_from_run(run_dir: str) -> Config:
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        return from_dict(yaml.safe_load(f))
