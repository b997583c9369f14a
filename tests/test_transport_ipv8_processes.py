"""The IPv8 transport between real processes on loopback (each peer runs `quinkgl_cli.transport.probe`)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from quinkgl_cli.transport.probe import payload_for

pytestmark = pytest.mark.e2e

SWARM = "sha256:" + "5a" * 32
OTHER_SWARM = "sha256:" + "77" * 32
ROOT = Path(__file__).resolve().parents[1]


class Probe:
    """One peer process; its JSON event lines are collected by a reader thread."""

    def __init__(self, tmp: Path, node_id: str, *extra: str, swarm: str = SWARM, bootstrap: tuple[str, int] | None = None) -> None:
        self.node_id = node_id
        cmd = [sys.executable, "-m", "quinkgl_cli.transport.probe", "--node-id", node_id, "--swarm", swarm, "--state-dir", str(tmp / node_id), "--audit", *extra]
        if bootstrap:
            cmd += ["--bootstrap", f"{bootstrap[0]}:{bootstrap[1]}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.wait_for(lambda e: e["event"] in ("ready", "fatal"), what="ready")
        assert ready["event"] == "ready", ready
        self.address: tuple[str, int] = tuple(ready["address"])  # type: ignore[assignment]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "garbage", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0, what: str = "event", start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events[start:]:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = self.events[-15:]
                    raise AssertionError(f"{self.node_id}: no {what} within {timeout}s; last events: {tail}")
                self._cond.wait(min(left, 0.2))

    def ask(self, cmd: dict[str, Any], reply: str, timeout: float = 10.0) -> dict[str, Any]:
        start = len(self.events)
        self.send(cmd)
        return self.wait_for(lambda e: e["event"] == reply, timeout, reply, start=start)

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def discovered(self) -> set[str]:
        with self._cond:
            found: set[str] = set()
            for e in self.events:
                if e["event"] == "discovered":
                    found.add(e["peer"])
                elif e["event"] == "lost":
                    found.discard(e["peer"])
            return found

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e["event"] == kind]

    def logs(self, needle: str) -> list[str]:
        return [e["msg"] for e in self.of("log") if needle in e["msg"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "stop"})
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def spawn(tmp_path):
    probes: list[Probe] = []

    def make(node_id: str, *extra: str, **kw: Any) -> Probe:
        p = Probe(tmp_path, node_id, *extra, **kw)
        probes.append(p)
        return p

    yield make
    for p in probes:
        p.stop()


def wait_all_meet(probes: list[Probe], timeout: float = 20.0) -> None:
    names = {p.node_id for p in probes}
    deadline = time.monotonic() + timeout
    while True:
        missing = {p.node_id: sorted(names - {p.node_id} - p.discovered()) for p in probes}
        if not any(missing.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"peers did not all meet within {timeout}s: missing {missing}")
        time.sleep(0.05)


def poll_stats(p: Probe, done: Callable[[dict[str, Any]], bool], timeout: float = 10.0, what: str = "stats") -> dict[str, Any]:
    """Ask for the peer's stats until ``done`` holds; the last answer, for the exact assertions that follow."""
    deadline = time.monotonic() + timeout
    while True:
        stats = p.ask({"cmd": "stats"}, "stats")
        if done(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"{p.node_id}: no {what} within {timeout}s: {stats}")
        time.sleep(0.05)


def assert_audit_clean(p: Probe, expect_tcp: bool) -> None:
    report = p.ask({"cmd": "audit"}, "audit")
    assert report["non_loopback"] == [], report
    assert report["udp_sends"] > 0, report  # the audit saw the traffic it is meant to judge
    if expect_tcp:
        assert report["tcp_connects"] > 0, report
    assert report["guard_blocked"] == 0, report


@pytest.mark.parametrize("n", [2, 3, 5])
def test_peers_given_one_seed_all_meet_and_exchange(spawn, n):
    seed = spawn("p0")
    peers = [seed] + [spawn(f"p{i}", bootstrap=seed.address) for i in range(1, n)]
    wait_all_meet(peers)
    size = 1_000_000
    for i, p in enumerate(peers):
        p.send({"cmd": "send", "to": peers[(i + 1) % n].node_id, "size": size, "seed": i, "round": 3})
    for i, p in enumerate(peers):
        sender = peers[(i - 1) % n]
        m = p.wait_for(lambda e: e["event"] == "model", what="model")
        assert (m["sender"], m["round"], m["size"]) == (sender.node_id, 3, size)
        assert m["sha256"] == hashlib.sha256(payload_for(size, (i - 1) % n)).hexdigest()
    for p in peers:
        assert_audit_clean(p, expect_tcp=True)
        assert not p.logs("packet-refused"), p.logs("packet-refused")


def test_audit_detects_a_non_loopback_attempt(spawn):
    """Negative control: the audit that the other tests rely on does catch (and refuse) an off-loopback send."""
    p = spawn("p0")
    poked = p.ask({"cmd": "poke", "host": "192.0.2.1"}, "poked")
    assert "refused" in poked["error"]
    report = p.ask({"cmd": "audit"}, "audit")
    assert report["non_loopback"] == ["udp:192.0.2.1"]


def test_sender_stopping_mid_transfer_costs_seconds_and_receiver_goes_on(spawn):
    receiver = spawn("rx")
    slow = spawn("slow", "--serve-rate", str(4 * 1024 * 1024), bootstrap=receiver.address)
    other = spawn("ok", bootstrap=receiver.address)
    wait_all_meet([receiver, slow, other])
    slow.send({"cmd": "send", "to": "rx", "size": 40_000_000, "round": 1})
    slow.wait_for(lambda e: e["event"] == "serving", what="transfer to start")
    killed_at = time.monotonic()
    slow.kill()
    failed = receiver.wait_for(lambda e: e["event"] == "log" and "fetch-failed" in e["msg"] and "peer=slow" in e["msg"], timeout=10, what="fetch failure")
    assert "reason=sender_vanished" in failed["msg"], failed
    assert time.monotonic() - killed_at < 5
    receiver.wait_for(lambda e: e["event"] == "lost" and e["peer"] == "slow", timeout=10, what="slow peer dropped")
    assert time.monotonic() - killed_at < 10
    assert not receiver.of("model")
    other.send({"cmd": "send", "to": "rx", "size": 2_000_000, "round": 2})
    m = receiver.wait_for(lambda e: e["event"] == "model", what="model after the failure")
    assert m["sender"] == "ok"


def test_trickling_sender_fails_by_the_deadline_and_a_frozen_one_is_dropped(spawn):
    """A sender that never goes idle but trickles bytes (100 kB/s) cannot hold a fetch slot past the overall budget
    (connect + fetch timeouts + size at 1 MiB/s: 3.4 s here, not the 15 s the blob would take); meanwhile other
    transfers go on. Frozen (SIGSTOP), it stops answering and is dropped from the peer list."""
    receiver = spawn("rx", "--fetch-timeout", "1", "--connect-timeout", "1")
    slow = spawn("slow", "--serve-rate", "100000", bootstrap=receiver.address)
    other = spawn("ok", bootstrap=receiver.address)
    wait_all_meet([receiver, slow, other])
    slow.send({"cmd": "send", "to": "rx", "size": 1_500_000, "round": 1})
    slow.wait_for(lambda e: e["event"] == "serving", what="the trickle to start")
    started = time.monotonic()
    other.send({"cmd": "send", "to": "rx", "size": 2_000_000, "round": 2})
    m = receiver.wait_for(lambda e: e["event"] == "model", what="the other sender's model")
    assert m["sender"] == "ok"
    failed = receiver.wait_for(lambda e: e["event"] == "log" and "fetch-failed peer=slow" in e["msg"], timeout=10, what="fetch failure")
    assert "reason=too_slow" in failed["msg"], failed
    assert time.monotonic() - started < 3.4 + 2.0
    assert receiver.events.index(m) < receiver.events.index(failed)  # the other transfer did not wait for the trickle
    assert [e["sender"] for e in receiver.of("model")] == ["ok"]
    slow.proc.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    receiver.wait_for(lambda e: e["event"] == "lost" and e["peer"] == "slow", timeout=12, what="the frozen peer dropped")
    assert time.monotonic() - frozen_at < 10
    slow.kill()
    other.send({"cmd": "send", "to": "rx", "size": 1_000_000, "round": 3})
    receiver.wait_for(lambda e: e["event"] == "model" and e["round"] == 3, what="a model after the drop")


def test_tampered_and_oversized_blobs_are_dropped_and_logged_once(spawn):
    receiver = spawn("rx", "--max-model-bytes", "1500000")
    liar = spawn("liar", bootstrap=receiver.address)
    wait_all_meet([receiver, liar])
    for r in range(3):
        liar.send({"cmd": "send", "to": "rx", "size": 1_000_000, "round": r, "tamper": True})
    for r in range(3, 6):
        liar.send({"cmd": "send", "to": "rx", "size": 2_000_000, "round": r})
    liar.send({"cmd": "send", "to": "rx", "size": 1_000_000, "round": 9, "seed": 5})
    m = receiver.wait_for(lambda e: e["event"] == "model", what="the honest model")
    assert m["round"] == 9
    stats = poll_stats(receiver, lambda s: s["dropped"] >= 6, what="six drops")  # a drop may be counted after round 9 lands
    assert stats["dropped"] == 6 and stats["models_received"] == 1
    assert len(receiver.logs("reason=digest_mismatch")) == 1, receiver.logs("reason=")
    assert len(receiver.logs("reason=oversized")) == 1, receiver.logs("reason=")
    assert len(receiver.of("model")) == 1
    assert not [e for e in receiver.of("log") if e["level"] == "ERROR"]
    declined = liar.wait_for(lambda e: e["event"] == "log" and "offer-declined" in e["msg"], what="decline")
    assert "peer=rx reason=oversized" in declined["msg"]
    assert len(liar.logs("offer-declined")) == 1


def test_second_swarm_on_the_same_ports_never_meets_or_delivers(spawn):
    a = spawn("a")
    b = spawn("b", bootstrap=a.address)
    intruder = spawn("x", swarm=OTHER_SWARM, bootstrap=a.address)
    friend = spawn("y", swarm=OTHER_SWARM, bootstrap=intruder.address)
    wait_all_meet([a, b])
    wait_all_meet([intruder, friend])
    intruder.send({"cmd": "send", "to": ["a", "b"], "size": 10_000, "round": 1})
    b.send({"cmd": "send", "to": "a", "size": 10_000, "round": 1})
    a.wait_for(lambda e: e["event"] == "model", what="in-swarm model")
    assert [m["sender"] for m in a.of("model")] == ["b"]
    assert a.discovered() == {"b"} and b.discovered() == {"a"}
    assert intruder.discovered() == {"y"}
    assert intruder.ask({"cmd": "stats"}, "stats")["dropped"] == 2  # a and b are unknown to it
    foreign = a.logs("reason=other_swarm")
    assert len(foreign) == 1 and f"peer=127.0.0.1:{intruder.address[1]}" in foreign[0], a.logs("packet-refused")
