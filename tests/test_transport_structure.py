"""The transport package's shape: its modules import each other without cycles, and each says what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import quinkgl_cli.transport as transport_pkg

ROOT = Path(transport_pkg.__file__).resolve().parent
PACKAGE = "quinkgl_cli.transport"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PACKAGE, *parts])


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    packages = {name for name, p in modules.items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    # `from pkg import module` depends on the module; a package's __init__ only re-exports
                    target = sub if sub in modules else node.module
                    if target in modules and target != name and target not in packages:
                        deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules and a.name != name)
        graph[name] = deps
    return graph


def test_transport_modules_import_each_other_without_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle.extend([*path, node, dep])
                return True
            if dep not in state and visit(dep, [*path, node]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if module not in state and visit(module, []):
            break
    assert not cycle, " -> ".join(cycle)
    assert f"{PACKAGE}.ipv8.transport" not in graph[f"{PACKAGE}.ipv8.community"]


def test_every_transport_module_opens_with_what_it_owns():
    for path in ROOT.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if path.name == "__init__.py" and path.parent == ROOT:
            continue  # the bare package marker
        assert doc and len(doc.split()) >= 8, f"{path} has no opening docstring saying what it owns"
