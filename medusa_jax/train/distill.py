"""Self-distillation data: the base model answers the training prompts itself (chat template, greedy).

Output: `OUT/shard_00000.jsonl`, ... each holding `chunk_size` consecutive prompts (the last may hold fewer), one row
per prompt: `{"id", "input_ids", "loss_mask", "prompt_len"}` where `input_ids` = prompt (templated) + answer and
`loss_mask` is 1 on the answer tokens. Each shard is written atomically (temp name + `os.replace`), and progress is
derived from the shards present, so a killed run continues where it stopped without duplicated or lost rows.
`OUT/meta.json` records the settings; a restart with different settings is refused.

    python -m medusa_jax.train.distill --prompts ../shared/data/train_prompts.jsonl --out runs/data \
        --num-prompts 1000 --max-new-tokens 192 --batch-size 16

`--extend DIR` makes longer answers from an existing data directory instead of starting over: each answer that
reached DIR's cap without an end token is continued greedily by `--max-new-tokens` more tokens (the same tokens a
longer first run would have made); answers that ended are copied. The result is again a resumable data directory
(its cap: DIR's plus the new tokens), so answers can grow in rounds.

    python -m medusa_jax.train.distill --extend runs/data --out runs/data_128 --max-new-tokens 64 --batch-size 32

`--temperature T` (> 0) samples the answers instead (`--seed S`; shard i draws with seed S + i, so a resumed run
writes the same rows): more answers to the same prompts for training, e.g. a second data directory beside the greedy
one (`data.path=GREEDY,SAMPLED`). Sampled answers cannot be extended (`--extend` continues greedily).

    python -m medusa_jax.train.distill --prompts ../shared/data/train_prompts.jsonl --out runs/data_t07 \
        --max-new-tokens 128 --batch-size 32 --temperature 0.7 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from medusa_jax.train.rows import build_index

SHARD_FMT = "shard_{:05d}.jsonl"


def read_prompt_file(path: str) -> list[dict]:
    """Rows `{"id", "prompt"}` of a prompts JSONL file (ids default to the line number)."""
    try:
        from medusa_jax.prompts import read_prompts
    except ImportError:
        read_prompts = None
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            if isinstance(d, str):
                d = {"prompt": d}
            rows.append({"id": d.get("id", str(i)), "prompt": d["prompt"]})
    if read_prompts is not None:  # the shared reader is the reference for the prompt text
        texts = read_prompts(path)
        if len(texts) == len(rows):
            for r, t in zip(rows, texts):
                r["prompt"] = t
    return rows


def shard_path(out: str, i: int) -> str:
    return os.path.join(out, SHARD_FMT.format(i))


def done_shards(out: str, num_shards: int) -> list[int]:
    return [i for i in range(num_shards) if os.path.exists(shard_path(out, i))]


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prompts_of(data_dir: str) -> str:
    """The prompts file a data directory answers (from its meta.json; "" when unknown)."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            return str(json.load(f).get("prompts") or "")
    except (OSError, ValueError):
        return ""


def _is_row(row) -> bool:
    """input_ids (token ids >= 0) and loss_mask (0/1) of equal length."""
    ids, mask = row["input_ids"], row["loss_mask"]
    return (
        isinstance(ids, list)
        and isinstance(mask, list)
        and len(ids) == len(mask)
        and all(type(t) is int and 0 <= t < 1 << 31 for t in ids)
        and all(m in (0, 1) and type(m) in (int, bool) for m in mask)
    )


def load_rows(data_dir: str) -> list[dict]:
    """All rows of a distilled data directory, in prompt order."""
    names = sorted(n for n in os.listdir(data_dir) if n.startswith("shard_") and n.endswith(".jsonl"))
    if not os.path.isdir(data_dir):
        raise ValueError(f"data dir {data_dir} does not exist: make it with python -m medusa_jax.train.distill")
    rows = []
    for n in names:
        path = os.path.join(data_dir, n)
        with open(path, "rb") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    ok = _is_row(row)
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    raise ValueError(
                        f"{path}:{i}: not a distilled row (input_ids: token ids, loss_mask: 0/1, of equal length): delete the "
                        "shard and rerun distill, which regenerates missing shards"
                    )
                rows.append(row)
    return rows


def main(argv=None, model=None) -> int:
    """The CLI; `model`: a loaded `MedusaModel` to distill from instead of `--ckpt`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", help="JSONL of {id, prompt}")
    ap.add_argument("--extend", default=None, help="a data dir whose unfinished answers to continue (see above)")
    ap.add_argument("--out", required=True, help="output directory (resumable)")
    ap.add_argument("--ckpt", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--num-prompts", type=int, default=0, help="first N prompts (0: all)")
    ap.add_argument("--offset", type=int, default=0, help="skip the first prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=0, help="prompts per shard (default: batch size)")
    ap.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample the answers at T (default 0: greedy)")
    ap.add_argument("--seed", type=int, default=0, help="with --temperature: shard i samples with seed + i")
    ap.add_argument("--allow-dev", action="store_true", help="allow dev_prompts (evaluation data only)")
    args = ap.parse_args(argv)
    if bool(args.prompts) == bool(args.extend):
        print("give either --prompts (new answers) or --extend DATA_DIR (longer answers)", file=sys.stderr)
        return 2
    if not args.temperature >= 0.0:
        print(f"--temperature {args.temperature}: give 0 (greedy answers) or a positive temperature", file=sys.stderr)
        return 2
    if args.extend:
        if args.temperature:
            print("--extend continues answers greedily: leave --temperature out", file=sys.stderr)
            return 2
        return extend(args, model)
    if "dev_prompts" in os.path.basename(args.prompts) and not args.allow_dev:
        print("refusing dev_prompts.jsonl without --allow-dev: it is for evaluation only", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from medusa_jax.api import load

    chunk = args.chunk_size or args.batch_size
    rows = read_prompt_file(args.prompts)[args.offset :]
    if args.num_prompts:
        rows = rows[: args.num_prompts]
    meta = {
        "prompts": os.path.abspath(args.prompts),
        "ckpt": args.ckpt or "default",
        "offset": args.offset,
        "num_prompts": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "chunk_size": chunk,
        "max_prompt_tokens": args.max_prompt_tokens,
        "dtype": args.dtype,
        "greedy": not args.temperature,
    }
    if args.temperature:  # (greedy directories keep the keys they always had, so they still resume)
        meta.update(temperature=args.temperature, seed=args.seed)
    if not start_out(args.out, meta):
        return 2

    todo, done_rows = pending_shards(args.out, len(rows), chunk)
    if not todo:
        return 0
    model = model if model is not None else load(args.ckpt, dtype=args.dtype)
    bar = tqdm(total=len(rows), initial=done_rows, unit="prompt")
    t0, new_tokens = time.perf_counter(), 0
    for i in todo:
        part = rows[i * chunk : (i + 1) * chunk]
        enc = [model.encode(r["prompt"]) for r in part]
        keep = [j for j, e in enumerate(enc) if len(e) <= args.max_prompt_tokens]
        lines = []
        if keep:
            res = model.generate(
                [enc[j] for j in keep],
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed + i,
                batch_size=args.batch_size,
                mode="ar",
            )
            for j, r in zip(keep, res):
                ids = list(r.prompt_ids) + list(r.output_ids)
                mask = [0] * len(r.prompt_ids) + [1] * len(r.output_ids)
                lines.append(
                    json.dumps(
                        {"id": part[j]["id"], "input_ids": ids, "loss_mask": mask, "prompt_len": len(r.prompt_ids)}
                    )
                )
                new_tokens += len(r.output_ids)
        write_atomic(shard_path(args.out, i), "".join(line + "\n" for line in lines))
        build_index(shard_path(args.out, i))
        bar.update(len(part))
        dt = time.perf_counter() - t0
        bar.set_postfix(tok_s=f"{new_tokens / dt:.0f}", skipped=len(part) - len(keep))
    bar.close()
    dt = time.perf_counter() - t0
    print(f"{args.out}: {len(todo)} shards, {new_tokens} new tokens in {dt:.0f}s ({new_tokens / dt:.1f} tok/s)")
    return 0


def pending_shards(out: str, n_rows: int, chunk: int) -> tuple[list[int], int]:
    """The shards of `out` (`n_rows` rows, `chunk` per shard) still to write, and the rows the others hold; says so
    when none is left."""
    num = (n_rows + chunk - 1) // chunk
    have = set(done_shards(out, num))
    if len(have) == num:
        print(f"{out}: all {num} shards present")
    return [i for i in range(num) if i not in have], sum(min(chunk, n_rows - i * chunk) for i in have)


def start_out(out: str, meta: dict) -> bool:
    """Create `out` with its meta.json, or check that an existing one was made with the same settings."""
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            print(f"{out} holds data made with other settings {diff}: use another --out", file=sys.stderr)
            return False
    else:
        write_atomic(meta_path, json.dumps(meta, indent=1) + "\n")
    return True


def extend(args, model=None) -> int:
    """`--extend SRC`: continue SRC's answers that reached its cap without an end token (see the module doc)."""
    src = args.extend
    try:
        with open(os.path.join(src, "meta.json")) as f:
            src_meta = json.load(f)
        cap = int(src_meta.get("answer_cap", src_meta["max_new_tokens"]))
        src_rows = load_rows(src)
    except (OSError, ValueError, KeyError) as e:
        print(f"--extend {src}: not a distilled data dir ({e}): make one with --prompts first", file=sys.stderr)
        return 2
    if "dev_prompts" in os.path.basename(str(src_meta.get("prompts", ""))) and not args.allow_dev:
        print(
            f"refusing to extend {src} (answers to dev_prompts) without --allow-dev: evaluation only", file=sys.stderr
        )
        return 2
    if os.path.abspath(src) == os.path.abspath(args.out):
        print("--extend writes a new data dir: give another --out", file=sys.stderr)
        return 2
    if src_meta.get("greedy") is False:
        print(f"--extend {src}: its answers are sampled, and --extend continues greedy answers only", file=sys.stderr)
        return 2
    if args.ckpt and args.ckpt != src_meta.get("ckpt"):
        print(f"--ckpt {args.ckpt} is not {src}'s model ({src_meta.get('ckpt')}): leave --ckpt out", file=sys.stderr)
        return 2
    from tqdm import tqdm

    chunk = args.chunk_size or args.batch_size
    meta = {
        "prompts": src_meta.get("prompts"),
        "extend": os.path.abspath(src),
        "ckpt": src_meta.get("ckpt", "default"),
        "num_prompts": len(src_rows),
        "max_new_tokens": args.max_new_tokens,
        "answer_cap": cap + args.max_new_tokens,
        "chunk_size": chunk,
        "dtype": args.dtype,
        "greedy": True,
    }
    if not start_out(args.out, meta):
        return 2
    todo, done_rows = pending_shards(args.out, len(src_rows), chunk)
    if not todo:
        return 0
    from medusa_jax.api import load

    ckpt = None if meta["ckpt"] == "default" else meta["ckpt"]
    model = model if model is not None else load(ckpt, dtype=args.dtype)
    eos = set(model.eos_ids)
    bar = tqdm(total=len(src_rows), initial=done_rows, unit="row")
    t0, new_tokens = time.perf_counter(), 0
    for i in todo:
        part = [dict(r) for r in src_rows[i * chunk : (i + 1) * chunk]]
        open_rows = [r for r in part if sum(r["loss_mask"]) >= cap and r["input_ids"][-1] not in eos]
        if open_rows:
            res = model.generate(
                [r["input_ids"] for r in open_rows],
                max_new_tokens=args.max_new_tokens,
                temperature=0.0,
                batch_size=args.batch_size,
                mode="ar",
            )
            for r, g in zip(open_rows, res):
                r["input_ids"] = list(r["input_ids"]) + list(g.output_ids)
                r["loss_mask"] = list(r["loss_mask"]) + [1] * len(g.output_ids)
                new_tokens += len(g.output_ids)
        write_atomic(shard_path(args.out, i), "".join(json.dumps(r) + "\n" for r in part))
        build_index(shard_path(args.out, i))
        bar.update(len(part))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}", continued=len(open_rows))
    bar.close()
    dt = time.perf_counter() - t0
    print(f"{args.out}: {len(todo)} shards, {new_tokens} new tokens in {dt:.0f}s ({new_tokens / dt:.1f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
