"""The device report runs on the CPU (`--quick`, a tiny random model) and writes its JSON and markdown table."""

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


def test_quick_parity_report(device_check, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt number {i} " * (i + 1)}) + "\n" for i in range(6)))
    out = tmp_path / "out"
    argv = ["--ckpt", "tiny", "--quick", "--prompts", str(prompts), "--out", str(out),
            "--skip", "speed,steps,big,calibrate", "--parity-prompts", "3", "--parity-modes", "f32,bf16act"]  # fmt: skip
    assert device_check.main(argv) == 0
    rep = json.loads((out / "device_check.json").read_text())
    rows = {r["target"]: r for r in rep["rows"]}
    assert len(rows) == 4, rows
    assert [r["status"] for r in rows.values()] == ["PASS", "PASS", "INFO", "INFO"], rows  # no goal for bf16act
    assert rows["parity bfloat16 activations too, batch 1 (12 tokens)"]["goal"] == "informational"
    assert rep["parity"]["float32 (full precision) b8"]["rows"] == 3
    table = (out / "device_check.md").read_text()
    assert "| parity float32 (full precision), batch 8 (12 tokens) | >= 3/3 | 3/3 equal | PASS |" in table


def test_bad_prompt_file_is_a_one_line_error(device_check, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert device_check.main(["--ckpt", "tiny", "--prompts", str(bad), "--out", str(tmp_path)]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err
