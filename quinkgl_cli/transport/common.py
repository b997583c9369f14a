"""Rules both transports apply the same way: the send path (`RuledTransport`), offer bookkeeping, control-message
limits, and drop reporting (log once per peer and reason, count every drop)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.events import emit
from quinkgl_cli.jsonsafe import loads_strict
from quinkgl_cli.transport.base import ControlValue, EncodedBody, OutgoingUpdate, Transport, TransportStats

log = logging.getLogger("quinkgl.transport")

# 2: every signed datagram carries the sender's session and counter (replay protection); 3: hellos carry an
# admission certificate, revocation lists travel by gossip; 4: every datagram is sealed with the swarm key (a peer
# of an older version is never read, its cleartext datagrams are refused as ``cleartext``)
PROTOCOL_VERSION = 4
MAX_MESSAGE_BYTES = 32 * 1024  # a control message must fit one UDP datagram with IPv8's headers and signature
MAX_META_BYTES = 4 * 1024
DEFAULT_MAX_MODEL_BYTES = 1024**3
DEFAULT_MAX_PEERS = 256  # a peer table's bound (IPv8's own default, 30, stalls large swarms)
MAX_ENCODING = 64  # characters of an update's encoding name
KIND_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def digest(payload: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(payload).digest()


class HostVerdicts:
    """``judge(host)``, remembered for up to ``kept`` string hosts (peers' addresses: a bounded, slowly changing
    set). Every datagram sent asks; parsing the address each time was a tenth of a flooded daemon's send path and
    several times a UDP transfer's sending cost."""

    def __init__(self, judge: Callable[[Any], bool], kept: int = 4096) -> None:
        self._judge = judge
        self._kept = kept
        self._verdicts: dict[str, bool] = {}

    def __call__(self, host: Any) -> bool:
        verdict = self._verdicts.get(host) if isinstance(host, str) else None
        if verdict is None:
            verdict = self._judge(host)
            if isinstance(host, str) and len(self._verdicts) < self._kept:
                self._verdicts[host] = verdict
        return verdict


# One encoder for every body (``json.dumps`` with options builds a new one each call).
_BODY_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, allow_nan=False)


def encode_body(body: dict[str, Any], limit: int = MAX_MESSAGE_BYTES, what: str = "message body") -> bytes:
    """Canonical JSON of a small control body; raises NetworkError when it is not JSON-safe or too large."""
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise NetworkError(f"{what} must be a dict with string keys")
    try:
        data = _BODY_ENCODER.encode(body).encode()
    except (TypeError, ValueError) as exc:
        raise NetworkError(f"{what} is not JSON-safe: {exc}") from exc
    if len(data) > limit:
        raise NetworkError(f"{what} is {len(data)} bytes, limit {limit}", "send large data as a model update")
    return data


def encoded(body: dict[str, Any]) -> EncodedBody:
    """``body`` encoded once for many sends; raises NetworkError as `encode_body` does."""
    return EncodedBody(encode_body(dict(body)))


def decode_body(data: bytes, limit: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    if len(data) > limit:
        raise ValueError(f"body is {len(data)} bytes, limit {limit}")
    value = loads_strict(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("body is not a JSON object")
    return value


def check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise NetworkError(f"message kind {kind!r} is invalid", "use 1-64 characters of A-Z a-z 0-9 _ . : -")


class OnceLog:
    """Logs each (event, peer, reason) once at WARNING (or ``level``); repeats are counted and logged at DEBUG only.

    A misbehaving or misconfigured peer must not flood the log, yet the first occurrence is always visible, with
    ``exc_info``'s traceback when one is given (a bug in our own code). Lines carry ``node_id`` as their node (a
    process may run several transports).
    """

    def __init__(self, logger: logging.Logger = log, capacity: int = 4096, node_id: str | None = None) -> None:
        self._logger = logger
        self._seen: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._capacity = capacity
        self._context = {"node": node_id} if node_id else None

    def __call__(
        self,
        event: str,
        peer: str,
        reason: str,
        *,
        level: int = logging.WARNING,
        exc_info: BaseException | None = None,
        **fields: Any,
    ) -> bool:
        key = (event, peer, reason)
        if key in self._seen:
            self._seen[key] += 1
            self._seen.move_to_end(key)
            emit(self._logger, logging.DEBUG, event, context=self._context, peer=peer, reason=reason, repeat=self._seen[key], **fields)
            return False
        self._seen[key] = 1
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        emit(self._logger, level, event, context=self._context, exc_info=exc_info, peer=peer, reason=reason, **fields)
        return True

    def count(self, event: str, peer: str, reason: str) -> int:
        return self._seen.get((event, peer, reason), 0)

    def forget(self, peer: str) -> None:
        for key in [k for k in self._seen if k[1] == peer]:
            del self._seen[key]


class DropLog:
    """Every message, offer or packet a transport drops: counted in ``stats.dropped``, reported once (`OnceLog`)."""

    def __init__(self, stats: TransportStats, node_id: str, logger: logging.Logger = log) -> None:
        self.stats = stats
        self.once = OnceLog(logger, node_id=node_id)

    def __call__(self, event: str, peer: str, reason: str, **fields: Any) -> None:
        self.stats.dropped += 1
        self.once(event, peer, reason, **fields)


def check_update(update: OutgoingUpdate) -> bytes:
    """The canonical meta of an update fit to offer; raises NetworkError saying what is wrong with it."""
    meta = encode_body(dict(update.meta), limit=MAX_META_BYTES, what="update meta")
    if not update.encoding or len(update.encoding) > MAX_ENCODING:
        raise NetworkError(f"encoding name must have 1-{MAX_ENCODING} characters")
    if update.round < 0 or update.sample_count < 0:
        raise NetworkError("round and sample count must not be negative")
    return meta


class RuledTransport(Transport):
    """The send path both transports follow: refuse before start and to unknown peers, check the update or message
    once, here, then hand it to the implementation. Refusals are dropped and reported, never raised, except a
    message the caller built wrongly (bad kind or body), which raises NetworkError."""

    running: bool
    drops: DropLog

    @abstractmethod
    def knows(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is a peer we may send to now."""

    @abstractmethod
    def _offer(self, peer_id: str, update: OutgoingUpdate, meta: bytes) -> None:
        """Offer a checked update to a known peer (``meta`` is its canonical encoding)."""

    @abstractmethod
    def _deliver(self, peer_id: str, kind: str, data: bytes) -> None:
        """Send a checked control message (``data`` is its canonical body) to a known peer."""

    def send_model(self, peer_id: str, update: OutgoingUpdate) -> None:
        if not self._may_send("send-failed", peer_id):
            return
        try:
            meta = check_update(update)
        except NetworkError as exc:
            self.drops("send-failed", peer_id, "bad_update", detail=exc.message)
            return
        self._offer(peer_id, update, meta)

    def send_message(self, peer_id: str, kind: str, body: dict[str, ControlValue] | EncodedBody) -> None:
        check_kind(kind)
        data = body.data if isinstance(body, EncodedBody) else encode_body(dict(body))
        if self._may_send("message-failed", peer_id):
            self._deliver(peer_id, kind, data)

    def _may_send(self, event: str, peer_id: str) -> bool:
        if not self.running:
            self.drops(event, peer_id, "not_started")
            return False
        if not self.knows(peer_id):
            self.drops(event, peer_id, "unknown_peer")
            return False
        return True


@dataclass
class _SenderState:
    latest_round: int = -1
    recent: OrderedDict[bytes, None] | None = None


class OfferBook:
    """Which offers a receiver has already taken: duplicates and rounds older than the sender's latest are ignored.

    The key of an offer is (round, digest, nonce): a sender may legitimately send several different updates in one
    round (several gossip steps), but a replayed offer, or one from before a newer round, is never fetched twice.
    """

    def __init__(self, remember: int = 256) -> None:
        self._senders: dict[str, _SenderState] = {}
        self._remember = remember

    def verdict(self, sender: str, round_: int, key: bytes) -> str | None:
        """None when the offer is new, else the reason to ignore it (``duplicate`` or ``out_of_date``)."""
        state = self._senders.get(sender)
        if state is None:
            return None
        # A resend of an offer already taken is a duplicate even when newer rounds were taken since: declining it
        # would withdraw an offer whose fetch may still be queued (a slow path, a busy sender).
        if state.recent is not None and key in state.recent:
            return "duplicate"
        if round_ < state.latest_round:
            return "out_of_date"
        return None

    def take(self, sender: str, round_: int, key: bytes) -> None:
        state = self._senders.setdefault(sender, _SenderState())
        if state.recent is None:
            state.recent = OrderedDict()
        state.latest_round = max(state.latest_round, round_)
        state.recent[key] = None
        while len(state.recent) > self._remember:
            state.recent.popitem(last=False)

    def forget(self, sender: str) -> None:
        """A peer that was lost and comes back (restarted from a checkpoint) starts afresh."""
        self._senders.pop(sender, None)
