"""Builders shared by the manifest, trust and CLI tests."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.io import manifest_bytes
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.manifest.signing import sign_manifest

ARCH = "sha256:" + "ab" * 32
NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def make_manifest(name: str = "demo", key: Ed25519PrivateKey | None = None, **overrides: Any) -> Manifest:
    args: dict[str, Any] = dict(
        name=name,
        task_type="class",
        input_shape="1,8,8",
        output_shape="10",
        label_type="integer",
        framework="pytorch",
        arch_hash=ARCH,
        aggregation="FedAvg",
        topology="RandomTopology",
        now=NOW,
    )
    args.update(overrides)
    manifest = build_manifest(**args)
    return sign_manifest(manifest, key) if key is not None else manifest


def write(path: Path, manifest: Manifest) -> Path:
    path.write_bytes(manifest_bytes(manifest))
    return path


def write_obj(path: Path, obj: dict[str, Any]) -> Path:
    path.write_text(json.dumps(obj, indent=2))
    return path


def expired_manifest(key: Ed25519PrivateKey, name: str = "old") -> Manifest:
    """Signed, valid, and expired an hour before NOW."""
    manifest = make_manifest(name, now=NOW - timedelta(days=30))
    manifest = manifest.model_copy(update={"expires_at": NOW - timedelta(hours=1)})
    return sign_manifest(manifest, key)
