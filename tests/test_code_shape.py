"""The shape a maintainer can rely on: small modules and functions, no method-name dispatch outside
the registry, no import cycle, stages importing only downhill (thin rules: tests/test_planning.py)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "saeft"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def test_no_module_over_the_limit():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_the_limit_without_a_stated_reason():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if lines > MAX_FUNCTION_LINES and "Long:" not in doc:
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines with no 'Long:' reason in their docstring: {long}"


def test_no_method_name_dispatch_outside_the_registry():
    dispatch = re.compile(r"\bmethod\s*(==|!=|in\s*[\(\[\{])|\bmethod\s+in\s+[A-Z_]+METHODS")
    hits = []
    for name, path in modules().items():
        if name.startswith("saeft.methods"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if dispatch.search(line.split("#")[0]):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "method-name dispatch outside saeft/methods:\n" + "\n".join(hits)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in the file, functions included)."""
    known = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in known and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


# Stage modules: each may import shared helpers, never another stage (the CLI sits above them all).
STAGES = ("saeft.stages.pretrain", "saeft.stages.prepare", "saeft.stages.cache", "saeft.stages.finetune", "saeft.stages.evaluate")
SHARED = ("saeft.config", "saeft.plan.runs", "saeft.infra.io", "saeft.methods", "saeft.data", "saeft.infra.tracking", "saeft.infra.mlflow_store", "saeft.infra.environment")


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_no_other_stage(stage):
    graph = import_graph()
    uphill = {t for t in graph.get(stage, ()) if t in STAGES}
    assert not uphill, f"{stage} imports stage(s) {sorted(uphill)}"


@pytest.mark.parametrize("shared", SHARED)
def test_shared_helpers_import_no_stage(shared):
    graph = import_graph()
    names = [n for n in modules() if n == shared or n.startswith(shared + ".")]
    stages = STAGES + ("saeft.stages.aggregate", "saeft.analysis", "saeft.cli")
    uphill = {f"{n} -> {t}" for n in names for t in graph.get(n, ()) if t.startswith(stages)}
    assert not uphill, f"shared helpers import stages: {sorted(uphill)}"
