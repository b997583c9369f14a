"""`quinkgl run --config FILE`: a TOML file holding any of `run`'s flags, as its defaults.

A key is a flag's long name without the dashes (``node-id = "peer-1"``, ``script-arg = ["shard=0"]``,
``resume = false`` for ``--no-resume``); its value has the flag's type (a string, integer, number, boolean, or an
array of strings for a repeatable flag). Flags given on the command line win over the file; a repeatable flag given
there replaces the file's whole list. Relative paths in the file (manifest, script, directories, key files) are
relative to the file, so a config works from any working directory. An unknown key, a value of the wrong type or a
file that is not TOML is a one-line usage error (exit 1); a missing file is exit 2.
"""

from __future__ import annotations

import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quinkgl_cli.errors import IOFailure, UsageError

MAX_CONFIG_BYTES = 1 << 20
KEY_PREFIX = "ed25519:"  # a --trusted-pubkey value that is a key, not a key file
_KINDS = (bool, int, float, str, Path)


@dataclass(frozen=True)
class Flag:
    param: str  # the function parameter the flag fills
    kind: type  # bool, int, float, str or Path
    repeatable: bool


def flags_of(params: Iterable[Any], command: Callable[..., Any]) -> dict[str, Flag]:
    """Config keys of a command: each option's long name without dashes (from its click ``params``), with the
    type its parameter has in the command function."""
    hints = typing.get_type_hints(command)
    found: dict[str, Flag] = {}
    for param in params:
        longs = [opt for opt in param.opts if opt.startswith("--")]
        if longs and param.name in hints:
            kind, repeatable = _kind(hints[param.name])
            found[longs[0][2:]] = Flag(param.name, kind, repeatable)
    return found


def _kind(annotation: Any) -> tuple[type, bool]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        (inner,) = typing.get_args(annotation)
        return _kind(inner)[0], True
    if annotation in _KINDS:
        return annotation, False
    raise TypeError(f"no config form for a flag of type {annotation!r}")


def read_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise IOFailure(f"cannot read --config {path}: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise UsageError(f"--config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"--config {path} is not TOML: {exc}") from exc


def config_defaults(path: Path, flags: dict[str, Flag]) -> dict[str, Any]:
    """The file's values keyed by parameter name, checked against ``flags`` and with paths made absolute."""
    base = Path(path).resolve().parent
    defaults: dict[str, Any] = {}
    for key, value in read_config(path).items():
        flag = flags.get(key)
        if flag is None or key == "config":
            raise UsageError(f"--config {path}: unknown key {key!r}",
                             "keys are `quinkgl run` flags without the dashes, e.g. node-id (see `quinkgl run --help`)")
        if flag.repeatable:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list):
                raise UsageError(f"--config {path}: {key} must be an array of strings")
            defaults[flag.param] = [_value(path, base, key, flag.kind, item, in_list=True) for item in items]
        else:
            defaults[flag.param] = _value(path, base, key, flag.kind, value)
    return defaults


def _value(path: Path, base: Path, key: str, kind: type, value: Any, in_list: bool = False) -> Any:
    what = "an array of strings" if in_list else {bool: "true or false", int: "an integer", float: "a number",
                                                    str: "a string", Path: "a path string"}[kind]
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is Path and isinstance(value, str):
        return str(base / Path(value).expanduser())
    if kind is str and isinstance(value, str):
        if key == "trusted-pubkey" and not value.startswith(KEY_PREFIX):
            return str(base / Path(value).expanduser())  # a key file
        return value
    if kind is str and isinstance(value, bool) and not in_list:
        return "true" if value else "false"  # e.g. strict-manifest = true
    raise UsageError(f"--config {path}: {key} must be {what}, not {type(value).__name__} {value!r}")
