"""Self-distillation data: the base model answers the training prompts itself (chat template, greedy).

Output: `OUT/shard_00000.jsonl`, ... each holding `chunk_size` consecutive prompts (the last may hold fewer), one row
per prompt: `{"id", "input_ids", "loss_mask", "prompt_len"}` where `input_ids` = prompt (templated) + answer and
`loss_mask` is 1 on the answer tokens. Each shard is written atomically (temp name + `os.replace`), and progress is
derived from the shards present, so a killed run continues where it stopped without duplicated or lost rows.
`OUT/meta.json` records the settings; a restart with different settings is refused.

    python -m medusa_jax.train.distill --prompts ../shared/data/train_prompts.jsonl --out runs/data \
        --num-prompts 1000 --max-new-tokens 192 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

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


def load_rows(data_dir: str) -> list[dict]:
    """All rows of a distilled data directory, in prompt order."""
    names = sorted(n for n in os.listdir(data_dir) if n.startswith("shard_") and n.endswith(".jsonl"))
    if not os.path.isdir(data_dir):
        raise ValueError(f"data dir {data_dir} does not exist: make it with python -m medusa_jax.train.distill")
    rows = []
    for n in names:
        path = os.path.join(data_dir, n)
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    ok = len(row["input_ids"]) == len(row["loss_mask"])
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    raise ValueError(
                        f"{path}:{i}: not a distilled row (input_ids and loss_mask of equal length): delete the "
                        "shard and rerun distill, which regenerates missing shards"
                    )
                rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help="JSONL of {id, prompt}")
    ap.add_argument("--out", required=True, help="output directory (resumable)")
    ap.add_argument("--ckpt", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--num-prompts", type=int, default=0, help="first N prompts (0: all)")
    ap.add_argument("--offset", type=int, default=0, help="skip the first prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=0, help="prompts per shard (default: batch size)")
    ap.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--allow-dev", action="store_true", help="allow dev_prompts (evaluation data only)")
    args = ap.parse_args(argv)
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
        "greedy": True,
    }
    os.makedirs(args.out, exist_ok=True)
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            print(f"{args.out} holds data made with other settings {diff}: use another --out", file=sys.stderr)
            return 2
    else:
        write_atomic(meta_path, json.dumps(meta, indent=1) + "\n")

    num_shards = (len(rows) + chunk - 1) // chunk
    have = set(done_shards(args.out, num_shards))
    todo = [i for i in range(num_shards) if i not in have]
    if not todo:
        print(f"{args.out}: all {num_shards} shards present")
        return 0
    model = load(args.ckpt, dtype=args.dtype)
    bar = tqdm(total=len(rows), initial=sum(min(chunk, len(rows) - i * chunk) for i in have), unit="prompt")
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
                temperature=0.0,
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
        bar.update(len(part))
        dt = time.perf_counter() - t0
        bar.set_postfix(tok_s=f"{new_tokens / dt:.0f}", skipped=len(part) - len(keep))
    bar.close()
    dt = time.perf_counter() - t0
    print(f"{args.out}: {len(todo)} shards, {new_tokens} new tokens in {dt:.0f}s ({new_tokens / dt:.1f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
