"""Swarm manifests: schema, canonical bytes, signatures, trust policies and the architecture hash.

Importing this package stays light (no torch): the names below are loaded on first use, so
``from quinkgl_cli.manifest import compute_arch_hash`` works without making ``manifest verify`` slow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "compute_arch_hash": "quinkgl_cli.manifest.arch_hash",
    "describe_model": "quinkgl_cli.manifest.arch_hash",
    "Manifest": "quinkgl_cli.manifest.schema",
    "canonical_bytes": "quinkgl_cli.manifest.canonical",
    "swarm_id": "quinkgl_cli.manifest.canonical",
    "data_schema_hash": "quinkgl_cli.manifest.canonical",
    "sign_manifest": "quinkgl_cli.manifest.signing",
    "verify_signature": "quinkgl_cli.manifest.signing",
    "load_manifest": "quinkgl_cli.manifest.io",
    "write_manifest": "quinkgl_cli.manifest.io",
    "build_manifest": "quinkgl_cli.manifest.create",
    "load_trusted": "quinkgl_cli.manifest.trust",
    "TrustedManifest": "quinkgl_cli.manifest.trust",
}

__all__ = [
    "Manifest",
    "TrustedManifest",
    "build_manifest",
    "canonical_bytes",
    "compute_arch_hash",
    "data_schema_hash",
    "describe_model",
    "load_manifest",
    "load_trusted",
    "sign_manifest",
    "swarm_id",
    "verify_signature",
    "write_manifest",
]

if TYPE_CHECKING:
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash, describe_model
    from quinkgl_cli.manifest.canonical import canonical_bytes, data_schema_hash, swarm_id
    from quinkgl_cli.manifest.create import build_manifest
    from quinkgl_cli.manifest.io import load_manifest, write_manifest
    from quinkgl_cli.manifest.schema import Manifest
    from quinkgl_cli.manifest.signing import sign_manifest, verify_signature
    from quinkgl_cli.manifest.trust import TrustedManifest, load_trusted


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
