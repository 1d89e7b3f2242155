"""Shared fixtures. The SmolLM2 models load once per session (tens of seconds each), and only when a test asks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the package need not be installed to run the tests
    sys.path.insert(0, str(REPO))


def data_dir() -> Path:
    """The shared prompt data: `$MEDUSA_JAX_DATA`, else `shared/data` next to the repository."""
    env = os.environ.get("MEDUSA_JAX_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def dev_prompts() -> list[str]:
    """The held-out prompts of `dev_prompts.jsonl` (skips when the data is not there)."""
    path = data_dir() / "dev_prompts.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found: set MEDUSA_JAX_DATA to the folder holding dev_prompts.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default, SmolLM2-135M-Instruct (GGUF), loaded with `medusa_jax.load()` in float32."""
    import medusa_jax

    return medusa_jax.load()


@pytest.fixture(scope="session")
def hf_smollm2():
    """(model, tokenizer): the same GGUF loaded by HF transformers' PyTorch model, float32, eval mode."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from medusa_jax.checkpoint import default_gguf
    from medusa_jax.tokenizer import load_tokenizer

    path = default_gguf()

    def convert():
        # transformers parses the GGUF twice (config, then weights) and rebuilds gguf's tensor-name map once per
        # tensor: one reader and one map per run of this conversion halve its ~40 s
        import functools

        import gguf

        with pytest.MonkeyPatch.context() as mp:
            for name in ("GGUFReader", "get_tensor_name_map"):
                mp.setattr(gguf, name, functools.lru_cache(getattr(gguf, name)))
            return AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
            )

    shared = os.environ.get("MEDUSA_JAX_TEST_SHARED")  # this run's shared folder (pytest_configure)
    if not shared:
        return convert().eval(), load_tokenizer(path)
    # transformers reads a GGUF slowly (~40 s, mostly parsing its metadata): the first worker to ask converts it and
    # pickles the model for the others (a lock while it does; a model read from a GGUF refuses save_pretrained)
    import fcntl

    saved = os.path.join(shared, "hf_smollm2.pt")
    with open(saved + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(saved):
            model = convert()
            torch.save(model, saved + ".tmp")
            os.replace(saved + ".tmp", saved)
        else:
            model = torch.load(saved, weights_only=False)
    return model.eval(), load_tokenizer(path)


# ---------------------------------------------------------------------------------------------- compiled programs
def pytest_configure(config):
    """A folder the test processes share for the run (pytest-xdist workers and the tests' subprocesses inherit the
    environment), removed at its end: one JAX compilation cache, fresh each run (they compile many of the same
    programs), and what `hf_smollm2` converts once. Also the XLA flags of the run (inherited likewise)."""
    if hasattr(config.option, "loadscopereorder"):  # keep `LONGEST_FIRST` (xdist orders modules by test count)
        config.option.loadscopereorder = False
    if hasattr(config, "workerinput") or "MEDUSA_JAX_TEST_SHARED" in os.environ:
        return
    config._shared = tempfile.mkdtemp(prefix="medusa_jax_test_")
    os.environ["MEDUSA_JAX_TEST_SHARED"] = config._shared
    # the tests compile hundreds of small programs: LLVM -O1 without its expensive passes compiles them faster than
    # the default and runs them as fast (-O0 compiles faster still but decodes SmolLM2 4x slower: a net loss)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        extra = "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
        # and XLA:CPU's loop emitters instead of its fusion emitters, without the concurrency-optimized scheduler:
        # a quarter less CPU time, the same tokens (kept where this jaxlib knows both flags: unknown ones abort it)
        faster = "--xla_cpu_use_fusion_emitters=false --xla_cpu_enable_concurrency_optimized_scheduler=false"
        if xla_accepts(f"{flags} {extra} {faster}"):
            extra = f"{extra} {faster}"
        os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(config._shared, "jit")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def xla_accepts(flags: str) -> bool:
    """Whether a JAX process starts its CPU backend with these XLA_FLAGS (~1.5 s)."""
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return subprocess.run(probe, env=env, capture_output=True, timeout=300).returncode == 0


def pytest_unconfigure(config):
    if getattr(config, "_shared", None):
        shutil.rmtree(config._shared, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- module order
# The modules that take longest (about a minute or more each on a 2-core machine), longest first. pytest-xdist's
# `--dist loadscope` hands modules out in collection order (below: these first, then the rest as collected), so the
# run ends on short modules instead of one process finishing a long one while the other idles.
LONGEST_FIRST = ("test_aot.py", "test_generate.py", "test_cli.py", "test_mesh_decode.py", "test_medusa.py",
                 "test_device_check.py", "test_train.py", "test_train_sharding.py", "test_rejection.py",
                 "test_calibrate.py", "test_parity.py", "test_session.py", "test_training_howto.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its own order


# ---------------------------------------------------------------------------------------------- no silent skips
def skips_allowed() -> bool:
    """Skipping (torch or the prompt data missing) is allowed only outside CI and when asked for with
    MEDUSA_JAX_ALLOW_SKIP=1; otherwise a skip is a failure that says what is missing."""
    ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    return os.environ.get("MEDUSA_JAX_ALLOW_SKIP") == "1" and not ci


def _skip_as_failure(rep) -> None:
    if rep.skipped and not hasattr(rep, "wasxfail") and not skips_allowed():
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (
            f"would skip: {reason}\nTests must not skip: install what is missing (torch, transformers) or set "
            "MEDUSA_JAX_DATA; outside CI, MEDUSA_JAX_ALLOW_SKIP=1 allows skipping."
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _skip_as_failure(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _skip_as_failure(outcome.get_result())


def xla_env(devices: int, **extra) -> dict:
    """The environment of a test's subprocess with `devices` simulated CPU devices: the run's XLA flags kept, the
    repository first on PYTHONPATH."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
               JAX_PLATFORMS="cpu", **extra)  # fmt: skip
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env
