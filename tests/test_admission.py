"""Admission (issue 12 items 7 and 8): certificates, revocation lists, node-id ownership.

Documents are checked as data here; the swarm tests run real IPv8 transports on loopback in one process (the
real daemons are in test_admission_e2e.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from quinkgl_cli import keys
from quinkgl_cli.errors import CryptoError, IOFailure, TrustError, UsageError
from quinkgl_cli.manifest import admission as docs
from quinkgl_cli.manifest import swarmkey
from quinkgl_cli.manifest.io import load_manifest
from quinkgl_cli.manifest.trust import load_trusted
from quinkgl_cli.node.admission import prepare_admission
from quinkgl_cli.transport.admission import AdmissionSettings
from quinkgl_cli.transport.ipv8.identity import swarm_identity
from quinkgl_cli.transport.ipv8.settings import Limits
from tests.helpers_manifest import make_manifest, write, write_obj
from tests.test_transport_contract import Cluster, Recorder, _upd, run_cluster, wait_until

SWARM = "sha256:" + "ab" * 32  # the contract tests' cluster swarm
NOW = datetime.now(UTC).replace(microsecond=0)


def _cert(creator, node_key_hex: str, node_id: str, swarm: str = SWARM, expires: datetime | None = None,
          issued: datetime | None = None) -> docs.Signed:
    return docs.sign(docs.Certificate(swarm_id=swarm, node_id=node_id, node_key=node_key_hex, issued_at=issued or NOW,
                                      expires_at=expires), creator)


def _revocations(creator, node_keys: list[str], version: int, swarm: str = SWARM) -> docs.Signed:
    return docs.sign(docs.RevocationList(swarm_id=swarm, version=version, issued_at=NOW,
                                         revoked=tuple(docs.fingerprint(k) for k in node_keys)), creator)


def _node_key(state_dir: Path, swarm: str = SWARM) -> str:
    """The transport key a node with this state directory has in ``swarm``."""
    return swarm_identity(state_dir, swarm).pub().key_to_bin().hex()


# -- manifest and documents -------------------------------------------------------------------------------------------
def test_membership_round_trips_and_old_manifests_stay_open(tmp_path):
    creator = keys.generate()
    path = write(tmp_path / "c.qgl", make_manifest("certed", key=creator, membership="certified"))
    loaded = load_manifest(path)
    assert loaded.manifest.membership == "certified" and loaded.raw["membership"] == "certified"
    trusted = load_trusted(path, "open")
    assert trusted.swarm_id == loaded.swarm_id
    # A manifest written before the field existed: open, and its swarm id (over the file as written) unchanged.
    raw = dict(load_manifest(write(tmp_path / "o.qgl", make_manifest("old"))).raw)
    del raw["membership"]
    old = load_manifest(write_obj(tmp_path / "old.qgl", raw))
    assert old.manifest.membership == "open" and "membership" not in old.raw


def test_a_certified_manifest_must_be_signed(tmp_path):
    path = write(tmp_path / "u.qgl", make_manifest("unsigned", membership="certified"))
    with pytest.raises(TrustError, match="certified swarm but is unsigned"):
        load_trusted(path, "open")
    with pytest.raises(UsageError, match="--membership 'closed' is not open or certified"):
        make_manifest("x", membership="closed")


def test_certificate_checks_name_each_problem(tmp_path):
    creator, other = keys.generate(), keys.generate()
    creator_pub = keys.public_key_text(creator)
    key = _node_key(tmp_path / "n")
    other_key = _node_key(tmp_path / "m")
    swarm_b = "sha256:" + "ef" * 32

    def problem(signed, node_key=key, node_id="n", revoked=frozenset(), now=NOW):
        again = docs.parse(signed.text(), docs.Certificate, "cert")  # through its file form, as peers receive it
        return docs.certificate_problem(again, swarm_id=SWARM, creator_pubkey=creator_pub, node_key=node_key,
                                        node_id=node_id, now=now, revoked=revoked)

    good = _cert(creator, key, "n", expires=NOW + timedelta(days=1))
    assert problem(good) is None
    assert problem(_cert(creator, key, "n", swarm=swarm_b)) == "wrong_swarm"
    assert problem(_cert(other, key, "n")) == "wrong_creator"
    assert problem(good, node_key=other_key) == "wrong_key"
    assert problem(good, node_id="m") == "wrong_node_id"
    assert problem(good, now=NOW + timedelta(days=2)) == "expired"
    assert problem(_cert(creator, key, "n", issued=NOW + timedelta(days=1))) == "not_yet_valid"
    assert problem(good, revoked=frozenset({docs.fingerprint(key)})) == "revoked"
    tampered = dict(good.raw, node_id="m")
    assert problem(docs.Signed(good.document, tampered, docs.canonical_bytes(tampered)), node_id="m") == "bad_signature"
    forged = dict(good.raw, creator_pubkey=keys.public_key_text(other))  # claims the creator, signed by another key
    forged_signed = docs.parse(docs.Signed(good.document, forged, b"").text(), docs.Certificate, "cert")
    assert docs.certificate_problem(forged_signed, swarm_id=SWARM, creator_pubkey=keys.public_key_text(other),
                                    node_key=key, node_id="n", now=NOW) == "bad_signature"
    # One kind never passes for another.
    with pytest.raises(UsageError, match="field kind"):
        docs.parse(_revocations(creator, [key], 1).text(), docs.Certificate, "cert")


def test_node_refuses_to_start_without_a_valid_certificate(tmp_path):
    creator = keys.generate()
    path = write(tmp_path / "c.qgl", make_manifest("certed", key=creator, membership="certified"))
    trusted = load_trusted(path, "open")
    state = tmp_path / "state"
    key = _node_key(state, trusted.swarm_id)

    def start(cert: Path | None, node_id: str = "n", revocations: Path | None = None):
        return prepare_admission(trusted, node_id, state, cert, revocations)

    with pytest.raises(TrustError, match="admits only certified nodes") as err:
        start(None)
    assert err.value.code == 4 and "quinkgl node-key --node-id n --manifest" in err.value.one_line()
    good = tmp_path / "good.cert"
    swarm_key = swarmkey.certified(creator, trusted.swarm_id)
    good.write_bytes(docs.certificate_file(_cert(creator, key, "n", swarm=trusted.swarm_id), swarm_key))
    settings = start(good)
    assert settings.certified and settings.certificate and settings.creator_pubkey == keys.public_key_text(creator)
    assert settings.swarm_key == swarm_key and swarm_key.hex().encode() not in settings.certificate
    # A dry run (create_key=False) writes nothing: a node without a key yet is told to make one, none is made.
    fresh = tmp_path / "fresh"
    with pytest.raises(IOFailure, match="no transport key yet"):
        prepare_admission(trusted, "n", fresh, good, None, create_key=False)
    assert not fresh.exists()
    keyless = tmp_path / "keyless.cert"  # made before `admit` issued swarm keys
    keyless.write_bytes(_cert(creator, key, "n", swarm=trusted.swarm_id).text())
    with pytest.raises(TrustError, match="holds no swarm key") as err:
        start(keyless)
    assert err.value.code == 4
    for name, doc, code, words in [
        ("expired", _cert(creator, key, "n", swarm=trusted.swarm_id, issued=NOW - timedelta(days=2),
                          expires=NOW - timedelta(days=1)), 4, "expired"),
        ("wrong-swarm", _cert(creator, key, "n"), 4, "another swarm"),
        ("stranger", _cert(keys.generate(), key, "n", swarm=trusted.swarm_id), 4, "another key than the manifest's creator"),
    ]:
        p = tmp_path / f"{name}.cert"
        p.write_bytes(doc.text())
        with pytest.raises((TrustError, CryptoError), match=words) as err:
            start(p)
        assert err.value.code == code, name
    with pytest.raises(TrustError, match="another --node-id"):
        start(good, node_id="m")
    tampered = tmp_path / "tampered.cert"
    tampered.write_bytes(good.read_bytes().replace(b'"node_id":"n"', b'"node_id":"m"'))
    with pytest.raises(CryptoError, match="signature is not valid"):
        start(tampered, node_id="m")
    revoked = tmp_path / "rev.json"
    revoked.write_bytes(_revocations(creator, [key], 1, swarm=trusted.swarm_id).text())
    with pytest.raises(TrustError, match="revoked this node's key"):
        start(good, revocations=revoked)


# -- a certified swarm on loopback ----------------------------------------------------------------------------------
class Swarm:
    """Certified IPv8 transports of one swarm: certificates issued by ``creator`` for each node's own key."""

    def __init__(self, cluster: Cluster, tmp_path: Path) -> None:
        self.c = cluster
        self.tmp = tmp_path
        self.creator = keys.generate()
        self.pub = keys.public_key_text(self.creator)
        self.watch = tmp_path / "revocations.json"

    def settings(self, name: str, cert: docs.Signed | None | str = "valid", watch: bool = False) -> AdmissionSettings:
        key = _node_key(self.tmp / name)
        if cert == "valid":
            cert = _cert(self.creator, key, name)
        text = cert.text() if isinstance(cert, docs.Signed) else b""
        return AdmissionSettings(SWARM, self.pub, certified=True, certificate=text, store=self.tmp / name / "rev.json",
                                 watch=self.watch if watch else None)

    async def add(self, name: str, cert: docs.Signed | None | str = "valid", watch: bool = False, **kw):
        return await self.c.add(name, admission=self.settings(name, cert, watch), **kw)


def _refusals(caplog, reason: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("peer-refused") and f"reason={reason}" in r.getMessage()]


def test_a_certified_swarm_refuses_every_node_without_a_valid_certificate(tmp_path, caplog):
    """Issue 12 item 7: an observer that knows the swarm's address joins nothing and receives no model."""

    async def body(c: Cluster):
        s = Swarm(c, tmp_path)
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            a, _ = await s.add("a")
            b, rb = await s.add("b")
            await c.meet(["a", "b"])
            intruders = {
                "none": None,
                "expired": _cert(s.creator, _node_key(tmp_path / "expired"), "expired", issued=NOW - timedelta(days=2),
                                 expires=NOW - timedelta(days=1)),
                "elsewhere": _cert(s.creator, _node_key(tmp_path / "elsewhere"), "elsewhere", swarm="sha256:" + "ef" * 32),
                "borrowed": _cert(s.creator, _node_key(tmp_path / "a"), "borrowed"),  # a's certificate terms, not its key
                "forged": _cert(keys.generate(), _node_key(tmp_path / "forged"), "forged"),
            }
            recorders = {}
            for name, cert in intruders.items():
                _, recorders[name] = await s.add(name, cert=cert)
            await wait_until(lambda: len({r.getMessage().split("reason=")[1].split()[0] for r in
                                          caplog.records if r.getMessage().startswith("peer-refused")}) >= 5,
                             what="every intruder refused")
            for _ in range(3):
                a.send_model("b", _upd(round_=1, payload=b"weights" * 100))
                await wait_until(lambda: rb.models, what="b's model")
                for name in intruders:
                    a.send_model(name, _upd(round_=1))  # refused at send: an intruder is never a peer
            await asyncio.sleep(1.0)  # heartbeats go round: refusals stay refusals
        assert {p.node_id for p in a.peers()} == {"b"} and {p.node_id for p in b.peers()} == {"a"}
        assert all(not r.models for r in recorders.values())
        reasons = {"certificate_missing", "certificate_expired", "certificate_wrong_swarm", "certificate_wrong_key",
                   "certificate_wrong_creator"}
        for reason in reasons:
            lines = [r for r in _refusals(caplog, reason) if getattr(r, "node", None) == "a"]
            assert len(lines) >= 1, reason
        # Logged once per key and reason, however many hellos it sent.
        seen = [(getattr(r, "node", None), r.qgl_fields["peer"], r.qgl_fields["reason"]) for r in caplog.records
                if r.getMessage().startswith("peer-refused") and r.levelno == logging.WARNING]
        assert len(seen) == len(set(seen))

    run_cluster("ipv8", tmp_path, body)


def test_a_revocation_spreads_and_drops_the_revoked_peer_within_seconds(tmp_path, caplog):
    async def body(c: Cluster):
        s = Swarm(c, tmp_path)
        a, _ = await s.add("a", watch=True)  # the operator's node: it reads the file
        b, rb = await s.add("b")
        m, rm = await s.add("m")
        await c.meet(["a", "b", "m"])
        m_key = _node_key(tmp_path / "m")
        with caplog.at_level(logging.INFO, logger="quinkgl.transport"):
            s.watch.write_bytes(_revocations(s.creator, [m_key], 1).text())
            await wait_until(lambda: all("m" not in {p.node_id for p in t.peers()} for t in (a, b)), timeout=8,
                             what="the revoked peer dropped everywhere")
            assert b.admission.version == 1  # b heard it from a, by gossip
            b.send_model("m", _upd(round_=2))
            await asyncio.sleep(1.5)  # m keeps sending hellos: they are refused now
        assert {p.node_id for p in b.peers()} == {"a"} and not rm.models
        assert _refusals(caplog, "certificate_revoked")
        # The list survives a restart of the node that adopted it.
        stored = docs.parse((tmp_path / "b" / "rev.json").read_bytes(), docs.RevocationList, "stored")
        assert stored.document.version == 1
        # An older or forged list changes nothing.
        assert b.admission.consider(_revocations(s.creator, [], 1).text(), "x") == "known"
        assert b.admission.consider(_revocations(keys.generate(), [], 9).text(), "x") == "wrong_creator"
        assert b.admission.version == 1
        a.send_model("b", _upd(round_=3))
        await wait_until(lambda: rb.models, what="the honest peers carry on")

    run_cluster("ipv8", tmp_path, body)


def test_the_revocation_list_goes_only_to_trusted_peers(tmp_path):
    """A list is tens of KB (38 KB for 512 keys) and every newly met peer was sent it at once, at the address its
    hello came from: 100 hellos from fresh keys with a forged source address (a raw socket, against a real daemon)
    drew 4.2 MB to that address, 106 times what they cost. A peer is sent the list once it is trusted (here: once it
    delivered a model, over a connection the node opened to it)."""
    creator = keys.generate()
    pub = keys.public_key_text(creator)
    listed = _revocations(creator, [os.urandom(74).hex() for _ in range(512)], 1)

    async def body(c: Cluster):
        a, _ = await c.add("a", admission=AdmissionSettings(SWARM, pub, revocations=listed))
        m, _ = await c.add("m", admission=AdmissionSettings(SWARM, pub))  # a fresh key, met through a's address
        await c.meet(["a", "m"])
        await asyncio.sleep(1.5)  # hellos and heartbeats both ways, several ticks of a's gossip
        assert m.admission.version == 0
        m.send_model("a", _upd(round_=1))  # a fetches it: m's address is proven
        await wait_until(lambda: m.admission.version == 1, what="the list sent once m is trusted")

    run_cluster("ipv8", tmp_path, body)


# -- node ids name keys: a key that claims another's id gains nothing (issue 12 item 8) ------------------------------
def _squat_cluster(tmp_path, hold: float):
    """A seed transport's factory for two more keys claiming one node id, in an open swarm."""
    from quinkgl_cli.transport.ipv8 import IPv8Transport

    seeds: list[tuple[str, int]] = []

    def make(name: str, state: str) -> IPv8Transport:
        return IPv8Transport(node_id=name, swarm_id=SWARM, arch_hash="sha256:" + "cd" * 32, state_dir=tmp_path / state,
                             bootstrap=[seeds[0]], walk_interval=0.2, silence_timeout=3.0, limits=Limits(id_hold=hold))

    return seeds, make


def _key(t) -> bytes:
    return t.parts.key.pub().key_to_bin()


def _name_of(t, key: bytes) -> str | None:
    rec = t.parts.table.by_key(key)
    return rec.node_id if rec is not None else None


def test_a_squatter_that_comes_first_does_not_keep_the_owner_out(tmp_path):
    """A fresh key claims peer-2 before peer-2 arrives: the real peer-2 is met anyway (under an alias: the squatter
    came first), models sent to it reach it and not the squatter, and its own models arrive as its own."""
    seeds, make = _squat_cluster(tmp_path, hold=120.0)

    async def body(c: Cluster):
        a, ra = await c.add("peer-1")
        seeds.append(a.address)
        squatter, owner = make("peer-2", "squatter"), make("peer-2", "owner")
        rs, ro = Recorder(), Recorder()
        try:
            await squatter.start(rs)
            await wait_until(lambda: a.knows("peer-2"), what="the squatter in first")
            await owner.start(ro)
            await wait_until(lambda: _name_of(a, _key(owner)) is not None, what="the owner met too")
            name = _name_of(a, _key(owner))
            assert name == f"peer-2~{_key(owner).hex()[-16:]}" and _name_of(a, _key(squatter)) == "peer-2"
            assert {p.node_id for p in a.peers()} == {"peer-2", name}
            a.send_model(name, _upd(round_=1, payload=b"owner" * 20))
            await wait_until(lambda: ro.models, what="the owner's model")
            assert ro.models[0].payload == b"owner" * 20 and ro.models[0].sender == "peer-1"
            owner.send_model("peer-1", _upd(round_=1, payload=b"from owner" * 10))
            a.send_message(name, "hi", {"to": "owner"})
            await wait_until(lambda: ra.models and ro.messages, what="the owner's update and our message")
            assert ra.models[0].sender == name and ra.models[0].payload == b"from owner" * 10
            assert ro.messages == [("peer-1", "hi", {"to": "owner"})]
            await asyncio.sleep(0.5)
            assert not rs.models and not rs.messages
        finally:
            await squatter.stop()
            await owner.stop()

    run_cluster("ipv8", tmp_path, body)


def test_a_squatter_after_the_owner_lives_under_an_alias_and_the_owner_keeps_its_id(tmp_path):
    """The owner first: a fresh key claiming its id is told apart (an alias), while the owner is alive and while it
    restarts; the owner comes back under its own id and key; models go to whom they are addressed."""
    seeds, make = _squat_cluster(tmp_path, hold=3.0)

    async def body(c: Cluster):
        a, ra = await c.add("peer-1", limits=Limits(id_hold=3.0))
        seeds.append(a.address)
        owner, squatter = make("peer-2", "owner"), make("peer-2", "squatter")
        rs, ro = Recorder(), Recorder()
        try:
            await owner.start(ro)
            await wait_until(lambda: a.knows("peer-2"), what="peer-2 known")
            await squatter.start(rs)
            alias = f"peer-2~{_key(squatter).hex()[-16:]}"
            await wait_until(lambda: a.knows(alias), what="the squatter under its alias")
            a.send_model("peer-2", _upd(round_=1))
            await wait_until(lambda: ro.models, what="the owner's model")
            await owner.stop()  # a goodbye: peer-2 is lost at once, its id held for its key
            await wait_until(lambda: not a.knows("peer-2"), what="peer-2 gone")
            await asyncio.sleep(1.0)  # the squatter greets again meanwhile: it keeps its alias
            assert not a.knows("peer-2") and a.knows(alias)
            back = make("peer-2", "owner")  # the same key, a new session
            await back.start(Recorder())
            await wait_until(lambda: a.knows("peer-2"), what="the owner back")
            assert a.parts.table.get("peer-2").key_bin == _key(back)
            await back.stop()
        finally:
            await squatter.stop()
        assert not rs.models  # the model offered to peer-2 went to its owner only

    run_cluster("ipv8", tmp_path, body)


def test_a_certified_swarm_still_refuses_a_second_key_for_one_id(tmp_path, caplog):
    """Certificates bind an id to one key: two certified keys for one id (a re-keyed node) are not both admitted."""
    from quinkgl_cli.transport.ipv8 import IPv8Transport

    async def body(c: Cluster):
        s = Swarm(c, tmp_path)
        a, _ = await s.add("a")
        b, _ = await s.add("b")
        await c.meet(["a", "b"])
        cert = _cert(s.creator, _node_key(tmp_path / "b2"), "b")
        b2 = IPv8Transport(node_id="b", swarm_id=SWARM, arch_hash="sha256:" + "cd" * 32, state_dir=tmp_path / "b2",
                           bootstrap=[a.address], walk_interval=0.2,
                           admission=AdmissionSettings(SWARM, s.pub, certified=True, certificate=cert.text()))
        try:
            with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
                await b2.start(Recorder())
                await wait_until(lambda: _refusals(caplog, "node_id_taken"), what="the second key refused")
            assert [p.node_id for p in a.peers()] == ["b"] and a.parts.table.get("b").key_bin == _key(b)
        finally:
            await b2.stop()

    run_cluster("ipv8", tmp_path, body)


def test_the_memory_twin_refuses_uncertified_peers_the_same_way(tmp_path, caplog):
    """A certified swarm on the in-memory transport (the simulator's): the same `Admission` decides at hello."""
    from quinkgl_cli.transport.admission import Admission
    from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

    creator = keys.generate()
    pub = keys.public_key_text(creator)
    net = MemoryNetwork(auto_deliver=False)
    transports, recorders = {}, {}
    certs = {"a": "valid", "b": "valid", "c": None,
             "d": _cert(creator, _node_key(tmp_path / "d"), "d", issued=NOW - timedelta(days=2), expires=NOW - timedelta(days=1))}
    for name, cert in certs.items():
        key = _node_key(tmp_path / name)
        signed = _cert(creator, key, name) if cert == "valid" else cert
        admission = Admission(AdmissionSettings(SWARM, pub, certified=True, certificate=signed.text() if signed else b""), name)
        transports[name] = MemoryTransport(net, name, swarm_id=SWARM, admission=admission, public_key=key)
        recorders[name] = Recorder()
        transports[name].start_sync(recorders[name])
    with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
        net.deliver_all()
        for name in ("b", "c", "d"):
            transports["a"].send_model(name, _upd(round_=1))
        transports["c"].send_model("a", _upd(round_=1))
        net.deliver_all()
    assert {p.node_id for p in transports["a"].peers()} == {"b"}
    assert len(recorders["b"].models) == 1 and not recorders["c"].models and not recorders["d"].models
    assert not recorders["a"].models  # c's offer: a never admitted it
    assert {r.qgl_fields["reason"] for r in caplog.records if getattr(r, "node", None) == "a"
            and r.getMessage().startswith("peer-refused")} == {"certificate_missing", "certificate_expired"}


def test_a_running_nodes_own_certificate_expiry_is_checked_before_each_round(tmp_path):
    from quinkgl_cli.node.admission import check_certificate_expiry

    creator = keys.generate()
    cert = _cert(creator, _node_key(tmp_path / "n"), "n", expires=NOW + timedelta(hours=1))
    settings = AdmissionSettings(SWARM, keys.public_key_text(creator), certified=True, certificate=cert.text())
    check_certificate_expiry(settings, NOW)
    with pytest.raises(TrustError, match="certificate expired") as err:
        check_certificate_expiry(settings, NOW + timedelta(hours=2))
    assert err.value.code == 4
    check_certificate_expiry(AdmissionSettings(SWARM, None), NOW + timedelta(days=999))  # open swarm: no certificate
