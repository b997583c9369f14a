"""One job per class: no class in quinkgl_cli/ grows past about 300 lines or 20 attributes (ARCHITECTURE.md).

Attributes are what a class owns: its annotated class-level fields (dataclasses, pydantic models) and every
``self.name`` it assigns. A class that needs more is doing two jobs; split it along its data flow."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quinkgl_cli"
MAX_LINES = 300
MAX_ATTRIBUTES = 20


def _attributes(cls: ast.ClassDef) -> set[str]:
    names = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    for sub in ast.walk(cls):
        targets: list[ast.expr] = []
        if isinstance(sub, ast.Assign):
            targets = list(sub.targets)
        elif isinstance(sub, (ast.AnnAssign, ast.AugAssign)):
            targets = [sub.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
    return names


def _oversized() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                attrs = len(_attributes(node))
                if lines > MAX_LINES or attrs > MAX_ATTRIBUTES:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines, {attrs} attributes")
    return found


def test_no_class_does_two_jobs() -> None:
    assert _oversized() == []


def test_the_check_sees_attributes_and_lines() -> None:
    source = "class Big:\n    a: int\n    def __init__(self):\n" + "".join(f"        self.x{i} = {i}\n" for i in range(25))
    cls = ast.parse(source).body[0]
    assert isinstance(cls, ast.ClassDef)
    assert len(_attributes(cls)) == 26
