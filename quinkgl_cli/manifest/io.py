"""Reading and writing `.qgl` files.

Reading is defensive: the size limit is checked before the whole file is read, the JSON must be one object
with no duplicate members and no NaN/Infinity, and the schema is validated strictly (no string-for-number
coercion). Every failure is one line naming the file and, for schema errors, the field.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.errors import IOFailure, UsageError
from quinkgl_cli.manifest import catalogue
from quinkgl_cli.manifest.canonical import canonical_bytes, data_schema_hash, manifest_object, sha256_text
from quinkgl_cli.manifest.schema import Manifest, error_text

MAX_MANIFEST_BYTES = 1024 * 1024


@dataclass(frozen=True)
class LoadedManifest:
    """A schema-valid manifest with the exact object it was read from (signature not yet checked)."""

    manifest: Manifest
    raw: dict[str, Any]
    canonical: bytes  # RFC 8785 bytes of ``raw`` without ``signature``: what the signature covers
    swarm_id: str

    def check_consistency(self, source: str = "manifest") -> None:
        """Derived fields must match what they derive from (checked after the signature, which names tampering)."""
        expected = data_schema_hash(self.manifest.task)
        if self.manifest.data_schema_hash != expected:
            raise UsageError(
                f"{source}: field data_schema_hash does not match the task (expected {expected})",
                "recreate the manifest with `quinkgl manifest create`",
            )
        for kind, spec in (("aggregation", self.manifest.aggregation), ("topology", self.manifest.topology)):
            try:
                entry = catalogue.resolve(kind, spec.name)  # type: ignore[arg-type]
                catalogue.validate_params(entry, dict(spec.params))
            except UsageError as exc:
                raise UsageError(f"{source}: field {kind}: {exc.message}", exc.hint) from exc
            if entry.name != spec.name:
                raise UsageError(f"{source}: field {kind}.name: {spec.name!r} is not the canonical spelling {entry.name!r}")


def read_manifest_bytes(path: Path) -> bytes:
    """The bytes of the manifest at ``path``; over 1 MiB is refused before it is read in full."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise IOFailure(f"manifest {path} is a directory", "give the path of a .qgl file")
            if info.st_size > MAX_MANIFEST_BYTES:
                raise _too_large(path)
            # Bounded read: the size of a pipe or a growing file is not known in advance.
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as exc:
        raise IOFailure(f"manifest {path} not found", "check the path") from exc
    except IsADirectoryError as exc:
        raise IOFailure(f"manifest {path} is a directory", "give the path of a .qgl file") from exc
    except OSError as exc:
        raise IOFailure(f"cannot read manifest {path}: {exc.strerror}", "check its permissions") from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise _too_large(path)
    return data


def _too_large(path: Path) -> UsageError:
    return UsageError(f"manifest {path} is larger than 1 MiB", "a .qgl file is a few KiB; this is not a manifest")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_manifest(data: bytes, source: str = "manifest") -> LoadedManifest:
    """Parse and validate manifest bytes. Anything malformed is a UsageError (1) naming what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source} is not UTF-8 text (byte {exc.start})", "a .qgl file is JSON") from exc
    try:
        raw = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{source} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", "a .qgl file is JSON"
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}", "a .qgl file is JSON") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{source} is not a JSON object", "a .qgl file is one JSON object")
    try:
        manifest = Manifest.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise validation_error(exc, source) from exc
    canonical = canonical_bytes(raw)
    return LoadedManifest(manifest=manifest, raw=raw, canonical=canonical, swarm_id=sha256_text(canonical))


def validation_error(exc: ValidationError, source: str) -> UsageError:
    """A pydantic error as one line: the field path and what is wrong with it."""
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return UsageError(f"{source}: field {where}: {error_text(err)}{more}", "fix the field or recreate the manifest")


def load_manifest(path: Path) -> LoadedManifest:
    """Read, parse and validate the `.qgl` at ``path`` (no signature or trust check: see ``trust.load_trusted``)."""
    return parse_manifest(read_manifest_bytes(path), source=f"manifest {path}")


def manifest_bytes(manifest: Manifest) -> bytes:
    """The `.qgl` text of ``manifest``: every field written out, indented for people, newline-terminated."""
    return (json.dumps(manifest_object(manifest), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(path: Path, manifest: Manifest, overwrite: bool = False) -> None:
    atomic_write_bytes(Path(path), manifest_bytes(manifest), mode=0o644, overwrite=overwrite)
