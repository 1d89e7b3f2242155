"""The device report runs on the CPU (`--quick`, a tiny random model): every section, its JSON and markdown table,
a non-zero exit with the traceback when a section fails, and timings that compile nothing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", REPO / "tools" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_section_quick(device_check, tmp_path, monkeypatch, capsys):
    """All five sections, the shipped prompts file: exit 0, a row per target, no errors. The tree + lookup config is
    the tiny model's default plan here (cpu_16 + lookup 10, no calibration), so the speed section times it once."""
    monkeypatch.setattr(device_check, "tree_kw", lambda quick: {"tree": "cpu_16", "lookup": 10})
    out = tmp_path / "out"
    argv = ["--ckpt", "tiny", "--quick", "--out", str(out), "--parity-prompts", "2", "--calibrate-budget", "600",
            "--parity-modes", "f32,bf16act"]  # fmt: skip
    assert device_check.main(argv) == 0, capsys.readouterr().err
    rep = json.loads((out / "device_check.json").read_text())
    assert rep["errors"] == {} and set(rep["section_s"]) == set(device_check.SECTIONS)
    assert rep["prompts"] == str(REPO / "tools" / "data" / "device_prompts.jsonl")
    targets = [r["target"] for r in rep["rows"]]
    assert not [t for t in targets if t.startswith("section ")], targets
    for want in ("parity float32 (full precision), batch 8", "default Medusa vs AR, batch 1", "step cost cpu_16 + lookup 10 / AR",
                 "7B-shaped AR step (float32", "GPU calibration time"):  # fmt: skip
        assert any(t.startswith(want) for t in targets), (want, targets)
    for b in ("b1", "b8"):  # the default plan is the tree + lookup config: one timed config, not two
        assert rep["speed"][b]["default_is_tree_lookup"] and set(rep["speed"][b]["medians"]) == {"ar", "default"}
    rows = {r["target"]: r for r in rep["rows"]}
    assert rows["parity float32 (full precision), batch 8 (12 tokens)"]["status"] == "PASS"
    assert rows["parity bfloat16 activations too, batch 1 (12 tokens)"]["status"] == "INFO"  # no goal for bf16act
    assert rep["step_ms"]["slots"] >= 64
    cal = json.loads((out / rep["calibration"]["file"]).read_text())
    assert cal["skipped"] == {} and set(cal["by_batch"]["8"]["step_ms_lookup"]) == {"0", "2"}


def test_failing_section_fails_the_run(device_check, tmp_path, monkeypatch, capsys):
    def broken(args, rep):
        raise RuntimeError("the step loop broke\nsecond line")

    monkeypatch.setattr(device_check, "steps_section", broken)
    out = tmp_path / "out"
    assert (
        device_check.main(["--ckpt", "tiny", "--quick", "--out", str(out), "--skip", "parity,speed,big,calibrate"]) == 1
    )
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err and "second line" in err, err
    assert "FAILED sections: steps" in err
    rep = json.loads((out / "device_check.json").read_text())
    assert "in broken" in rep["errors"]["steps"] and "second line" in rep["errors"]["steps"]
    (row,) = rep["rows"]
    assert row["status"] == "FAIL" and row["target"] == "section steps"


def test_steps_time_a_tree_with_other_heads(device_check, tmp_path, capsys):
    """`--trees HEADS:TREE` times that tree (static or dynamic) with another head set (here a feature drafter) on the
    same backbone, in the same step-cost comparison; a head set that does not exist is one line and exit 2."""
    from medusa_jax.feature_drafter import init_feature_drafter
    from medusa_jax.heads_io import save_heads

    model = device_check.tiny_model("float32")
    save_heads(init_feature_drafter(model.params, scale=0.02), str(tmp_path / "fd"))
    out = tmp_path / "out"
    argv = ["--ckpt", "tiny", "--quick", "--out", str(out), "--skip", "parity,speed,big,calibrate",
            "--trees", f"cpu_4,{tmp_path / 'fd'}:cpu_8,{tmp_path / 'fd'}:dynamic_8_d2_k4"]  # fmt: skip
    assert device_check.main(argv) == 0, capsys.readouterr().err
    rep = json.loads((out / "device_check.json").read_text())
    trees = rep["step_ms"]["b1"]["trees"]
    fd = tmp_path / "fd"
    assert set(trees) == {"cpu_8", "cpu_4", f"{fd}:cpu_8", f"{fd}:dynamic_8_d2_k4"} and all(
        v > 0 for v in trees.values()
    )
    with pytest.raises(SystemExit) as e:
        device_check.main(["--ckpt", "tiny", "--quick", "--out", str(out), "--trees", "nope_heads:cpu_8"])
    assert e.value.code == 2 and "no head set 'nope_heads'" in capsys.readouterr().err


def test_calibration_sized_to_its_budget(device_check, tmp_path):
    """A budget too small for any tree: AR alone is measured at each batch size, every tree size is left out."""
    from medusa_jax import calibrate

    model = device_check.tiny_model("float32")
    enc = device_check.encode_all(model, ["a prompt", "another prompt, longer"])
    cal = calibrate.calibrate(model, enc, batch_sizes=(1, 2), sizes=(1, 2, 4), max_new_tokens=8, lookup=2,
                              log=lambda s: None, budget_s=0.0)  # fmt: skip
    assert cal["skipped"] == {b: [[n, c] for n in (1, 4, 2) for c in (0, 2)] for b in ("1", "2")}
    assert all(v["step_ms"] == {"0": v["step_ms"]["0"]} and v["tree"] == [] for v in cal["by_batch"].values())


def test_warmup_compiles_every_prompt_length_bucket(device_check):
    """The timed repeats of `run_ours_interleaved` compile nothing: the warm-up ran every prompt-length bucket."""
    import jax

    from medusa_jax import bench

    model = device_check.tiny_model("float32")
    prompts = [[5] * 4, [6] * 40, [7] * 100]  # three prompt-length buckets, one prompt per batch
    compiles, calls = [], []

    def listen(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listen)
    real = model.generate

    def spy(ps, **kw):
        calls.append((len(ps), len(compiles)))
        return real(ps, **kw)

    model.generate = spy
    try:
        bench.run_ours_interleaved(model, prompts, {"ar": ("ar", {}), "md": ("medusa", {"tree": "chain_2"})}, 4, 1, 1)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    timed = [n for size, n in calls if size == len(prompts)]
    assert len(timed) == 2 and len(compiles) == timed[0], (calls, len(compiles))


def test_bad_prompt_file_is_a_one_line_error(device_check, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert device_check.main(["--ckpt", "tiny", "--prompts", str(bad), "--out", str(tmp_path)]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err


def test_steps_times_more_trees(device_check, tmp_path, capsys):
    """`--trees` adds informational step-cost rows (a shipped name and a JSON file) beside the default tree's, and
    `--feature` one for a feature drafter on the default tree; an unknown tree is refused before anything runs
    (exit 2, one line naming it)."""
    tree_file = tmp_path / "wide.json"
    tree_file.write_text(json.dumps([[0], [1], [0, 0], [0, 1], [1, 0]]))
    out = tmp_path / "out"
    argv = ["--ckpt", "tiny", "--quick", "--out", str(out), "--skip", "parity,speed,big,calibrate"]
    assert device_check.main([*argv, "--trees", f"chain_3,{tree_file}", "--feature"]) == 0, capsys.readouterr().err
    rep = json.loads((out / "device_check.json").read_text())
    status = {}
    for r in rep["rows"]:
        status.setdefault(r["target"].split(" / AR")[0], set()).add(r["status"])
    assert status.keys() == {"step cost cpu_8 + lookup 4", "step cost chain_3 + lookup 4",
                             f"step cost {tree_file} + lookup 4", "step cost feature drafter, cpu_8 + lookup 4"}  # fmt: skip
    assert status["step cost chain_3 + lookup 4"] == status[f"step cost {tree_file} + lookup 4"] == {"INFO"}
    assert status["step cost feature drafter, cpu_8 + lookup 4"] == {"INFO"}
    assert "INFO" not in status["step cost cpu_8 + lookup 4"]  # the default tree keeps its goal
    assert set(rep["step_ms"]["b8"]["trees"]) == {"cpu_8", "chain_3", str(tree_file), "feature drafter, cpu_8"}
    with pytest.raises(SystemExit) as e:
        device_check.main([*argv, "--trees", "no_such_tree"])
    assert e.value.code == 2 and "--trees: unknown tree 'no_such_tree'" in capsys.readouterr().err
