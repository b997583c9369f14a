"""Creator keys: file mode, atomic no-clobber writes, passphrases, and one-line errors with the right exit code."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from quinkgl_cli import keys
from quinkgl_cli.errors import CryptoError, ExitCode, IOFailure, UsageError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip_and_public_key_text(tmp_path: Path) -> None:
    key = keys.generate()
    path = tmp_path / "creator.key"
    keys.save_private_key(path, key)
    loaded = keys.load_private_key(path)
    text = keys.public_key_text(loaded)
    assert text == keys.public_key_text(key)
    assert text.startswith("ed25519:") and len(text) == len("ed25519:") + 64
    assert text == text.lower()
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()  # PKCS#8 PEM


def test_key_file_is_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k.key"
        keys.save_private_key(path, keys.generate())
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != "k.key"], "temp file left behind"


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    first = keys.generate()
    keys.save_private_key(path, first)
    with pytest.raises(IOFailure) as info:
        keys.save_private_key(path, keys.generate())
    assert info.value.code == ExitCode.IO
    assert keys.public_key_text(keys.load_private_key(path)) == keys.public_key_text(first)
    second = keys.generate()
    keys.save_private_key(path, second, force=True)
    assert keys.public_key_text(keys.load_private_key(path)) == keys.public_key_text(second)
    assert _mode(path) == 0o600


def test_passphrase_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pp_file = tmp_path / "pp"
    pp_file.write_text("correct horse\n")
    assert keys.read_passphrase(pp_file) == b"correct horse"
    path = tmp_path / "k.key"
    key = keys.generate()
    keys.save_private_key(path, key, keys.read_passphrase(pp_file))
    data = path.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in data
    with pytest.raises(CryptoError, match="passphrase-protected"):
        keys.load_private_key(path, None)
    with pytest.raises(CryptoError, match="wrong passphrase"):
        keys.load_private_key(path, b"wrong")
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "correct horse")
    assert keys.public_key_text(keys.load_private_key(path, keys.read_passphrase(None))) == keys.public_key_text(key)


def test_empty_passphrase_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "pp"
    empty.write_text("\n")
    with pytest.raises(UsageError):
        keys.read_passphrase(empty)
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "")
    with pytest.raises(UsageError):
        keys.read_passphrase(None)
    monkeypatch.delenv(keys.PASSPHRASE_ENV)
    assert keys.read_passphrase(None) is None


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(IOFailure):
        keys.load_private_key(tmp_path / "missing.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    with pytest.raises(CryptoError, match="not a PEM private key") as info:
        keys.load_private_key(garbage)
    assert info.value.code == ExitCode.CRYPTO
    other = tmp_path / "ec.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    other.chmod(0o600)
    with pytest.raises(CryptoError, match="not an Ed25519 key"):
        keys.load_private_key(other)
    with pytest.raises(IOFailure):
        keys.load_private_key(tmp_path)


def test_public_key_text_validation() -> None:
    good = keys.public_key_text(keys.generate())
    assert keys.normalize_public_key(good.upper().replace("ED25519", "ed25519")) == good
    for bad in ("", "ed25519:", "ed25519:" + "0" * 63, "ed25519:" + "g" * 64, "rsa:" + "0" * 64, good[8:]):
        with pytest.raises(UsageError):
            keys.normalize_public_key(bad)


def test_key_file_created_private_from_the_first_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            opened.append((str(path), mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    keys.save_private_key(tmp_path / "k.key", keys.generate())
    assert opened and all(mode == 0o600 for _, mode in opened), opened


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660, 0o666, 0o700 | 0o010])
def test_key_file_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.key"
    keys.save_private_key(path, keys.generate())
    path.chmod(mode)
    with pytest.raises(CryptoError, match=f"accessible by other users \\(mode {mode:04o}\\)") as info:
        keys.load_private_key(path)
    assert info.value.code == ExitCode.CRYPTO and f"chmod 600 {path}" in info.value.one_line()
    path.chmod(0o600)
    keys.load_private_key(path)
    path.chmod(0o400)  # read-only for its owner is fine
    keys.load_private_key(path)

