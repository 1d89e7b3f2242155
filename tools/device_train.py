"""Medusa-2 heads for SmolLM2-135M-Instruct in one call on one accelerator: self-distil the training prompts with
the batched decoder, train Medusa-2 (LoRA + root-token heads, KL to the original model), evaluate on the dev
prompts, and write the heads, the adapter and the metrics under --out.

  python tools/device_train.py --out runs/device_m2            # on the accelerator (about 10 minutes planned)
  python tools/device_train.py --out /tmp/m2 --quick           # tiny sizes, for a CPU check of the pipeline
  python tools/device_train.py --out /tmp/m2 --quick --ckpt tiny   # the tiny random model (the test)
  python tools/device_train.py --out runs/device_fd --drafter feature   # a feature drafter instead (below)

Output: OUT/data (distilled answers), OUT/data_dev (answers to the dev prompts, evaluation only), OUT/run (the
training run dir; OUT/run/export holds the heads and the PEFT adapter), OUT/metrics.json (distillation tokens/s,
training steps/s, dev accuracy per head, KL(original || trained), greedy agreement and tokens/step with the
`mc_sim_7b_63` tree and the lookup chain).

Sizes. Measured with --quick on the 2-core CPU (SmolLM2-135M float32, 8 prompts, 24-token answers, 6 steps of
2 x 96 tokens; the machine shared, load average ~15): distillation 2.0 answer tokens/s including compilation and
11.8 tokens/s once compiled (batch 4); training 0.055 steps/s after the first (compiling) step; 533 s in all.
The device defaults are planned, not measured: batched decoding of a 135M model is bound by per-step latency
(~10-20 ms a step on an H200 at batch 128), so 4,800 prompts x 256 tokens is 38 batches x 256 steps, 2-4 minutes;
a Medusa-2 step at batch 16 x 384 tokens (LoRA forward + backward + the frozen teacher's forward, ~8 x 135M x 6k
= 6.6 TFLOP) is ~0.07 s at 20% of the chip's TF32 rate (JAX's default float32 matmul precision on GPU): 2,000
steps in 2-4 minutes; evaluation ~1 minute. The script prints each stage's time, so the first device run checks
them. Targets for the heads (unmeasured until a device run): dev tokens/step >= 3.0 with mc_sim_7b_63 + lookup,
KL(original || trained) <= 0.05, the same greedy token on >= 90% of dev answer positions.

`--drafter feature` trains a feature drafter (EAGLE's kind, `configs/smollm2_135m_feature.yaml`) on the frozen
backbone instead, from greedy answers and a second, sampled set (temperature 0.7) to the same prompts, and reports
its tokens per step with `mc_sim_7b_63` and `smollm2_sequential_127` (+ the lookup chain). Planned, not measured:
4,800 x 128-token answers twice (2-4 minutes), 6,000 steps of 8 rows (a 135M forward of 8 x 384 tokens and the
drafter's 5-deep unroll from 32 anchors a row, ~20-40 ms a step: 2-4 minutes). A prototype of the same drafter
measured 2.97 / 3.10 dev tokens per step with those trees in the exact simulator (docs/TRAINING.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DATA = os.environ.get("MEDUSA_JAX_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
DEVICE = dict(num_prompts=0, dev_prompts=200, max_new_tokens=256, distill_batch=128, steps=2000, batch=16,
              max_len=384, eval_prompts=64, eval_tokens=128)  # fmt: skip
FEATURE = dict(DEVICE, max_new_tokens=128, steps=6000, batch=8)  # `--drafter feature` on the device
QUICK = dict(num_prompts=8, dev_prompts=4, max_new_tokens=24, distill_batch=4, steps=6, batch=2, max_len=96,
             eval_prompts=2, eval_tokens=24)  # fmt: skip


class ByteTokenizer:
    """For `--ckpt tiny`: a chat 'template' of the prompt's bytes (ids 3..130 fold into the tiny vocabulary)."""

    chat_template = "bytes"
    eos_token_id = 0

    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=True):
        return [1] + [3 + b % 100 for b in msgs[-1]["content"].encode()][:24] + [2]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def encode(self, text, add_special_tokens=False):
        return [3 + b % 100 for b in text.encode()]


def base_model(ckpt: str, dtype: str):
    from medusa_jax.api import MedusaModel, load

    if ckpt == "tiny":
        from medusa_jax.model import init_params
        from medusa_jax.run_io import TINY

        return MedusaModel(TINY, init_params(TINY), ByteTokenizer(), name="tiny")
    return load(None if ckpt == "default" else ckpt, dtype=dtype, heads=False)


def answer_tokens(data_dir: str) -> int:
    from medusa_jax.train.distill import load_rows

    return sum(sum(r["loss_mask"]) for r in load_rows(data_dir))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default="default", help="base model (default: the embedded SmolLM2-135M; tiny: random)")
    ap.add_argument("--prompts", default=os.path.join(DATA, "train_prompts.jsonl"))
    ap.add_argument("--dev", default=os.path.join(DATA, "dev_prompts.jsonl"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check of the whole pipeline)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--drafter", default="medusa2", choices=["medusa2", "feature"],
                    help="what to train: Medusa-2 (LoRA + root-token heads) or a feature drafter (frozen backbone)")  # fmt: skip
    for k, v in DEVICE.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"default {v} (--quick: {QUICK[k]})")
    args = ap.parse_args(argv)
    defaults = QUICK if args.quick else (FEATURE if args.drafter == "feature" else DEVICE)
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else defaults[k] for k in DEVICE}
    for path in (args.prompts, args.dev):
        if not os.path.exists(path):
            print(f"device_train: error: {path} not found (give --prompts / --dev)", file=sys.stderr)
            return 2
    from medusa_jax.train import distill
    from medusa_jax.train.config import load_config
    from medusa_jax.train.trainer import train

    os.makedirs(args.out, exist_ok=True)
    metrics = {"sizes": sizes, "ckpt": args.ckpt}
    model = base_model(args.ckpt, args.dtype)

    # 1. self-distillation (resumable: a rerun continues at the first missing shard)
    t0 = time.perf_counter()
    common = ["--max-new-tokens", str(sizes["max_new_tokens"]), "--batch-size", str(sizes["distill_batch"]),
              "--dtype", args.dtype]  # fmt: skip
    data, dev = os.path.join(args.out, "data"), os.path.join(args.out, "data_dev")
    if distill.main(["--prompts", args.prompts, "--out", data, "--num-prompts", str(sizes["num_prompts"]), *common],
                    model=model):  # fmt: skip
        return 2
    dt = time.perf_counter() - t0
    metrics["distill"] = {"seconds": round(dt, 1), "answer_tokens": answer_tokens(data)}
    metrics["distill"]["tokens_per_s"] = round(metrics["distill"]["answer_tokens"] / max(dt, 1e-9), 1)
    t0 = time.perf_counter()
    if distill.main(["--prompts", args.dev, "--out", dev, "--num-prompts", str(sizes["dev_prompts"]), "--allow-dev",
                     *common], model=model):  # fmt: skip
        return 2
    # the same decoder again, mostly compiled by now: closer to the steady rate
    metrics["distill"]["dev_tokens_per_s"] = round(answer_tokens(dev) / max(time.perf_counter() - t0, 1e-9), 1)
    print(f"distilled {metrics['distill']['answer_tokens']} answer tokens in {dt:.0f}s")
    paths = [data]
    if args.drafter == "feature":  # a second answer to each prompt, sampled: more varied drafts to learn from
        sampled = os.path.join(args.out, "data_t07")
        if distill.main(["--prompts", args.prompts, "--out", sampled, "--num-prompts", str(sizes["num_prompts"]),
                         "--temperature", "0.7", "--seed", "1", *common], model=model):  # fmt: skip
            return 2
        paths.append(sampled)

    # 2. Medusa-2: LoRA + root-token heads, KL to the original model (or a feature drafter on the frozen backbone)
    tiny = args.ckpt == "tiny"
    feature = args.drafter == "feature"
    shipped_m1 = os.path.join(ROOT, "medusa_jax", "head_sets", "smollm2_medusa1")
    over = [f"run_dir={os.path.join(args.out, 'run')}", "data.kind=distill", f"data.path={','.join(paths)}",
            f"data.dev_path={dev}", f"data.max_len={sizes['max_len']}", f"train.steps={sizes['steps']}",
            f"train.batch_size={sizes['batch']}", f"train.save_every={max(sizes['steps'] // 4, 1)}",
            f"train.log_every={max(sizes['steps'] // 20, 1)}", f"train.warmup_steps={min(100, sizes['steps'] // 10)}"]  # fmt: skip
    if feature:
        over += ["heads.feature=true", "heads.num_heads=5", "heads.root_token=false", "train.mode=medusa1"]
    else:
        over += ["train.mode=medusa2", "train.backbone_loss=kl", "heads.root_token=true",
                 f"train.heads_warmup_steps={sizes['steps'] // 4}"]  # fmt: skip
    if not tiny:
        init = shipped_m1 if os.path.isdir(shipped_m1) and args.ckpt == "default" and not feature else ""
        over += [f"model.ckpt={args.ckpt}", f"model.dtype={args.dtype}", f"heads.init={init}"]
    config = "tiny.yaml" if tiny else ("smollm2_135m_feature.yaml" if feature else "smollm2_135m_medusa2.yaml")
    cfg = load_config(os.path.join(ROOT, "configs", config), over)
    t0 = time.perf_counter()
    res = train(cfg, progress=not args.quick)
    dt = time.perf_counter() - t0
    metrics["train"] = {"steps": sizes["steps"], "seconds": round(dt, 1), "steps_per_s": round(sizes["steps"] / dt, 3),
                        "first_loss": res.losses[0], "last_loss": res.losses[-1], "dev": res.eval}  # fmt: skip
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    gaps = [b["step"] - a["step"] for a, b in zip(recs, recs[1:])]
    tok = [r["tokens_per_s"] for r in recs[1:]]  # after the first log interval (which holds the compilation)
    if tok:  # seconds per step from the logged tokens/s: steps x batch x max_len / tokens_per_s
        secs = [g * sizes["batch"] * sizes["max_len"] / max(t, 1e-9) for g, t in zip(gaps, tok)]
        metrics["train"]["steps_per_s_after_compile"] = round(sum(gaps) / sum(secs), 3)
    print(f"trained {sizes['steps']} steps in {dt:.0f}s; dev {res.eval}")

    # 3. tokens per step on dev prompts with the trained heads (mc_sim_7b_63 tree + lookup chain)
    from medusa_jax.api import load_run
    from medusa_jax.lookup import DEFAULT_LOOKUP
    from medusa_jax.train.distill import read_prompt_file

    trained = load_run(cfg.run_dir, dtype=args.dtype, tokenizer=not tiny)
    if tiny:
        trained.tokenizer = model.tokenizer
    prompts = [r["prompt"] for r in read_prompt_file(args.dev)[: sizes["eval_prompts"]]]
    trees = [[[0], [1], [0, 0]]] if tiny else ["mc_sim_7b_63"] + (["smollm2_sequential_127"] if feature else [])
    for i, tree in enumerate(trees):
        t0 = time.perf_counter()
        out = trained.generate(
            prompts, max_new_tokens=sizes["eval_tokens"], mode="medusa", tree=tree, lookup=DEFAULT_LOOKUP
        )
        new, steps = sum(r.new_tokens for r in out), sum(r.steps for r in out)
        metrics["eval" if i == 0 else f"eval_{tree}"] = {
            "prompts": len(prompts), "tree": tree if isinstance(tree, str) else "tiny",
            "tokens_per_step": round(new / max(steps, 1), 3), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    tmp = os.path.join(args.out, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "metrics.json"))
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
