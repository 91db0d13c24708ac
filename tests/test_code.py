"""The code's own checks, run with the tests: the linter, the type checker on the pure layers, the layers contract
(pyproject.toml), and no import cycle among the package's modules, the compiled ones included."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_PYX_IMPORT = re.compile(r"^\s*(?:from\s+(shardproxy[\w.]*)\s+c?import|c?import\s+(shardproxy[\w.]*))", re.M)


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_ruff() -> None:
    done = run(str(BIN / "ruff"), "check", "shardproxy", "tests", "bench")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_on_the_pure_layers() -> None:
    done = run(str(BIN / "mypy"))  # the files and settings are pyproject.toml's
    assert done.returncode == 0, done.stdout + done.stderr


def test_layers_contract() -> None:
    done = run(str(BIN / "lint-imports"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_import_cycle() -> None:
    """Among all modules, counting function-level and type-checking imports, and what the .pyx files import."""
    graph = grimp.build_graph("shardproxy")
    for pyx in (ROOT / "shardproxy").rglob("*.pyx"):
        module = ".".join(pyx.relative_to(ROOT).with_suffix("").parts)
        if module not in graph.modules:
            graph.add_module(module)
        for match in _PYX_IMPORT.finditer(pyx.read_text()):
            graph.add_import(importer=module, imported=match.group(1) or match.group(2))
    cycles = [sorted(part) for part in _strongly_connected(graph) if len(part) > 1]
    assert not cycles, cycles


def _strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    parts: list[set[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[module] = min(low[module], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[module])
            if low[module] == index[module]:
                part = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    part.add(member)
                    if member == module:
                        break
                parts.append(part)
    return parts
