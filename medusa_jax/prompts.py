"""Reading prompt files: JSONL, one object per line with `"prompt"` (a string) or `"turns"` (a list of strings, as
in Spec-Bench / MT-Bench; the first turn is used). Blank lines are skipped.

Standard library only, so command-line tools can check their input before importing JAX.
"""

from __future__ import annotations

import json
import os


def json_error(e: json.JSONDecodeError, line: bool = True) -> str:
    """A JSON parse error as "what at line L, column C" (json's own messages may already end in "at")."""
    what = e.msg[: -len(" at")] if e.msg.endswith(" at") else e.msg
    return f"{what} at line {e.lineno}, column {e.colno}" if line else f"{what} at column {e.colno}"


def prompt_of(obj, where: str) -> str:
    """The prompt text of one parsed JSONL record; `where` ("file:line") prefixes error messages."""
    if not isinstance(obj, dict):
        raise ValueError(f'{where}: expected a JSON object with "prompt" or "turns", got {type(obj).__name__}')
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f'{where}: "prompt" must be a string, got {type(prompt).__name__}')
    elif "turns" in obj:
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f'{where}: "turns" must be a non-empty list of strings')
        prompt = turns[0]
        if not isinstance(prompt, str):
            raise ValueError(f'{where}: "turns"[0] must be a string, got {type(prompt).__name__}')
    else:
        raise ValueError(f'{where}: the object has neither "prompt" nor "turns" (keys: {", ".join(obj) or "none"})')
    if not prompt.strip():
        raise ValueError(f"{where}: empty prompt")
    return prompt


def read_prompts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The prompts of a JSONL file, in file order (the first `limit` when given).

    Raises ValueError "FILE:LINE: ..." for a bad line, and "FILE: ..." for a file that cannot be read or holds
    no prompts."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a JSONL file")
    prompts: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(prompts) >= limit:
                    break
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({json_error(e, line=False)})") from None
                prompts.append(prompt_of(obj, where))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts
