"""The sharded train step: a 2x2x2 mesh of 8 simulated CPU devices gives the 1-device losses and params, and two
processes joined by jax.distributed (4 devices each) train to the same losses as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
COMMON = ["train.steps=3", "train.checkpoint=false", "data.synthetic_dev_rows=0", "train.heads_warmup_steps=0"]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    nproc, pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    overrides = json.loads(sys.argv[5])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if nproc > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)
    from medusa_jax.train.config import load_config
    from medusa_jax.train.trainer import gather_to_host, train
    res = {}
    for name, ov in overrides.items():
        r = train(load_config(sys.argv[6], ov), progress=False)
        host = gather_to_host(r.trainable)
        flat = {jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in jax.tree_util.tree_flatten_with_path(host)[0]}
        res[name] = {"losses": r.losses, "params": flat, "devices": jax.device_count()}
    with open(f"{out}.{pid}.json", "w") as f:
        json.dump(res, f)
    """
)


def _run(tmp_path, nproc, devices, runs, timeout=240, worker=WORKER):
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = xla_env(devices)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "out")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(nproc), str(i), str(port), out, json.dumps(runs), TINY],
            env=env,
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(nproc)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.loads(open(f"{out}.{i}.json").read()) for i in range(nproc)]


def _close(a, b, rtol=2e-4, atol=2e-5):
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=rtol, atol=atol)
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        np.testing.assert_allclose(np.asarray(a["params"][k]), np.asarray(b["params"][k]), rtol=rtol, atol=atol,
                                   err_msg=k)  # fmt: skip


def test_mesh_2x2x2_matches_one_device(tmp_path):
    runs = {
        "one": COMMON + ["run_dir=one", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"],
        "mesh": COMMON + ["run_dir=mesh", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    }
    (res,) = _run(tmp_path, 1, 8, runs)
    assert res["one"]["devices"] == 8
    losses = res["one"]["losses"]
    assert len(losses) == 3 and np.isfinite(losses).all() and losses[-1] < losses[0]  # it trains
    _close(res["one"], res["mesh"])


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives")
def test_two_processes_match_one(tmp_path):
    runs = {"mp": COMMON + ["run_dir=mp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}
    r0, r1 = _run(tmp_path, 2, 4, runs)
    assert r0["mp"]["devices"] == 8
    np.testing.assert_allclose(r0["mp"]["losses"], r1["mp"]["losses"], rtol=0, atol=0)
    # reference: the same steps in one process on one device
    from medusa_jax.train.config import load_config
    from medusa_jax.train.trainer import train

    one = train(load_config(TINY, COMMON + [f"run_dir={tmp_path / 'one'}"]), progress=False)
    np.testing.assert_allclose(r0["mp"]["losses"], one.losses, rtol=2e-4, atol=2e-5)


PLAN_WORKER = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from medusa_jax.train import plan as pl
    from medusa_jax.train.config import load_config
    cfg = load_config(sys.argv[1], ["train.mode=medusa2", "lora.rank=4"])
    step, args = pl.step_inputs(cfg, (1, 2, 2))
    shard_bytes = lambda x, s: int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
    want = sum(shard_bytes(x, s) for a, sh in args for x, s in zip(jax.tree.leaves(a), jax.tree.leaves(sh)))
    whole = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for a, _ in args for x in jax.tree.leaves(a))
    p = pl.plan(cfg, (1, 2, 2))
    print(json.dumps({"want": want, "whole": whole, "args": p.argument_bytes, "flops": p.flops,
                      "temp": p.temp_bytes, "alias": p.alias_bytes}))
    """
)


def test_plan_reports_sharded_memory_and_flops(tmp_path):
    """The plan compiles the sharded step with abstract inputs: its per-device arguments are the shards' bytes
    (less than the whole), the donated state is aliased, FLOPs exceed 6 x tokens x trainable-path params, and the
    CLI prints the table row (exit 2 on a mesh that does not match --devices)."""
    script = tmp_path / "plan_worker.py"
    script.write_text(PLAN_WORKER)
    env = xla_env(4)
    out = subprocess.run([sys.executable, str(script), TINY], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["args"] == r["want"] < r["whole"]
    assert r["alias"] > 0 and r["temp"] > 0
    tokens = 8 * 32 // 4  # per device
    assert r["flops"] > 2 * tokens * 100_000  # forward alone: 2 x tokens x (tiny backbone ~ 1e5 params)
    cli = [sys.executable, "-m", "medusa_jax.train.plan", "--config", TINY, "--devices", "4", "--chip", "v5e"]
    bad = subprocess.run([*cli, "--mesh", "2,1,1"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--mesh 2,1,1" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


DATA_WORKER = textwrap.dedent(
    """
    import json, sys
    nproc, pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    runs = json.loads(sys.argv[5])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if nproc > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)
    from medusa_jax.train import distill, rows as rows_lib
    seen = []
    real = rows_lib.RowSource.rows
    def rows(self, idx):
        got = real(self, idx)
        seen.append([r["id"] for r in got])
        return got
    def whole(*a, **k):
        raise AssertionError("a process read the whole data set")
    rows_lib.RowSource.rows, rows_lib.build_index, distill.load_rows = rows, whole, whole
    from medusa_jax.train.config import load_config
    from medusa_jax.train.trainer import Hooks, train
    class Kill(SystemExit):
        pass
    def stop_at(n):
        def after(done):
            if done == n:
                raise Kill(3)
        return Hooks(after_step=after)
    res = {}
    for name, (ov, stop) in runs.items():
        seen.clear()
        try:
            train(load_config(sys.argv[6], ov), progress=False, hooks=stop_at(stop))
        except Kill:
            pass
        res[name] = list(seen)
    with open(f"{out}.{pid}.json", "w") as f:
        json.dump(res, f)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives")
def test_each_process_reads_its_own_rows(tmp_path):
    """Two processes read only their halves of each global batch (through the shards' row index, never the whole
    set) on a 2x2x2 mesh; restarted as one process on a 4x1x2 mesh, then on one device, the run continues at the
    same data position each time: every step's rows equal the single-process run's, none lost or repeated, and so
    do the losses (parameters and optimizer state restored onto each new mesh)."""
    from medusa_jax.train.rows import build_index

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for s in range(4):
        lines = []
        for i in range(10):
            start, n = int(rng.integers(1, 100)), int(rng.integers(12, 30))
            ids = [1 + (start + 3 * j) % 120 for j in range(n)]
            lines.append(json.dumps({"id": s * 10 + i, "input_ids": ids, "loss_mask": [0] * 4 + [1] * (n - 4)}))
        (data / f"shard_{s:05d}.jsonl").write_text("\n".join(lines) + "\n")
        build_index(str(data / f"shard_{s:05d}.jsonl"))  # as distill does beside each shard
    common = ["train.steps=6", "train.save_every=2", "data.kind=distill", f"data.path={data}", "data.dev_path=",
              "train.heads_warmup_steps=0", "run_dir=moved"]  # fmt: skip
    mesh = lambda d, f, t: [f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"]  # noqa: E731
    r0, r1 = _run(tmp_path, 2, 4, {"two": [common + mesh(2, 2, 2), 2]}, worker=DATA_WORKER)
    runs = {"ref": [common + mesh(2, 2, 2) + ["run_dir=ref"], 0], "mesh412": [common + mesh(4, 1, 2), 4],
            "one_device": [common + mesh(1, 1, 1), 0]}  # fmt: skip
    (one,) = _run(tmp_path, 1, 8, runs, worker=DATA_WORKER)
    ref = one["ref"]
    assert len(ref) == 6 and all(len(b) == 8 for b in ref)
    for step in range(2):  # each process: its 4 rows of the step's 8, disjoint, together the single-process batch
        a, b = r0["two"][step], r1["two"][step]
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert sorted(a + b) == sorted(ref[step])
    assert one["mesh412"] == ref[2:4] and one["one_device"] == ref[4:]  # the same rows after each restart
    assert sum(map(len, r0["two"])) == 8 < 40  # no process read the whole set (40 rows)
    losses = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    np.testing.assert_allclose(losses("moved"), losses("ref"), rtol=2e-4, atol=2e-5)
