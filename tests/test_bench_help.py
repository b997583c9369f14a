"""Every benchmark script's `--help` must print: argparse formats each help text with `%`, so a bare percent sign
(`top-k 10%`) makes `--help` crash with a traceback instead of listing the flags the README's commands use."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class _AnyKey(dict[str, object]):
    """What argparse offers a help text (`%(default)s`, `%(prog)s`, ...): any key formats."""

    def __missing__(self, key: str) -> object:
        return ""


def _help_texts(path: Path) -> list[tuple[int, str]]:
    texts = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for kw in node.keywords:
                if kw.arg == "help" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    texts.append((kw.value.lineno, kw.value.value))
    return texts


SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_help_texts_format_as_argparse_formats_them(script: Path) -> None:
    for lineno, text in _help_texts(script):
        try:
            text % _AnyKey()
        except (ValueError, TypeError) as exc:
            pytest.fail(f"{script.name}:{lineno}: help text breaks --help ({exc}); write a literal % as %%")
