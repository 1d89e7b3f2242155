"""decode.py as a subprocess, on a tiny random Llama (hidden 32, one layer) with the SmolLM2 tokenizer: prompt files,
--output, --raw, and bad input (exit 2, one line on stderr, no traceback)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from decode import DEFAULT_PROMPT

REPO = Path(__file__).resolve().parents[1]
MAX_POS = 160  # the tiny model's context: small, so "does not fit" is easy to reach
SUMMARY = re.compile(
    r"^(\d+) prompts, (\d+) new tokens in [\d.]+ s \(\+ [\d.]+ s compiling\): [\d.]+ tokens/s, [\d.]+ tokens/step "
    r"\((ar|medusa)\)$",
    re.M,
)
NO_TORCH = """# as if torch were not installed: no module spec for `torch`, so `import torch` fails
import sys


class WithoutTorch:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [WithoutTorch(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
"""


def run(
    *args: str, timeout: int = 300, input: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(
        [sys.executable, str(REPO / "decode.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input if input is not None else "",
    )


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from medusa_jax.checkpoint import default_gguf
    from medusa_jax.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tok = load_tokenizer(default_gguf())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tok),
        max_position_embeddings=MAX_POS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    import medusa_jax

    return medusa_jax.load(tiny_ckpt)


@pytest.fixture(scope="module")
def hf_tiny(tiny_ckpt):
    """The tiny checkpoint in HF transformers' PyTorch Llama: the reference the CLI's output is checked against."""
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


def torch_greedy(hf, ids: list[int], max_new: int, eos) -> list[int]:
    """Plain greedy decoding with a PyTorch model, a full forward per token (no cache, no `generate`): the new
    tokens, up to and including the first EOS."""
    import torch

    seq, out = list(ids), []
    with torch.no_grad():
        while len(out) < max_new and not (out and out[-1] in eos):
            out.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(out[-1])
    return out


def write_lines(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------- good runs
def test_prompts_file_output_order(tiny_ckpt, tiny_model, hf_tiny, tmp_path):
    prompts = ["Hello there, who are you?", "Name a color.", "Count to three, slowly and carefully please."]
    pfile = write_lines(
        tmp_path / "p.jsonl",
        [{"id": 1, "prompt": prompts[0]}, "", {"id": 2, "turns": [prompts[1], "And why?"]}, {"prompt": prompts[2]}],
    )
    out = tmp_path / "out.jsonl"
    r = run(
        "--ckpt", tiny_ckpt, "--prompts-file", pfile, "--max-new-tokens", "6", "--batch-size", "2", "--output", str(out)
    )
    assert r.returncode == 0, r.stderr
    m = SUMMARY.search(r.stdout)
    assert m and m.group(1) == "3" and m.group(3) == "ar", r.stdout
    rows = read_jsonl(out)
    assert [row["prompt"] for row in rows] == prompts
    expected = tiny_model.generate(prompts, max_new_tokens=6, mode="ar")
    for row, exp, p in zip(rows, expected, prompts):
        assert set(row) == {"prompt", "output_ids", "text", "new_tokens", "steps", "batch_seconds"}
        assert row["output_ids"] == torch_greedy(hf_tiny, tiny_model.encode(p), 6, tiny_model.eos_ids)  # reference
        assert row["output_ids"] == exp.output_ids and row["text"] == exp.text
        assert row["new_tokens"] == len(row["output_ids"]) and 1 <= row["new_tokens"] <= 6
        assert row["steps"] == row["new_tokens"] and row["batch_seconds"] > 0
        assert row["text"] in r.stdout
    assert int(m.group(2)) == sum(row["new_tokens"] for row in rows)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_raw_prompts_and_num_prompts(tiny_ckpt, tiny_model, tmp_path):
    pfile = write_lines(
        tmp_path / "p.jsonl", [{"prompt": "The capital of France is"}, {"prompt": "1, 2, 3,"}, {"x": 1}]
    )
    out = tmp_path / "raw.jsonl"
    args = ["--ckpt", tiny_ckpt, "--prompts-file", pfile, "--num-prompts", "2", "--max-new-tokens", "5"]
    r = run(*args, "--raw", "--output", str(out))  # the bad third line is never read
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    prompts = ["The capital of France is", "1, 2, 3,"]
    assert [row["prompt"] for row in rows] == prompts
    raw = tiny_model.generate(prompts, max_new_tokens=5, raw=True, mode="ar")
    assert [row["output_ids"] for row in rows] == [x.output_ids for x in raw]
    assert tiny_model.encode(prompts[0], raw=True) != tiny_model.encode(prompts[0])  # --raw skips the template


@pytest.fixture(scope="module")
def tiny_heads(tiny_model, tmp_path_factory) -> str:
    import jax
    import numpy as np

    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.heads_io import save_heads

    path = str(tmp_path_factory.mktemp("heads"))
    heads = init_heads(HeadsConfig(num_heads=3, num_layers=1), tiny_model.params, seed=1, scale=0.02)
    save_heads(jax.tree.map(np.asarray, heads), path)
    return path


def test_medusa_mode_with_tree(tiny_ckpt, tiny_heads, hf_tiny, tmp_path):
    import medusa_jax

    out = tmp_path / "medusa.jsonl"
    prompts = ["hi", "Tell me more about it."]
    args = ["--ckpt", tiny_ckpt, "--heads", tiny_heads, "--tree", "chain_2", "--max-new-tokens", "12"]
    r = run(*args, "--prompt", prompts[0], "--prompt", prompts[1], "--output", str(out))
    assert r.returncode == 0, r.stderr
    m = SUMMARY.search(r.stdout)
    assert m and m.group(1) == "2" and m.group(3) == "medusa", r.stdout  # the default mode with heads
    model = medusa_jax.load(tiny_ckpt, heads=tiny_heads)
    expected = model.generate(prompts, max_new_tokens=12, mode="ar")  # greedy Medusa gives the AR text
    rows = read_jsonl(out)
    assert [row["output_ids"] for row in rows] == [e.output_ids for e in expected]
    assert [row["output_ids"] for row in rows] == [torch_greedy(hf_tiny, model.encode(p), 12, model.eos_ids)
                                                   for p in prompts]  # fmt: skip
    for row in rows:  # chain_2 takes 1 to 3 tokens a step
        n = len(row["output_ids"])
        assert -(-n // 3) <= row["steps"] <= n, row


def test_default_model_no_flags_without_torch(tmp_path, hf_smollm2):
    """No flags, and torch not importable (the README's first command on a machine without torch): the embedded
    model with its shipped Medusa heads, in the mode their calibration for this device picks at batch 1 (Medusa, or
    AR where no tree pays off), streaming the greedy answer; the startup line says which mode and why."""
    import medusa_jax
    from medusa_jax.calibrate import calibration_path

    model = medusa_jax.load(tokenizer=False)
    assert model.heads is not None
    shipped = REPO / "medusa_jax" / "head_sets" / "smollm2_medusa1"
    cal = Path(calibration_path(str(shipped), "float32"))
    # the shipped calibration's batch-1 entry, read from the file (no calibration: Medusa with the default tree)
    expected = "medusa" if not cal.exists() or json.loads(cal.read_text())["by_batch"]["1"]["tree"] else "ar"
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH)
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=dict(os.environ, PYTHONPATH=pythonpath),
                           capture_output=True, text=True)  # fmt: skip
    assert "No module named 'torch'" in probe.stderr, probe.stderr
    r = run("--max-new-tokens", "8", timeout=600, env={"PYTHONPATH": pythonpath})
    assert r.returncode == 0, r.stderr
    m = SUMMARY.search(r.stdout)
    assert m and m.group(1) == "1" and int(m.group(2)) == 8 and m.group(3) == expected, r.stdout
    from medusa_jax.tokenizer import encode_prompt

    hf_model, hf_tok = hf_smollm2  # the reference: HF transformers' model of the same GGUF, plain greedy decoding
    ref = torch_greedy(hf_model, encode_prompt(hf_tok, DEFAULT_PROMPT, raw=False), 8, model.eos_ids)
    assert len(ref) == 8 and r.stdout.startswith(f"### [1] {DEFAULT_PROMPT}\n{hf_tok.decode(ref)}"), (r.stdout, ref)
    assert "Traceback" not in r.stderr and "torch" not in r.stderr.lower(), r.stderr
    startup = [line for line in r.stderr.splitlines() if line.startswith("decode.py: loaded ")]
    assert len(startup) == 1 and "4 Medusa heads loaded" in startup[0], r.stderr
    if expected == "ar":
        assert "calibration picks plain decoding at batch 1" in startup[0], startup
    elif cal.exists():
        assert "calibration picks a " in startup[0] and "-node tree at batch 1" in startup[0], startup


# ---------------------------------------------------------------------------------------------- bad input
PROGRESS = ("decode.py: loading ", "decode.py: loaded ")


def assert_usage_error(r: subprocess.CompletedProcess, *needles: str, one_line: bool = True):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith(PROGRESS)]  # progress before the error
    if one_line:
        assert len(lines) == 1, r.stderr
    assert lines[-1].startswith("decode.py: error: "), r.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


BAD_FLAGS = {
    "negative max-new-tokens": (["--max-new-tokens", "-1"], "--max-new-tokens"),
    "top-p zero": (["--top-p", "0"], "--top-p"),
    "top-p above one": (["--top-p", "1.5"], "--top-p"),
    "negative temperature": (["--temperature", "-0.5"], "--temperature"),
    "batch size zero": (["--batch-size", "0"], "--batch-size"),
    "bad max-memory": (["--max-memory", "lots"], "--max-memory"),
    "empty prompt": (["--prompt", "  "], "empty"),
    "unknown tree": (["--tree", "no_such_tree"], "no_such_tree"),
    "missing prompts file": (["--prompts-file", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    "missing checkpoint": (["--ckpt", "/no/such/model"], "/no/such/model"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags(case):
    args, needle = BAD_FLAGS[case]
    assert_usage_error(run(*args), needle)


@pytest.mark.parametrize(
    "lines, needle",
    [
        ([{"prompt": "ok"}, "{not json", {"prompt": "ok"}], ":2: invalid JSON (Expecting property name"),
        (['{"prompt": "unterminated'], ":1: invalid JSON (Unterminated string starting at column 12)"),
        ([{"prompt": "ok"}, {"prompt": "ok"}, {"question": "?"}], ':3: the object has neither "prompt" nor "turns"'),
        ([{"turns": []}], ':1: "turns" must be'),
        ([{"prompt": ""}], ":1: empty prompt"),
        (["", "  "], "no prompts"),
    ],
    ids=["bad-json", "unterminated-string", "no-prompt-key", "empty-turns", "empty-prompt", "empty-file"],
)
def test_bad_prompts_file(tmp_path, lines, needle):
    pfile = write_lines(tmp_path / "bad.jsonl", lines)
    assert_usage_error(run("--prompts-file", pfile), needle)


def test_argparse_errors_exit_2():
    assert_usage_error(run("--dtype", "float64"), "--dtype", one_line=False)
    assert_usage_error(run("--max-new-tokens", "many"), "--max-new-tokens", one_line=False)


def test_unreadable_checkpoints(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(run("--ckpt", str(empty)), "config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": 32')
    assert_usage_error(run("--ckpt", str(broken)), "not valid JSON")


def test_corrupt_weights(tiny_ckpt, tmp_path):
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in os.listdir(tiny_ckpt):
        data = Path(tiny_ckpt, f).read_bytes()
        (bad / f).write_bytes(data[: len(data) // 2] if f.endswith(".safetensors") else data)
    assert_usage_error(run("--ckpt", str(bad)), "model.safetensors")


def test_prompt_does_not_fit(tiny_ckpt):
    assert_usage_error(run("--ckpt", tiny_ckpt, "--max-new-tokens", str(MAX_POS)), "cache positions")
    long_prompt = "word " * (2 * MAX_POS)
    assert_usage_error(
        run("--ckpt", tiny_ckpt, "--prompt", "hi", "--prompt", long_prompt, "--max-new-tokens", "4"), "prompt 2"
    )


def test_medusa_mode_needs_heads(tiny_ckpt):
    assert_usage_error(run("--ckpt", tiny_ckpt, "--mode", "medusa", "--max-new-tokens", "4"), "--heads")


def test_heads_from_another_model(tiny_ckpt, tmp_path):
    """Heads trained for a bigger model (hidden 64 against the tiny model's 32): one line naming both sizes."""
    import jax
    import numpy as np

    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.heads_io import save_heads

    other = {"embed": {"embedding": np.zeros((300, 64), np.float32)}}
    save_heads(jax.tree.map(np.asarray, init_heads(HeadsConfig(2, 1, True), other)), str(tmp_path / "h"))
    assert_usage_error(run("--ckpt", tiny_ckpt, "--heads", str(tmp_path / "h"), "--max-new-tokens", "4"), "64", "32")


def test_tree_deeper_than_heads(tiny_ckpt, tiny_heads, tmp_path):
    tree = tmp_path / "deep.json"
    tree.write_text("[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]")
    r = run("--ckpt", tiny_ckpt, "--heads", tiny_heads, "--tree", str(tree), "--max-new-tokens", "4")
    assert_usage_error(r, "is 4 tokens deep", "these heads guess only 3 ahead", "depth <= 3")
    r = run("--ckpt", tiny_ckpt, "--heads", tiny_heads, "--tree", "chain_8", "--max-new-tokens", "4")
    assert_usage_error(r, "--tree chain_8 is 8 tokens deep", "chain_N goes up to chain_3")


def test_dynamic_tree_needs_a_feature_drafter(tiny_ckpt, tiny_heads):
    r = run("--ckpt", tiny_ckpt, "--heads", tiny_heads, "--tree", "dynamic_60", "--max-new-tokens", "4")
    assert_usage_error(r, "--tree dynamic_60 is a dynamic tree, for a feature drafter", "mc_sim_7b_63")
    r = run("--ckpt", tiny_ckpt, "--heads", tiny_heads, "--tree", "dynamic_511", "--max-new-tokens", "4")
    assert_usage_error(r, "511 nodes > the 510 drafted")


def test_medusa_options_with_plain_decoding(tiny_ckpt, tiny_heads, tmp_path):
    """Medusa-only options cannot apply to plain decoding: an error against --mode ar, a warning when the heads'
    calibration picks plain decoding (here a calibration that finds no tree worth it at any batch size)."""
    import shutil

    r = run("--ckpt", tiny_ckpt, "--mode", "ar", "--tree", "chain_2", "--max-new-tokens", "4")
    assert_usage_error(r, "--tree apply to Medusa decoding, not to --mode ar")
    heads = tmp_path / "heads"
    shutil.copytree(tiny_heads, heads)
    cal = {"device": "cpu-float32", "by_batch": {"1": {"tree": [], "lookup": 0, "expected_tokens_per_s": {"0": 10.0}}}}
    from medusa_jax.calibrate import calibration_path

    Path(calibration_path(str(heads), "float32")).write_text(json.dumps(cal))
    args = ["--ckpt", tiny_ckpt, "--heads", str(heads), "--max-new-tokens", "4", "--temperature", "0.5"]
    r = run(*args, "--acceptance", "typical", "--prompt", "hi")
    assert r.returncode == 0, r.stderr
    assert "calibration picks plain decoding at batch 1" in r.stderr, r.stderr
    assert "warning: --acceptance not used: plain decoding runs" in r.stderr, r.stderr
    m = SUMMARY.search(r.stdout)
    assert m and m.group(3) == "ar", r.stdout
    import medusa_jax

    model = medusa_jax.load(tiny_ckpt, heads=str(heads))
    with pytest.warns(UserWarning, match="acceptance not used: this device's calibration picks plain decoding"):
        (res,) = model.generate("hi", max_new_tokens=2, temperature=0.5, acceptance="typical")
    assert res.steps == res.new_tokens  # plain decoding: the root-only loop, one forward and one token per step


def test_model_dir_without_tokenizer(tiny_ckpt, tmp_path, capfd):
    """A backbone without tokenizer files loads (said once on stderr) and takes token ids; text needs a tokenizer."""
    import shutil

    import medusa_jax

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in Path(tiny_ckpt).iterdir():
        if not f.name.startswith(("tokenizer", "chat_template", "special_tokens", "vocab", "merges")):
            shutil.copy(f, bare / f.name)
    capfd.readouterr()
    model = medusa_jax.load(str(bare))
    notes = [x for x in capfd.readouterr().err.splitlines() if "no tokenizer files" in x]
    assert model.tokenizer is None and len(notes) == 1, notes
    (res,) = model.generate([[1, 2, 3]], max_new_tokens=2)
    assert res.new_tokens == 2 and res.text == ""
    with pytest.raises(ValueError, match="this model has no tokenizer"):
        model.generate("hi", max_new_tokens=2)
    r = run("--ckpt", str(bare), "--max-new-tokens", "2")
    assert_usage_error(r, "has no tokenizer files: decode.py needs them to read text prompts", one_line=False)
    assert len(r.stderr.strip().splitlines()) == 3, r.stderr  # loading, the note, the error


def test_tokenizer_without_chat_template(tiny_ckpt, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_ckpt, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert_usage_error(run("--ckpt", str(plain), "--max-new-tokens", "4"), "chat template", "--raw")
    assert_usage_error(run("--ckpt", str(plain), "--chat", input="hi\n"), "chat template")


def test_stream_and_chat(tiny_ckpt, tiny_heads, tiny_model):
    """One prompt streams by default; --chat keeps the cache between turns; reset and exit work."""
    r = run("--ckpt", tiny_ckpt, "--prompt", "Name a color.", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    expected = tiny_model.generate(["Name a color."], max_new_tokens=6, mode="ar")[0]
    assert expected.text in r.stdout and SUMMARY.search(r.stdout)
    r = run("--ckpt", tiny_ckpt, "--heads", tiny_heads, "--chat", "--max-new-tokens", "5",
            input="hello\nand again\nreset\nhi\nexit\nnever read\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    stats = re.findall(
        r"\((\d+) tokens, (\d+) steps, [\d.]+ tokens/s(?:, compile [\d.]+ s)?; prefilled (\d+), reused (\d+) from",
        r.stdout,
    )
    assert len(stats) == 3 and "(conversation reset)" in r.stdout, r.stdout
    assert int(stats[0][3]) == 0 and int(stats[1][3]) > int(stats[1][2]) > 0  # turn 2 reuses turn 1's cache
    assert int(stats[2][3]) == 0  # after reset


def test_chat_flags_conflict():
    assert_usage_error(run("--chat", "--prompt", "hi"), "--chat")
    assert_usage_error(run("--acceptance", "typical", "--prompt", "hi"), "--temperature")


def test_closed_event_loop_report_is_dropped_after_failed_restore(monkeypatch):
    """orbax's thread may report "Event loop is closed" after a failed restore (printed with a traceback after the
    one-line error); exactly that report is dropped, others still reach the previous hook."""
    import sys
    import threading
    import types

    from medusa_jax.run_io import quiet_closed_event_loop

    seen, seen_t = [], []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(threading, "excepthook", seen_t.append)
    quiet_closed_event_loop()
    quiet_closed_event_loop()  # installed once
    report = lambda e: types.SimpleNamespace(
        exc_type=type(e), exc_value=e, exc_traceback=None, err_msg=None, object=None
    )  # noqa: E731
    sys.unraisablehook(report(RuntimeError("Event loop is closed")))
    sys.unraisablehook(report(RuntimeError("something else")))
    assert [str(u.exc_value) for u in seen] == ["something else"]
    threading.excepthook(report(RuntimeError("Event loop is closed")))
    threading.excepthook(report(ValueError("other")))
    assert [str(u.exc_value) for u in seen_t] == ["other"]


def test_truncated_gguf_and_corrupt_run_dir(tmp_path):
    from medusa_jax.checkpoint import default_gguf
    from medusa_jax.train.config import load_config
    from medusa_jax.train.trainer import train

    with open(default_gguf(), "rb") as f:
        head = f.read(3_000_000)
    (tmp_path / "cut.gguf").write_bytes(head)
    assert_usage_error(run("--ckpt", str(tmp_path / "cut.gguf")), "cannot read GGUF", "cut.gguf")

    run_dir = tmp_path / "run"
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [f"run_dir={run_dir}", "train.mode=medusa1",
                      "train.steps=2", "train.save_every=2", "data.synthetic_dev_rows=0"])  # fmt: skip
    train(cfg, progress=False)
    for root, _, files in os.walk(run_dir / "checkpoints" / "2" / "trainable"):
        for f in files:
            if not f.startswith("_"):
                Path(root, f).write_bytes(b"")
    assert_usage_error(run("--ckpt", str(run_dir)), "cannot read checkpoint", "truncated or corrupt")


def test_bench_runs_modes_with_tree_and_lookup(tiny_ckpt, tiny_heads, tmp_path):
    """python -m medusa_jax.bench: ar against medusa with a named tree and lookup chain, one JSON report."""
    from medusa_jax import bench

    out = tmp_path / "bench.json"
    args = ["--ckpt", tiny_ckpt, "--heads", tiny_heads, "--modes", "ar,medusa", "--tree", "chain_2", "--lookup", "3"]
    assert bench.main([*args, "--num-prompts", "2", "--batch-size", "2", "--max-new-tokens", "8", "--repeats", "1",
                       "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    modes = report["modes"]
    assert set(modes) == {"ar", "medusa"}
    # one repeat: the speedup is the ratio of the two measured rates
    want = modes["medusa"]["tokens_per_s"] / modes["ar"]["tokens_per_s"]
    assert report["speedup"]["medusa_vs_ar"] == pytest.approx(want, rel=0.02)
    assert report["modes"]["medusa"]["tokens_per_step"] >= 1.0
    assert report["peak_memory"]["host_peak_rss"] > 0


def test_decode_imports_no_jax_before_the_first_line():
    """decode.py prints its first progress line before importing JAX; its copies of library constants agree."""
    import decode
    from medusa_jax.api import shipped_heads
    from medusa_jax.lookup import DEFAULT_LOOKUP

    assert decode.DEFAULT_LOOKUP == DEFAULT_LOOKUP
    assert decode.shipped_heads("smollm2_medusa1") and not decode.shipped_heads("no_such_heads")
    assert bool(shipped_heads("smollm2_medusa2")) == decode.shipped_heads("smollm2_medusa2")
    probe = "import sys, decode; print('jax' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


def test_bad_mesh_is_one_line_and_exit_2():
    r = run("--mesh", "8")
    assert r.returncode == 2 and "--mesh" in r.stderr and "DATAxMODEL" in r.stderr and "Traceback" not in r.stderr
    r = run("--mesh", "1x64", "--max-new-tokens", "4")
    assert r.returncode == 2 and "needs 64 devices" in r.stderr and "Traceback" not in r.stderr
