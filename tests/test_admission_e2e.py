"""A certified swarm of real daemons on loopback (issue 12 item 7): nodes get their certificates through the CLI
(`node-key`, then `admit`), and an intruder that knows a daemon's address, the swarm id and the architecture but
holds no certificate is refused and receives no model bytes; daemons without a valid certificate do not start."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from quinkgl_cli import keys
from quinkgl_cli.manifest import admission as docs
from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.transport.admission import AdmissionSettings
from tests.test_transport_contract import Recorder

pytestmark = pytest.mark.e2e

ROUNDS = 8
INTERVAL = 0.6


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "quinkgl_cli", *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_certified_daemons_refuse_an_intruder_and_uncertified_daemons_do_not_start(tmp_path: Path) -> None:
    manifest, creator_path, _pub, swarm_id = ls.digits_manifest(tmp_path, name="certified", membership="certified")
    home = tmp_path / "home"
    env = ls.child_env(home)
    ports = [ls.free_port(), ls.free_port()]
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    for i, name in enumerate(["peer-1", "peer-2"]):
        node_key = _cli(env, "node-key", "--node-id", name).strip()
        cert = tmp_path / f"{name}.cert"
        _cli(env, "admit", "-m", str(manifest), "--node-key", node_key, "--node-id", name, "--sign-with", str(creator_path),
             "-o", str(cert))
        args = {"shard": str(i), "num_shards": "2", "partition": "shards:5"}
        cmd = ls.run_command(manifest, ls.DIGITS_SCRIPT, name, ports[i], ROUNDS, INTERVAL, [ports[1 - i]],
                             tmp_path / "ckpt" / name, args, ["--min-peers", "1", "--certificate", str(cert)])
        procs.append((name, subprocess.Popen(cmd, stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                                             env=env), tmp_path / f"{name}.log"))
    # Daemons that must not start: no certificate, and an expired one (made as `admit` would, dated in the past).
    creator = keys.load_private_key(creator_path)
    stale_key = _cli(env, "node-key", "--node-id", "stale").strip()
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
    intruder_models, intruder_saw = asyncio.run(_intrude(tmp_path, swarm_id, manifest, ports[0], procs))
    outcome = {name: (p.wait(timeout=120), p.communicate()[1]) for name, p in refused.items()}
    codes = []
    for _name, proc, _log in procs:
        try:
            codes.append(proc.wait(timeout=120))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(None)
    logs = {name: log.read_text() for name, _p, log in procs}
    assert codes == [0, 0], {n: t[-3000:] for n, t in logs.items()}
    for name, text in logs.items():
        assert "certificate-ok" in text, name
        assert "aggregated models" in text, name  # the certified peers did train together
        assert "peer=peer-3" not in text, name  # the intruder was never discovered, offered to or fetched from
    assert any("peer-refused" in t and "reason=certificate_missing" in t and "claims=peer-3" in t for t in logs.values())
    assert intruder_saw, "the intruder reached the daemons (else nothing was tested)"
    assert intruder_models == 0
    assert outcome["bare"][0] == 4 and "admits only certified nodes" in outcome["bare"][1]
    assert outcome["stale"][0] == 4 and "has expired" in outcome["stale"][1]


async def _intrude(tmp_path: Path, swarm_id: str, manifest: Path, seed_port: int,
                   procs: list[tuple[str, subprocess.Popen, Path]]) -> tuple[int, bool]:
    """An IPv8 transport of our own, claiming a node id, knowing swarm id and arch hash but holding no certificate:
    what an observer that captured one datagram can build. Runs until the daemons exit."""
    from quinkgl_cli.manifest.io import load_manifest
    from quinkgl_cli.transport.ipv8 import IPv8Transport

    m = load_manifest(manifest).manifest
    rec = Recorder()
    intruder = IPv8Transport(node_id="peer-3", swarm_id=swarm_id, arch_hash=m.model.arch_hash, state_dir=tmp_path / "intruder",
                             bootstrap=[("127.0.0.1", seed_port)], walk_interval=0.2,
                             admission=AdmissionSettings(swarm_id, m.creator_pubkey, certified=True))
    await intruder.start(rec)
    saw = False
    try:
        deadline = time.monotonic() + 150
        while any(p.poll() is None for _n, p, _l in procs) and time.monotonic() < deadline:
            saw = saw or bool(intruder.peers())  # it accepts the daemons' valid certificates; they refuse its hello
            await asyncio.sleep(0.1)
    finally:
        await intruder.stop()
    return len(rec.models) + intruder.stats.models_received, saw
