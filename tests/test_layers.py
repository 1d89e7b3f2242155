"""The package's imports point one way: core <- I/O <- API <- tools and training.

Walks every module's imports with `ast` (including imports inside functions, which hide cycles from Python) and
fails on an import cycle or on an inference module importing `medusa_jax.train`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medusa_jax"
TOOLS = {"medusa_jax.bench", "medusa_jax.calibrate"}  # top layer: may use anything


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    mods = {}
    for f in package.rglob("*.py"):
        parts = f.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def dotted(node) -> str | None:
    """`a.b.c` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it uses anywhere in its body: imported (`import`, `from ... import`,
    `importlib.import_module("...")` with a constant name) or reached as an attribute of an imported package
    (`medusa_jax.train...` after `import medusa_jax`: the package's lazy `__getattr__` imports submodules on use)."""
    mods = module_files(package)
    graph = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        aliases = {}  # local name -> the package module it stands for
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    deps.add(full if full in mods else base)
                    if full in mods:
                        aliases[a.asname or a.name] = full
            elif (isinstance(node, ast.Call) and (dotted(node.func) or "").endswith("import_module") and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):  # fmt: skip
                deps.add(node.args[0].value)
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            chain = dotted(node) if isinstance(node, ast.Attribute) else None
            head = chain.split(".")[0] if chain else None
            if head in aliases:
                parts = [aliases[head], *chain.split(".")[1:]]
                for i in range(len(parts), 1, -1):  # the longest prefix that is a package module
                    if ".".join(parts[:i]) in mods:
                        deps.add(".".join(parts[:i]))
                        break
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "medusa_jax.model" in graph["medusa_jax.medusa_decode"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_modules_reached_through_the_package(tmp_path):
    """`medusa_jax.train` reached as an attribute of the package (its lazy `__getattr__` imports it on use), under
    an alias, or through `importlib.import_module`, is an edge like an import."""
    pkg = tmp_path / "medusa_jax"
    (pkg / "train").mkdir(parents=True)
    for f in ("__init__.py", "train/__init__.py", "train/trainer.py", "config.py"):
        (pkg / f).write_text("")
    (pkg / "api.py").write_text("import medusa_jax\n\ndef f():\n    return medusa_jax.train.trainer.train\n")
    (pkg / "session.py").write_text("import medusa_jax as mj\n\ndef f():\n    return mj.train, mj.config.X\n")
    (pkg / "plan.py").write_text("import importlib\n\nT = importlib.import_module('medusa_jax.train')\n")
    graph = import_graph(pkg)
    assert "medusa_jax.train.trainer" in graph["medusa_jax.api"]
    assert {"medusa_jax.train", "medusa_jax.config"} <= graph["medusa_jax.session"]
    assert "medusa_jax.train" in graph["medusa_jax.plan"]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_inference_never_imports_training():
    bad = {
        name: sorted(d for d in deps if d.startswith("medusa_jax.train"))
        for name, deps in import_graph().items()
        if not name.startswith("medusa_jax.train") and name not in TOOLS
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"inference modules import training code: {bad}"
