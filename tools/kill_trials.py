"""Hard kills (SIGKILL) at random moments of training and self-distillation, then a rerun to the end: every
restart must resume from the last complete checkpoint or shard, with no row lost or duplicated and the final losses
(or rows) equal to an uninterrupted run's. On the tiny random model, on CPU.

  python tools/kill_trials.py --trials 10 --seed 0 --out /tmp/kills [--what train,distill]

Each trial draws its kill time uniformly over the reference run's span after its first progress (first metrics
line, or first shard), so kills land in steps, in checkpoint saves and between shards. Prints one line per trial
and a summary; exit 1 when a trial fails."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TRAIN = ["train.steps=10", "train.save_every=1", "train.keep_checkpoints=2", "data.synthetic_dev_rows=0"]
DISTILL = """
import sys
from medusa_jax import api
from medusa_jax.model import init_params
from medusa_jax.run_io import TINY
from medusa_jax.train import distill

class Tok:
    chat_template, eos_token_id = "fake", 0
    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=True):
        return [1] + [3 + ord(c) % 100 for c in msgs[-1]["content"]][:12] + [2]
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

model = api.MedusaModel(TINY, init_params(TINY), Tok(), name="tiny")
api.load = lambda *a, **k: model
sys.exit(distill.main(sys.argv[1:]))
"""


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _command(what: str, out: str, work: str) -> list[str]:
    if what == "train":
        return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
                "--no-progress", f"run_dir={out}", *TRAIN]  # fmt: skip
    prompts = os.path.join(work, "train_prompts.jsonl")
    if not os.path.exists(prompts):
        with open(prompts, "w") as f:
            f.writelines(json.dumps({"id": f"p{i}", "prompt": f"prompt {i} " * (1 + i % 4)}) + "\n" for i in range(16))
    script = os.path.join(work, "distill_tiny.py")
    with open(script, "w") as f:
        f.write(DISTILL)
    return [sys.executable, script, "--prompts", prompts, "--out", out, "--max-new-tokens", "12", "--batch-size", "2"]


def _progressed(what: str, out: str) -> bool:
    if what == "train":
        path = os.path.join(out, "metrics.jsonl")
        return os.path.exists(path) and os.path.getsize(path) > 0
    return os.path.exists(os.path.join(out, "shard_00000.jsonl"))


def _result(what: str, out: str):
    """Train: [(step, loss)] of metrics.jsonl; distill: all rows, in order."""
    if what == "train":
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [(r["step"], r["loss"]) for r in map(json.loads, f)]
    from medusa_jax.train.distill import load_rows
    from medusa_jax.train.rows import RowSource

    rows = load_rows(out)
    src = RowSource(out, 1 << 20)  # the shards' indexes must agree with their rows
    assert src.rows(range(len(src))) == [r for r in rows if any(r["loss_mask"])], "index and shards disagree"
    return rows


def _run(what: str, out: str, work: str, kill_after: float | None) -> tuple[str, float, float]:
    """Run (killed `kill_after` s after its first progress, or to the end): (how it ended, seconds to first progress,
    seconds from then to the end)."""
    p = subprocess.Popen(_command(what, out, work), env=_env(), cwd=work, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    t0 = time.perf_counter()
    t_prog = None
    while p.poll() is None:
        if t_prog is None and _progressed(what, out):
            t_prog = time.perf_counter()
        if t_prog is not None and kill_after is not None and time.perf_counter() - t_prog >= kill_after:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return "killed", t_prog - t0, time.perf_counter() - t_prog
        time.sleep(0.02)
    err = p.stderr.read()
    if p.returncode != 0:
        raise RuntimeError(f"{what} exited {p.returncode}: {err.strip().splitlines()[-1:] if err else ''}")
    t_prog = t_prog or time.perf_counter()
    return "finished", t_prog - t0, time.perf_counter() - t_prog


def trials(what: str, n: int, seed: int, work: str, log=print) -> dict:
    import random

    import numpy as np

    rng = random.Random(seed)
    ref_dir = os.path.join(work, f"{what}_ref")
    shutil.rmtree(ref_dir, ignore_errors=True)
    _, _, span = _run(what, ref_dir, work, None)
    ref = _result(what, ref_dir)
    failures, killed = 0, 0
    for t in range(n):
        out = os.path.join(work, f"{what}_{t}")
        shutil.rmtree(out, ignore_errors=True)
        at = rng.uniform(0.0, span)
        how, _, _ = _run(what, out, work, at)
        killed += how == "killed"
        _run(what, out, work, None)  # the restart, to the end
        got = _result(what, out)
        if what == "train":
            ok = [s for s, _ in got] == [s for s, _ in ref] and np.allclose(
                [x for _, x in got], [x for _, x in ref], rtol=1e-6
            )
        else:
            ok = got == ref
        failures += not ok
        log(f"{what} trial {t}: kill {at:.2f}s after first progress ({how}); {'ok' if ok else 'DIFFERENT'}")
        shutil.rmtree(out, ignore_errors=True)
    return {"what": what, "trials": n, "killed": killed, "failures": failures, "span_s": round(span, 2),
            "units": len(ref)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="a scratch folder")
    ap.add_argument("--what", default="train,distill")
    args = ap.parse_args(argv)
    kinds = [w.strip() for w in args.what.split(",") if w.strip()]
    if args.trials < 1 or not kinds or any(w not in ("train", "distill") for w in kinds):
        ap.error("--trials >= 1 and --what from train,distill")
    os.makedirs(args.out, exist_ok=True)
    bad = 0
    for w in kinds:
        s = trials(w, args.trials, args.seed, os.path.abspath(args.out))
        print(json.dumps(s))
        bad += s["failures"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
