"""One hostile participant for `bench_attacks.py`: plays one numbered attack of issue 12 against real daemons.

Run as its own process (``python benchmarks/attacker.py SCENARIO --manifest M --seed-port P ...``); it uses the
project's own IPv8 transport (a member's view: same swarm id, arch hash, wire format and the swarm key the manifest
gives, see `manifest.swarmkey`) or raw sockets, on loopback
only, and prints one ``ready`` line once the attack is in place, then ``attack-stats k=v ...`` when it stops (on
SIGTERM or after ``--duration`` seconds).

Scenarios (issue 12's numbering):
- ``poison`` (1): every half second, one update to every peer whose every value is 1e30 (finite, right shapes).
- ``round-claim`` (2): three fresh keys forward a copy of an honest model claiming round 1,000,000.
- ``offer-flood`` (3): one member floods signed offers whose fetches hit its own server, which trickles a byte
  every 8 s.
- ``idle-tcp`` (4): no key at all: 20 idle TCP connections to every peer's model port, reopened when closed.
- ``slow-serve`` (5): one member offers real-sized models each second and serves them at 1 byte per 8 s.
- ``hello-flood`` (6): 300 fresh keys say hello (the peer table holds 256); the benchmark starts a late honest peer
  once they are in.
- ``round-zero`` (9): five identities taking turns, each sending one copied update claiming round 0.
- ``observer`` (7): the benchmark runs a certified swarm; a node that holds the manifest and knows every peer's
  address, but holds no certificate (so not the swarm key: its datagrams are sealed with the key the manifest
  alone gives), says hello and offers models the whole run.
- ``squatter`` (8): fresh keys claim the honest peers' node ids (peer-2, peer-3) and offer models under them
  (copies of honest ones), from the start (before the owners may have arrived); ``squatter-live``: the same once the
  owners are up and met.
- ``junk`` (not in issue 12's list): one member offers the untrained initial model (finite, right shapes, inside the
  poison bounds) every second: what a member that contributes nothing costs, apart from any id it claims.
- ``boost`` (not in issue 12's list): one member offers the newest honest model it heard with every weight x100,
  every second: the honest direction (no direction check refuses it) at the wrong size (the norm cap's case).
- ``pace-stretch`` (not in issue 12's list): ten fresh keys offering the untrained model twice a second, each
  under the round before the newest honest one it heard (in step, so pacing knows its round period), until its
  turn comes, one key per honest round: from then on it stays at the round it had reached, ever further behind, a
  "lagging partner" that never catches up.
- ``rejoin-flood`` (not in issue 12's list): one member key saying hello to every peer 50 times a second, each
  time under a new session, every other time under a new node id too, so that each hello would lose its old entry
  and meet a new one.
- ``stale-copy`` (not in issue 12's list): one member offering, each second, an honest model it heard six or more
  rounds earlier, claiming the current round, re-encoded with a meta of its own (so its bytes, and their digest,
  are no honest update's: the copy screen compares digests).
- ``drift`` (not in issue 12's list): one member offering, each second, the newest honest model it heard moved
  by one fixed random direction of 0.9 of that model's norm: inside the distance clip (one model norm), the same way
  every round, so that what it pulls adds up.
``attack-stats`` counts the honest models the attacker's identities received (``models``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from quinkgl_cli import wire
from quinkgl_cli.manifest import swarmkey
from quinkgl_cli.manifest.trust import load_trusted
from quinkgl_cli.node.script import load_script
from quinkgl_cli.tensors import shared_specs
from quinkgl_cli.transport.admission import AdmissionSettings
from quinkgl_cli.transport.base import ModelReceived, OutgoingUpdate, PeerInfo
from quinkgl_cli.transport.ipv8 import IPv8Transport, stream
from quinkgl_cli.transport.ipv8.payloads import HelloPayload, OfferPayload

SCENARIOS = ("poison", "round-claim", "offer-flood", "idle-tcp", "slow-serve", "hello-flood", "round-zero", "observer",
             "squatter", "squatter-live", "junk", "boost", "pace-stretch", "rejoin-flood", "stale-copy", "drift")


class Listener:
    """What a hostile member hears: the honest models (to copy) and who is around."""

    def __init__(self) -> None:
        self.latest: ModelReceived | None = None
        self.max_round = 0
        self.peers: set[str] = set()

    def on_peer_discovered(self, peer: PeerInfo) -> None:
        self.peers.add(peer.node_id)

    def on_peer_lost(self, peer: PeerInfo) -> None:
        self.peers.discard(peer.node_id)

    def on_model(self, update: ModelReceived) -> None:
        self.latest = update
        self.max_round = max(self.max_round, update.round)

    def on_message(self, sender: str, kind: str, body: dict[str, Any]) -> None:
        pass


class Attack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        trusted = load_trusted(Path(args.manifest), "open", [], state_dir=Path(args.workdir) / "verify")
        self.swarm_id = trusted.swarm_id
        self.arch_hash = trusted.manifest.model.arch_hash
        # What holding the manifest gives: an open swarm's key (a certified swarm's comes with a certificate only).
        self.swarm_key = swarmkey.open_swarm(trusted.canonical, trusted.manifest.signature if trusted.signed else None)
        model = load_script(Path(args.script)).build_model(trusted.manifest)
        self.specs = shared_specs(model)
        self.state = {s.name: model.state_dict()[s.name] for s in self.specs}
        self.seeds = [("127.0.0.1", p) for p in args.seed_port]
        self.transports: list[IPv8Transport] = []
        self.listeners: list[Listener] = []
        self.stats: dict[str, int] = {"sent": 0, "connections": 0, "identities": 0}

    async def member(self, name: str, **options: Any) -> tuple[IPv8Transport, Listener]:
        options.setdefault("admission", AdmissionSettings(self.swarm_id, None, swarm_key=self.swarm_key))
        t = IPv8Transport(node_id=name, swarm_id=self.swarm_id, arch_hash=self.arch_hash,
                          state_dir=Path(self.args.workdir) / name, bootstrap=self.seeds, walk_interval=0.5, **options)
        listener = Listener()
        await t.start(listener)
        self.transports.append(t)
        self.listeners.append(listener)
        self.stats["identities"] += 1
        return t, listener

    async def wait_for_peers(self, listener: Listener, count: int) -> None:
        while len(listener.peers) < count:
            await asyncio.sleep(0.1)

    def payload(self, value: float | None) -> bytes:
        tensors = {n: torch.full_like(t, value) if value is not None else t for n, t in self.state.items()}
        return wire.encode(tensors, meta={"step": 0})

    def send(self, t: IPv8Transport, peers: set[str], update: OutgoingUpdate) -> None:
        for peer in sorted(peers):
            t.send_model(peer, update)
            self.stats["sent"] += 1

    async def stop(self) -> None:
        self.stats["models"] = sum(t.stats.models_received for t in self.transports)
        for t in self.transports:
            await t.stop()

    # -- the scenarios -------------------------------------------------------------------------------------------
    async def poison(self, ready: asyncio.Event) -> None:
        t, heard = await self.member("mallory")
        await self.wait_for_peers(heard, len(self.seeds))
        ready.set()
        blob = self.payload(1e30)
        while True:
            self.send(t, heard.peers, OutgoingUpdate(round=max(heard.max_round, 1), payload=blob, sample_count=1000))
            await asyncio.sleep(0.5)

    async def round_claim(self, ready: asyncio.Event) -> None:
        members = [await self.member(f"claim-{i}") for i in range(3)]
        for _, heard in members:
            await self.wait_for_peers(heard, len(self.seeds))
        ready.set()
        while True:
            copied = next((h.latest for _, h in members if h.latest is not None), None)
            blob = bytes(copied.payload) if copied is not None else self.payload(None)
            for t, heard in members:
                self.send(t, heard.peers, OutgoingUpdate(round=1_000_000, payload=blob, sample_count=100))
            await asyncio.sleep(1.0)

    async def _trickle_server(self) -> int:
        """A TCP server that answers every request with a byte every 8 s: what the flooded offers point at."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.stats["connections"] += 1
            try:
                while True:
                    writer.write(b"\x00")
                    await writer.drain()
                    await asyncio.sleep(8.0)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return int(server.sockets[0].getsockname()[1])

    async def offer_flood(self, ready: asyncio.Event) -> None:
        t, heard = await self.member("flooder")
        await self.wait_for_peers(heard, len(self.seeds))
        port = await self._trickle_server()
        ready.set()
        parts = t.parts
        assert parts is not None
        while True:
            for peer in list(t.peers()):
                mid = hashlib.sha1(bytes.fromhex(peer.public_key)).digest()
                for _ in range(50):
                    parts.courier.send(peer.address, OfferPayload(
                        t.swarm_id, *parts.courier.stamp(), os.urandom(stream.OFFER_ID_BYTES), 1, t.node_id,
                        peer.node_id, mid, 1000, os.urandom(32), "qgl-tensors/1", 1, b"{}", port))
                    self.stats["sent"] += 1
            await asyncio.sleep(0.05)

    async def idle_tcp(self, ready: asyncio.Event) -> None:
        async def hold(port: int) -> None:
            while True:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.2)
                    continue
                self.stats["connections"] += 1
                try:
                    await reader.read()  # until the peer closes it
                finally:
                    writer.close()

        tasks = [asyncio.create_task(hold(p)) for _, p in self.seeds for _ in range(20)]
        while self.stats["connections"] < len(tasks):
            await asyncio.sleep(0.05)
        ready.set()
        await asyncio.gather(*tasks)

    async def slow_serve(self, ready: asyncio.Event) -> None:
        t, heard = await self.member("slowpoke")
        await self.wait_for_peers(heard, len(self.seeds))
        parts = t.parts
        assert parts is not None

        async def trickle(loop: asyncio.AbstractEventLoop, conn: socket.socket, out: Any, sealer: Any) -> None:
            await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.OK, out.size))
            sealed = b"".join(sealer.frames(out.payload))
            for i in range(len(sealed)):
                await loop.sock_sendall(conn, sealed[i:i + 1])
                await asyncio.sleep(8.0)

        parts.server._send = trickle  # type: ignore[method-assign]
        ready.set()
        blob = self.payload(None)
        while True:
            self.send(t, heard.peers, OutgoingUpdate(round=max(heard.max_round, 1), payload=blob, sample_count=100))
            await asyncio.sleep(1.0)

    async def hello_flood(self, ready: asyncio.Event) -> None:
        batch = 30  # started together: one at a time, 300 take longer than the honest run lasts
        for first in range(0, self.args.identities, batch):
            await asyncio.gather(*(self.member(f"sybil-{i}", heartbeat_interval=5.0)
                                   for i in range(first, min(first + batch, self.args.identities))))
        ready.set()
        await asyncio.Event().wait()

    async def round_zero(self, ready: asyncio.Event) -> None:
        members = [await self.member(f"turn-{i}") for i in range(5)]
        for _, heard in members:
            await self.wait_for_peers(heard, len(self.seeds))
        ready.set()
        turn = 0
        while True:
            t, heard = members[turn % len(members)]
            copied = next((h.latest for _, h in members if h.latest is not None), None)
            blob = bytes(copied.payload) if copied is not None else self.payload(None)
            self.send(t, heard.peers, OutgoingUpdate(round=0, payload=blob, sample_count=100))
            turn += 1
            await asyncio.sleep(1.0)


    async def observer(self, ready: asyncio.Event) -> None:
        await self._impostors(["peer-4"], ready)

    async def squatter(self, ready: asyncio.Event) -> None:
        await self._impostors(["peer-2", "peer-3"], ready)

    async def squatter_live(self, ready: asyncio.Event) -> None:
        # The ids of live peers: claimed once the honest peers are up and have met (a scout, an identity of its
        # own, sees them), not before they exist as in ``squatter`` (an open swarm's first-come rule, see README).
        scout, heard = await self.member("scout")
        await self.wait_for_peers(heard, len(self.seeds))
        await asyncio.sleep(3.0)
        self.transports.remove(scout)  # gone before the attack: it neither counts nor stays a peer
        await scout.stop()
        await self._impostors(["peer-2", "peer-3"], ready)

    async def _impostors(self, names: list[str], ready: asyncio.Event) -> None:
        """Identities that say hello under ``names`` and offer a model to whoever they know each second (refused
        peers know nobody: then the offer goes nowhere, which is the point). What they offer is the newest honest
        model they heard (the initial one until then): an impostor's aim is the id and the models it brings, and
        what a member's junk updates cost is measured on its own (``junk``)."""
        members = [await self.member(name) for name in names]
        await asyncio.sleep(3.0)  # several hellos each way: refused by then, or in
        ready.set()
        initial = self.payload(None)
        while True:
            copied = next((h.latest for _, h in members if h.latest is not None), None)
            blob = bytes(copied.payload) if copied is not None else initial
            for t, heard in members:
                self.send(t, heard.peers, OutgoingUpdate(round=max(heard.max_round, 1), payload=blob, sample_count=100))
            await asyncio.sleep(1.0)

    async def junk(self, ready: asyncio.Event) -> None:
        t, heard = await self.member("junk")
        await self.wait_for_peers(heard, len(self.seeds))
        ready.set()
        blob = self.payload(None)
        while True:
            self.send(t, heard.peers, OutgoingUpdate(round=max(heard.max_round, 1), payload=blob, sample_count=100))
            await asyncio.sleep(1.0)


    async def boost(self, ready: asyncio.Event) -> None:
        t, heard = await self.member("booster")
        await self.wait_for_peers(heard, len(self.seeds))
        ready.set()
        while True:
            if heard.latest is not None:
                tensors, meta = wire.decode(bytes(heard.latest.payload))
                boosted = {n: v * 100.0 if v.is_floating_point() else v for n, v in tensors.items()}
                blob = wire.encode(boosted, meta=meta)
                self.send(t, heard.peers, OutgoingUpdate(round=max(heard.max_round, 1), payload=blob, sample_count=100))
            await asyncio.sleep(1.0)


    async def pace_stretch(self, ready: asyncio.Event) -> None:
        members = [await self.member(f"laggard-{i}") for i in range(10)]
        for _, heard in members:
            await self.wait_for_peers(heard, len(self.seeds))
        ready.set()
        blob = self.payload(None)
        frozen: dict[int, int] = {}
        start = 0
        while True:
            newest = max(heard.max_round for _, heard in members)
            start = start or newest
            for i, (t, heard) in enumerate(members):
                in_step = max(newest - 1, 1)
                claim = frozen.setdefault(i, in_step) if start and newest >= start + 1 + i else in_step
                self.send(t, heard.peers, OutgoingUpdate(round=claim, payload=blob, sample_count=100))
            await asyncio.sleep(0.5)


    async def rejoin_flood(self, ready: asyncio.Event) -> None:
        t, heard = await self.member("flapper")
        await self.wait_for_peers(heard, len(self.seeds))
        ready.set()
        parts = t.parts
        assert parts is not None
        s, courier = parts.membership.settings, parts.courier
        sent = 0
        while True:
            session, counter = courier.stamp()
            renamed = sent % 2 == 0
            hello = HelloPayload(s.swarm_id, f"flapper-{sent}" if renamed else "flapper", s.arch_hash,
                                 s.protocol_version, session + sent, counter,
                                 parts.membership.tcp_port, False, b"")
            for address in self.seeds:
                courier.send(address, hello)
                self.stats["sent"] += 1
            sent += 1
            await asyncio.sleep(0.02)


    async def stale_copy(self, ready: asyncio.Event) -> None:
        t, heard = await self.member("stale")
        await self.wait_for_peers(heard, len(self.seeds))
        ready.set()
        history: dict[int, bytes] = {}
        while True:
            if heard.latest is not None:
                history.setdefault(heard.latest.round, bytes(heard.latest.payload))
            old = [r for r in history if r <= heard.max_round - 6]
            if old:
                tensors, meta = wire.decode(history[max(old)])
                blob = wire.encode(tensors, meta={**meta, "step": 0, "nonce": self.stats["sent"]})
                self.send(t, heard.peers, OutgoingUpdate(round=max(heard.max_round, 1), payload=blob, sample_count=100))
            await asyncio.sleep(1.0)


    async def drift(self, ready: asyncio.Event) -> None:
        t, heard = await self.member("drifter")
        await self.wait_for_peers(heard, len(self.seeds))
        ready.set()
        direction: dict[str, torch.Tensor] = {}
        while True:
            if heard.latest is not None:
                tensors, meta = wire.decode(bytes(heard.latest.payload))
                floats = {n: v for n, v in tensors.items() if v.is_floating_point()}
                if not direction:
                    gen = torch.Generator().manual_seed(7)
                    direction = {n: torch.randn(v.shape, generator=gen) for n, v in floats.items()}
                    scale = 1.0 / float(torch.sqrt(sum((d * d).sum() for d in direction.values())))
                    direction = {n: d * scale for n, d in direction.items()}
                norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in floats.values())))
                moved = {n: v + 0.9 * norm * direction[n] if n in direction else v for n, v in tensors.items()}
                blob = wire.encode(moved, meta={**meta, "step": 0, "nonce": self.stats["sent"]})
                self.send(t, heard.peers, OutgoingUpdate(round=max(heard.max_round, 1), payload=blob, sample_count=100))
            await asyncio.sleep(1.0)


async def main(args: argparse.Namespace) -> None:
    attack = Attack(args)
    ready = asyncio.Event()
    play = asyncio.create_task(getattr(attack, args.scenario.replace("-", "_"))(ready))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([waiter, play], return_when=asyncio.FIRST_COMPLETED)
    if play.done():
        play.result()  # the attack failed before it was in place: say why
    print("ready", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), args.duration)
    except TimeoutError:
        pass
    play.cancel()
    await asyncio.gather(play, return_exceptions=True)
    await attack.stop()
    print("attack-stats " + " ".join(f"{k}={v}" for k, v in attack.stats.items()), flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--manifest", required=True)
    p.add_argument("--script", required=True)
    p.add_argument("--seed-port", type=int, action="append", required=True)
    p.add_argument("--workdir", default=None)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--identities", type=int, default=300)
    args = p.parse_args(argv)
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="qgl-attacker-")
    return args


if __name__ == "__main__":
    torch.set_num_threads(1)
    asyncio.run(main(parse(sys.argv[1:])))
