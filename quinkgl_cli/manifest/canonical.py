"""Canonical bytes of a manifest (RFC 8785 JSON canonicalization) and the hashes derived from them.

The signature and the swarm id cover the manifest's JSON object exactly as written, minus ``signature``,
canonicalized by RFC 8785: member order, whitespace and number spelling (``1`` vs ``1.0``) do not matter,
every value does. ``manifest create`` writes every field explicitly, so the object in a file it wrote and
the dump of the in-memory :class:`Manifest` are the same object and give the same swarm id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import rfc8785

from quinkgl_cli.errors import UsageError
from quinkgl_cli.manifest.schema import Manifest, TaskSpec, TrainingSpec

SIGNATURE_FIELD = "signature"
DEFAULT_MIN_LOCAL_STEPS = TrainingSpec.model_fields["min_local_steps"].default
# Bumped if what the data schema hash covers ever changes, so old and new hashes never collide.
_DATA_SCHEMA_VERSION = 1


def manifest_object(manifest: Manifest) -> dict[str, Any]:
    """The JSON object of ``manifest`` as a `.qgl` file holds it (every field, signature included).

    A swarm without personalization leaves that section out, and one at the default ``min_local_steps`` that
    field, so manifests made before they existed keep their bytes, signatures and swarm ids (and daemons of before
    them read the new ones that do not change them)."""
    obj = manifest.model_dump(mode="json")
    if not manifest.personalization.enabled:
        obj.pop("personalization", None)
    if manifest.training.min_local_steps == DEFAULT_MIN_LOCAL_STEPS:
        obj["training"].pop("min_local_steps", None)
    return obj


def canonical_bytes(manifest: Manifest | Mapping[str, Any]) -> bytes:
    """RFC 8785 bytes of everything but ``signature``: what is signed and what the swarm id hashes."""
    obj = manifest_object(manifest) if isinstance(manifest, Manifest) else dict(manifest)
    obj.pop(SIGNATURE_FIELD, None)
    return _canonical_json(obj, "manifest")


def _canonical_json(obj: Any, what: str) -> bytes:
    # The schema bounds every number, so this fails only on an object that bypassed it (a hand-edited file).
    try:
        return rfc8785.dumps(obj)
    except rfc8785.CanonicalizationError as exc:
        raise UsageError(f"{what} cannot be canonicalized: {exc}", "use integers below 2^53 and finite numbers") from exc


def sha256_text(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def swarm_id(manifest: Manifest | Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical bytes: the identity every peer of the swarm shares."""
    return sha256_text(canonical_bytes(manifest))


def data_schema_hash(task: TaskSpec) -> str:
    """Hash of what a peer's data must look like: task type, input and output shapes, label type."""
    obj = {
        "version": _DATA_SCHEMA_VERSION,
        "task_type": task.type,
        "input_shape": list(task.input_shape),
        "output_shape": list(task.output_shape),
        "label_type": task.label_type,
    }
    return sha256_text(_canonical_json(obj, "task"))
