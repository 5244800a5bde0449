"""The shape a maintainer can rely on: small modules and functions, no method-name dispatch outside
the registry, and the layers: every module in one layer, imports only downhill, no stage importing
another, no import cycle, plan-time code free of torch, and docs/ARCHITECTURE.md's layer listing
generated from LAYERS (thin rules: tests/test_planning.py).

Regenerate that listing after moving, adding or removing a module: ``python tests/test_code_shape.py``."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
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


# The layers, lowest first: a module imports modules of its own layer or of lower ones, anywhere in
# its file (functions included). Each unit is a direct child of saeft/ (a folder or a module), so the
# tree shows the layers; docs/ARCHITECTURE.md lists them from here (python tests/test_code_shape.py).
LAYERS: dict[str, tuple[str, ...]] = {
    "plan": ("saeft", "saeft.plan", "saeft.config", "saeft.data", "saeft.methods"),
    "infra": ("saeft.infra",),
    "nn": ("saeft.nn", "saeft.sae"),
    "report": ("saeft.report",),
    "stages": ("saeft.stages", "saeft.analysis"),
    "entry": ("saeft.cli", "saeft.commands", "saeft.models"),
}
LAYER_DOCS = {
    "plan": ("Plan time", "what the workflow plans from (config sections, datasets, methods, variants, run ids, "
             "output names); no torch, pandas or matplotlib at import time (`tests/test_planning.py` watches a "
             "plan for them). A method's hooks and a dataset's loaders run in a job and import torch (and, for "
             "a method, `saeft/nn/`) inside their functions."),
    "infra": ("Infrastructure", "files, processes, GPUs and tracking; torch-free at import time too, since the "
              "workflow starts the warm worker and the MLflow sync from here."),
    "nn": ("Shared torch helpers", "what several stages compute with: models, weights, training pieces, "
           "metrics, and the SAE package."),
    "report": ("The report", "numbers, intervals, criteria, tables and figures from the evaluation results; "
               "no torch at import time."),
    "stages": ("Stages", "one module per `saeft <command>` (the feature analysis is a folder of them); a "
               "stage imports the layers below, never another stage."),
    "entry": ("Entry points", "the `saeft` command, and `saeft/models.py`: the public import path of the "
              "models (`from saeft.models import load_classifier`), re-exporting `saeft/nn/models.py`."),
}
HOOKS = {"saeft.methods": ("nn",)}
"""Upward imports allowed inside functions only: a method's hooks run in the finetune stage and use
the torch helpers, while its registry entry stays plan-time data."""
HEAVY_AT_IMPORT = {"plan": {"torch", "open_clip", "pandas", "matplotlib"},
                   "infra": {"torch", "open_clip", "pandas", "matplotlib"}, "report": {"torch", "open_clip"}}
JOB_TIME = {"saeft.data.arrays", "saeft.methods.flyp_towers"}
"""Torch modules inside plan-time folders: only functions import them (a job's loaders, a hook's model)."""
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
BEGIN, END = "<!-- layers: begin -->", "<!-- layers: end -->"


def layer_of(name: str) -> str | None:
    """The layer of a module: its unit's (the root package only by its own name)."""
    for layer, units in LAYERS.items():
        if any(name == unit or (unit != "saeft" and name.startswith(unit + ".")) for unit in units):
            return layer
    return None


def import_statements(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it is deferred: in a function or under ``if TYPE_CHECKING``."""
    def visit(node: ast.AST, deferred: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, deferred
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, deferred)
            return
        deferred = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            yield from visit(child, deferred)

    yield from visit(tree, False)


def import_edges() -> dict[str, list[tuple[str, bool]]]:
    """Module -> (imported name, deferred) for every import; names outside the package by their top name."""
    known = modules()
    edges: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for name, path in known.items():
        for node, deferred in import_statements(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target in known:
                    if target != name:
                        edges[name].append((target, deferred))
                elif not target.startswith("saeft."):
                    edges[name].append((target.split(".")[0], deferred))
    return edges


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in the file, functions included)."""
    known = modules()
    return {name: {t for t, _ in targets if t in known} for name, targets in import_edges().items()}


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


def test_every_module_is_in_one_layer():
    unplaced = [name for name in modules() if layer_of(name) is None]
    assert not unplaced, f"modules in no layer (add their folder or module to LAYERS): {unplaced}"


def test_the_tree_is_the_layers():
    """Every direct child of saeft/ is a unit of LAYERS and every unit is one: folders are layers."""
    children = {f"saeft.{p.stem}" for p in PACKAGE.iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()} | {"saeft"}
    units = [unit for layer in LAYERS.values() for unit in layer]
    assert len(units) == len(set(units)), f"units in two layers: {sorted(u for u in units if units.count(u) > 1)}"
    assert children == set(units), f"not in LAYERS: {sorted(children - set(units))}; not in saeft/: {sorted(set(units) - children)}"


def test_imports_go_only_downhill():
    rank = {layer: number for number, layer in enumerate(LAYERS)}
    uphill = []
    for name, targets in import_edges().items():
        for target, deferred in targets:
            low, high = layer_of(name), layer_of(target)
            if high is None or rank[high] <= rank[low]:
                continue
            hook = deferred and any(name.startswith(unit + ".") and high in allowed for unit, allowed in HOOKS.items())
            if not hook:
                uphill.append(f"{name} ({low}) -> {target} ({high})")
    assert not uphill, "imports from a lower layer into a higher one:\n" + "\n".join(sorted(set(uphill)))


def stage_unit(name: str) -> str | None:
    """The stage a module belongs to: a module of saeft/stages/, or the analysis folder as one."""
    if name.startswith("saeft.stages."):
        return name
    if name == "saeft.analysis" or name.startswith("saeft.analysis."):
        return "saeft.analysis"
    return None


def test_no_stage_imports_another():
    crossing = sorted({f"{name} -> {target}" for name, targets in import_graph().items() for target in targets
                       if stage_unit(name) and stage_unit(target) and stage_unit(name) != stage_unit(target)})
    assert not crossing, f"stages importing another stage: {crossing}"
    assert {stage_unit(name) for name in modules()} >= {"saeft.stages.finetune", "saeft.stages.aggregate", "saeft.analysis"}


def loaded_at_import(name: str, edges: dict[str, list[tuple[str, bool]]], seen: set[str] | None = None) -> set[str]:
    """The third-party packages importing a module loads: its import-time imports, and theirs."""
    seen = set() if seen is None else seen
    seen.add(name)
    found: set[str] = set()
    for target, deferred in edges.get(name, ()):
        if deferred:
            continue
        if not target.startswith("saeft"):
            found.add(target)
            continue
        parents = [".".join(target.split(".")[:n]) for n in range(1, target.count(".") + 2)]
        for module in parents:
            if module not in seen:
                found |= loaded_at_import(module, edges, seen)
    return found


def test_plan_time_layers_import_no_torch():
    edges = import_edges()
    heavy = {}
    for name in modules():
        banned = HEAVY_AT_IMPORT.get(layer_of(name), set())
        if name not in JOB_TIME and (loaded := loaded_at_import(name, edges) & banned):
            heavy[name] = sorted(loaded)
    assert not heavy, f"modules that load heavy packages at import time, below the layer that may: {heavy}"
    assert all(layer_of(name) == "plan" for name in JOB_TIME)


def test_the_heavy_import_check_sees_through_modules():
    edges = {"saeft.a": [("saeft.b", False)], "saeft.b": [("torch", False), ("pandas", True)]}
    assert loaded_at_import("saeft.a", edges) == {"torch"}


def test_the_stage_imports_name_modules_of_the_package():
    from saeft.cli import STAGE_IMPORTS

    named = {module for names in STAGE_IMPORTS.values() for module in names if module.startswith("saeft")}
    assert named and named <= set(modules()), sorted(named - set(modules()))


def summary(path: Path, most: int = 100) -> str:
    """A module's docstring in short, in Markdown: its first sentence, without its parentheses when
    longer than ``most`` characters."""
    doc = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0].split())
    doc = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", doc).replace("``", "`")
    text = re.split(r"(?<=\.)\s+(?=[A-Z`(])", doc)[0].rstrip(".")
    return re.sub(r" \([^()]*\)", "", text) if len(text) > most else text


def relative(name: str) -> str:
    path = modules()[name].relative_to(ROOT)
    return path.parent.as_posix() + "/" if path.name == "__init__.py" and name != "saeft" else path.as_posix()


def layer_listing() -> str:
    """docs/ARCHITECTURE.md's layer listing, from LAYERS and the modules' docstrings."""
    known = modules()
    lines = [BEGIN, "<!-- generated by `python tests/test_code_shape.py` from its LAYERS and the module docstrings -->", ""]
    for number, (layer, units) in enumerate(LAYERS.items(), 1):
        title, text = LAYER_DOCS[layer]
        lines.append(f"{number}. **{title}** (`{layer}`): {text}")
        for unit in units:
            lines.append(f"   - `{relative(unit)}`: {summary(known[unit])}.")
            if unit != "saeft":
                for name in (n for n in known if n.startswith(unit + ".")):
                    lines.append(f"     - `{relative(name)}`: {summary(known[name])}.")
    return "\n".join(lines + ["", END])


def documented_listing(text: str) -> str:
    return text[text.index(BEGIN):text.index(END) + len(END)] if BEGIN in text and END in text else ""


def test_architecture_lists_the_layers_as_generated():
    assert documented_listing(ARCHITECTURE.read_text()) == layer_listing(), (
        "docs/ARCHITECTURE.md's layer listing is stale: run python tests/test_code_shape.py")


def test_architecture_names_every_module_and_folder():
    text = ARCHITECTURE.read_text()
    missing = [relative(name) for name in modules() if f"`{relative(name)}`" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not name: {missing} (python tests/test_code_shape.py)"


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_PATHS = {"saeft/methods/feat_cos.py"}  # the worked example of docs/ARCHITECTURE.md: a module to write


@pytest.mark.parametrize("page", DOCUMENTS, ids=lambda p: p.name)
def test_code_paths_in_the_docs_exist(page):
    named = set(re.findall(r"(?<![\w/.-])saeft/(?:\w+/)*(?:\w+\.py\b)?", page.read_text()))
    missing = sorted(p for p in named - EXAMPLE_PATHS if not (ROOT / p.rstrip("/")).exists())
    assert not missing, f"{page.name} names paths that are not in the tree: {missing}"


def write_listing(path: Path = ARCHITECTURE) -> bool:
    """Replace the layer listing in ``path`` (between its markers); True when it changed."""
    text = path.read_text()
    old = documented_listing(text)
    if not old:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers")
    new = text.replace(old, layer_listing())
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    print("updated docs/ARCHITECTURE.md" if write_listing() else "docs/ARCHITECTURE.md is current")
