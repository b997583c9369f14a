"""The TCP side channel that carries model bytes, announced by a signed offer over IPv8.

Per connection (the fetcher connects to the offering peer)::

    server -> client   b"QGLF" u8 version  32-byte random challenge  32-byte X25519 ephemeral key
    client -> server   b"QGLR" 20-byte offer id  32-byte X25519 ephemeral key  u16 sig_len  signature
    server -> client   u8 status  u64 size   then, when status is OK, ``size`` bytes sealed in frames (`channel`)

The signature is the intended recipient's, over a domain tag, the swarm's community id, the offer id, the
challenge, the server's public key and both ephemeral keys: it proves the fetcher holds the recipient's key and
is the other end of the key exchange, and a captured request cannot be replayed on another connection (fresh
challenge and keys) or against another peer (server key inside).

When the recipient cannot connect to the sender (see `reverse` and `relay`), a connection is first *announced* to
the server it reaches: after the challenge, the client sends ``REVERSE_MAGIC`` or ``RELAY_MAGIC``, the offer id
and a zero signature length, and the connection changes hands (to the recipient's waiting fetch, or to a relay's
splice). The exchange above then runs over it unchanged, the sender always in the server's role: so the bytes
are still checked against the signed offer, and only the holder of the recipient's key gets them. A connection
announced with ``PROBE_MAGIC`` only shows that its maker reaches the server's port (`probes`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time
from dataclasses import dataclass

from quinkgl_cli.transport.ipv8.channel import FRAME, TAG, Opener, Sealer, sealed_size

PROTOCOL = 2  # 2: the bytes are encrypted (`channel`); 1 (cleartext) is refused
CHALLENGE_MAGIC = b"QGLF"
REQUEST_MAGIC = b"QGLR"
REVERSE_MAGIC = b"QGLV"  # a sender connecting out to a recipient, to serve it an offer
RELAY_MAGIC = b"QGLY"  # either end of an offer's transfer, joining the other at a relay
PROBE_MAGIC = b"QGLP"  # a reachability probe (`probes`): taken and closed, nothing is served
NONCE_BYTES = 32
OFFER_ID_BYTES = 20
EPHEMERAL_BYTES = 32
CHALLENGE = struct.Struct(f"<4sB{NONCE_BYTES}s{EPHEMERAL_BYTES}s")
REQUEST_HEAD = struct.Struct(f"<4s{OFFER_ID_BYTES}s{EPHEMERAL_BYTES}sH")
RESPONSE = struct.Struct("<BQ")
MAX_SIGNATURE = 512

OK, UNKNOWN_OFFER, NOT_RECIPIENT, BUSY = 0, 1, 2, 3
STATUS_REASONS = {UNKNOWN_OFFER: "unknown_offer", NOT_RECIPIENT: "not_recipient", BUSY: "busy"}
RECV_CHUNK = 4 * 1024 * 1024


class FetchError(Exception):
    """A fetch that failed; ``reason`` is the stable word logged beside the peer."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Progress:
    """Whether a transfer keeps moving: every ``window`` seconds it must have received ``rate`` bytes a second
    since the last check, or be complete. A sender that trickles a byte now and then, never idle for long, is
    caught here within a window instead of holding a fetch slot until the overall deadline."""

    window: float
    rate: int
    total: int
    mark_time: float
    mark_got: int = 0

    def window_left(self, now: float) -> float:
        return self.mark_time + self.window - now

    def check(self, got: int, now: float) -> None:
        """Raise FetchError('stalled') once a window has passed with too little progress; else start a new one."""
        elapsed = now - self.mark_time
        if elapsed < self.window:
            return
        need = min(self.rate * elapsed, self.total - self.mark_got)
        if got - self.mark_got < need:
            raise FetchError("stalled", f"{got - self.mark_got} bytes in {elapsed:.1f}s")
        self.mark_time, self.mark_got = now, got


def fetch_statement(community_id: bytes, offer_id: bytes, nonce: bytes, server_key_bin: bytes, server_ephemeral: bytes,
                    client_ephemeral: bytes) -> bytes:
    return b"quinkgl-fetch/2\0" + community_id + offer_id + nonce + server_key_bin + server_ephemeral + client_ephemeral


async def announce(loop: asyncio.AbstractEventLoop, sock: socket.socket, magic: bytes, offer_id: bytes, idle: float) -> None:
    """Hand a connection over to what ``magic`` names (on a server that speaks this protocol), for ``offer_id``."""
    magic_in, version, _nonce, _ephemeral = CHALLENGE.unpack(await recv_exact(loop, sock, CHALLENGE.size, idle))
    if magic_in != CHALLENGE_MAGIC or version != PROTOCOL:
        raise FetchError("malformed_challenge")
    # No key exchange with whoever takes the connection over: the sender and the recipient run theirs through it.
    await loop.sock_sendall(sock, REQUEST_HEAD.pack(magic, offer_id, bytes(EPHEMERAL_BYTES), 0))


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview, idle: float,
                    progress: Progress | None = None) -> None:
    """Fill ``view`` completely; each stretch without progress may last ``idle`` seconds at most, and with
    ``progress`` the bytes must keep its pace."""
    if progress is not None:
        await _recv_paced(loop, sock, view, idle, progress)
        return
    got = 0
    total = view.nbytes
    async with asyncio.timeout(idle) as budget:
        while got < total:
            n = await loop.sock_recv_into(sock, view[got : got + RECV_CHUNK] if total - got > RECV_CHUNK else view[got:])
            if n == 0:
                raise FetchError("truncated", f"connection closed after {got} of {total} bytes")
            got += n
            budget.reschedule(loop.time() + idle)


async def _recv_paced(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview, idle: float, progress: Progress) -> None:
    got = 0
    total = view.nbytes
    last = loop.time()
    while got < total:
        now = loop.time()
        wait = max(min(idle - (now - last), progress.window_left(now)), 0.0) + 0.001
        try:
            n = await asyncio.wait_for(loop.sock_recv_into(sock, view[got : got + RECV_CHUNK]), wait)
        except TimeoutError:
            now = loop.time()
            progress.check(got, now)
            if now - last >= idle:
                raise TimeoutError(f"no data for {idle}s after {got} of {total} bytes") from None
            continue
        if n == 0:
            raise FetchError("truncated", f"connection closed after {got} of {total} bytes")
        got += n
        last = loop.time()
        progress.check(got, last)


async def recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, idle: float) -> bytes:
    buf = bytearray(n)
    await recv_into(loop, sock, memoryview(buf), idle)
    return bytes(buf)


def receive_blob(sock: socket.socket, size: int, idle: float, deadline: float, opener: Opener,
                 progress: Progress | None = None) -> tuple[bytearray, bytes]:
    """Blocking (run it in a worker thread): read ``size`` bytes of plaintext, sealed in frames, into a buffer
    allocated once, opening and hashing each frame as it arrives so that the digest is ready with the last one.
    Each stretch without progress may last ``idle`` s, the bytes must keep ``progress``'s pace (counted on the
    wire), and the whole read must end by ``deadline`` (`time.monotonic`), however steadily the bytes trickle in.

    A thread rather than the event loop: one syscall per chunk with no loop round trip, and sha256 and the cipher
    release the GIL, so a large transfer costs the loop nothing.
    """
    buf = bytearray(size)
    frame = memoryview(bytearray(FRAME + TAG))
    hasher = hashlib.sha256()
    reader = _Reader(sock, sealed_size(size), idle, deadline, progress)
    for start in range(0, size, FRAME):
        n = min(FRAME, size - start)
        reader.fill(frame[: n + TAG])
        plain = opener.open(frame[: n + TAG])
        buf[start : start + n] = plain
        hasher.update(plain)
    return buf, hasher.digest()


class _Reader:
    """Blocking exact reads from one socket under an idle timeout, a pace and an overall deadline."""

    def __init__(self, sock: socket.socket, total: int, idle: float, deadline: float, progress: Progress | None) -> None:
        self.sock = sock
        self.total = total
        self.idle = idle
        self.deadline = deadline
        self.progress = progress
        self.got = 0
        self.last = time.monotonic()

    def fill(self, view: memoryview) -> None:
        filled = 0
        while filled < view.nbytes:
            now = time.monotonic()
            left = self.deadline - now
            if left <= 0:
                raise TimeoutError(f"transfer not done by its deadline: {self.got} of {self.total} bytes")
            wait = min(self.idle - (now - self.last), left)
            if self.progress is not None:
                wait = min(wait, self.progress.window_left(now))
            self.sock.settimeout(max(wait, 0.0) + 0.001)
            try:
                n = self.sock.recv_into(view[filled:], min(view.nbytes - filled, RECV_CHUNK))
            except TimeoutError:
                now = time.monotonic()
                if self.progress is not None:
                    self.progress.check(self.got, now)
                if now - self.last >= self.idle:
                    raise TimeoutError(f"no data for {self.idle}s after {self.got} of {self.total} bytes") from None
                continue
            if n == 0:
                raise FetchError("truncated", f"connection closed after {self.got} of {self.total} bytes")
            filled += n
            self.got += n
            self.last = time.monotonic()
            if self.progress is not None:
                self.progress.check(self.got, self.last)


def send_blob(sock: socket.socket, header: bytes, payload: bytes | bytearray | memoryview, budget: float,
              sealer: Sealer) -> None:
    """Blocking (run it in a worker thread): the response header and the sealed payload, within ``budget`` seconds."""
    sock.settimeout(budget)
    try:
        sock.sendall(header)
        for frame in sealer.frames(payload):
            sock.sendall(frame)
    except TimeoutError as exc:
        raise TimeoutError(f"sending took longer than {budget:.0f}s") from exc
