"""Bad generation options: `generate`, `Session` and decode.py reject the same values with the same message (the
API names the argument, the CLI the flag); decode.py exits 2 with one line."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_medusa import tiny_model

import decode
from medusa_jax.session import Session

# (API keyword arguments, the names they use in the message)
CASES = {
    "max-new-tokens zero": (dict(max_new_tokens=0), ["max_new_tokens"]),
    "negative temperature": (dict(temperature=-0.5), ["temperature"]),
    "nan temperature": (dict(temperature=math.nan), ["temperature"]),
    "infinite temperature": (dict(temperature=math.inf), ["temperature"]),
    "top-p zero": (dict(top_p=0.0), ["top_p"]),
    "top-p above one": (dict(top_p=1.5), ["top_p"]),
    "nan top-p": (dict(top_p=math.nan), ["top_p"]),
    "negative top-k": (dict(top_k=-1), ["top_k"]),
    "negative seed": (dict(seed=-1), ["seed"]),
    "seed of 33 bits": (dict(seed=2**32), ["seed"]),
    "batch size zero": (dict(batch_size=0), ["batch_size"]),
    "negative batch size": (dict(batch_size=-1), ["batch_size"]),
    "negative lookup": (dict(lookup=-1), ["lookup"]),
    "posterior threshold above one": (dict(posterior_threshold=2.0), ["posterior_threshold"]),
    "nan posterior alpha": (dict(posterior_alpha=math.nan), ["posterior_alpha"]),
    "typical at temperature 0": (dict(acceptance="typical"), ["acceptance", "temperature"]),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def argv_of(kw: dict) -> list[str]:
    return [a for k, v in kw.items() for a in (flag(k), str(v))]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=16, heads=2)


def api_error(fn) -> str:
    with pytest.raises(ValueError) as e:
        fn()
    return str(e.value)


def cli_error(argv, monkeypatch, capsys) -> str:
    """decode.main in this process; its exit (os._exit(2), no teardown) becomes SystemExit."""

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(decode.os, "_exit", exit_)
    with pytest.raises(SystemExit) as e:
        decode.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decode.py: error: "), err
    return lines[0].removeprefix("decode.py: error: ")


@pytest.mark.parametrize("case", list(CASES))
def test_api_and_cli_reject_the_same_values(case, model, monkeypatch, capsys):
    kw, names = CASES[case]
    message = api_error(lambda: model.generate([[1, 2, 3]], **kw))
    assert all(n in message for n in names) and ("must" in message or "needs" in message), message
    cli_message = message
    for n in names:
        cli_message = cli_message.replace(n, flag(n), 1)
    assert cli_error(argv_of(kw), monkeypatch, capsys) == cli_message
    if "max_new_tokens" in kw:  # a Session takes it per call
        assert api_error(lambda: next(Session(model).stream_ids([1, 2, 3], **kw))) == message
    elif "batch_size" not in kw:  # a Session is batch 1
        assert api_error(lambda: Session(model, **kw)) == message


def test_no_prompts(model):
    assert "no prompts" in api_error(lambda: model.generate([]))


def test_cli_exit_status():
    r = subprocess.run([sys.executable, "decode.py", "--temperature", "nan"], cwd=Path(__file__).resolve().parents[1],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip() == "decode.py: error: --temperature must be a finite number >= 0 " \
        "(0 = greedy), got nan", r.stderr  # fmt: skip
