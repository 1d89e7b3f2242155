"""One script for a lent accelerator: correctness and speed of AR and Medusa decoding on SmolLM2.

  python tools/device_check.py --ckpt PATH.gguf --out DIR [--quick]

Prints a short table last and writes DIR/device_check.json. Test it on CPU with --quick first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# varied prompts (tokens per step on one repeated prompt is not representative); --prompts FILE overrides
DEFAULT_PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a short story about a robot who learns to paint.",
    "Give three tips for staying productive while working from home.",
    "What is the difference between a virus and a bacterium?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize the causes of the French Revolution in a paragraph.",
    "Describe the water cycle for a ten-year-old.",
    "List five healthy breakfast ideas and say why each is good.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--big", action="store_true", help="also the Llama-7B-shaped random model: bandwidth, tree step")
    ap.add_argument("--only-big", action="store_true")
    args = ap.parse_args()
    if args.big or args.only_big:
        big = big_model_check(args.quick)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "device_check_big.json"), "w") as f:
            json.dump(big, f, indent=1)
        if args.only_big:
            return

    import jax

    import medusa_jax
    from medusa_jax.bench import load_hf, machine, run_hf, run_ours, step_costs
    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.prompts import read_prompts

    rep = {"machine": machine(), "jax": jax.__version__}
    print(rep, flush=True)
    prompts = read_prompts(args.prompts)[:8] if args.prompts else DEFAULT_PROMPTS
    n_new = 16 if args.quick else 128
    reps = 1 if args.quick else 3

    # 1. float32: Medusa greedy equals AR greedy (random heads), batch 4 of mixed lengths
    t0 = time.perf_counter()
    m32 = medusa_jax.load(args.ckpt, dtype="float32")
    rep["load_s"] = time.perf_counter() - t0
    m32.heads = init_heads(HeadsConfig(4, 1, True), m32.params, scale=0.02)
    ar = m32.generate(prompts[:4], max_new_tokens=n_new, mode="ar")
    md = m32.generate(prompts[:4], max_new_tokens=n_new, mode="medusa", tree="mc_sim_7b_63")
    rep["f32_medusa_equals_ar"] = [a.output_ids == b.output_ids for a, b in zip(ar, md)]
    print("f32 medusa == ar:", rep["f32_medusa_equals_ar"], flush=True)
    del m32

    # 2. bfloat16 throughput, batch 1 and 8, with the shipped trained heads (issue 5: Medusa >= 2x AR at batch 1,
    # >= 1.8x at batch 8), for a 16-node and the 63-node tree, and the latter with a 10-node lookup chain
    m = medusa_jax.load(args.ckpt, dtype="bfloat16", heads="smollm2_medusa1")
    rep["heads"] = "smollm2_medusa1 (shipped, root-token heads, draft vocabulary)"
    enc = [m.encode(p) for p in prompts]
    rep["gen"] = {}
    for b in (1, 8):
        ps = enc[:b] if b > 1 else enc[:4]
        for name, mode, kw in (("ar", "ar", {}), ("medusa16", "medusa", {"tree": "cpu_16"}),
                               ("medusa", "medusa", {"tree": "mc_sim_7b_63"}),
                               ("medusa_lookup", "medusa", {"tree": "mc_sim_7b_63", "lookup": 10})):  # fmt: skip
            r, res = run_ours(m, ps, mode, n_new, b, reps, **kw)
            rep["gen"][f"{name}_b{b}"] = r
            print(f"bf16 {name} batch {b}: {r}", flush=True)
    rep["sample_text"] = res[0].text[:200]

    # 3. step cost curve (bf16)
    costs = step_costs(m, [1, 8], [4, 8, 16, 32, 64], iters=5 if args.quick else 50)
    rep["step_ms"] = {str(b): {str(k): v * 1e3 for k, v in c.items()} for b, c in costs.items()}
    for b, c in costs.items():
        print(f"step b{b}: " + "  ".join(f"{k}:{v * 1e3:.3f}ms({v / c['ar']:.2f}x)" for k, v in c.items()), flush=True)

    # 4. HF transformers eager generate, bf16, batch 1 (the baseline)
    if args.hf:
        try:
            hf = load_hf(args.ckpt, "bfloat16")
            pad = m.tokenizer.pad_token_id or 0
            rep["gen"]["hf_b1"] = run_hf(hf, enc[:2], min(n_new, 64), 1, 1, m.eos_ids, pad)
            print("hf b1:", rep["gen"]["hf_b1"], flush=True)
        except Exception as e:  # the baseline is optional
            rep["hf_error"] = repr(e)[:300]
            print("hf failed:", rep["hf_error"], flush=True)

    from medusa_jax.memory import peak_memory

    rep["peak_memory"] = peak_memory()  # host RSS; device memory_stats() peak on an accelerator
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "device_check.json"), "w") as f:
        json.dump(rep, f, indent=1)
    g = rep["gen"]
    print("\nSUMMARY", rep["machine"])
    for k, v in g.items():
        print(
            f"  {k:10s} {v['tokens_per_s']:9.1f} tok/s  {v['tokens_per_step']:.2f} tok/step  compile {v['compile_s']:.1f}s"
        )
    for b, c in rep["step_ms"].items():
        print(f"  steps b{b}: " + " ".join(f"{k}={v:.3f}" for k, v in c.items()))
    print("  peak memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in rep["peak_memory"].items()))


def big_model_check(quick: bool) -> dict:
    """A Llama-2-7B-shaped model with random bf16 weights: does the AR step move weights + cache near the measured
    copy bandwidth, and what does a 64-node tree step cost against it? (issue 5 targets: >= 70%, <= 1.2x)"""
    import jax
    import jax.numpy as jnp

    from medusa_jax.api import MedusaModel
    from medusa_jax.bench import step_costs
    from medusa_jax.config import ModelConfig
    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.model import Transformer, causal_mask

    dims = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
    if quick:
        dims = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=64)
    cfg = ModelConfig(vocab_size=32000, max_position_embeddings=4096, dtype="bfloat16", param_dtype="bfloat16",
                      tie_word_embeddings=False, **dims)  # fmt: skip
    tokens = jnp.zeros((1, 4), jnp.int32)
    init = lambda m: m.logits(m(tokens, tokens, causal_mask(4))[0])
    t0 = time.perf_counter()
    params = jax.jit(lambda k: Transformer(cfg).init(k, method=init)["params"])(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: (a * 0.02).astype(jnp.bfloat16) if a.ndim >= 2 else a, params)
    jax.block_until_ready(params)
    rep = {"init_s": time.perf_counter() - t0}
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    rep["param_gb"] = nbytes / 1e9
    # copy bandwidth: read + write of a 4 GB buffer
    x = jnp.ones((1 << 30,) if not quick else (1 << 22,), jnp.float32)
    cp = jax.jit(lambda a: a + 1)
    jax.block_until_ready(cp(x))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(cp(x))
        ts.append(time.perf_counter() - t0)
    rep["copy_gb_s"] = 2 * x.size * 4 / min(ts) / 1e9
    del x
    model = MedusaModel(cfg, params, heads=init_heads(HeadsConfig(4, 1, False), params, scale=0.02,
                                                      dtype=jnp.bfloat16))  # fmt: skip
    prefix = 512
    costs = step_costs(model, [1], [64], prefix=prefix, iters=5 if quick else 30)[1]
    cache_gb = 2 * cfg.num_layers * (prefix + 128) * cfg.num_kv_heads * cfg.head_dim * 2 / 1e9
    rep["ar_step_ms"] = costs["ar"] * 1e3
    rep["tree64_step_ms"] = costs[64] * 1e3
    rep["tree64_vs_ar"] = costs[64] / costs["ar"]
    rep["ar_gb_s"] = (nbytes + cache_gb * 1e9) / costs["ar"] / 1e9
    rep["ar_fraction_of_copy_bw"] = rep["ar_gb_s"] / rep["copy_gb_s"]
    print("BIG", json.dumps(rep), flush=True)
    return rep


if __name__ == "__main__":
    main()
