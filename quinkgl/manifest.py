"""Manifest helpers under the guide's names: ``compute_arch_hash(model)`` and what a script needs around it.

Importing this module does not import torch; ``compute_arch_hash`` imports it when called.
"""

from quinkgl_cli.manifest.arch_hash import compute_arch_hash, describe_model
from quinkgl_cli.manifest.canonical import data_schema_hash, swarm_id
from quinkgl_cli.manifest.io import load_manifest
from quinkgl_cli.manifest.schema import Manifest, TaskSpec

__all__ = ["Manifest", "TaskSpec", "compute_arch_hash", "data_schema_hash", "describe_model", "load_manifest", "swarm_id"]
