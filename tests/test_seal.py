"""The sealing layer every swarm datagram passes (`transport.ipv8.seal`) and the keys it is given
(`manifest.swarmkey`, the certificate file of `quinkgl admit`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from quinkgl_cli import keys
from quinkgl_cli.errors import NetworkError, UsageError
from quinkgl_cli.manifest import admission as docs
from quinkgl_cli.manifest import swarmkey
from quinkgl_cli.transport.ipv8.community import community_id_for
from quinkgl_cli.transport.ipv8.seal import NONCE_BYTES, OVERHEAD, DatagramSeal

KEY = bytes(range(32))
PACKET = b"\x00\x02" + b"c" * 20 + b"\x05" + b"hello, signed payload and signature"


def test_a_sealed_datagram_opens_to_the_packet_and_shows_none_of_it() -> None:
    seal = DatagramSeal(KEY)
    sealed = seal.seal(PACKET)
    assert len(sealed) == len(PACKET) + OVERHEAD
    assert seal.open(sealed) == PACKET
    for clear in (PACKET[:22], b"hello", b"\x00\x02"):
        assert clear not in sealed[NONCE_BYTES:]  # neither the prefix nor the payload is in clear


def test_every_seal_takes_a_fresh_nonce() -> None:
    seal = DatagramSeal(KEY)
    sealed = [seal.seal(PACKET) for _ in range(2000)]
    assert len({s[:NONCE_BYTES] for s in sealed}) == 2000
    assert len(set(sealed)) == 2000  # the same packet never looks the same twice
    other = DatagramSeal(KEY)  # another process of the swarm: another random prefix
    assert other.seal(PACKET)[:NONCE_BYTES] not in {s[:NONCE_BYTES] for s in sealed}
    seal._count = (1 << 32) - 1  # the counter's last value, then a fresh prefix rather than a repeat
    last, after = seal.seal(PACKET), seal.seal(PACKET)
    assert last[:8] == sealed[0][:8] and after[:8] != last[:8] and after[8:NONCE_BYTES] == bytes(4)


def test_a_tampered_datagram_does_not_open() -> None:
    seal = DatagramSeal(KEY)
    sealed = seal.seal(PACKET)
    for i in (0, NONCE_BYTES - 1, NONCE_BYTES, len(sealed) // 2, len(sealed) - 1):
        altered = bytearray(sealed)
        altered[i] ^= 0x01
        assert seal.open(bytes(altered)) is None, i
    assert seal.open(sealed[:-1]) is None  # truncated
    assert seal.open(sealed + b"x") is None  # extended


def test_another_key_cleartext_or_noise_does_not_open() -> None:
    seal = DatagramSeal(KEY)
    other = DatagramSeal(bytes(32))
    assert seal.open(other.seal(PACKET)) is None
    assert seal.open(PACKET) is None  # an older version's cleartext packet
    assert seal.open(b"") is None and seal.open(bytes(OVERHEAD)) is None
    assert seal.open(bytes(range(200))) is None


def test_a_swarm_key_must_have_32_bytes() -> None:
    with pytest.raises(NetworkError, match="32 bytes"):
        DatagramSeal(b"short")


def test_keys_of_certified_and_open_swarms_depend_on_their_secrets_only() -> None:
    creator, other = keys.generate(), keys.generate()
    swarm = "sha256:" + "ab" * 32
    assert swarmkey.certified(creator, swarm) == swarmkey.certified(creator, swarm)  # every `admit` gives the same
    assert swarmkey.certified(creator, swarm) != swarmkey.certified(other, swarm)
    assert swarmkey.certified(creator, swarm) != swarmkey.certified(creator, "sha256:" + "cd" * 32)
    canonical = b'{"name":"s"}'
    assert swarmkey.open_swarm(canonical, "00" * 64) != swarmkey.open_swarm(canonical, None)
    assert swarmkey.open_swarm(canonical, None) != swarmkey.open_swarm(b'{"name":"t"}', None)
    # The community id comes from the key: knowing the swarm id does not give it.
    assert community_id_for(swarmkey.certified(creator, swarm)) != community_id_for(swarmkey.for_swarm_id(swarm))
    assert len(community_id_for(KEY)) == 20


def test_the_certificate_file_holds_the_swarm_key_outside_what_is_signed_and_sent() -> None:
    creator = keys.generate()
    swarm = "sha256:" + "ab" * 32
    cert = docs.sign(docs.Certificate(swarm_id=swarm, node_id="peer-1", node_key="4c69624e61434c504b3a" + "ef" * 64,
                                      issued_at=datetime(2026, 1, 1, tzinfo=UTC)), creator)
    key = swarmkey.certified(creator, swarm)
    data = docs.certificate_file(cert, key)
    parsed, found = docs.parse_certificate_file(data, "cert")
    assert found == key
    assert docs.signature_valid(parsed, keys.public_key_text(creator))
    assert key.hex().encode() not in parsed.text()  # what a hello carries
    assert docs.parse_certificate_file(cert.text(), "cert")[1] is None  # a file made before keys were issued
    with pytest.raises(UsageError):
        docs.parse(data, docs.Certificate, "hello")  # a certificate that arrives with a key is malformed
    bad = json.loads(data)
    bad[docs.SWARM_KEY_FIELD] = "zz"
    with pytest.raises(UsageError, match="64 hex"):
        docs.parse_certificate_file(json.dumps(bad).encode(), "cert")


def test_an_open_swarm_is_keyed_by_its_whole_signed_manifest_not_its_id(tmp_path: Path) -> None:
    from quinkgl_cli.manifest.trust import load_trusted
    from quinkgl_cli.node.admission import prepare_admission
    from tests.helpers_manifest import make_manifest, write

    creator = keys.generate()
    signed = load_trusted(write(tmp_path / "s.qgl", make_manifest("open", key=creator)), "open")
    unsigned = load_trusted(write(tmp_path / "u.qgl", make_manifest("open")), "open")
    for trusted in (signed, unsigned):
        key = prepare_admission(trusted, "n", tmp_path / "state", None, None).swarm_key
        assert key == swarmkey.open_swarm(trusted.canonical, trusted.manifest.signature)
        assert key != swarmkey.for_swarm_id(trusted.swarm_id)
    assert signed.manifest.signature is not None and unsigned.manifest.signature is None


def test_admission_settings_refuse_a_swarm_key_of_the_wrong_size() -> None:
    from quinkgl_cli.transport.admission import AdmissionSettings

    with pytest.raises(NetworkError, match="32 bytes"):
        AdmissionSettings("sha256:" + "ab" * 32, None, swarm_key=b"short")
    assert AdmissionSettings("s", None).sealing_key() == swarmkey.for_swarm_id("s")
