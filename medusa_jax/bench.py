"""Benchmarks: generation throughput (ours AR / Medusa vs HF transformers) and the per-step cost curve.

  python -m medusa_jax.bench --prompts-file ../shared/data/dev_prompts.jsonl --num-prompts 8 --modes ar,hf
  python -m medusa_jax.bench --steps --batch-sizes 1,8 --tree-sizes 1,4,8,16,32,64
  python -m medusa_jax.bench --calibrate --heads DIR --prompts-file held_out.jsonl --batch-sizes 1,8,32

Each mode runs on the same prompts in one process after a warm-up (compile time reported apart). Numbers are
medians over `--repeats` runs; ratios are taken within one run. The peak memory of the whole run is reported too
(host RSS; on an accelerator also the device's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax

from medusa_jax import memory
from medusa_jax.timing import run_ours_interleaved


def machine() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"{dev.platform}:{kind} x{jax.device_count()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"


# ---------------------------------------------------------------------------------------------- generation
def run_ours(model, prompts, mode, max_new, batch_size, repeats, **kw):
    """One config: (medians, the last repeat's results)."""
    out, _, last = run_ours_interleaved(model, prompts, {"x": (mode, kw)}, max_new, batch_size, repeats)
    return out["x"], last["x"]


def load_hf(ckpt_path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    td = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if ckpt_path.endswith(".gguf"):
        d, f = os.path.split(ckpt_path)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=td)
    else:
        m = AutoModelForCausalLM.from_pretrained(ckpt_path, dtype=td)
    if torch.cuda.is_available():
        m = m.cuda()
    return m.eval()


def run_hf(hf, encoded, max_new, batch_size, repeats, eos_ids, pad_id):
    import torch

    dev = next(hf.parameters()).device

    def once():
        toks = 0
        t0 = time.perf_counter()
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i : i + batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in chunk], device=dev)
            att = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in chunk], device=dev)
            with torch.no_grad():
                out = hf.generate(
                    input_ids=ids,
                    attention_mask=att,
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=list(eos_ids),
                    pad_token_id=pad_id,
                )
            for row in out[:, width:].tolist():
                n = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
                toks += n
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return toks / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    with torch.no_grad():  # warm-up: CUDA/CPU kernels and allocator
        hf.generate(
            input_ids=torch.tensor([encoded[0]], device=dev), max_new_tokens=4, do_sample=False, pad_token_id=pad_id
        )
    warm = time.perf_counter() - t0
    tps = statistics.median(once() for _ in range(repeats))
    return {"tokens_per_s": tps, "tokens_per_step": 1.0, "step_ms": None, "compile_s": warm}


# ---------------------------------------------------------------------------------------------- step cost
def tree_of_size(n: int) -> list[list[int]]:
    """The first n-1 paths of mc_sim_7b_63 (a tree of n nodes with the root), kept prefix-closed."""
    from medusa_jax.tree import get_tree

    ref = get_tree("mc_sim_7b_63")
    chosen: list[tuple[int, ...]] = []
    for p in ref:
        if len(chosen) >= n - 1:
            break
        if len(p) == 1 or tuple(p[:-1]) in chosen:
            chosen.append(tuple(p))
    return [list(p) for p in chosen]


def step_costs(model, batch_sizes, tree_sizes, prefix: int = 128, iters: int = 20, repeats: int = 3,
               slots: int | None = None):  # fmt: skip
    """Median seconds per step of the real decode loop (`calibrate.step_costs`: candidates, tree forward, acceptance,
    cache compaction, heads at the accepted node; the repeats round-robin over AR and the trees) after a
    `prefix`-token prefill: "ar" is the loop without tree or heads, n the first n-1 paths of mc_sim_7b_63. Every
    step is timed over a KV cache of `slots` slots (default: `step_slots_for(tree_sizes, ...)`), the same for AR and
    every tree."""
    from medusa_jax.calibrate import step_costs as timed
    from medusa_jax.tree import build_buffers

    prompt = [1] * prefix
    options = {"ar": (build_buffers([], topk=1), None)}
    options.update({n: (build_buffers(tree_of_size(n)), model.heads) for n in tree_sizes if n > 1})
    slots = slots or step_slots_for(tree_sizes, prefix, iters)
    out = {}
    for b in batch_sizes:
        out[b] = timed(model, prompt, b, options, iters, repeats, slots=slots)
        out[b].update({n: out[b]["ar"] for n in tree_sizes if n <= 1})
    return out


def step_slots_for(tree_sizes, prefix: int = 128, iters: int = 20) -> int:
    """The one KV-cache size `step_costs` times AR and the trees of `tree_sizes` nodes over."""
    from medusa_jax.calibrate import step_slots
    from medusa_jax.tree import build_buffers

    trees = [build_buffers([], topk=1)] + [build_buffers(tree_of_size(n)) for n in tree_sizes if n > 1]
    return step_slots(prefix, trees, iters)


# ---------------------------------------------------------------------------------------------- calibration
def calibrate_cli(args) -> int:
    """--calibrate: accuracies on held-out prompts, cost curve per batch size, best tree per batch size."""
    import medusa_jax
    from medusa_jax import calibrate
    from medusa_jax.prompts import read_prompts

    if not args.heads or not os.path.isdir(args.heads):
        print("--calibrate needs --heads DIR (a heads directory: the result is written there)", file=sys.stderr)
        return 2
    if not args.prompts_file:
        print("--calibrate needs --prompts-file (held-out prompts, not the evaluation set)", file=sys.stderr)
        return 2
    model = medusa_jax.load(args.ckpt, dtype=args.dtype, heads=args.heads, draft_vocab=not args.no_draft_vocab,
                            scan_unroll=args.unroll)  # fmt: skip
    prompts = read_prompts(args.prompts_file)[: args.num_prompts]
    bs = [int(x) for x in args.batch_sizes.split(",")]
    kw = {} if args.lookup is None else {"lookup": args.lookup}
    cal = calibrate.calibrate(
        model, prompts, batch_sizes=bs, max_new_tokens=args.max_new_tokens, repeats=args.repeats, **kw
    )
    cal.update(machine=machine(), argv=sys.argv[1:])
    path = calibrate.calibration_path(args.heads, args.dtype)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cal, f, indent=1)
    os.replace(tmp, path)
    png = args.png or path[: -len(".json")] + ".png"
    drew = calibrate.plot(cal, png)
    print(f"wrote {path}" + (f" and {png}" if drew else " (no PNG: pip install matplotlib)"))
    return 0


# ---------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medusa_jax.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--heads", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts-file", default=None)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--modes", default="ar,medusa,hf")
    ap.add_argument("--tree", default=None)
    ap.add_argument(
        "--lookup",
        type=int,
        default=None,
        help="lookup-chain length: with --tree for medusa runs; with --calibrate the chain tried with each tree "
        "(default 10, 0 for none)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", action="store_true", help="measure the per-step cost curve instead")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--tree-sizes", default="1,4,8,16,32,64")
    ap.add_argument("--random-heads", type=int, default=0, help="attach N random heads (shared lm_head)")
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help="measure head accuracies and this device's step costs, and write the best tree per batch size next to "
        "the heads (calibration-<device>-<dtype>.json + .png), which load() then uses on this kind of device",
    )
    ap.add_argument("--no-draft-vocab", action="store_true", help="heads draft from the full vocabulary")
    ap.add_argument("--unroll", type=int, default=1, help="layers per layer-loop iteration (load(scan_unroll=...))")
    ap.add_argument("--png", default=None, help="plot tokens/s and tokens per step against tree size (--calibrate)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.calibrate:
        return calibrate_cli(args)

    import medusa_jax
    from medusa_jax.checkpoint import resolve

    model = medusa_jax.load(args.ckpt, dtype=args.dtype, heads=args.heads, draft_vocab=not args.no_draft_vocab,
                            scan_unroll=args.unroll)  # fmt: skip
    if args.random_heads:
        from medusa_jax.heads import HeadsConfig, init_heads

        model.heads = init_heads(HeadsConfig(args.random_heads, 1, True), model.params, scale=0.02)
    report = {"machine": machine(), "dtype": args.dtype, "argv": sys.argv[1:]}
    if args.steps:
        bs = [int(x) for x in args.batch_sizes.split(",")]
        ts = [int(x) for x in args.tree_sizes.split(",") if int(x) > 1]
        costs = step_costs(model, bs, ts)
        report["step_ms"] = {str(b): {str(k): v * 1e3 for k, v in c.items()} for b, c in costs.items()}
        print(f"step latency on {report['machine']} ({args.dtype}); ratio = step / AR step")
        for b, c in costs.items():
            row = "  ".join(f"{k}:{v * 1e3:.2f}ms ({v / c['ar']:.2f}x)" for k, v in c.items())
            print(f"batch {b}: {row}")
    else:
        from medusa_jax.prompts import read_prompts

        prompts = (
            read_prompts(args.prompts_file)[: args.num_prompts]
            if args.prompts_file
            else [
                "Explain how a rainbow forms.",
            ]
            * args.num_prompts
        )
        modes = args.modes.split(",")
        report["modes"] = {}
        encoded = [model.encode(p) for p in prompts]
        ours = {}
        for mode in modes:
            if mode == "hf":
                continue
            if mode == "medusa" and model.heads is None:
                print("medusa: no heads (--heads or --random-heads), skipped")
                continue
            kw = {"tree": args.tree} if mode == "medusa" and args.tree else {}
            if mode == "medusa" and args.lookup is not None:
                kw["lookup"] = args.lookup
            run_mode = mode
            if mode == "medusa" and not args.tree and model.calibration is not None:
                # the calibrated choice for this batch size (as generate() makes it): its tree, or plain decoding
                plan = model.plan(args.batch_size)
                report["calibrated_tree"] = plan.tree.choices if plan.mode == "medusa" else []
                report["calibrated_lookup"] = plan.tree.lookup
                report["calibrated_reason"] = plan.reason
                run_mode = None
            ours[mode] = (run_mode, kw)
        per_rep = {}
        if ours:
            res, per_rep, _ = run_ours_interleaved(
                model, encoded, ours, args.max_new_tokens, args.batch_size, args.repeats
            )
            report["modes"].update(res)
            report["per_repeat_tokens_per_s"] = per_rep
        if "hf" in modes:
            try:
                hf = load_hf(resolve(args.ckpt), args.dtype)
            except ImportError:
                print("hf: torch is not installed, skipped")
            else:
                pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
                report["modes"]["hf"] = run_hf(
                    hf, encoded, args.max_new_tokens, args.batch_size, args.repeats, model.eos_ids, pad
                )
                del hf
        m = report["modes"]
        sp = {}
        if "medusa" in m and "ar" in m:  # the median of the per-repeat ratios (interleaved runs)
            sp["medusa_vs_ar"] = statistics.median(a / b for a, b in zip(per_rep["medusa"], per_rep["ar"]))
        if "medusa" in m and "hf" in m:
            sp["medusa_vs_hf"] = m["medusa"]["tokens_per_s"] / m["hf"]["tokens_per_s"]
        if "ar" in m and "hf" in m:
            sp["ar_vs_hf"] = m["ar"]["tokens_per_s"] / m["hf"]["tokens_per_s"]
        report["speedup"] = sp
        print(
            f"{len(prompts)} prompts, batch {args.batch_size}, {args.max_new_tokens} new tokens, {args.dtype}, {report['machine']}"
        )
        if "calibrated_tree" in report:
            t = report["calibrated_tree"]
            print(
                f"medusa = the calibrated choice at batch {args.batch_size}: "
                + (f"a {len(t)}-node tree + {report['calibrated_lookup']}-node lookup chain" if t else "no tree (AR)")
            )
        print(f"{'mode':8s} {'tokens/s':>10s} {'tok/step':>9s} {'step ms':>9s} {'compile s':>10s} {'vs ar':>7s}")
        for k, v in m.items():
            vs = v["tokens_per_s"] / m["ar"]["tokens_per_s"] if "ar" in m else float("nan")
            step = f"{v['step_ms']:.2f}" if v.get("step_ms") else "-"
            print(
                f"{k:8s} {v['tokens_per_s']:10.1f} {v['tokens_per_step']:9.2f} {step:>9s} {v['compile_s']:10.1f} {vs:7.2f}"
            )
    report["peak_memory"] = peak = memory.peak_memory()
    print("peak memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in peak.items()))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
