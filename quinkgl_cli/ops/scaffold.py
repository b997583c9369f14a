"""`quinkgl init DIR`: the files a new swarm starts from, written into one directory.

``peer.py`` (the digits peer script: runs offline, to be replaced by your model and data), ``swarm.qgl`` (a
manifest for it, signed), ``peer.toml`` (a `quinkgl run --config` file pinning the manifest's creator key) and,
unless an existing key signs the manifest, ``creator.key`` (mode 0600: keep it off the devices). Nothing is
overwritten: an existing file of these names refuses the whole scaffold before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from quinkgl_cli import keys
from quinkgl_cli.atomic import atomic_write_text
from quinkgl_cli.errors import IOFailure
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.io import write_manifest
from quinkgl_cli.manifest.signing import sign_manifest

# The packaged digits script: offline, small, and what `quinkgl demo` runs, so the scaffold works as it stands.
TEMPLATE_SCRIPT = Path(__file__).resolve().parents[1] / "peer_scripts" / "digits_peer_script.py"
SCRIPT, MANIFEST, CONFIG, KEY = "peer.py", "swarm.qgl", "peer.toml", "creator.key"

_SCRIPT_HEADER = '''# Scaffolded by `quinkgl init` from quinkgl's digits example: replace build_model and build_loaders with your
# model and data, then make a new manifest for it (quinkgl manifest create --from-script peer.py ...).
'''

_CONFIG = '''# `quinkgl run --config {config}`: each key is a `quinkgl run` flag without its dashes; flags given on the
# command line win. Relative paths are relative to this file.
manifest = "{manifest}"
script = "{script}"
trust-policy = "pinned"
trusted-pubkey = ["{pubkey}"]
# node-id = "peer-1"                      # default: this host's name; every peer needs its own
port = 7001
listen = "127.0.0.1"                      # 0.0.0.0 to reach peers on other hosts
# bootstrap-peer = ["127.0.0.1:7002"]     # a peer already running (one is enough)
gossip-interval = 10.0
# rounds = 50                             # default: the manifest's round limit, else until stopped
script-arg = ["shard=0", "num_shards=1", "partition=iid"]
log-format = "text"
# log-file = "peer.log"
# metrics-port = 9464                     # Prometheus endpoint on 127.0.0.1
# metrics-file = "metrics.jsonl"          # quinkgl report metrics.jsonl --plot curves.png
'''


@dataclass(frozen=True)
class Scaffold:
    directory: Path
    files: list[Path]
    public_key: str
    key_written: bool


def targets(directory: Path, write_key: bool) -> list[Path]:
    names = [SCRIPT, MANIFEST, CONFIG] + ([KEY] if write_key else [])
    return [directory / n for n in names]


def create(directory: Path, name: str, arch_hash: str, key: Ed25519PrivateKey, write_key: bool) -> Scaffold:
    """Write the scaffold for swarm ``name`` whose model has ``arch_hash`` (the template script's model)."""
    paths = targets(directory, write_key)
    taken = [p for p in paths if p.exists() or p.is_symlink()]
    if taken:
        raise IOFailure(f"{taken[0]} already exists", "quinkgl init writes into a new or empty directory")
    manifest = build_manifest(
        name=name, task_type="classification", input_shape=(64,), output_shape=(10,), label_type="integer",
        framework="pytorch", arch_hash=arch_hash, aggregation="FedAvg", topology="RotationTopology",
        description="scaffolded by quinkgl init: handwritten digits (scikit-learn), MLP 64-32-10",
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IOFailure(f"cannot create {directory}: {exc.strerror}") from exc
    public = keys.public_key_text(key)
    if write_key:
        keys.save_private_key(directory / KEY, key)
    atomic_write_text(directory / SCRIPT, _SCRIPT_HEADER + TEMPLATE_SCRIPT.read_text(encoding="utf-8"), overwrite=False)
    write_manifest(directory / MANIFEST, sign_manifest(manifest, key))
    atomic_write_text(directory / CONFIG, _CONFIG.format(config=CONFIG, manifest=MANIFEST, script=SCRIPT, pubkey=public),
                      overwrite=False)
    return Scaffold(directory, paths, public, write_key)
