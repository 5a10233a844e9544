"""The package's layout rules, read from its own imports with ast (README "Layout").

Types at the bottom, then the pipeline, files last: no import cycles; no ``_private`` name or
module is imported from outside the package that owns it; the bottom modules import nothing
above them; ``files/`` is reached from below ``delta`` only through lazy ``save``/``load``; the
CLI only parses arguments and calls; no module is longer than 450 lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sparsetune"
MAX_LINES = 450

# each bottom module, and the sparsetune modules it may import
BOTTOM = {
    "sparsetune.errors": set(),
    "sparsetune._checks": {"sparsetune.errors"},
    "sparsetune._loss": {"sparsetune.errors", "sparsetune._checks"},
    "sparsetune._mask_storage": {"sparsetune.errors"},
    "sparsetune._topk": {"sparsetune.errors", "sparsetune._checks", "sparsetune._mask_storage"},
    "sparsetune.mask": {"sparsetune.errors", "sparsetune._checks", "sparsetune._topk",
                        "sparsetune._mask_storage"},
}
BELOW_FILES = {*BOTTOM, "sparsetune.delta"}
LAZY_ENTRY_POINTS = {"save", "load"}


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # module name imported (a submodule when ``from pkg import submodule``)
    names: tuple[str, ...]  # names taken from target ("" for ``import target``)
    function: str | None  # enclosing function for a lazy import, None at module level
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text())
    found: list[Import] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "sparsetune":
                        found.append(Import(module, alias.name, ("",), inner, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, child)
                if target.split(".")[0] != "sparsetune":
                    continue
                plain = tuple(a.name for a in child.names if f"{target}.{a.name}" not in MODULES)
                if plain:
                    found.append(Import(module, target, plain, inner, child.lineno))
                for alias in child.names:  # ``from pkg import submodule``
                    if f"{target}.{alias.name}" in MODULES:
                        found.append(Import(module, f"{target}.{alias.name}", ("",), inner,
                                            child.lineno))
            visit(child, inner)

    visit(tree, None)
    return found


IMPORTS = [imp for module in MODULES for imp in _imports(module)]


def _lazy_file_access(imp: Import) -> bool:
    return imp.target.startswith("sparsetune.files") and imp.function in LAZY_ENTRY_POINTS


def test_every_import_resolves_to_a_module_of_the_package():
    missing = [f"{i.importer}:{i.line} -> {i.target}" for i in IMPORTS if i.target not in MODULES]
    assert not missing


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if not _lazy_file_access(imp) and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    # Tarjan's strongly connected components: a cycle is a component of more than one module
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def _owner_of_private(target: str, name: str) -> str | None:
    """The package a private module or name belongs to (None when nothing is private)."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    if name.startswith("_") and not name.startswith("__"):
        return target if _is_package(target) else ".".join(parts[:-1])
    return None


def test_no_private_name_crosses_a_package():
    crossing = []
    for imp in IMPORTS:
        for name in imp.names:
            owner = _owner_of_private(imp.target, name)
            if owner is not None and not (imp.importer + ".").startswith(owner + "."):
                crossing.append(f"{imp.importer}:{imp.line} takes {imp.target}.{name}")
    assert not crossing, "private names used outside their package:\n" + "\n".join(crossing)


@pytest.mark.parametrize("module", sorted(BOTTOM))
def test_bottom_modules_import_nothing_above_them(module):
    above = sorted(
        f"{i.target} (line {i.line})"
        for i in IMPORTS
        if i.importer == module and i.target not in BOTTOM[module] and not _lazy_file_access(i)
    )
    assert not above, f"{module} imports {above}"


def test_files_reached_from_below_delta_only_through_lazy_save_and_load():
    bad = [
        f"{i.importer}:{i.line} -> {i.target} (in {i.function or 'module level'})"
        for i in IMPORTS
        if i.importer in BELOW_FILES and i.target.startswith("sparsetune.files")
        and not _lazy_file_access(i)
    ]
    assert not bad


def test_nothing_below_delta_is_imported_lazily_except_files():
    """Lazy imports hide cycles; below delta the only ones allowed are the save/load entries."""
    bad = [
        f"{i.importer}:{i.line} -> {i.target}"
        for i in IMPORTS
        if i.importer in BELOW_FILES and i.function is not None and not _lazy_file_access(i)
    ]
    assert not bad


CLI = sorted(m for m in MODULES if m.startswith("sparsetune.cli."))
LOGIC = (ast.For, ast.AsyncFor, ast.While, ast.With, ast.ListComp, ast.DictComp, ast.SetComp,
         ast.GeneratorExp, ast.Lambda)


@pytest.mark.parametrize("module", CLI)
def test_cli_modules_only_parse_and_call(module):
    """No loops, comprehensions or context managers: anything more than parse, call, print
    belongs in the API (sparsetune.workflows and the stages)."""
    tree = ast.parse(MODULES[module].read_text())
    logic = [f"line {n.lineno}: {type(n).__name__}" for n in ast.walk(tree) if isinstance(n, LOGIC)]
    assert not logic, f"{module} holds logic: {logic}"
    private = [
        f"{i.target}.{name}" for i in IMPORTS if i.importer == module for name in i.names
        if _owner_of_private(i.target, name) is not None
    ]
    assert not private, f"{module} uses private names {private}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_too_long(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES}): split it"


def test_the_rules_catch_what_they_should(tmp_path):
    """The checks themselves: a private crossing, a cycle and a relative import are seen."""
    assert _owner_of_private("sparsetune.optim._selection", "x") == "sparsetune.optim"
    assert _owner_of_private("sparsetune.curvature.output_loss", "_plain") == "sparsetune.curvature"
    assert _owner_of_private("sparsetune._loss", "cycle") == "sparsetune"
    assert _owner_of_private("sparsetune.select", "_x") == "sparsetune.select"
    assert _owner_of_private("sparsetune.select", "__version__") is None
    node = ast.parse("from ..errors import X").body[0]
    assert _resolve("sparsetune.select.registry", node) == "sparsetune.errors"
    assert _resolve("sparsetune.select", node) == "sparsetune.errors"
    node = ast.parse("from . import data").body[0]
    assert _resolve("sparsetune.demo", node) in {"sparsetune", "sparsetune.demo"}
