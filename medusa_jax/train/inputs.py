"""What the train step consumes besides the trainable params: the frozen params, the batch of each step (a pure
function of the step: a restart resumes the exact stream) and the dev set. Two kinds: sequences (`input_ids`,
`loss_mask` `[B, L]`) or, for Medusa-1 on a frozen backbone, precomputed hidden states of answer positions
(`hidden` `[N, E]`, `targets`/`weights` `[N, K]`, `roots` `[N]`, and with soft labels `teacher_hidden` `[N, K, E]`,
`teach` `[N, K]`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import sharding as sh
from medusa_jax.heads import base_lm_head
from medusa_jax.train import data as data_lib
from medusa_jax.train.config import Config
from medusa_jax.train.hidden import cached_features, cached_hidden, teacher_index
from medusa_jax.train.rows import RowSource


@dataclasses.dataclass
class Inputs:
    flat: bool  # precomputed hidden states (else sequences)
    frozen: dict  # the step's frozen params
    eval_frozen: dict  # what `evaluate` needs of the frozen model
    dev: tuple | None  # dev arrays for `evaluate`, or None
    n_items: int  # rows (sequences or answer positions) in one epoch
    per_step: int  # of them per step (global batch)
    tokens_per_step: int
    local_rows: Callable[[np.ndarray], dict]  # global item indices -> this process's batch arrays
    batch_dims: dict  # batch key -> ndim

    def batch(self, step: int, mesh, seed: int) -> dict:
        """The global batch of `step` (each process reads its own rows of it), sharded over (data, fsdp)."""
        idx = data_lib.batch_indices(step, self.per_step, self.n_items, seed)[sh.process_rows(self.per_step)]
        return sh.batch_from_local(self.local_rows(idx), mesh)


def draft_vocab_of(cfg: Config, rows: list[dict], backbone: dict, run_dir: str) -> dict:
    """A feature drafter's draft vocabulary (`heads.draft_vocab` most frequent answer tokens of `rows`) as frozen
    params `{"draft": {"ids" [Vd], "kernel" [E, Vd]}}`, its `draft_vocab.json` written into the run dir (the export
    gets a copy); {} for the full vocabulary."""
    if not cfg.heads.draft_vocab:
        return {}
    from medusa_jax.cache import atomic_write_text
    from medusa_jax.draft_vocab import FILE
    from medusa_jax.train.draft_vocab import build, token_counts

    info = build(token_counts(rows), cfg.heads.draft_vocab)
    if jax.process_index() == 0:
        atomic_write_text(os.path.join(run_dir, FILE), json.dumps(info) + "\n")
    ids = np.asarray(info["ids"], np.int32)
    return {"draft": {"ids": jnp.asarray(ids), "kernel": jnp.asarray(base_lm_head(backbone))[:, ids]}}


def feature_inputs(cfg: Config, mc, backbone: dict, mesh, run_dir: str) -> Inputs:
    """Sequences with the frozen backbone's features at every position (`features` `[B, L, E]`), computed once and
    cached on disk in blocks (`hidden.cached_features`), read memory-mapped."""
    max_len = cfg.data.max_len
    rows = data_lib.load_data_rows(cfg, mc.vocab_size)
    ids, mask = data_lib.pack(rows, max_len)
    blocks = cached_features(os.path.join(run_dir, "cache"), mc, backbone, mesh, ids, mask, "train")
    starts = np.cumsum([0] + [len(b) for b in blocks])
    has_dev = cfg.data.dev_path if cfg.data.kind == "distill" else cfg.data.synthetic_dev_rows
    dev = data_lib.pack(data_lib.load_data_rows(cfg, mc.vocab_size, dev=True), max_len) if has_dev else None

    def local_rows(idx):
        block = np.searchsorted(starts, idx, side="right") - 1
        feats = np.stack([blocks[b][i - starts[b]] for b, i in zip(block, idx)]).astype(np.float32)
        return {"input_ids": ids[idx], "loss_mask": mask[idx], "features": feats}

    frozen = {"backbone": backbone} | draft_vocab_of(cfg, rows, backbone, run_dir)
    per = cfg.train.batch_size
    dims = {"input_ids": 2, "loss_mask": 2, "features": 3}
    return Inputs(False, frozen, frozen, dev, len(ids), per, per * max_len, local_rows, dims)


def prepare_inputs(cfg: Config, mc, backbone: dict, mesh, run_dir: str, log=print) -> Inputs:
    # a feature drafter attends over whole sequences: it trains on them, with their features precomputed
    # (`train.precompute_hidden`) or the frozen backbone run in the step
    flat = cfg.train.mode == "medusa1" and cfg.train.precompute_hidden and not cfg.heads.feature
    if cfg.heads.feature and cfg.train.mode == "medusa1" and cfg.train.precompute_hidden:
        return feature_inputs(cfg, mc, backbone, mesh, run_dir)
    k_heads = cfg.heads.num_heads
    has_dev = cfg.data.dev_path if cfg.data.kind == "distill" else cfg.data.synthetic_dev_rows
    dev_rows = data_lib.load_data_rows(cfg, mc.vocab_size, dev=True) if has_dev else None
    dev = None
    if not flat:
        max_len = cfg.data.max_len
        if cfg.data.kind == "distill":  # each process reads only the rows of its share of each batch
            source = RowSource(data_lib.check_path(cfg), max_len, cfg.data.num_rows, log)
            n, local_rows = len(source), lambda idx: dict(zip(("input_ids", "loss_mask"),
                                                              data_lib.pack(source.rows(idx), max_len)))  # fmt: skip
        else:
            rows = data_lib.load_data_rows(cfg, mc.vocab_size)
            ids, mask = data_lib.pack(rows, max_len)
            n, local_rows = len(ids), lambda idx: {"input_ids": ids[idx], "loss_mask": mask[idx]}
        if dev_rows is not None:
            dev = data_lib.pack(dev_rows, max_len)
        frozen = {"backbone": backbone}
        if cfg.heads.draft_vocab:
            frozen |= draft_vocab_of(cfg, data_lib.load_data_rows(cfg, mc.vocab_size), backbone, run_dir)
        if cfg.train.mode == "medusa2" and not cfg.lora.rank:  # full fine-tuning: the teacher only for KL
            frozen = {"backbone": jax.tree.map(jnp.copy, backbone)} if cfg.train.backbone_loss == "kl" else {}
        per = cfg.train.batch_size
        return Inputs(False, frozen, frozen, dev, n, per, per * max_len, local_rows, {"input_ids": 2, "loss_mask": 2})

    parts = data_lib.load_data_parts(cfg, mc.vocab_size)
    hidden_of = functools.partial(cached_hidden, os.path.join(run_dir, "cache"), mc, backbone, k_heads, mesh,
                                  cfg.data.max_len)  # fmt: skip
    hid, tgt, w, roots, teach = hidden_of("train", parts)
    if dev_rows is not None:
        dev = hidden_of("dev", [dev_rows])[:4]  # hidden, targets, weights, roots
    lm = base_lm_head(backbone)
    path = tgt[:, : k_heads - 1]  # sequential heads' path tokens t+2 .. t+K: the answer's own (teacher forcing)
    if cfg.train.vocab_subset:  # softmax over the tokens that occur as training targets only (cheaper)
        subset = np.unique(tgt[w > 0])
        tgt = np.searchsorted(subset, tgt).clip(0, len(subset) - 1).astype(np.int32)
        lm = lm[:, subset]
        log(f"vocab subset: {len(subset)} of {mc.vocab_size} tokens")
    frozen = {"lm_head": {"kernel": lm}}
    if cfg.heads.root_token or cfg.heads.sequential:
        frozen["embed"] = backbone["embed"]
    eval_frozen = {"backbone": {k: v for k, v in backbone.items() if k in ("embed", "lm_head")}}
    n = len(hid)
    soft = bool(cfg.train.distill_weight)

    def local_rows(idx):
        out = {"hidden": hid[idx], "targets": tgt[idx], "weights": w[idx], "roots": roots[idx]}
        if cfg.heads.sequential:
            out["path"] = path[idx]
        if soft:  # hidden states at t+k+1 (the same row's, see flat_tokens)
            out.update(teacher_hidden=hid[teacher_index(idx, k_heads, n)], teach=teach[idx])
        return out

    dims = {"hidden": 2, "targets": 2, "weights": 2, "roots": 1} | ({"path": 2} if cfg.heads.sequential else {})
    if soft:
        dims.update(teacher_hidden=3, teach=2)
    per = cfg.train.batch_tokens
    return Inputs(True, frozen, eval_frozen, dev, n, per, per, local_rows, dims)
