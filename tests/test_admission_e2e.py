"""A certified swarm of real daemons on loopback (issue 12 item 7): nodes get their certificates through the CLI
(`node-key`, then `admit`). What passes between the daemons (through a UDP forwarder that records it) shows no swarm
id, node id, arch hash or certificate; an observer holding the manifest and every address but no certificate hears
nothing it can read and receives nothing; an intruder that even holds the swarm key (leaked from a certificate file)
but no certificate of its own is refused at hello and receives no model bytes; daemons without a valid certificate
do not start."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from quinkgl_cli import keys
from quinkgl_cli.manifest import admission as docs
from quinkgl_cli.manifest import swarmkey
from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.transport.admission import AdmissionSettings
from quinkgl_cli.transport.ipv8.seal import DatagramSeal
from tests.test_transport_contract import Recorder

pytestmark = pytest.mark.e2e

ROUNDS = 8
INTERVAL = 0.6


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "quinkgl_cli", *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


class Forwarder:
    """A UDP forwarder on loopback that records every datagram it passes: peer-2 greets peer-1 through it, so what
    it holds is what anyone on the path sees of their traffic."""

    def __init__(self, target: int) -> None:
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # where peer-2 sends
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # what peer-1 sees peer-2 as
        for sock in (self.front, self.back):
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(0.2)
        self.port = self.front.getsockname()[1]
        self.target = ("127.0.0.1", target)
        self.client: tuple[str, int] | None = None
        self.seen: list[bytes] = []
        self.running = True
        self.threads = [threading.Thread(target=self._pump, args=(self.front, True), daemon=True),
                        threading.Thread(target=self._pump, args=(self.back, False), daemon=True)]
        for thread in self.threads:
            thread.start()

    def _pump(self, sock: socket.socket, forward: bool) -> None:
        while self.running:
            try:
                data, source = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.seen.append(data)
            if forward:
                self.client = source
                self.back.sendto(data, self.target)
            elif self.client is not None:
                self.front.sendto(data, self.client)

    def close(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(timeout=2)
        self.front.close()
        self.back.close()


def test_certified_daemons_refuse_an_intruder_and_uncertified_daemons_do_not_start(tmp_path: Path) -> None:
    manifest, creator_path, _pub, swarm_id = ls.digits_manifest(tmp_path, name="certified", membership="certified")
    home = tmp_path / "home"
    env = ls.child_env(home)
    ports = [ls.free_port(), ls.free_port()]
    wire = Forwarder(ports[0])
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    for i, name in enumerate(["peer-1", "peer-2"]):
        node_key = _cli(env, "node-key", "--node-id", name, "--manifest", str(manifest)).strip()
        cert = tmp_path / f"{name}.cert"
        _cli(env, "admit", "-m", str(manifest), "--node-key", node_key, "--node-id", name, "--sign-with", str(creator_path),
             "-o", str(cert))
        args = {"shard": str(i), "num_shards": "2", "partition": "shards:5"}
        seeds = [] if i == 0 else [wire.port]  # peer-2 knows peer-1 only through the recording forwarder
        cmd = ls.run_command(manifest, ls.DIGITS_SCRIPT, name, ports[i], ROUNDS, INTERVAL, seeds,
                             tmp_path / "ckpt" / name, args,
                             ["--min-peers", "1", "--certificate", str(cert), "--no-rendezvous"])
        procs.append((name, subprocess.Popen(cmd, stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                                             env=env), tmp_path / f"{name}.log"))
    # Daemons that must not start: no certificate, and an expired one (made as `admit` would, dated in the past).
    creator = keys.load_private_key(creator_path)
    stale_key = _cli(env, "node-key", "--node-id", "stale", "-m", str(manifest)).strip()
    expired = tmp_path / "stale.cert"
    expired.write_bytes(docs.sign(docs.Certificate(
        swarm_id=swarm_id, node_id="stale", node_key=stale_key, issued_at=datetime.now(UTC) - timedelta(days=2),
        expires_at=datetime.now(UTC) - timedelta(days=1)), creator).text())
    refused = {
        name: subprocess.Popen(ls.run_command(manifest, ls.DIGITS_SCRIPT, name, ls.free_port(), 1, INTERVAL, [],
                                              tmp_path / "ckpt" / name, {}, extra), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name, extra in (("bare", []), ("stale", ["--certificate", str(expired)]))
    }
    leaked = bytes.fromhex(json.loads((tmp_path / "peer-1.cert").read_text())["swarm_key"])
    heard = asyncio.run(_intrude(tmp_path, swarm_id, manifest, ports[0], procs, leaked))
    outcome = {name: (p.wait(timeout=120), p.communicate()[1]) for name, p in refused.items()}
    codes = []
    for _name, proc, _log in procs:
        try:
            codes.append(proc.wait(timeout=120))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(None)
    wire.close()
    logs = {name: log.read_text() for name, _p, log in procs}
    assert codes == [0, 0], {n: t[-3000:] for n, t in logs.items()}
    _nothing_in_clear(wire.seen, leaked, [swarm_id, "peer-1", "peer-2", m_arch(manifest), _pub])
    # The observer holds the manifest, not the swarm key: it read nothing, met nobody, received nothing, and the
    # daemons dropped its datagrams unread (counted, logged once per source).
    assert heard["observer"] == (0, False), heard
    assert any(f"peer=127.0.0.1:{heard['observer_port']} reason=other_swarm" in t for t in logs.values())
    for name, text in logs.items():
        assert "certificate-ok" in text, name
        assert "aggregated models" in text, name  # the certified peers did train together
        assert "peer=peer-3" not in text, name  # the intruder was never discovered, offered to or fetched from
    assert any("peer-refused" in t and "reason=certificate_missing" in t and "claims=peer-3" in t for t in logs.values())
    intruder_models, intruder_saw = heard["intruder"]
    assert intruder_saw, "the intruder reached the daemons (else nothing was tested)"
    assert intruder_models == 0
    assert outcome["bare"][0] == 4 and "admits only certified nodes" in outcome["bare"][1]
    assert outcome["stale"][0] == 4 and "has expired" in outcome["stale"][1]


def m_arch(manifest: Path) -> str:
    from quinkgl_cli.manifest.io import load_manifest

    return load_manifest(manifest).manifest.model.arch_hash


def _nothing_in_clear(seen: list[bytes], swarm_key: bytes, needles: list[str]) -> None:
    """Datagrams on the wire show none of ``needles`` (as text, or as raw bytes when hex), and no IPv8 header;
    opened with the swarm key, they do hold them (so the search could have found them)."""
    assert len(seen) >= 20, f"only {len(seen)} datagrams passed the forwarder"
    forms = [n.encode() for n in needles]
    forms += [bytes.fromhex(n.split(":")[-1]) for n in needles if n.startswith(("sha256:", "ed25519:"))]
    for data in seen:
        assert data[:2] != b"\x00\x02", "an IPv8 header in clear"
        for form in forms:
            assert form not in data, form
    opened = [DatagramSeal(swarm_key).open(d) for d in seen]
    assert all(o is not None for o in opened)  # every one was the swarm's, sealed
    assert any(b"peer-1" in o and b"peer-2" in o for o in opened if o is not None)  # a hello, its certificate inside


async def _intrude(tmp_path: Path, swarm_id: str, manifest: Path, seed_port: int,
                   procs: list[tuple[str, subprocess.Popen, Path]], leaked: bytes) -> dict:
    """Two IPv8 transports of our own, running until the daemons exit: an observer that holds the manifest (so an
    open swarm's key, see `manifest.swarmkey`) and every address but no certificate; and an intruder that also holds
    the swarm key (leaked from a certificate file) but no certificate of its own, claiming a node id."""
    from quinkgl_cli.manifest.trust import load_trusted
    from quinkgl_cli.transport.ipv8 import IPv8Transport

    trusted = load_trusted(manifest, "open")
    m = trusted.manifest
    manifest_key = swarmkey.open_swarm(trusted.canonical, m.signature)
    agents = {}
    for name, key in (("observer", manifest_key), ("intruder", leaked)):
        rec = Recorder()
        t = IPv8Transport(node_id="peer-3" if name == "intruder" else "peer-4", swarm_id=swarm_id, arch_hash=m.model.arch_hash,
                          state_dir=tmp_path / name, bootstrap=[("127.0.0.1", seed_port)], walk_interval=0.2,
                          admission=AdmissionSettings(swarm_id, m.creator_pubkey, certified=True, swarm_key=key))
        await t.start(rec)
        agents[name] = (t, rec)
    observer_port = agents["observer"][0].address[1]
    saw = {name: False for name in agents}
    try:
        deadline = time.monotonic() + 150
        while any(p.poll() is None for _n, p, _l in procs) and time.monotonic() < deadline:
            for name, (t, _rec) in agents.items():
                saw[name] = saw[name] or bool(t.peers())  # the intruder accepts the daemons' certificates
            await asyncio.sleep(0.1)
    finally:
        for t, _rec in agents.values():
            await t.stop()
    heard: dict = {name: (len(rec.models) + t.stats.models_received, saw[name]) for name, (t, rec) in agents.items()}
    heard["observer_port"] = observer_port
    return heard
