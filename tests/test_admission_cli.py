"""`quinkgl node-key`, `admit` and `revoke`, and `manifest create --membership`, through the console entry point."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from quinkgl_cli import keys
from quinkgl_cli.cli.app import main
from quinkgl_cli.manifest import admission as docs
from quinkgl_cli.manifest import swarmkey
from quinkgl_cli.manifest.io import load_manifest
from tests.helpers_manifest import ARCH


def _run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    out = capsys.readouterr()
    return int(done.value.code or 0), out.out, out.err


@pytest.fixture
def swarm(tmp_path: Path, capsys, monkeypatch) -> dict[str, Path]:
    monkeypatch.setenv("QUINKGL_HOME", str(tmp_path / "home"))
    creator = tmp_path / "creator.key"
    keys.save_private_key(creator, keys.generate())
    base = ["manifest", "create", "--name", "certed", "--task-type", "class", "--label-type", "integer",
            "--input-shape", "64", "--output-shape", "10", "--model-arch-hash", ARCH, "--aggregation", "FedAvg",
            "--topology", "FullTopology"]
    code, _, err = _run(capsys, *base, "--membership", "certified", "--output", str(tmp_path / "unsigned.qgl"))
    assert code == 1 and "--membership certified needs --sign-with" in err
    code, _, err = _run(capsys, *base, "--membership", "certified", "--sign-with", str(creator), "--output", str(tmp_path / "s.qgl"))
    assert code == 0, err
    code, _, _ = _run(capsys, *base, "--sign-with", str(creator), "--output", str(tmp_path / "open.qgl"))
    assert code == 0
    return {"creator": creator, "manifest": tmp_path / "s.qgl", "open": tmp_path / "open.qgl", "dir": tmp_path}


def test_node_key_then_admit_gives_a_certificate_for_that_key(swarm, capsys):
    d = swarm["dir"]
    m = ["--manifest", str(swarm["manifest"])]
    code, out, _ = _run(capsys, "node-key", "--node-id", "peer-1", *m, "--output", str(d / "p1.pub"))
    node_key = out.strip()
    assert code == 0 and node_key == (d / "p1.pub").read_text().strip()
    assert _run(capsys, "node-key", "--node-id", "peer-1", *m)[1].strip() == node_key  # the same key every time
    # Another swarm, another key: peers of two swarms cannot link one node's memberships by its key.
    assert _run(capsys, "node-key", "--node-id", "peer-1", "-m", str(swarm["open"]))[1].strip() not in ("", node_key)
    code, out, err = _run(capsys, "admit", "-m", str(swarm["manifest"]), "--node-key", str(d / "p1.pub"), "--node-id", "peer-1",
                          "--sign-with", str(swarm["creator"]), "--expires-at", "2099-01-01", "-o", str(d / "p1.cert"))
    assert code == 0, err
    cert, swarm_key = docs.parse_certificate_file((d / "p1.cert").read_bytes(), "cert")
    loaded = load_manifest(swarm["manifest"])
    assert docs.certificate_problem(cert, swarm_id=loaded.swarm_id, creator_pubkey=loaded.manifest.creator_pubkey,
                                    node_key=node_key, node_id="peer-1", now=cert.document.issued_at) is None
    # The swarm key every certificate of this swarm carries, only in the file, which only its owner may read.
    assert swarm_key == swarmkey.certified(keys.load_private_key(swarm["creator"]), loaded.swarm_id)
    assert stat.S_IMODE((d / "p1.cert").stat().st_mode) == 0o600
    code, _, err = _run(capsys, "revoke", "-m", str(swarm["manifest"]), "--sign-with", str(swarm["creator"]),
                        "--certificate", str(d / "p1.cert"), "-o", str(d / "r.json"))  # a file with its key reads
    assert code == 0, err
    assert docs.parse((d / "r.json").read_bytes(), docs.RevocationList, "r").document.revoked == (docs.fingerprint(node_key),)
    # Refusals: another key than the creator's, an open swarm, a bad node key.
    other = d / "other.key"
    keys.save_private_key(other, keys.generate())
    code, _, err = _run(capsys, "admit", "-m", str(swarm["manifest"]), "--node-key", node_key, "--node-id", "peer-1",
                        "--sign-with", str(other), "-o", str(d / "x.cert"))
    assert code == 3 and "is not the key that signed" in err
    code, _, err = _run(capsys, "admit", "-m", str(swarm["open"]), "--node-key", node_key, "--node-id", "peer-1",
                        "--sign-with", str(swarm["creator"]), "-o", str(d / "x.cert"))
    assert code == 1 and "open swarm" in err
    code, _, err = _run(capsys, "admit", "-m", str(swarm["manifest"]), "--node-key", "ed25519:" + "00" * 32,
                        "--node-id", "peer-1", "--sign-with", str(swarm["creator"]), "-o", str(d / "x.cert"))
    assert code == 1 and "is not a node key" in err
    assert not (d / "x.cert").exists()


def test_revoke_builds_on_the_previous_list(swarm, capsys):
    d = swarm["dir"]
    k1 = _run(capsys, "node-key", "--node-id", "a", "-m", str(swarm["manifest"]))[1].strip()
    k2 = _run(capsys, "node-key", "--node-id", "b", "-m", str(swarm["manifest"]))[1].strip()
    common = ["revoke", "-m", str(swarm["manifest"]), "--sign-with", str(swarm["creator"])]
    assert _run(capsys, *common, "--node-key", k1, "-o", str(d / "r1.json"))[0] == 0
    assert _run(capsys, *common, "--previous", str(d / "r1.json"), "--node-key", k2, "-o", str(d / "r2.json"))[0] == 0
    r2 = docs.parse((d / "r2.json").read_bytes(), docs.RevocationList, "r2").document
    assert r2.version == 2 and set(r2.revoked) == {docs.fingerprint(k1), docs.fingerprint(k2)}
    code, _, err = _run(capsys, *common, "--previous", str(d / "r2.json"), "--node-key", k1, "--version", "2",
                        "-o", str(d / "r3.json"))
    assert code == 1 and "not above the previous list's 2" in err
    code, _, err = _run(capsys, *common, "-o", str(d / "r4.json"))
    assert code == 1 and "nothing to revoke" in err
