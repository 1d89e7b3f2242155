"""Training: config errors, resume after a kill equals an uninterrupted run, export + run-dir loading, LoRA,
sharding rules, resumable self-distillation. All on the tiny random Llama (configs/tiny.yaml), in process."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from medusa_jax import sharding as sh
from medusa_jax.train import lora as lora_lib
from medusa_jax.train import trainer
from medusa_jax.train.backbone import TINY
from medusa_jax.train.config import ConfigError, load_config
from medusa_jax.train.trainer import Hooks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny.yaml")


def _cfg(run_dir, *over):
    return load_config(TINY_YAML, [f"run_dir={run_dir}", "data.synthetic_dev_rows=8", *over])


class SimulatedKill(SystemExit):
    pass


def _crash_at(n):
    """Hooks that stop the run abruptly after step n (a simulated kill)."""

    def after(done):
        if done == n:
            raise SimulatedKill(3)

    return Hooks(after_step=after)


def _sigint_at(n):
    """Hooks that send the process a real SIGINT (Ctrl-C) after step n."""
    import signal

    return Hooks(after_step=lambda done: os.kill(os.getpid(), signal.SIGINT) if done == n else None)


def _nan_at(*steps):
    """Hooks that make the loss of these (1-based) steps NaN, through NaN frozen embeddings for that step."""

    def frozen_for_step(step, frozen):
        if step + 1 not in steps:
            return frozen
        bb = frozen["backbone"]
        return {**frozen, "backbone": {**bb, "embed": jax.tree.map(lambda a: a * np.nan, bb["embed"])}}

    return Hooks(frozen_for_step=frozen_for_step)


def _with_hooks(monkeypatch, hooks):
    """Make train.py's runs use these hooks."""
    import functools

    monkeypatch.setattr(trainer, "train", functools.partial(train, hooks=hooks))


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_config_errors(capsys):
    import train as train_cli

    for bad, word in [("train.stepz=3", "train.stepz"), ("train.steps=abc", "train.steps"),
                      ("mesh.data=0", "mesh.data"), ("train.mode=medusa3", "train.mode")]:  # fmt: skip
        assert train_cli.main(["--config", TINY_YAML, bad]) == 2
        err = capsys.readouterr().err.strip()
        assert word in err and len(err.splitlines()) == 1, err


def test_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch):
    full = train(_cfg(tmp_path / "full"), progress=False)
    with pytest.raises(SimulatedKill):  # killed after step 6; the last checkpoint is step 4
        train(_cfg(tmp_path / "killed"), progress=False, hooks=_crash_at(6))
    resumed = train(_cfg(tmp_path / "killed"), progress=False)
    assert len(resumed.losses) == 4  # steps 5..8 again
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert [s for s, _ in b] == list(range(1, 9))
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(full.trainable), jax.tree.leaves(resumed.trainable)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert full.eval is not None and len(full.eval["top1"]) == 3
    assert full.eval["kl"] > 1e-6 and 0 < full.eval["agree"] <= 1  # Medusa-2 (LoRA): drift from the original
    with pytest.raises(ConfigError, match="lora.rank"):
        train(_cfg(tmp_path / "full", "lora.rank=2"), progress=False)

    # Ctrl-C after step 5 (a real SIGINT): a checkpoint of step 5 is written, exit 130, and the rerun continues
    import train as train_cli

    cli = ["--config", TINY_YAML, "--no-progress", f"run_dir={tmp_path / 'ctrl_c'}", "data.synthetic_dev_rows=8"]
    _with_hooks(monkeypatch, _sigint_at(5))
    assert train_cli.main(cli) == 130
    assert sorted(os.listdir(tmp_path / "ctrl_c" / "checkpoints")) == ["4", "5"]
    monkeypatch.undo()
    assert train_cli.main(cli) == 0
    c = _losses(tmp_path / "ctrl_c")
    assert [s for s, _ in c] == list(range(1, 9))
    np.testing.assert_allclose([x for _, x in a], [x for _, x in c], rtol=1e-6)

    # a corrupt latest checkpoint: one line naming it and what to do
    for root, _, files in os.walk(tmp_path / "ctrl_c" / "checkpoints" / "8" / "trainable"):
        for f in files:
            if not f.startswith("_"):
                open(os.path.join(root, f), "wb").close()
    assert train_cli.main([*cli, "train.steps=8"]) == 2


def test_nan_steps_are_skipped_then_bounded(tmp_path, monkeypatch, capsys):
    import train as train_cli

    r = train(_cfg(tmp_path / "nan"), progress=False, hooks=_nan_at(3, 5))
    with open(tmp_path / "nan" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert [x["loss"] is None for x in recs] == [s in (3, 5) for s in range(1, 9)]
    assert recs[-1]["skipped_steps"] == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(r.trainable))
    capsys.readouterr()
    cli = ["--config", TINY_YAML, "--no-progress", f"run_dir={tmp_path / 'bound'}", "train.max_bad_steps=1"]
    _with_hooks(monkeypatch, _nan_at(3, 5))
    assert train_cli.main(cli) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.max_bad_steps=1" in err and "step 5" in err, err
    assert os.listdir(tmp_path / "bound" / "checkpoints") == ["4"]  # the last good checkpoint is kept


def test_bad_training_data(tmp_path):
    from medusa_jax.train import data as data_lib

    d = tmp_path / "data"
    d.mkdir()
    rows = [
        {"id": i, "input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1] if i % 2 else [0, 0, 0, 0]} for i in range(6)
    ]
    (d / "shard_00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path / "run", "data.kind=distill", f"data.path={d}", "data.dev_path=")
    assert [r["id"] for r in data_lib.load_data_rows(cfg, 128)] == [1, 3, 5]  # empty answers are skipped
    (d / "shard_00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))
    with pytest.raises(ValueError, match="all 3 rows have empty answers"):
        data_lib.load_data_rows(cfg, 128)
    (d / "shard_00001.jsonl").write_text('{"id": 9, "input_ids": [1, 2')  # truncated shard
    with pytest.raises(ValueError, match="shard_00001.jsonl:1: not a distilled row"):
        data_lib.load_data_rows(cfg, 128)


def test_hidden_state_cache_per_part_and_block(tmp_path, monkeypatch):
    """Frozen-backbone hidden states are cached per data directory in blocks: adding a directory (or a killed
    precompute's rerun) computes only the missing blocks, and cached blocks give what a fresh computation gives."""
    from medusa_jax.model import init_params
    from medusa_jax.train import data as data_lib
    from medusa_jax.train import hidden as tr

    dirs = []
    for p in range(2):
        d = tmp_path / f"data{p}"
        d.mkdir()
        rows = [
            {"id": i, "input_ids": list(range(3 + p, 9 + i + p)), "loss_mask": [0, 0] + [1] * (4 + i)} for i in range(5)
        ]
        (d / "shard_00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(str(d))
    cfg = _cfg(tmp_path / "run", "data.kind=distill", f"data.path={dirs[0]}", "data.dev_path=", "data.max_len=16")
    parts_a = data_lib.load_data_parts(cfg, 128)
    cfg_ab = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=",".join(dirs)))
    parts_ab = data_lib.load_data_parts(cfg_ab, 128)
    assert [len(p) for p in parts_a] == [5] and [len(p) for p in parts_ab] == [5, 5]
    cut = dataclasses.replace(cfg_ab, data=dataclasses.replace(cfg_ab.data, num_rows=7))
    assert [len(p) for p in data_lib.load_data_parts(cut, 128)] == [5, 2]

    calls = []
    real = tr.precompute_flat
    monkeypatch.setattr(tr, "precompute_flat", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    mesh = sh.make_mesh(1, 1, 1)
    params = init_params(TINY, seed=0)
    hidden = lambda parts: tr.cached_hidden(str(tmp_path / "cache"), TINY, params, 3, mesh, 16, "train", parts, block_rows=2)  # fmt: skip
    a = hidden(parts_a)
    assert calls == [2, 2, 1]
    ab = hidden(parts_ab)
    assert calls == [2, 2, 1, 2, 2, 1]  # only the new directory's blocks
    for x, y in zip(ab, tr.precompute_flat(TINY, params, *data_lib.pack(parts_ab[1], 16), 3, mesh)):
        assert len(x) == len(a[0]) + len(y)
    os.remove(sorted((tmp_path / "cache").glob("train-*.npz"))[0])  # a lost block is recomputed alone
    again = hidden(parts_ab)
    assert calls[6] == 5 and calls[7:] in ([2], [1])
    for x, y in zip(ab, again):
        np.testing.assert_allclose(np.sort(x, axis=0), np.sort(y, axis=0), rtol=1e-6)


def test_hidden_state_cache_follows_the_head_count(tmp_path):
    """Which positions get hidden states depends on the head count (a prompt-end position is kept when one of the
    heads has an answer target): a cache written for 3 heads is not reused for 5, whose rows must line up with their
    targets."""
    from medusa_jax.model import init_params
    from medusa_jax.train import data as data_lib
    from medusa_jax.train import hidden as tr

    rows = [{"id": i, "input_ids": list(range(3, 15 + i)), "loss_mask": [0] * 7 + [1] * (5 + i)} for i in range(3)]
    mesh = sh.make_mesh(1, 1, 1)
    params = init_params(TINY, seed=0)
    cache = str(tmp_path / "cache")
    for k in (3, 5, 3):
        got = tr.cached_hidden(cache, TINY, params, k, mesh, 24, "train", [rows])
        fresh = tr.precompute_flat(TINY, params, *data_lib.pack(rows, 24), k, mesh)
        assert {len(x) for x in got} == {len(fresh[0])}
        np.testing.assert_allclose(got[0], fresh[0], rtol=1e-5, atol=1e-6)


def test_medusa1_export_and_run_dir(tmp_path):
    from medusa_jax.heads_io import read_heads
    from medusa_jax.train.run_dir import is_run_dir, load_run

    run = tmp_path / "m1"
    r = train(_cfg(run, "train.mode=medusa1", "train.steps=4", "train.save_every=2"), progress=False)
    assert r.losses[-1] < r.losses[0]
    assert os.path.exists(run / "export" / "medusa_lm_head.safetensors")
    assert is_run_dir(str(run)) and is_run_dir(str(run / "checkpoints" / "2")) and not is_run_dir(str(tmp_path))
    heads, meta = read_heads(str(run / "export"))
    model = load_run(str(run))
    np.testing.assert_allclose(heads["blocks"]["kernel"], np.asarray(model.heads["blocks"]["kernel"]), atol=1e-6)
    assert model.forward([[1, 2, 3, 4]]).medusa_logits.shape == (3, 1, 4, TINY.vocab_size)
    early = load_run(str(run / "checkpoints" / "2"))
    assert not np.allclose(np.asarray(early.heads["blocks"]["kernel"]), np.asarray(model.heads["blocks"]["kernel"]))


@pytest.mark.parametrize("kind", ["root_token", "sequential"])
@pytest.mark.parametrize("mode", ["medusa1", "medusa2"])
def test_root_token_heads_train_from_plain_heads(tmp_path, mode, kind):
    """heads.root_token=true (or heads.sequential=true) starting from plain exported heads (U, P = 0: the same
    outputs at step 0) trains U (and P, fed the answer's own tokens) on both paths (precomputed hidden states, and
    the backbone forward of Medusa-2) and exports root_token (sequential) heads; with soft labels
    (train.distill_weight), whose batches carry the teacher positions' hidden states."""
    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.heads_io import read_heads, save_heads
    from medusa_jax.model import init_params
    from medusa_jax.train.run_dir import load_run

    plain = tmp_path / "plain"
    save_heads(init_heads(HeadsConfig(3, 1, False), init_params(TINY), seed=1, scale=0.1), str(plain))
    run = tmp_path / "root"
    r = train(_cfg(run, f"train.mode={mode}", "train.steps=3", f"heads.{kind}=true", f"heads.init={plain}",
                   "train.distill_weight=0.5"), progress=False)  # fmt: skip
    assert np.isfinite(r.losses).all()
    heads, meta = read_heads(str(run / "export"))
    assert meta["root_token"] and np.abs(heads["root"]["kernel"]).max() > 0
    assert meta["sequential"] == (kind == "sequential")
    if kind == "sequential":  # head 0 has no path; heads 1, 2 learned theirs
        assert np.abs(heads["path"]["kernel"][1:]).max() > 0
    model = load_run(str(run))
    assert model.heads_config.root_token and model.heads_config.sequential == (kind == "sequential")
    out = model.generate([[1, 2, 3, 4]], max_new_tokens=6, mode="medusa", tree=[[0], [1], [0, 0]])
    assert out[0].output_ids == model.generate([[1, 2, 3, 4]], max_new_tokens=6, mode="ar")[0].output_ids


def test_deeper_heads_start_from_shallower_ones():
    """heads.num_layers above the init heads' ResBlocks: the added blocks are identities (same logits at step 0),
    the kept ones unchanged; fewer layers than the init heads is a one-line error."""
    import jax.numpy as jnp

    from medusa_jax.heads import HeadsConfig, heads_logits, init_heads
    from medusa_jax.model import init_params
    from medusa_jax.train.backbone import deepen

    params = init_params(TINY, seed=1)
    heads = init_heads(HeadsConfig(3, 1, False, True, True), params, seed=2, scale=0.2)
    deep = deepen(heads, 3)
    assert deep["blocks"]["kernel"].shape[:2] == (3, 3)
    np.testing.assert_array_equal(deep["blocks"]["kernel"][:, :1], heads["blocks"]["kernel"])
    rng = np.random.default_rng(0)
    h, r = (jnp.asarray(rng.normal(size=(5, TINY.hidden_size)), jnp.float32) for _ in range(2))
    path = jnp.asarray(rng.normal(size=(5, 2, TINY.hidden_size)), jnp.float32)
    lm = params["embed"]["embedding"].T
    np.testing.assert_allclose(heads_logits(deep, h, lm, root_emb=r, path_emb=path),
                               heads_logits(heads, h, lm, root_emb=r, path_emb=path), rtol=1e-6, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="heads.num_layers=3"):
        deepen(deep, 2)


def test_soft_labels_same_on_both_training_paths():
    """train.distill_weight: the loss on cached hidden states (teacher = the hidden state k+1 positions later in the
    flat arrays) equals the loss on whole sequences (teacher = the shifted base logits), and differs from hard CE."""
    import jax.numpy as jnp

    from medusa_jax.heads import HeadsConfig, base_lm_head, init_heads
    from medusa_jax.model import init_params
    from medusa_jax.train import data as data_lib
    from medusa_jax.train import hidden as tr
    from medusa_jax.train.losses import make_loss

    params = init_params(TINY, seed=1)
    rows = data_lib.synthetic_rows(6, 20, TINY.vocab_size, seed=3)
    for i, r in enumerate(rows):  # answers of different lengths and starts
        r["input_ids"], r["loss_mask"] = (
            r["input_ids"][: 12 + i],
            [0] * (4 + i % 3) + r["loss_mask"][4 + i % 3 : 12 + i],
        )
    ids, mask = data_lib.pack(rows, 24)
    mesh = sh.make_mesh(1, 1, 1)
    hid, tgt, w, roots, teach = tr.precompute_flat(TINY, params, ids, mask, 3, mesh)
    assert 0.7 < teach[w > 0].mean() < 1.0  # all but each row's last answer token
    heads = {"heads": init_heads(HeadsConfig(3, 1, True, True), params, seed=0, scale=0.3)}
    losses = {}
    for soft in (0.0, 0.5):
        base = _cfg("unused", "train.mode=medusa1", f"train.distill_weight={soft}", "heads.num_heads=3",
                    "heads.shared_lm_head=true", "heads.root_token=true")  # fmt: skip
        nxt = tr.teacher_index(np.arange(len(hid)), 3, len(hid))
        frozen = {"lm_head": {"kernel": base_lm_head(params)}, "embed": params["embed"]}
        batch = {
            "hidden": hid,
            "targets": tgt,
            "weights": w,
            "roots": roots,
            "teacher_hidden": hid[nxt],
            "teach": teach,
        }
        flat = make_loss(base, TINY, True)(heads, frozen, batch, jnp.int32(0))[0]
        seq = make_loss(base, TINY, False)(heads, {"backbone": params}, {"input_ids": ids, "loss_mask": mask},
                                              jnp.int32(0))[0]  # fmt: skip
        np.testing.assert_allclose(float(flat), float(seq), rtol=2e-5)
        losses[soft] = float(flat)
    assert abs(losses[0.5] - losses[0.0]) > 1e-3


def test_hidden_noise_perturbs_the_heads_input_by_its_scale():
    """train.hidden_noise: noise of that fraction of each state's RMS, the same for the same seed and step (resumes),
    new each step; 0 leaves the hidden states alone; the training loss sees it on the whole-sequence path too."""
    import jax.numpy as jnp

    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.model import init_params
    from medusa_jax.train.losses import make_loss, noisy

    h = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)) * 3.0, jnp.float32)
    assert noisy(h, 0.0, 0, jnp.int32(5)) is h
    a, b, c = noisy(h, 0.2, 0, jnp.int32(5)), noisy(h, 0.2, 0, jnp.int32(5)), noisy(h, 0.2, 0, jnp.int32(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    rms = np.sqrt((np.asarray(h) ** 2).mean(-1))
    ratio = np.sqrt(((np.asarray(a) - np.asarray(h)) ** 2).mean(-1)) / rms
    assert 0.15 < np.median(ratio) < 0.25
    params = init_params(TINY, seed=1)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 16)))
    batch = {"input_ids": ids, "loss_mask": jnp.ones((2, 16), jnp.int32)}
    heads = {"heads": init_heads(HeadsConfig(3, 1, True), params, seed=0, scale=0.3)}
    loss = {
        sigma: float(make_loss(_cfg("unused", "heads.num_heads=3", "heads.shared_lm_head=true",
                                    f"train.hidden_noise={sigma}"), TINY, False)(heads, {"backbone": params}, batch,
                                                                                  jnp.int32(0))[0])
        for sigma in (0.0, 0.5)
    }  # fmt: skip
    assert abs(loss[0.5] - loss[0.0]) > 1e-4


def test_lora_merge_and_peft_roundtrip():
    from medusa_jax.model import init_params

    params = init_params(TINY)
    lo = lora_lib.init_lora(params, ("q_proj", "down_proj"), rank=2, seed=1)
    merged = lora_lib.merge(params, lo, 2, 4.0)
    np.testing.assert_array_equal(
        merged["layers"]["attn"]["q_proj"]["kernel"], params["layers"]["attn"]["q_proj"]["kernel"]
    )
    lo["attn"]["q_proj"]["lora_b"] = lo["attn"]["q_proj"]["lora_b"] + 0.1
    merged = lora_lib.merge(params, lo, 2, 4.0)
    a, b = lo["attn"]["q_proj"]["lora_a"], lo["attn"]["q_proj"]["lora_b"]
    want = params["layers"]["attn"]["q_proj"]["kernel"] + 2.0 * np.einsum("nir,nro->nio", a, b)
    np.testing.assert_allclose(merged["layers"]["attn"]["q_proj"]["kernel"], want, rtol=1e-5, atol=1e-6)
    back = lora_lib.from_peft_tensors(lora_lib.to_peft_tensors(lo))
    for x, y in zip(jax.tree.leaves(lo), jax.tree.leaves(back)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y))


def test_sharding_rules_cover_all_params():
    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.model import init_params

    params = init_params(TINY)
    tree = {"backbone": params, "heads": init_heads(HeadsConfig(3, 1, False), params),
            "lora": lora_lib.init_lora(params, lora_lib.GROUP, 2)}  # fmt: skip
    mesh = sh.make_mesh(1, 1, 1)
    shard = sh.param_shardings(tree, mesh)

    class FakeMesh:
        shape = {"data": 2, "fsdp": 2, "tensor": 4}

    for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shard), strict=True):
        assert len(s.spec) <= leaf.ndim
        spec = sh.spec_for(sh.logical_axes(sh.path_str(path), leaf.ndim), leaf.shape, FakeMesh)
        if path[-1].key in ("kernel", "embedding"):  # every matrix is split over the mesh
            assert any(a is not None for a in spec), (sh.path_str(path), spec)

    assert sh.spec_for(("layers", "embed", "mlp"), (2, 32, 64), FakeMesh) == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor"
    )
    assert sh.spec_for(("vocab", "embed"), (130, 33), FakeMesh) == jax.sharding.PartitionSpec(None, None)


class _FakeTok:
    chat_template = "fake"
    eos_token_id = 0

    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=True):
        return [1] + [3 + ord(c) % 100 for c in msgs[-1]["content"]][:12] + [2]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_distill_resumes_without_duplicates(tmp_path, monkeypatch):
    from medusa_jax import api
    from medusa_jax.model import init_params
    from medusa_jax.train import distill

    model = api.MedusaModel(TINY, init_params(TINY), _FakeTok(), name="tiny")
    monkeypatch.setattr(api, "load", lambda *a, **k: model)
    prompts = tmp_path / "train_prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"prompt number {i}" * (1 + i % 3)}) + "\n" for i in range(5))
    )
    args = ["--prompts", str(prompts), "--max-new-tokens", "6", "--batch-size", "2"]
    assert distill.main([*args, "--out", str(tmp_path / "a")]) == 0
    full = distill.load_rows(str(tmp_path / "a"))
    assert [r["id"] for r in full] == [f"p{i}" for i in range(5)]
    r = full[0]
    assert (
        len(r["input_ids"]) == len(r["loss_mask"]) and sum(r["loss_mask"]) == len(r["input_ids"]) - r["prompt_len"] > 0
    )
    # a killed run: shard 1 missing (a temp file left behind) -> the rerun writes exactly it
    os.remove(tmp_path / "a" / "shard_00001.jsonl")
    (tmp_path / "a" / "shard_00001.jsonl.tmp123").write_text("partial")
    assert distill.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert distill.load_rows(str(tmp_path / "a")) == full
    assert distill.main([*args, "--out", str(tmp_path / "a"), "--max-new-tokens", "7"]) == 2  # other settings
    dev = tmp_path / "dev_prompts.jsonl"
    dev.write_text(prompts.read_text())
    assert distill.main(["--prompts", str(dev), "--out", str(tmp_path / "d")]) == 2  # never train on dev
    # --extend: answers continued to 10 tokens equal those of a run made with 10 from the start
    assert distill.main([*args[2:], "--max-new-tokens", "4", "--extend", str(tmp_path / "a"), "--out", str(tmp_path / "e")]) == 0  # fmt: skip
    assert distill.main([*args[:2], "--max-new-tokens", "10", "--batch-size", "2", "--out", str(tmp_path / "f")]) == 0
    longer = distill.load_rows(str(tmp_path / "f"))
    assert distill.load_rows(str(tmp_path / "e")) == longer
    assert max(sum(r["loss_mask"]) for r in longer) == 10
    assert distill.main(["--extend", str(tmp_path / "a"), "--out", str(tmp_path / "a")]) == 2  # in place: refused
    # answers to the dev prompts stay evaluation data through --extend, and the trainer refuses them
    assert distill.main(["--prompts", str(dev), "--out", str(tmp_path / "d"), "--allow-dev", *args[2:]]) == 0
    assert distill.main(["--extend", str(tmp_path / "d"), "--out", str(tmp_path / "d2")]) == 2
    assert distill.main(["--extend", str(tmp_path / "d"), "--out", str(tmp_path / "d2"), "--allow-dev"]) == 0
    cfg = _cfg(tmp_path / "run", "data.kind=distill", f"data.path={tmp_path / 'a'},{tmp_path / 'd2'}", "data.dev_path=")
    with pytest.raises(ValueError, match="holds answers to dev_prompts"):
        train(cfg, progress=False)


def test_distill_samples_answers_reproducibly(tmp_path, monkeypatch):
    """--temperature: sampled answers (not the greedy ones), the same rows again when a killed run resumes, other rows
    with another seed; the settings are recorded and a restart with others, or --extend of sampled answers, refused."""
    from medusa_jax import api
    from medusa_jax.model import init_params
    from medusa_jax.train import distill

    model = api.MedusaModel(TINY, init_params(TINY), _FakeTok(), name="tiny")
    monkeypatch.setattr(api, "load", lambda *a, **k: model)
    prompts = tmp_path / "train_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(4)))
    args = ["--prompts", str(prompts), "--max-new-tokens", "8", "--batch-size", "2"]
    sampled = [*args, "--temperature", "1.0", "--seed", "3"]
    answers = lambda d: [r["input_ids"][r["prompt_len"] :] for r in distill.load_rows(str(tmp_path / d))]  # noqa: E731
    assert distill.main([*args, "--out", str(tmp_path / "greedy")]) == 0
    assert distill.main([*sampled, "--out", str(tmp_path / "s")]) == 0
    first = answers("s")
    assert len(first) == 4 and first != answers("greedy")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert (meta["greedy"], meta["temperature"], meta["seed"]) == (False, 1.0, 3)
    os.remove(tmp_path / "s" / "shard_00001.jsonl")  # a killed run resumes with the same draws
    assert distill.main([*sampled, "--out", str(tmp_path / "s")]) == 0
    assert answers("s") == first
    assert distill.main([*args, "--temperature", "1.0", "--seed", "4", "--out", str(tmp_path / "s4")]) == 0
    assert answers("s4") != first
    assert distill.main([*args, "--temperature", "0.5", "--seed", "3", "--out", str(tmp_path / "s")]) == 2
    assert distill.main(["--extend", str(tmp_path / "s"), "--out", str(tmp_path / "e")]) == 2
    assert distill.main(["--extend", str(tmp_path / "greedy"), "--out", str(tmp_path / "e"), "--temperature", "1"]) == 2
    assert distill.main([*args, "--temperature", "-1", "--out", str(tmp_path / "neg")]) == 2


def test_device_train_quick(tmp_path):
    """tools/device_train.py end to end with --quick on the tiny model: distilled data, a Medusa-2 run whose export
    holds heads and the LoRA adapter, and metrics.json with throughput, dev figures and tokens/step."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import device_train

    for name, n in (("train_prompts.jsonl", 8), ("dev_prompts.jsonl", 4)):
        (tmp_path / name).write_text("".join(json.dumps({"id": f"{name[:3]}{i}", "prompt": f"question {i} " * (1 + i % 3)}) + "\n" for i in range(n)))  # fmt: skip
    out = tmp_path / "out"
    argv = ["--out", str(out), "--quick", "--ckpt", "tiny", "--prompts", str(tmp_path / "train_prompts.jsonl"),
            "--dev", str(tmp_path / "dev_prompts.jsonl"), "--steps", "4"]  # fmt: skip
    assert device_train.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["distill"]["answer_tokens"] == 8 * 24 and m["distill"]["tokens_per_s"] > 0
    assert m["train"]["steps_per_s"] > 0 and 0 < m["train"]["dev"]["agree"] <= 1 and m["train"]["dev"]["kl"] >= 0
    assert m["eval"]["tokens_per_step"] >= 1.0
    assert {"medusa_lm_head.safetensors", "adapter_model.safetensors", "adapter_config.json"} <= set(
        os.listdir(out / "run" / "export")
    )
    assert device_train.main(["--out", str(out), "--prompts", str(tmp_path / "missing.jsonl")]) == 2
    # --drafter feature: greedy and sampled answers, a feature drafter on the frozen backbone, its export
    fd_out = tmp_path / "fd"
    argv = [*argv[:1], str(fd_out), *argv[2:], "--drafter", "feature"]
    assert device_train.main(argv) == 0
    m = json.loads((fd_out / "metrics.json").read_text())
    assert (fd_out / "data_t07").is_dir() and len(m["train"]["dev"]["top1"]) == 5 and m["eval"]["tokens_per_step"] >= 1
    config = json.loads((fd_out / "run" / "export" / "config.json").read_text())
    assert (
        config["medusa_drafter"] == "feature" and not (fd_out / "run" / "export" / "adapter_model.safetensors").exists()
    )


def test_hard_kills_resume_exactly(tmp_path):
    """SIGKILL at a seeded random moment of training (checkpoints every step) and of self-distillation, then a rerun
    to the end: the same losses / rows as an uninterrupted run (tools/kill_trials.py runs more trials)."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import kill_trials

    for what in ("train", "distill"):
        s = kill_trials.trials(what, 1, seed=1, work=str(tmp_path), log=lambda *_: None)
        assert s["failures"] == 0 and s["units"] > 0, s


def test_metrics_line_cut_by_a_kill_is_dropped(tmp_path):
    from medusa_jax.train.checkpoints import trim_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    trim_metrics(str(path), 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    trim_metrics(str(path), 1)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'


def test_hidden_cache_key_covers_masks_and_backbone():
    """The cache key of a block of hidden states changes with its loss masks (same tokens) and with the backbone."""
    from medusa_jax.model import init_params
    from medusa_jax.train.hidden import backbone_fingerprint, data_fingerprint

    ids = np.arange(24, dtype=np.int32).reshape(2, 12)
    mask = np.zeros_like(ids)
    mask[:, 6:] = 1
    moved = np.roll(mask, 1, axis=1)
    assert data_fingerprint(ids, mask) == data_fingerprint(ids.copy(), mask.copy())
    assert data_fingerprint(ids, mask) != data_fingerprint(ids, moved)  # the old key (shape + token sum) was equal
    params = init_params(TINY, seed=0)
    other = jax.tree.map(lambda a: a, params)
    other["layers"]["attn"]["q_proj"]["kernel"] = params["layers"]["attn"]["q_proj"]["kernel"].at[0, 0, 0].add(1.0)
    assert backbone_fingerprint(TINY, params) == backbone_fingerprint(TINY, init_params(TINY, seed=0))
    assert backbone_fingerprint(TINY, params) != backbone_fingerprint(TINY, other)
