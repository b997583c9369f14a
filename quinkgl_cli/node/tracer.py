"""`quinkgl run --trace FILE`: the daemon's side of the trace (`quinkgl_cli.node.trace` owns the format).

`Tracer.open` checks the file before the run starts: a missing or empty file is started, an existing trace of this
node and swarm is appended to (a restarted daemon adds a session), anything else is refused (exit 1: another
file, or another node's or swarm's trace; exit 2: cannot be written). Each record is one ``write`` of one line on a
file opened for appending, so every line is on disk (in the OS's hands) as soon as its event happened.

What it hears: the node's start and stop and each round's training (from the daemon), every model transfer (the
transport's `on_transfer`) and peers coming and going (`TracedEvents`, between the transport and the node).
A write that fails inside a transport callback must not break the transport: it is kept and raised from the
daemon's next write (after the round), which stops the run with exit 2.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

from quinkgl_cli.errors import IOFailure, QuinkglError, UsageError
from quinkgl_cli.node.metrics import RoundMetrics
from quinkgl_cli.node.trace import (
    Header,
    NodeStart,
    NodeStop,
    PeerArrival,
    PeerDeparture,
    TraceRecord,
    Train,
    Transfer,
    encode_record,
    read_trace,
    sessions,
)
from quinkgl_cli.transport.base import ControlValue, ModelReceived, PeerInfo, TransferDone, TransportEvents


def _us(seconds: float) -> float:
    """To the microsecond, never negative: the monotonic clock's precision is all a replay can use."""
    return max(0.0, round(seconds, 6))


def _check_existing(path: Path, swarm: str, node: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    except OSError as exc:
        raise IOFailure(f"cannot read --trace {path}: {exc.strerror}") from exc
    if not path.is_file():
        raise UsageError(f"--trace {path} is not a file", "name a trace file to create or to append to")
    if size == 0:
        return
    try:
        found = sessions(read_trace(path))
    except UsageError as exc:
        raise UsageError(f"--trace {path} exists and is not a trace file ({exc.message})",
                         "name a new file; quinkgl appends only to its own traces") from exc
    other = next((s.header for s in found if (s.header.node, s.header.swarm) != (node, swarm)), None)
    if other is not None:
        raise UsageError(f"--trace {path} holds node {other.node}'s trace of swarm {other.swarm}",
                         "give each daemon its own trace file (concatenate them afterwards)")


class Tracer:
    """Appends this node's records to its trace file; ``t`` is seconds since `open`."""

    def __init__(self, path: Path, fd: int, clock_zero: float) -> None:
        self.path = path
        self._fd: int | None = fd
        self._zero = clock_zero
        self._known: set[str] = set()
        self.failed: QuinkglError | None = None  # a write that failed in a transport callback

    @classmethod
    def open(cls, path: Path, swarm: str, node: str, torch_threads: int | None) -> Tracer:
        path = Path(path)
        _check_existing(path, swarm, node)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise IOFailure(f"cannot open --trace {path}: {exc.strerror}", "check that its directory exists and is writable") from exc
        tracer = cls(path, fd, time.monotonic())
        tracer._write(Header(swarm=swarm, node=node, started_at=datetime.now(UTC), torch_threads=torch_threads))
        return tracer

    def _t(self) -> float:
        return _us(time.monotonic() - self._zero)

    def _write(self, record: TraceRecord) -> None:
        if self.failed is not None:
            raise self.failed
        if self._fd is None:
            return  # closed: the session ended with its node-stop; late transport reports belong to no session
        data = memoryview(encode_record(record).encode())
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            raise IOFailure(f"cannot append to --trace {self.path}: {exc.strerror}") from exc

    def _write_from_callback(self, record: TraceRecord) -> None:
        try:
            self._write(record)
        except QuinkglError as exc:
            self.failed = exc

    # -- from the daemon -------------------------------------------------------------------------------------------
    def node_started(self, completed_round: int) -> None:
        self._write(NodeStart(t=self._t(), round=completed_round))

    def round_trained(self, metrics: RoundMetrics, save_seconds: float) -> None:
        """The round's record, once its work is done: ``save_seconds`` is what the daemon spent after it (checkpoint)."""
        self._write(Train(t=self._t(), round=metrics.round, seconds=_us(metrics.train_time), samples=metrics.samples,
                          eval_seconds=_us(metrics.eval_time), save_seconds=_us(save_seconds)))

    def node_stopped(self, completed_round: int, reason: str) -> None:
        """The session's last record; the file is closed after it, and a write error still surfaces here."""
        try:
            self._write(NodeStop.model_validate({"t": self._t(), "round": completed_round, "reason": reason}))
        finally:
            self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # -- from the transport (event loop) ---------------------------------------------------------------------------
    def transfer(self, done: TransferDone) -> None:
        self._write_from_callback(Transfer(t=self._t(), direction=done.direction, peer=done.peer, round=done.round,
                                           bytes=done.size, seconds=_us(done.seconds), path=done.path, ok=done.ok))

    def arrived(self, peer: str) -> None:
        if peer not in self._known:
            self._known.add(peer)
            self._write_from_callback(PeerArrival(t=self._t(), peer=peer))

    def departed(self, peer: str) -> None:
        if peer in self._known:
            self._known.discard(peer)
            self._write_from_callback(PeerDeparture(t=self._t(), peer=peer))


class TracedEvents:
    """The node's transport events, with arrivals and departures told to the tracer first."""

    def __init__(self, node: TransportEvents, tracer: Tracer) -> None:
        self.node = node
        self.tracer = tracer

    def on_peer_discovered(self, peer: PeerInfo) -> None:
        self.tracer.arrived(peer.node_id)
        self.node.on_peer_discovered(peer)

    def on_peer_lost(self, peer: PeerInfo) -> None:
        self.tracer.departed(peer.node_id)
        self.node.on_peer_lost(peer)

    def on_model(self, update: ModelReceived) -> None:
        self.node.on_model(update)

    def on_message(self, sender: str, kind: str, body: dict[str, ControlValue]) -> None:
        self.node.on_message(sender, kind, body)
