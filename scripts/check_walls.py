#!/usr/bin/env python3
"""The walls the design relies on, checked (run by ``.ci/run`` before the tests):

1. import-linter's contracts in pyproject.toml (``[tool.importlinter]``), over a mirror of the
   installed layout (setuptools maps backends/ and kernels/ into hcache_sglang; import-linter walks
   folders, so it is given that layout as folders);
2. no private name crosses a module boundary in hcache_sglang, bench/ or tests/: ``from m import _x``,
   ``import m._x``, ``m._x`` / ``setattr(m, "_x")`` on an imported module, and ``obj._x`` outside
   the module that defines the private attribute ``_x`` (names defined by this project only);
3. bench/ and tests/ import the packages ``hcache_sglang.backends`` and ``hcache_sglang.kernels``
   through their faces (the package; ``kernels.reference`` is the spec), not their modules;
4. the first contract names every top-level part of hcache_sglang (so it cannot go stale);
5. sizes: no module over ``MAX_MODULE_LINES`` lines, no function over ``MAX_FUNCTION_LINES``
   (Triton kernels, ``@triton.jit``, excepted).

Exceptions are listed below, each with the reason; keep the list short.

    python scripts/check_walls.py        # exit 1 and one line per violation when a wall is broken
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Iterator, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "hcache_sglang"
MAPPED = {"backends": ROOT / "backends", "kernels": ROOT / "kernels"}  # pyproject's package-dir
SCANNED = (ROOT / PACKAGE, ROOT / "backends", ROOT / "kernels", ROOT / "bench", ROOT / "tests", ROOT / "scripts")
FACES = {f"{PACKAGE}.backends": (), f"{PACKAGE}.kernels": ("reference",)}
PUBLIC_UNDERSCORE = {"_asdict", "_replace", "_fields", "_make", "_field_defaults"}  # NamedTuple's API

MAX_MODULE_LINES, MAX_FUNCTION_LINES = 420, 60
OVERSIZED: set[str] = set()

# (file relative to the root, name): crossings kept on purpose, each with its reason.
EXCEPTIONS = {
    # the test compares the Python page hash with SGLang's own C++ one, loaded by SGLang's loader
    ("tests/test_page_hash.py", "_load_native_hash_module"),
    # the GPU check times the spill's own gather into staging (bench/gpu_check_pipeline.py)
    ("bench/gpu_check_pipeline.py", "hcache_sglang.backends.layout"),
    ("bench/gpu_check_pipeline.py", "hcache_sglang.backends.staging"),
}


class Violation(NamedTuple):
    path: str
    line: int
    name: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name}: {self.why}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORE


def _files() -> Iterator[Path]:
    for top in SCANNED:
        yield from sorted(p for p in top.rglob("*.py") if "__pycache__" not in p.parts)


def _is_our_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return False
    base = MAPPED.get(parts[1]) if len(parts) > 1 else None
    path = base.joinpath(*parts[2:]) if base is not None else ROOT.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _private_attributes(trees: dict[Path, ast.AST]) -> dict[str, set[Path]]:
    """Private attribute and method names each of our modules defines on its objects."""
    defined: dict[str, set[Path]] = {}
    for path, tree in trees.items():
        if path.relative_to(ROOT).parts[0] not in (PACKAGE, *MAPPED):
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.append(node.attr)
            for name in names:
                if _private(name):
                    defined.setdefault(name, set()).add(path)
    return defined


def _imported_modules(tree: ast.AST) -> dict[str, str]:
    """Local names bound to modules: ``import m [as n]`` and ``from ours import module``."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if _is_our_module(f"{node.module}.{alias.name}"):
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _check_file(path: Path, tree: ast.AST, defined: dict[str, set[Path]]) -> Iterator[Violation]:
    rel = str(path.relative_to(ROOT))
    modules = _imported_modules(tree)
    outside = rel.split("/")[0] in ("bench", "tests")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            source = node.module or ""
            for alias in node.names:
                if _private(alias.name):
                    yield Violation(rel, node.lineno, alias.name, f"private name imported from {source or '.'}")
            if outside:
                yield from _check_face(rel, node.lineno, source, [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(part) for part in alias.name.split(".")):
                    yield Violation(rel, node.lineno, alias.name, "private module imported")
                if outside:
                    yield from _check_face(rel, node.lineno, alias.name, [])
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in modules:
                yield Violation(rel, node.lineno, node.attr, f"private name of module {modules[base.id]}")
            elif not (isinstance(base, ast.Name) and base.id in ("self", "cls")) and node.attr in defined \
                    and path not in defined[node.attr]:
                yield Violation(rel, node.lineno, node.attr, "private attribute defined in another module")
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            yield from _check_setattr(rel, node, modules)


def _check_setattr(rel: str, node: ast.Call, modules: dict[str, str]) -> Iterator[Violation]:
    """``setattr(m, "_x", ...)``, ``getattr(m, "_x")``, ``monkeypatch.setattr(m, "_x", ...)`` on a module."""
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    target, attr = node.args[0], node.args[1]
    if name in ("setattr", "getattr", "delattr", "hasattr") and isinstance(target, ast.Name) \
            and target.id in modules and isinstance(attr, ast.Constant) and isinstance(attr.value, str) \
            and _private(attr.value):
        yield Violation(rel, node.lineno, attr.value, f"private name of module {modules[target.id]}")


def _check_face(rel: str, line: int, source: str, names: list[str]) -> Iterator[Violation]:
    for package, allowed in FACES.items():
        if source.startswith(package + "."):
            sub = source[len(package) + 1:].split(".")[0]
            if sub not in allowed:
                yield Violation(rel, line, source, f"bench/ and tests/ import {package} through its face")
        elif source == package:
            for name in names:
                if name not in allowed and _is_our_module(f"{package}.{name}"):
                    yield Violation(rel, line, f"{package}.{name}", f"bench/ and tests/ import {package} through its face")


def private_name_violations() -> list[Violation]:
    trees = {path: ast.parse(path.read_text(), str(path)) for path in _files()}
    defined = _private_attributes(trees)
    found = [v for path, tree in trees.items() for v in _check_file(path, tree, defined)]
    return [v for v in found if (v.path, v.name) not in EXCEPTIONS]


def _jit(node: ast.AST) -> bool:
    return any((isinstance(d, ast.Attribute) and d.attr == "jit") or (isinstance(d, ast.Name) and d.id == "jit")
               for d in getattr(node, "decorator_list", ()))


def size_violations() -> list[Violation]:
    found = []
    for path in _files():
        rel, text = str(path.relative_to(ROOT)), path.read_text()
        if text.count("\n") > MAX_MODULE_LINES and rel not in OVERSIZED:
            found.append(Violation(rel, 1, "module", f"{text.count(chr(10))} lines (at most {MAX_MODULE_LINES})"))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _jit(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(Violation(rel, node.lineno, node.name,
                                           f"{lines} lines (at most {MAX_FUNCTION_LINES})"))
    return found


def contract_coverage(config: dict) -> list[str]:
    """Top-level parts of hcache_sglang the first contract (backends and kernels import nothing else
    of hcache_sglang) does not name."""
    contract = config["tool"]["importlinter"]["contracts"][0]
    named = set(contract["forbidden_modules"])
    parts = {p.stem for p in (ROOT / PACKAGE).iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    return sorted(f"{PACKAGE}.{p}" for p in parts if not p.startswith("_") and f"{PACKAGE}.{p}" not in named)


def run_import_linter() -> int:
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        print("check_walls: import-linter is not installed (requirements/cpu-lean.lock.txt pins it; "
              "it needs Python >= 3.11)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="hcache-walls-") as tmp:
        mirror = Path(tmp) / PACKAGE
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / PACKAGE, mirror, ignore=ignore)
        for name, source in MAPPED.items():
            shutil.copytree(source, mirror / name, ignore=ignore)
        result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
                                cwd=tmp, env={**os.environ, "PYTHONPATH": tmp}, capture_output=True, text=True)
    if result.returncode:
        print(result.stdout + result.stderr, file=sys.stderr)
    return result.returncode


def main() -> int:
    failed = run_import_linter() != 0
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for missing in contract_coverage(config):
        print(f"pyproject.toml: the first import-linter contract does not name {missing}", file=sys.stderr)
        failed = True
    for violation in private_name_violations() + size_violations():
        print(violation, file=sys.stderr)
        failed = True
    if not failed:
        print("check_walls: import contracts kept; no private name crosses a module boundary; sizes within limits")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
