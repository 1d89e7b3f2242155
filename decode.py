#!/usr/bin/env python
"""Generate answers with a backbone (plus optional Medusa heads) and report the speed.

    python decode.py                                   # the embedded SmolLM2-135M-Instruct, a built-in prompt
    python decode.py --ckpt org/name --heads heads/ --prompts-file prompts.jsonl --output answers.jsonl
    python decode.py --chat                            # a multi-turn conversation (the KV cache is kept)

Bad input (files, flag values, prompts that do not fit, unreadable checkpoints) ends with a one-line
`decode.py: error: ...` on stderr and exit status 2. Progress and the chosen mode (and why) go to stderr; speeds
never count compilation (reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

from medusa_jax.options import GenerateOptions, OptionError
from medusa_jax.prompts import read_prompts

DEFAULT_LOOKUP = 10  # as medusa_jax.lookup.DEFAULT_LOOKUP (not imported: it would import JAX before the first line)

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."
PROG = "decode.py"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # as medusa_jax.checkpoint.HUB_ID


MODES = {"ar": "plain decoding (ar)", "medusa": "Medusa decoding"}


class InputError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Generate with a Medusa (or plain) model and report tokens/s and tokens/step. The startup line "
        "(stderr) says which mode runs and why: with heads, Medusa runs when this device's calibration (or, without "
        "one, the built-in tree) expects it to beat plain decoding at this batch size; the shipped CPU calibration "
        "picks plain decoding at every batch size on a 2-core CPU.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--ckpt", help="HF model directory, .gguf file or hub id (default: embedded SmolLM2-135M)")
    m.add_argument(
        "--heads",
        metavar="PATH|NAME|none",
        help="Medusa heads: a directory/file/hub id, a shipped set (smollm2_medusa1, smollm2_medusa2, "
        "smollm2_sequential), or none "
        "(default: the shipped heads for the embedded model)",
    )
    m.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="the weights' dtype; activations and the KV cache stay float32, so greedy Medusa output equals plain "
        "decoding (default: float32 on CPUs, bfloat16 on GPUs and TPUs)",
    )
    m.add_argument(
        "--mesh",
        metavar="DATAxMODEL",
        help="decode sharded over DATA x MODEL devices, e.g. 1x8: batch rows over DATA, attention heads, MLP and "
        "vocabulary over MODEL (default: one device)",
    )
    m.add_argument(
        "--activations",
        choices=("float32", "bfloat16"),
        help="bfloat16: activations and KV cache in bfloat16 too (half the cache memory; greedy output may then "
        "differ from plain decoding after near-ties)",
    )
    i = p.add_argument_group("prompts")
    i.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    i.add_argument("--prompts-file", metavar="F.jsonl", help='JSONL with "prompt" or "turns" (first turn used)')
    i.add_argument("--num-prompts", type=int, metavar="N", help="use the first N prompts of --prompts-file")
    i.add_argument("--raw", action="store_true", help="feed prompts as plain text (no chat template)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="in [0, 2**32): the same prompts, --batch-size and seed give the same output",
    )
    g.add_argument("--batch-size", type=int, help="prompts per batch (default: all, up to 16)")
    g.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory for one batch's KV cache and temporaries, e.g. 4G; batches are sized to fit "
        "(default: half the available memory)",
    )
    g.add_argument(
        "--mode",
        choices=("ar", "medusa"),
        help="default: medusa when heads are loaded and this device's calibration picks a tree at this batch size "
        "(without a calibration: always with heads), else ar (plain decoding)",
    )
    g.add_argument(
        "--tree",
        metavar="NAME|FILE",
        help="Medusa tree: a shipped name (e.g. mc_sim_7b_63), a JSON file, or "
        "dynamic_N[_dD][_kK] (a feature drafter's N most confident drafts each step, D deep, K per node)",
    )
    g.add_argument(
        "--lookup",
        type=int,
        metavar="N",
        help="lookup-chain nodes: drafts copied from the context after its last n-gram, verified with the tree "
        f"(default: the calibrated length, else {DEFAULT_LOOKUP}, without --tree; 0 with it)",
    )
    g.add_argument(
        "--acceptance",
        choices=("rejection", "typical", "greedy"),
        help="Medusa acceptance at temperature > 0: rejection (default; keeps the model's distribution) or typical",
    )
    g.add_argument("--posterior-threshold", type=float, default=0.09, help="typical acceptance: epsilon")
    g.add_argument("--posterior-alpha", type=float, default=0.3, help="typical acceptance: delta")
    o = p.add_argument_group("interaction")
    o.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        help="print text as it is generated, one prompt at a time (default: on for a single prompt)",
    )
    o.add_argument("--chat", action="store_true", help="multi-turn chat on stdin; commands: reset, exit")
    o.add_argument("--system", metavar="TEXT", help="system message for --chat")
    p.add_argument(
        "--output",
        metavar="F.jsonl",
        help="write one JSON line per prompt, in input order (batch_seconds: the wall time of the prompt's batch)",
    )
    return p


def validate(args) -> list[str]:
    """Checks flags and files (no model needed); returns the prompts."""
    try:  # the same checks (and messages) as the API's
        GenerateOptions.from_kwargs(**vars(args))
    except OptionError as e:
        raise InputError(e.message(cli=True)) from None
    if args.max_memory is not None:
        from medusa_jax.memory import parse_bytes

        try:
            args.max_memory = parse_bytes(args.max_memory)
        except ValueError as e:
            raise InputError(f"--max-memory: {e}") from None
    if args.mesh is not None:
        from medusa_jax.sharding import parse_mesh

        try:
            parse_mesh(args.mesh)
        except ValueError as e:
            raise InputError(f"--mesh: {e}") from None
    if args.num_prompts is not None and args.num_prompts < 1:
        raise InputError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.num_prompts is not None and not args.prompts_file:
        raise InputError("--num-prompts needs --prompts-file")
    if args.chat and (args.prompt or args.prompts_file or args.output or args.raw):
        raise InputError("--chat reads the conversation from stdin: drop --prompt/--prompts-file/--output/--raw")
    for flag, value in (("--ckpt", args.ckpt), ("--heads", args.heads)):
        if flag == "--heads" and value is not None and (value == "none" or shipped_heads(value)):
            continue
        if value is not None and not os.path.exists(value) and not HUB_ID.match(value):
            raise InputError(f"{flag} {value}: no such file or directory (and not a hub id like org/name)")
    if args.output:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise InputError(f"--output {args.output}: directory {out_dir} does not exist")
        if os.path.isdir(args.output):
            raise InputError(f"--output {args.output}: is a directory")
    prompts = list(args.prompt)
    for n, p in enumerate(prompts, 1):
        if not p.strip():
            raise InputError(f"--prompt #{n} is empty")
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file, args.num_prompts)  # ValueError "file:line: ..."
    return prompts or [DEFAULT_PROMPT]


def shipped_heads(name: str) -> bool:
    """Whether `name` is a head set shipped in the package (as medusa_jax.api.shipped_heads, without JAX)."""
    import importlib.util

    spec = importlib.util.find_spec("medusa_jax")
    homes = list(spec.submodule_search_locations or []) if spec else []
    return any(os.path.exists(os.path.join(h, "head_sets", name, "config.json")) for h in homes)


def check_tree(name: str | None) -> None:
    """Fails early (ValueError) for an unknown tree name or a bad tree file."""
    if name is not None:
        from medusa_jax.tree import dynamic_tree, get_tree

        if dynamic_tree(name) is None:
            get_tree(name)


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so a second run skips most compiles; and the compile-time counter."""
    import jax

    from medusa_jax.cache import cache_dir

    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    COMPILE.install()


class CompileClock:
    """Seconds spent tracing, lowering and compiling (or reading the compilation cache), from JAX's monitoring
    events: generation runs subtract it, so tokens/s is decode speed only."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")  # fmt: skip

    def __init__(self):
        self.seconds = 0.0
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            import jax

            jax.monitoring.register_event_duration_secs_listener(self._on_event)
            self.installed = True

    def _on_event(self, name: str, duration: float, **_) -> None:
        if name in self.EVENTS:
            self.seconds += duration


COMPILE = CompileClock()


def say(msg: str) -> None:
    """A progress line on stderr (stdout keeps only the answers and the summary)."""
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()


def generate(model, prompts: list[str], args) -> tuple[list, float, float]:
    """Encodes and checks every prompt first (so a bad one fails before any work), then generates. Returns the
    results, the wall time and the part of it spent compiling."""
    encoded = [model.encode(p, raw=args.raw) for p in prompts]
    for n, ids in enumerate(encoded, 1):
        try:
            model.check_fits(len(ids), args.max_new_tokens)
        except ValueError as e:
            raise InputError(f"prompt {n}: {e}") from None
    mode = args.mode or default_mode(model, args, len(encoded))
    kw = medusa_kwargs(args) if mode == "medusa" else {}
    c0 = COMPILE.seconds
    if stream_enabled(args, prompts):
        results, seconds = generate_streaming(model, prompts, encoded, args.mode, args)
        return results, seconds, COMPILE.seconds - c0
    t0 = time.perf_counter()
    results = model.generate(
        encoded,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        mode=args.mode,
        batch_size=args.batch_size,
        max_memory=args.max_memory,
        **kw,
    )
    return results, time.perf_counter() - t0, COMPILE.seconds - c0


def default_mode(model, args, n_prompts: int) -> str:
    """medusa when there are heads, unless the heads' calibration for this device found no tree worth verifying at
    this batch size."""
    return choose_mode(model, args, n_prompts)[0]


def choose_mode(model, args, n_prompts: int) -> tuple[str, str]:
    """(mode, why) for the startup line."""
    batch = min(args.batch_size or 16, n_prompts)
    if model.heads is None:
        return args.mode or "ar", "no Medusa heads loaded"
    hc = model.heads_config
    loaded = "a feature drafter" if hc.feature else f"{hc.num_heads} Medusa heads"
    if args.mode:
        return args.mode, f"{loaded} loaded; --mode {args.mode}"
    if args.tree is not None:
        return "medusa", f"{loaded} loaded; --tree {args.tree}"
    cal = model.calibration
    if cal is None:
        return "medusa", (f"{loaded} loaded; no calibration for this device in the heads directory, so "
                          "Medusa with the built-in tree (bench --calibrate measures whether it pays off)")  # fmt: skip
    from medusa_jax.calibrate import _nearest

    near = _nearest(cal, batch)
    rates = {int(n): float(v) for n, v in (near.get("expected_tokens_per_s") or {}).items()}
    plan = model.plan(batch, temperature=args.temperature)  # the decision generate() and Session make
    where = f"this {cal.get('device', 'device')} calibration"
    if plan.mode == "ar":
        best = max((n for n in rates if n), key=lambda n: rates[n], default=None)
        vs = (f" (best tree: {rates[best]:.1f} expected tokens/s vs {rates.get(0, 0):.1f} plain, under the "
              f"{cal.get('min_gain', 1.15)}x needed)" if best is not None and 0 in rates else "")  # fmt: skip
        return "ar", f"{loaded} loaded; {where} picks plain decoding at batch {batch}{vs}"
    lookup = model.default_lookup(batch)
    chain = f" + a {lookup}-node lookup chain" if lookup else ""
    nodes = plan.tree.num_nodes - plan.tree.lookup - 1
    return "medusa", f"{loaded} loaded; {where} picks a {nodes}-node tree{chain} at batch {batch}"


def check_options(model, mode: str, args) -> None:
    """Options that cannot apply to the chosen mode: an error when asked for explicitly against --mode, a warning
    when the automatic choice made them moot; a tree deeper than the heads is an error."""
    if mode == "ar":
        moot = [f for f, v in (("--acceptance", args.acceptance), ("--tree", args.tree), ("--lookup", args.lookup))
                if v is not None]  # fmt: skip
        if moot and args.mode == "ar":
            raise InputError(f"{', '.join(moot)} apply to Medusa decoding, not to --mode ar: drop them")
        if moot:
            say(f"warning: {', '.join(moot)} not used: plain decoding runs (see above); pass --mode medusa to use it")
    if args.tree is not None and model.heads is not None:
        from medusa_jax.feature_drafter import is_feature
        from medusa_jax.tree import dynamic_tree, get_tree, max_depth

        dynamic = dynamic_tree(args.tree)
        if dynamic is not None and not is_feature(model.heads):
            raise InputError(f"--tree {args.tree} is a dynamic tree, for a feature drafter (such as --heads "
                             "smollm2_feature): with these heads use a static tree, e.g. mc_sim_7b_63")  # fmt: skip
        k = model.heads_config.num_heads
        depth = dynamic.head_depth if dynamic is not None else max_depth(get_tree(args.tree))
        if depth > k:
            hint = f"chain_N goes up to chain_{k}" if args.tree.startswith("chain_") else f"use a tree of depth <= {k}"
            raise InputError(f"--tree {args.tree} is {depth} tokens deep, but these heads guess only {k} ahead: {hint}")


def medusa_kwargs(args) -> dict:
    kw = dict(posterior_threshold=args.posterior_threshold, posterior_alpha=args.posterior_alpha)
    if args.tree is not None:
        kw["tree"] = args.tree
    if args.acceptance is not None:
        kw["acceptance"] = args.acceptance
    if args.lookup is not None:
        kw["lookup"] = args.lookup
    return kw


def stream_enabled(args, prompts) -> bool:
    return args.stream if args.stream is not None else len(prompts) == 1


def make_session(model, mode: str | None, args):
    from medusa_jax.session import Session

    return Session(model, mode=mode, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, **medusa_kwargs(args))  # fmt: skip


def generate_streaming(
    model, prompts: list[str], encoded: list[list[int]], mode: str | None, args
) -> tuple[list, float]:
    """One prompt at a time, printing text as the decode loop accepts it."""
    from medusa_jax.api import GenerationResult

    session = make_session(model, mode, args)
    results, total = [], 0.0
    for n, (p, ids) in enumerate(zip(prompts, encoded), 1):
        print(f"### [{n}] {headline(p)}", flush=True)
        session.reset()
        got: list[int] = []
        t0 = time.perf_counter()
        for piece in session.stream_text(ids, args.max_new_tokens, got):
            print(piece, end="", flush=True)
        dt = time.perf_counter() - t0
        total += dt
        text = model.tokenizer.decode(got, skip_special_tokens=True) if model.tokenizer is not None else ""
        r = GenerationResult(list(ids), got, text, len(got), session.last_steps, dt)
        print(f"\n--- {r.new_tokens} tokens, {r.steps} steps\n", flush=True)
        results.append(r)
    return results, total


def chat(model, mode: str, args) -> None:
    """A conversation on stdin/stdout. Commands: reset, exit (or end of input)."""
    session = make_session(model, mode, args)
    if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
        raise InputError("--chat needs a tokenizer with a chat template (an instruct/chat model)")
    tty = sys.stdin.isatty()
    print("chat: type a message; 'reset' starts over, 'exit' quits.", flush=True)
    while True:
        try:
            line = input("you> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("exit", "quit", "/exit", "/quit"):
            return
        if cmd in ("reset", "/reset"):
            session.reset()
            print("(conversation reset)", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        t0, c0 = time.perf_counter(), COMPILE.seconds
        reply = session.chat(cmd, args.max_new_tokens, system=args.system)
        try:
            for piece in reply:
                print(piece, end="", flush=True)
        except (Exception, KeyboardInterrupt) as e:  # one line, and the chat goes on (the session says what it kept)
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"error: {one_line(e)}"
            print(f"\n({what}{session_state(session)})", flush=True)
            continue
        finally:
            reply.close()  # an early stop (Ctrl-C while printing) keeps what was shown in the session
        compile_s = COMPILE.seconds - c0
        dt = time.perf_counter() - t0 - compile_s
        new = session.last_new
        comp = f", compile {compile_s:.1f} s" if compile_s >= 0.05 else ""
        print(f"\n({new} tokens, {session.last_steps} steps, {new / max(dt, 1e-9):.1f} tokens/s{comp}; "
              f"prefilled {session.last_prefill}, reused {session.last_reused} from the cache)", flush=True)  # fmt: skip


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def session_state(session) -> str:
    """What a failed turn left in the session, for the chat's error line."""
    if session.recovery == "reset":
        return "; the cache was reset: the next turn re-reads the conversation"
    if session.recovery == "intact":
        return "; the conversation is kept"
    return ""


def headline(p: str) -> str:
    head = p.strip().splitlines()[0]
    return head if len(head) <= 80 else head[:77] + "..."


def report(
    prompts: list[str], results, seconds: float, mode: str, printed: bool = False, compile_s: float = 0.0
) -> str:
    """Prints the answers (unless streamed) and the summary; tokens/s excludes compilation."""
    for n, (p, r) in enumerate(zip(prompts, results), 1):
        if not printed:
            print(f"### [{n}] {headline(p)}\n{r.text}\n--- {r.new_tokens} tokens, {r.steps} steps\n", flush=True)
    tokens = sum(r.new_tokens for r in results)
    steps = sum(r.steps for r in results)
    decode_s = max(seconds - compile_s, 1e-9)
    summary = (
        f"{len(results)} prompts, {tokens} new tokens in {decode_s:.2f} s (+ {compile_s:.2f} s compiling): "
        f"{tokens / decode_s:.1f} tokens/s, {tokens / max(steps, 1):.2f} tokens/step ({mode})"
    )
    print(summary, flush=True)
    return summary


def write_output(path: str, prompts: list[str], results) -> None:
    """One JSON line per prompt, written to a temp file in the same directory and renamed into place."""
    out_dir = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".decode-", suffix=".jsonl.tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for p, r in zip(prompts, results):
                row = dict(
                    prompt=p,
                    output_ids=r.output_ids,
                    text=r.text,
                    new_tokens=r.new_tokens,
                    steps=r.steps,
                    batch_seconds=round(r.seconds, 4),
                )
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def numerics_line(args) -> str:
    """Which numerics run and why (the weights' dtype given, or the device's default)."""
    from medusa_jax.config import default_dtype

    if args.activations == "bfloat16":
        return f"{args.dtype or default_dtype()[0]} weights with bfloat16 activations and KV cache (--activations)"
    if args.dtype:
        return f"{args.dtype} weights with float32 activations and KV cache (--dtype)"
    return default_dtype()[1]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": we need no torch
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse's own errors exit 2
    try:
        prompts = validate(args)
        check_tree(args.tree)
        t0 = time.perf_counter()
        say(f"loading {args.ckpt or 'the embedded SmolLM2-135M-Instruct'} ...")
        enable_compilation_cache()
        import medusa_jax

        heads = False if args.heads == "none" else args.heads
        numerics = numerics_line(args)
        model = medusa_jax.load(args.ckpt, dtype=args.dtype, activations=args.activations, heads=heads, mesh=args.mesh)
        if model.tokenizer is None:
            raise InputError(f"{args.ckpt} has no tokenizer files: decode.py needs them to read text prompts")
        mode, why = choose_mode(model, args, 1 if args.chat else len(prompts))
        if mode == "medusa" and model.heads is None:
            raise InputError("--mode medusa needs Medusa heads: pass --heads PATH")
        check_options(model, mode, args)
        where = f", sharded over a {args.mesh} mesh" if args.mesh else ""
        say(f"loaded {model.name} in {time.perf_counter() - t0:.1f} s: {numerics}{where}; {why}; running {MODES[mode]} "
            "(the first run of a prompt/output size compiles; later runs read the compilation cache)")  # fmt: skip
        if args.chat:
            chat(model, args.mode, args)
            return 0
        results, seconds, compile_s = generate(model, prompts, args)
        report(prompts, results, seconds, mode, printed=stream_enabled(args, prompts), compile_s=compile_s)
        if args.output:
            write_output(args.output, prompts, results)
    except (InputError, ValueError, OSError, ImportError) as e:  # CheckpointError is a ValueError
        msg = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"{parser.prog}: error: {msg}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        # skip interpreter teardown: a failed orbax restore leaves a background event loop that prints a traceback
        # at exit; nothing is pending (outputs are written atomically before this point)
        os._exit(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
