"""Helpers shared by commands. Commands report failure by raising `QuinkglError`; `app.main` prints it."""

from __future__ import annotations

from quinkgl_cli.errors import UsageError


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
