"""Helpers shared by commands. Commands report failure by raising `QuinkglError`; `app.main` prints it."""

from __future__ import annotations

from pathlib import Path

from quinkgl_cli.errors import IOFailure, UsageError


def parse_kv(items: list[str] | None, flag: str) -> dict[str, str]:
    """`k=v` flags into a dict; a malformed item is a usage error naming the flag."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{flag} {item!r} is not key=value", f"write it as {flag} name=value")
        out[key] = value
    return out


def check_output_file(path: Path | None, flag: str, made_by_run: Path | None = None) -> None:
    """An output file a command writes later (after training, say): refused now, as an I/O error (2), when its
    directory does not exist or the path is a directory, so that no run learns it at its end. Directories are never
    created for an output file (a typo would scatter files); ``made_by_run`` is one the command creates itself (the
    run's --checkpoint-dir), which counts as existing."""
    if path is None:
        return
    parent = Path(path).parent
    if path.is_dir():
        raise IOFailure(f"{flag} {path} is a directory", f"give {flag} the path of a file")
    if not parent.resolve().is_dir() and (made_by_run is None or parent.resolve() != Path(made_by_run).resolve()):
        raise IOFailure(f"{flag} {path}: directory {parent} does not exist",
                        f"create it first (mkdir -p {parent}) or choose another path")
