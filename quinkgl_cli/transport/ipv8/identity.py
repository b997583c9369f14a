"""The node's IPv8 keys: one secret created once in the state directory (mode 0600), reused on every restart, and
from it one transport key per swarm (`swarm_identity`), so one node id shows an unrelated key in each swarm it
joins and peers of two swarms cannot link its memberships by key.

Beside it, the last session number the key signed with: each start takes a larger one, so peers can tell a
restart (newer session) from a replayed packet of an earlier run (older session).
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from ipv8.keyvault.crypto import default_eccrypto
from ipv8.keyvault.keys import PrivateKey

from quinkgl_cli.atomic import atomic_write_bytes, atomic_write_text
from quinkgl_cli.errors import CryptoError, IOFailure
from quinkgl_cli.paths import ensure_private_dir

KEY_FILE = "transport_key.bin"
SESSION_FILE = "transport_session"
SECRET_KEY_PREFIX = b"LibNaCLSK:"  # IPv8's private curve25519 key: this, then the X25519 key and the Ed25519 seed


def load_or_create_key(state_dir: Path, create: bool = True) -> PrivateKey:
    """The node's secret key; created (with its directory) when missing, or, with ``create`` False, refused then
    (a dry run writes nothing: without a key, no certificate can have been issued for this node)."""
    state_dir = Path(state_dir)
    if not create and not (state_dir / KEY_FILE).exists():
        raise IOFailure(f"this node has no transport key yet ({state_dir / KEY_FILE} does not exist), so no certificate"
                        " can be for it", "run `quinkgl node-key` for this --node-id and have the creator admit the key"
                        " it prints")
    try:
        ensure_private_dir(state_dir)
    except OSError as exc:
        raise IOFailure(f"cannot create state directory {state_dir}: {exc.strerror}", "check the path and permissions") from exc
    path = state_dir / KEY_FILE
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise CryptoError(
                f"transport key {path} is readable by others (mode {mode:o})", f"run: chmod 600 {path}"
            )
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise IOFailure(f"cannot read transport key {path}: {exc.strerror}") from exc
        try:
            return default_eccrypto.key_from_private_bin(raw)
        except Exception as exc:  # the ipv8 key parsers raise assorted types on garbage
            raise CryptoError(f"transport key {path} is corrupt", "move it away to create a new node identity") from exc
    key = default_eccrypto.generate_key("curve25519")
    atomic_write_bytes(path, key.key_to_bin(), mode=0o600, overwrite=False)
    os.chmod(path, 0o600)
    return key


def swarm_identity(state_dir: Path, swarm_id: str, create: bool = True) -> PrivateKey:
    """This node's transport key in the swarm ``swarm_id``: derived (HKDF-SHA256) from the key file and the swarm id,
    the same at every start, unrelated between swarms (what `quinkgl node-key --manifest` prints). ``create``: see
    `load_or_create_key`."""
    secret = load_or_create_key(state_dir, create).key_to_bin()
    seed = HKDF(algorithm=hashes.SHA256(), length=64, salt=swarm_id.encode("utf-8"),
                info=b"quinkgl transport key/1").derive(secret)
    return default_eccrypto.key_from_private_bin(SECRET_KEY_PREFIX + seed)


def next_session(state_dir: Path) -> int:
    """A session number larger than any this node used before: the wall clock in microseconds, or one more than
    the last one when the clock went back since. Call it after `swarm_identity` (which creates the directory)."""
    path = Path(state_dir) / SESSION_FILE
    last = 0
    if path.exists():
        try:
            text = path.read_text(encoding="ascii").strip()
        except OSError as exc:
            raise IOFailure(f"cannot read {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            text = ""
        if not text.isdigit() or int(text) >= 2**64 - 1:
            raise IOFailure(f"transport session file {path} is corrupt", f"delete it (rm {path}); the next start writes a new one")
        last = int(text)
    session = max(time.time_ns() // 1000, last + 1)
    atomic_write_text(path, f"{session}\n", mode=0o600)
    return session
