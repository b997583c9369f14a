"""Creator keys: Ed25519 private keys in PKCS#8 PEM files, optionally passphrase-protected.

The public key's text form is ``ed25519:<64 lowercase hex>`` (the raw 32-byte key), as in manifests and the
``--trusted-pubkey`` flag. Private key files are created with mode 0600 from their first byte and written
atomically, so a crash never leaves a half-written key and no other user can ever read it. A key file that others
may read or write is refused when loaded (CryptoError, exit 3, "chmod 600"): whoever could read it may already
have signed manifests with it.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.errors import CryptoError, IOFailure, UsageError

# Imported where it is used, for start-up time: `serialization` (PEM; it loads the SSH and PKCS#12 code too),
# which `manifest verify` does not need.

PASSPHRASE_ENV = "QUINKGL_KEY_PASSPHRASE"
PUBKEY_PREFIX = "ed25519:"
_PUBKEY_RE = re.compile(r"^ed25519:[0-9a-fA-F]{64}$")
# A PEM Ed25519 key is ~120 bytes (~250 encrypted); anything far larger is not a key file.
_MAX_KEY_FILE = 64 * 1024
_MAX_PASSPHRASE_FILE = 64 * 1024
_PASSPHRASE_HINT = f"pass --passphrase-file FILE or set {PASSPHRASE_ENV}"


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """``ed25519:<64 lowercase hex>`` of a private key's public half, or of a public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return PUBKEY_PREFIX + public.public_bytes_raw().hex()


def normalize_public_key(text: str) -> str:
    """Validate ``ed25519:<hex>`` text and return it lowercased; anything else is a usage error."""
    value = text.strip()
    if not _PUBKEY_RE.match(value):
        raise UsageError(
            f"{text!r} is not a public key", "write it as ed25519:<64 hex digits>, as printed by `quinkgl keygen`"
        )
    return value.lower()


def parse_public_key(text: str) -> Ed25519PublicKey:
    value = normalize_public_key(text)
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(value[len(PUBKEY_PREFIX) :]))
    except ValueError as exc:  # pragma: no cover - every 32-byte string is accepted by cryptography
        raise CryptoError(f"public key {value} is not a valid Ed25519 key") from exc


def read_passphrase(passphrase_file: Path | None) -> bytes | None:
    """The passphrase from ``passphrase_file`` (first line, newline stripped), else ``$QUINKGL_KEY_PASSPHRASE``.

    None when neither is given. An empty passphrase is refused: it would look protected and not be.
    """
    if passphrase_file is not None:
        data = _read_small(Path(passphrase_file), _MAX_PASSPHRASE_FILE, "passphrase file")
        text = data.splitlines()[0] if data else b""
        if not text:
            raise UsageError(f"passphrase file {passphrase_file} is empty", "put the passphrase on its first line")
        return text
    env = os.environ.get(PASSPHRASE_ENV)
    if env is None:
        return None
    if not env:
        raise UsageError(f"{PASSPHRASE_ENV} is set but empty", "unset it or give it a passphrase")
    return env.encode("utf-8")


def private_key_pem(key: Ed25519PrivateKey, passphrase: bytes | None = None) -> bytes:
    from cryptography.hazmat.primitives import serialization

    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def save_private_key(path: Path, key: Ed25519PrivateKey, passphrase: bytes | None = None, force: bool = False) -> None:
    """Write ``key`` to ``path`` (mode 0600 from the first byte, atomic); an existing file needs ``force``."""
    path = Path(path)
    if path.is_dir():
        raise IOFailure(f"{path} is a directory", "give the path of the key file to create")
    atomic_write_bytes(path, private_key_pem(key, passphrase), mode=0o600, overwrite=force)


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 PKCS#8 PEM key. Missing/unreadable: IOFailure (2). Not a key, wrong passphrase: CryptoError (3)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    data = _read_small(path, _MAX_KEY_FILE, "key file", private=True)
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    if encrypted and passphrase is None:
        raise CryptoError(f"key file {path} is passphrase-protected", _PASSPHRASE_HINT)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except TypeError as exc:
        raise CryptoError(f"key file {path}: {exc}", _PASSPHRASE_HINT) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        if encrypted:
            raise CryptoError(f"cannot decrypt key file {path}: wrong passphrase", _PASSPHRASE_HINT) from exc
        raise CryptoError(
            f"{path} is not a PEM private key", "create one with `quinkgl keygen --output FILE`"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError(
            f"key file {path} holds a {type(key).__name__.removeprefix('_')}, not an Ed25519 key",
            "create one with `quinkgl keygen --output FILE`",
        )
    return key


def _read_small(path: Path, limit: int, what: str, private: bool = False) -> bytes:
    """At most ``limit`` bytes of ``path``; with ``private``, refused when group or others have any access to it
    (checked on the opened file, so a file swapped in after the check cannot slip through)."""
    try:
        with open(path, "rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            if private and mode & 0o077:
                raise CryptoError(
                    f"{what} {path} is accessible by other users (mode {mode:04o}); refusing to use a key others may have read",
                    f"chmod 600 {path}, and make a new key if others could have copied it",
                )
            data = fh.read(limit + 1)
    except FileNotFoundError as exc:
        raise IOFailure(f"{what} {path} not found", "check the path") from exc
    except IsADirectoryError as exc:
        raise IOFailure(f"{what} {path} is a directory", "give the path of a file") from exc
    except OSError as exc:
        raise IOFailure(f"cannot read {what} {path}: {exc.strerror}", "check its permissions") from exc
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit // 1024} KiB", f"this is not a {what}")
    return data

