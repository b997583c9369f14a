"""Trust policies: open / tofu / pinned, expiry, and the TOFU store (atomic, 0600, locked, never reset)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from quinkgl_cli import keys
from quinkgl_cli.errors import CryptoError, ExitCode, IOFailure, TrustError, UsageError
from quinkgl_cli.manifest.io import manifest_bytes
from quinkgl_cli.manifest.trust import TOFU_FILE, TofuStore, load_trusted, resolve_policy, trust_bytes
from tests.helpers_manifest import NOW, expired_manifest, make_manifest, write, write_obj

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def creator():
    return keys.generate()


def test_policy_defaults() -> None:
    assert resolve_policy(None, ()) == "open"
    assert resolve_policy(None, ("ed25519:" + "0" * 64,)) == "pinned"
    assert resolve_policy("TOFU") == "tofu"
    with pytest.raises(UsageError):
        resolve_policy("trust-me")


def test_open_accepts_unsigned_and_signed(tmp_path: Path, creator) -> None:
    unsigned = load_trusted(write(tmp_path / "u.qgl", make_manifest()), "open", now=NOW)
    assert not unsigned.signed and unsigned.policy == "open"
    signed = load_trusted(write(tmp_path / "s.qgl", make_manifest(key=creator)), None, now=NOW)
    assert signed.signed and signed.policy == "open"
    assert signed.swarm_id != unsigned.swarm_id


def test_unsigned_refused_by_tofu_and_pinned(tmp_path: Path, creator) -> None:
    path = write(tmp_path / "u.qgl", make_manifest())
    with pytest.raises(TrustError, match="unsigned"):
        load_trusted(path, "tofu", state_dir=tmp_path / "state", now=NOW)
    with pytest.raises(TrustError, match="unsigned"):
        load_trusted(path, "pinned", [keys.public_key_text(creator)], now=NOW)
    assert not (tmp_path / "state" / TOFU_FILE).exists()


def test_stripped_signature_refused_everywhere(tmp_path: Path, creator) -> None:
    obj = json.loads(manifest_bytes(make_manifest(key=creator)))
    pub = keys.public_key_text(creator)
    stripped = dict(obj, signature=None)
    dropped = {k: v for k, v in obj.items() if k != "signature"}
    for variant in (stripped, dropped):
        path = write_obj(tmp_path / "s.qgl", variant)
        for policy, trusted in (("open", ()), ("tofu", ()), ("pinned", (pub,))):
            with pytest.raises(CryptoError, match="no signature") as info:
                load_trusted(path, policy, trusted, tmp_path / "state", now=NOW)
            assert info.value.code == ExitCode.CRYPTO
    # Stripping the creator too leaves an unsigned manifest: another swarm id, and no policy but open takes it.
    anonymous = dict(obj, signature=None, creator_pubkey=None)
    path = write_obj(tmp_path / "a.qgl", anonymous)
    with pytest.raises(TrustError):
        load_trusted(path, "pinned", (pub,), now=NOW)
    assert not load_trusted(path, "open", now=NOW).signed


def test_foreign_signature_refused(tmp_path: Path, creator) -> None:
    other = keys.generate()
    obj = json.loads(manifest_bytes(make_manifest(key=creator)))
    obj["signature"] = json.loads(manifest_bytes(make_manifest(key=other)))["signature"]
    with pytest.raises(CryptoError, match="not valid"):
        load_trusted(write_obj(tmp_path / "f.qgl", obj), "open", now=NOW)
    obj = json.loads(manifest_bytes(make_manifest(key=creator)))
    obj["creator_pubkey"] = keys.public_key_text(other)  # claims another creator, keeps the old signature
    with pytest.raises(CryptoError):
        load_trusted(write_obj(tmp_path / "g.qgl", obj), "open", now=NOW)


def test_pinned(tmp_path: Path, creator) -> None:
    pub = keys.public_key_text(creator)
    path = write(tmp_path / "p.qgl", make_manifest(key=creator))
    other = keys.public_key_text(keys.generate())
    assert load_trusted(path, "pinned", [pub], now=NOW).signed
    assert load_trusted(path, None, [other, pub.upper().replace("ED25519", "ed25519")], now=NOW).policy == "pinned"
    with pytest.raises(TrustError, match="not a trusted key") as info:
        load_trusted(path, "pinned", [other], now=NOW)
    assert info.value.code == ExitCode.TRUST
    # Re-signed by an attacker: a valid signature, by the wrong key.
    resigned = write(tmp_path / "r.qgl", make_manifest(key=keys.generate()))
    with pytest.raises(TrustError, match="not a trusted key"):
        load_trusted(resigned, "pinned", [pub], now=NOW)
    with pytest.raises(UsageError, match="needs at least one"):
        load_trusted(path, "pinned", [], now=NOW)
    with pytest.raises(UsageError, match="only applies to"):
        load_trusted(path, "open", [pub], now=NOW)
    with pytest.raises(UsageError):
        load_trusted(path, "pinned", ["ed25519:nothex"], now=NOW)


def test_pinned_key_from_public_key_file(tmp_path: Path, creator) -> None:
    pub_file = tmp_path / "creator.pub"
    pub_file.write_text(keys.public_key_text(creator) + "\n")
    path = write(tmp_path / "p.qgl", make_manifest(key=creator))
    assert load_trusted(path, "pinned", [str(pub_file)], now=NOW).signed


@pytest.mark.parametrize("content", ["secret\n", "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n", ""])
def test_bad_public_key_file_is_named_never_quoted(tmp_path: Path, creator, content: str) -> None:
    key_file = tmp_path / "creator.pub"
    key_file.write_text(content)
    path = write(tmp_path / "p.qgl", make_manifest(key=creator))
    with pytest.raises(UsageError) as info:
        load_trusted(path, "pinned", [str(key_file)], now=NOW)
    line = info.value.one_line()
    if content.startswith("-----BEGIN"):  # the creator's private key, passed by mistake: say so, and what to pass
        assert str(key_file) in line and "holds a private key" in line and "keygen --show-public" in line
    else:
        assert str(key_file) in line and "does not start with a public key" in line
    first = content.split()[0] if content.strip() else None
    assert first is None or first not in line
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_trust_events_are_logged(tmp_path: Path, creator, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "e.qgl", make_manifest("ev", key=creator))
    with caplog.at_level("INFO", logger="quinkgl.trust"):
        load_trusted(path, "tofu", state_dir=tmp_path / "state", now=NOW)
    events = [r.getMessage().split()[0] for r in caplog.records]
    assert events == ["tofu-learned", "manifest-trusted"], events
    assert "policy=tofu" in caplog.records[-1].getMessage()


def test_tofu_remembers_first_key_per_name(tmp_path: Path, creator) -> None:
    state = tmp_path / "state"
    first = write(tmp_path / "a.qgl", make_manifest("swarm-a", key=creator))
    assert load_trusted(first, "tofu", state_dir=state, now=NOW).tofu == "first-use"
    assert load_trusted(first, "tofu", state_dir=state, now=NOW).tofu == "known"
    # Same name, same creator, new content (a new round limit): accepted.
    updated = write(tmp_path / "b.qgl", make_manifest("swarm-a", key=creator, round_limit=5))
    assert load_trusted(updated, "tofu", state_dir=state, now=NOW).tofu == "known"
    # Same name re-signed by another key after first sight: refused, and the store still holds the first key.
    attacker = keys.generate()
    resigned = write(tmp_path / "c.qgl", make_manifest("swarm-a", key=attacker))
    with pytest.raises(TrustError, match="first seen signed by") as info:
        load_trusted(resigned, "tofu", state_dir=state, now=NOW)
    assert info.value.code == ExitCode.TRUST
    assert TofuStore(state).lookup("swarm-a") == keys.public_key_text(creator)
    # The way out names the new key to pin and the entry to remove; both are taken as they are written.
    new_key = keys.public_key_text(attacker)
    assert f"--trust-policy pinned --trusted-pubkey {new_key}" in str(info.value.hint)
    assert load_trusted(resigned, "pinned", [new_key], state_dir=state, now=NOW).policy == "pinned"
    assert f"remove the 'swarm-a' entry from {state / TOFU_FILE}" in str(info.value.hint)
    # Another name is first seen independently.
    other = write(tmp_path / "d.qgl", make_manifest("swarm-b", key=attacker))
    assert load_trusted(other, "tofu", state_dir=state, now=NOW).tofu == "first-use"
    store = state / TOFU_FILE
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert set(json.loads(store.read_text())["creators"]) == {"swarm-a", "swarm-b"}


def test_tofu_store_follows_quinkgl_home(tmp_path: Path, creator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUINKGL_HOME", str(tmp_path / "home"))
    load_trusted(write(tmp_path / "a.qgl", make_manifest(key=creator)), "tofu", now=NOW)
    assert (tmp_path / "home" / TOFU_FILE).is_file()


def test_corrupt_store_is_an_error_and_is_kept(tmp_path: Path, creator) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = write(tmp_path / "a.qgl", make_manifest(key=creator))
    for content in (b"{not json", b'{"version": 1, "creators": {"x": {"creator_pubkey": "bad"}}}', b"[]"):
        (state / TOFU_FILE).write_bytes(content)
        with pytest.raises(IOFailure, match="corrupt"):
            load_trusted(path, "tofu", state_dir=state, now=NOW)
        assert (state / TOFU_FILE).read_bytes() == content


def test_expired_refused_under_every_policy(tmp_path: Path, creator) -> None:
    pub = keys.public_key_text(creator)
    path = write(tmp_path / "e.qgl", expired_manifest(creator))
    for policy, trusted in (("open", ()), ("tofu", ()), ("pinned", (pub,))):
        with pytest.raises(TrustError, match="expired") as info:
            load_trusted(path, policy, trusted, tmp_path / "state", now=NOW)
        assert info.value.code == ExitCode.TRUST
    # Valid until the instant it expires.
    assert load_trusted(path, "pinned", (pub,), now=NOW - timedelta(hours=2)).signed


def test_verify_mode_checks_the_store_without_writing_it(tmp_path: Path, creator,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    path = write(tmp_path / "a.qgl", make_manifest("swarm-a", key=creator))
    with caplog.at_level(logging.INFO, logger="quinkgl"):
        assert load_trusted(path, "tofu", state_dir=state, now=NOW, remember=False).tofu == "first-use"
    # The log line says what a run would do, as a dry run's `dry-run-ok` does: nothing was pinned.
    (line,) = [r.getMessage() for r in caplog.records if "manifest-trusted" in r.getMessage()]
    assert "tofu=would-pin" in line and "first-use" not in line
    assert not state.exists()  # not even the directory or the lock file
    assert load_trusted(path, "tofu", state_dir=state, now=NOW).tofu == "first-use"  # what run does
    before = (state / TOFU_FILE).read_bytes(), sorted(p.name for p in state.iterdir())
    assert load_trusted(path, "tofu", state_dir=state, now=NOW, remember=False).tofu == "known"
    resigned = write(tmp_path / "b.qgl", make_manifest("swarm-a", key=keys.generate()))
    with pytest.raises(TrustError, match="first seen signed by"):
        load_trusted(resigned, "tofu", state_dir=state, now=NOW, remember=False)
    other = write(tmp_path / "c.qgl", make_manifest("swarm-b", key=creator))
    assert load_trusted(other, "tofu", state_dir=state, now=NOW, remember=False).tofu == "first-use"
    assert ((state / TOFU_FILE).read_bytes(), sorted(p.name for p in state.iterdir())) == before


def test_unsigned_under_tofu_says_why_and_what_to_do(tmp_path: Path) -> None:
    path = write(tmp_path / "u.qgl", make_manifest())
    with pytest.raises(TrustError) as info:
        load_trusted(path, "tofu", state_dir=tmp_path / "state", now=NOW)
    line = info.value.one_line()
    assert "has no key" in line and "--sign-with" in line and "--trust-policy open" in line and "local tests" in line


@pytest.mark.parametrize("where", ["file", "directory"])
def test_tofu_store_others_can_write_is_refused(tmp_path: Path, creator, where: str) -> None:
    state = tmp_path / "state"
    path = write(tmp_path / "a.qgl", make_manifest("swarm-a", key=creator))
    load_trusted(path, "tofu", state_dir=state, now=NOW)
    target, fix = (state / TOFU_FILE, "600") if where == "file" else (state, "700")
    for mode in ((0o666, 0o620, 0o602) if where == "file" else (0o777, 0o770, 0o703)):
        target.chmod(mode)
        for remember in (True, False):
            with pytest.raises(TrustError, match="writable by other users") as info:
                load_trusted(path, "tofu", state_dir=state, now=NOW, remember=remember)
            assert f"chmod {fix} {target}" in info.value.one_line() and info.value.code == ExitCode.TRUST
    target.chmod(0o600 if where == "file" else 0o700)
    assert load_trusted(path, "tofu", state_dir=state, now=NOW).tofu == "known"


def test_manifest_dated_in_the_future_is_refused_beyond_the_clock_skew(tmp_path: Path, creator) -> None:
    path = write(tmp_path / "f.qgl", make_manifest(key=creator))  # created_at = NOW
    assert load_trusted(path, "open", now=NOW - timedelta(minutes=59)).signed  # a clock a little behind: fine
    for policy in ("open", "pinned"):
        with pytest.raises(TrustError, match=r"2 days after this machine's clock .*allowance 60 minutes") as info:
            load_trusted(path, policy, [keys.public_key_text(creator)] if policy == "pinned" else (),
                         now=NOW - timedelta(days=2, minutes=1))
        assert "check this machine's clock" in info.value.one_line()


def test_trust_bytes_limits_size(creator) -> None:
    data = manifest_bytes(make_manifest(key=creator))
    assert trust_bytes(data, "open", now=NOW).signed
    with pytest.raises(UsageError, match="1 MiB"):
        trust_bytes(data + b" " * (1024 * 1024), "open", now=NOW)


_WORKER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    from quinkgl_cli.errors import TrustError
    from quinkgl_cli.manifest.trust import load_trusted
    state, paths = sys.argv[1], sys.argv[2:]
    for path in paths:
        try:
            load_trusted(path, "tofu", state_dir=state, now=datetime(2026, 6, 1, 12, tzinfo=UTC))
        except TrustError:
            print("refused")
        else:
            print("accepted")
    """
)


def _run_workers(batches: list[list[Path]], state: Path) -> list[list[str]]:
    """One process per batch, all started at once; each loads its manifests in turn under tofu."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(state), *map(str, batch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for batch in batches
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()
        out.append(stdout.decode().split())
    return out


def test_concurrent_tofu_writers_lose_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    batches = [
        [write(tmp_path / f"s{w}-{i}.qgl", make_manifest(f"swarm-{w}-{i}", key=keys.generate())) for i in range(8)]
        for w in range(4)
    ]
    assert _run_workers(batches, state) == [["accepted"] * 8] * 4
    stored = json.loads((state / TOFU_FILE).read_text())["creators"]
    assert set(stored) == {p.stem.replace("s", "swarm-", 1) for batch in batches for p in batch}
    assert stat.S_IMODE((state / TOFU_FILE).stat().st_mode) == 0o600
    assert [p.name for p in state.iterdir() if p.name.endswith(".tmp")] == []


def test_concurrent_tofu_conflict_has_one_winner(tmp_path: Path) -> None:
    state = tmp_path / "state"
    a, b = keys.generate(), keys.generate()
    pa = write(tmp_path / "a.qgl", make_manifest("contested", key=a))
    pb = write(tmp_path / "b.qgl", make_manifest("contested", key=b))
    batches = [[pa, pb], [pb, pa], [pa, pb], [pb, pa]]
    results = _run_workers(batches, state)
    winner = TofuStore(state).lookup("contested")
    assert winner in (keys.public_key_text(a), keys.public_key_text(b))
    win_path = pa if winner == keys.public_key_text(a) else pb
    assert results == [["accepted" if p == win_path else "refused" for p in batch] for batch in batches]
