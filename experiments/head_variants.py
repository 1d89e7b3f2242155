"""A/B of Medusa head layouts on cached hidden states: plain heads, root-token heads, more
ResBlock layers, each trained from scratch for the same steps on the same batches, dev top-1/top-5 over the full
vocabulary. Reuses a Medusa-1 run's hidden-state cache (`RUN_DIR/cache`, see `medusa_jax.train.hidden.cached_hidden`).

    PYTHONPATH=. python experiments/head_variants.py --run runs/m1_v3 --steps 600 --variants plain:1,root:1,plain:2

A third field, `root:1:0.5`, trains with soft labels: that weight of each target's loss on the base model's own
distribution over it (`train.distill_weight`).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medusa_jax import sharding as sh
from medusa_jax.heads import HeadsConfig, base_lm_head, init_heads, root_embedding
from medusa_jax.train import backbone as trainer
from medusa_jax.train import data as data_lib
from medusa_jax.train import hidden, losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a Medusa-1 run dir with precomputed hidden states")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--train-positions", type=int, default=0, help="train on the first N positions only (0: all)")
    ap.add_argument(
        "--variants", default="plain:1,root:1,plain:2", help="LAYOUT:LAYERS[:DISTILL_WEIGHT], comma-separated"
    )
    args = ap.parse_args()
    cfg = trainer.config_from_run(args.run)
    k = cfg.heads.num_heads
    mc, backbone, _, _ = trainer.build_backbone(cfg)
    mesh = sh.make_mesh(1, 1, 1)
    cached = lambda name, parts: hidden.cached_hidden(  # noqa: E731
        os.path.join(args.run, "cache"), mc, backbone, k, mesh, cfg.data.max_len, name, parts
    )
    tr = cached("train", data_lib.load_data_parts(cfg, mc.vocab_size))
    if args.train_positions:  # a smaller training set: the regime where the heads overfit
        tr = tuple(a[: args.train_positions] for a in tr)
    dv = cached("dev", [data_lib.load_data_rows(cfg, mc.vocab_size, dev=True)])
    subset = np.unique(tr[1][tr[2] > 0])  # training softmax over the training targets' tokens, as vocab_subset
    tr_t = np.searchsorted(subset, tr[1]).clip(0, len(subset) - 1).astype(np.int32)
    lm = base_lm_head(backbone)
    lm_s = lm[:, subset]
    print(f"train positions {len(tr[0])}, dev positions {len(dv[0])}", flush=True)
    i, kk = np.nonzero(tr[4][:20000])  # the teacher's argmax at position t+k+1 is the (greedy) data's target
    same = np.argmax(tr[0][i + kk + 1] @ np.asarray(lm_s), -1) == tr_t[i, kk]
    print(
        f"soft labels available for {tr[4][tr[2] > 0].mean():.2%} of targets; teacher argmax = target on {same.mean():.2%}"
    )

    for variant in args.variants.split(","):
        layout, layers, *soft = variant.split(":")
        soft = float(soft[0]) if soft else 0.0
        out = run_variant(layout, int(layers), args.steps, cfg, backbone, tr, tr_t, dv, lm, lm_s, soft)
        print(json.dumps(out), flush=True)


def run_variant(layout, layers, steps, cfg, backbone, tr, tr_t, dv, lm, lm_s, soft=0.0) -> dict:
    """Train one head layout from scratch for `steps` on the cached training positions (with soft-label weight
    `soft`); dev top-1/top-5."""
    k = cfg.heads.num_heads
    root = layout == "root"
    heads = init_heads(HeadsConfig(k, layers, True, root), backbone, seed=0)
    sched = optax.warmup_cosine_decay_schedule(0, cfg.train.lr_heads, 20, steps, cfg.train.lr_heads / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    opt = tx.init(heads)
    embed = backbone["embed"]

    def loss(hd, emb, proj, h, t, w, r, th, ok):
        re = root_embedding({"embed": emb}, r) if root else None
        teacher = jnp.einsum("bke,ev->kbv", th, proj) if soft else None
        sw = soft * ok.astype(jnp.float32)
        return losses.heads_loss(hd, h, proj, t, w, cfg.train.decay, jnp.float32, re, teacher, sw)[0]

    @jax.jit
    def step(hd, opt, emb, proj, h, t, w, r, th, ok):
        g = jax.grad(loss)(hd, emb, proj, h, t, w, r, th, ok)
        u, opt = tx.update(g, opt, hd)
        return optax.apply_updates(hd, u), opt

    @jax.jit
    def counts(hd, emb, proj, h, t, w, r):
        re = root_embedding({"embed": emb}, r) if root else None
        return jnp.stack(losses.eval_counts(hd, h, proj, t, w, jnp.float32, root_emb=re))

    t0 = time.time()
    for s in range(steps):
        idx = data_lib.batch_indices(s, cfg.train.batch_tokens, len(tr[0]), 0)
        th = tr[0][np.minimum(idx[:, None] + np.arange(1, k + 1), len(tr[0]) - 1)] if soft else tr[0][idx[:1, None]]
        heads, opt = step(heads, opt, embed, lm_s, tr[0][idx], tr_t[idx], tr[2][idx], tr[3][idx], th, tr[4][idx])
    tot = sum(
        np.asarray(counts(heads, embed, lm, *(a[i : i + 512] for a in dv[:4]))) for i in range(0, len(dv[0]), 512)
    )
    return {"layout": layout, "layers": layers, "soft": soft, "steps": steps, "top1": (tot[0] / tot[2]).round(4).tolist(),
            "top5": (tot[1] / tot[2]).round(4).tolist(), "train_s": round(time.time() - t0)}  # fmt: skip


if __name__ == "__main__":
    main()
