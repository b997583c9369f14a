"""Trust policies: whether this peer may use a manifest. `manifest verify` and the daemon share this code.

- ``open``: unsigned manifests are accepted; a signature that is present must still be valid.
- ``tofu`` (the default of ``run`` and ``manifest verify``): the creator key first seen for a manifest *name* is
  remembered; the same name with another key is refused. Unsigned manifests are refused: they carry no key to
  remember, so a changed copy could not be told from the original.
- ``pinned``: only manifests signed by one of the trusted keys are accepted.

Under every policy a bad, stripped or half-present signature is a CryptoError (3); an expired manifest, or one
created more than ``MAX_CLOCK_SKEW`` in this machine's future, a TrustError (4). The TOFU store is a JSON file in
the state directory, written atomically with mode 0600 under a file lock, so daemons started together on one
machine never lose each other's entries; ``manifest verify`` only reads it. A store that cannot be parsed is an
error and is never reset: resetting it would silently forget every key it pins. A store (or its directory) that
others may write is refused: whoever can write it chooses which creator keys this peer trusts.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quinkgl_cli import keys
from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.errors import IOFailure, TrustError, UsageError
from quinkgl_cli.events import emit
from quinkgl_cli.manifest.io import LoadedManifest, load_manifest, parse_manifest
from quinkgl_cli.manifest.schema import PUBKEY_PATTERN, Manifest
from quinkgl_cli.paths import ensure_private_dir, state_home

log = logging.getLogger("quinkgl.trust")

Policy = Literal["open", "tofu", "pinned"]
POLICIES: tuple[Policy, ...] = ("open", "tofu", "pinned")
TOFU_FILE = "tofu.json"
LOCK_TIMEOUT_S = 30.0
# How far in this machine's future a manifest's created_at may lie: clocks of edge devices drift by minutes, a
# manifest from hours ahead is a clock to fix (or a date chosen to outlive a key rotation).
MAX_CLOCK_SKEW = timedelta(hours=1)


@dataclass(frozen=True)
class TrustedManifest:
    """A manifest this peer may use, with what was checked."""

    manifest: Manifest
    swarm_id: str  # sha256:<hex> of the canonical bytes
    signed: bool  # True: a valid creator signature; False: unsigned (only possible under ``open``)
    policy: Policy
    canonical: bytes  # the signed bytes (RFC 8785, without ``signature``)
    tofu: Literal["first-use", "known"] | None = None  # under ``tofu``: whether this run learned the key


def resolve_policy(policy: str | None, trusted_keys: tuple[str, ...] | list[str] = ()) -> Policy:
    """The policy to apply: the one asked for, else ``pinned`` when trusted keys are given, else ``open``."""
    if policy is None:
        return "pinned" if trusted_keys else "open"
    value = policy.strip().lower()
    if value not in POLICIES:
        raise UsageError(f"unknown trust policy {policy!r}", f"valid: {', '.join(POLICIES)}")
    return value  # type: ignore[return-value]


def parse_trusted_keys(values: list[str] | tuple[str, ...]) -> frozenset[str]:
    """Each value is ``ed25519:<hex>`` or the path of a file whose first line is one (e.g. ``creator.pub``)."""
    out: set[str] = set()
    for value in values:
        text = value.strip()
        out.add(keys.normalize_public_key(text) if text.lower().startswith(keys.PUBKEY_PREFIX) else _key_from_file(value))
    return frozenset(out)


def _key_from_file(value: str) -> str:
    path = Path(value.strip())
    if not path.is_file():
        raise UsageError(
            f"--trusted-pubkey {value!r} is neither ed25519:<hex> nor a public key file", "pass the line printed by `quinkgl keygen`"
        )
    try:
        with open(path, "rb") as fh:
            words = fh.read(4096).decode("utf-8", "replace").split()
    except OSError as exc:
        raise IOFailure(f"cannot read public key file {path}: {exc.strerror}") from exc
    if words and words[0].startswith("-----BEGIN"):
        raise UsageError(
            f"--trusted-pubkey file {path} holds a private key (PEM), not a public key",
            f"pass its public key: `quinkgl keygen --show-public {path}` prints it; peers need only that line,"
            " never the private key",
        ) from None
    try:
        return keys.normalize_public_key(words[0] if words else "")
    except UsageError:
        # The file is named, never quoted (not even in a chained exception): it may be a private key or another
        # secret passed by mistake.
        raise UsageError(
            f"--trusted-pubkey file {path} does not start with a public key",
            "its first line must be ed25519:<64 hex digits>, as printed by `quinkgl keygen`",
        ) from None


def check_expiry(manifest: Manifest, now: datetime) -> None:
    """TrustError once ``now`` is past the manifest's ``expires_at`` (the daemon asks again every round)."""
    if manifest.expires_at is not None and now > manifest.expires_at:
        raise TrustError(
            f"manifest {manifest.name!r} expired at {_iso(manifest.expires_at)}",
            "ask its creator for a renewed manifest",
        )


def check_created(manifest: Manifest, now: datetime) -> None:
    """TrustError when ``created_at`` lies more than ``MAX_CLOCK_SKEW`` after ``now``."""
    ahead = manifest.created_at - now
    if ahead > MAX_CLOCK_SKEW:
        raise TrustError(
            f"manifest {manifest.name!r} was created at {_iso(manifest.created_at)}, {_duration(ahead)} after this"
            f" machine's clock ({_iso(now)}; allowance {_duration(MAX_CLOCK_SKEW)})",
            "check this machine's clock, or ask the creator why the manifest is dated in the future",
        )


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 7200:
        return f"{seconds // 3600} hours"
    return f"{seconds // 60} minutes"


def trust_loaded(
    loaded: LoadedManifest,
    policy: str | None = None,
    trusted_keys: list[str] | tuple[str, ...] | frozenset[str] = (),
    state_dir: Path | None = None,
    now: datetime | None = None,
    source: str = "manifest",
    remember: bool = True,
) -> TrustedManifest:
    """Apply signature, date and policy checks to an already parsed manifest (see :func:`load_trusted`).

    ``remember=False`` (``manifest verify``) checks a tofu manifest against the store without writing it: a key
    seen for the first time is reported as ``first-use`` and left for ``run`` to remember."""
    from quinkgl_cli.manifest.signing import verify_signature

    now = now or datetime.now(UTC)
    pinned = parse_trusted_keys(tuple(trusted_keys))
    chosen = resolve_policy(policy, tuple(pinned))
    if chosen == "pinned" and not pinned:
        raise UsageError("--trust-policy pinned needs at least one --trusted-pubkey", "pass the creator's ed25519:<hex> key")
    if chosen != "pinned" and pinned:
        raise UsageError(
            f"--trusted-pubkey only applies to --trust-policy pinned (got {chosen})",
            "drop --trust-policy to pin the given keys, or drop --trusted-pubkey",
        )
    manifest = loaded.manifest
    signed = verify_signature(loaded.canonical, manifest.creator_pubkey, manifest.signature, source)
    loaded.check_consistency(source)
    check_expiry(manifest, now)
    check_created(manifest, now)
    tofu_state: Literal["first-use", "known"] | None = None
    if chosen == "tofu" and not signed:
        raise TrustError(
            f"{source} is unsigned, and --trust-policy tofu (the default) trusts a manifest by the creator key it"
            " remembers for its name: an unsigned one has no key, so a changed copy could not be told apart",
            "sign it (`quinkgl manifest create ... --sign-with creator.key`), or pass --trust-policy open to use it"
            " unsigned for local tests",
        )
    if manifest.membership == "certified" and not signed:
        raise TrustError(
            f"{source} declares a certified swarm but is unsigned: nobody could sign its certificates",
            "create it with --sign-with creator.key",
        )
    if chosen == "pinned" and not signed:
        raise TrustError(
            f"{source} is unsigned and --trust-policy pinned accepts only manifests signed by a --trusted-pubkey",
            "ask the creator for a signed manifest, or use --trust-policy open for local tests",
        )
    creator = manifest.creator_pubkey
    if chosen == "pinned":
        if creator not in pinned:
            raise TrustError(
                f"{source} is signed by {creator}, which is not a trusted key",
                "check --trusted-pubkey against the creator's published key",
            )
    elif chosen == "tofu":
        assert creator is not None
        store = TofuStore(state_dir)
        if remember:
            tofu_state = store.check_and_remember(manifest.name, creator, loaded.swarm_id, now)
        else:
            tofu_state = store.check(manifest.name, creator)
    # Not remembered here (`manifest verify`, a dry run): the line says what a run would do, as `dry-run-ok` does.
    shown = "would-pin" if tofu_state == "first-use" and not remember else tofu_state
    fields: dict[str, Any] = {"tofu": shown} if shown else {}
    emit(log, logging.INFO, "manifest-trusted", name=manifest.name, swarm_id=loaded.swarm_id, policy=chosen,
         signed=signed, **fields)
    return TrustedManifest(
        manifest=manifest,
        swarm_id=loaded.swarm_id,
        signed=signed,
        policy=chosen,
        canonical=loaded.canonical,
        tofu=tofu_state,
    )


def load_trusted(
    path: Path,
    policy: str | None = None,
    trusted_keys: list[str] | tuple[str, ...] | frozenset[str] = (),
    state_dir: Path | None = None,
    now: datetime | None = None,
    remember: bool = True,
) -> TrustedManifest:
    """Load the `.qgl` at ``path`` and return it only if this peer may use it.

    ``policy``: "open" | "tofu" | "pinned" | None (None: pinned when ``trusted_keys`` are given, else open).
    ``trusted_keys``: ``ed25519:<hex>`` strings (or paths of files holding one). ``state_dir``: where the TOFU
    store lives (None: ``$QUINKGL_HOME`` or the per-user default). ``now``: aware datetime (None: the clock).

    Raises IOFailure (2) missing/unreadable file or TOFU store; UsageError (1) malformed/oversized manifest or
    contradictory options; CryptoError (3) invalid, stripped or half-present signature; TrustError (4) refused by
    the policy, unsigned under tofu/pinned, creator key changed under tofu, expired, dated in the future, or a
    TOFU store others may write. ``remember``: see :func:`trust_loaded`.
    """
    loaded = load_manifest(Path(path))
    return trust_loaded(loaded, policy, trusted_keys, state_dir, now, source=f"manifest {path}", remember=remember)


def trust_bytes(
    data: bytes,
    policy: str | None = None,
    trusted_keys: list[str] | tuple[str, ...] | frozenset[str] = (),
    state_dir: Path | None = None,
    now: datetime | None = None,
    source: str = "manifest",
) -> TrustedManifest:
    """:func:`load_trusted` for manifest bytes that did not come from a file (size limit still applies)."""
    from quinkgl_cli.manifest.io import MAX_MANIFEST_BYTES

    if len(data) > MAX_MANIFEST_BYTES:
        raise UsageError(f"{source} is larger than 1 MiB", "a .qgl file is a few KiB; this is not a manifest")
    return trust_loaded(parse_manifest(data, source), policy, trusted_keys, state_dir, now, source=source)


class _TofuEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, defer_build=True)

    creator_pubkey: str = Field(pattern=PUBKEY_PATTERN)
    first_seen: str
    first_swarm_id: str


class _TofuFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, defer_build=True)

    version: Literal[1]
    creators: dict[str, _TofuEntry]


class TofuStore:
    """Creator keys first seen per manifest name, in ``<state_dir>/tofu.json``."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.directory = state_home(Path(state_dir) if state_dir is not None else None)
        self.path = self.directory / TOFU_FILE
        self.lock_path = self.directory / (TOFU_FILE + ".lock")

    def lookup(self, name: str) -> str | None:
        """The creator key remembered for ``name``, or None."""
        with self._locked():
            entry = self._read().get(name)
        return entry.creator_pubkey if entry else None

    def check_and_remember(self, name: str, creator: str, swarm_id: str, now: datetime) -> Literal["first-use", "known"]:
        """Remember ``creator`` for ``name`` on first sight; refuse (TrustError) another key later."""
        with self._locked():
            creators = self._read()
            entry = creators.get(name)
            if entry is not None:
                self._compare(name, entry, creator)
                return "known"
            creators[name] = _TofuEntry(creator_pubkey=creator, first_seen=_iso(now), first_swarm_id=swarm_id)
            self._write(creators)
        emit(log, logging.INFO, "tofu-learned", name=name, creator=creator, store=self.path)
        return "first-use"

    def check(self, name: str, creator: str) -> Literal["first-use", "known"]:
        """What `check_and_remember` would answer, writing nothing (not even the directory or the lock file):
        the store is replaced atomically, so an unlocked read sees one whole version of it."""
        entry = self._read().get(name)
        if entry is None:
            return "first-use"
        self._compare(name, entry, creator)
        return "known"

    def _compare(self, name: str, entry: _TofuEntry, creator: str) -> None:
        if entry.creator_pubkey != creator:
            raise TrustError(
                f"manifest name {name!r} was first seen signed by {entry.creator_pubkey} "
                f"(on {entry.first_seen}); this one is signed by {creator}",
                "a changed key may be an impostor's: once the creator has confirmed the new key (not through this"
                f" manifest), pin it with --trust-policy pinned --trusted-pubkey {creator}, or remove the {name!r}"
                f" entry from {self.path} so that the next run learns it",
            )

    def _locked(self):
        from filelock import FileLock

        try:
            ensure_private_dir(self.directory)
        except OSError as exc:
            raise IOFailure(f"cannot create state directory {self.directory}: {exc.strerror}", "pass --state-dir or set QUINKGL_HOME") from exc
        return _LockGuard(FileLock(str(self.lock_path), timeout=LOCK_TIMEOUT_S, mode=0o600), self.lock_path)

    def _read(self) -> dict[str, _TofuEntry]:
        try:
            with open(self.path, "rb") as fh:
                self._refuse_shared(os.fstat(fh.fileno()).st_mode, self.path, "600")
                self._refuse_shared(os.stat(self.directory).st_mode, self.directory, "700")
                data = fh.read()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise IOFailure(f"cannot read TOFU store {self.path}: {exc.strerror}", "check its permissions") from exc
        try:
            parsed = _TofuFile.model_validate_json(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "content"
            raise IOFailure(
                f"TOFU store {self.path} is corrupt ({where}: {err['msg']}); it is never reset automatically",
                "restore it from a backup, or delete it only if every creator key may be learned again",
            ) from exc
        return dict(parsed.creators)

    @staticmethod
    def _refuse_shared(mode: int, path: Path, fix: str) -> None:
        if mode & 0o022:
            raise TrustError(
                f"TOFU store {path} is writable by other users (mode {stat.S_IMODE(mode):04o}): whoever can write it"
                " chooses which creator keys this peer trusts",
                f"chmod {fix} {path}, after checking that its entries are the keys you expect",
            )

    def _write(self, creators: dict[str, _TofuEntry]) -> None:
        body = _TofuFile(version=1, creators=dict(sorted(creators.items())))
        data = json.dumps(body.model_dump(mode="json"), indent=2).encode("utf-8") + b"\n"
        atomic_write_bytes(self.path, data, mode=0o600, overwrite=True)


class _LockGuard:
    def __init__(self, lock, path: Path) -> None:
        self._lock = lock
        self._path = path

    def __enter__(self) -> None:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout as exc:
            raise IOFailure(
                f"TOFU store lock {self._path} still held after {LOCK_TIMEOUT_S:.0f} s", "is another quinkgl process stuck?"
            ) from exc
        except OSError as exc:
            raise IOFailure(f"cannot lock {self._path}: {exc.strerror}", "check the state directory's permissions") from exc

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
